"""Routers: ``x [T, d_model] -> RouterOutput``.

Every router returns the same small contract so that the dispatcher, the losses and the
analysis code never need to know which router produced it. Token-choice routers fill
``indices``/``weights`` of shape ``[T, k]``; expert choice, where a token may get zero or many
experts, uses ``k = E`` slots and a ``mask`` marking the slots that exist.

Gradients reach the learned routers through the combine ``weights``. Routers whose
selection is random (``sampling``, the noise of ``noisy_topk``) or combinatorial
(``sinkhorn``, group limits of ``sigmoid_bias``) do not differentiate the *choice*, only
the weights of what was chosen, which is the standard estimator. ``hash`` has no
parameters and gets no gradient.

Routing runs in float32 whatever the input dtype: the gate matmul is tiny, and softmax,
top-k near ties and the z-loss all suffer in bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit import kernels, ops
from moekit.config import MoEConfig
from moekit.registry import register_router


@dataclass
class RouterOutput:
    """What every router returns.

    Attributes:
        weights: ``[T, k]`` combine weights (float32).
        indices: ``[T, k]`` int64 expert ids.
        logits: ``[T, E]`` float32 raw router logits (zeros for parameter-free routers).
        probs: ``[T, E]`` float32 per-token distribution over experts, used by the
            balancing losses and the statistics.
        mask: ``[T, k]`` bool, slots that exist; ``None`` means all do.
        balance_loss, z_loss: the balancing loss and the z-loss over all tokens, scalars
            with their gradients, where the router computed them with its softmax (the MoE
            takes them where no mask, padding or all-reduce applies); ``None``: the
            functions of :mod:`moekit.layers.losses` compute them.
    """

    weights: torch.Tensor
    indices: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    mask: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


class Router(nn.Module):
    """Base class: a linear gate ``d_model -> E`` with optional input jitter.

    Subclasses implement :meth:`route` on float32 logits. Class attributes describe the
    router to the rest of the library:

    - ``learned``: has parameters trained by gradient (balancing losses apply).
    - ``causal``: each token's choice depends only on that token, so it can run during
      autoregressive decoding.
    - ``token_choice``: every token gets exactly ``top_k`` distinct experts.
    """

    learned = True
    causal = True
    token_choice = True
    groups_experts = False
    registry_name = "base"

    @classmethod
    def check_config(cls, config: MoEConfig) -> None:
        """Raise a ValueError naming the field when ``config`` asks this router for something
        it does not do. The base rules: no expert groups unless the router has them."""
        if config.topk_groups > config.n_groups:
            raise ValueError(f"topk_groups must be in 1..n_groups (1..{config.n_groups}), got {config.topk_groups}")
        if config.n_groups > 1 and not cls.groups_experts:
            from moekit.registry import ROUTERS

            grouping = " or ".join(repr(n) for n, c in sorted(ROUTERS.items()) if c.groups_experts)
            raise ValueError(f"n_groups > 1 is only supported by router {grouping}, got router {config.router!r}")

    @classmethod
    def num_params(cls, config: MoEConfig) -> int:
        """Parameters of ``cls(config)``: the gate ``[E, d_model]`` and its optional bias."""
        return config.num_experts * config.d_model + (config.num_experts if config.router_bias else 0)

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.jitter = config.router_jitter
        self.renormalize = config.renormalize
        self.scale = config.routed_scaling_factor
        self.gate = nn.Linear(config.d_model, config.num_experts, bias=config.router_bias)

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, d] -> [T, E]`` float32 logits; jitter multiplies the input in training."""
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._linear32(x)
        return self._linear32(x)

    def _linear32(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gate.weight
        b = self.gate.bias
        if x.dtype == torch.float32 and w.dtype == torch.float32:
            return F.linear(x, w, b)
        return F.linear(x.float(), w.float(), None if b is None else b.float())

    def forward(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> RouterOutput:
        """Route ``x`` of shape ``[T, d_model]``; ``token_ids``/``positions`` are ``[T]``."""
        return self.route(self.gate_logits(x))

    def route(self, logits: torch.Tensor) -> RouterOutput:
        raise NotImplementedError

    def _finish(self, weights: torch.Tensor) -> torch.Tensor:
        """Renormalise the chosen experts' weights (if configured), then scale them."""
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.scale if self.scale != 1.0 else weights

    def _topk_of(self, probs: torch.Tensor, logits: torch.Tensor) -> RouterOutput:
        weights, indices = torch.topk(probs, self.top_k, dim=-1)  # [T, E] -> [T, k]
        return RouterOutput(self._finish(weights), indices, logits, probs)


@register_router("topk")
class TopKRouter(Router):
    """Softmax over logits, then top-k (Mixtral; the k weights renormalised by default).

    With ``top_k=1`` and renormalisation the weight is always 1, as in transformers, and
    the router learns only from the auxiliary losses: use ``renormalize=False`` or the
    ``switch`` router to let the task loss reach it.

    On the CPU (float32 logits, outside ``torch.compile``) the softmax, the top-k and the
    renormalisation, and their backward, run in one kernel pass each
    (:func:`moekit.kernels.topk_softmax`): over 8 experts torch's row-wise ops cost far more
    than their arithmetic."""

    def route(self, logits: torch.Tensor) -> RouterOutput:
        fused = _fused_topk(logits, self.top_k, self.renormalize, self.scale)
        if fused is not None:
            return fused
        # torch ops: the op's own reference, so the tests of the op test this path too
        probs, weights, indices = ops.topk_softmax_reference(logits, self.top_k, self.renormalize, self.scale)
        return RouterOutput(weights, indices, logits, probs)


def _fused_topk(logits: torch.Tensor, k: int, renormalize: bool, scale: float) -> RouterOutput | None:
    """The softmax top-k router as :func:`moekit.ops.topk_softmax` where the kernels take the
    logits (float32 on the CPU, outside ``torch.compile``), else ``None``."""
    if kernels.for_tensors(logits) is None:
        return None
    if not torch.is_grad_enabled():  # no training, no losses
        probs, weights, indices = ops.topk_softmax(logits, k, renormalize, scale)
        return RouterOutput(weights, indices, logits, probs)
    probs, weights, indices, balance, z = ops.topk_softmax(logits, k, renormalize, scale, with_losses=True)
    return RouterOutput(weights, indices, logits, probs, balance_loss=balance, z_loss=z)


@register_router("switch")
class SwitchRouter(Router):
    """Switch Transformer (Fedus et al. 2021): top-1, the output scaled by the raw gate
    probability (never renormalised, which would make it 1 and cut the router's gradient).
    Use with ``capacity_factor`` (1.0-1.25 in the paper) and ``router_jitter`` for the
    paper's full recipe."""

    @classmethod
    def check_config(cls, config: MoEConfig) -> None:
        super().check_config(config)
        if config.top_k != 1:
            raise ValueError(f"top_k must be 1 for router 'switch' (Switch Transformer routes top-1), got {config.top_k}")

    def route(self, logits: torch.Tensor) -> RouterOutput:
        fused = _fused_topk(logits, 1, False, self.scale)  # top-1 of the softmax, as below
        if fused is not None:
            return fused
        probs = torch.softmax(logits, dim=-1)
        weights, indices = probs.max(dim=-1, keepdim=True)  # [T, E] -> [T, 1]
        return RouterOutput(weights * self.scale, indices, logits, probs)


@register_router("noisy_topk")
class NoisyTopKRouter(Router):
    """Shazeer et al. 2017: ``H = x W_g + N(0, 1) * softplus(x W_noise)`` in training, then
    keep the top-k of ``H`` and softmax over them. The noise scale is learned and depends on
    the input; in eval the clean logits are used."""

    @classmethod
    def num_params(cls, config: MoEConfig) -> int:
        return super().num_params(config) + config.num_experts * config.d_model  # the noise projection

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.noise = nn.Linear(config.d_model, config.num_experts, bias=False)
        nn.init.zeros_(self.noise.weight)

    def forward(self, x, token_ids=None, positions=None) -> RouterOutput:
        logits = self.gate_logits(x)
        probs = torch.softmax(logits, dim=-1)
        if not self.training:
            return self._topk_of(probs, logits)
        noise_std = F.softplus(F.linear(x.float(), self.noise.weight.float()))  # [T, E]
        noisy = logits + torch.randn_like(logits) * noise_std
        top, indices = torch.topk(noisy, self.top_k, dim=-1)  # [T, E] -> [T, k]
        weights = torch.softmax(top, dim=-1) if self.renormalize else torch.softmax(noisy, -1).gather(-1, indices)
        return RouterOutput(weights * self.scale, indices, logits, probs)


@register_router("sampling")
class SamplingRouter(Router):
    """Probabilistic routing: in training, draw k distinct experts from the router's
    softmax (without replacement); in eval, deterministic top-k. The weights are the
    probabilities of the drawn experts (renormalised by default)."""

    def route(self, logits: torch.Tensor) -> RouterOutput:
        probs = torch.softmax(logits, dim=-1)
        if not self.training:
            return self._topk_of(probs, logits)
        indices = torch.multinomial(probs.detach(), self.top_k, replacement=False)  # [T, k]
        return RouterOutput(self._finish(probs.gather(-1, indices)), indices, logits, probs)


@register_router("sigmoid_bias")
class SigmoidBiasRouter(Router):
    """DeepSeek-V3: sigmoid scores, a non-learned per-expert bias used only to *choose*
    experts (aux-loss-free balancing), optional group-limited selection.

    The bias moves after each optimizer step by ``bias_update_rate * sign(mean_load - load)``:
    call ``moekit.update_router_biases(model, loads)`` after ``optimizer.step()`` with the
    loads the layers returned (``MoEStats.router_load``, summed over the micro-batches).
    Nothing accumulates inside ``forward``, so recomputing a forward (activation
    checkpointing) does not count its tokens twice.
    """

    groups_experts = True

    @classmethod
    def check_config(cls, config: MoEConfig) -> None:
        if config.num_experts % config.n_groups:
            raise ValueError(f"n_groups must divide num_experts ({config.num_experts}), got {config.n_groups}")
        super().check_config(config)
        per_group = config.num_experts // config.n_groups
        if config.n_groups > 1 and config.top_k > config.topk_groups * per_group:
            raise ValueError(f"top_k ({config.top_k}) must be <= topk_groups * experts per group "
                             f"({config.topk_groups} * {per_group})")

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.rate = config.bias_update_rate
        self.n_groups = config.n_groups
        self.topk_groups = config.topk_groups
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        self.load_reduce = None

    def route(self, logits: torch.Tensor) -> RouterOutput:
        scores = torch.sigmoid(logits)  # [T, E]
        choice = scores.detach() + self.expert_bias
        if self.n_groups > 1:
            choice = self._limit_groups(choice)
        indices = torch.topk(choice, self.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(-1, indices)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return RouterOutput(weights * self.scale, indices, logits, probs)

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        T, E = choice.shape
        grouped = choice.view(T, self.n_groups, E // self.n_groups)  # [T, E] -> [T, G, E/G]
        top2 = min(2, E // self.n_groups)
        group_scores = grouped.topk(top2, dim=-1).values.sum(-1)  # [T, G]
        keep = torch.topk(group_scores, self.topk_groups, dim=-1).indices  # [T, topk_groups]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        masked = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf"))
        return masked.view(T, E)  # [T, G, E/G] -> [T, E]

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Apply one aux-loss-free update from ``load`` (``[E]`` choices per expert since the
        last update, on this process)."""
        if tuple(load.shape) != (self.num_experts,):
            raise ValueError(f"load must have shape [{self.num_experts}], got {list(load.shape)}")
        load = load.to(self.expert_bias)
        if self.load_reduce is not None:  # expert parallelism: the global batch's load
            load = self.load_reduce(load)
        if load.sum() > 0:
            self.expert_bias += self.rate * torch.sign(load.mean() - load)


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Zhou et al. 2022: each expert picks its top-``C`` tokens by softmax score, with
    ``C = ceil(capacity_factor * T * top_k / E)``; a token may get zero or many experts.

    It looks across every token of the batch, so a token's experts depend on the other
    tokens, including later ones: it is **not causal** and cannot be used for
    autoregressive decoding (model code refuses it in generation).
    """

    causal = False
    token_choice = False

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.capacity_factor = config.capacity_factor or 1.0

    def route(self, logits: torch.Tensor) -> RouterOutput:
        T, E = logits.shape
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        capacity = min(T, max(1, int(-(-self.capacity_factor * T * self.top_k // E))))
        top_tokens = torch.topk(probs.t(), capacity, dim=-1).indices  # [E, T] -> [E, C]
        chosen = torch.zeros(E, T, dtype=torch.bool, device=logits.device)
        chosen.scatter_(1, top_tokens, True)
        mask = chosen.t()  # [E, T] -> [T, E]
        weights = probs * mask
        indices = torch.arange(E, device=logits.device).expand(T, E)
        return RouterOutput(weights * self.scale, indices, logits, probs, mask)


_HASH_A = 0x9E3779B1
_HASH_B = 0x85EBCA77


def _mix(h: torch.Tensor) -> torch.Tensor:
    """An integer hash (xorshift-multiply) on non-negative int64 values below 2**31."""
    h = (h ^ (h >> 15)) * 0x2C1B3C6D & 0x7FFFFFFF
    h = (h ^ (h >> 12)) * 0x297A2D39 & 0x7FFFFFFF
    return h ^ (h >> 15)


@register_router("hash")
class HashRouter(Router):
    """Roller et al. 2021 (hash layers): a fixed, parameter-free assignment. Expert scores
    are a hash of ``(token id, expert)``, so each token id always goes to the same ``top_k``
    distinct experts with weight ``1/top_k``. Without token ids it hashes the position.
    No parameters, no gradient, no balancing loss."""

    learned = False

    @classmethod
    def num_params(cls, config: MoEConfig) -> int:
        return 0

    def __init__(self, config: MoEConfig):
        nn.Module.__init__(self)
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.scale = config.routed_scaling_factor

    def forward(self, x, token_ids=None, positions=None) -> RouterOutput:
        T = x.shape[0]
        if token_ids is None:
            token_ids = positions if positions is not None else torch.arange(T, device=x.device)
        ids = token_ids.reshape(-1).long()
        if ids.shape[0] != T:
            raise ValueError(f"token_ids must hold one id per token ({T}), got shape {tuple(token_ids.shape)}")
        experts = torch.arange(self.num_experts, device=x.device)
        keys = (ids.unsqueeze(1) * _HASH_A + experts * _HASH_B) & 0x7FFFFFFF  # [T, E]
        indices = torch.topk(_mix(keys), self.top_k, dim=-1).indices  # [T, k]
        weights = torch.full(indices.shape, self.scale / self.top_k, device=x.device)
        probs = torch.zeros(T, self.num_experts, device=x.device).scatter_(1, indices, 1.0 / self.top_k)
        logits = torch.zeros(T, self.num_experts, device=x.device)
        return RouterOutput(weights, indices, logits, probs)


def sinkhorn(scores: torch.Tensor, iters: int) -> torch.Tensor:
    """Balance ``exp(scores)`` ``[T, E]`` so that rows sum to 1 and columns to ``T / E``.

    Works in log space for stability.
    """
    T, E = scores.shape
    log_p = scores.float()
    log_col = torch.log(torch.tensor(T / E, device=scores.device))
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + log_col  # columns -> T/E
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)  # rows -> 1
    return log_p.exp()


@register_router("sinkhorn")
class SinkhornRouter(Router):
    """Balanced assignment (BASE layers, Lewis et al. 2021, in its Sinkhorn form as in
    Clark et al. 2022): in training the *choice* of experts is the top-k of the
    Sinkhorn-balanced score matrix, which spreads tokens evenly; the weights are the
    router's softmax probabilities of the chosen experts, so the gradient flows as in
    top-k. In eval, plain top-k."""

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.iters = config.sinkhorn_iters

    def route(self, logits: torch.Tensor) -> RouterOutput:
        probs = torch.softmax(logits, dim=-1)
        if not self.training:
            return self._topk_of(probs, logits)
        with torch.no_grad():
            balanced = sinkhorn(logits.detach(), self.iters)
        indices = torch.topk(balanced, self.top_k, dim=-1).indices  # [T, k]
        return RouterOutput(self._finish(probs.gather(-1, indices)), indices, logits, probs)


def build_router(config: MoEConfig) -> Router:
    from moekit.registry import ROUTERS

    return ROUTERS[config.router](config)
