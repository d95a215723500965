// The library's postprocessing in the browser: decoder logits (256x256) -> a mask at the original size, and the
// recipe's box mapping. Mirrors medsam_rt/core/postprocess.py (axis taps of the bilinear chain, composed in float64,
// then the exact chain: width pass, height pass, each sum over the taps in increasing input index) and
// medsam_rt/core/preprocess.py scale_boxes. JavaScript numbers are IEEE float64 and V8 does not fuse multiply-adds,
// so for the same logits the mask is the library's bit for bit (tests/test_serve_web.py checks it under node).

// 1-D bilinear resizing (torch align_corners=False, no antialias) as {base, weights[o] = [w0, w1]}.
export function bilinearWindow(outSize, inSize) {
  const scale = inSize / outSize;
  const base = new Int32Array(outSize);
  const weights = [];
  for (let o = 0; o < outSize; o++) {
    const src = Math.max((o + 0.5) * scale - 0.5, 0.0);
    const i0 = Math.min(Math.floor(src), inSize - 1);
    const i1 = Math.min(i0 + 1, inSize - 1);
    const frac = src - i0;
    const w0 = 1.0 - frac;
    const w1 = frac;
    base[o] = i0;
    weights.push(i0 === i1 ? [w0 + w1, 0.0] : [w0, w1]);
  }
  return { base, weights };
}

// Taps of `inner` then `outer` (outer's inputs are inner's outputs), as postprocess._compose computes them.
export function compose(outer, inner) {
  const n = outer.base.length;
  const nInner = inner.base.length;
  const kOuter = outer.weights[0].length;
  const kInner = inner.weights[0].length;
  const base = new Int32Array(n);
  let width = 0;
  for (let o = 0; o < n; o++) {
    base[o] = inner.base[outer.base[o]];
    const last = inner.base[Math.min(outer.base[o] + kOuter - 1, nInner - 1)];
    width = Math.max(width, last - base[o]);
  }
  width += kInner;
  const weights = [];
  for (let o = 0; o < n; o++) {
    const win = new Float64Array(width);
    for (let t = 0; t < kOuter; t++) {
      const m = Math.min(outer.base[o] + t, nInner - 1);
      const innerRow = new Float64Array(width);
      for (let u = 0; u < kInner; u++) innerRow[inner.base[m] - base[o] + u] += inner.weights[m][u];
      const w = outer.weights[o][t];
      for (let c = 0; c < width; c++) win[c] = win[c] + w * innerRow[c];
    }
    weights.push(Array.from(win));
  }
  return { base, weights };
}

// The whole chain of recipe `mode` along one axis (postprocess.axis_taps).
export function axisTaps(mode, lowRes, padded, resized, original) {
  if (mode === "upscale_crop_resize") return compose(bilinearWindow(original, resized), bilinearWindow(padded, lowRes));
  if (mode === "crop_resize") {
    if (lowRes !== padded) throw new Error(`crop_resize needs low-res logits at the input size ${padded}`);
    return bilinearWindow(original, resized);
  }
  if (mode === "resize") return bilinearWindow(original, lowRes);
  throw new Error(`unknown postprocess mode ${mode}`);
}

// Taps as flat arrays without zero weights: for output o, taps start[o]..start[o+1] of (index, weight).
function flatten(taps) {
  const n = taps.base.length;
  const start = new Int32Array(n + 1);
  const index = [];
  const weight = [];
  for (let o = 0; o < n; o++) {
    const w = taps.weights[o];
    for (let k = 0; k < w.length; k++) {
      if (w[k] !== 0) {
        index.push(taps.base[o] + k);
        weight.push(w[k]);
      }
    }
    start[o + 1] = index.length;
  }
  return { n, start, index: Int32Array.from(index), weight: Float64Array.from(weight) };
}

// The chain for one image: meta = {postprocess, pad_size, resized_size, original_size, low_res_size, mask_threshold}.
export function makeChain(meta) {
  const [lh, lw] = meta.low_res_size;
  const [ph, pw] = meta.pad_size;
  const [rh, rw] = meta.resized_size;
  const [oh, ow] = meta.original_size;
  return {
    rows: flatten(axisTaps(meta.postprocess, lh, ph, rh, oh)),
    cols: flatten(axisTaps(meta.postprocess, lw, pw, rw, ow)),
    lowW: lw,
    threshold: Number(meta.mask_threshold || 0),
    height: oh,
    width: ow,
  };
}

// Uint8Array (H*W, row-major) of 0/1: the exact chain's `logits > threshold` for Float32Array logits (lh*lw).
// Pass 1 (width) for every low-res row the rows' taps reach; pass 2 (height). O(H*W*taps).
export function upscaleMask(chain, logits) {
  const { rows, cols, lowW, threshold, height, width } = chain;
  const lowH = logits.length / lowW;
  const usedRows = new Uint8Array(lowH);
  for (let k = 0; k < rows.index.length; k++) usedRows[rows.index[k]] = 1;
  const u = new Float64Array(lowH * width);
  for (let r = 0; r < lowH; r++) {
    if (!usedRows[r]) continue;
    const off = r * lowW;
    for (let j = 0; j < width; j++) {
      let acc = 0;
      for (let k = cols.start[j]; k < cols.start[j + 1]; k++) acc += cols.weight[k] * (logits[off + cols.index[k]] - threshold);
      u[r * width + j] = acc;
    }
  }
  const mask = new Uint8Array(height * width);
  for (let i = 0; i < height; i++) {
    const a = rows.start[i];
    const b = rows.start[i + 1];
    for (let j = 0; j < width; j++) {
      let acc = 0;
      for (let k = a; k < b; k++) acc += rows.weight[k] * u[rows.index[k] * width + j];
      mask[i * width + j] = acc > 0 ? 1 : 0;
    }
  }
  return mask;
}

// Boxes (array of [x0, y0, x1, y1], original pixels) -> Float32Array (N*4) in the encoder frame
// (preprocess.scale_boxes: float64 products, floor when box_round is "floor", then float32).
export function scaleBoxes(boxes, meta) {
  const [h, w] = meta.original_size;
  const [rh, rw] = meta.resized_size;
  const f = meta.box_scale === "longest_side" ? [1, 1, 1, 1].map(() => meta.size / Math.max(h, w)) : [rw / w, rh / h, rw / w, rh / h];
  const out = new Float32Array(boxes.length * 4);
  boxes.forEach((box, n) => {
    for (let c = 0; c < 4; c++) {
      let v = box[c] * f[c];
      if (meta.box_round === "floor") v = Math.floor(v);
      out[n * 4 + c] = v;
    }
  });
  return out;
}
