#include "pnm.hpp"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>

namespace medsam {
namespace {

constexpr double kMaxPixels = 400e6;  // as medsam_rt.io (Pillow's decompression-bomb bound)

class Header {
 public:
  Header(const std::string& path, const std::string& data) : path_(path), d_(data) {}

  long next_int(const char* what) {
    skip();
    if (pos_ >= d_.size() || d_[pos_] < '0' || d_[pos_] > '9') fail(std::string("expected ") + what);
    long v = 0;
    while (pos_ < d_.size() && d_[pos_] >= '0' && d_[pos_] <= '9') {
      v = v * 10 + (d_[pos_++] - '0');
      if (v > 1000000000L) fail(std::string(what) + " is too large");
    }
    return v;
  }
  size_t end_of_header() {  // exactly one whitespace character separates maxval from the pixels
    if (pos_ >= d_.size() || !std::isspace(static_cast<unsigned char>(d_[pos_]))) fail("expected whitespace after maxval");
    return pos_ + 1;
  }
  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("cannot read image " + path_ + ": bad PGM/PPM header: " + what);
  }

 private:
  void skip() {
    while (pos_ < d_.size()) {
      if (d_[pos_] == '#') {
        while (pos_ < d_.size() && d_[pos_] != '\n' && d_[pos_] != '\r') ++pos_;
      } else if (std::isspace(static_cast<unsigned char>(d_[pos_]))) {
        ++pos_;
      } else {
        return;
      }
    }
  }
  const std::string& path_;
  const std::string& d_;
  size_t pos_ = 2;
};

}  // namespace

RgbImage read_pnm(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("image file not found or unreadable: " + path);
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (data.size() < 2 || data[0] != 'P' || (data[1] != '5' && data[1] != '6')) {
    throw std::runtime_error("cannot read image " + path +
                             ": not a binary PGM (P5) or PPM (P6) file; convert it first, e.g. with Pillow or "
                             "ImageMagick");
  }
  const int channels = data[1] == '5' ? 1 : 3;
  Header h(path, data);
  const long width = h.next_int("width");
  const long height = h.next_int("height");
  const long maxval = h.next_int("maxval");
  const size_t offset = h.end_of_header();
  if (width <= 0 || height <= 0) h.fail("width and height must be positive");
  if (static_cast<double>(width) * height > kMaxPixels) h.fail("image is larger than 400 megapixels");
  if (maxval != 255 && !(channels == 1 && maxval > 255 && maxval <= 65535)) {
    throw std::runtime_error("cannot read image " + path + ": maxval " + std::to_string(maxval) +
                             " is not supported; expected 255 (8-bit P5/P6) or 256..65535 (16-bit P5)");
  }
  const int bytes = maxval > 255 ? 2 : 1;
  const size_t samples = static_cast<size_t>(width) * height * channels;
  if (data.size() - offset < samples * bytes) {
    throw std::runtime_error("cannot read image " + path + ": truncated: " + std::to_string(data.size() - offset) +
                             " bytes of pixel data, expected " + std::to_string(samples * bytes));
  }
  RgbImage img;
  img.size = {static_cast<int>(height), static_cast<int>(width)};
  img.rgb.resize(static_cast<size_t>(width) * height * 3);
  const auto* p = reinterpret_cast<const unsigned char*>(data.data() + offset);
  std::vector<std::uint8_t> gray;
  if (bytes == 2) {  // 16-bit: min-max to 8 bits, rint((v - lo) * 255 / (hi - lo))
    std::vector<unsigned> v(samples);
    for (size_t i = 0; i < samples; ++i) v[i] = (static_cast<unsigned>(p[2 * i]) << 8) | p[2 * i + 1];
    const auto [lo_it, hi_it] = std::minmax_element(v.begin(), v.end());
    const double lo = *lo_it, hi = *hi_it;
    gray.assign(samples, 0);
    if (hi > lo) {
      for (size_t i = 0; i < samples; ++i) gray[i] = static_cast<std::uint8_t>(std::nearbyint((v[i] - lo) * (255.0 / (hi - lo))));
    }
    p = gray.data();
  }
  if (channels == 3) {
    std::copy(p, p + samples, img.rgb.begin());
  } else {
    for (size_t i = 0; i < samples; ++i) img.rgb[3 * i] = img.rgb[3 * i + 1] = img.rgb[3 * i + 2] = p[i];
  }
  return img;
}

void write_pgm(const std::string& path, Size size, const std::vector<std::uint8_t>& pixels) {
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary);
    out << "P5\n" << size.w << ' ' << size.h << "\n255\n";
    out.write(reinterpret_cast<const char*>(pixels.data()), static_cast<std::streamsize>(pixels.size()));
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
