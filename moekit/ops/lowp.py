"""Low-precision weight formats: one class each, registered by name in :data:`FORMATS`; the
ops level of :mod:`moekit.layers.quantized` (a kernel product and its torch reference each).

A format turns a float weight ``w [N, K]`` (``nn.Linear``'s ``[out, in]``) into named
parts (:meth:`WeightFormat.quantize`), back into floats (:meth:`WeightFormat.dequantize`:
the reference every fast product is tested against) and multiplies rows by it
(:meth:`WeightFormat.matmul`, ``x [M, K] -> [M, N]``), through a C kernel where
:mod:`moekit.kernels` has one for the format, else dequantise-then-matmul.

- ``bf16``: the weight in bfloat16 (2 bytes a weight); products accumulate in float32
  (the kernel's few rows exactly; many rows as bf16 matrix products, :meth:`BF16.matmul`).
- ``int8``: symmetric, one float32 scale per output channel, ``w ~ q * scale`` with
  ``q`` in -127..127 (1 byte a weight plus 4 per row). Per-channel rather than llama.cpp's
  per-32 blocks: one scale per row keeps the kernel's inner loop a plain integer dot.

For ``int8`` and ``int4`` a product first rounds each row of activations to int8 with one
scale (:func:`round_rows_int8`, llama.cpp's q8 activations), so that the kernel multiplies
integers; the reference does the same, and the figures in docs/quantize.md include it.
- ``int4``: symmetric, one float32 scale per group of ``group_size`` weights along ``K``,
  ``q`` in -8..7 stored as ``q + 8`` two to a byte: in each group, byte ``j`` holds code
  ``j`` (low nibble) and code ``j + group_size/2`` (high nibble), llama.cpp's q4_0 order, so
  a kernel multiplies both halves with contiguous activations. 0.5 byte a weight plus 4 per
  group.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from moekit import kernels

FORMATS: dict[str, WeightFormat] = {}


def register_format(cls):
    FORMATS[cls.name] = cls()
    return cls


def get_format(name: str) -> WeightFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown weight format {name!r}; formats: {sorted(FORMATS)}")
    return FORMATS[name]


def round_rows_int8(x: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` with each row rounded to 255 levels, ``round(x / s) * s`` with
    ``s = max |x| / 127`` (llama.cpp's q8 activations, as ``moekit_rows_lowp`` computes them)."""
    amax = x.abs().amax(-1, keepdim=True)
    s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(x / s) * s


class WeightFormat:
    """Base of the formats. ``parts``: the tensor names :meth:`quantize` returns, each
    stored as a buffer named ``{weight}_{part}``."""

    name: ClassVar[str]
    parts: ClassVar[tuple[str, ...]]
    int8_activations: ClassVar[bool] = False  # products round each row of x to int8 first

    def check(self, shape: tuple[int, ...], group_size: int) -> None:
        """Raise ValueError when weights of ``shape`` (``[..., N, K]``) cannot take this format."""

    def part_shapes(self, shape: tuple[int, ...], group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The shape and dtype of each part for a float weight of ``shape`` (``[..., N, K]``)."""
        raise NotImplementedError

    def quantize(self, w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dequantize(self, parts: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, parts: dict[str, torch.Tensor], group_size: int,
               out: torch.Tensor | None = None, alpha: float = 1.0, kernel: bool = True) -> torch.Tensor:
        """``x [M, K] @ w.T -> [M, N]`` in ``x``'s dtype; with ``out``: ``out += alpha *`` that.
        With ``kernel`` (the module's choice, from its rows), float32 rows on the CPU go through
        ``moekit.kernels.rows_lowp`` (each weight read once per 64 rows, dequantised in
        registers); else dequantise, then matmul (:meth:`reference`)."""
        lib = kernels.for_tensors(x) if kernel else None
        if lib is None:
            return self.reference(x, parts, group_size, out, alpha)
        w, x = parts[self.parts[0]], x.contiguous()
        if out is None:
            out, alpha, accumulate = x.new_empty(x.shape[0], w.shape[0]), 1.0, False
        else:
            accumulate = True
        step = kernels.LOWP_MAX_ROWS
        for a in range(0, x.shape[0], step):  # the rows a call takes; each call reads the weights once
            kernels.rows_lowp(lib, self.name, w, parts.get("scale"), group_size, x[a : a + step], out[a : a + step],
                              alpha, accumulate)
        return out

    def reference(self, x: torch.Tensor, parts: dict[str, torch.Tensor], group_size: int,
                  out: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
        """:meth:`matmul` in torch ops: dequantise, then matmul (for the integer formats, with
        the activations rounded to int8 as the kernel rounds them)."""
        if self.int8_activations:
            x = round_rows_int8(x)
        y = x @ self.dequantize(parts, group_size).to(x.dtype).t()
        return y if out is None else out.add_(y, alpha=alpha)

    def bits_per_weight(self, group_size: int) -> float:
        raise NotImplementedError


@register_format
class BF16(WeightFormat):
    name, parts = "bf16", ("w",)

    def part_shapes(self, shape, group_size):
        return {"w": (tuple(shape), torch.bfloat16)}

    def quantize(self, w, group_size):
        return {"w": w.to(torch.bfloat16)}

    def dequantize(self, parts, group_size):
        return parts["w"].float()

    def matmul(self, x, parts, group_size, out=None, alpha=1.0, kernel=True):
        """Beyond the kernel's rows (prefill), float32 rows on the CPU multiply in bfloat16:
        ``x`` rounded to bf16, float32 accumulation, the product rounded to bf16 (as under
        autocast), faster than float32 there (benchmarks/quantize.py, its prefill line);
        otherwise as :meth:`WeightFormat.matmul`."""
        if not kernel and x.dtype == torch.float32 and x.device.type == "cpu":
            y = torch.nn.functional.linear(x.to(torch.bfloat16), parts["w"]).float()
            return y if out is None else out.add_(y, alpha=alpha)
        return super().matmul(x, parts, group_size, out, alpha, kernel)

    def bits_per_weight(self, group_size):
        return 16.0


@register_format
class Int8(WeightFormat):
    name, parts, int8_activations = "int8", ("q", "scale"), True

    def part_shapes(self, shape, group_size):
        return {"q": (tuple(shape), torch.int8), "scale": (tuple(shape[:-1]), torch.float32)}

    def quantize(self, w, group_size):
        w = w.float()
        scale = w.abs().amax(-1) / 127  # [..., N]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale
        q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)
        return {"q": q, "scale": scale}

    def dequantize(self, parts, group_size):
        return parts["q"].float() * parts["scale"][..., None]

    def bits_per_weight(self, group_size):
        return 8.0


@register_format
class Int4(WeightFormat):
    name, parts, int8_activations = "int4", ("q", "scale"), True

    def check(self, shape, group_size):
        K = shape[-1]
        if group_size < 2 or group_size > 1024 or group_size % 2 or K % group_size:
            raise ValueError(f"int4 groups of {group_size} weights do not divide the input width {K}: choose an "
                             f"even group size up to 1024 that divides it (32 and 64 are usual)")

    def part_shapes(self, shape, group_size):
        *lead, N, K = shape
        return {"q": ((*lead, N, K // 2), torch.uint8), "scale": ((*lead, N, K // group_size), torch.float32)}

    def quantize(self, w, group_size):
        self.check(tuple(w.shape), group_size)
        *lead, N, K = w.shape
        groups = w.float().reshape(*lead, N, K // group_size, group_size)
        scale = groups.abs().amax(-1) / 7  # [..., N, K/g]; -8 stays unused, so the grid is symmetric
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = (torch.round(groups / scale[..., None]).clamp_(-8, 7) + 8).to(torch.uint8)  # [..., N, K/g, g]
        half = group_size // 2
        packed = q[..., :half] | (q[..., half:] << 4)  # byte j: code j (low nibble), code j + g/2 (high)
        return {"q": packed.reshape(*lead, N, K // 2), "scale": scale}

    def dequantize(self, parts, group_size):
        packed, scale = parts["q"], parts["scale"]
        *lead, N, half_k = packed.shape
        groups = packed.reshape(*lead, N, -1, group_size // 2)  # [..., N, K/g, g/2]
        q = torch.cat([groups & 15, groups >> 4], -1).float() - 8  # [..., N, K/g, g]
        return (q * scale[..., None]).reshape(*lead, N, 2 * half_k)

    def bits_per_weight(self, group_size):
        return 4.0 + 32.0 / group_size
