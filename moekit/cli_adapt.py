"""The ``moekit`` commands that start from models that exist: ``upcycle``, ``compose``,
``prune`` and ``merge-experts`` (``train --init`` and ``--lora.*`` live with ``train``).
Thin, like ``cli.py``: each parses its arguments and calls one library function."""

from __future__ import annotations

import argparse


def _no_fields(command: str, overrides: dict[str, str]) -> None:
    if overrides:
        raise ValueError(f"config fields cannot be set in moekit {command}: {sorted(overrides)}")


def cmd_upcycle(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from moekit.adapt import upcycle_to

    _no_fields("upcycle", overrides)
    print(upcycle_to(args.src, args.dst, args.num_experts, args.top_k, args.granularity, args.shared_experts,
                     args.router_init, args.noise, args.calibration, args.seed, args.overwrite))
    return 0


def cmd_compose(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from moekit.adapt import compose_to

    _no_fields("compose", overrides)
    print(compose_to(args.base, args.expert or [], args.dst, args.prompts, args.top_k, args.gate, args.attention,
                     args.seed, args.overwrite))
    return 0


def cmd_prune(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from moekit.shrink import prune_to

    _no_fields("prune", overrides)
    print(prune_to(args.src, args.dst, args.keep, args.by, args.data, args.top_k, args.overwrite))
    return 0


def cmd_merge(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from moekit.shrink import merge_to

    _no_fields("merge-experts", overrides)
    print(merge_to(args.src, args.dst, args.into, args.data, args.top_k, args.overwrite))
    return 0


def cmd_quantize(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from moekit.shrink.quantize import quantize_to

    _no_fields("quantize", overrides)
    print(quantize_to(args.src, args.dst, args.format, args.group_size, args.overwrite, args.what))
    return 0


def _from_moe_to_run(sub, name: str, help: str, dst_help: str = "the moekit run directory to write"):
    """A command reading an MoE (``src``) and writing a moekit run (``dst``, ``--overwrite``)."""
    c = sub.add_parser(name, help=help)
    c.add_argument("src", help="a moekit run or a Hugging Face MoE directory")
    c.add_argument("dst", help=dst_help)
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty DST that moekit wrote")
    return c


def add_commands(sub) -> None:
    from moekit.adapt.compose import ATTENTION, GATES
    from moekit.adapt.upcycle import ROUTER_INITS

    u = sub.add_parser("upcycle", help="turn a dense model into an MoE that starts from its weights")
    u.add_argument("src", help="a dense moekit run or a Hugging Face directory (llama, mistral, qwen2)")
    u.add_argument("dst", help="the moekit run directory to write (fine-tune it with moekit train --init DST)")
    u.add_argument("--num-experts", type=int, default=8, help="routed experts per layer (default 8)")
    u.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    u.add_argument("--granularity", type=int, default=1,
                   help="slices per dense FFN; each slice becomes an expert (default 1: whole copies)")
    u.add_argument("--shared-experts", type=int, default=0, help="slices that become always-on shared experts")
    u.add_argument("--router-init", choices=ROUTER_INITS, default="random",
                   help="random rows, or k-means centroids of hidden states on --calibration text")
    u.add_argument("--calibration", metavar="FILE", help="text for --router-init hidden")
    u.add_argument("--noise", type=float, default=0.0, help="relative noise on expert copies (default 0: exact)")
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--overwrite", action="store_true", help="replace a non-empty DST that moekit wrote")
    u.set_defaults(func=cmd_upcycle)

    c = sub.add_parser("compose", help="compose an MoE from several dense models (frankenMoE, Branch-Train-MiX)")
    c.add_argument("dst", help="the moekit run directory to write")
    c.add_argument("--base", required=True, help="the dense model giving attention, norms and embeddings")
    c.add_argument("--expert", action="append", metavar="MODEL", help="a dense model whose FFNs become one expert "
                   "(repeat: one per expert, each followed by its --prompts)")
    c.add_argument("--prompts", action="append", metavar="FILE", help="text of the expert named before it")
    c.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    c.add_argument("--gate", choices=GATES, default="hidden", help="router rows: the base's hidden states on each "
                   "expert's prompts (default), their token embeddings, or random")
    c.add_argument("--attention", choices=ATTENTION, default="base",
                   help="attention, norms and embeddings from the base, or averaged over the experts (BTX)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty DST that moekit wrote")
    c.set_defaults(func=cmd_compose)

    from moekit.shrink.prune import METHODS

    p = _from_moe_to_run(sub, "prune", "keep the N most important experts of each MoE layer")
    p.add_argument("--keep", type=int, required=True, metavar="N", help="experts kept per layer")
    p.add_argument("--by", choices=METHODS, default="frequency",
                   help="score: how often chosen, mean routing weight, or REAP (weight x output norm)")
    p.add_argument("--data", required=True, metavar="FILE", help="calibration text the experts are scored on")
    p.add_argument("--top-k", type=int, help="experts per token after pruning (default: unchanged)")
    p.set_defaults(func=cmd_prune)

    g = _from_moe_to_run(sub, "merge-experts", "merge each MoE layer's experts into N (grouped, aligned, averaged)")
    g.add_argument("--into", type=int, required=True, metavar="N", help="experts per layer after merging")
    g.add_argument("--data", required=True, metavar="FILE", help="calibration text (usage, similarity, alignment)")
    g.add_argument("--top-k", type=int, help="experts per token after merging (default: unchanged, capped at N)")
    g.set_defaults(func=cmd_merge)

    q = _from_moe_to_run(sub, "quantize", "store the routed experts in bf16, int8 or int4",
                         "the moekit run directory to write (moekit generate --model DST reads it)")
    q.add_argument("--format", required=True, choices=["bf16", "int8", "int4"],
                   help="int8: per output channel; int4: per group of --group-size weights")
    q.add_argument("--group-size", type=int, default=32, help="int4: weights per scale (default 32)")
    q.add_argument("--what", choices=["experts", "all"], default="experts",
                   help="experts only (default), or the attention projections and LM head too")
    q.set_defaults(func=cmd_quantize)
