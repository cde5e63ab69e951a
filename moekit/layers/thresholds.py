"""Every threshold that picks a fast path, in one table.

Each module decides its path in one function (``SwiGLUExperts.choose_path``,
``MoE.choose_path``, :func:`moekit.layers.dispatch.choose_path`, ``Decoder``'s plan) from
these rows; each row says what it switches and which benchmark measured it (the figures are
in ``docs/benchmarks.md``). A new fast path is a new row, not a new branch somewhere else.
"""

from __future__ import annotations

from typing import NamedTuple


class Threshold(NamedTuple):
    value: int
    measured_by: str
    switches: str


THRESHOLDS: dict[str, Threshold] = {
    # CPU, float32, SwiGLU experts; counts are rows per expert on average
    "kernel_max_rows": Threshold(
        8, "benchmarks/moe_layer.py",
        "up to here moekit.kernels.swiglu_segments (each weight read once per pass) runs the experts, "
        "in inference and in training, where its AVX-512 loops are built (without them the blocked "
        "kernel wins at every row count)"),
    "blocks_max_rows": Threshold(
        1 << 40, "benchmarks/moe_layer.py",
        "from kernel_max_rows up to here moekit.kernels.swiglu_segments(blocked=True) runs the experts, "
        "in inference and in training: each expert's products on one thread, the experts shared among threads "
        "(builds without AVX-512: the blocked kernel beats the BLAS paths at every row count measured)"),
    "blocks_max_rows_avx512": Threshold(
        512, "benchmarks/moe_layer.py",
        "blocks_max_rows where the kernels' AVX-512 loops are built: above it BLAS's AVX-512 products on "
        "long segments win on a quiet machine; up to it the blocked kernel, also where BLAS is a little faster "
        "quiet, because BLAS's many parallel regions collapse beside busy processes (docs/throughput.md)"),
    "blocks_bf16_inference_max_d_ff": Threshold(
        1024, "benchmarks/moe_layer.py --bf16-shapes",
        "inference on bfloat16 expert weights takes moekit's bfloat16 blocked kernel up to this d_ff (above it, "
        "where its float32 blocks of rows outgrow L2, oneDNN's products were faster); training in bfloat16 autocast "
        "takes it at every width measured, as inference on float32 weights under autocast (the other "
        "path casts them every call)"),
    "loop_inference_min_rows": Threshold(
        32, "benchmarks/moe_layer.py",
        "inference from here: the segment loop (buffers reused, one segment's activation in cache); "
        "below it grouped_mm's C++ loop beats the Python loop's per-segment overhead"),
    "segments_training_min_rows": Threshold(
        256, "benchmarks/moe_layer.py",
        "training from here: the segment loop with its hand-written backward (ops.swiglu_segments); "
        "below it grouped_mm with the one-pass activation (ops.swiglu_grouped)"),
    "lowp_segment_rows": Threshold(
        64, "benchmarks/moe_vs_dense.py --dtype bfloat16",
        "bfloat16/float16 experts on the CPU run on segments padded with zero rows to a multiple of this, "
        "so that oneDNN reuses the kernel it built for a shape instead of building one per segment length"),
    # low-precision experts (moekit.layers.quantized), rows per product
    "lowp_kernel_max_rows": Threshold(
        16, "benchmarks/quantize.py",
        "bf16: up to here moekit.kernels.rows_lowp (weights widened in registers, read once for all rows); "
        "from here bfloat16 matrix products (faster); int8 and int4 take the kernel at every row count, "
        "64 rows a call (faster than dequantise-then-matmul)"),
    # the dispatch, inference: (token, slot) pairs in one call
    "unsorted_max_slots": Threshold(
        4, "benchmarks/generate.py",
        "up to here inference runs each chosen expert on its token's row without sorting"),
}


def threshold(name: str) -> int:
    """The value of row ``name`` of :data:`THRESHOLDS`."""
    return THRESHOLDS[name].value
