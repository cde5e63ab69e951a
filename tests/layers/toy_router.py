"""A router defined outside the package, as a user would write one: one class, one
registry line. It has parameters of its own (a learned temperature per expert) and a rule
of its own (at most two experts per token), which it reports and checks itself."""

import torch
from torch import nn

import moekit
from moekit.layers.router import Router, RouterOutput


@moekit.register_router("toy_tempered")
class TemperedRouter(Router):
    """Softmax top-k over ``gate(x) * exp(log_temp)``, renormalised."""

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        if config.top_k > 2:
            raise ValueError(f"top_k must be 1 or 2 for router 'toy_tempered', got {config.top_k}")

    @classmethod
    def num_params(cls, config):
        return super().num_params(config) + config.num_experts  # the temperatures

    def __init__(self, config):
        super().__init__(config)
        self.log_temp = nn.Parameter(torch.zeros(config.num_experts))

    def route(self, logits):
        tempered = logits * self.log_temp.exp()
        probs = torch.softmax(tempered, dim=-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)  # [T, E] -> [T, k]
        return RouterOutput(self._finish(weights), indices, logits, probs)
