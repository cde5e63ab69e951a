"""Routing statistics accumulated over a corpus, one layer at a time, from router outputs.

:class:`LayerAccumulator` takes each batch's :class:`moekit.layers.router.RouterOutput`
(and optional per-token labels) and keeps only sums: counts per expert, pair counts,
label x expert counts, entropy and z sums. Nothing per token is stored, so a corpus of any
size runs in constant memory. :meth:`LayerAccumulator.finish` turns the sums into a
:class:`LayerStats` of plain numbers and lists (JSON-ready).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from moekit.analysis.health import (
    STARVING_SHARE,  # one threshold for training warnings and verdicts
)

BALANCED_MAX_OVER_MEAN = 1.5
"""A layer is *balanced* when its busiest expert carries at most this multiple of the mean
load and no expert starves."""
COLLAPSED_SHARE_OF_MAX = 0.75
"""A layer is *collapsed* when its busiest expert carries at least this fraction of the
largest possible load (``E / k`` times the mean: every token picks it), or when more than
half of its experts starve."""


@dataclass
class LayerStats:
    """Routing statistics of one MoE layer over a corpus.

    Attributes:
        layer: block index.
        tokens: tokens seen.
        tokens_per_expert: slots each expert computed (after capacity).
        max_over_mean: busiest expert's load over the mean load (1.0 = perfectly balanced).
        cv: coefficient of variation of the load (std / mean, population std).
        dropped_rate: fraction of the routed slots the capacity limit dropped.
        entropy_per_token: mean entropy (nats) of each token's router distribution.
        entropy_of_mean: entropy (nats) of the mean router distribution (log E = uniform).
        top1_prob: mean probability of each token's likeliest expert.
        top1_top2_margin: mean gap between the two likeliest experts' probabilities.
        z_mean, z_std, z_max: router log-sum-exp (the z-loss's quantity) statistics.
        coactivation: ``E x E``, fraction of tokens that chose both experts i and j
            (diagonal: fraction of tokens that chose i).
        verdict: ``"balanced"``, ``"imbalanced"`` or ``"collapsed"`` (thresholds above).
        labels: label names of the specialisation rows (empty without labels).
        label_expert: ``L x E`` slot counts per label and expert.
        specialisation: mutual information between label and expert over the entropy of
            the label: 0 = experts ignore the label, 1 = the expert reveals the label.
    """

    layer: int
    tokens: int
    tokens_per_expert: list[int]
    max_over_mean: float
    cv: float
    dropped_rate: float
    entropy_per_token: float
    entropy_of_mean: float
    top1_prob: float
    top1_top2_margin: float
    z_mean: float
    z_std: float
    z_max: float
    coactivation: list[list[float]]
    verdict: str
    labels: list[str]
    label_expert: list[list[int]]
    specialisation: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def verdict(load: torch.Tensor, top_k: int) -> str:
    """Balanced / imbalanced / collapsed from ``[E]`` loads (see the module thresholds)."""
    load = load.double()
    mean = float(load.mean())
    if mean == 0:
        return "collapsed"
    E = load.numel()
    ratio = float(load.max()) / mean
    starving = int((load < STARVING_SHARE * mean).sum())
    if ratio >= COLLAPSED_SHARE_OF_MAX * E / max(top_k, 1) or starving > E / 2:
        return "collapsed"
    if ratio <= BALANCED_MAX_OVER_MEAN and starving == 0:
        return "balanced"
    return "imbalanced"


def mutual_information(joint: torch.Tensor) -> tuple[float, float]:
    """``(I(A;B), H(A))`` in nats from a joint count matrix ``[A, B]``."""
    p = joint.double() / max(float(joint.sum()), 1.0)
    pa, pb = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pa @ pb)[nz]).log()).sum())
    ha = float(-(pa[pa > 0] * pa[pa > 0].log()).sum())
    return max(mi, 0.0), ha


class LayerAccumulator:
    """Sums of one layer's routing over many batches."""

    def __init__(self, layer: int, num_experts: int, top_k: int, labels: list[str] | None = None):
        E = num_experts
        self.layer, self.E, self.k = layer, E, top_k
        self.labels = list(labels or [])
        self.tokens = 0
        self.slots = 0
        self.load = torch.zeros(E, dtype=torch.float64)
        self.pairs = torch.zeros(E, E, dtype=torch.float64)
        self.prob_sum = torch.zeros(E, dtype=torch.float64)
        self.entropy_sum = self.top1_sum = self.margin_sum = 0.0
        self.z_sum = self.z_sq_sum = 0.0
        self.z_max = -math.inf
        self.label_expert = torch.zeros(len(self.labels), E, dtype=torch.float64)

    @torch.no_grad()
    def add(self, indices: torch.Tensor, probs: torch.Tensor, logits: torch.Tensor,
            mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
            load: torch.Tensor | None = None) -> None:
        """Add one batch.

        Args:
            indices: ``[T, k]`` chosen experts.
            probs: ``[T, E]`` router distribution per token.
            logits: ``[T, E]`` raw router logits (for z statistics).
            mask: ``[T, k]`` slots that exist (``None``: all).
            labels: ``[T]`` label index per token (into ``self.labels``).
            load: ``[E]`` slots each expert computed (after capacity); ``None``: every
                existing slot was computed.
        """
        T, k = indices.shape
        indices, probs, logits = indices.cpu(), probs.double().cpu(), logits.double().cpu()
        exists = torch.ones(T, k, dtype=torch.bool) if mask is None else mask.cpu().bool()
        self.tokens += T
        self.slots += int(exists.sum())
        if load is None:
            load = torch.bincount(indices[exists], minlength=self.E)
        self.load += load.cpu().double()
        chosen = torch.zeros(T, self.E, dtype=torch.float64)
        chosen.scatter_(1, indices, exists.double())  # [T, E] 1 where the token chose the expert
        self.pairs += chosen.t() @ chosen
        self.prob_sum += probs.sum(0)
        logp = probs.clamp_min(1e-30).log()
        self.entropy_sum += float(-(probs * logp).sum())
        top2 = torch.topk(probs, min(2, self.E), dim=-1).values  # [T, 2]
        self.top1_sum += float(top2[:, 0].sum())
        if self.E > 1:
            self.margin_sum += float((top2[:, 0] - top2[:, 1]).sum())
        z = torch.logsumexp(logits, dim=-1)  # [T]
        self.z_sum += float(z.sum())
        self.z_sq_sum += float((z * z).sum())
        self.z_max = max(self.z_max, float(z.max())) if T else self.z_max
        if labels is not None and self.labels:
            slot_labels = labels.cpu().long()[:, None].expand(T, k)[exists]
            flat = slot_labels * self.E + indices[exists]
            self.label_expert += torch.bincount(flat, minlength=len(self.labels) * self.E).double().view(-1, self.E)

    def finish(self) -> LayerStats:
        T = max(self.tokens, 1)
        load = self.load
        mean = float(load.mean())
        mean_p = self.prob_sum / T
        entropy_of_mean = float(-(mean_p[mean_p > 0] * mean_p[mean_p > 0].log()).sum())
        z_mean = self.z_sum / T
        specialisation = None
        if self.labels and self.label_expert.sum() > 0:
            mi, h_label = mutual_information(self.label_expert)
            specialisation = mi / h_label if h_label > 0 else 0.0
        return LayerStats(
            layer=self.layer,
            tokens=self.tokens,
            tokens_per_expert=[int(x) for x in load.tolist()],
            max_over_mean=float(load.max()) / mean if mean > 0 else 0.0,
            cv=float(load.std(unbiased=False)) / mean if mean > 0 else 0.0,
            dropped_rate=1.0 - float(load.sum()) / self.slots if self.slots else 0.0,
            entropy_per_token=self.entropy_sum / T,
            entropy_of_mean=entropy_of_mean,
            top1_prob=self.top1_sum / T,
            top1_top2_margin=self.margin_sum / T,
            z_mean=z_mean,
            z_std=math.sqrt(max(self.z_sq_sum / T - z_mean**2, 0.0)),
            z_max=self.z_max if self.tokens else 0.0,
            coactivation=(self.pairs / T).tolist(),
            verdict=verdict(load, self.k),
            labels=self.labels,
            label_expert=[[int(x) for x in row] for row in self.label_expert.tolist()],
            specialisation=specialisation,
        )
