"""The training loop behind ``moekit train``.

``train(config, out_dir)`` builds the data, the model and AdamW from a :class:`RunConfig`,
trains until ``max_steps`` or ``time_budget``, evaluates, checkpoints atomically and writes
``metrics.jsonl`` and ``summary.json``. ``train(..., resume=True)`` continues a run from its
latest checkpoint: step, optimizer, schedule, data position and RNG all continue, so on CPU
the losses equal those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moekit.config import RunConfig
from moekit.data import (
    TokenSplits,
    build_tokenizer,
    eval_batches,
    load_text,
    load_tokenizer,
    train_batch,
)
from moekit.data.tokenizer import token_dtype
from moekit.distributed.training import launched_distributed
from moekit.layers.moe import update_router_biases
from moekit.models import Transformer, model_param_groups
from moekit import checkpoint as ckpt
from moekit.analysis.health import health_warnings, max_over_mean
from moekit.training.machine import machine_warnings
from moekit.training.schedule import lr_at

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# metrics.jsonl's router_entropy is taken on every this-many-th token of each batch: over all
# of them the log-softmax is a visible share of a training step
ENTROPY_STRIDE = 16


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r} but this torch sees no CUDA device; use 'cpu' or 'auto'")
    return device


def build_optimizer(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    """AdamW, fused where this torch and device allow: on CPU the foreach step over the MoE's
    many expert weights would tax it against its dense baseline (docs/benchmarks.md)."""
    groups = model_param_groups(model, t.weight_decay)
    kw = dict(lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kw)


def prepare_data(config: RunConfig, out_dir: Path, resume: bool, log: Callable[[str], None], tokenizer=None):
    """Read and tokenize the corpus (with ``tokenizer`` when given: a fine-tuned model's
    own). Returns ``(tokenizer, TokenSplits)``."""
    t0 = time.perf_counter()
    d = config.data
    text = load_text(d.path, d.suffixes, d.max_chars)
    if tokenizer is None and (resume or d.tokenizer == "byte"):
        tokenizer = load_tokenizer(d.tokenizer, out_dir)
    elif tokenizer is None:
        log(f"training a BPE tokenizer with {d.bpe_vocab_size} tokens on {len(text) / 1e6:.1f}M characters...")
        tokenizer = build_tokenizer("bpe", text, d.bpe_vocab_size)
    tokens = tokenizer.encode(text).astype(token_dtype(tokenizer.vocab_size), copy=False)
    splits = TokenSplits.from_tokens(tokens, d.val_fraction, config.train.seq_len)
    log(f"data: {d.path or 'Python standard library sources'}: {len(text) / 1e6:.1f}M chars -> "
        f"{len(splits.train):,} train / {len(splits.val):,} val tokens ({d.tokenizer}, "
        f"{time.perf_counter() - t0:.1f}s)")
    return tokenizer, splits


@torch.no_grad()
def evaluate(model: Transformer, splits: TokenSplits, config: RunConfig, device: torch.device, autocast,
             rows: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Mean cross-entropy over the fixed validation windows (``rows`` picks this process's
    rows of each window batch in a multi-process run)."""
    t = config.train
    was_training = model.training
    model.eval()
    losses = []
    for x, y in eval_batches(splits.val, t.eval_batches, t.batch_size, t.seq_len):
        if rows is not None:
            x, y = rows(x), rows(y)
        with autocast():
            losses.append(float(model(x.to(device), y.to(device)).loss))
    model.train(was_training)
    return sum(losses) / len(losses)


def _silent(_: str) -> None:
    pass


def named_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """``{parameter name: {state key: tensor}}``: independent of parameter order and, with
    experts gathered (see ``moekit.distributed``), of the process layout."""
    return {name: dict(optimizer.state.get(p, {})) for name, p in model.named_parameters()}


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module, saved: dict,
                         slicer: Callable | None = None) -> None:
    """Restore :func:`named_optimizer_state` (``slicer(parameter, tensor)`` cuts a full
    expert tensor to this process's shard). Everything is checked against the model before
    the optimizer is touched: the names, every tensor's shape and dtype (a state from another
    model would otherwise corrupt memory in the fused step), the step counts."""
    if not isinstance(saved, dict) or not isinstance(saved.get("named"), dict):
        raise ValueError("the checkpoint's optimizer state is not a {parameter name: state} mapping; "
                         "it was not written by this version of moekit")
    named = saved["named"]
    params = dict(model.named_parameters())
    missing, extra = sorted(set(params) - set(named)), sorted(set(named) - set(params))
    if missing or extra:
        raise ValueError(f"the checkpoint's optimizer state does not match the model: it lacks {missing[:5]} and "
                         f"has {extra[:5]} the model does not; it belongs to another model")
    fused_or_capturable = {id(p): bool(g.get("fused") or g.get("capturable"))
                           for g in optimizer.param_groups for p in g["params"]}
    entries = {}
    for name, p in params.items():
        if not isinstance(named[name], dict):
            raise ValueError(f"the optimizer state of {name} is a {type(named[name]).__name__}, not a mapping")
        entry = {}
        for key, value in named[name].items():
            if not torch.is_tensor(value):
                raise ValueError(f"the optimizer state {name}.{key} is a {type(value).__name__}, not a tensor")
            if key == "step":
                if value.numel() != 1 or not value.is_floating_point() and value.dtype not in (torch.int64, torch.int32):
                    raise ValueError(f"the optimizer state {name}.step must be one number, got shape "
                                     f"{list(value.shape)} {value.dtype}")
                # as torch's own loader: fused and capturable steps live on the parameter's device
                entry[key] = (value.to(p.device, torch.float32) if fused_or_capturable.get(id(p))
                              else value.clone())
                continue
            value = slicer(p, value) if slicer is not None else value
            if tuple(value.shape) != tuple(p.shape) or not value.is_floating_point():
                raise ValueError(f"the optimizer state {name}.{key} has shape {list(value.shape)} {value.dtype}; the "
                                 f"model's parameter has {list(p.shape)} {p.dtype}: it belongs to another model")
            entry[key] = value.to(p.device, p.dtype, copy=True)
        entries[p] = entry
    for p, entry in entries.items():
        if entry:
            optimizer.state[p] = entry


def check_training_state(state: Any, where: Path) -> None:
    """The fields of a ``state.pt`` that resuming reads, checked before anything is changed."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{where / ckpt.STATE_FILE} cannot be resumed from: {what}")

    if not isinstance(state, dict):
        raise bad(f"it holds a {type(state).__name__}, not a training state")
    missing = sorted({"step", "tokens_seen", "train_seconds", "optimizer", "rng"} - set(state))
    if missing:
        raise bad(f"it lacks {missing}")
    for key in ("step", "tokens_seen"):
        if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
            raise bad(f"{key} must be an int >= 0, got {state[key]!r}")
    seconds = state["train_seconds"]
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        raise bad(f"train_seconds must be a finite number >= 0, got {seconds!r}")
    rng = state["rng"]
    if not isinstance(rng, dict) or not all(torch.is_tensor(t) and t.dtype == torch.uint8 and t.dim() == 1
                                            for t in rng.values()) or "cpu" not in rng:
        raise bad("rng must map 'cpu' (and optionally 'cuda') to uint8 generator states")


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text("utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a half-written last line from a killed run
    ckpt.atomic_write_bytes(path, "".join(f"{line}\n" for line in keep).encode())


def train(
    config: RunConfig,
    out_dir: str | Path,
    resume: bool = False,
    log: Callable[[str], None] = print,
    distributed: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a model as ``config`` says, writing everything to ``out_dir``.

    ``distributed``: this process is one of several started by ``torchrun`` (the CLI sets it
    when it sees torchrun's variables; :func:`moekit.distributed.launched_distributed`).
    ``overwrite``: ``out_dir`` may hold an earlier run (a folder moekit wrote), which is
    cleared first; without it such a folder is refused. One process writes a run at a time
    (a lock file names it). Returns the summary (also written to ``summary.json``). Raises
    :class:`TrainingDiverged` when the loss becomes NaN/inf; the last checkpoint written before
    stays the latest.
    """
    trainer = Trainer(config, out_dir, resume, log, distributed, overwrite)
    try:
        while not trainer.done:
            trainer.step()
        trainer.close()
        return trainer.finish()
    finally:
        trainer.close()
        trainer.release()


class Trainer:
    """One training run, advanced a step at a time (``train`` loops it; the MoE-vs-dense
    benchmark interleaves two so that machine noise hits both alike).

    Each trainer keeps its own copy of the global RNG state and swaps it in for its steps,
    so interleaved runs give exactly the losses of separate ones.
    """

    def __init__(self, config: RunConfig, out_dir: str | Path, resume: bool = False,
                 log: Callable[[str], None] = print, distributed: bool = False, overwrite: bool = False):
        if not distributed and launched_distributed():
            raise ValueError(f"this process is one of {os.environ['WORLD_SIZE']} started by torchrun, but "
                             "distributed=False: pass distributed=True (moekit train does) or run one process")
        if config.model.moe.weight_format is not None:
            raise ValueError(f"the experts are stored as {config.model.moe.weight_format} (moekit quantize), which is for "
                             "inference: train the float model, then quantize it")
        self.wall0 = time.perf_counter()
        self.out_dir = out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out {out_dir} is an existing file, not a folder; choose a folder for the run")
        self.lock = ckpt.RunLock(out_dir)
        try:
            self._start(config, resume, log, distributed, overwrite)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give up the run directory's lock (done by :func:`train` and :meth:`finish`)."""
        self.lock.release()

    def _start(self, config: RunConfig, resume: bool, log: Callable[[str], None], distributed: bool,
               overwrite: bool) -> None:
        out_dir = self.out_dir
        t = config.train
        self.device = device = resolve_device(t.device)
        _check_training_fits(config, device, int(os.environ.get("WORLD_SIZE", "1")) if distributed else 1)
        self.dist = None
        if distributed:
            from moekit.distributed.training import DistributedRun

            if device.type == "cuda":
                self.device = device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            self.dist = DistributedRun(config.to_dict(), config.parallel.ep, device)
            if t.batch_size % self.dist.world:
                raise ValueError(f"train.batch_size ({t.batch_size}) must be divisible by the number of processes "
                                 f"({self.dist.world})")
            if not self.dist.main:  # one rank speaks and writes
                log = _silent
                t = config.train = replace(t, progress=False)
        self.main = self.dist is None or self.dist.main
        self.log = log
        if not resume and not overwrite and ckpt.holds_run(out_dir):  # every process refuses alike
            raise ValueError(f"{out_dir} already holds a run; continue it with --resume {out_dir}, choose "
                             "another --out, or pass --overwrite to replace it")
        from moekit.adapt.finetune import check_start, freeze

        init = None if resume else t.init  # a resumed run's weights are its own checkpoint's
        init_tokenizer, kind = check_start(config, init)  # before anything is written
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.main:  # one writer per run directory, and a clean start
            self.lock.acquire()
            ckpt.clean_leftovers(out_dir)
            if not resume and ckpt.holds_run(out_dir):
                ckpt.clear_run(out_dir)
        torch.manual_seed(t.seed)
        self.tokenizer, self.splits = prepare_data(config, out_dir, resume, log, init_tokenizer)
        if t.init is None and self.tokenizer.vocab_size != config.model.vocab_size:
            config = replace(config, model=replace(config.model, vocab_size=self.tokenizer.vocab_size))
        self.config, self.t = config, t
        self.model = Transformer(config.model).to(device)
        if init is not None:
            from moekit.adapt.finetune import load_init_weights

            load_init_weights(self.model, init)
            m = config.model.moe
            log(f"fine-tuning {kind} weights from {init}" + ("" if config.model.dense else
                f"; balancing: aux_loss_coef {m.aux_loss_coef}, z_loss_coef {m.z_loss_coef} (aux_loss is logged)"))
        if config.lora.rank:
            from moekit.models.lora import attach_lora

            attach_lora(self.model, config.lora)
        self.counts = self.model.num_params()

        self.step_count, self.tokens_seen, self.train_s = 0, 0, 0.0
        self.metrics_path = out_dir / METRICS_FILE
        state = None
        if resume:
            where = ckpt.latest_checkpoint(out_dir)
            ckpt.load_weights(self.model, where)  # the full model: checkpoints hold every expert
            state = ckpt.load_state(where)
            check_training_state(state, where)
        if self.dist is not None:
            self.dist.shard(self.model)
        self.trainable, _ = freeze(self.model, t.trainable)
        what = ([f"LoRA rank {config.lora.rank} on {config.lora.targets}"] if config.lora.rank else []) + \
            ([t.trainable] if t.trainable else [])
        if what:
            log(f"trainable: {' + '.join(what)}: {self.trainable / 1e6:.2f}M of {self.counts.total / 1e6:.2f}M parameters")
        self.optimizer = build_optimizer(self.model, t)
        if state is not None:
            load_optimizer_state(self.optimizer, self.model, state["optimizer"],
                                 None if self.dist is None else self.dist.expert_slice)
            self.step_count, self.tokens_seen, self.train_s = state["step"], state["tokens_seen"], state["train_seconds"]
            _set_rng_state(state["rng"], device)  # a CUDA state is restored on CUDA only: runs move across devices
            if self.main:
                _trim_metrics(self.metrics_path, self.step_count)
            log(f"resumed from {where} at step {self.step_count}")
        elif self.main:
            self.metrics_path.unlink(missing_ok=True)
        if self.main:
            ckpt.save_config(out_dir, config)
            self.tokenizer.save(out_dir)
        log(f"model: {'dense' if config.model.dense else 'MoE'} {self.counts.total / 1e6:.2f}M parameters, "
            f"{self.counts.active / 1e6:.2f}M active per token; device {device}")
        for message in machine_warnings(device, t.dtype):
            log(f"warning: {message}")

        self.step_fn = torch.compile(self.model) if t.compile else self.model
        if self.dist is not None:
            self.step_fn = self.dist.wrap(self.step_fn)
        self.moe_layers = [i for i in range(config.model.n_layers) if config.model.is_moe_layer(i)]
        if self.step_count == 0 and not resume:
            self.save(0)  # so a NaN at the very start still leaves a checkpoint to return to
        self.bar = _progress(t.max_steps, self.step_count, t.progress)
        self.say = self.bar.write if self.main else _silent
        n_moe, n_experts = len(self.moe_layers), config.model.moe.num_experts
        self.window = _Window(n_moe, n_experts)  # since the last metrics line
        self.health = _Window(n_moe, n_experts)  # since the last evaluation
        self.warned: set = set()
        self.model.train()
        self._rng = _rng_state(device)

    def autocast(self):
        if self.t.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def done(self) -> bool:
        t = self.t
        return self.step_count >= t.max_steps or (t.time_budget is not None and self.train_s >= t.time_budget)

    @property
    def stopped(self) -> str:
        return "max_steps" if self.step_count >= self.t.max_steps else "time_budget"

    def save(self, at_step: int) -> Path:
        """A checkpoint of the full model and optimizer (every expert, whatever the layout),
        written by the main process."""
        if self.dist is None:
            weights, optim = None, named_optimizer_state(self.optimizer, self.model)
        else:  # collectives: every rank takes part
            weights = self.dist.full_state(self.model)
            optim = self.dist.full_optimizer_state(self.optimizer, self.model)
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if self.dist is not None and self.dist.mean(float(bool(bad))) > 0 and not bad:
            bad = ["a shard on another process"]  # every process stops together
        if bad:  # never call a checkpoint good that holds NaN or inf
            raise TrainingDiverged(_diverged_message(f"weights ({', '.join(bad[:3])})", float("nan"), at_step - 1,
                                                     self.out_dir))
        state = {"step": at_step, "tokens_seen": self.tokens_seen, "train_seconds": self.train_s,
                 "optimizer": {"named": optim}, "rng": _rng_state(self.device)}
        path = self.out_dir / f"step_{at_step:07d}"
        if self.main:
            path = ckpt.save_checkpoint(self.out_dir, at_step, self.model, state, self.t.keep_checkpoints, weights)
        if self.dist is not None:
            self.dist.barrier()
        return path

    def evaluate(self) -> float:
        loss = evaluate(self.model, self.splits, self.config, self.device, self.autocast,
                        None if self.dist is None else self.dist.rows)
        return loss if self.dist is None else self.dist.mean(loss)

    def step(self) -> None:
        """One optimizer step, then any logging, evaluation and checkpoint due."""
        t, step = self.t, self.step_count
        _set_rng_state(self._rng, self.device)
        t0 = time.perf_counter()
        lr = lr_at(t, step, self.train_s)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = aux_sum = 0.0
        bias_loads: list = []  # per MoE layer: the router's choices over this step's micro-batches
        for micro in range(t.grad_accum):
            x, y = train_batch(self.splits.train, t.batch_size, t.seq_len, t.seed, step, micro)
            if self.dist is not None:  # this rank's rows of the global batch
                x, y = self.dist.rows(x), self.dist.rows(y)
            with self.autocast():
                out = self.step_fn(x.to(self.device), y.to(self.device))
            ((out.loss + out.aux_loss) / t.grad_accum).backward()
            loss_sum += float(out.loss.detach())
            aux_sum += float(out.aux_loss.detach())
            loads = [s.tokens_per_expert for s in out.layer_stats if s is not None]
            self.window.add(loads, [lg for lg in out.router_logits if lg is not None])
            self.health.add(loads)
            step_loads = [s.router_load for s in out.layer_stats if s is not None]
            bias_loads = step_loads if not bias_loads else [
                None if a is None else a + b for a, b in zip(bias_loads, step_loads)]
        train_loss, aux = loss_sum / t.grad_accum, aux_sum / t.grad_accum
        if self.dist is not None:
            train_loss = self.dist.mean(train_loss)
        if not math.isfinite(train_loss + aux):
            raise TrainingDiverged(_diverged_message("loss", train_loss + aux, step, self.out_dir))
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        if self.dist is None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        else:
            self.dist.reduce_gradients(self.model)
            norm = self.dist.clip_grad_norm(self.model, max_norm)
        if not torch.isfinite(norm):
            raise TrainingDiverged(_diverged_message("gradient norm", float(norm), step, self.out_dir))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_router_biases(self.model, bias_loads)
        self.step_count = step = step + 1
        tokens = t.batch_size * t.seq_len * t.grad_accum
        self.tokens_seen += tokens
        dt = time.perf_counter() - t0
        self.train_s += dt
        self.window.tick(tokens, dt, train_loss, aux)
        self._rng = _rng_state(self.device)

        last = self.done
        evaluated = None
        if step % t.eval_every == 0 and not last:
            evaluated = self.evaluate()
            if step > t.warmup_steps:
                _warn_health(self.health, self.moe_layers, self.warned, self.say)
            self.health.reset()
        if (step % t.log_every == 0 or evaluated is not None) and not last:
            record = self.window.flush(step, lr, evaluated)
            if self.main:
                with open(self.metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            self.bar.set_postfix_str(_postfix(record))
            if evaluated is not None:
                self.say(f"step {step}: train loss {record['train_loss']:.4f}, val loss {evaluated:.4f}")
        self.bar.update(1)
        if step % t.checkpoint_every == 0 and not last:
            self.save(step)

    def close(self) -> None:
        self.bar.close()

    def finish(self) -> dict[str, Any]:
        """Evaluate, write the last checkpoint, the last metrics line and ``summary.json``."""
        t, step = self.t, self.step_count
        _set_rng_state(self._rng, self.device)
        val_loss = self.evaluate()
        _warn_health(self.health, self.moe_layers, self.warned, self.log)
        record = {"step": step, "val_loss": val_loss}
        if self.window.steps:
            record = self.window.flush(step, lr_at(t, max(step - 1, 0), self.train_s), val_loss)
        if self.main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        last = self.save(step)
        if self.config.lora.rank and self.main:  # the adapters alone too, to load onto the base model
            from moekit.adapt.lora import ADAPTER_FILE, save_adapters

            save_adapters(self.model, self.out_dir / ADAPTER_FILE, self.config.lora)
        summary = {
            "val_loss": val_loss,
            "train_loss": self.window.last_loss,
            "steps": step,
            "tokens_seen": self.tokens_seen,
            "wall_s": round(time.perf_counter() - self.wall0, 3),
            "train_s": round(self.train_s, 3),
            "tokens_per_s": round(self.tokens_seen / self.train_s, 1) if self.train_s > 0 else None,
            "params_total": self.counts.total,
            "params_active": self.counts.active,
            "params_trainable": self.trainable,
            "dense": self.config.model.dense,
            "stopped": self.stopped,
            "checkpoint": str(last),
        }
        if self.dist is not None:
            summary["processes"], summary["parallel_ep"] = self.dist.world, self.dist.layout.ep
        if self.main:
            ckpt.atomic_write_bytes(self.out_dir / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
        self.log(f"done: {step} steps, val loss {val_loss:.4f}, {summary['tokens_per_s']} tokens/s; checkpoint {last}")
        self.release()
        return summary


class _Window:
    """Running sums between two metrics lines."""

    def __init__(self, n_moe: int, n_experts: int):
        self.loads = [torch.zeros(n_experts, dtype=torch.long) for _ in range(n_moe)]
        self.entropy = [0.0] * n_moe
        self.entropy_n = 0
        self.steps = 0
        self.tokens = 0
        self.seconds = 0.0
        self.loss = self.aux = 0.0
        self.last_loss = None

    def add(self, loads: list[torch.Tensor], router_logits: list[torch.Tensor] | None = None) -> None:
        for acc, load in zip(self.loads, loads):
            acc += load.cpu()
        if router_logits:
            with torch.no_grad():  # mean entropy (nats) of each token's router distribution
                for i, logits in enumerate(router_logits):
                    # over every ENTROPY_STRIDE-th token: a metric, not worth 1% of each step
                    logp = torch.log_softmax(logits[::ENTROPY_STRIDE].float(), dim=-1)
                    self.entropy[i] += float(-(logp.exp() * logp).sum(-1).mean())
            self.entropy_n += 1

    def tick(self, tokens: int, seconds: float, loss: float, aux: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds
        self.loss += loss
        self.aux += aux
        self.last_loss = loss

    def flush(self, step: int, lr: float, val_loss: float | None) -> dict[str, Any]:
        n = max(self.steps, 1)
        record = {
            "step": step,
            "train_loss": self.loss / n,
            "aux_loss": self.aux / n,
            "lr": lr,
            "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else None,
            "max_over_mean": max_over_mean(self.loads) if self.loads else None,
            "tokens_per_expert": [load.tolist() for load in self.loads],
            "layer_max_over_mean": [max_over_mean([load]) for load in self.loads],
            "router_entropy": [e / self.entropy_n for e in self.entropy] if self.entropy_n else None,
        }
        if val_loss is not None:
            record["val_loss"] = val_loss
        self.reset()
        return record

    def reset(self) -> None:
        for load in self.loads:
            load.zero_()
        self.entropy = [0.0] * len(self.loads)
        self.entropy_n = 0
        self.steps = self.tokens = 0
        self.seconds = self.loss = self.aux = 0.0


def _warn_health(health: _Window, layers: list[int], warned: set, write: Callable[[str], None]) -> None:
    """Print a starving-expert or collapsing-layer warning once per occurrence: when it
    starts, not again while it lasts, and again if it comes back after recovering."""
    current = dict(health_warnings(health.loads, layers))
    for key, message in current.items():
        if key not in warned:
            write(f"warning: {message}")
    warned.intersection_update(current)
    warned.update(current)


def _postfix(record: dict[str, Any]) -> str:
    parts = [f"loss {record['train_loss']:.3f}"]
    if record.get("tokens_per_s"):
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    parts.append(f"lr {record['lr']:.2e}")
    if record.get("max_over_mean"):
        parts.append(f"load max/mean {record['max_over_mean']:.2f}")
    return ", ".join(parts)


def _check_training_fits(config: RunConfig, device: torch.device, processes: int) -> None:
    """Refuse, before building anything, a run whose weights, gradients, AdamW state and
    activations cannot fit: 16 bytes per parameter (float32 weight, gradient, two moments)
    plus about 40 float32 values per token, layer and model width for the activations."""
    from moekit.budget import check_fits
    from moekit.models import count_model_params

    m, t = config.model, config.train
    if config.data.tokenizer == "bpe":
        m = replace(m, vocab_size=max(m.vocab_size, config.data.bpe_vocab_size))
    params = count_model_params(m).total
    tokens = t.batch_size * t.seq_len // processes
    activations = 4 * tokens * m.n_layers * (40 * m.d_model + 4 * m.moe.top_k * m.moe.d_ff) + 12 * tokens * m.vocab_size
    check_fits(f"training this model ({params:,} parameters, {tokens:,} tokens a step per process)",
               16 * params + activations, str(device))


def _diverged_message(what: str, value: float, step: int, out_dir: Path) -> str:
    try:
        kept = ckpt.latest_checkpoint(out_dir)
    except FileNotFoundError:
        kept = None
    where = f"the last good checkpoint is {kept}" if kept else "no checkpoint was written yet"
    return (f"the training {what} became {value} at step {step + 1}; training stopped and {where}. "
            f"Try a lower train.lr, train.grad_clip 1.0, or train.dtype float32.")


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
