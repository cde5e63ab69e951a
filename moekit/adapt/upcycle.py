"""Sparse upcycling: a dense model becomes an MoE that starts from its weights.

- **Copy upcycling** (Komatsuzaki et al. 2022; ``granularity=1``): every expert is a copy of
  the layer's dense FFN. With renormalised top-k weights (they sum to 1) the MoE layer
  computes ``sum_i w_i FFN(x) = FFN(x)``: the upcycled model is the dense model at init,
  whatever the router.
- **Fine-grained upcycling** (the Qwen1.5-MoE split; NVIDIA's virtual groups, arXiv
  2410.07524; ``granularity=G``): the FFN's hidden units are cut into ``G`` slices and
  ``FFN(x) = sum_s FFN_s(x)``. ``shared_experts=S`` of the slices become always-on shared
  experts; the other ``G' = G - S`` slices are each replicated ``R = num_experts / G'`` times.
  The router's rows are equal within a replica ("virtual group"), so a ``top_k`` that is a
  multiple of ``G'`` picks whole replicas: replica ``c``'s slices share a renormalised weight
  ``w_c`` with ``sum_c G' w_c = 1``, and with the down projections scaled by ``G'`` the layer
  computes ``sum_c w_c G' sum_s FFN_s(x) = FFN(x)`` exactly. When ``top_k`` is not a multiple
  of ``G'`` a token sees only some slices: the scaling is the same (right in expectation)
  but the function changes (:func:`function_preserving` says which).
- ``noise`` adds Gaussian noise (``noise`` times each tensor's standard deviation) to every
  routed expert so that replicas can diverge; it changes the function by design.

The shared experts get a sigmoid gate initialised at zero (``sigmoid(0) = 1/2``, their
down projection doubled), so an upcycled model with shared experts saves as Qwen2-MoE.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from moekit.config import ModelConfig
from moekit.interop.hf import build_from_state
from moekit.models import Transformer

ROUTER_INITS = ("random", "hidden")


def upcycled_config(config: ModelConfig, num_experts: int = 8, top_k: int = 2, granularity: int = 1,
                    shared_experts: int = 0) -> ModelConfig:
    """The MoE config that :func:`upcycle` makes of the dense ``config`` (checked: a ValueError
    names what does not fit and what is allowed)."""
    if not config.dense:
        raise ValueError("upcycling starts from a dense model (dense=True); this model already has MoE layers")
    width = config.ffn_width
    for name, value in (("num_experts", num_experts), ("top_k", top_k), ("granularity", granularity)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(shared_experts, int) or not 0 <= shared_experts < granularity:
        raise ValueError(f"shared_experts must be in 0..granularity-1 (0..{granularity - 1}): the shared experts "
                         f"are slices of the dense FFN and at least one slice must stay routed; got {shared_experts!r}")
    if width % granularity:
        raise ValueError(f"granularity {granularity} does not divide the FFN width {width}; use one of "
                         f"{[g for g in range(1, min(width, 64) + 1) if width % g == 0]}")
    routed = granularity - shared_experts
    if num_experts % routed:
        raise ValueError(f"num_experts ({num_experts}) must be a multiple of the routed slices per FFN "
                         f"(granularity - shared_experts = {routed}): each slice is replicated alike")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..num_experts (1..{num_experts}), got {top_k}")
    slice_width = width // granularity
    moe = replace(config.moe, d_ff=slice_width, num_experts=num_experts, top_k=top_k, router="topk",
                  renormalize=True, num_shared_experts=shared_experts,
                  d_ff_shared=slice_width if shared_experts else None, shared_expert_gate=bool(shared_experts),
                  capacity_factor=None, routed_scaling_factor=1.0)
    return replace(config, dense=False, dense_d_ff=width, moe=moe)


def function_preserving(config: ModelConfig) -> bool:
    """Whether :func:`upcycle` (without noise) starts exactly at the dense model's function
    for this upcycled ``config``: ``top_k`` picks whole replicas of the routed slices."""
    routed = config.ffn_width // config.moe.d_ff - config.moe.num_shared_experts
    return config.moe.top_k % routed == 0


@torch.no_grad()
def upcycle(model: Transformer, num_experts: int = 8, top_k: int = 2, granularity: int = 1,
            shared_experts: int = 0, router_init: str = "random", noise: float = 0.0,
            calibration: torch.Tensor | None = None, seed: int = 0) -> Transformer:
    """An MoE :class:`Transformer` upcycled from the dense ``model`` (left unchanged).

    Args:
        model: a dense model (``config.dense``), e.g. from :func:`moekit.interop.load_model`.
        num_experts, top_k: the routed experts and how many a token uses.
        granularity: slices per dense FFN (1: every expert is the whole FFN).
        shared_experts: slices that become always-on shared experts.
        router_init: ``"random"`` (normal, the model's ``init_std``) or ``"hidden"``: the
            rows are k-means centroids of each layer's FFN inputs on ``calibration``
            (centred, unit length), one per replica.
        noise: relative Gaussian noise on the routed experts (0 keeps exact copies).
        calibration: ``[B, S]`` token ids, needed for ``router_init="hidden"``.
        seed: seeds the router and the noise.

    Returns the new model in eval mode, on the source model's device.
    """
    if router_init not in ROUTER_INITS:
        raise ValueError(f"router_init must be one of {list(ROUTER_INITS)}, got {router_init!r}")
    if not (isinstance(noise, (int, float)) and noise >= 0 and noise == noise):
        raise ValueError(f"noise must be a number >= 0, got {noise!r}")
    config = upcycled_config(model.config, num_experts, top_k, granularity, shared_experts)
    if router_init == "hidden":
        if calibration is None or calibration.numel() == 0:
            raise ValueError("router_init='hidden' needs calibration tokens (a [batch, seq] tensor of ids)")
        from moekit.analysis.collect import ffn_inputs

        features = ffn_inputs(model, calibration)
    gen = torch.Generator().manual_seed(seed)
    routed = granularity - shared_experts
    replicas = num_experts // routed
    src = {k: v.detach() for k, v in model.state_dict().items()}
    state = {}
    for name, t in src.items():
        if ".ffn." not in name or not config.is_moe_layer(int(name.split(".")[1])):
            state[name] = t.clone()
    for i in range(config.n_layers):
        if not config.is_moe_layer(i):
            continue
        b = f"blocks.{i}.ffn."
        w1, w3, w2 = src[b + "w1.weight"], src[b + "w3.weight"], src[b + "w2.weight"]  # [f, d], [f, d], [d, f]
        f = config.moe.d_ff
        slices = [(w1[s * f:(s + 1) * f].t(), w3[s * f:(s + 1) * f].t(), w2[:, s * f:(s + 1) * f].t())
                  for s in range(granularity)]  # each ([d, f], [d, f], [f, d]): x @ w layout
        shared, routed_slices = slices[:shared_experts], slices[shared_experts:]
        order = [routed_slices[e % routed] for e in range(num_experts)]  # expert e = replica e // routed
        for j, name in enumerate(("w1", "w3", "w2")):
            w = torch.stack([s[j] for s in order]).clone()  # [E, in, out]
            if name == "w2":
                w *= routed  # each slice's replicas share 1/routed of the weight: see the module doc
            if noise:
                w += noise * w.std() * torch.randn(w.shape, generator=gen).to(w)
            state[f"{b}experts.{name}"] = w.contiguous()
        if shared:
            state[b + "shared_experts.ffn.w1.weight"] = torch.cat([s[0].t() for s in shared]).clone()
            state[b + "shared_experts.ffn.w3.weight"] = torch.cat([s[1].t() for s in shared]).clone()
            state[b + "shared_experts.ffn.w2.weight"] = 2 * torch.cat([s[2].t() for s in shared], dim=1)
            state[b + "shared_experts.gate.weight"] = w1.new_zeros(1, config.d_model)  # sigmoid(0) = 1/2
        rows = (torch.randn(replicas, config.d_model, generator=gen) * config.init_std if router_init == "random"
                else centroids(features[i], replicas, gen))
        state[b + "router.gate.weight"] = rows.repeat_interleave(routed, dim=0).to(w1)  # [E, d]: a row per replica
    return build_from_state(config, state, next(model.parameters()).device)


def centroids(x: torch.Tensor, k: int, gen: torch.Generator, iters: int = 10) -> torch.Tensor:
    """``k`` unit-length router rows from the points ``x`` ``[N, d]``: k-means on the centred
    points (farthest-point seeding from a seeded first point, then Lloyd steps); one row, the
    mean direction, when ``k == 1``."""
    x = x.float().cpu()
    if k == 1:
        mean = x.mean(0, keepdim=True)
        return mean / mean.norm().clamp_min(1e-12)
    if x.shape[0] < k:
        raise ValueError(f"the calibration text gives {x.shape[0]} tokens, fewer than the {k} router rows to fit")
    centred = x - x.mean(0)
    first = int(torch.randint(x.shape[0], (1,), generator=gen))
    centres = centred[first:first + 1]
    for _ in range(k - 1):  # each next seed: the point farthest from those chosen
        far = torch.cdist(centred, centres).min(1).values.argmax()
        centres = torch.cat([centres, centred[far:far + 1]])
    centres = centres.clone()
    for _ in range(iters):
        assign = torch.cdist(centred, centres).argmin(1)
        for c in range(k):
            members = centred[assign == c]
            if len(members):
                centres[c] = members.mean(0)
    return centres / centres.norm(dim=1, keepdim=True).clamp_min(1e-12)


def upcycle_to(src: str | Path, dst: str | Path, num_experts: int = 8, top_k: int = 2, granularity: int = 1,
               shared_experts: int = 0, router_init: str = "random", noise: float = 0.0,
               calibration: str | Path | None = None, seed: int = 0, overwrite: bool = False) -> str:
    """``moekit upcycle``: the dense model at ``src`` (a moekit run or a Hugging Face
    directory of a dense family) upcycled into a moekit run at ``dst``. Everything is checked
    before ``dst`` is touched. Returns a one-line description."""
    from moekit.checkpoint import check_destination
    from moekit.interop import load_model
    from moekit.interop.hf import save_run

    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"model path {src} does not exist")
    dst = check_destination(dst, (src,), overwrite)
    loaded = load_model(src)
    upcycled_config(loaded.model.config, num_experts, top_k, granularity, shared_experts)  # fail before reading text
    if router_init == "hidden" and calibration is None:
        raise ValueError("--router-init hidden needs --calibration FILE (text the router rows are fitted to)")
    tokens = None
    if calibration is not None:
        from moekit.data.corpus import calibration_tokens

        tokens = calibration_tokens(calibration, loaded.tokenizer, min(256, loaded.model.config.max_seq_len))
    model = upcycle(loaded.model, num_experts, top_k, granularity, shared_experts, router_init, noise, tokens, seed)
    info = {"upcycled_from": str(src), "num_experts": num_experts, "top_k": top_k, "granularity": granularity,
            "shared_experts": shared_experts, "router_init": router_init, "noise": noise}
    save_run(dst, model, loaded.tokenizer, info)
    exact = "starts as the dense model's function" if function_preserving(model.config) and not noise else \
        "does not start exactly at the dense function (noise, or top_k not a multiple of the routed slices)"
    counts = model.num_params()
    return (f"wrote an upcycled MoE ({num_experts} experts, top-{top_k}, {counts.total / 1e6:.2f}M parameters, "
            f"{counts.active / 1e6:.2f}M active) to {dst}; it {exact}")
