"""Expert parallelism on this machine: what the token exchange costs, and whether the bytes
sent match the formula.

    python benchmarks/expert_parallel.py           # about 2 minutes on 2 cores

Two CPU processes (gloo, one thread each) against one process with two threads, on the
same global batch:

1. The MoE layer (d_model 512, d_ff 1408, 8 experts, top-2; 2048 tokens per process),
   forward + backward + gradient reduction: tokens/s of ep=2 and of one process, and the
   share of the ep=2 step spent inside ``all_to_all_single``.
2. Bytes each process sends per layer per step, measured, against the formula
   ``4 exchanges x T_local x k x (ep - 1) / ep x d_model x bytes`` (dispatch and combine,
   forward and backward; the ``(ep - 1) / ep`` share of slots goes to experts on other
   processes when routing is balanced). The measured figure uses the actual routing.
3. The small language model trained for a few steps: tokens/s with ``--parallel.ep 2`` on
   two processes against one process.

On one 2-core machine expert parallelism cannot be faster: the processes share the cores
that one process would use, and gloo copies through shared memory. The point here is
correctness and the size of the overhead; on GPUs with NCCL the same code spreads experts
over devices (see the README for the torchrun commands).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

D, F, E, K, T_LOCAL = 512, 1408, 8, 2, 2048


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layer_step(layer, x, target, layout=None):
    from moekit.distributed import reduce_gradients

    out = layer(x)
    ((out.output - target) ** 2).mean().add(out.aux_loss).backward()
    if layout is not None:
        reduce_gradients(layer, layout)
    layer.zero_grad(set_to_none=True)
    return out.stats.exchange  # this call's exchanges, forward and backward


def _layer_worker(rank, world, port, steps, result):
    import torch.distributed as dist

    from moekit import MoE, MoEConfig
    from moekit.distributed import init_layout, shard_experts

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    layout = init_layout(world)
    torch.manual_seed(0)
    layer = shard_experts(MoE(MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K)), layout)
    g = torch.Generator().manual_seed(rank)
    x, target = torch.randn(T_LOCAL, D, generator=g), torch.randn(T_LOCAL, D, generator=g)
    x.requires_grad_()  # as inside a network: the gradient travels back to the tokens too
    for _ in range(2):
        _layer_step(layer, x, target, layout)
    dist.barrier()
    t0 = time.perf_counter()
    exchanges = [_layer_step(layer, x, target, layout) for _ in range(steps)]
    dist.barrier()
    elapsed = time.perf_counter() - t0
    numbers = torch.tensor([elapsed, sum(e.seconds for e in exchanges), sum(e.bytes_sent for e in exchanges)],
                           dtype=torch.float64)
    dist.all_reduce(numbers)
    if rank == 0:
        Path(result).write_text(json.dumps({"step_s": numbers[0].item() / world / steps,
                                            "exchange_s": numbers[1].item() / world / steps,
                                            "bytes_sent": numbers[2].item() / world / steps}))
    dist.destroy_process_group()


def _train_worker(rank, world, port, out, steps):
    import torch.distributed as dist

    from moekit.config import ParallelConfig
    from moekit.presets import small
    from moekit.training import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, 2 // world))  # the same two cores either way
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    c = small()
    c = dataclasses.replace(c, data=dataclasses.replace(c.data, max_chars=2_000_000),
                            train=dataclasses.replace(c.train, max_steps=steps, eval_every=10_000, progress=False),
                            parallel=ParallelConfig(ep=world))
    train(c, out, log=lambda _: None, distributed=world > 1)
    dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    ctx = mp.get_context("spawn")
    port = _port()
    procs = [ctx.Process(target=fn, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
        if p.exitcode != 0:
            raise RuntimeError(f"a benchmark process failed (exit code {p.exitcode})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed layer steps")
    ap.add_argument("--train-steps", type=int, default=30)
    args = ap.parse_args()
    from moekit import MoE, MoEConfig

    # one process, two threads, the same global batch (2 x 2048 tokens)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K))
    xs = [torch.randn(T_LOCAL, D, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    x = torch.cat(xs).requires_grad_()
    target = torch.randn_like(x)
    for _ in range(2):
        _layer_step(layer, x, target)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        _layer_step(layer, x, target)
    single = (time.perf_counter() - t0) / args.steps
    result = Path(tempfile.mkdtemp()) / "layer.json"
    spawn(_layer_worker, 2, args.steps, str(result))
    ep = json.loads(result.read_text())
    tokens = 2 * T_LOCAL
    formula = 4 * T_LOCAL * K * (2 - 1) / 2 * D * 4
    print(f"MoE layer, d_model {D}, d_ff {F}, {E} experts top-{K}, {tokens} tokens per step (forward + backward):")
    print(f"  one process, 2 threads     {tokens / single:10,.0f} tokens/s")
    print(f"  ep=2, 2 processes x 1      {tokens / ep['step_s']:10,.0f} tokens/s  ({single / ep['step_s']:.2f}x)")
    print(f"  time inside all_to_all     {ep['exchange_s'] * 1e3:10.1f} ms of {ep['step_s'] * 1e3:.1f} ms per step "
          f"({ep['exchange_s'] / ep['step_s']:.0%}, waiting for the slower process included)")
    print(f"  bytes sent per process     {ep['bytes_sent'] / 1e6:10.2f} MB per step measured; formula "
          f"4 x {T_LOCAL} x {K} x 1/2 x {D} x 4 B = {formula / 1e6:.2f} MB (balanced routing)")

    runs = Path(tempfile.mkdtemp())
    spawn(_train_worker, 1, str(runs / "one"), args.train_steps)
    spawn(_train_worker, 2, str(runs / "two"), args.train_steps)
    one = json.loads((runs / "one" / "summary.json").read_text())
    two = json.loads((runs / "two" / "summary.json").read_text())
    print(f"small LM, {args.train_steps} steps of 16 x 256 tokens:")
    print(f"  one process, 2 threads     {one['tokens_per_s']:10,.0f} tokens/s, final train loss {one['train_loss']:.4f}")
    print(f"  ep=2, 2 processes x 1      {two['tokens_per_s']:10,.0f} tokens/s, final train loss {two['train_loss']:.4f} "
          f"({two['tokens_per_s'] / one['tokens_per_s']:.2f}x)")


if __name__ == "__main__":
    main()
