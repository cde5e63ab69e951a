"""Every kernel wrapper refuses, with a ValueError naming the argument, what would make C
read or write outside a tensor: a wrong dtype, shape, device or layout, index values out of
range, row counts that do not fit. Nothing reaches C unchecked."""

import pytest
import torch

from moekit import kernels
from moekit.ops.lowp import get_format

lib = kernels.load()
pytestmark = pytest.mark.skipif(lib is None, reason=f"kernels not built here: {kernels.status()}")

E, D, FF, N, T, K = 3, 8, 12, 5, 4, 2


def experts():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(E, D, FF, generator=g), torch.randn(E, D, FF, generator=g), torch.randn(E, FF, D, generator=g))


def calls():
    """name -> (function, keyword arguments that it accepts)."""
    w1, w3, w2 = experts()
    counts = torch.tensor([2, 0, 3])
    norm_w, gate_w = torch.ones(D), torch.randn(E, D)
    k_cache, v_cache = torch.zeros(1, 6, 4), torch.zeros(1, 6, 4)
    int8 = get_format("int8")
    q8, q8_down = int8.quantize(torch.randn(E, FF, 64), 32), int8.quantize(torch.randn(E, 64, FF), 32)
    q8_qkv, q8_o = int8.quantize(torch.randn(96, 64), 32), int8.quantize(torch.randn(64, 32), 32)

    def lw(name, parts, lead=()):
        return kernels.lowp_weights(name, "int8", parts["q"], parts["scale"], 32, lead)

    table = {
        "rows": (kernels.rows, dict(lib=lib, w=torch.randn(N, D), x=torch.randn(D), out=torch.empty(N),
                                    bias=torch.randn(N), add=torch.randn(N), norm_weight=norm_w, eps=1e-5)),
        "swiglu_add": (kernels.swiglu_add, dict(lib=lib, x=torch.randn(D), w1=w1[0], w3=w3[0], w2=w2[0],
                                                out=torch.zeros(D), weight=0.5)),
        "swiglu_segments": (kernels.swiglu_segments, dict(lib=lib, x=torch.randn(N, D), tokens_per_expert=counts,
                                                          w1=w1, w3=w3, w2=w2)),
        "swiglu_segments_backward": (kernels.swiglu_segments_backward, dict(
            lib=lib, x=torch.randn(N, D), tokens_per_expert=counts, w1=w1, w3=w3, w2=w2, gate=torch.randn(N, FF),
            up=torch.randn(N, FF), dy=torch.randn(N, D))),
        "silu_mul": (kernels.silu_mul, dict(lib=lib, g=torch.randn(N, FF), u=torch.randn(N, FF))),
        "silu_mul_backward": (kernels.silu_mul_backward, dict(lib=lib, dh=torch.randn(N, FF), g=torch.randn(N, FF),
                                                              u=torch.randn(N, FF))),
        "moe_token": (kernels.moe_token, dict(
            lib=lib, x=torch.randn(1, D), out=torch.zeros(D), gate_weight=gate_w, gate_bias=None, top_k=K,
            renormalize=True, scale=1.0, w1=w1, w3=w3, w2=w2, chosen=torch.zeros(K, dtype=torch.long),
            weights=torch.zeros(K), logits=torch.zeros(E), probs=torch.zeros(E),
            counts=torch.zeros(E, dtype=torch.long))),
        "MoETokenStep": (kernels.MoETokenStep, dict(lib=lib, norm_weight=norm_w, eps=1e-5, gate_weight=gate_w,
                                                    gate_bias=None, top_k=K, renormalize=True, scale=1.0, w1=w1,
                                                    w3=w3, w2=w2)),
        "AttentionStep": (kernels.AttentionStep, dict(lib=lib, norm_weight=norm_w, eps=1e-5,
                                                      w_qkv=torch.randn(3 * 4, D), b_qkv=None, heads=(1, 1, 4),
                                                      k_cache=k_cache, v_cache=v_cache, w_o=torch.randn(D, 4),
                                                      b_o=None)),
        "rows_lowp": (kernels.rows_lowp, dict(lib=lib, fmt="int8", w=q8["q"][0], scale=q8["scale"][0], group_size=32,
                                              x=torch.randn(2, 64), out=torch.empty(2, FF), norm_weight=torch.ones(64),
                                              eps=1e-5)),
        "LowpMoETokenStep": (kernels.LowpMoETokenStep, dict(
            lib=lib, norm_weight=torch.ones(64), eps=1e-5, gate_weight=torch.randn(E, 64), gate_bias=None, top_k=K,
            renormalize=True, scale=1.0, w1=lw("w1", q8, (E,)), w3=lw("w3", q8, (E,)), w2=lw("w2", q8_down, (E,)))),
        "LowpAttentionStep": (kernels.LowpAttentionStep, dict(
            lib=lib, norm_weight=torch.ones(64), eps=1e-5, w_qkv=lw("w_qkv", q8_qkv), b_qkv=None, heads=(1, 1, 32),
            k_cache=torch.zeros(1, 6, 32), v_cache=torch.zeros(1, 6, 32), w_o=lw("w_o", q8_o), b_o=None)),
        "gather_rows": (kernels.gather_rows, dict(lib=lib, src=torch.randn(T, D), idx=torch.tensor([0, 3, -1, 1]),
                                                  k=2, weight=torch.rand(4))),
        "combine_backward": (kernels.combine_backward, dict(
            lib=lib, dout=torch.randn(T, D), y=torch.randn(N, D), token_idx=torch.tensor([0, 1, 1, 3, 2]),
            weight=torch.rand(N), need_dy=True, need_dw=True)),
        "sort_slots": (kernels.sort_slots, dict(lib=lib, expert=torch.tensor([0, 2, 1, 3]), num_experts=3, k=2,
                                                multiple=4)),
        "topk_softmax": (kernels.topk_softmax, dict(lib=lib, logits=torch.randn(T, E), k=K, renormalize=True,
                                                    scale=1.0)),
        "topk_softmax_backward": (kernels.topk_softmax_backward, dict(
            lib=lib, probs=torch.rand(T, E), indices=torch.tensor([[0, 1]] * T), weights=torch.rand(T, K),
            dprobs=torch.randn(T, E), dweights=torch.randn(T, K), renormalize=True, scale=1.0, dlse=torch.randn(T),
            dpsum=torch.randn(E))),
    }
    if kernels.blocks_bf16():  # the bfloat16 blocked experts (AVX-512 BF16 builds)
        bf = [w.bfloat16() for w in (w1, w3, w2)]
        table["swiglu_blocks_bf16"] = (kernels.swiglu_segments, dict(
            lib=lib, x=torch.randn(N, D).bfloat16(), tokens_per_expert=counts, w1=bf[0], w3=bf[1], w2=bf[2],
            save=(torch.empty(N, FF, dtype=torch.bfloat16), torch.empty(N, FF, dtype=torch.bfloat16)), blocked=True))
        table["swiglu_blocks_bf16_backward"] = (kernels.swiglu_segments_backward, dict(
            lib=lib, x=torch.randn(N, D).bfloat16(), tokens_per_expert=counts, w1=bf[0], w3=bf[1], w2=bf[2],
            gate=torch.randn(N, FF).bfloat16(), up=torch.randn(N, FF).bfloat16(), dy=torch.randn(N, D).bfloat16(),
            blocked=True))
    return table


NAMES = list(calls())


def tensor_args(name):
    return [k for k, v in calls()[name][1].items() if isinstance(v, torch.Tensor)]


CASES = [(name, arg) for name in NAMES for arg in tensor_args(name)]


@pytest.mark.parametrize("name", NAMES)
def test_the_valid_arguments_run(name):
    fn, kw = calls()[name]
    fn(**kw)


@pytest.mark.parametrize("name, arg", CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_a_wrong_dtype_is_refused(name, arg):
    fn, kw = calls()[name]
    wrong = torch.int32 if kw[arg].dtype == torch.int64 else torch.float64
    kw[arg] = kw[arg].to(wrong)
    with pytest.raises(ValueError, match=arg.split("_")[0] if arg != "tokens_per_expert" else "tokens_per_expert"):
        fn(**kw)


@pytest.mark.parametrize("name, arg", CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_a_wrong_shape_is_refused(name, arg):
    fn, kw = calls()[name]
    t = kw[arg]
    kw[arg] = torch.cat([t.reshape(-1), t.reshape(-1)[:1]])  # one value too many, flattened
    with pytest.raises(ValueError):
        fn(**kw)


@pytest.mark.parametrize("name, arg", CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_a_tensor_off_the_cpu_is_refused(name, arg):
    fn, kw = calls()[name]
    kw[arg] = torch.empty_like(kw[arg], device="meta")
    with pytest.raises(ValueError, match="CPU"):
        fn(**kw)


def test_int32_tokens_per_expert_is_refused():
    for name in ("swiglu_segments", "swiglu_segments_backward"):
        fn, kw = calls()[name]
        kw["tokens_per_expert"] = kw["tokens_per_expert"].int()
        with pytest.raises(ValueError, match="tokens_per_expert must be torch.int64"):
            fn(**kw)


@pytest.mark.parametrize("counts", [[2, 0, 4], [-1, 3, 3]], ids=["more rows than x has", "negative"])
def test_row_counts_that_do_not_fit_are_refused(counts):
    fn, kw = calls()["swiglu_segments"]
    kw["tokens_per_expert"] = torch.tensor(counts)
    with pytest.raises(ValueError, match="tokens_per_expert must be counts >= 0 summing to at most 5"):
        fn(**kw)


@pytest.mark.parametrize("name, arg, bad", [("gather_rows", "idx", torch.tensor([0, 4, -1, 1])),
                                            ("gather_rows", "idx", torch.tensor([0, -2, -1, 1])),
                                            ("combine_backward", "token_idx", torch.tensor([0, 1, 1, 4, 2])),
                                            ("combine_backward", "token_idx", torch.tensor([0, 1, -2, 3, 2])),
                                            ("sort_slots", "expert", torch.tensor([0, 4, 1, 1])),
                                            ("topk_softmax_backward", "indices", torch.tensor([[0, 3]] * T))])
def test_index_values_out_of_range_are_refused(name, arg, bad):
    fn, kw = calls()[name]
    kw[arg] = bad
    with pytest.raises(ValueError, match=f"{arg} must hold values in"):
        fn(**kw)


def test_strided_rows_and_mismatched_gate_up_layouts_are_refused():
    fn, kw = calls()["swiglu_segments"]
    kw["w3"] = torch.randn(E, D, 2 * FF)[..., :FF]  # unit stride in a row, but another row stride than w1
    with pytest.raises(ValueError, match="w1 and w3 must have the same shape and strides"):
        fn(**kw)
    fn, kw = calls()["rows"]
    kw["w"] = torch.randn(D, N).t()  # column-major: no unit stride in a row
    with pytest.raises(ValueError, match="w must have unit stride"):
        fn(**kw)


def test_bound_steps_check_each_call_and_keep_their_weights_alive():
    fn, kw = calls()["MoETokenStep"]
    step = fn(**kw)
    with pytest.raises(ValueError, match="x must hold 8 values"):
        step(torch.zeros(D + 1))
    x = torch.randn(D)
    want = x.clone()
    step(want)
    w1 = kw["w1"]
    w1.data = torch.zeros_like(w1)  # the caller replaces the storage: the step still reads its own copy
    got = x.clone()
    step(got)
    assert torch.equal(got, want)
    fn, kw = calls()["AttentionStep"]
    step = fn(**kw)
    with pytest.raises(ValueError, match="pos and start"):
        step(torch.zeros(D), torch.ones(4), torch.zeros(4), 6, 0)  # the cache holds 6 rows


def test_low_precision_weights_are_checked_when_bound():
    """The formats' codes and scales, the step's shapes and the rows a call takes."""
    int8, int4 = get_format("int8"), get_format("int4")
    q8, q4 = int8.quantize(torch.randn(E, FF, 64), 32), int4.quantize(torch.randn(E, FF, 64), 32)
    with pytest.raises(ValueError, match="unknown|no kernel for weight format 'int5'"):
        kernels.lowp_weights("w1", "int5", q8["q"], q8["scale"], 32, (E,))
    with pytest.raises(ValueError, match=r"w1: int4 codes must be a contiguous \[3, N, K/2\]"):
        kernels.lowp_weights("w1", "int4", q8["q"], q8["scale"], 32, (E,))
    with pytest.raises(ValueError, match="group_size 48"):
        kernels.lowp_weights("w1", "int4", q4["q"], q4["scale"], 48, (E,))
    with pytest.raises(ValueError, match="w1 scale must have shape"):
        kernels.lowp_weights("w1", "int8", q8["q"], q8["scale"][:, :-1], 32, (E,))
    w = kernels.lowp_weights("w", "int8", q8["q"], q8["scale"], 32, (E,))
    w4 = kernels.lowp_weights("w", "int4", q4["q"], q4["scale"], 32, (E,))
    with pytest.raises(ValueError, match="share one format"):
        kernels.LowpMoETokenStep(lib, None, 0.0, torch.randn(E, 64), None, K, True, 1.0, w, w4, w)
    with pytest.raises(ValueError, match="w2 must hold rows"):
        kernels.LowpMoETokenStep(lib, None, 0.0, torch.randn(E, 64), None, K, True, 1.0, w, w, w)
    fn, kw = calls()["LowpMoETokenStep"]
    step = fn(**kw)
    with pytest.raises(ValueError, match="1 <= B <= 64"):
        step(torch.randn(65, 64))
    with pytest.raises(ValueError, match=r"x must be a contiguous \[B, 64\]"):
        step(torch.randn(64, 2).t())
    fn, kw = calls()["rows_lowp"]
    kw["x"] = torch.randn(65, 64)
    with pytest.raises(ValueError, match="rows_lowp takes 1 to 64"):
        fn(**kw)


def test_top_k_beyond_the_experts_is_refused():
    fn, kw = calls()["topk_softmax"]
    kw["k"] = E + 1
    with pytest.raises(ValueError, match="k must be an int in 1..3"):
        fn(**kw)
