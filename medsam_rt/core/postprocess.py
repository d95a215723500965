"""Low-resolution logits -> logits and masks at the original resolution, in numpy.

Every postprocessing recipe is a chain of bilinear resizes (``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)``, no antialiasing) and crops. Bilinear resizing is linear and separable, so a whole chain
collapses into one ``(original, low_res)`` matrix per axis, whose rows are non-negative, sum to 1 (also when
downscaling and at clamped edges) and have at most 2 (``crop_resize``, ``resize``) or 3
(``upscale_crop_resize``) non-zero taps. :class:`AxisTaps` holds those taps; :func:`chain` the pair for an image.

**The exact chain** (what every mask and logit here is defined by). For low-res values ``V`` in float64:

    U[r, j] = sum_t cols.weight[j, t] * V[r, cols.index[j, t]]     (along the width first)
    X[i, j] = sum_t rows.weight[i, t] * U[rows.index[i, t], j]     (then along the height)

each sum over the taps in increasing input index, with numpy's elementwise float64 operations (IEEE rounding, no
fused multiply-add, no BLAS), so every CPU gives the same bits. The composed tap weights are float64 too (each a
sum over the intermediate pixels in increasing order). A mask is ``X > 0`` for ``V = logits - threshold``;
:attr:`Segmentation.probs <medsam_rt.core.model.Segmentation.probs>` is the float32 sigmoid of ``X`` for
``V = logits``, rounded to float32.

**Masks in O(boundary)** (:meth:`UpscaleChain.mask_crop`): a sum of non-negative weights times values that are
all > 0 is > 0, and of values all <= 0 is <= 0. So a pixel whose low-res neighbourhood agrees is decided without
arithmetic; only the band near the boundary is interpolated, and only along the axis where the neighbourhood
disagrees (the width pass resolves a low-res row's sign changes, the height pass only the pixels whose rows still
disagree). The float work is O(band); writing a mask is O(its crop's area). The result equals the exact chain bit
for bit (:meth:`UpscaleChain.reference_mask`, tested).

``rows @ logits @ cols.T`` in float32 (:func:`axis_matrix`, BLAS; what the postprocessing graph computes on a
device) gives the same masks except at pixels whose logit is within float32 rounding of the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from medsam_rt.core.masks import MaskCrop
from medsam_rt.core.preprocess import Preprocessing
from medsam_rt.core.resample import bilinear_matrix
from medsam_rt.errors import ModelDirError

#: Low-res values in ``(TINY, inf)`` count as "above": every positive combination of them stays a normal positive
#: float64 (tap weights are far above 1e-100), so no product underflows to zero.
_TINY = 1e-200
#: Band pixels are evaluated at most this many at a time (bounded temporaries for huge images).
_POINTS_CHUNK = 1 << 20
#: The dense chain is evaluated at most this many float64 output values at a time.
_DENSE_CHUNK = 1 << 18
#: A mask whose band covers more than this fraction of its support is evaluated densely there (same bits;
#: measured crossover 0.1-0.2: a band pixel costs ~6x a dense one). Noisy masks (random weights) are all boundary.
_DENSE_BAND = 0.15


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class AxisTaps:
    """One axis of a resize chain: ``out[o] = sum_t weight[o, t] * in[index[o, t]]``.

    Attributes:
        index: int64 ``(n, K)``: input indices, increasing; taps past a row's last non-zero weight repeat that
            last index with weight 0 (so a row's index set is its support).
        weight: float64 ``(n, K)``: non-negative, each row sums to 1 (to rounding).
        first, last: int64 ``(n,)``: smallest and largest input index with a non-zero weight (non-decreasing).
        starts: int64 ``(S + 1,)``: segments of outputs with the same index row: ``starts[s] : starts[s + 1]``.
    """

    index: np.ndarray
    weight: np.ndarray
    first: np.ndarray
    last: np.ndarray
    starts: np.ndarray

    @property
    def size(self) -> int:
        return len(self.index)

    @classmethod
    def from_window(cls, base: np.ndarray, window: np.ndarray) -> AxisTaps:
        """Taps from dense weights ``window[o, k]`` of input index ``base[o] + k``."""
        nonzero = window != 0
        k = max(1, int(nonzero.sum(axis=1).max()))
        order = np.argsort(~nonzero, axis=1, kind="stable")[:, :k]  # non-zero positions first, increasing
        weight = np.take_along_axis(window, order, axis=1)
        count = nonzero.sum(axis=1)
        real = np.arange(k)[None, :] < count[:, None]
        last_pos = np.take_along_axis(order, (count - 1)[:, None], axis=1)
        order = np.where(real, order, last_pos)
        index = base[:, None] + order
        weight = np.where(real, weight, 0.0)
        change = np.flatnonzero((index[1:] != index[:-1]).any(axis=1)) + 1
        starts = np.concatenate([[0], change, [len(index)]]).astype(np.int64)
        return cls(
            _frozen(np.ascontiguousarray(index, np.int64)),
            _frozen(np.ascontiguousarray(weight, np.float64)),
            _frozen(index[:, 0].copy()),
            _frozen(index[:, -1].copy()),
            _frozen(starts),
        )

    def dense(self, in_size: int) -> np.ndarray:
        """float64 ``(n, in_size)``: the axis as a matrix."""
        m = np.zeros((self.size, in_size))
        np.add.at(m, (np.arange(self.size)[:, None], self.index), self.weight)
        return m


def _bilinear_window(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(base, window)`` of 1-D bilinear resizing, half-pixel centres: the same float64 numbers as
    :func:`medsam_rt.core.resample.bilinear_matrix` (tested), as two taps at ``base`` and ``base + 1``."""
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = src - i0
    w0, w1 = 1.0 - frac, frac
    same = i0 == i1  # clamped at the last pixel: one tap holding both weights, as np.add.at sums them
    window = np.stack([np.where(same, w0 + w1, w0), np.where(same, 0.0, w1)], axis=1)
    return i0, window


def _compose(outer: tuple[np.ndarray, np.ndarray], inner: tuple[np.ndarray, np.ndarray]) -> AxisTaps:
    """The taps of ``inner`` then ``outer`` (``outer``'s inputs are ``inner``'s outputs): each composed weight is
    ``sum_m outer[o, m] * inner[m, l]`` over ``outer``'s taps ``m`` in increasing order."""
    ob, ow = outer
    ib, iw = inner
    base = ib[ob]  # the first tap of the first intermediate pixel: the smallest input index
    width = int((ib[np.minimum(ob + ow.shape[1] - 1, len(ib) - 1)] - base).max()) + iw.shape[1]
    window = np.zeros((len(ob), width))
    rows = np.arange(len(ob))
    for t in range(ow.shape[1]):
        m = np.minimum(ob + t, len(ib) - 1)
        inner_row = np.zeros((len(ob), width))
        for u in range(iw.shape[1]):
            np.add.at(inner_row, (rows, ib[m] - base + u), iw[m, u])
        window += ow[:, t, None] * inner_row
    return AxisTaps.from_window(base, window)


@lru_cache(maxsize=64)
def axis_taps(mode: str, low_res: int, padded: int, resized: int, original: int) -> AxisTaps:
    """The whole postprocessing chain of recipe ``mode`` along one axis, as taps into the low-res logits.

    Raises:
        ModelDirError: ``crop_resize`` with low-res logits not at the input size.
    """
    if mode == "upscale_crop_resize":  # low-res -> padded input, keep [:resized], -> original
        return _compose(_bilinear_window(original, resized), _bilinear_window(padded, low_res))
    if mode == "crop_resize":  # keep [:resized] of the low-res logits (low_res == padded), -> original
        if low_res != padded:
            raise ModelDirError(f"postprocess 'crop_resize' needs low-res logits at the input size {padded}")
        return AxisTaps.from_window(*_bilinear_window(original, resized))
    return AxisTaps.from_window(*_bilinear_window(original, low_res))  # "resize": square, no padding


@lru_cache(maxsize=64)
def axis_matrix(mode: str, low_res: int, padded: int, resized: int, original: int) -> np.ndarray:
    """float32 ``(original, low_res)``: the chain along one axis as a matrix, for ``rows @ logits @ cols.T`` in
    float32 (the postprocessing graph's inputs, and today's dense path to compare with). Its entries are the
    BLAS product of the float64 resize matrices, rounded to float32."""
    if mode == "upscale_crop_resize":
        chain_m = bilinear_matrix(original, resized) @ bilinear_matrix(padded, low_res)[:resized]
    elif mode == "crop_resize":
        if low_res != padded:
            raise ModelDirError(f"postprocess 'crop_resize' needs low-res logits at the input size {padded}")
        chain_m = np.zeros((original, low_res))
        chain_m[:, :resized] = bilinear_matrix(original, resized)
    else:
        chain_m = bilinear_matrix(original, low_res)
    return _frozen(chain_m.astype(np.float32))


def _classes(v: np.ndarray) -> np.ndarray:
    """int8 per value: 1 above (``TINY < v < inf``), -1 at or below zero, 0 undecided (tiny, +inf or NaN)."""
    c = np.zeros(v.shape, np.int8)
    c[(v > _TINY) & (v < np.inf)] = 1
    c[v <= 0] = -1
    return c


def _agree(cls: np.ndarray, index: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The smallest and largest of ``cls`` along ``axis`` over the taps ``index`` (``(S, K)``): int8 arrays of
    ``cls``'s shape with ``axis`` replaced by ``S``. All taps above: ``lo == 1``; all at or below: ``hi == -1``."""
    lo = np.take(cls, index[:, 0], axis=axis)
    hi = lo.copy()
    for t in range(1, index.shape[1]):
        g = np.take(cls, index[:, t], axis=axis)
        np.minimum(lo, g, out=lo)
        np.maximum(hi, g, out=hi)
    return lo, hi


def _unsure(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` of the entries of 2-D ``lo``/``hi`` (from :func:`_agree`) that are neither all above nor
    all at or below."""
    flat = np.flatnonzero((lo < 1) & (hi > -1))
    return np.divmod(flat, lo.shape[1])


def _segments(taps: AxisTaps, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """The segments of ``taps`` meeting outputs ``[a, b)``, clipped to it: their starts ``(S,)`` and lengths."""
    s0 = int(np.searchsorted(taps.starts, a, side="right")) - 1
    s1 = int(np.searchsorted(taps.starts, b - 1, side="right"))
    edges = np.clip(taps.starts[s0 : s1 + 1], a, b)
    return edges[:-1], np.diff(edges)


def _expand(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """int64: ``starts[s] + 0 .. lengths[s] - 1`` for every ``s``, concatenated."""
    total = int(lengths.sum())
    first = np.cumsum(lengths) - lengths
    return np.repeat(starts - first, lengths) + np.arange(total)


@dataclass(frozen=True, eq=False)
class UpscaleChain:
    """A recipe's postprocessing for one image size: low-res logits ``(lh, lw)`` -> the original ``(H, W)``.

    Calling it maps float ``(n, lh, lw)`` logits to float32 ``(n, H, W)`` logits (the exact chain, rounded).

    Attributes:
        rows: taps along the height (``H`` outputs into ``lh`` low-res rows).
        cols: taps along the width (``W`` outputs into ``lw`` low-res columns).
        threshold: the recipe's mask threshold on the logits (masks are ``logits > threshold``).
    """

    rows: AxisTaps
    cols: AxisTaps
    threshold: float = 0.0

    @property
    def original_size(self) -> tuple[int, int]:
        return self.rows.size, self.cols.size

    # -- the exact chain ------------------------------------------------------------------------------------------

    def _width_pass(self, v: np.ndarray, r: np.ndarray, j: np.ndarray) -> np.ndarray:
        """``U[r, j]`` (see the module docstring) at low-res rows ``r`` and output columns ``j`` (broadcast)."""
        idx, w = self.cols.index, self.cols.weight
        acc = w[j, 0] * v[r, idx[j, 0]]
        for t in range(1, idx.shape[1]):
            acc += w[j, t] * v[r, idx[j, t]]
        return acc

    def _block(self, v: np.ndarray, a: int, b: int, c: int, d: int) -> np.ndarray:
        """float64 ``X[a:b, c:d]`` of float64 low-res values ``v``."""
        ri, rw = self.rows.index[a:b], self.rows.weight[a:b]
        r0, r1 = int(self.rows.first[a]), int(self.rows.last[b - 1]) + 1
        ci, cw = self.cols.index[c:d], self.cols.weight[c:d]
        sub = v[r0:r1]
        u = cw[:, 0] * np.take(sub, ci[:, 0], axis=1)  # U[r0:r1, c:d], as _width_pass computes it
        for t in range(1, ci.shape[1]):
            u += cw[:, t] * np.take(sub, ci[:, t], axis=1)
        acc = rw[:, 0, None] * u[ri[:, 0] - r0]
        for t in range(1, ri.shape[1]):
            acc += rw[:, t, None] * u[ri[:, t] - r0]
        return acc

    def _blocks(self, v: np.ndarray, a: int, b: int, c: int, d: int):
        """``(row, X block)`` for row blocks of ``X[a:b, c:d]`` of bounded size."""
        step = max(1, _DENSE_CHUNK // max(1, d - c))
        for y in range(a, b, step):
            yield y, self._block(v, y, min(b, y + step), c, d)

    def window(self, values: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        """float64 ``(b - a, d - c)``: the exact chain of low-res ``values`` ``(lh, lw)`` on output rows
        ``rows = (a, b)`` and columns ``cols = (c, d)`` (the same bits as on the whole image)."""
        (a, b), (c, d) = rows, cols
        out = np.empty((max(0, b - a), max(0, d - c)))
        if out.size:
            for y, block in self._blocks(np.asarray(values, np.float64), a, b, c, d):
                out[y - a : y - a + len(block)] = block
        return out

    def dense(self, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The exact chain of low-res ``values`` ``(lh, lw)`` on every pixel: float64 ``(H, W)``, or written into
        ``out`` (any float dtype, rounded once), in row blocks of bounded size."""
        h, w = self.original_size
        out = np.empty((h, w)) if out is None else out
        for y, block in self._blocks(np.asarray(values, np.float64), 0, h, 0, w):
            out[y : y + len(block)] = block
        return out

    def __call__(self, low_res_logits: np.ndarray) -> np.ndarray:
        """float32 ``(n, H, W)`` logits at the original resolution of float ``(n, lh, lw)`` low-res logits."""
        low = np.asarray(low_res_logits)
        out = np.empty((len(low), *self.original_size), np.float32)
        for k in range(len(low)):
            self.dense(low[k], out=out[k])
        return out

    def _dense_mask(self, v: np.ndarray, a: int, b: int, c: int, d: int) -> np.ndarray:
        out = np.empty((b - a, d - c), bool)
        for y, block in self._blocks(v, a, b, c, d):
            np.greater(block, 0, out=out[y - a : y - a + len(block)])
        return out

    def reference_mask(self, logits: np.ndarray) -> np.ndarray:
        """bool ``(H, W)``: the exact chain's mask of one box's low-res ``logits`` ``(lh, lw)`` on every pixel
        (``X > 0`` of ``logits - threshold``): what :meth:`mask_crop` equals, at dense cost."""
        h, w = self.original_size
        return self._dense_mask(np.asarray(logits, np.float64) - self.threshold, 0, h, 0, w)

    # -- masks in O(boundary) -------------------------------------------------------------------------------------

    def _band(
        self, v: np.ndarray, starts: np.ndarray, lengths: np.ndarray, j: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The inside pixels ``(rows, cols)`` of band segments: output rows ``starts[p] : starts[p] + lengths[p]``
        of column ``j[p]``. The rows of a segment share their low-res rows, so ``U`` is computed once per
        segment and tap (the same bits as the dense chain's), then combined per pixel."""
        rows_out, cols_out = [], []
        idx, w = self.rows.index, self.rows.weight
        step = max(1, _POINTS_CHUNK // max(1, int(lengths.max(initial=1))))
        for a in range(0, len(starts), step):
            s, n, jj = starts[a : a + step], lengths[a : a + step], j[a : a + step]
            u = [self._width_pass(v, idx[s, t], jj) for t in range(idx.shape[1])]  # per segment, per tap
            seg = np.repeat(np.arange(len(s)), n)
            i = _expand(s, n)
            acc = w[i, 0] * u[0][seg]
            for t in range(1, idx.shape[1]):
                acc += w[i, t] * u[t][seg]
            hit = acc > 0
            rows_out.append(i[hit])
            cols_out.append(jj[seg[hit]])
        if not rows_out:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(rows_out), np.concatenate(cols_out)

    def mask_crop(self, logits: np.ndarray) -> MaskCrop:
        """One box's mask (``logits > threshold`` upscaled) as its tight crop, equal bit for bit to
        :meth:`reference_mask`. Low-res ``logits``: float ``(lh, lw)``.

        Cost: O(lh * lw) to classify the low-res logits, O(support width * lh) for the width pass's signs, the
        exact chain only on the band where the neighbourhood disagrees, and O(crop area) to write the crop.
        """
        v = np.asarray(logits, np.float64) - self.threshold
        cls = _classes(v)
        live = cls != -1  # low-res cells that may make a pixel inside
        live_rows = np.flatnonzero(live.any(axis=1))
        if live_rows.size == 0:
            return MaskCrop.empty()
        live_cols = np.flatnonzero(live.any(axis=0))
        rt, ct = self.rows, self.cols
        # outputs whose taps meet the live cells' bounding box; every other pixel is outside
        ia = int(np.searchsorted(rt.last, live_rows[0], side="left"))
        ib = int(np.searchsorted(rt.first, live_rows[-1], side="right"))
        ja = int(np.searchsorted(ct.last, live_cols[0], side="left"))
        jb = int(np.searchsorted(ct.first, live_cols[-1], side="right"))
        if ia >= ib or ja >= jb:
            return MaskCrop.empty()
        r0, r1 = int(rt.first[ia]), int(rt.last[ib - 1]) + 1

        # width pass: the sign of U[r, j] for the low-res rows r0:r1 and the columns ja:jb, exact where unsure
        cstarts, clens = _segments(ct, ja, jb)
        lo, hi = _agree(cls[r0:r1], ct.index[cstarts], axis=1)  # per low-res row and column segment
        ur, us = _unsure(lo, hi)
        lo[hi == -1] = -1  # lo is now the class: 1 above, -1 at or below, 0 unsure
        col_cls = np.repeat(lo, clens, axis=1)  # (r1 - r0, jb - ja)
        if ur.size:
            uj = _expand(cstarts[us], clens[us])
            ur = np.repeat(ur, clens[us])
            col_cls[ur, uj - ja] = _classes(self._width_pass(v, ur + r0, uj))

        # height pass: segments of output rows whose low-res rows all agree are decided; the rest is the band
        rstarts, rlens = _segments(rt, ia, ib)
        lo, hi = _agree(col_cls, rt.index[rstarts] - r0, axis=0)  # (segments, jb - ja)
        inside = lo == 1
        bs, bj = _unsure(lo, hi)
        if int(rlens[bs].sum()) > _DENSE_BAND * (ib - ia) * (jb - ja):  # a ragged mask, all boundary: densely
            return MaskCrop.from_dense(self._dense_mask(v, ia, ib, ja, jb), ia, ja)
        bi, bj = self._band(v, rstarts[bs], rlens[bs], bj + ja)

        # the tight crop: rows and columns holding a decided-inside pixel or a band pixel that is inside
        seg_any, col_any = inside.any(axis=1), np.flatnonzero(inside.any(axis=0))
        ys = [rstarts[seg_any][[0, -1]] + [0, rlens[seg_any][-1]]] if seg_any.any() else []
        xs = [col_any[[0, -1]] + [ja, ja + 1]] if col_any.size else []
        if bi.size:
            ys.append(np.array([bi.min(), bi.max() + 1]))
            xs.append(np.array([bj.min(), bj.max() + 1]))
        if not ys:
            return MaskCrop.empty()
        y0, y1 = min(int(y[0]) for y in ys), max(int(y[1]) for y in ys)
        x0, x1 = min(int(x[0]) for x in xs), max(int(x[1]) for x in xs)
        s0 = int(np.searchsorted(rstarts, y0, side="right")) - 1
        s1 = int(np.searchsorted(rstarts, y1 - 1, side="right"))
        lens = np.minimum(rstarts[s0:s1] + rlens[s0:s1], y1) - np.maximum(rstarts[s0:s1], y0)
        mask = np.repeat(inside[s0:s1, x0 - ja : x1 - ja], lens, axis=0)
        mask[bi - y0, bj - x0] = True
        return MaskCrop(y0, x0, mask)


def chain(
    p: Preprocessing,
    resized_size: tuple[int, int],
    original_size: tuple[int, int],
    low_res: tuple[int, int] = (256, 256),
) -> UpscaleChain:
    """The :class:`UpscaleChain` of recipe ``p`` for an image of ``original_size`` resized to ``resized_size``
    inside the encoder's padded input, with ``low_res`` ``(lh, lw)`` decoder logits."""
    return UpscaleChain(
        axis_taps(p.postprocess, int(low_res[0]), p.pad_size[0], int(resized_size[0]), int(original_size[0])),
        axis_taps(p.postprocess, int(low_res[1]), p.pad_size[1], int(resized_size[1]), int(original_size[1])),
        float(p.mask_threshold),
    )


def upscale_logits(
    low_res_logits: np.ndarray,
    p: Preprocessing,
    resized_size: tuple[int, int],
    original_size: tuple[int, int],
) -> np.ndarray:
    """Map decoder logits to the original image (the exact chain, rounded to float32).

    Args:
        low_res_logits: float32 ``(N, h_lr, w_lr)`` (256x256 for SAM decoders).
        p: the model's preprocessing recipe (its ``pad_size`` is the encoder frame).
        resized_size: ``(h, w)`` of the resized image inside the padded input.
        original_size: ``(H, W)`` of the original image.

    Returns:
        float32 ``(N, H, W)`` logits in original pixel coordinates.
    """
    return chain(p, resized_size, original_size, low_res_logits.shape[-2:])(low_res_logits)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable float32 logistic function."""
    out = np.empty_like(x, dtype=np.float32)
    np.negative(x, out=out)
    with np.errstate(over="ignore"):  # exp(-x) -> inf for x << 0 gives exactly 0
        np.exp(out, out=out)
    out += 1.0
    np.reciprocal(out, out=out)
    return out
