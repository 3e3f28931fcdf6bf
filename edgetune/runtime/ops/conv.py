"""ONNX `Conv` in numpy: pointwise 1x1 as one matrix product, kxk (depthwise, grouped, dense) tap by tap.

Semantics are ONNX's (NCHW shapes; the dtype follows the input, float32 in the engine, float64 in
the gradient tests). Memory is channels-last: the op computes on the NHWC view of its input and
returns the NHWC result viewed as NCHW (`y.transpose(0, 3, 1, 2)`: the shape ONNX expects, the
strides of an NHWC array), as PyTorch's `channels_last` does. numpy's element-wise ops keep that
layout, so in a Conv -> BatchNormalization -> Clip -> Conv chain only the cut tensor and the
gradient coming back from the pooling are ever transposed. Why, measured at EfficientNet-Lite0's
last-block shapes at batch 32 (`bench/ops_speed.py` prints the current numbers):

- A pointwise conv (1x1, stride 1, no pads, one group) is one matrix product
  `X (N*H*W, C) @ W^T (C, M)`; backward two more (dW = G^T X, dX = G W). numpy's batched `matmul`
  over the N images (49 columns each) was 5-10x slower.
- Every other conv loops over the kh*kw taps of its kernel, with images, positions and channels
  vectorised per tap: `Y[rows] += X[rows * s + i - top] * W[:, i, j]`; backward walks the same
  taps. A tap reads only the positions its output rows and columns find inside the input, so
  padding is never built (no padded copy of X kept for the backward; edge taps do less work).
  For a depthwise kernel a tap is a broadcast multiply-add over a contiguous channel axis (2x
  faster than the same loop on NCHW, whose innermost axis is only 7 wide, and faster than an
  einsum over `sliding_window_view`); for other groupings it is a matrix product per tap. The
  loop runs over a few images at a time (`CHUNK_BYTES` of output), so that the kh*kw passes
  re-read memory still in cache: 2x faster again than whole-batch passes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from edgetune.runtime.ops.base import Op, UnknownOp, register_op


CHUNK_BYTES = 512 * 1024  # the tap loop's working set per chunk of images: about an L2 cache


def _pair(values: Sequence[int] | None, default: int) -> tuple[int, int]:
    if not values:
        return default, default
    if len(values) != 2:
        raise UnknownOp(f"Conv: only 2-D convolutions are supported, got {list(values)}")
    return int(values[0]), int(values[1])


def _span(offset: int, stride: int, out: int, size: int) -> tuple[slice, slice] | None:
    """Outputs o in [0, out) whose input o * stride + offset lies in [0, size): (output slice, input slice)."""
    first = max(0, -(offset // stride) if offset < 0 else 0)  # ceil(-offset / stride) for offset < 0
    last = min(out, (size - 1 - offset) // stride + 1)  # one past the last
    if last <= first:
        return None
    start = first * stride + offset
    return slice(first, last), slice(start, start + (last - first - 1) * stride + 1, stride)


def _per_tap(w: np.ndarray) -> np.ndarray:
    """W (M, C/group, kh, kw) as (kh, kw, M, C/group) contiguous: each tap's weights in one run of memory.

    A depthwise tap multiplies every position by `W[:, 0, i, j]`; read from W itself that vector
    has a stride of kh*kw elements, and numpy's broadcast multiply falls back from its SIMD loop
    (2-3x slower per tap at Lite0's 1152 channels). The copy is a few kilobytes per call.
    """
    return np.ascontiguousarray(w.transpose(2, 3, 0, 1))


def _nchw(y: np.ndarray) -> np.ndarray:
    """An NHWC array seen as NCHW (a view: channels-last memory)."""
    return y.transpose(0, 3, 1, 2)


def _nhwc(x: np.ndarray) -> np.ndarray:
    """An NCHW array seen as NHWC (a view; contiguous when `x` is channels-last memory)."""
    return x.transpose(0, 2, 3, 1)


@register_op("Conv")
class Conv(Op):
    """`Y = conv(X, W) + B` for X (N, C, H, W), W (M, C/group, kh, kw), B (M,) optional.

    Pads are ONNX's explicit `[top, left, bottom, right]` (asymmetric allowed: TF-"same" padding
    of a stride-2 kernel pads more at the end) or `auto_pad` SAME_UPPER / SAME_LOWER / VALID.
    Dilations other than 1 are refused when the node is built.
    """

    attributes = {"auto_pad": "NOTSET", "dilations": None, "group": 1, "kernel_shape": None, "pads": None,
                  "strides": None}

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        if _pair(self.attrs["dilations"], 1) != (1, 1):
            raise UnknownOp(f"Conv: dilations {list(self.attrs['dilations'])} are not supported (only 1)")
        if self.attrs["auto_pad"] not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
            raise UnknownOp(f"Conv: unknown auto_pad {self.attrs['auto_pad']!r}")
        pads = self.attrs["pads"]
        if pads is not None and len(pads) != 4:
            raise UnknownOp(f"Conv: pads must be [top, left, bottom, right], got {list(pads)}")
        self.strides = _pair(self.attrs["strides"], 1)
        self.group = int(self.attrs["group"])
        if self.group < 1:
            raise UnknownOp(f"Conv: group must be >= 1, got {self.group}")

    def forward(self, x: np.ndarray, w: np.ndarray, *bias: np.ndarray | None) -> np.ndarray:
        b = bias[0] if bias else None
        n, c, h, wd = x.shape
        m, cg, kh, kw = w.shape
        if c != cg * self.group or m % self.group:
            raise ValueError(f"Conv: an input of {c} channels does not fit weight {w.shape} with group={self.group}")
        if self.attrs["kernel_shape"] is not None and tuple(self.attrs["kernel_shape"]) != (kh, kw):
            raise ValueError(f"Conv: kernel_shape {list(self.attrs['kernel_shape'])} but weight {w.shape}")
        top, left, bottom, right = self._pads((h, wd), (kh, kw))
        sh, sw = self.strides
        oh, ow = (h + top + bottom - kh) // sh + 1, (wd + left + right - kw) // sw + 1
        self._in, self._pad, self._out = (n, c, h, wd), (top, left, bottom, right), (oh, ow)
        self._w, self._inputs, self._has_bias = w, 2 + len(bias), b is not None
        self._pointwise = (kh, kw, sh, sw, self.group) == (1, 1, 1, 1, 1) and not any(self._pad)
        if self._pointwise:  # Y = X W^T over (N*H*W, C) rows
            self._x = _nhwc(x).reshape(n * h * wd, c)
            y = (self._x @ w.reshape(m, c).T).reshape(n, h, wd, m)
        else:
            self._x = xh = _nhwc(x)
            y = np.zeros((n, oh, ow, m), dtype=np.result_type(x, w))
            scratch = np.empty_like(y)
            wt = _per_tap(w)
            for part in self._chunks(y):  # a few images at a time: the taps then re-read cached memory
                y_part, s_part = y[part], scratch[part]
                for i, j, out, inp in self._taps(kh, kw):
                    y_part[out] += self._tap_forward(xh[part][inp], wt[i, j], s_part[out])
        if b is not None:
            y += b
        return _nchw(y)

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray | None, ...]:
        n, c, h, wd = self._in
        w = self._w
        m, cg, kh, kw = w.shape
        want_x, want_w = self._wants(0), self._wants(1)
        g = _nhwc(grad)
        gx = gw = None
        if self._pointwise:
            g = g.reshape(n * h * wd, m)
            if want_w:  # dW = G^T X
                gw = (g.T @ self._x).reshape(w.shape)
            if want_x:  # dX = G W
                gx = _nchw((g @ w.reshape(m, c)).reshape(n, h, wd, c))
        else:
            xh = self._x
            gxh = np.zeros(xh.shape, dtype=np.result_type(g, w)) if want_x else None
            gw = np.zeros_like(w) if want_w else None
            scratch = np.empty(xh.shape, dtype=np.result_type(g, w))
            wt = _per_tap(w) if want_x else None  # only the input gradient reads the weights
            for part in self._chunks(g):
                g_part, x_part = g[part], xh[part]
                for i, j, out, inp in self._taps(kh, kw):
                    if want_w:  # dW[:, :, i, j] = sum over images and positions of G * X[tap]
                        gw[:, :, i, j] += self._tap_weight_grad(g_part[out], x_part[inp])
                    if want_x:  # dX[tap] += G W[:, :, i, j]
                        gxh[part][inp] += self._tap_input_grad(g_part[out], wt[i, j], scratch[part][inp])
            if want_x:
                gx = _nchw(gxh)
        if self._inputs == 2:
            return gx, gw
        return gx, gw, g.sum(axis=tuple(range(g.ndim - 1))) if self._has_bias and self._wants(2) else None

    def _pads(self, size: tuple[int, int], kernel: tuple[int, int]) -> tuple[int, int, int, int]:
        mode = self.attrs["auto_pad"]
        if mode == "VALID":
            return 0, 0, 0, 0
        if mode == "NOTSET":
            top, left, bottom, right = (int(p) for p in self.attrs["pads"] or (0, 0, 0, 0))
            return top, left, bottom, right
        begin, end = [], []
        for size_i, k, s in zip(size, kernel, self.strides, strict=True):
            total = max((-(-size_i // s) - 1) * s + k - size_i, 0)
            small, big = total // 2, total - total // 2
            begin.append(small if mode == "SAME_UPPER" else big)
            end.append(big if mode == "SAME_UPPER" else small)
        return begin[0], begin[1], end[0], end[1]

    @staticmethod
    def _chunks(out: np.ndarray) -> list[slice]:
        """Slices of the batch whose output fits in about `CHUNK_BYTES` (2x faster than the whole batch at once)."""
        per_image = max(1, out[0].nbytes)
        step = max(1, CHUNK_BYTES // per_image)
        return [slice(a, a + step) for a in range(0, len(out), step)]

    def _wants(self, i: int) -> bool:
        return not self.needs_grad or (i < len(self.needs_grad) and self.needs_grad[i])

    def _taps(self, kh: int, kw: int) -> Iterator[tuple[int, int, tuple[slice, ...], tuple[slice, ...]]]:
        """Each kernel tap (i, j) that reads the input, with the NHWC index of the outputs it feeds and
        of the inputs it reads there (output row o reads input row o * stride + i - top: only the
        rows and columns where that lands inside the input; the rest would read padding, zeros)."""
        (sh, sw), (oh, ow) = self.strides, self._out
        top, left, _, _ = self._pad
        _, _, h, wd = self._in
        for i in range(kh):
            rows = _span(i - top, sh, oh, h)
            for j in range(kw):
                cols = _span(j - left, sw, ow, wd)
                if rows and cols:
                    yield i, j, (slice(None), rows[0], cols[0]), (slice(None), rows[1], cols[1])

    def _depthwise(self, m: int, c: int) -> bool:
        return self.group == c == m

    def _tap_forward(self, tap: np.ndarray, wt: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """One tap's contribution: `wt` (M, C/group) applied to `tap` (N, oh, ow, C); may use `scratch`."""
        m, c, g = wt.shape[0], tap.shape[-1], self.group
        if self._depthwise(m, c):  # one weight per channel
            return np.multiply(tap, wt[:, 0], out=scratch)
        rows = tap.reshape(-1, g, c // g)
        out = np.einsum("pgc,gmc->pgm", rows, wt.reshape(g, m // g, c // g), optimize=True)
        return out.reshape(tap.shape[:3] + (m,))

    def _tap_weight_grad(self, g: np.ndarray, tap: np.ndarray) -> np.ndarray:
        """d wt (M, C/group) of one tap from the output gradient `g` (N, oh, ow, M)."""
        m, c, grp = g.shape[-1], tap.shape[-1], self.group
        if self._depthwise(m, c):
            return np.einsum("nhwc,nhwc->c", g, tap).reshape(m, 1)
        gr = g.reshape(-1, grp, m // grp)
        rows = tap.reshape(-1, grp, c // grp)
        return np.einsum("pgm,pgc->gmc", gr, rows, optimize=True).reshape(m, c // grp)

    def _tap_input_grad(self, g: np.ndarray, wt: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """d tap (N, oh, ow, C) of one tap: the output gradient through `wt` (M, C/group); may use `scratch`."""
        m, grp = g.shape[-1], self.group
        c = wt.shape[1] * grp
        if self._depthwise(m, c):
            return np.multiply(g, wt[:, 0], out=scratch)
        gr = g.reshape(-1, grp, m // grp)
        out = np.einsum("pgm,gmc->pgc", gr, wt.reshape(grp, m // grp, c // grp), optimize=True)
        return out.reshape(g.shape[:3] + (c,))
