"""Expert parallelism on CPU with gloo: spawned processes must reproduce one process on the
same global batch (outputs and every gradient), never hang, and refuse bad layouts."""

import os
import socket
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, errors):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        fn(rank, world, *args)
    except BaseException:
        Path(errors, f"rank{rank}.txt").write_text(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes; fail (never hang) on an error
    or when they are not done within TIMEOUT_S."""
    errors = tempfile.mkdtemp()
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    messages = {f.name: f.read_text() for f in sorted(Path(errors).iterdir())}
    assert not hung, f"ranks {hung} did not finish within {TIMEOUT_S}s (deadlock?); errors: {messages}"
    assert not messages, "\n".join(f"{k}:\n{v}" for k, v in messages.items())


def _layer_case(rank, world, ep, config_kw, tokens_per_rank, skew):
    import torch.distributed as dist

    from moekit import MoE, MoEConfig
    from moekit.distributed import init_layout, reduce_gradients, shard_experts

    layout = init_layout(ep)
    torch.manual_seed(0)
    config = MoEConfig(d_model=16, d_ff=24, num_experts=8, aux_loss_coef=0.01, z_loss_coef=0.001, **config_kw)
    reference = MoE(config)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world * tokens_per_rank, 16, generator=g)
    if skew:  # every token prefers experts 0 and 1: the other ranks' experts get nothing
        with torch.no_grad():
            reference.router.gate.weight.zero_()
            reference.router.gate.weight[:2] = 5.0 * x.mean(0)
    target = torch.randn(world * tokens_per_rank, 16, generator=g)
    # one process, the global batch, a mean loss
    out = reference(x)
    loss = ((out.output - target) ** 2).mean() + out.aux_loss
    loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}

    model = MoE(config)
    model.load_state_dict(reference.state_dict())
    shard_experts(model, layout)
    rows = slice(rank * tokens_per_rank, (rank + 1) * tokens_per_rank)
    local = model(x[rows])
    assert local.stats.exchange.calls == 2  # the call returns its own exchange statistics: tokens out and back
    assert torch.allclose(local.output, out.output[rows], atol=1e-5), (local.output - out.output[rows]).abs().max()
    assert torch.allclose(local.aux_loss, out.aux_loss, atol=1e-6)
    assert torch.equal(local.stats.tokens_per_expert, out.stats.tokens_per_expert)
    assert int(local.stats.dropped_tokens) == int(out.stats.dropped_tokens)
    ((local.output - target[rows]) ** 2).mean().add(local.aux_loss).backward()
    assert local.stats.exchange.calls >= 3 and local.stats.exchange.seconds > 0  # the backward's exchanges too
    reduce_gradients(model, layout)
    start, end = layout.expert_range(config.num_experts)
    for name, p in model.named_parameters():
        expected = ref_grads[name]
        if name.startswith("experts."):
            expected = expected[start:end]
        assert torch.allclose(p.grad, expected, atol=1e-5), f"rank {rank} {name}: {(p.grad - expected).abs().max()}"
    if config.router == "sigmoid_bias":  # the bias update sees the global load
        reference.update_bias(out.stats.router_load)
        model.update_bias(local.stats.router_load)
        assert torch.equal(model.router.expert_bias, reference.router.expert_bias)
    dist.barrier()


ROUTERS = [{"router": "topk"}, {"router": "switch", "top_k": 1}, {"router": "sigmoid_bias"},
           {"capacity_factor": 1.0}, {"num_shared_experts": 1}]


@pytest.mark.parametrize("world, ep, config_kw", [(2, 2, kw) for kw in ROUTERS] + [(4, 4, kw) for kw in ROUTERS]
                         # ep 2 x dp 2 (capacity is decided per expert group, so one process on the
                         # world's batch is its reference only without a capacity)
                         + [(4, 2, kw) for kw in ROUTERS if "capacity_factor" not in kw]
                         + [(4, 1, {"router": "topk"})])  # data-parallel 4, experts replicated
def test_expert_parallel_layer_equals_one_process(world, ep, config_kw):
    run_ranks(world, _layer_case, ep, config_kw, 6, False)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_whose_experts_get_no_tokens_do_not_hang(world):
    run_ranks(world, _layer_case, world, {"router": "topk"}, 5, True)


def _bad_layout(rank, world):
    from moekit import MoE, MoEConfig
    from moekit.distributed import check_same_config, init_layout, shard_experts

    with pytest.raises(ValueError, match=r"parallel.ep must divide the world size 2 \(allowed: \[1, 2\]\), got 3"):
        init_layout(3)
    layout = init_layout(2)
    with pytest.raises(ValueError, match=r"num_experts \(3\) must be divisible by parallel.ep \(2\)"):
        shard_experts(MoE(MoEConfig(d_model=8, d_ff=8, num_experts=3, top_k=1)), layout)
    with pytest.raises(ValueError, match=r"ranks \[1\] were started with a different config"):
        check_same_config({"lr": 0.1 if rank == 0 else 0.2})
    check_same_config({"lr": 0.1})


def test_bad_layouts_are_clear_errors_on_every_rank():
    run_ranks(2, _bad_layout)
