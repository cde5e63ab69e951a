"""Do experts specialise by domain? Train a small MoE on three domains, then inspect it.

    python examples/domain_specialisation.py --out runs/domains      # about 6 minutes on 2 cores

Builds a corpus of three sub-folders from files every machine with moekit's extras has:
``code`` (Python standard library sources), ``prose`` (Shakespeare when ``../shared`` has
it, else the licence texts in /usr/share/common-licenses) and ``data`` (the CSV files that
ship with scikit-learn), each capped at the same size. Saves the untrained model as a run
(``init``) and trains the ``small`` preset on the whole corpus (``trained``), then runs
``moekit inspect`` on both with ``--data`` pointing at the domain folders, so the
specialisation score of every layer can be read next to its value at initialisation.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import subprocess
import sys
from pathlib import Path

import torch

from moekit.config import DataConfig
from moekit.data.corpus import stdlib_files
from moekit.models import Transformer
from moekit.presets import small
from moekit.training import train
from moekit.checkpoint import save_checkpoint, save_config

CAP = 400_000  # characters per domain


def gather(files, cap: int) -> str:
    parts, size = [], 0
    for f in files:
        try:
            raw = f.read_bytes()
            text = (gzip.decompress(raw) if f.suffix == ".gz" else raw).decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text)
        if size >= cap:
            break
    return "\n\n".join(parts)[:cap]


def build_corpus(root: Path) -> None:
    import sklearn

    shakespeare = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    prose = [shakespeare] if shakespeare.is_file() else sorted(Path("/usr/share/common-licenses").glob("*"))
    data_dir = Path(sklearn.__file__).parent / "datasets" / "data"
    domains = {"code": stdlib_files(), "prose": prose,
               "data": sorted(data_dir.glob("*.csv")) + sorted(data_dir.glob("*.csv.gz"))}
    for name, files in domains.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        text = gather(files, CAP)
        (root / name / f"{name}.txt").write_text(text, encoding="utf-8")
        print(f"{name}: {len(text):,} characters from {len(files)} candidate files")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/domains", type=Path)
    ap.add_argument("--max-steps", type=int, default=600)
    args = ap.parse_args()
    corpus = args.out / "corpus"
    build_corpus(corpus)
    config = small()
    config = dataclasses.replace(config, data=DataConfig(path=str(corpus)),
                                 train=dataclasses.replace(config.train, max_steps=args.max_steps))
    init = args.out / "init"
    init.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.train.seed)
    save_config(init, config)
    save_checkpoint(init, 0, Transformer(config.model), {"step": 0})
    train(config, args.out / "trained", overwrite=True)  # the example's own output, rerun
    for name in ("init", "trained"):
        subprocess.run([sys.executable, "-m", "moekit", "inspect", str(args.out / name), "--data", str(corpus),
                        "--out", str(args.out / f"inspect_{name}"), "--no-progress"], check=True)


if __name__ == "__main__":
    main()
