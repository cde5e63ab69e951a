"""The MoE layer: router + dispatcher + experts, each built separately and handed in.

``MoE(config)`` builds the built-in parts from a :class:`MoEConfig`;
``MoE.from_experts([...])`` wraps arbitrary modules. ``forward`` returns everything a
caller may need (output, the auxiliary loss already weighted by its coefficients, router
logits, load statistics) in a :class:`MoEOutput`; nothing is kept on the module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moekit import kernels
from moekit.config import MoEConfig
from moekit.layers.dispatch import (
    DispatchPlan,
    dispatch,
    expert_capacity,
    reference_dispatch,
)
from moekit.layers.experts import ModuleExperts, SharedExperts, SwiGLUExperts, build_experts
from moekit.layers.losses import load_balancing_loss, sequence_balance_loss, z_loss
from moekit.layers.router import Router, RouterOutput, TopKRouter, build_router


def skip_light_experts(routing: RouterOutput, below: float) -> RouterOutput:
    """Dynamic skipping: slots whose weight is under ``below`` stop existing (their ``mask``
    is False, so the dispatch computes nothing for them) and each token's remaining weights
    are scaled to the total it had; every token keeps its heaviest slot."""
    w = routing.weights
    keep = (w >= below) | (torch.arange(w.shape[1], device=w.device) == w.argmax(-1, keepdim=True))  # [T, k]
    if routing.mask is not None:
        keep = keep & routing.mask
    kept = torch.where(keep, w, torch.zeros_like(w))
    total = torch.where(routing.mask, w, torch.zeros_like(w)).sum(-1, keepdim=True) if routing.mask is not None \
        else w.sum(-1, keepdim=True)
    weights = kept * (total / kept.sum(-1, keepdim=True).clamp_min(1e-12))
    return RouterOutput(weights, routing.indices, routing.logits, routing.probs, keep)


@dataclass
class MoEStats:
    """Routing statistics of one forward (detached).

    Attributes:
        tokens_per_expert: ``[E]`` int64 slots each expert computed (after capacity).
        dropped_tokens: int64 scalar, slots dropped by the capacity limit.
        router_load: see below.
    """

    tokens_per_expert: torch.Tensor
    dropped_tokens: torch.Tensor
    router_load: torch.Tensor | None = None
    """``[E]`` this process's router choices per expert before capacity, in training, for
    routers that balance by a bias (``sigmoid_bias``): what :func:`update_router_biases` takes."""
    exchange: object | None = None
    """What an expert-parallel dispatch exchanged for this call (``ExchangeStats``), else ``None``."""

    @property
    def max_over_mean(self) -> float:
        """Load of the busiest expert over the mean load: 1.0 is perfect balance."""
        load = self.tokens_per_expert.float()
        mean = load.mean()
        return float(load.max() / mean) if mean > 0 else 0.0


@dataclass
class MoEOutput:
    """What :meth:`MoE.forward` returns.

    Attributes:
        output: same leading shape as the input, last dim ``d_out`` (``d_model`` for the
            built-in experts).
        aux_loss: scalar, the enabled auxiliary losses times their coefficients (0 if none,
            and 0 under ``torch.no_grad`` unless ``compute_aux=True``).
        router_logits: ``[T, E]`` float32.
        stats: :class:`MoEStats`.
        routing: the router's full :class:`RouterOutput` (weights, indices, probs, mask).
        expert_outputs: ``[T, k, d_out]`` each chosen expert's own output (zeros where
            dropped), only when ``return_expert_outputs=True``.
        expert_mask: ``[T, k]`` bool, the slots that were computed (with ``expert_outputs``).
    """

    output: torch.Tensor
    aux_loss: torch.Tensor
    router_logits: torch.Tensor
    stats: MoEStats
    routing: RouterOutput
    expert_outputs: torch.Tensor | None = None
    expert_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts: ``total`` stored, ``active`` used per token."""

    total: int
    active: int


class MoE(nn.Module):
    """Sparse Mixture-of-Experts layer.

    Args:
        config: the layer's :class:`MoEConfig`.
        experts: optional experts module following the experts contract
            (``x_sorted, tokens_per_expert -> y_sorted`` plus ``expert_forward(e, x)``);
            built from ``config.expert`` when omitted.
        router: optional router module; built from ``config.router`` when omitted.
    """

    def __init__(self, config: MoEConfig, experts: nn.Module | None = None, router: Router | None = None):
        super().__init__()
        self.config = config
        self.router = router if router is not None else build_router(config)
        self.experts = experts if experts is not None else build_experts(config)
        self.shared_experts = SharedExperts(config) if config.num_shared_experts > 0 else None
        self.d_out = getattr(self.experts, "d_out", config.d_model)
        # Expert parallelism (moekit.distributed) swaps these in: a dispatch that exchanges
        # tokens between processes, and a reduction making the losses' sums global.
        self.dispatcher = None
        self.reduce = None
        if self.shared_experts is not None and self.d_out != config.d_model:
            raise ValueError(
                f"shared experts output d_model ({config.d_model}) but the routed experts output {self.d_out}"
            )

    @classmethod
    def from_experts(
        cls,
        experts: list[nn.Module],
        d_model: int,
        router: str = "topk",
        top_k: int = 1,
        d_out: int | None = None,
        **config_fields,
    ) -> MoE:
        """An MoE over arbitrary modules, each mapping ``[n, d_model] -> [n, d_out]``.

        Any other :class:`MoEConfig` field may be passed by keyword (``aux_loss_coef``,
        ``capacity_factor``, ``router_jitter``...). ``d_ff`` is irrelevant here and set to
        ``d_model``.
        """
        module = ModuleExperts(experts, d_model, d_out)  # validates the list first
        config_fields.setdefault("d_ff", d_model)
        config = MoEConfig(d_model=d_model, num_experts=len(experts), top_k=top_k, router=router, **config_fields)
        if config.num_shared_experts:
            raise ValueError("num_shared_experts must be 0 for from_experts (add a shared module to your model instead)")
        return cls(config, experts=module)

    def forward(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        return_expert_outputs: bool = False,
        compute_aux: bool | None = None,
    ) -> MoEOutput:
        """Route and compute.

        Args:
            x: ``[..., d_model]``; all leading dims are tokens (``[B, S, d]`` is read as
                B sequences of S tokens by the sequence-wise loss and the hash router).
            token_ids: ``[...]`` ids matching x's leading dims (the ``hash`` router uses them).
            padding_mask: ``[...]`` 1/True for real tokens; padding is left out of the losses.
            return_expert_outputs: also return each chosen expert's own output (for
                :func:`moekit.expert_weighted_loss`).
            compute_aux: compute the auxiliary losses. ``None`` (default): only when
                gradients are enabled, so inference (``torch.no_grad``/``inference_mode``)
                skips them and ``aux_loss`` is 0 there; pass ``True`` to get them anyway.
        """
        cfg = self.config
        if x.shape[-1] != cfg.d_model:
            raise ValueError(f"input's last dim must be d_model={cfg.d_model}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, cfg.d_model)  # [..., d] -> [T, d]
        if cfg.check_inputs:
            self._check(flat, token_ids, padding_mask, lead)
        path = self.choose_path(flat, return_expert_outputs, compute_aux)
        if path == "one_token":
            return self._one_token(flat, lead)
        flat_ids = None if token_ids is None else token_ids.reshape(-1)
        positions = None
        if flat_ids is None and not self.router.learned:
            seq = lead[-1] if len(lead) else 1
            positions = torch.arange(seq, device=x.device).repeat(flat.shape[0] // max(seq, 1))
        routing = self.router(flat, token_ids=flat_ids, positions=positions)
        if cfg.skip_below > 0 and not self.training and self.router.token_choice:
            routing = skip_light_experts(routing, cfg.skip_below)

        capacity = None
        if cfg.capacity_factor is not None and self.router.token_choice:
            capacity = expert_capacity(flat.shape[0], cfg.top_k, cfg.num_experts, cfg.capacity_factor)
        run = {"parallel": self.dispatcher, "reference": reference_dispatch, "dispatch": dispatch}[path]
        out, plan, y_sorted = run(flat, routing, self.experts, capacity)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)

        expert_outputs = expert_mask = None
        if return_expert_outputs:
            if y_sorted is None:  # the small-batch inference path computed none in order
                y_sorted = self.experts(flat.index_select(0, plan.token_idx), plan.tokens_per_expert)
            expert_outputs, expert_mask = self._per_slot_outputs(routing, plan, y_sorted)
        return MoEOutput(
            output=out.reshape(*lead, out.shape[-1]),
            aux_loss=self._aux_loss(routing, lead, padding_mask, compute_aux),
            router_logits=routing.logits,
            stats=MoEStats(plan.tokens_per_expert.detach(), plan.dropped_tokens.detach(), self._router_load(routing),
                           plan.exchange),
            routing=routing,
            expert_outputs=expert_outputs,
            expert_mask=expert_mask,
        )

    def choose_path(self, flat: torch.Tensor, return_expert_outputs: bool = False,
                    compute_aux: bool | None = None) -> str:
        """How :meth:`forward` runs ``flat`` (``[T, d_model]``):

        - ``"parallel"``: the dispatcher expert parallelism installed;
        - ``"reference"``: ``implementation="reference"`` (the slow dense loop);
        - ``"one_token"``: one token in inference through :func:`moekit.kernels.moe_token`
          (router and chosen experts in one call): no autograd or autocast, the ``topk``
          router without jitter noise, SwiGLU experts the kernel reads, no shared experts,
          no capacity, float32 on the CPU, kernels on;
        - ``"dispatch"``: :func:`moekit.layers.dispatch.dispatch` (which picks its own way).
        """
        cfg = self.config
        if self.dispatcher is not None:
            return "parallel"
        if cfg.implementation == "reference":
            return "reference"
        router = self.router
        if (flat.shape[0] == 1 and not (return_expert_outputs or compute_aux) and not torch.is_grad_enabled()
                and type(router) is TopKRouter and type(self.experts) is SwiGLUExperts and not self.experts.adapters
                and cfg.skip_below == 0
                and kernels.for_tensors(flat) is not None and not torch.is_autocast_enabled("cpu")
                and not (router.training and router.jitter > 0) and self.shared_experts is None
                and cfg.capacity_factor is None
                and kernels.moe_token_ok(None, router.gate.weight, router.gate.bias, *self.experts.weights())):
            return "one_token"
        return "dispatch"

    def _one_token(self, flat: torch.Tensor, lead: torch.Size) -> MoEOutput:
        """One token through :func:`moekit.kernels.moe_token`: the router and the chosen experts
        in one call, where torch ops cost more than the experts' weight reads at this size.
        The same outputs as the general path (tested)."""
        E, k, d = self.config.num_experts, self.config.top_k, flat.shape[1]
        # two buffers, each split into views (torch ops cost more here than the arithmetic)
        floats = torch.zeros(1, d + 2 * E + k + 1, dtype=flat.dtype)
        out, logits, probs, weights, aux = floats.split([d, E, E, k, 1], dim=1)
        chosen, counts, dropped = torch.zeros(1, k + E + 1, dtype=torch.long).split([k, E, 1], dim=1)
        router = self.router
        kernels.moe_token(kernels.load(), flat, out, router.gate.weight, router.gate.bias, k, router.renormalize,
                          router.scale, *self.experts.weights(), chosen, weights, logits, probs, counts)
        routing = RouterOutput(weights, chosen, logits, probs)
        return MoEOutput(output=out.reshape(*lead, d), aux_loss=aux.reshape(()), router_logits=logits,
                         stats=MoEStats(counts.reshape(E), dropped.reshape(())), routing=routing)

    def _aux_loss(
        self, routing: RouterOutput, lead: torch.Size, padding_mask: torch.Tensor | None, compute: bool | None
    ) -> torch.Tensor:
        cfg = self.config
        aux = routing.logits.new_zeros(())
        if compute is None:
            compute = torch.is_grad_enabled()
        if not (compute and self.router.learned):
            return aux
        E = cfg.num_experts
        # the router's own losses (its softmax kernel's sums) hold over all tokens, one process
        own = padding_mask is None and routing.mask is None and self.reduce is None
        if cfg.aux_loss_coef > 0:
            balance = routing.balance_loss if own and routing.balance_loss is not None else load_balancing_loss(
                routing.probs, routing.indices, E, padding_mask, routing.mask, self.reduce
            )
            aux = aux + cfg.aux_loss_coef * balance
        if cfg.z_loss_coef > 0:
            z = routing.z_loss if own and routing.z_loss is not None else z_loss(routing.logits, padding_mask,
                                                                                   self.reduce)
            aux = aux + cfg.z_loss_coef * z
        if cfg.seq_aux_loss_coef > 0 and self.router.token_choice:
            S = lead[-1] if len(lead) > 1 else routing.probs.shape[0]
            B = routing.probs.shape[0] // S
            mask = None if padding_mask is None else padding_mask.reshape(B, S)
            aux = aux + cfg.seq_aux_loss_coef * sequence_balance_loss(
                routing.probs.view(B, S, E), routing.indices.view(B, S, -1), E, mask
            )
        return aux

    @staticmethod
    def _per_slot_outputs(
        routing: RouterOutput, plan: DispatchPlan, y_sorted: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each computed slot's unweighted expert output, ``[T, k, d_out]``."""
        T, k = routing.indices.shape
        if plan.rows is not None:  # the experts ran on padded segments: each slot's own row
            y_sorted = y_sorted.index_select(0, plan.rows)
        slots = y_sorted.new_zeros(T * k, y_sorted.shape[-1]).index_copy(0, plan.slot_idx, y_sorted)
        mask = torch.zeros(T * k, dtype=torch.bool, device=y_sorted.device).index_fill_(0, plan.slot_idx, True)
        return slots.view(T, k, -1), mask.view(T, k)  # [T*k, d_out] -> [T, k, d_out]

    def _check(self, flat, token_ids, padding_mask, lead) -> None:
        if not torch.isfinite(flat).all():
            bad = int((~torch.isfinite(flat)).any(-1).sum())
            raise ValueError(f"input x contains NaN or inf in {bad} of {flat.shape[0]} tokens")
        for name, t in (("token_ids", token_ids), ("padding_mask", padding_mask)):
            if t is not None and tuple(t.shape) != tuple(lead):
                raise ValueError(f"{name} must have shape {tuple(lead)} (x's leading dims), got {tuple(t.shape)}")

    def _router_load(self, routing: RouterOutput) -> torch.Tensor | None:
        """The router's choices per expert (this forward, this process), where its bias update
        needs them: training, a router with ``update_bias``."""
        if not (self.router.training and hasattr(self.router, "update_bias")):
            return None
        chosen = routing.indices if routing.mask is None else routing.indices[routing.mask]
        return torch.bincount(chosen.reshape(-1), minlength=self.config.num_experts).detach()

    def update_bias(self, load: torch.Tensor) -> None:
        """Aux-loss-free balancing step for routers that have one (``sigmoid_bias``), from
        ``load`` (``[E]``: :attr:`MoEStats.router_load`, summed over the step's micro-batches)."""
        if hasattr(self.router, "update_bias"):
            self.router.update_bias(load)

    def num_params(self) -> ParamCount:
        """Parameters of this layer: total, and active per token (router, shared experts and
        ``top_k`` routed experts' worth)."""
        total = sum(p.numel() for p in self.parameters())
        routed = sum(p.numel() for p in self.experts.parameters())
        per_expert = routed // self.config.num_experts
        return ParamCount(total, total - routed + self.config.top_k * per_expert)


def update_router_biases(model: nn.Module, loads: list[torch.Tensor | None]) -> None:
    """Call after ``optimizer.step()``: apply the aux-loss-free bias update of every
    ``sigmoid_bias`` router in ``model``. ``loads``: one entry per :class:`MoE` in
    ``model.modules()`` order, its :attr:`MoEStats.router_load` summed over the step's
    micro-batches (``None`` where there is none). The loads come from the outputs, not from
    the forward calls, so a forward recomputed under activation checkpointing counts once."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if len(loads) != len(layers):
        raise ValueError(f"loads must have one entry per MoE layer ({len(layers)}), got {len(loads)}")
    for layer, load in zip(layers, loads):
        if load is not None:
            layer.update_bias(load)


def count_params(config: MoEConfig) -> ParamCount:
    """Exact parameter counts of ``MoE(config)`` from the config alone: the router and the
    expert kind each report their own (``num_params``, ``params_per_expert``)."""
    from moekit.registry import EXPERTS, ROUTERS

    kind = EXPERTS[config.expert]
    per_expert = kind.params_per_expert(config.d_model, config.d_ff)
    router = ROUTERS[config.router].num_params(config)
    shared = 0
    if config.num_shared_experts:
        shared = kind.params_per_expert(config.d_model, config.shared_width)
        shared += config.d_model if config.shared_expert_gate else 0
    total = router + shared + config.num_experts * per_expert
    return ParamCount(total=total, active=router + shared + config.top_k * per_expert)
