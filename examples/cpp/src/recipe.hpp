// The preprocessing vocabulary of a medsam-rt manifest ("preprocessing"), mirrored from medsam_rt/core/preprocess.py,
// medsam_rt/core/resample.py and medsam_rt/core/postprocess.py. No ONNX Runtime here: plain arithmetic on vectors.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace medsam {

struct Size {
  int h = 0;
  int w = 0;
};

// An (H, W, 3) uint8 image, rows of interleaved R, G, B.
struct RgbImage {
  Size size;
  std::vector<std::uint8_t> rgb;
};

// A manifest's "preprocessing" entry (see docs/onnx-contract.md for each value's formula).
struct Recipe {
  std::string resize;         // longest_side | square
  int size = 0;               // target of the longest side (or of both sides)
  std::string interpolation;  // box | bilinear | hamming | bicubic | lanczos (Pillow) | area (OpenCV INTER_AREA)
  std::string normalize;      // rescale_mean_std | minmax
  Size pad;                   // encoder input (height, width); zero padding bottom-right
  std::string postprocess;    // upscale_crop_resize | crop_resize | resize
  double rescale_factor = 1.0;
  double image_mean[3] = {0.0, 0.0, 0.0};
  double image_std[3] = {1.0, 1.0, 1.0};
  std::string box_scale = "per_axis";  // per_axis | longest_side
  std::string box_round = "none";      // none | floor
  double mask_threshold = 0.0;         // on the logits
};

// Parse and validate; throws std::runtime_error naming the key and the unsupported value.
Recipe parse_recipe(const nlohmann::json& preprocessing);

// (h, w) of the resized image before padding.
Size resized_shape(Size original, const Recipe& recipe);

// Resize an RGB image with a Pillow filter (bit-exact with Image.resize) or OpenCV-style "area".
std::vector<std::uint8_t> resize_rgb(const RgbImage& image, Size out, const std::string& interpolation);

// float32 (3, pad.h, pad.w) encoder input, channels first; `resized` receives the unpadded region's size.
std::vector<float> encoder_input(const RgbImage& image, const Recipe& recipe, Size* resized);

// Check N boxes (x0, y0, x1, y1 in original pixels, flattened) against the image; throws naming the bad box.
void validate_boxes(const std::vector<double>& boxes, Size original);

// Boxes mapped to the encoder-input frame: float32 (N, 4).
std::vector<float> scale_boxes(const std::vector<double>& boxes, Size original, Size resized, const Recipe& recipe);

// One axis of the postprocessing chain: for each of `original` output positions, the non-zero weights over
// the `low_res` logits positions.
struct AxisWeights {
  std::vector<int> start;     // per output position: offset into index/weight
  std::vector<int> index;     // low-res position
  std::vector<float> weight;  // float32, as medsam_rt/core/postprocess.py applies them
};
AxisWeights axis_weights(const std::string& mode, int low_res, int padded, int resized, int original);

// Low-res logits (rows of lw values) -> logits at the original size (H, W), float32: rows @ logits @ cols.T.
void upscale_logits(const float* low_res, int lw, const AxisWeights& rows, const AxisWeights& cols,
                    std::vector<float>& scratch, std::vector<float>& out);

// The output image (H, W) from N boxes' low-res logits (N, 1, lh, lw): one box: 255 where its mask is set; several:
// label k (1-based) where box k's mask is set with the highest probability (the first box on ties), 0 elsewhere.
std::vector<std::uint8_t> mask_image(const float* low_res_logits, size_t n, int lh, int lw, const Recipe& recipe,
                                     Size resized, Size original);

}  // namespace medsam
