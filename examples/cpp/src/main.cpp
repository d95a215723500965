// medsam_rt_cpp: segment boxes on an image with an exported medsam-rt model directory, through the ONNX Runtime
// C++ API. The contract it follows is docs/onnx-contract.md; the Python runtime (medsam_rt) is the reference.
//
//   medsam_rt_cpp [--cuda] [--precision auto|fp32|fp16|int8] [--threads N] [--dump-input FILE]
//                 MODEL_DIR IMAGE X0 Y0 X1 Y1 [X0 Y0 X1 Y1 ...] OUT.png
//
// One box: OUT.png is 255 inside the mask, 0 outside. N >= 2 boxes: a label image, 0 background and k (1..N) for
// box k; where masks overlap the box with the highest probability wins (medsam_rt's Segmentation.label_image()).
// Errors: one line on stderr, exit code 2.

#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "image.hpp"
#include "recipe.hpp"
#include "sha256.hpp"

namespace {

using medsam::Recipe;
using medsam::Size;

constexpr int kSchemaVersion = 1;
constexpr const char* kPrecisions[] = {"fp32", "fp16", "int8"};
// metadata_props keys this program reads (every graph carries them; see docs/onnx-contract.md)
constexpr const char* kMetaSchemaVersion = "medsam_rt.schema_version";
constexpr const char* kMetaRole = "medsam_rt.role";
constexpr const char* kMetaPrecision = "medsam_rt.precision";
constexpr const char* kMetaModel = "medsam_rt.model";
constexpr const char* kMetaPreprocessing = "medsam_rt.preprocessing";
constexpr const char* kMetaEncoderSha256 = "medsam_rt.encoder_sha256";

const char* const kUsage =
    "usage: medsam_rt_cpp [--cuda] [--precision auto|fp32|fp16|int8] [--threads N] [--dump-input FILE]\n"
    "                     MODEL_DIR IMAGE X0 Y0 X1 Y1 [X0 Y0 X1 Y1 ...] OUT.png\n"
    "       medsam_rt_cpp --version\n"
    "IMAGE: PNG (8-bit gray or RGB, 16-bit gray). Boxes: x0 y0 x1 y1 in image pixels.\n"
    "OUT.png: 8-bit gray; one box: 255 inside the mask; N boxes: labels 1..N (0 background).\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  bool cuda = false;
  std::string precision = "auto";
  int threads = 0;
  std::string dump_input;
  std::string model_dir, image, out;
  std::vector<double> boxes;
};

double parse_number(const std::string& s, size_t index) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || end != s.c_str() + s.size()) {
    throw std::runtime_error("box coordinate " + std::to_string(index) + " ('" + s + "') is not a number");
  }
  return v;
}

Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> pos;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* name) -> std::string {
      if (i + 1 >= argc) throw UsageError(std::string(name) + " needs a value");
      return argv[++i];
    };
    if (a == "--cuda") {
      o.cuda = true;
    } else if (a == "--precision") {
      o.precision = value("--precision");
    } else if (a == "--threads") {
      const std::string t = value("--threads");
      char* end = nullptr;
      const long n = std::strtol(t.c_str(), &end, 10);
      if (t.empty() || *end != '\0' || n < 1 || n > 1024) throw UsageError("--threads expects a positive integer");
      o.threads = static_cast<int>(n);
    } else if (a == "--dump-input") {
      o.dump_input = value("--dump-input");
    } else if (a.size() > 2 && a.compare(0, 2, "--") == 0) {
      throw UsageError("unknown option " + a);
    } else {
      pos.push_back(a);  // includes "-1": a box coordinate, refused later with the box's own message
    }
  }
  if (pos.size() < 7 || (pos.size() - 3) % 4 != 0) {
    throw UsageError("expected MODEL_DIR IMAGE, groups of four box coordinates, OUT.png; got " +
                     std::to_string(pos.size()) + " arguments");
  }
  o.model_dir = pos[0];
  o.image = pos[1];
  o.out = pos.back();
  for (size_t i = 2; i + 1 < pos.size(); ++i) o.boxes.push_back(parse_number(pos[i], i - 2));
  bool known = o.precision == "auto";
  for (const char* p : kPrecisions) known = known || o.precision == p;
  if (!known) throw UsageError("--precision " + o.precision + ": expected auto, fp32, fp16 or int8");
  return o;
}

// ------------------------------------------------------------------------------------------ the model directory
struct Graph {
  std::string role, file, path, sha256;
};

struct ModelDir {
  std::string dir;
  nlohmann::json model, preprocessing;  // as the manifest states them (the graphs' metadata must agree)
  Recipe recipe;
  bool random_weights = false;
  std::string precision;
  Graph encoder, decoder;
  std::vector<std::string> encoder_sha256s;  // of every exported encoder: a decoder pairs with one of them
};

bool is_dir(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string join(const std::vector<std::string>& items) {
  std::string s;
  for (const auto& i : items) s += (s.empty() ? "" : ", ") + i;
  return s.empty() ? "none" : s;
}

using nlohmann::json;

// The member named `key` of an object, or nullptr (also when `obj` is not an object).
const json* find(const json& obj, const char* key) {
  if (!obj.is_object()) return nullptr;
  const auto it = obj.find(key);
  return it == obj.end() ? nullptr : &*it;
}

const json& at(const json& obj, const char* key, const std::string& where) {
  const json* v = find(obj, key);
  if (v == nullptr) throw std::runtime_error(where + " is malformed: missing entry '" + key + "'");
  return *v;
}

ModelDir load_model_dir(const std::string& dir, const std::string& requested, bool cuda) {
  if (!is_dir(dir)) throw std::runtime_error("model directory not found: " + dir);
  const std::string path = dir + "/manifest.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(dir + " is not a medsam-rt model directory: manifest.json is missing");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  json m;
  try {
    m = json::parse(text);
  } catch (const std::exception& e) {
    throw std::runtime_error("cannot read " + path + ": " + e.what());
  }
  const json* format = find(m, "format");
  if (format == nullptr || !format->is_string() || format->get<std::string>() != "medsam-rt") {
    throw std::runtime_error(path + " is not a medsam-rt manifest (missing \"format\": \"medsam-rt\")");
  }
  const json* version = find(m, "schema_version");
  if (version == nullptr || !version->is_number() || version->get<double>() != kSchemaVersion) {
    throw std::runtime_error(path + " has an unknown schema_version; this program reads version " +
                             std::to_string(kSchemaVersion));
  }
  ModelDir md;
  md.dir = dir;
  md.model = at(m, "model", path);
  if (!at(md.model, "source", path).is_string() || !at(md.model, "checksum", path).is_string()) {
    throw std::runtime_error(path + " is malformed: model.source and model.checksum must be strings");
  }
  if (const json* rw = find(md.model, "random_weights")) md.random_weights = rw->is_boolean() && rw->get<bool>();
  md.preprocessing = at(m, "preprocessing", path);
  md.recipe = medsam::parse_recipe(md.preprocessing);

  // precisions with both graphs and a passed gate, as medsam_rt.core.manifest.Manifest.precisions
  const json& graphs = at(m, "graphs", path);
  const json& encoders = at(graphs, "encoder", path);
  const json& decoders = at(graphs, "decoder", path);
  const json* parity = find(m, "parity");
  std::vector<std::string> available;
  for (const char* p : kPrecisions) {
    const json* gate = parity != nullptr ? find(*parity, p) : nullptr;
    const json* passed = gate != nullptr ? find(*gate, "passed") : nullptr;
    if (find(encoders, p) && find(decoders, p) && passed != nullptr && passed->is_boolean() && passed->get<bool>()) {
      available.emplace_back(p);
    }
  }
  auto has = [&](const std::string& p) { return std::find(available.begin(), available.end(), p) != available.end(); };
  std::string precision = requested;
  if (precision == "auto") {  // fp16 on CUDA, int8 on the CPU, when exported; else fp32
    precision = "fp32";
    for (const char* p : cuda ? std::array<const char*, 2>{"fp16", "fp32"} : std::array<const char*, 2>{"int8", "fp32"}) {
      if (has(p)) {
        precision = p;
        break;
      }
    }
  }
  if (!has(precision)) {
    throw std::runtime_error(dir + " has no " + precision + " variant that passed its gate; available: " +
                             join(available));
  }
  md.precision = precision;
  if (!encoders.is_object()) throw std::runtime_error(path + " is malformed: graphs.encoder must be an object");
  for (const auto& [p, entry] : encoders.items()) {
    const json& sha = at(entry, "sha256", path + " (graphs.encoder." + p + ")");
    if (sha.is_string()) md.encoder_sha256s.push_back(sha.get<std::string>());
  }
  // each graph: present, the manifest's size and sha256
  for (Graph* g : {&md.encoder, &md.decoder}) {
    g->role = g == &md.encoder ? "encoder" : "decoder";
    const json& entry = at(g == &md.encoder ? encoders : decoders, precision.c_str(), path);
    const json& file = at(entry, "file", path);
    const json& sha256 = at(entry, "sha256", path);
    const json& bytes = at(entry, "bytes", path);
    if (!file.is_string() || !sha256.is_string() || !bytes.is_number()) {
      throw std::runtime_error(path + " is malformed: bad graphs." + g->role + "." + precision + " entry");
    }
    g->file = file.get<std::string>();
    g->path = dir + "/" + g->file;
    g->sha256 = sha256.get<std::string>();
    struct stat st {};
    if (::stat(g->path.c_str(), &st) != 0) throw std::runtime_error(g->file + " listed in " + path + " is missing");
    if (static_cast<double>(st.st_size) != bytes.get<double>()) {
      throw std::runtime_error(g->file + " has " + std::to_string(st.st_size) + " bytes, the manifest says " +
                               std::to_string(static_cast<long long>(bytes.get<double>())) + ": truncated or replaced");
    }
    const std::string actual = medsam::sha256_file(g->path);
    if (actual != g->sha256) {
      throw std::runtime_error(g->file + " has sha256 " + actual.substr(0, 16) + "..., the manifest says " +
                               g->sha256.substr(0, 16) + "...: the file was edited or replaced");
    }
  }
  return md;
}

// ------------------------------------------------------------------------------------------------- ONNX Runtime
std::string runtime_library() {
  Dl_info info{};
  if (::dladdr(reinterpret_cast<void*>(&OrtGetApiBase), &info) != 0 && info.dli_fname != nullptr) {
    return info.dli_fname;
  }
  return "libonnxruntime";
}

std::string metadata(Ort::Session& session, const char* key) {
  Ort::AllocatorWithDefaultOptions alloc;
  Ort::ModelMetadata md = session.GetModelMetadata();
  Ort::AllocatedStringPtr v = md.LookupCustomMetadataMapAllocated(key, alloc);
  return v ? std::string(v.get()) : std::string();
}

// The graph's metadata_props must agree with the manifest (as medsam_rt.core.manifest.check_graph_metadata), and its
// inputs/outputs must be the contract's.
void check_graph(Ort::Session& s, const ModelDir& md, const Graph& g, const std::vector<std::string>& inputs,
                 const std::vector<std::string>& outputs) {
  const std::string& name = g.file;
  if (metadata(s, kMetaRole).empty()) {
    throw std::runtime_error(name + " carries no " + kMetaRole + " metadata: not a graph written by medsam-rt export");
  }
  // precision: the file name's (the int8 variant reuses decoder.fp32.onnx), else the variant's
  const size_t dot1 = name.find('.'), dot2 = name.rfind('.');
  const bool three_parts = dot1 != dot2 && name.find('.', dot1 + 1) == dot2;
  const std::string precision = three_parts ? name.substr(dot1 + 1, dot2 - dot1 - 1) : md.precision;
  const std::pair<const char*, std::string> expected[] = {
      {kMetaSchemaVersion, std::to_string(kSchemaVersion)}, {kMetaRole, g.role}, {kMetaPrecision, precision}};
  for (const auto& [key, value] : expected) {
    const std::string got = metadata(s, key);
    if (got != value) throw std::runtime_error(name + ": its metadata says " + key + "='" + got + "', expected '" + value + "'");
  }
  const std::pair<const char*, const json*> same[] = {{kMetaModel, &md.model}, {kMetaPreprocessing, &md.preprocessing}};
  for (const auto& [key, value] : same) {
    json v;
    try {
      v = json::parse(metadata(s, key));
    } catch (const std::exception&) {
      throw std::runtime_error(name + ": its metadata has no valid " + key + " entry");
    }
    if (v != *value) {
      throw std::runtime_error(name + ": its metadata " + key +
                               " differs from manifest.json's: the graph comes from another export, or manifest.json "
                               "was edited");
    }
  }
  if (g.role == "decoder") {
    const std::string enc = metadata(s, kMetaEncoderSha256);
    if (std::find(md.encoder_sha256s.begin(), md.encoder_sha256s.end(), enc) == md.encoder_sha256s.end()) {
      throw std::runtime_error(name + " pairs with encoder sha256 " + enc.substr(0, 16) +
                               "..., which is none of the encoders in manifest.json: the decoder comes from another "
                               "export");
    }
  }
  Ort::AllocatorWithDefaultOptions alloc;
  auto names = [&](bool in) {
    std::vector<std::string> n;
    const size_t count = in ? s.GetInputCount() : s.GetOutputCount();
    for (size_t i = 0; i < count; ++i) {
      n.emplace_back(in ? s.GetInputNameAllocated(i, alloc).get() : s.GetOutputNameAllocated(i, alloc).get());
    }
    return n;
  };
  if (names(true) != inputs || names(false) != outputs) {
    throw std::runtime_error(name + " has inputs [" + join(names(true)) + "] and outputs [" + join(names(false)) +
                             "]; expected [" + join(inputs) + "] and [" + join(outputs) + "]");
  }
}

// Both graphs on one ONNX Runtime environment: embed once per image, decode any number of boxes per call.
class Model {
 public:
  Model(const ModelDir& md, bool cuda, int threads)
      : env_(ORT_LOGGING_LEVEL_ERROR, "medsam_rt_cpp"),
        encoder_(env_, md.encoder.path.c_str(), options(cuda, threads)),
        decoder_(env_, md.decoder.path.c_str(), options(cuda, threads)) {
    check_graph(encoder_, md, md.encoder, {"pixel_values"}, {"image_embeddings"});
    check_graph(decoder_, md, md.decoder, {"image_embeddings", "boxes"}, {"low_res_logits", "iou_scores"});
    const std::vector<int64_t> shape = encoder_.GetInputTypeInfo(0).GetTensorTypeAndShapeInfo().GetShape();
    if (shape.size() != 4 || shape[2] != md.recipe.pad.h || shape[3] != md.recipe.pad.w) {
      throw std::runtime_error(md.encoder.file + " expects a different input size than the recipe's pad_size [" +
                               std::to_string(md.recipe.pad.h) + ", " + std::to_string(md.recipe.pad.w) + "]");
    }
  }

  // pixel_values float32 [1, 3, pad_h, pad_w] -> image_embeddings [1, C, 64, 64]
  Ort::Value embed(std::vector<float>& pixel_values, Size pad) {
    const std::array<int64_t, 4> shape{1, 3, pad.h, pad.w};
    Ort::Value input = Ort::Value::CreateTensor<float>(cpu_, pixel_values.data(), pixel_values.size(), shape.data(), 4);
    const char* in[] = {"pixel_values"};
    const char* out[] = {"image_embeddings"};
    return std::move(encoder_.Run(Ort::RunOptions{nullptr}, in, &input, 1, out, 1)[0]);
  }

  // embedding + boxes float32 [N, 4] (encoder frame) -> {low_res_logits [N, 1, 256, 256], iou_scores [N, 1]}.
  // The embedding is only read: decode the same image again with other boxes without re-encoding it.
  std::vector<Ort::Value> decode(Ort::Value& embedding, std::vector<float>& boxes) {
    const Ort::TensorTypeAndShapeInfo info = embedding.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> emb_shape = info.GetShape();
    const std::array<int64_t, 2> box_shape{static_cast<int64_t>(boxes.size() / 4), 4};
    Ort::Value inputs[] = {  // views of the caller's buffers, no copies
        Ort::Value::CreateTensor<float>(cpu_, embedding.GetTensorMutableData<float>(), info.GetElementCount(),
                                        emb_shape.data(), emb_shape.size()),
        Ort::Value::CreateTensor<float>(cpu_, boxes.data(), boxes.size(), box_shape.data(), 2)};
    const char* in[] = {"image_embeddings", "boxes"};
    const char* out[] = {"low_res_logits", "iou_scores"};
    return decoder_.Run(Ort::RunOptions{nullptr}, in, inputs, 2, out, 2);
  }

 private:
  static Ort::SessionOptions options(bool cuda, int threads) {
    Ort::SessionOptions so;
    so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    if (threads > 0) so.SetIntraOpNumThreads(threads);
    if (!cuda) return so;
    const std::vector<std::string> providers = Ort::GetAvailableProviders();
    if (std::find(providers.begin(), providers.end(), "CUDAExecutionProvider") == providers.end()) {
      throw std::runtime_error("--cuda: the ONNX Runtime this program is linked against (" + runtime_library() +
                               ") has no CUDAExecutionProvider; available: " + join(providers) +
                               ". Build against onnxruntime-gpu's library (PYTHON=<python with onnxruntime-gpu> "
                               "examples/cpp/build.sh BUILD_DIR)");
    }
    OrtCUDAProviderOptionsV2* cuda_options = nullptr;
    Ort::ThrowOnError(Ort::GetApi().CreateCUDAProviderOptions(&cuda_options));
    std::unique_ptr<OrtCUDAProviderOptionsV2, void (*)(OrtCUDAProviderOptionsV2*)> guard(
        cuda_options, [](OrtCUDAProviderOptionsV2* p) { Ort::GetApi().ReleaseCUDAProviderOptions(p); });
    so.AppendExecutionProvider_CUDA_V2(*cuda_options);
    return so;
  }

  Ort::Env env_;  // outlives the sessions (declared first)
  Ort::Session encoder_, decoder_;
  Ort::MemoryInfo cpu_ = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
};

struct Timer {
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  double ms() const { return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count(); }
};

std::string parent_dir(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

int run(const Options& o) {
  if (!is_dir(parent_dir(o.out)) || ::access(parent_dir(o.out).c_str(), W_OK) != 0) {
    throw std::runtime_error("output " + o.out + ": directory " + parent_dir(o.out) + " does not exist or is not writable");
  }
  const size_t n = o.boxes.size() / 4;
  if (n > 255) throw std::runtime_error("a uint8 label image holds at most 255 boxes, got " + std::to_string(n));
  Timer load;  // manifest, sha256 of both graphs, sessions, metadata checks
  const ModelDir md = load_model_dir(o.model_dir, o.precision, o.cuda);
  const medsam::RgbImage image = medsam::read_png(o.image);
  medsam::validate_boxes(o.boxes, image.size);
  if (md.random_weights) {
    std::cerr << "medsam_rt_cpp: warning: " << md.dir << " has RANDOM WEIGHTS (tests only); its masks are meaningless\n";
  }
  Model model(md, o.cuda, o.threads);
  const double load_ms = load.ms();

  Timer pre;
  Size resized;
  std::vector<float> pixels = medsam::encoder_input(image, md.recipe, &resized);
  const double pre_ms = pre.ms();
  if (!o.dump_input.empty()) {
    std::ofstream dump(o.dump_input, std::ios::binary);
    dump.write(reinterpret_cast<const char*>(pixels.data()), static_cast<std::streamsize>(pixels.size() * 4));
    if (!dump) throw std::runtime_error("cannot write " + o.dump_input);
  }
  Timer enc;
  Ort::Value embedding = model.embed(pixels, md.recipe.pad);  // once per image
  const double enc_ms = enc.ms();

  Timer dec;
  std::vector<float> boxes = medsam::scale_boxes(o.boxes, image.size, resized, md.recipe);
  std::vector<Ort::Value> outs = model.decode(embedding, boxes);  // all boxes in one call
  const double dec_ms = dec.ms();
  const std::vector<int64_t> shape = outs[0].GetTensorTypeAndShapeInfo().GetShape();  // [N, 1, lh, lw]
  if (shape.size() != 4 || shape[0] != static_cast<int64_t>(n) || shape[1] != 1) {
    throw std::runtime_error("the decoder returned low_res_logits of an unexpected shape");
  }

  Timer post;
  const std::vector<std::uint8_t> result = medsam::mask_image(outs[0].GetTensorData<float>(), n, static_cast<int>(shape[2]),
                                                              static_cast<int>(shape[3]), md.recipe, resized, image.size);
  const double post_ms = post.ms();
  medsam::write_png(o.out, image.size, result);

  std::printf("%s: %dx%d, %zu box%s, %s on %s: load %.0f ms, preprocess %.1f ms, encoder %.1f ms, decoder %.1f ms, "
              "postprocess %.1f ms; IoU estimates",
              o.image.c_str(), image.size.w, image.size.h, n, n == 1 ? "" : "es", md.precision.c_str(),
              o.cuda ? "CUDA" : "CPU", load_ms, pre_ms, enc_ms, dec_ms, post_ms);
  const float* scores = outs[1].GetTensorData<float>();
  for (size_t k = 0; k < n; ++k) std::printf(" %.4f", scores[k]);
  std::printf("; wrote %s\n", o.out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 2 && (std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help")) {
      std::cout << kUsage;
      return 0;
    }
    if (argc == 2 && std::string(argv[1]) == "--version") {
      std::cout << "medsam_rt_cpp (manifest schema " << kSchemaVersion << "), ONNX Runtime " << Ort::GetVersionString()
                << " from " << runtime_library() << ", providers: " << join(Ort::GetAvailableProviders()) << "\n";
      return 0;
    }
    return run(parse_args(argc, argv));
  } catch (const UsageError& e) {
    std::cerr << "medsam_rt_cpp: error: " << e.what() << "\n" << kUsage;
    return 2;
  } catch (const Ort::Exception& e) {
    std::cerr << "medsam_rt_cpp: error: ONNX Runtime: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "medsam_rt_cpp: error: " << e.what() << "\n";
    return 2;
  }
}
