// Binary PGM (P5) / PPM (P6) in, PGM (P5) out.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "recipe.hpp"

namespace medsam {

// Read a P5 or P6 file as (H, W, 3) uint8, the way medsam_rt.preprocess.to_rgb_uint8 brings images to 8 bits:
// maxval 255 is used as is; a 16-bit P5 (maxval 256..65535) is min-max scaled to 0..255 and rounded (a constant
// image becomes zeros); gray is repeated to three channels. Other maxvals are refused.
// Throws std::runtime_error naming the file and the problem.
RgbImage read_pnm(const std::string& path);

// Write an (h, w) uint8 image as P5, through a temporary file renamed into place.
void write_pgm(const std::string& path, Size size, const std::vector<std::uint8_t>& pixels);

}  // namespace medsam
