"""What every wrapper checks before it hands a pointer to C: a tensor, of the dtype, on the
CPU, of the shape, with the layout the loop reads (contiguous, or unit stride in a row), and
index values inside the rows they index. A wrong argument is a ``ValueError`` that names the
argument, what it is and what is allowed; nothing reaches C unchecked."""

from __future__ import annotations

import torch

F32, I64 = torch.float32, torch.int64


def tensor(name: str, t, dtype: torch.dtype = F32, shape: tuple | None = None, numel: int | None = None,
           contiguous: bool = False, unit_row_stride: bool = False) -> torch.Tensor:
    """``t`` unchanged, or a ValueError. ``shape``: a tuple of sizes, ``None`` for any size in
    that dimension; ``numel``: any shape with this many values (then ``contiguous`` is implied)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got {t.device}")
    if shape is not None and (t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape))):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} must hold {numel} values, got {t.numel()} (shape {list(t.shape)})")
    if (contiguous or numel is not None) and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    if unit_row_stride and t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dimension, got strides {t.stride()}")
    return t


def flat(name: str, t, numel: int, dtype: torch.dtype = F32) -> torch.Tensor:
    """``t`` (any shape with ``numel`` values) made contiguous, after the checks of :func:`tensor`."""
    tensor(name, t, dtype)
    return tensor(name, t.contiguous(), dtype, numel=numel)


def optional(name: str, t, **kw) -> torch.Tensor | None:
    return None if t is None else tensor(name, t, **kw)


def dtype_in(name: str, t, dtypes: tuple[torch.dtype, ...]) -> torch.dtype:
    """The dtype of ``t`` (a tensor, or a dtype itself) where it is one of ``dtypes`` (for
    kernels that take several), else a ValueError."""
    if not isinstance(t, (torch.Tensor, torch.dtype)):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtype = t if isinstance(t, torch.dtype) else t.dtype
    if dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(map(str, dtypes))}, got {dtype}")
    return dtype


def same_layout(names: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.stride() != b.stride():
        raise ValueError(f"{names} must have the same shape and strides, got {list(a.shape)}/{a.stride()} "
                         f"and {list(b.shape)}/{b.stride()}")


def indices(name: str, t: torch.Tensor, low: int, high: int) -> None:
    """Every value of the int64 tensor ``t`` in ``[low, high)``."""
    if t.numel():
        lo, hi = torch.aminmax(t)
        lo, hi = int(lo), int(hi)
        if lo < low or hi >= high:
            raise ValueError(f"{name} must hold values in [{low}, {high}), got values in [{lo}, {hi}]")


def counts(name: str, t: torch.Tensor, experts: int, rows: int) -> list[int]:
    """The int64 ``[experts]`` row counts ``t``: each >= 0, together at most ``rows``.
    Returns them."""
    tensor(name, t, I64, shape=(experts,), contiguous=True)
    values = t.tolist()
    if values and (min(values) < 0 or sum(values) > rows):
        raise ValueError(f"{name} must be counts >= 0 summing to at most {rows} rows, got {values}")
    return values


def positive(name: str, value: int, most: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (most is not None and value > most):
        allowed = f"1..{most}" if most is not None else ">= 1"
        raise ValueError(f"{name} must be an int in {allowed}, got {value!r}")
    return value
