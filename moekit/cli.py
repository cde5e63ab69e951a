"""The ``moekit`` command. Thin: it parses arguments and calls library functions.

Every field of a config dataclass can be set as ``--moe.FIELD VALUE``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, Sequence

from moekit.config import MoEConfig

# A Mixtral 8x7B layer: the shape people compare against.
MIXTRAL_LAYER = {"d_model": 4096, "d_ff": 14336, "num_experts": 8, "top_k": 2}


def _parse_value(text: str, hint: Any, field: str) -> Any:
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if text.lower() == "none" and type(None) in typing.get_args(hint):
        return None
    kind = kinds[0]
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise SystemExit(f"moekit: --moe.{field} expects a {kind.__name__}, got {text!r}") from None


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str) -> None:
    """Add ``--{prefix}.{field}`` for every field of dataclass ``cls`` (value stays a string)."""
    group = parser.add_argument_group(f"{prefix} fields ({cls.__name__})")
    for f in dataclasses.fields(cls):
        group.add_argument(f"--{prefix}.{f.name}", dest=f"{prefix}.{f.name}", metavar="V", default=None)


def dataclass_overrides(args: argparse.Namespace, cls: type, prefix: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        text = getattr(args, f"{prefix}.{f.name}")
        if text is not None:
            out[f.name] = _parse_value(text, hints[f.name], f.name)
    return out


def cmd_params(args: argparse.Namespace) -> int:
    from moekit.layers.moe import count_params

    fields = {**MIXTRAL_LAYER, **dataclass_overrides(args, MoEConfig, "moe")}
    try:
        config = MoEConfig(**fields)
    except ValueError as exc:
        raise SystemExit(f"moekit params: {exc}") from None
    c = count_params(config)
    n = args.layers
    print(f"MoE layer: d_model={config.d_model} d_ff={config.d_ff} experts={config.num_experts} "
          f"top_k={config.top_k} router={config.router} expert={config.expert} shared={config.num_shared_experts}")
    print(f"{'':<18}{'total':>16}{'active/token':>16}")
    print(f"{'per layer':<18}{c.total:>16,}{c.active:>16,}")
    if n > 1:
        print(f"{f'x {n} layers':<18}{c.total * n:>16,}{c.active * n:>16,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit", description="Sparse Mixture-of-Experts toolkit: layers, models, training, analysis."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("params", help="count total and active parameters of an MoE layer (Mixtral 8x7B's by default)")
    p.add_argument("--layers", type=int, default=1, help="also show the counts for this many MoE layers")
    add_dataclass_args(p, MoEConfig, "moe")
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        for word in unknown:
            name = word.split("=")[0]
            if name.startswith("--moe."):
                valid = ", ".join(f.name for f in dataclasses.fields(MoEConfig))
                parser.error(f"unknown field {name!r}; valid --moe fields: {valid}")
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
