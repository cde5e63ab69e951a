"""``moekit inspect``: everything about one model's routing over a corpus, in one call.

:func:`inspect_model` loads a moekit run or a Hugging Face directory, runs it over a corpus
in batches (routing statistics per layer, with char-class labels, or domain labels when the
data folder holds one sub-folder per domain), measures routing consistency under router
jitter and expert similarity, reads the training dynamics from ``metrics.jsonl`` when
there is one, routes a sample text token by token, prints the table and writes plots, an
HTML report and JSON.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moekit.analysis.collect import (
    expert_similarity,
    jitter_consistency,
    moe_layers,
    routing_stats,
    token_routes,
    training_dynamics,
    windows,
)
from moekit.analysis.labels import CHAR_CLASSES, domain_corpus, token_class_labels
from moekit.analysis.report import (
    plot_dynamics,
    plot_load,
    plot_matrices,
    plot_tokens,
    print_table,
    write_html,
    write_json,
)


def _corpus(path: Path, loaded, data: str | None, max_tokens: int):
    """(label names, token stream, label stream, description)."""
    tok = loaded.tokenizer
    if data is not None and Path(data).is_dir() and sum(p.is_dir() for p in Path(data).iterdir()) >= 2:
        names, streams = domain_corpus(data, tok, max_chars_per_domain=max_tokens * 8)
        per = max_tokens // len(streams)
        streams = [s[:per] for s in streams]
        labels = [torch.full_like(s, i) for i, s in enumerate(streams)]
        return names, torch.cat(streams), torch.cat(labels), f"domains of {Path(data).name}/ ({', '.join(names)})"
    from moekit.data.corpus import load_text

    if data is None and loaded.source == "moekit":
        from moekit.checkpoint import load_config, run_dir_of

        cfg = load_config(run_dir_of(path)[0]).data
        text = load_text(cfg.path, cfg.suffixes, max_chars=max_tokens * 8)
        where = cfg.path or "the Python standard library"
    elif data is None:
        raise ValueError("a Hugging Face model has no training corpus on record: pass --data PATH")
    else:
        text = load_text(data, max_chars=max_tokens * 8)
        where = data
    ids = torch.as_tensor(np.asarray(tok.encode(text)).astype(np.int64))[-max_tokens:]  # the end: validation side
    return CHAR_CLASSES, ids, token_class_labels(ids, tok), f"{where}, labelled by character class"


def inspect_model(
    path: str | Path,
    data: str | None = None,
    out: str | Path | None = None,
    text: str | None = None,
    max_tokens: int = 32768,
    seq_len: int = 256,
    batch_size: int = 8,
    jitter: float = 0.01,
    progress: bool = True,
    quiet: bool = False,
) -> dict:
    """Analyse the model at ``path``; returns the JSON payload (also written to
    ``out/inspect.json`` with the plots and ``out/report.html`` when ``out`` is given)."""
    from moekit.interop import load_model

    path = Path(path)
    loaded = load_model(path)
    model, tok = loaded.model, loaded.tokenizer
    if tok is None:
        raise ValueError(f"{path} has no tokenizer: moekit inspect needs one to read text")
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{path} holds a model with no MoE layer (a dense baseline?): nothing to inspect")
    seq_len = min(seq_len, model.config.max_seq_len)
    names, ids, labels, described = _corpus(path, loaded, data, max_tokens)
    n_batches = -(-(ids.numel() // seq_len) // batch_size)
    stats = routing_stats(model, windows(ids, labels, seq_len, batch_size), names, progress, n_batches)
    consistency = jitter_consistency(model, (t for t, _ in windows(ids, None, seq_len, batch_size, 4 * seq_len * batch_size)),
                                     jitter)
    similarity = {i: expert_similarity(m) for i, m in layers}
    sample = text or loaded.tokenizer.decode(ids[:120].tolist())
    sample_ids = torch.as_tensor(np.asarray(tok.encode(sample)).astype(np.int64))[: model.config.max_seq_len]
    routes = token_routes(model, sample_ids)
    pieces = [tok.decode([int(i)]) for i in sample_ids.tolist()]
    metrics = path / "metrics.jsonl" if (path / "metrics.jsonl").is_file() else path.parent / "metrics.jsonl"
    dynamics = training_dynamics(metrics) if loaded.source == "moekit" and metrics.is_file() else None

    def off_diagonal_max(m: torch.Tensor) -> float:
        return float((m - 2 * torch.eye(m.shape[0])).max()) if m.shape[0] > 1 else 0.0

    payload = {
        "model": str(path),
        "source": loaded.source,
        "corpus": described,
        "tokens": int(stats[0].tokens) if stats else 0,
        "labels": names,
        "layers": [s.to_dict() for s in stats],
        "jitter": jitter,
        "jitter_consistency": {str(i): c for i, c in consistency.items()},
        "expert_similarity": {str(i): m.tolist() for i, m in similarity.items()},
        "max_expert_similarity": {str(i): off_diagonal_max(m) for i, m in similarity.items()},
        "sample": {"text": sample, "tokens": pieces, "routes": {str(i): r for i, r in routes.items()}},
        "dynamics": dynamics,
    }
    if not quiet:
        print(f"{path} ({loaded.source}): {payload['tokens']:,} tokens of {described}")
        print_table(stats)
        for i, c in consistency.items():
            print(f"layer {i}: under router jitter {jitter}, {c['top1_kept']:.1%} of tokens keep their top-1 expert, "
                  f"{c['set_kept']:.1%} their whole set; most similar expert pair: cosine "
                  f"{payload['max_expert_similarity'][str(i)]:.3f}")
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        images = {"Load per expert": plot_load(stats, out / "load.png")}
        if any(s.top1_prob < 1 and len(s.coactivation) > 1 for s in stats) and layers[0][1].config.top_k >= 2:
            images["Co-activation (fraction of tokens choosing both)"] = plot_matrices(
                stats, "coactivation", out / "coactivation.png", "co-activation")
        images["Specialisation (label x expert, rows sum to 1)"] = plot_matrices(
            stats, "label_expert", out / "specialisation.png", f"specialisation: {described}")
        if dynamics and dynamics["steps"]:
            images["Balance and entropy over training"] = plot_dynamics(dynamics, out / "dynamics.png")
        images["Sample text by top-1 expert"] = plot_tokens(pieces, routes, layers[0][1].config.num_experts,
                                                              out / "tokens.png")
        consistency_rows = [["layer", "top-1 kept", "set kept", "max expert cosine"]] + [
            [str(i), f"{c['top1_kept']:.1%}", f"{c['set_kept']:.1%}", f"{payload['max_expert_similarity'][str(i)]:.3f}"]
            for i, c in consistency.items()]
        write_html(out / "report.html", f"moekit inspect: {path}",
                   {"model": str(path), "source": loaded.source, "corpus": described, "tokens": payload["tokens"]},
                   stats, images, {f"Routing consistency under jitter {jitter}, expert similarity": consistency_rows})
        write_json(out / "inspect.json", payload)
        if not quiet:
            print(f"report: {out / 'report.html'}  numbers: {out / 'inspect.json'}")
    return payload
