"""CPU kernels, built on first use: decoding one token, and moving the MoE layer's rows.

At batch 1 a decode step reads every active weight once, so its speed is the rate at
which a few dozen matrix-vector products read memory. For a one-row ``x @ W`` torch calls
a BLAS matrix-matrix kernel, which on this project's 2-core AVX-512 machine reads float32
weights at 16-20 GB/s; the loops in ``cpu_gemv.c`` (several accumulators, software
prefetch, each thread streaming its own share of the output) read them at 20-28 GB/s,
measured by ``benchmarks/generate.py``. Whole steps run in one call each, where torch takes
a dozen ops: a SwiGLU expert (:func:`swiglu_add`), a Mixtral-style MoE feed-forward with
its norm and router (:class:`MoETokenStep`) and a layer's attention with its norm, RoPE and
KV-cache write (:class:`AttentionStep`); :func:`rows` is the plain product (the LM head).
The same streaming serves the experts when each gets a few rows (up to 8 on average: small
batches, batched decoding, few-token training steps): :func:`swiglu_segments` reads each
weight from memory once for all of an expert's rows, and in training
:func:`swiglu_segments_backward` reads each once more and writes each weight gradient once
with streaming stores. :func:`silu_mul` (and its backward) is the SwiGLU activation in one
pass for the long segments.

``cpu_rows.c`` serves the MoE layer's fast path at any batch size, in training too: the
gather of tokens into expert order, the weighted combine back into token order, and their
backward passes (:func:`gather_rows`, :func:`combine_backward`), each one pass over the
rows, parallel over the rows written. In torch ops the combine is a zero-fill and an
``index_add_`` and its backward three more ops: 3.4 -> 1.0 ms forward+backward for 4096
tokens, top-2, d_model 128 (10.7 -> 3.2 ms at d_model 512). The softmax top-k router runs
there too (:func:`topk_softmax`): router and balancing losses forward+backward 3.65 -> 2.67
ms over 4096 tokens and 8 experts.

The C file is compiled with the system's C compiler (``$CC``, else ``cc`` or ``gcc``;
``-O3 -march=native -fopenmp``) into a cache folder (``$MOEKIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/moekit``, else ``~/.cache/moekit``), under a name that hashes the source,
the flags, the CPU and the torch version, and is written atomically. Where there is no
compiler, the build fails, or ``MOEKIT_KERNELS=0`` is set, :func:`load` returns ``None``
and the callers use torch ops (same results to float32 rounding); :func:`status` says which
and why. OpenMP comes from the ``libgomp.so.1`` torch has already loaded, so the kernels
share torch's threads (``torch.get_num_threads()`` of them).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_gemv.c", "cpu_rows.c")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_state: dict = {}  # "lib": CDLL or None, "reason": str


def cache_dir() -> Path:
    """Where built kernels are kept."""
    if os.environ.get("MOEKIT_CACHE_DIR"):
        return Path(os.environ["MOEKIT_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moekit" / "kernels"


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(lines))  # the first of each kind is enough


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: a concurrent build finds a whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    P, L, F, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
    lib.moekit_rows.argtypes = [P, L, L, L, P, P, F, P, F, P, P, I]
    lib.moekit_rows.restype = I
    lib.moekit_swiglu_add.argtypes = [P, L, P, P, L, L, P, L, L, P, F, I]
    lib.moekit_swiglu_add.restype = I
    lib.moekit_moe_token.argtypes = [P, P, L, P, F, P, P, L, I, I, F, P, P, L, L, L, P, L, L, P, P, P, P, P, I]
    lib.moekit_moe_token.restype = I
    lib.moekit_attention_token.argtypes = [P, L, P, F, P, P, L, L, L, P, P, P, P, L, L, L, P, L, P, I]
    lib.moekit_attention_token.restype = I
    lib.moekit_swiglu_segments.argtypes = [P, L, P, L, P, P, L, L, L, P, L, L, L, P, P, P, I]
    lib.moekit_swiglu_segments.restype = I
    lib.moekit_swiglu_segments_backward.argtypes = [P, L, P, L, P, P, L, L, L, P, L, L, L, P, P, P, P, P, P, P, I]
    lib.moekit_swiglu_segments_backward.restype = I
    lib.moekit_silu_mul.argtypes = [P, P, P, L, I]
    lib.moekit_silu_mul.restype = None
    lib.moekit_silu_mul_backward.argtypes = [P, P, P, P, P, L, I]
    lib.moekit_silu_mul_backward.restype = None
    lib.moekit_topk_softmax.argtypes = [P, L, L, I, I, F, P, P, P, I]
    lib.moekit_topk_softmax.restype = I
    lib.moekit_topk_softmax_backward.argtypes = [P, P, P, P, P, L, L, I, I, F, P, I]
    lib.moekit_topk_softmax_backward.restype = I
    lib.moekit_gather_rows.argtypes = [P, L, P, P, L, L, P, I]
    lib.moekit_gather_rows.restype = I
    lib.moekit_combine_backward.argtypes = [P, P, L, P, P, L, P, P, I]
    lib.moekit_combine_backward.restype = I
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernels, building them the first time; ``None`` where unavailable."""
    with _lock:
        if "reason" in _state:
            return _state["lib"]
        lib, reason = None, ""
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if os.environ.get("MOEKIT_KERNELS", "1") == "0":
            reason = "disabled by MOEKIT_KERNELS=0"
        elif platform.system() != "Linux":
            reason = f"built on Linux only, this is {platform.system()}"
        elif compiler is None:
            reason = "no C compiler found (set CC, or install gcc)"
        else:
            key = hashlib.sha256("\n".join([*(src.read_text() for src in SOURCES), compiler, *FLAGS, _cpu_id(),
                                            torch.__version__]).encode()).hexdigest()[:16]
            target = cache_dir() / f"moekit-cpu-{key}.so"
            try:
                if not target.exists():
                    _build(compiler, target)
                try:
                    lib = _declare(ctypes.CDLL(str(target)))
                except OSError:  # a damaged file in the cache: build it again, once
                    _build(compiler, target)
                    lib = _declare(ctypes.CDLL(str(target)))
                reason = f"compiled ({target})"
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                lib, reason = None, f"build failed, using torch ops: {exc}"
        _state.update(lib=lib, reason=reason)
        return lib


def status() -> str:
    """One line: whether the kernels are in use, and why not."""
    load()
    return ("cpu kernels: " if _state["lib"] is not None else "cpu kernels off: ") + _state["reason"]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def rows_ok(w: torch.Tensor) -> bool:
    """Whether ``w`` (``[N, K]``) suits :func:`rows`: float32 on the CPU, unit stride in a row."""
    return w.dtype == torch.float32 and w.device.type == "cpu" and w.dim() == 2 and w.stride(1) == 1


def rows(lib: ctypes.CDLL, w: torch.Tensor, x: torch.Tensor, out: torch.Tensor, alpha: float = 1.0,
         bias: torch.Tensor | None = None, add: torch.Tensor | None = None, norm=None) -> torch.Tensor:
    """``out = alpha * w @ v + bias + add`` for one vector ``v``: ``x``, or with ``norm``
    (an :class:`moekit.layers.norm.RMSNorm`) ``norm(x)``. ``w [N, K]`` (:func:`rows_ok`),
    ``x [K]``, ``out``/``bias``/``add`` ``[N]``, float32 (``add`` may be ``out``). Returns
    ``out``."""
    x = x.contiguous()
    g, eps = (None, 0.0) if norm is None else (norm.weight.data_ptr(), norm.eps)
    if lib.moekit_rows(w.data_ptr(), w.shape[0], w.shape[1], w.stride(0), x.data_ptr(), g, eps, out.data_ptr(),
                       alpha, _ptr(bias), _ptr(add), torch.get_num_threads()) != 0:
        raise MemoryError("moekit_rows could not allocate its buffer")
    return out


def swiglu_add(lib: ctypes.CDLL, x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
               out: torch.Tensor, weight: float) -> None:
    """``out += weight * (silu(x @ w1) * (x @ w3)) @ w2`` for one vector ``x [K]``: ``w1``,
    ``w3`` ``[K, F]`` with the same row stride, ``w2 [F, N]``, each with unit stride in a
    row (one expert's slices of :class:`moekit.layers.experts.SwiGLUExperts`, fused or not);
    ``out [N]`` contiguous."""
    x = x.contiguous()
    if lib.moekit_swiglu_add(x.data_ptr(), w1.shape[0], w1.data_ptr(), w3.data_ptr(), w1.stride(0), w1.shape[1],
                             w2.data_ptr(), w2.stride(0), w2.shape[1], out.data_ptr(), weight,
                             torch.get_num_threads()) != 0:
        raise MemoryError("moekit_swiglu_add could not allocate its buffer")


def swiglu_segments(lib: ctypes.CDLL, x: torch.Tensor, tokens_per_expert: torch.Tensor, w1: torch.Tensor,
                    w3: torch.Tensor, w2: torch.Tensor, save: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> torch.Tensor:
    """Every SwiGLU expert (weights ``w1``, ``w3`` ``[E, d, f]``, ``w2 [E, f, d]`` as
    :class:`~moekit.layers.experts.SwiGLUExperts`', passing :func:`swiglu_ok`) over its rows of
    ``x [N, d]`` (sorted by expert, ``tokens_per_expert`` int64 ``[E]`` rows each), each
    weight read from memory once: the path where experts get a few rows each. ``save``:
    two contiguous ``[N, d_ff]`` tensors that receive the gate and up pre-activations, for
    :func:`swiglu_segments_backward`. Returns ``[N, d]``."""
    x, counts = x.contiguous(), tokens_per_expert.contiguous()
    out = x.new_empty(x.shape[0], w2.shape[2])
    gate, up = (None, None) if save is None else (save[0].data_ptr(), save[1].data_ptr())
    if lib.moekit_swiglu_segments(x.data_ptr(), x.shape[1], counts.data_ptr(), counts.shape[0], w1.data_ptr(),
                                  w3.data_ptr(), w1.stride(0), w1.stride(1), w1.shape[2], w2.data_ptr(),
                                  w2.stride(0), w2.stride(1), w2.shape[2], out.data_ptr(), gate, up,
                                  torch.get_num_threads()) != 0:
        raise MemoryError("moekit_swiglu_segments could not allocate its buffer")
    return out


def swiglu_segments_backward(lib: ctypes.CDLL, x: torch.Tensor, tokens_per_expert: torch.Tensor, w1: torch.Tensor,
                             w3: torch.Tensor, w2: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of :func:`swiglu_segments` (run with ``save=(gate, up)``) for the
    output's gradient ``dy [N, d]``: ``dx`` and the three weight gradients (contiguous, zero
    for experts without rows), each weight read once and each gradient written once. Rows
    past ``tokens_per_expert.sum()`` get a zero ``dx``."""
    x, counts, dy = x.contiguous(), tokens_per_expert.contiguous(), dy.contiguous()
    dx = torch.empty_like(x)
    dw1, dw3, dw2 = (torch.empty(w.shape, dtype=w.dtype) for w in (w1, w3, w2))
    if lib.moekit_swiglu_segments_backward(
            x.data_ptr(), x.shape[1], counts.data_ptr(), counts.shape[0], w1.data_ptr(), w3.data_ptr(), w1.stride(0),
            w1.stride(1), w1.shape[2], w2.data_ptr(), w2.stride(0), w2.stride(1), w2.shape[2], gate.data_ptr(),
            up.data_ptr(), dy.data_ptr(), dx.data_ptr(), dw1.data_ptr(), dw3.data_ptr(), dw2.data_ptr(),
            torch.get_num_threads()) != 0:
        raise MemoryError("moekit_swiglu_segments_backward could not allocate its buffers")
    covered = int(counts.sum())
    if covered < x.shape[0]:
        dx[covered:] = 0
    return dx, dw1, dw3, dw2


def silu_mul(lib: ctypes.CDLL, g: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(g) * u`` (the SwiGLU's hidden activation) in one pass; contiguous float32 tensors
    of one shape, ``out`` may be ``g``. Returns ``out`` (new where not given)."""
    out = torch.empty_like(g) if out is None else out
    lib.moekit_silu_mul(g.data_ptr(), u.data_ptr(), out.data_ptr(), g.numel(), torch.get_num_threads())
    return out


def silu_mul_backward(lib: ctypes.CDLL, dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`silu_mul` for ``dh`` (contiguous float32, the shape of ``g``
    and ``u``): ``(dg, du)``, in one pass."""
    dg, du = torch.empty_like(g), torch.empty_like(u)
    lib.moekit_silu_mul_backward(dh.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(), g.numel(),
                                 torch.get_num_threads())
    return dg, du


class MoETokenStep:
    """One token through a Mixtral-style MoE feed-forward, in place, bound to its weights:
    ``step(x)`` does ``x [d] += sum over the chosen experts of w * expert(norm(x))`` with the
    top-k softmax router ``gate`` (the k largest logits; weights softmax over them when
    ``renormalize``, else their softmax probabilities; times ``scale``) and
    :class:`~moekit.layers.experts.SwiGLUExperts` (:func:`moe_token_ok`), and returns the
    chosen experts and their weights. The weights are read where they are when the step is
    bound (it keeps them alive), so bind once per generation."""

    def __init__(self, lib: ctypes.CDLL, norm, gate: torch.nn.Linear, top_k: int, renormalize: bool, scale: float,
                 experts):
        self._keep = (norm.weight, gate.weight, gate.bias, experts.w1, experts.w3, experts.w2)
        self._fn = lib.moekit_moe_token
        self._args = _moe_token_args(norm, gate, top_k, renormalize, scale, experts)
        self._chosen, self._weights = (ctypes.c_long * top_k)(), (ctypes.c_float * top_k)()

    def __call__(self, x: torch.Tensor) -> tuple[list[int], list[float]]:
        """``x``: ``[d]`` contiguous float32, updated in place."""
        rc = self._fn(x.data_ptr(), x.data_ptr(), x.shape[0], *self._args, self._chosen, self._weights, None, None,
                      None, torch.get_num_threads())
        if rc != 0:
            raise MemoryError("moekit_moe_token could not allocate its buffers")
        return list(self._chosen), list(self._weights)


def _moe_token_args(norm, gate: torch.nn.Linear, top_k: int, renormalize: bool, scale: float, experts) -> tuple:
    """The router's and the experts' arguments of ``moekit_moe_token``."""
    w1, w3, w2 = experts.w1, experts.w3, experts.w2
    g, eps = (None, 0.0) if norm is None else (norm.weight.data_ptr(), norm.eps)
    return (g, eps, gate.weight.data_ptr(), _ptr(gate.bias), gate.weight.shape[0], top_k, int(renormalize), scale,
            w1.data_ptr(), w3.data_ptr(), w1.stride(0), w1.stride(1), w1.shape[2],
            w2.data_ptr(), w2.stride(0), w2.stride(1))


def moe_token(lib: ctypes.CDLL, x: torch.Tensor, out: torch.Tensor, gate: torch.nn.Linear, top_k: int,
              renormalize: bool, scale: float, experts, chosen: torch.Tensor, weights: torch.Tensor,
              logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor) -> None:
    """The MoE layer's forward for one token, no norm (:func:`moe_token_ok` with ``norm=None``):
    ``out [d] += sum over the chosen experts of w * expert(x)``, the router as
    :class:`MoETokenStep`'s; writes ``chosen`` (int64 ``[k]``), ``weights [k]``, ``logits [E]``
    and ``probs [E]`` (the softmax over all experts), and adds 1 to ``counts`` (int64 ``[E]``)
    for each chosen expert. ``x`` may be ``[1, d]``; the outputs are contiguous (any shape with
    that many values), float32 but ``chosen`` and ``counts``."""
    x = x.contiguous()
    rc = lib.moekit_moe_token(x.data_ptr(), out.data_ptr(), x.shape[-1],
                              *_moe_token_args(None, gate, top_k, renormalize, scale, experts),
                              chosen.data_ptr(), weights.data_ptr(), logits.data_ptr(), probs.data_ptr(),
                              counts.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError("moekit_moe_token could not allocate its buffers")


def norm_ok(norm) -> bool:
    """Whether a kernel can fold ``norm`` into the product that reads it: moekit's float32
    RMSNorm on the CPU."""
    from moekit.layers.norm import RMSNorm

    return (isinstance(norm, RMSNorm) and norm.weight.dtype == torch.float32 and norm.weight.device.type == "cpu"
            and norm.weight.is_contiguous())


def swiglu_ok(experts) -> bool:
    """Whether :func:`swiglu_add` and :func:`swiglu_segments` can read the weights of
    ``experts`` (``w1``/``w3`` ``[E, d, f]``, ``w2`` ``[E, f, d]``, as
    :class:`~moekit.layers.experts.SwiGLUExperts`):
    float32 on the CPU, ``w1`` and ``w3`` laid out alike (separate or the halves of a fused
    tensor), unit stride in a row."""
    w1, w3, w2 = experts.w1, experts.w3, experts.w2
    return (all(w.dtype == torch.float32 and w.device.type == "cpu" for w in (w1, w3, w2))
            and w1.stride() == w3.stride() and w1.stride(-1) == w2.stride(-1) == 1)


def moe_token_ok(norm, gate: torch.nn.Linear, experts) -> bool:
    """Whether :class:`MoETokenStep` (or, with ``norm=None``, :func:`moe_token`) takes these
    modules: an RMSNorm (:func:`norm_ok`), a contiguous float32 gate on the CPU, SwiGLU experts
    (:func:`swiglu_ok`) that output d_model."""
    from moekit.layers.experts import SwiGLUExperts

    if not (type(experts) is SwiGLUExperts and (norm is None or norm_ok(norm)) and swiglu_ok(experts)):
        return False
    gate_tensors = [gate.weight] if gate.bias is None else [gate.weight, gate.bias]
    return (
        all(t.dtype == torch.float32 and t.device.type == "cpu" for t in gate_tensors)
        and gate.weight.is_contiguous()
        and experts.d_out == experts.d_model
    )


class AttentionStep:
    """One token's self-attention (batch 1) added into the residual in place, bound to a
    layer's weights and KV cache: ``step(x, cos, sin, pos, start)`` computes q/k/v from
    ``norm(x)`` (``w_qkv [(H + 2 Hkv) hd, d]``), rotates q and k by RoPE (``cos``/``sin``
    ``[hd]`` of this position), writes k and v at row ``pos`` of the caches (``[Hkv, rows,
    hd]``), attends over rows ``[start, pos]`` (query head h reads kv head ``h // (H / Hkv)``,
    scale ``1/sqrt(hd)``) and adds ``w_o @ y + b_o`` into ``x [d]``. ``heads`` is
    ``(H, Hkv, hd)``; the tensors pass :func:`attention_ok` and are kept alive."""

    def __init__(self, lib: ctypes.CDLL, norm, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None,
                 heads: tuple[int, int, int], k_cache: torch.Tensor, v_cache: torch.Tensor, w_o: torch.Tensor,
                 b_o: torch.Tensor | None):
        self._keep = (norm.weight, w_qkv, b_qkv, k_cache, v_cache, w_o, b_o)
        self._fn = lib.moekit_attention_token
        self._qkv = (norm.weight.data_ptr(), norm.eps, w_qkv.data_ptr(), _ptr(b_qkv), *heads)
        self._cache = (k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0))
        self._out = (w_o.data_ptr(), w_o.stride(0), _ptr(b_o))

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int, start: int) -> None:
        rc = self._fn(x.data_ptr(), x.shape[0], *self._qkv, cos.data_ptr(), sin.data_ptr(), *self._cache, pos, start,
                      *self._out, torch.get_num_threads())
        if rc != 0:
            raise MemoryError("moekit_attention_token could not allocate its buffers")


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


def tensors_ok(*tensors: torch.Tensor) -> bool:
    """Whether the kernels that take tensors of any shape (:func:`gather_rows`,
    :func:`combine_backward`, :func:`topk_softmax`, :func:`moe_token`, :func:`swiglu_segments`,
    :func:`silu_mul`) take these: float32 on the CPU, outside ``torch.compile`` (which cannot
    trace a foreign call)."""
    return (all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and not torch.compiler.is_compiling())


def gather_rows(lib: ctypes.CDLL, src: torch.Tensor, idx: torch.Tensor, k: int,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """``out[i] = sum over j < k of weight[i k + j] * src[idx[i k + j]]``, skipping ``idx < 0``
    (``weight`` None: 1; a row with no source is 0). ``src [S, d]``, ``idx`` int64 ``[n k]``,
    ``weight`` float32 ``[n k]``. Returns ``[n, d]``."""
    src, idx = src.contiguous(), idx.contiguous()
    weight = None if weight is None else weight.contiguous()
    n, d = idx.numel() // k, src.shape[1]
    out = src.new_empty(n, d)
    lib.moekit_gather_rows(src.data_ptr(), d, idx.data_ptr(), _ptr(weight), k, n, out.data_ptr(),
                           torch.get_num_threads())
    return out


def combine_backward(lib: ctypes.CDLL, dout: torch.Tensor, y: torch.Tensor, token_idx: torch.Tensor,
                     weight: torch.Tensor, need_dy: bool, need_dw: bool
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``out[token_idx[i]] += weight[i] * y[i]``: ``dy [n, d]`` and ``dw [n]``
    (each ``None`` unless needed). ``dout [T, d]``, ``y [n, d]``, ``token_idx`` int64 ``[n]``,
    ``weight`` float32 ``[n]``."""
    dout, y, token_idx, weight = dout.contiguous(), y.contiguous(), token_idx.contiguous(), weight.contiguous()
    n, d = y.shape
    dy = y.new_empty(n, d) if need_dy else None
    dw = y.new_empty(n) if need_dw else None
    lib.moekit_combine_backward(dout.data_ptr(), y.data_ptr(), d, token_idx.data_ptr(), weight.data_ptr(), n,
                                _ptr(dy), _ptr(dw), torch.get_num_threads())
    return dy, dw


def topk_softmax(lib: ctypes.CDLL, logits: torch.Tensor, k: int, renormalize: bool, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The softmax top-k router on float32 ``logits [T, E]``: ``probs [T, E]``, ``weights
    [T, k]`` (the k largest probabilities, ties to the lower index, divided by their sum where
    ``renormalize``, times ``scale``) and ``indices`` int64 ``[T, k]``."""
    logits = logits.contiguous()
    T, E = logits.shape
    probs, weights = logits.new_empty(T, E), logits.new_empty(T, k)
    indices = torch.empty(T, k, dtype=torch.long)
    lib.moekit_topk_softmax(logits.data_ptr(), T, E, k, int(renormalize), scale, probs.data_ptr(),
                            indices.data_ptr(), weights.data_ptr(), torch.get_num_threads())
    return probs, weights, indices


def topk_softmax_backward(lib: ctypes.CDLL, probs: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                          dprobs: torch.Tensor | None, dweights: torch.Tensor | None, renormalize: bool,
                          scale: float) -> torch.Tensor:
    """The gradient of :func:`topk_softmax`'s outputs back to the logits, ``[T, E]``."""
    dprobs = None if dprobs is None else dprobs.contiguous()
    dweights = None if dweights is None else dweights.contiguous()
    T, E = probs.shape
    dlogits = probs.new_empty(T, E)
    lib.moekit_topk_softmax_backward(probs.data_ptr(), indices.data_ptr(), weights.data_ptr(), _ptr(dprobs),
                                     _ptr(dweights), T, E, indices.shape[1], int(renormalize), scale,
                                     dlogits.data_ptr(), torch.get_num_threads())
    return dlogits
