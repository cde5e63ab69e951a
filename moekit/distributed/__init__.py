"""Expert and data parallelism on ``torch.distributed`` (gloo on CPU, NCCL on GPUs)."""

from moekit.distributed.ep import (
    ExpertParallelDispatch,
    all_reduce_sum,
    gather_experts_state,
    reduce_gradients,
    shard_experts,
)
from moekit.distributed.layout import ParallelLayout, check_same_config, init_layout
from moekit.distributed.training import launched_distributed

__all__ = [
    "ExpertParallelDispatch", "ParallelLayout", "all_reduce_sum", "check_same_config", "gather_experts_state",
    "init_layout", "launched_distributed", "reduce_gradients", "shard_experts",
]
