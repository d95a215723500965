#include "image.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <stdexcept>

#define STBI_ONLY_PNG
#define STBI_NO_STDIO
#define STB_IMAGE_IMPLEMENTATION
#include <stb/stb_image.h>
#define STBI_WRITE_NO_STDIO
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>

namespace medsam {
namespace {

constexpr double kMaxPixels = 400e6;  // as medsam_rt.core.images (Pillow's decompression-bomb bound)
constexpr unsigned char kSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error("cannot read image " + path + ": " + what);
}

}  // namespace

RgbImage read_png(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("image file not found or unreadable: " + path);
  const std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (data.size() < sizeof kSignature || std::memcmp(data.data(), kSignature, sizeof kSignature) != 0) {
    fail(path, "not a PNG file; convert it first, e.g. with Pillow or ImageMagick");
  }
  const auto* bytes = reinterpret_cast<const stbi_uc*>(data.data());
  const int len = static_cast<int>(std::min<size_t>(data.size(), 0x7fffffff));
  int w = 0, h = 0, channels = 0;
  if (!stbi_info_from_memory(bytes, len, &w, &h, &channels)) fail(path, stbi_failure_reason());
  if (static_cast<double>(w) * h > kMaxPixels) fail(path, "image is larger than 400 megapixels");
  const bool sixteen = stbi_is_16_bit_from_memory(bytes, len) != 0;
  if (channels == 2 || channels == 4) fail(path, "images with an alpha channel are not supported; flatten it first");
  if (sixteen && channels != 1) fail(path, "16-bit colour PNGs are not supported; 16-bit grayscale or 8-bit are");
  RgbImage img;
  img.size = {h, w};
  const size_t pixels = static_cast<size_t>(w) * h;
  img.rgb.resize(pixels * 3);
  std::vector<std::uint8_t> gray;
  const std::uint8_t* p = nullptr;
  std::unique_ptr<void, void (*)(void*)> decoded(nullptr, stbi_image_free);
  if (sixteen) {  // min-max to 8 bits: rint((v - lo) * 255 / (hi - lo)), as medsam_rt.core.preprocess._minmax_uint8
    decoded.reset(stbi_load_16_from_memory(bytes, len, &w, &h, &channels, 1));
    if (!decoded) fail(path, stbi_failure_reason());
    const auto* v = static_cast<const std::uint16_t*>(decoded.get());
    const auto [lo_it, hi_it] = std::minmax_element(v, v + pixels);
    const double lo = *lo_it, hi = *hi_it;
    gray.assign(pixels, 0);
    if (hi > lo) {
      for (size_t i = 0; i < pixels; ++i) gray[i] = static_cast<std::uint8_t>(std::nearbyint((v[i] - lo) * (255.0 / (hi - lo))));
    }
    p = gray.data();
  } else {
    decoded.reset(stbi_load_from_memory(bytes, len, &w, &h, &channels, channels));
    if (!decoded) fail(path, stbi_failure_reason());
    p = static_cast<const std::uint8_t*>(decoded.get());
  }
  if (channels == 3) {
    std::copy(p, p + pixels * 3, img.rgb.begin());
  } else {
    for (size_t i = 0; i < pixels; ++i) img.rgb[3 * i] = img.rgb[3 * i + 1] = img.rgb[3 * i + 2] = p[i];
  }
  return img;
}

void write_png(const std::string& path, Size size, const std::vector<std::uint8_t>& pixels) {
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  int len = 0;
  std::unique_ptr<unsigned char, void (*)(void*)> png(
      stbi_write_png_to_mem(pixels.data(), size.w, size.w, size.h, 1, &len), [](void* p) { STBIW_FREE(p); });
  if (!png) throw std::runtime_error("cannot encode " + path + " as PNG");
  {
    std::ofstream out(tmp, std::ios::binary);
    out.write(reinterpret_cast<const char*>(png.get()), len);
    out.close();
    if (!out) {
      std::remove(tmp.c_str());
      throw std::runtime_error("cannot write " + path);
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw std::runtime_error("cannot write " + path + " (rename failed)");
  }
}

}  // namespace medsam
