// PNG in and out, via stb_image / stb_image_write (Debian's libstb-dev): the files the Python CLI reads and writes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "recipe.hpp"

namespace medsam {

// Read a PNG as (H, W, 3) uint8, the way medsam_rt.core.images.read_image + medsam_rt.core.preprocess.to_rgb_uint8 bring images
// to 8 bits: 8-bit gray or RGB as is; 16-bit gray min-max scaled to 0..255 and rounded (a constant image becomes
// zeros); gray repeated to three channels. Alpha channels and 16-bit colour are refused (flatten them first).
// Throws std::runtime_error naming the file and the problem.
RgbImage read_png(const std::string& path);

// Write an (h, w) uint8 image as an 8-bit grayscale PNG, through a temporary file renamed into place.
void write_png(const std::string& path, Size size, const std::vector<std::uint8_t>& pixels);

}  // namespace medsam
