#include "recipe.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <stdexcept>

namespace medsam {
namespace {

[[noreturn]] void bad(const std::string& what) { throw std::runtime_error("manifest preprocessing: " + what); }

using nlohmann::json;

const json* find(const json& obj, const char* key) {
  if (!obj.is_object()) return nullptr;
  const auto it = obj.find(key);
  return it == obj.end() ? nullptr : &*it;
}

const json& member(const json& obj, const char* key) {
  const json* v = find(obj, key);
  if (v == nullptr) bad(std::string("missing key '") + key + "'");
  return *v;
}

double number(const json& v, const char* key) {
  if (!v.is_number()) bad(std::string("'") + key + "' must be a number");
  return v.get<double>();
}

int integer(const json& v, const char* key) {
  double d = number(v, key);
  if (d != std::floor(d) || d < 0 || d > 1e6) bad(std::string("'") + key + "' must be a small non-negative integer");
  return static_cast<int>(d);
}

std::string text(const json& v, const char* key) {
  if (!v.is_string()) bad(std::string("'") + key + "' must be a string");
  return v.get<std::string>();
}

// A value in the vocabulary; implemented: the subset this example computes (the rest fails by name).
void check_value(const char* key, const std::string& value, const std::vector<std::string>& implemented,
                 const std::vector<std::string>& known) {
  if (std::find(implemented.begin(), implemented.end(), value) != implemented.end()) return;
  std::string list;
  for (const auto& s : implemented) list += (list.empty() ? "" : ", ") + s;
  if (std::find(known.begin(), known.end(), value) != known.end()) {
    bad(key + std::string("='") + value + "' is not implemented in this C++ example (implemented: " + list + ")");
  }
  bad(key + std::string("='") + value + "' is unknown (expected one of: " + list + ")");
}

void triple(const json* v, const char* key, double out[3]) {
  if (v == nullptr) return;
  if (v->is_number()) {
    out[0] = out[1] = out[2] = v->get<double>();
    return;
  }
  if (!v->is_array() || v->size() != 3) bad(std::string("'") + key + "' must be a number or 3 numbers");
  for (size_t c = 0; c < 3; ++c) out[c] = number((*v)[c], key);
}

}  // namespace

Recipe parse_recipe(const json& p) {
  if (!p.is_object()) bad("'preprocessing' must be an object");
  Recipe r;
  r.resize = text(member(p, "resize"), "resize");
  r.size = integer(member(p, "size"), "size");
  r.interpolation = text(member(p, "interpolation"), "interpolation");
  r.normalize = text(member(p, "normalize"), "normalize");
  const json& pad = member(p, "pad_size");
  if (!pad.is_array() || pad.size() != 2) bad("'pad_size' must be [height, width]");
  r.pad = {integer(pad[0], "pad_size"), integer(pad[1], "pad_size")};
  r.postprocess = text(member(p, "postprocess"), "postprocess");
  if (const json* v = find(p, "rescale_factor")) r.rescale_factor = number(*v, "rescale_factor");
  triple(find(p, "image_mean"), "image_mean", r.image_mean);
  triple(find(p, "image_std"), "image_std", r.image_std);
  if (const json* v = find(p, "box_scale")) r.box_scale = text(*v, "box_scale");
  if (const json* v = find(p, "box_round")) r.box_round = text(*v, "box_round");
  if (const json* v = find(p, "mask_threshold")) r.mask_threshold = number(*v, "mask_threshold");

  check_value("resize", r.resize, {"longest_side", "square"}, {});
  check_value("interpolation", r.interpolation, {"box", "bilinear", "hamming", "bicubic", "lanczos", "area"},
              {"nearest"});
  check_value("normalize", r.normalize, {"rescale_mean_std", "minmax"}, {});
  check_value("box_scale", r.box_scale, {"per_axis", "longest_side"}, {});
  check_value("box_round", r.box_round, {"none", "floor"}, {});
  check_value("postprocess", r.postprocess, {"upscale_crop_resize", "crop_resize", "resize"}, {});
  if (r.size <= 0 || std::min(r.pad.h, r.pad.w) < r.size) {
    bad("sizes are inconsistent: size=" + std::to_string(r.size) + ", pad_size=[" + std::to_string(r.pad.h) + ", " +
        std::to_string(r.pad.w) + "]");
  }
  for (double s : r.image_std) {
    if (s == 0.0) bad("image_std holds a zero");
  }
  if (r.postprocess == "resize" && (r.resize != "square" || r.pad.h != r.size || r.pad.w != r.size)) {
    bad("postprocess='resize' needs resize='square' with no padding");
  }
  return r;
}

Size resized_shape(Size original, const Recipe& r) {
  if (r.resize == "square") return {r.size, r.size};
  double scale = static_cast<double>(r.size) / std::max(original.h, original.w);
  // int(x + 0.5) as in Python: truncation of a positive number
  int h = static_cast<int>(original.h * scale + 0.5);
  int w = static_cast<int>(original.w * scale + 0.5);
  return {std::max(1, h), std::max(1, w)};
}

// ---------------------------------------------------------------------------------------------------------------
// Pillow's resampling (libImaging/Resample.c): separable, horizontal pass first, 8-bit fixed-point coefficients,
// each pass rounded and clipped to uint8. Mirrored operation for operation so the result is bit-identical.
namespace {

constexpr double kPi = 3.14159265358979323846;
constexpr int kPrecisionBits = 32 - 8 - 2;

double box_filter(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }
double bilinear_filter(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}
double hamming_filter(double x) {
  x = std::fabs(x);
  if (x == 0.0) return 1.0;
  if (x >= 1.0) return 0.0;
  x = x * kPi;
  return std::sin(x) / x * (0.54f + 0.46f * std::cos(x));  // 0.54f, 0.46f: float constants, as in Pillow
}
double bicubic_filter(double x) {
  const double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}
double sinc_filter(double x) {
  if (x == 0.0) return 1.0;
  x = x * kPi;
  return std::sin(x) / x;
}
double lanczos_filter(double x) { return (-3.0 <= x && x < 3.0) ? sinc_filter(x) * sinc_filter(x / 3) : 0.0; }

struct Filter {
  double (*fn)(double);
  double support;
};

Filter pil_filter(const std::string& name) {
  if (name == "box") return {box_filter, 0.5};
  if (name == "bilinear") return {bilinear_filter, 1.0};
  if (name == "hamming") return {hamming_filter, 1.0};
  if (name == "bicubic") return {bicubic_filter, 2.0};
  if (name == "lanczos") return {lanczos_filter, 3.0};
  throw std::runtime_error("interpolation '" + name + "' is not a Pillow filter this example implements");
}

struct Coeffs {
  int ksize = 0;
  std::vector<int> xmin, count;
  std::vector<int> k;  // fixed point, ksize per output position
};

Coeffs precompute(int in_size, int out_size, const Filter& f) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = f.support * filterscale;
  Coeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.xmin.resize(out_size);
  c.count.resize(out_size);
  c.k.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> w(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      w[x] = f.fn((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    for (int x = 0; x < xmax; ++x) {
      double v = ww != 0.0 ? w[x] / ww : w[x];
      // normalize_coeffs_8bpc: round half away from zero to 22-bit fixed point
      c.k[static_cast<size_t>(xx) * c.ksize + x] = v < 0 ? static_cast<int>(-0.5 + v * (1 << kPrecisionBits))
                                                         : static_cast<int>(0.5 + v * (1 << kPrecisionBits));
    }
    c.xmin[xx] = xmin;
    c.count[xx] = xmax;
  }
  return c;
}

inline std::uint8_t clip8(int v) {
  int s = v >> kPrecisionBits;  // arithmetic shift (floor), as Pillow's lookup table index
  return static_cast<std::uint8_t>(s < 0 ? 0 : (s > 255 ? 255 : s));
}

std::vector<std::uint8_t> pil_resize(const RgbImage& image, Size out, const Filter& f) {
  const Size in = image.size;
  const bool need_h = out.w != in.w;
  const bool need_v = out.h != in.h;
  Coeffs vert = precompute(in.h, out.h, f);
  const int first = vert.xmin[0];
  const int last = vert.xmin[out.h - 1] + vert.count[out.h - 1];
  std::vector<std::uint8_t> src = image.rgb;
  Size src_size = in;
  if (need_h) {
    Coeffs hor = precompute(in.w, out.w, f);
    for (int i = 0; i < out.h; ++i) vert.xmin[i] -= first;
    Size tmp_size{last - first, out.w};
    std::vector<std::uint8_t> tmp(static_cast<size_t>(tmp_size.h) * tmp_size.w * 3);
    for (int yy = 0; yy < tmp_size.h; ++yy) {
      const std::uint8_t* row = image.rgb.data() + static_cast<size_t>(yy + first) * in.w * 3;
      std::uint8_t* dst = tmp.data() + static_cast<size_t>(yy) * tmp_size.w * 3;
      for (int xx = 0; xx < out.w; ++xx) {
        const int* k = hor.k.data() + static_cast<size_t>(xx) * hor.ksize;
        const std::uint8_t* p = row + static_cast<size_t>(hor.xmin[xx]) * 3;
        int s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
        for (int x = 0; x < hor.count[xx]; ++x) {
          s0 += p[3 * x + 0] * k[x];
          s1 += p[3 * x + 1] * k[x];
          s2 += p[3 * x + 2] * k[x];
        }
        dst[3 * xx + 0] = clip8(s0);
        dst[3 * xx + 1] = clip8(s1);
        dst[3 * xx + 2] = clip8(s2);
      }
    }
    src.swap(tmp);
    src_size = tmp_size;
  }
  if (!need_v) return src;
  std::vector<std::uint8_t> dst(static_cast<size_t>(out.h) * src_size.w * 3);
  const size_t stride = static_cast<size_t>(src_size.w) * 3;
  for (int yy = 0; yy < out.h; ++yy) {
    const int* k = vert.k.data() + static_cast<size_t>(yy) * vert.ksize;
    const std::uint8_t* base = src.data() + static_cast<size_t>(vert.xmin[yy]) * stride;
    std::uint8_t* d = dst.data() + static_cast<size_t>(yy) * stride;
    for (size_t xc = 0; xc < stride; ++xc) {
      int s = 1 << (kPrecisionBits - 1);
      for (int y = 0; y < vert.count[yy]; ++y) s += base[static_cast<size_t>(y) * stride + xc] * k[y];
      d[xc] = clip8(s);
    }
  }
  return dst;
}

// ---------------------------------------------------------------------------------------------------------------
// OpenCV INTER_AREA as medsam_rt/core/resample.py computes it: one sparse (out, in) matrix per axis, float64.
struct Sparse {
  std::vector<std::vector<std::pair<int, double>>> rows;  // per output position: (input position, weight)
  void add(int d, int s, double w) {
    for (auto& e : rows[d]) {
      if (e.first == s) {
        e.second += w;
        return;
      }
    }
    rows[d].emplace_back(s, w);
  }
};

Sparse area_shrink(int out_size, int in_size) {
  const double scale = static_cast<double>(in_size) / out_size;
  Sparse m;
  m.rows.resize(out_size);
  for (int d = 0; d < out_size; ++d) {
    const double f1 = d * scale;
    const double f2 = f1 + scale;
    const double cell = std::min(scale, in_size - f1);
    const int s2 = std::min(static_cast<int>(std::floor(f2)), in_size - 1);
    const int s1 = std::min(static_cast<int>(std::ceil(f1)), s2);
    if (s1 - f1 > 1e-3) m.add(d, s1 - 1, (s1 - f1) / cell);
    for (int s = s1; s < s2; ++s) m.add(d, s, 1.0 / cell);
    if (f2 - s2 > 1e-3) m.add(d, s2, std::min(std::min(f2 - s2, 1.0), cell) / cell);
  }
  return m;
}

Sparse area_linear(int out_size, int in_size) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double inv = static_cast<double>(out_size) / in_size;
  Sparse m;
  m.rows.resize(out_size);
  for (int d = 0; d < out_size; ++d) {
    int s = static_cast<int>(std::floor(d * scale));
    double f = (d + 1) - (s + 1) * inv;
    f = f <= 0 ? 0.0 : f - std::floor(f);
    if (s >= in_size - 1) {
      s = in_size - 1;
      f = 0.0;
    }
    m.add(d, s, 1.0 - f);
    if (f != 0.0) m.add(d, s + 1, f);
  }
  return m;
}

std::vector<std::uint8_t> area_resize(const RgbImage& image, Size out) {
  const Size in = image.size;
  const bool shrink = in.h >= out.h && in.w >= out.w;
  const Sparse rows = shrink ? area_shrink(out.h, in.h) : area_linear(out.h, in.h);
  const Sparse cols = shrink ? area_shrink(out.w, in.w) : area_linear(out.w, in.w);
  const bool halving = in.h == 2 * out.h && in.w == 2 * out.w;
  std::vector<std::uint8_t> dst(static_cast<size_t>(out.h) * out.w * 3);
  std::vector<double> tmp;
  std::vector<double> res(static_cast<size_t>(out.h) * out.w);
  for (int ch = 0; ch < 3; ++ch) {
    auto px = [&](int y, int x) { return static_cast<double>(image.rgb[(static_cast<size_t>(y) * in.w + x) * 3 + ch]); };
    if (out.h <= out.w) {  // (rows @ plane) @ cols.T, the order numpy uses for this shape
      tmp.assign(static_cast<size_t>(out.h) * in.w, 0.0);
      for (int d = 0; d < out.h; ++d) {
        for (const auto& [s, w] : rows.rows[d]) {
          for (int x = 0; x < in.w; ++x) tmp[static_cast<size_t>(d) * in.w + x] += w * px(s, x);
        }
      }
      for (int d = 0; d < out.h; ++d) {
        for (int e = 0; e < out.w; ++e) {
          double acc = 0.0;
          for (const auto& [s, w] : cols.rows[e]) acc += tmp[static_cast<size_t>(d) * in.w + s] * w;
          res[static_cast<size_t>(d) * out.w + e] = acc;
        }
      }
    } else {  // rows @ (plane @ cols.T)
      tmp.assign(static_cast<size_t>(in.h) * out.w, 0.0);
      for (int y = 0; y < in.h; ++y) {
        for (int e = 0; e < out.w; ++e) {
          double acc = 0.0;
          for (const auto& [s, w] : cols.rows[e]) acc += px(y, s) * w;
          tmp[static_cast<size_t>(y) * out.w + e] = acc;
        }
      }
      for (int d = 0; d < out.h; ++d) {
        for (int e = 0; e < out.w; ++e) {
          double acc = 0.0;
          for (const auto& [s, w] : rows.rows[d]) acc += w * tmp[static_cast<size_t>(s) * out.w + e];
          res[static_cast<size_t>(d) * out.w + e] = acc;
        }
      }
    }
    for (size_t i = 0; i < res.size(); ++i) {
      // OpenCV's 2x2 fast path rounds halves up; elsewhere it rounds to nearest even
      double v = halving ? std::floor(res[i] + 0.5) : std::nearbyint(res[i]);
      dst[i * 3 + ch] = static_cast<std::uint8_t>(std::clamp(v, 0.0, 255.0));
    }
  }
  return dst;
}

}  // namespace

std::vector<std::uint8_t> resize_rgb(const RgbImage& image, Size out, const std::string& interpolation) {
  if (interpolation == "area") return area_resize(image, out);
  if (out.h == image.size.h && out.w == image.size.w) return image.rgb;  // Pillow copies
  return pil_resize(image, out, pil_filter(interpolation));
}

std::vector<float> encoder_input(const RgbImage& image, const Recipe& r, Size* resized) {
  const Size rs = resized_shape(image.size, r);
  const std::vector<std::uint8_t> px = resize_rgb(image, rs, r.interpolation);
  std::vector<float> out(static_cast<size_t>(3) * r.pad.h * r.pad.w, 0.0f);
  const size_t plane = static_cast<size_t>(r.pad.h) * r.pad.w;
  if (r.normalize == "minmax") {  // over the whole resized image, float64, then float32
    double lo = 255.0, hi = 0.0;
    for (std::uint8_t v : px) {
      lo = std::min(lo, static_cast<double>(v));
      hi = std::max(hi, static_cast<double>(v));
    }
    const double range = std::max(hi - lo, 1e-8);
    for (int y = 0; y < rs.h; ++y) {
      for (int x = 0; x < rs.w; ++x) {
        for (int c = 0; c < 3; ++c) {
          const double v = px[(static_cast<size_t>(y) * rs.w + x) * 3 + c];
          out[c * plane + static_cast<size_t>(y) * r.pad.w + x] = static_cast<float>((v - lo) / range);
        }
      }
    }
  } else {  // rescale_mean_std: float32(x * rescale_factor), then float32 (x - mean) / std
    for (int c = 0; c < 3; ++c) {
      const float mean = static_cast<float>(r.image_mean[c]);
      const float std = static_cast<float>(r.image_std[c]);
      for (int y = 0; y < rs.h; ++y) {
        for (int x = 0; x < rs.w; ++x) {
          const double v = px[(static_cast<size_t>(y) * rs.w + x) * 3 + c];
          const float scaled = static_cast<float>(v * r.rescale_factor);
          out[c * plane + static_cast<size_t>(y) * r.pad.w + x] = (scaled - mean) / std;
        }
      }
    }
  }
  *resized = rs;
  return out;
}

void validate_boxes(const std::vector<double>& boxes, Size original) {
  if (boxes.empty() || boxes.size() % 4 != 0) {
    throw std::runtime_error("boxes must be groups of four numbers x0 y0 x1 y1; got " + std::to_string(boxes.size()) +
                             " numbers");
  }
  for (size_t i = 0; i < boxes.size() / 4; ++i) {
    const double x0 = boxes[4 * i], y0 = boxes[4 * i + 1], x1 = boxes[4 * i + 2], y1 = boxes[4 * i + 3];
    char name[160];
    std::snprintf(name, sizeof name, "box %zu (%g, %g, %g, %g)", i, x0, y0, x1, y1);
    if (!(std::isfinite(x0) && std::isfinite(y0) && std::isfinite(x1) && std::isfinite(y1))) {
      throw std::runtime_error(std::string(name) + " holds NaN or Inf");
    }
    if (!(x1 > x0 && y1 > y0)) {
      throw std::runtime_error(std::string(name) + " is inverted or has zero area; expected x0 < x1 and y0 < y1");
    }
    if (x0 < 0 || y0 < 0 || x1 > original.w || y1 > original.h) {
      char where[160];
      std::snprintf(where, sizeof where, " lies outside the %dx%d image; expected 0 <= x <= %d, 0 <= y <= %d",
                    original.w, original.h, original.w, original.h);
      throw std::runtime_error(std::string(name) + where);
    }
  }
}

std::vector<float> scale_boxes(const std::vector<double>& boxes, Size original, Size resized, const Recipe& r) {
  double fx, fy;
  if (r.box_scale == "longest_side") {
    fx = fy = static_cast<double>(r.size) / std::max(original.h, original.w);
  } else {
    fx = static_cast<double>(resized.w) / original.w;
    fy = static_cast<double>(resized.h) / original.h;
  }
  std::vector<float> out(boxes.size());
  for (size_t i = 0; i < boxes.size(); ++i) {
    double v = boxes[i] * (i % 2 == 0 ? fx : fy);
    if (r.box_round == "floor") v = std::floor(v);
    out[i] = static_cast<float>(v);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Postprocessing: bilinear resizing (align_corners=False, no antialiasing) chained along each axis.
namespace {

Sparse bilinear(int out_size, int in_size) {
  const double scale = static_cast<double>(in_size) / out_size;
  Sparse m;
  m.rows.resize(out_size);
  for (int i = 0; i < out_size; ++i) {
    const double src = std::max((i + 0.5) * scale - 0.5, 0.0);
    const int i0 = std::min(static_cast<int>(std::floor(src)), in_size - 1);
    const int i1 = std::min(i0 + 1, in_size - 1);
    const double frac = src - i0;
    m.add(i, i0, 1.0 - frac);
    m.add(i, i1, frac);
  }
  return m;
}

}  // namespace

AxisWeights axis_weights(const std::string& mode, int low_res, int padded, int resized, int original) {
  Sparse chain;
  chain.rows.resize(original);
  if (mode == "upscale_crop_resize") {  // low-res -> padded input, keep [:resized], -> original
    const Sparse up = bilinear(padded, low_res);
    const Sparse down = bilinear(original, resized);
    for (int o = 0; o < original; ++o) {
      for (const auto& [r, w] : down.rows[o]) {
        for (const auto& [l, v] : up.rows[r]) chain.add(o, l, w * v);
      }
    }
  } else if (mode == "crop_resize") {  // keep [:resized] of the low-res logits, -> original
    if (low_res != padded) {
      throw std::runtime_error("postprocess 'crop_resize' needs low-res logits at the input size " +
                               std::to_string(padded) + ", got " + std::to_string(low_res));
    }
    chain = bilinear(original, resized);
  } else {  // "resize": low-res -> original
    chain = bilinear(original, low_res);
  }
  AxisWeights a;
  for (int o = 0; o < original; ++o) {
    a.start.push_back(static_cast<int>(a.index.size()));
    for (const auto& [l, w] : chain.rows[o]) {
      const float f = static_cast<float>(w);
      if (f != 0.0f) {
        a.index.push_back(l);
        a.weight.push_back(f);
      }
    }
  }
  a.start.push_back(static_cast<int>(a.index.size()));
  return a;
}

void upscale_logits(const float* low, int lw, const AxisWeights& rows, const AxisWeights& cols,
                    std::vector<float>& tmp, std::vector<float>& out) {
  const int oh = static_cast<int>(rows.start.size()) - 1;
  const int ow = static_cast<int>(cols.start.size()) - 1;
  tmp.assign(static_cast<size_t>(oh) * lw, 0.0f);  // rows @ logits
  for (int i = 0; i < oh; ++i) {
    float* t = tmp.data() + static_cast<size_t>(i) * lw;
    for (int e = rows.start[i]; e < rows.start[i + 1]; ++e) {
      const float w = rows.weight[e];
      const float* src = low + static_cast<size_t>(rows.index[e]) * lw;
      for (int l = 0; l < lw; ++l) t[l] += w * src[l];
    }
  }
  out.resize(static_cast<size_t>(oh) * ow);  // (rows @ logits) @ cols.T
  for (int i = 0; i < oh; ++i) {
    const float* t = tmp.data() + static_cast<size_t>(i) * lw;
    float* o = out.data() + static_cast<size_t>(i) * ow;
    for (int j = 0; j < ow; ++j) {
      float acc = 0.0f;
      for (int e = cols.start[j]; e < cols.start[j + 1]; ++e) acc += t[cols.index[e]] * cols.weight[e];
      o[j] = acc;
    }
  }
}

std::vector<std::uint8_t> mask_image(const float* logits, size_t n, int lh, int lw, const Recipe& r, Size resized,
                                     Size orig) {
  const AxisWeights rows = axis_weights(r.postprocess, lh, r.pad.h, resized.h, orig.h);
  const AxisWeights cols = axis_weights(r.postprocess, lw, r.pad.w, resized.w, orig.w);
  const float threshold = static_cast<float>(r.mask_threshold);
  std::vector<std::uint8_t> out(static_cast<size_t>(orig.h) * orig.w, 0);
  std::vector<float> best(n > 1 ? out.size() : 0, -1.0f);
  std::vector<float> tmp, full;
  for (size_t k = 0; k < n; ++k) {
    upscale_logits(logits + k * static_cast<size_t>(lh) * lw, lw, rows, cols, tmp, full);
    for (size_t i = 0; i < full.size(); ++i) {
      if (!(full[i] > threshold)) continue;
      if (n == 1) {
        out[i] = 255;
        continue;
      }
      const float prob = 1.0f / (1.0f + std::exp(-full[i]));  // sigmoid, float32 as in medsam_rt
      if (prob > best[i]) {
        best[i] = prob;
        out[i] = static_cast<std::uint8_t>(k + 1);
      }
    }
  }
  return out;
}

}  // namespace medsam
