"""The C functions' signatures, for ctypes: every pointer a ``c_void_p``, every size a
``c_long``. The wrappers in this package check what they pass against these."""

from __future__ import annotations

import ctypes

P, L, F, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int

SIGNATURES: dict[str, tuple[list, type | None]] = {
    "moekit_rows": ([P, L, L, L, P, P, F, P, F, P, P, I], I),
    "moekit_swiglu_add": ([P, L, P, P, L, L, P, L, L, P, F, I], I),
    "moekit_moe_token": ([P, P, L, P, F, P, P, L, I, I, F, P, P, L, L, L, P, L, L, P, P, P, P, P, I], I),
    "moekit_attention_token": ([P, L, P, F, P, P, L, L, L, P, P, P, P, L, L, L, P, L, P, I], I),
    "moekit_swiglu_segments": ([P, L, P, L, P, P, L, L, L, P, L, L, L, P, P, P, I], I),
    "moekit_swiglu_segments_backward": ([P, L, P, L, P, P, L, L, L, P, L, L, L, P, P, P, P, P, P, P, I], I),
    "moekit_swiglu_blocks": ([P, L, P, L, P, P, L, L, L, P, L, L, L, P, P, P, I], I),
    "moekit_swiglu_blocks_backward": ([P, L, P, L, P, P, L, L, L, P, L, L, L, P, P, P, P, P, P, P, I], I),
    "moekit_swiglu_blocks_bf16": ([P, L, P, L, P, P, L, L, L, P, L, L, L, I, P, P, P, I], I),
    "moekit_swiglu_blocks_bf16_backward": ([P, L, P, L, P, P, L, L, L, P, L, L, L, I, P, P, P, P, P, P, P, I], I),
    "moekit_blocks_bf16_built": ([], I),
    "moekit_silu_mul": ([P, P, P, L, I], None),
    "moekit_silu_mul_backward": ([P, P, P, P, P, L, I], None),
    "moekit_silu_mul_bf16": ([P, P, P, L, I], None),
    "moekit_silu_mul_backward_bf16": ([P, P, P, P, P, L, I], None),
    "moekit_topk_softmax": ([P, L, L, I, I, F, P, P, P, P, P, P, I], I),
    "moekit_topk_softmax_backward": ([P, P, P, P, P, P, P, L, L, I, I, F, P, I], I),
    "moekit_gather_rows": ([P, I, L, P, P, L, L, P, I, I], I),
    "moekit_combine_backward": ([P, I, P, I, L, P, P, L, P, P, I], I),
    "moekit_sort_slots": ([P, L, L, L, L, P, P, P, P, P, P, P], L),
    "moekit_rows_lowp": ([I, P, P, L, L, L, P, L, P, F, I, P, F, I], I),
    "moekit_moe_token_lowp": ([I, L, P, L, L, P, F, P, P, L, I, I, F, P, P, P, P, P, P, L, P, P, I], I),
    "moekit_attention_token_lowp": ([I, L, P, L, P, F, P, P, P, L, L, L, P, P, P, P, L, L, L, P, P, P, I], I),
    "moekit_lowp_simd": ([], I),
    "moekit_rows_simd": ([], I),
}


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Set ``argtypes``/``restype`` of every exported function on ``lib``."""
    for name, (args, result) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


def ptr(t) -> int | None:
    """A tensor's data pointer for C, ``None`` (NULL) for an optional one left out."""
    return None if t is None else t.data_ptr()


def check_rc(rc: int | None, name: str) -> None:
    """Raise for a C function's non-zero return code: 2 (the low-precision kernels) an
    argument the wrappers should have refused, any other a failed allocation."""
    if rc == 2:
        raise ValueError(f"{name} refused its arguments (a weight format or shape it does not take)")
    if rc:
        raise MemoryError(f"{name} could not allocate its buffers (return code {rc})")
