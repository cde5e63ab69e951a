"""Wrappers of the one-token kernels (``cpu_gemv.c``): products that read each weight once
at the speed of memory, and whole steps (a SwiGLU expert, a Mixtral-style MoE feed-forward,
a layer's attention) in one call each. Tensors and scalars in, tensors out; every argument
checked (:mod:`moekit.kernels.checks`) before it reaches C."""

from __future__ import annotations

import ctypes

import torch

from moekit.kernels import checks as ck
from moekit.kernels.ffi import check_rc, ptr


def rows_ok(w: torch.Tensor) -> bool:
    """Whether ``w`` (``[N, K]``) suits :func:`rows`: float32 on the CPU, unit stride in a row."""
    return w.dtype == torch.float32 and w.device.type == "cpu" and w.dim() == 2 and w.stride(1) == 1


def rows(lib: ctypes.CDLL, w: torch.Tensor, x: torch.Tensor, out: torch.Tensor, alpha: float = 1.0,
         bias: torch.Tensor | None = None, add: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
         eps: float = 0.0) -> torch.Tensor:
    """``out = alpha * w @ v + bias + add`` for one vector ``v``: ``x``, or with ``norm_weight``
    the RMS-normalised ``x * norm_weight`` (epsilon ``eps``). ``w [N, K]`` with unit stride in
    a row, ``x [K]``, ``out``/``bias``/``add`` ``[N]`` contiguous, float32 (``add`` may be
    ``out``). Returns ``out``."""
    ck.tensor("w", w, shape=(None, None), unit_row_stride=True)
    N, K = w.shape
    x = ck.flat("x", x, K)
    ck.tensor("out", out, numel=N)
    ck.optional("bias", bias, numel=N)
    ck.optional("add", add, numel=N)
    ck.optional("norm_weight", norm_weight, numel=K)
    check_rc(lib.moekit_rows(w.data_ptr(), N, K, w.stride(0), x.data_ptr(), ptr(norm_weight), eps, out.data_ptr(),
                             alpha, ptr(bias), ptr(add), torch.get_num_threads()), "moekit_rows")
    return out


def swiglu_ok(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the SwiGLU kernels read these expert weights (``w1``/``w3`` ``[E, d, f]``,
    ``w2 [E, f, d_out]``): ``dtype`` (float32; the blocked kernel also takes bfloat16) on the
    CPU, ``w1`` and ``w3`` laid out alike (separate, or the halves of one fused tensor), unit
    stride in a row."""
    return (all(w.dtype == dtype and w.device.type == "cpu" and w.dim() == 3 for w in (w1, w3, w2))
            and w1.shape == w3.shape and w1.stride() == w3.stride() and w1.stride(-1) == w2.stride(-1) == 1
            and w2.shape[:2] == (w1.shape[0], w1.shape[2]))


def _check_experts(w1, w3, w2, one: bool, dtype: torch.dtype = torch.float32) -> None:
    """The expert weights' dtype, shapes and layouts (one expert's 2-D slices where ``one``)."""
    dims = (None, None) if one else (None, None, None)
    ck.tensor("w1", w1, dtype, shape=dims, unit_row_stride=True)
    ck.tensor("w3", w3, dtype, shape=dims, unit_row_stride=True)
    ck.tensor("w2", w2, dtype, shape=dims, unit_row_stride=True)
    ck.same_layout("w1 and w3", w1, w3)
    lead = w1.shape[:-2]
    if w2.shape[:-2] != lead or w2.shape[-2] != w1.shape[-1]:
        raise ValueError(f"w2 must have shape {[*lead, w1.shape[-1], '*']} for w1 of shape {list(w1.shape)}, "
                         f"got {list(w2.shape)}")


def swiglu_add(lib: ctypes.CDLL, x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
               out: torch.Tensor, weight: float) -> None:
    """``out += weight * (silu(x @ w1) * (x @ w3)) @ w2`` for one vector ``x [K]``: ``w1``,
    ``w3`` ``[K, F]`` laid out alike, ``w2 [F, N]``, unit stride in a row (one expert's slices
    of 3-D expert weights, fused or not); ``out [N]`` contiguous."""
    _check_experts(w1, w3, w2, one=True)
    K, Fw = w1.shape
    x = ck.flat("x", x, K)
    ck.tensor("out", out, numel=w2.shape[1])
    check_rc(lib.moekit_swiglu_add(x.data_ptr(), K, w1.data_ptr(), w3.data_ptr(), w1.stride(0), Fw,
                                   w2.data_ptr(), w2.stride(0), w2.shape[1], out.data_ptr(), weight,
                                   torch.get_num_threads()), "moekit_swiglu_add")


def moe_token_ok(norm_weight: torch.Tensor | None, gate_weight: torch.Tensor, gate_bias: torch.Tensor | None,
                 w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether :class:`MoETokenStep` (or, with ``norm_weight=None``, :func:`moe_token`) takes
    these weights: float32 on the CPU, a contiguous ``[E, d]`` gate, experts :func:`swiglu_ok`
    with an output as wide as the input."""
    small = [t for t in (norm_weight, gate_weight, gate_bias) if t is not None]
    return (swiglu_ok(w1, w3, w2) and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                                          for t in small)
            and gate_weight.dim() == 2 and gate_weight.shape == (w1.shape[0], w1.shape[1])
            and w2.shape[2] == w1.shape[1])


def _moe_token_args(norm_weight, eps, gate_weight, gate_bias, top_k, renormalize, scale, w1, w3, w2) -> tuple:
    """The router's and the experts' arguments of ``moekit_moe_token``, checked."""
    _check_experts(w1, w3, w2, one=False)
    E, K, Fw = w1.shape
    if w2.shape[2] != K:
        raise ValueError(f"w2 must output d_model={K} (the step adds into its input), got shape {list(w2.shape)}")
    ck.tensor("gate_weight", gate_weight, shape=(E, K), contiguous=True)
    ck.optional("gate_bias", gate_bias, numel=E)
    ck.optional("norm_weight", norm_weight, numel=K)
    ck.positive("top_k", top_k, E)
    return (ptr(norm_weight), eps, gate_weight.data_ptr(), ptr(gate_bias), E, top_k, int(renormalize), scale,
            w1.data_ptr(), w3.data_ptr(), w1.stride(0), w1.stride(1), Fw, w2.data_ptr(), w2.stride(0), w2.stride(1))


class MoETokenStep:
    """One token through a Mixtral-style MoE feed-forward, in place, bound to its weights:
    ``step(x)`` does ``x [d] += sum over the chosen experts of w * expert(norm(x))`` with the
    top-k softmax router (``gate_weight [E, d]``, ``gate_bias``; the k largest logits; weights
    softmax over them when ``renormalize``, else their softmax probabilities; times ``scale``)
    and SwiGLU experts ``w1``/``w3`` ``[E, d, f]``, ``w2 [E, f, d]``; returns the chosen
    experts and their weights. ``norm_weight``/``eps``: the RMSNorm before the router (``None``:
    none). The step holds its own references to the weights' storage, so they stay valid
    whatever happens to the parameters afterwards; bind once per generation."""

    def __init__(self, lib: ctypes.CDLL, norm_weight: torch.Tensor | None, eps: float, gate_weight: torch.Tensor,
                 gate_bias: torch.Tensor | None, top_k: int, renormalize: bool, scale: float, w1: torch.Tensor,
                 w3: torch.Tensor, w2: torch.Tensor):
        tensors = (norm_weight, gate_weight, gate_bias, w1, w3, w2)
        self._keep = tuple(None if t is None else t.detach() for t in tensors)  # the storage, not the parameter
        self._fn = lib.moekit_moe_token
        self._args = _moe_token_args(norm_weight, eps, gate_weight, gate_bias, top_k, renormalize, scale, w1, w3, w2)
        self.d = w1.shape[1]
        self._chosen, self._weights = (ctypes.c_long * top_k)(), (ctypes.c_float * top_k)()

    max_rows = 1  # tokens a call takes

    def __call__(self, x: torch.Tensor) -> tuple[list[int], list[float]]:
        """``x``: ``[d]`` contiguous float32, updated in place."""
        ck.tensor("x", x, numel=self.d)
        check_rc(self._fn(x.data_ptr(), x.data_ptr(), self.d, *self._args, self._chosen, self._weights, None, None,
                          None, torch.get_num_threads()), "moekit_moe_token")
        return list(self._chosen), list(self._weights)


def moe_token(lib: ctypes.CDLL, x: torch.Tensor, out: torch.Tensor, gate_weight: torch.Tensor,
              gate_bias: torch.Tensor | None, top_k: int, renormalize: bool, scale: float, w1: torch.Tensor,
              w3: torch.Tensor, w2: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor,
              probs: torch.Tensor, counts: torch.Tensor) -> None:
    """An MoE layer's forward for one token, no norm: ``out [d] += sum over the chosen experts
    of w * expert(x)``, the router and experts as :class:`MoETokenStep`'s; writes ``chosen``
    (int64 ``[k]``), ``weights [k]``, ``logits [E]`` and ``probs [E]`` (the softmax over all
    experts), and adds 1 to ``counts`` (int64 ``[E]``) for each chosen expert. ``x`` may be
    ``[1, d]``; the outputs are contiguous (any shape with that many values)."""
    args = _moe_token_args(None, 0.0, gate_weight, gate_bias, top_k, renormalize, scale, w1, w3, w2)
    E, K = gate_weight.shape
    x = ck.flat("x", x, K)
    ck.tensor("out", out, numel=K)
    ck.tensor("chosen", chosen, ck.I64, numel=top_k)
    ck.tensor("weights", weights, numel=top_k)
    ck.tensor("logits", logits, numel=E)
    ck.tensor("probs", probs, numel=E)
    ck.tensor("counts", counts, ck.I64, numel=E)
    check_rc(lib.moekit_moe_token(x.data_ptr(), out.data_ptr(), K, *args, chosen.data_ptr(), weights.data_ptr(),
                                  logits.data_ptr(), probs.data_ptr(), counts.data_ptr(), torch.get_num_threads()),
             "moekit_moe_token")


def attention_ok(w_qkv: torch.Tensor, w_o: torch.Tensor, heads: tuple[int, int, int], k_cache: torch.Tensor,
                 v_cache: torch.Tensor, *biases: torch.Tensor | None) -> bool:
    """Whether :class:`AttentionStep` takes these: float32 on the CPU, contiguous q/k/v rows,
    ``w_o`` rows with unit stride, caches ``[Hkv, rows, hd]`` with contiguous rows and the same
    layout, an even head size, query heads a multiple of kv heads."""
    H, Hkv, hd = heads
    tensors = [w_qkv, w_o, k_cache, v_cache, *(b for b in biases if b is not None)]
    return (
        all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        and w_qkv.is_contiguous() and rows_ok(w_o) and all(b.is_contiguous() for b in biases if b is not None)
        and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and k_cache.stride(-2) == hd
        and hd % 2 == 0 and H % Hkv == 0
    )


def check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, Hkv: int, hd: int) -> None:
    """A layer's KV caches for a one-token attention step: ``[Hkv, rows, hd]``, float32,
    contiguous rows, the same layout."""
    ck.tensor("k_cache", k_cache, shape=(Hkv, None, hd))
    ck.tensor("v_cache", v_cache, shape=(Hkv, None, hd))
    ck.same_layout("k_cache and v_cache", k_cache, v_cache)
    if k_cache.stride(2) != 1 or k_cache.stride(1) != hd:
        raise ValueError(f"k_cache and v_cache must have contiguous rows of hd={hd}, got strides {k_cache.stride()}")


def check_position(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int, start: int, d: int, hd: int,
                   rows: int) -> None:
    """One attention step's per-call arguments: ``x [d]``, ``cos``/``sin`` ``[hd]``, and cache
    rows ``0 <= start <= pos < rows``."""
    ck.tensor("x", x, numel=d)
    ck.tensor("cos", cos, numel=hd)
    ck.tensor("sin", sin, numel=hd)
    if not 0 <= start <= pos < rows:
        raise ValueError(f"pos and start must satisfy 0 <= start <= pos < {rows} (cache rows), "
                         f"got pos={pos}, start={start}")


class AttentionStep:
    """One token's self-attention (batch 1) added into the residual in place, bound to a
    layer's weights and KV cache: ``step(x, cos, sin, pos, start)`` computes q/k/v from the
    RMS-normalised ``x * norm_weight`` (``w_qkv [(H + 2 Hkv) hd, d]``), rotates q and k by
    RoPE (``cos``/``sin`` ``[hd]`` of this position), writes k and v at row ``pos`` of the
    caches (``[Hkv, rows, hd]``), attends over rows ``[start, pos]`` (query head h reads kv
    head ``h // (H / Hkv)``, scale ``1/sqrt(hd)``) and adds ``w_o @ y + b_o`` into ``x [d]``.
    ``heads`` is ``(H, Hkv, hd)``. The step holds its own references to every tensor's storage."""

    def __init__(self, lib: ctypes.CDLL, norm_weight: torch.Tensor, eps: float, w_qkv: torch.Tensor,
                 b_qkv: torch.Tensor | None, heads: tuple[int, int, int], k_cache: torch.Tensor,
                 v_cache: torch.Tensor, w_o: torch.Tensor, b_o: torch.Tensor | None):
        H, Hkv, hd = (ck.positive(n, v) for n, v in zip(("H", "Hkv", "hd"), heads))
        if hd % 2 or H % Hkv:
            raise ValueError(f"heads must have an even head size and H a multiple of Hkv, got {heads}")
        ck.tensor("w_qkv", w_qkv, shape=((H + 2 * Hkv) * hd, None), contiguous=True)
        d = w_qkv.shape[1]
        ck.tensor("norm_weight", norm_weight, numel=d)
        ck.optional("b_qkv", b_qkv, numel=(H + 2 * Hkv) * hd)
        ck.tensor("w_o", w_o, shape=(d, H * hd), unit_row_stride=True)
        ck.optional("b_o", b_o, numel=d)
        check_caches(k_cache, v_cache, Hkv, hd)
        self._keep = tuple(None if t is None else t.detach() for t in (norm_weight, w_qkv, b_qkv, k_cache, v_cache,
                                                                        w_o, b_o))
        self._fn = lib.moekit_attention_token
        self.d, self.hd, self.rows = d, hd, k_cache.shape[1]
        self._qkv = (norm_weight.data_ptr(), eps, w_qkv.data_ptr(), ptr(b_qkv), H, Hkv, hd)
        self._cache = (k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0))
        self._out = (w_o.data_ptr(), w_o.stride(0), ptr(b_o))

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int, start: int) -> None:
        check_position(x, cos, sin, pos, start, self.d, self.hd, self.rows)
        check_rc(self._fn(x.data_ptr(), self.d, *self._qkv, cos.data_ptr(), sin.data_ptr(), *self._cache, pos, start,
                          *self._out, torch.get_num_threads()), "moekit_attention_token")
