"""The ``moekit`` command. Thin: it parses arguments and calls library functions.

Config fields are set as ``--SECTION.FIELD VALUE`` (``--model.num_experts 16``,
``--train.lr 3e-3``, ``--data.path notes/``); ``--model.X`` also reaches the MoE fields.
``moekit params`` alone counts one MoE layer, set with ``--moe.FIELD VALUE``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tomllib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moekit.config import MoEConfig, RunConfig, apply_overrides, parse_value

# A Mixtral 8x7B layer: the shape people compare against.
MIXTRAL_LAYER = {"d_model": 4096, "d_ff": 14336, "num_experts": 8, "top_k": 2}
SECTIONS = ("model", "data", "train", "moe", "parallel", "lora")
# What may change when resuming: how long and how often, not what is trained.
RESUMABLE = {"train.max_steps", "train.time_budget", "train.eval_every", "train.log_every",
             "train.checkpoint_every", "train.keep_checkpoints", "train.progress", "train.device", "parallel.ep"}


def split_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Pull ``--SECTION.FIELD VALUE`` / ``--SECTION.FIELD=VALUE`` out of ``argv``."""
    rest, overrides = [], {}
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        name = word[2:].split("=", 1)[0] if word.startswith("--") else ""
        if "." in name and name.split(".", 1)[0] in SECTIONS:
            if "=" in word:
                overrides[name] = word.split("=", 1)[1]
            elif i + 1 < len(words):
                overrides[name] = words[i + 1]
                i += 1
            else:
                raise SystemExit(f"moekit: --{name} needs a value")
        else:
            rest.append(word)
        i += 1
    return rest, overrides


def _fail(command: str, exc: BaseException) -> SystemExit:
    return SystemExit(f"moekit {command}: {exc}")


def build_run_config(args: argparse.Namespace, overrides: dict[str, str]) -> RunConfig:
    """Preset, then ``--config FILE.toml``, then the shortcut flags, then ``--SECTION.FIELD``."""
    from moekit.presets import preset

    config = preset(args.preset or ("finetune" if getattr(args, "init", None) else "small")).to_dict()
    if getattr(args, "config", None):
        path = Path(args.config)
        try:
            loaded = tomllib.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
        unknown = sorted(set(loaded) - {"model", "data", "train", "lora"})
        if unknown:
            raise ValueError(f"{path}: unknown section(s) {unknown}; valid sections are ['data', 'lora', 'model', 'train']")
        for section, fields in loaded.items():
            if not isinstance(fields, dict):
                raise ValueError(f"{path}: [{section}] must be a table of fields")
            flat = _flatten(fields, section)
            for key, value in flat.items():
                config = _set_typed(config, key, value)
    config = apply_overrides(config, {**_shortcut_overrides(args), **overrides})
    return RunConfig.from_dict(config)


def _shortcut_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The shortcut flags (``--dense``, ``--data``, ``--max-steps``...) as field overrides."""
    shortcuts = {}
    if getattr(args, "dense", False):
        shortcuts["model.dense"] = "true"
    for flag, key in (("data", "data.path"), ("max_steps", "train.max_steps"), ("time_budget", "train.time_budget")):
        if getattr(args, flag, None) is not None:
            shortcuts[key] = str(getattr(args, flag))
    if getattr(args, "no_progress", False):
        shortcuts["train.progress"] = "false"
    return shortcuts


def _flatten(fields: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = {}
    for k, v in fields.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def _set_typed(config: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Set one TOML value (already typed) by going through the same key checks as the CLI."""
    if isinstance(value, list):  # a TOML array: the CLI's comma-separated form
        text = ",".join(str(v).lower() if isinstance(v, bool) else str(v) for v in value)
    else:
        text = "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return apply_overrides(config, {key: text})


def cmd_train(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from moekit.training import TrainingDiverged, train
    from moekit.checkpoint import load_config

    try:
        if args.resume:
            out = Path(args.resume)
            if args.out and Path(args.out).resolve() != out.resolve():
                raise ValueError(f"--out {args.out} differs from --resume {args.resume}: a run continues in its own folder")
            config = load_config(args.resume)
            changing = sorted(set(overrides) - RESUMABLE)
            if changing or args.dense or args.data or args.config or args.init:
                what = changing or ["--dense/--data/--config/--init"]
                raise ValueError(f"cannot change {what} when resuming; only {sorted(RESUMABLE)} "
                                 "(and --max-steps/--time-budget) may change")
            # --dense and --data were refused above, so only schedule-length shortcuts remain
            config = RunConfig.from_dict(apply_overrides(config.to_dict(), {**_shortcut_overrides(args), **overrides}))
        elif args.init:
            config = _init_config(args, overrides)
            out = Path(args.out or "runs/finetune")
        else:
            config = build_run_config(args, overrides)
            out = Path(args.out or ("runs/dense" if config.model.dense else "runs/moe"))
    except (ValueError, FileNotFoundError) as exc:
        raise _fail("train", exc) from None
    try:
        from moekit.distributed import launched_distributed

        summary = train(config, out, resume=bool(args.resume), distributed=launched_distributed(),
                        overwrite=args.overwrite)
    except TrainingDiverged as exc:
        print(f"moekit train: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        from moekit.checkpoint import latest_checkpoint

        try:
            where = f"the last checkpoint is {latest_checkpoint(out)}; continue with: moekit train --resume {out}"
        except (FileNotFoundError, ValueError):
            where = "no checkpoint was written yet"
        print(f"moekit train: interrupted; {where}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise _fail("train", exc) from None
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one process reports
        print(f"summary: {out / 'summary.json'}  (val loss {summary['val_loss']:.4f})")
        print(f'generate: moekit generate --model {out} --prompt "def "')
    return 0


def _init_config(args: argparse.Namespace, overrides: dict[str, str]) -> RunConfig:
    """``train --init``: the model from the source (``--model.*`` changes its fields), data
    and train from the preset (``finetune`` by default), the config file and the flags."""
    from moekit.adapt.finetune import finetune_config

    if args.dense:
        raise ValueError("--dense does not apply with --init: the model comes from the source")
    model = {k.removeprefix("model."): v for k, v in overrides.items() if k.startswith("model.")}
    rest = {k: v for k, v in overrides.items() if not k.startswith("model.")}
    return finetune_config(args.init, build_run_config(args, rest), model)


def cmd_generate(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import torch

    from moekit.inference import generate_batch
    from moekit.inference.sampling import check_sampling
    from moekit.interop import load_model

    if overrides:
        raise _fail("generate", ValueError(f"config fields cannot be set here: {sorted(overrides)}"))
    try:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        prefetch = False if args.no_prefetch else (True if args.prefetch_top is None else args.prefetch_top)
        offload = {} if args.expert_memory is None else {"expert_memory": args.expert_memory,
                                                             "policy": args.offload_policy, "prefetch": prefetch}
        if args.expert_memory is None and (args.offload_policy != "lru" or prefetch is not True):
            raise ValueError("--offload-policy, --prefetch-top and --no-prefetch apply with --expert-memory only")
        if args.quantize_what != "experts" and not args.quantize:
            raise ValueError("--quantize-what applies with --quantize only")
        loaded = load_model(args.model, dtype=dtype, quantize=args.quantize, quantize_what=args.quantize_what,
                            **offload)
        if args.skip_below:
            from moekit.shrink import set_skip_below

            set_skip_below(loaded.model, args.skip_below)
        tokenizer = loaded.tokenizer
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer.json: moekit cannot turn --prompt into ids")
        ids = [int(i) for i in tokenizer.encode(args.prompt)]
        if not ids:
            raise ValueError("--prompt must not be empty")
        check_sampling(args.temperature, args.top_k, args.top_p)  # before any output
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        stream = _Stream(tokenizer, args.prompt)
        result = generate_batch(
            loaded.model, [ids], args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
            stop_ids=loaded.eos_ids if args.stop is None else args.stop, on_token=stream,
        )
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise _fail("generate", exc) from None
    stream.finish()
    if args.stats:
        from moekit import kernels

        print(result.stats.summary(), file=sys.stderr)
        print(kernels.status(), file=sys.stderr)  # whether batch-1 steps ran the C kernels
    return 0


class _Stream:
    """Prints the text as tokens arrive, holding back an incomplete UTF-8 character. Each
    token decodes a bounded window (a few printed ids for context, then the new ones), so the
    cost per token does not grow with the length generated."""

    CONTEXT = 4  # printed ids decoded again ahead of the new ones (tokenizers that merge at joins)

    def __init__(self, tokenizer, prompt: str):
        self.tokenizer, self.ids, self.done = tokenizer, [], 0
        sys.stdout.write(prompt)
        sys.stdout.flush()

    def __call__(self, step_ids) -> None:
        if int(step_ids[0]) >= 0:
            self.ids.append(int(step_ids[0]))
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        start = max(0, self.done - self.CONTEXT)
        before = self.tokenizer.decode(self.ids[start:self.done])
        text = self.tokenizer.decode(self.ids[start:])
        if text.endswith("\ufffd") and not final:
            return
        sys.stdout.write(text[len(before):] if text.startswith(before) else text)
        sys.stdout.flush()
        self.done = len(self.ids)

    def finish(self) -> None:
        self._flush(final=True)
        sys.stdout.write("\n")
        sys.stdout.flush()


def cmd_inspect(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from moekit.analysis import inspect_model

    if overrides:
        raise _fail("inspect", ValueError(f"config fields cannot be set here: {sorted(overrides)}"))
    try:
        inspect_model(args.checkpoint, data=args.data, out=args.out, text=args.text, max_tokens=args.max_tokens,
                      seq_len=args.seq_len, batch_size=args.batch_size, jitter=args.jitter,
                      progress=not args.no_progress)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise _fail("inspect", exc) from None
    return 0


def cmd_convert(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from moekit.interop import convert

    if overrides:
        raise _fail("convert", ValueError(f"config fields cannot be set here: {sorted(overrides)}"))
    try:
        print(convert(args.src, args.dst, args.model_type, args.overwrite))
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as exc:
        raise _fail("convert", exc) from None
    return 0


def cmd_params(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    if args.preset:
        return _params_of_model(args, overrides)
    from moekit.layers.moe import count_params

    fields = dict(MIXTRAL_LAYER)
    hints = typing.get_type_hints(MoEConfig)
    try:
        for key, text in overrides.items():
            section, _, name = key.partition(".")
            if section != "moe" or name not in hints:
                valid = ", ".join(f.name for f in dataclasses.fields(MoEConfig))
                raise ValueError(f"unknown field {key!r}; valid --moe fields: {valid} "
                                 "(use --preset NAME for --model/--train fields)")
            fields[name] = parse_value(text, hints[name], key)
        config = MoEConfig(**fields)
    except ValueError as exc:
        raise _fail("params", exc) from None
    c = count_params(config)
    n = args.layers
    print(f"MoE layer: d_model={config.d_model} d_ff={config.d_ff} experts={config.num_experts} "
          f"top_k={config.top_k} router={config.router} expert={config.expert} shared={config.num_shared_experts}")
    print(f"{'':<18}{'total':>16}{'active/token':>16}")
    print(f"{'per layer':<18}{c.total:>16,}{c.active:>16,}")
    if n > 1:
        print(f"{f'x {n} layers':<18}{c.total * n:>16,}{c.active * n:>16,}")
    return 0


def _params_of_model(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from moekit.models import count_model_params

    try:
        config = build_run_config(args, overrides).model
    except ValueError as exc:
        raise _fail("params", exc) from None
    c = count_model_params(config)
    m = config.moe
    kind = "dense" if config.dense else f"MoE {m.num_experts} experts, top-{m.top_k}"
    print(f"model {args.preset}: {kind}, {config.n_layers} layers, d_model {config.d_model}, "
          f"vocab {config.vocab_size}")
    print(f"total parameters : {c.total:>18,}  ({_human(c.total)})")
    print(f"active per token : {c.active:>18,}  ({_human(c.active)})")
    return 0


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


EPILOG = """config fields: --model.FIELD, --data.FIELD, --train.FIELD VALUE (e.g. --model.num_experts 16
--train.lr 3e-3); --model.X also sets the MoE layer's fields (router, top_k, aux_loss_coef...).
An unknown field is an error that lists the valid ones."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the usage itself is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from moekit.presets import PRESETS

    parser = _Parser(
        prog="moekit", description="Sparse Mixture-of-Experts toolkit: layers, models, training, analysis."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train an MoE (or dense) language model", epilog=EPILOG)
    t.add_argument("--preset", choices=list(PRESETS),
                   help="starting config (default: small, or finetune with --init)")
    t.add_argument("--config", metavar="FILE.toml", help="a TOML file with [model], [model.moe], [data], [train]")
    t.add_argument("--out", metavar="DIR", help="run directory (default: runs/moe, or runs/dense with --dense)")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    t.add_argument("--init", metavar="PATH", help="fine-tune: start from a moekit run or a Hugging Face directory "
                   "(its model and tokenizer; see --train.trainable)")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--dense", action="store_true", help="train the dense baseline of equal active compute")
    t.add_argument("--data", metavar="PATH", help="a text file or folder (default: the Python stdlib sources)")
    t.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps")
    t.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop after this much training time")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate text from a moekit run or a Hugging Face directory")
    g.add_argument("--model", "--checkpoint", dest="model", required=True, metavar="DIR",
                   help="a moekit run directory (or one of its step_* folders), or a Hugging Face model directory")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens")
    g.add_argument("--top-p", type=float, default=None, help="sample among the likeliest tokens holding this mass")
    g.add_argument("--stop", type=int, nargs="*", metavar="ID",
                   help="stop token ids (default: the model's eos_token_id, if any)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and compute dtype")
    g.add_argument("--stats", action="store_true", help="print prefill and decode tokens/s and peak memory")
    g.add_argument("--skip-below", type=float, default=0.0, metavar="W",
                   help="do not compute a chosen expert whose routing weight is below W (default 0: all)")
    g.add_argument("--quantize", choices=["bf16", "int8", "int4"],
                   help="store the routed experts in this format as the model loads (moekit quantize saves one)")
    g.add_argument("--quantize-what", choices=["experts", "all"], default="experts",
                   help="with --quantize: the experts only (default), or the attention and LM head too")
    g.add_argument("--expert-memory", metavar="SIZE",
                   help="leave the routed experts in their files and hold at most SIZE of them in memory (e.g. 4GB)")
    g.add_argument("--offload-policy", choices=["lru", "lfu"], default="lru",
                   help="which cached expert --expert-memory evicts first (default lru)")
    g.add_argument("--no-prefetch", action="store_true",
                   help="with --expert-memory: do not read the next layer's likely experts ahead")
    g.add_argument("--prefetch-top", type=int, metavar="N",
                   help="with --expert-memory: read only each token's N likeliest next-layer experts ahead "
                        "(default top_k; 1 reads the surest guess)")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="routing statistics, specialisation, plots and an HTML report")
    i.add_argument("checkpoint", help="a moekit run directory (or step_* folder) or a Hugging Face directory")
    i.add_argument("--data", metavar="PATH", help="text file or folder (default: the run's corpus); a folder of "
                   "sub-folders is read as one domain per sub-folder")
    i.add_argument("--out", metavar="DIR", help="write PNG plots, report.html and inspect.json here")
    i.add_argument("--text", help="sample text to show token by token (default: the corpus's start)")
    i.add_argument("--max-tokens", type=int, default=32768, help="tokens of the corpus to route")
    i.add_argument("--seq-len", type=int, default=256)
    i.add_argument("--batch-size", type=int, default=8)
    i.add_argument("--jitter", type=float, default=0.01, help="router-input jitter for the consistency test")
    i.add_argument("--no-progress", action="store_true")
    i.set_defaults(func=cmd_inspect)

    from moekit.interop.families import FAMILIES

    c = sub.add_parser("convert", help=f"moekit run <-> Hugging Face directory ({', '.join(sorted(FAMILIES))})")
    c.add_argument("src", help="a moekit run directory or a Hugging Face model directory")
    c.add_argument("dst", help="where to write the other format")
    c.add_argument("--model-type", choices=sorted(FAMILIES),
                   help="Hugging Face family to write (default: the one that expresses the model)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    c.set_defaults(func=cmd_convert)

    p = sub.add_parser("params", help="count total and active parameters (a Mixtral 8x7B layer by default)",
                       epilog="--moe.FIELD VALUE sets a layer field; with --preset, --model.FIELD sets a model field.")
    p.add_argument("--preset", choices=list(PRESETS), help="count a whole model (e.g. mixtral-8x7b)")
    p.add_argument("--layers", type=int, default=1, help="also show the counts for this many MoE layers")
    p.set_defaults(func=cmd_params)

    from moekit.cli_adapt import add_commands

    add_commands(sub)
    return parser


# What a user's mistake or the machine raises: one line each, never a traceback (--debug shows it).
EXPECTED = (ValueError, OSError, MemoryError, ImportError, KeyboardInterrupt, UnicodeError)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    try:
        rest, overrides = split_overrides(argv)
    except SystemExit as exc:
        parser.error(str(exc).removeprefix("moekit: "))
    args = parser.parse_args(rest)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args, overrides)
    except EXPECTED as exc:
        if debug:
            raise
        return _report(args.command, exc)
    except RuntimeError as exc:  # torch's allocator failures are RuntimeErrors; anything else is a bug
        if debug or not _out_of_memory(exc):
            raise
        return _report(args.command, MemoryError(str(exc).splitlines()[0]))


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def _report(command: str, exc: BaseException) -> int:
    """One line on stderr for an expected failure, and its exit code."""
    if isinstance(exc, KeyboardInterrupt):
        print(f"moekit {command}: interrupted", file=sys.stderr)
        return 130
    kind = {MemoryError: "out of memory: ", PermissionError: "permission denied: "}.get(type(exc), "")
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"moekit {command}: {kind}{text} (--debug shows the traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
