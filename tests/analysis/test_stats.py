"""Routing statistics on synthetic router outputs whose answers are known."""

import math

import pytest
import torch

from moekit.analysis import LayerAccumulator, mutual_information, verdict


def one_hot_probs(indices: torch.Tensor, E: int, p: float = 1.0) -> torch.Tensor:
    probs = torch.full((indices.shape[0], E), (1 - p) / max(E - 1, 1))
    return probs.scatter(1, indices[:, :1], p)


def test_perfectly_balanced_layer():
    E, k, T = 4, 2, 400
    idx = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], 1)  # every expert twice per 4 tokens
    probs = torch.full((T, E), 1 / E)
    acc = LayerAccumulator(0, E, k)
    acc.add(idx, probs, torch.zeros(T, E))
    s = acc.finish()
    assert s.tokens_per_expert == [200] * 4 and s.max_over_mean == 1.0 and s.cv == 0.0
    assert s.verdict == "balanced" and s.dropped_rate == 0.0
    assert s.entropy_per_token == pytest.approx(math.log(4)) and s.entropy_of_mean == pytest.approx(math.log(4))
    assert s.top1_prob == pytest.approx(0.25) and s.top1_top2_margin == pytest.approx(0.0)
    assert s.z_mean == pytest.approx(math.log(4)) and s.z_std == pytest.approx(0.0, abs=1e-6)


def test_fully_collapsed_layer():
    E, k, T = 8, 2, 100
    idx = torch.tensor([[0, 1]] * T)
    probs = torch.zeros(T, E)
    probs[:, 0], probs[:, 1] = 0.9, 0.1
    acc = LayerAccumulator(3, E, k)
    acc.add(idx, probs, probs.log().clamp_min(-30))
    s = acc.finish()
    assert s.tokens_per_expert == [100, 100, 0, 0, 0, 0, 0, 0]
    assert s.max_over_mean == pytest.approx(4.0) and s.verdict == "collapsed"
    assert s.top1_prob == pytest.approx(0.9) and s.top1_top2_margin == pytest.approx(0.8)
    assert s.entropy_of_mean == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))


def test_verdict_thresholds():
    assert verdict(torch.tensor([10, 10, 10, 10]), 2) == "balanced"
    assert verdict(torch.tensor([20, 10, 10, 10, 5, 5, 10, 10]), 2) == "imbalanced"  # max/mean 2 of at most 4
    assert verdict(torch.tensor([20, 10, 5, 5]), 2) == "collapsed"  # max/mean 2 = every token picks expert 0
    assert verdict(torch.tensor([10, 10, 10, 0]), 2) == "imbalanced"  # a starving expert
    assert verdict(torch.tensor([100, 1, 0, 0, 0, 0, 0, 0]), 1) == "collapsed"


def test_coactivation_of_a_fixed_pattern():
    E, T = 4, 300
    pattern = torch.tensor([[0, 1], [2, 3], [0, 2]])
    idx = pattern.repeat(T // 3, 1)
    acc = LayerAccumulator(0, E, 2)
    acc.add(idx, torch.full((T, E), 0.25), torch.zeros(T, E))
    co = torch.tensor(acc.finish().coactivation)
    third = 1 / 3
    expected = torch.tensor([[2 * third, third, third, 0], [third, third, 0, 0],
                             [third, 0, 2 * third, third], [0, 0, third, third]])
    assert torch.allclose(co, expected, atol=1e-9)


def test_label_perfect_specialisation_scores_one_and_random_scores_near_zero():
    E, T = 4, 4000
    labels = torch.arange(T) % 4
    acc = LayerAccumulator(0, E, 1, ["a", "b", "c", "d"])
    acc.add(labels[:, None], one_hot_probs(labels[:, None], E), torch.zeros(T, E), labels=labels)
    s = acc.finish()
    assert s.specialisation == pytest.approx(1.0)
    assert s.label_expert == [[1000, 0, 0, 0], [0, 1000, 0, 0], [0, 0, 1000, 0], [0, 0, 0, 1000]]
    g = torch.Generator().manual_seed(0)
    random_idx = torch.randint(0, E, (T, 1), generator=g)
    acc = LayerAccumulator(0, E, 1, ["a", "b", "c", "d"])
    acc.add(random_idx, one_hot_probs(random_idx, E), torch.zeros(T, E), labels=labels)
    assert acc.finish().specialisation < 0.01


def test_mutual_information_formula():
    joint = torch.tensor([[30.0, 10.0], [10.0, 50.0]])
    p = joint / joint.sum()
    pa, pb = p.sum(1), p.sum(0)
    expected = sum(float(p[i, j] * torch.log(p[i, j] / (pa[i] * pb[j]))) for i in range(2) for j in range(2))
    mi, h = mutual_information(joint)
    assert mi == pytest.approx(expected) and h == pytest.approx(float(-(pa * pa.log()).sum()))


def test_capacity_drops_and_masks_are_counted():
    E, T = 2, 10
    idx = torch.zeros(T, 1, dtype=torch.long)
    acc = LayerAccumulator(0, E, 1)
    acc.add(idx, one_hot_probs(idx, E), torch.zeros(T, E), load=torch.tensor([4, 0]))  # 6 slots dropped
    assert acc.finish().dropped_rate == pytest.approx(0.6)
