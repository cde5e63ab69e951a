"""Branch-Train-MiX (Sukhbaatar et al. 2024) end to end, on two kinds of text:

1. train a dense seed model on the mixture;
2. branch: copy it once per domain and fine-tune each copy on its domain
   (``moekit train --init seed``; here only the FFNs train, so the seed's attention stays
   right for every expert; ``--trainable all`` with ``--attention average`` is the paper's
   variant);
3. mix: compose the copies' FFNs as the experts of one MoE, the router from the seed's
   hidden states on each domain (``moekit compose``);
4. train the router on the mixture (``moekit train --init composed --train.trainable router``).

Prints each domain's loss and the share of its tokens routed to its own expert at each step.
The same from the command line::

    moekit train --dense --data mix.txt --out runs/seed
    moekit train --init runs/seed --data code/ --train.trainable experts --out runs/code
    moekit train --init runs/seed --data prose/ --train.trainable experts --out runs/prose
    moekit compose runs/btx --base runs/seed --expert runs/code --prompts code.txt \\
        --expert runs/prose --prompts prose.txt
    moekit train --init runs/btx --data mix.txt --train.trainable router --out runs/btx-tuned

    python examples/branch_train_mix.py --domain code=path/to/code --domain prose=path/to/prose
    python examples/branch_train_mix.py      # the stdlib's code vs the Python reference manual's prose
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch

from moekit.adapt import compose, finetune_config
from moekit.data import ByteTokenizer, load_text
from moekit.interop import load_model
from moekit.interop.hf import save_run
from moekit.presets import tiny
from moekit.training import train


def default_domains(root: Path) -> dict[str, Path]:
    """Python code (the stdlib, docstrings and all) and English prose (the reference manual's
    topics that ``help()`` shows, shipped with Python)."""
    import pydoc_data.topics

    prose = root / "prose.txt"
    prose.write_text("\n\n".join(pydoc_data.topics.topics.values()))
    code = root / "code.txt"
    code.write_text(load_text(None, max_chars=1_000_000))
    return {"code": code, "prose": prose}


def config(path: Path, steps: int, **train_fields):
    c = tiny()
    fields = dict(max_steps=steps, progress=False, eval_every=10**9, checkpoint_every=10**9, **train_fields)
    return dataclasses.replace(c, model=dataclasses.replace(c.model, n_layers=4),
                               data=dataclasses.replace(c.data, path=str(path), max_chars=400_000),
                               train=dataclasses.replace(c.train, **fields))


def windows(text: str) -> torch.Tensor:
    """``text`` as bytes in ``[B, 64]`` windows (what the byte-tokenised tiny models read)."""
    ids = torch.as_tensor(ByteTokenizer().encode(text).astype("int64"))
    return ids[: ids.numel() // 64 * 64].view(-1, 64)  # [N] -> [B, 64]


def report(tag: str, model, held: dict[str, torch.Tensor]) -> None:
    parts = []
    for expert, (name, tokens) in enumerate(held.items()):
        with torch.no_grad():
            out = model(tokens[:, :-1], tokens[:, 1:])
        share = ""
        if out.router_logits[0] is not None:
            shares = [float((r.argmax(-1) == expert).float().mean()) for r in out.router_logits]
            share = " own expert " + "/".join(f"{s:.2f}" for s in shares)
        parts.append(f"{name} loss {float(out.loss):.3f}{share}")
    print(f"{tag:<28}" + "; ".join(parts), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", action="append", metavar="NAME=PATH", help="a domain's text file or folder")
    ap.add_argument("--steps", type=int, default=300, help="steps of each phase")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        domains = (dict(d.split("=", 1) for d in args.domain) if args.domain else default_domains(root))
        texts = {name: load_text(str(path), max_chars=400_000) for name, path in domains.items()}
        mix = root / "mix.txt"
        mix.write_text("\n\n".join(t[: 400_000 // len(texts)] for t in texts.values()))
        held = {n: windows(t[-8192:]) for n, t in texts.items()}  # in each domain's validation split
        seed = config(mix, args.steps)
        train(dataclasses.replace(seed, model=dataclasses.replace(seed.model, dense=True)), root / "seed",
              log=lambda _: None)
        report("seed (dense)", load_model(root / "seed").model, held)
        for name, path in domains.items():  # branch-train
            branch = config(Path(path), args.steps, lr=3e-3, warmup_steps=5, trainable="experts")
            train(finetune_config(root / "seed", branch), root / name, log=lambda _: None)
            report(f"branch {name}", load_model(root / name).model, held)
        prompts = [windows(t[:4096]) for t in texts.values()]
        seed_model = load_model(root / "seed")
        moe = compose(seed_model.model, [load_model(root / n).model for n in domains], prompts, top_k=2)
        report("composed (hidden gate)", moe, held)
        save_run(root / "btx", moe, None, {})
        mixing = config(mix, args.steps, lr=1e-2, warmup_steps=5, trainable="router")
        train(finetune_config(root / "btx", mixing), root / "tuned", log=lambda _: None)
        report("router trained on the mix", load_model(root / "tuned").model, held)


if __name__ == "__main__":
    main()
