"""Turning routing statistics into a terminal table, PNG plots, one self-contained HTML
report and JSON. Plots need matplotlib (``pip install moekit[plot]``); the table uses rich
when it is installed."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from moekit.analysis.stats import (
    BALANCED_MAX_OVER_MEAN,
    COLLAPSED_SHARE_OF_MAX,
    STARVING_SHARE,
    LayerStats,
)

THRESHOLDS = (f"balanced: busiest expert <= {BALANCED_MAX_OVER_MEAN}x the mean load and none below "
              f"{STARVING_SHARE:.0%} of it; collapsed: busiest >= {COLLAPSED_SHARE_OF_MAX:.0%} of the most "
              "possible (every token picks it) or more than half the experts below "
              f"{STARVING_SHARE:.0%} of the mean; imbalanced otherwise")

COLUMNS = ["layer", "verdict", "max/mean", "cv", "dropped", "H/token", "H(mean)", "top1 p", "margin", "z mean",
           "spec."]


def table_rows(stats: list[LayerStats]) -> list[list[str]]:
    rows = []
    for s in stats:
        rows.append([str(s.layer), s.verdict, f"{s.max_over_mean:.2f}", f"{s.cv:.2f}", f"{s.dropped_rate:.1%}",
                     f"{s.entropy_per_token:.2f}", f"{s.entropy_of_mean:.2f}", f"{s.top1_prob:.2f}",
                     f"{s.top1_top2_margin:.2f}", f"{s.z_mean:.2f}",
                     "-" if s.specialisation is None else f"{s.specialisation:.3f}"])
    return rows


def print_table(stats: list[LayerStats], title: str = "routing per MoE layer") -> None:
    """A line per layer with its verdict; rich when installed, plain text otherwise."""
    rows = table_rows(stats)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
        print(title)
        print("  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths)))
        for r in rows:
            print("  ".join(v.rjust(w) for v, w in zip(r, widths)))
        print(THRESHOLDS)
        return
    colour = {"balanced": "green", "imbalanced": "yellow", "collapsed": "red"}
    t = Table(title=title, caption=THRESHOLDS)
    for c in COLUMNS:
        t.add_column(c, justify="right")
    for r in rows:
        r = list(r)
        r[1] = f"[{colour[r[1]]}]{r[1]}[/]"
        t.add_row(*r)
    console = Console()
    if not console.is_terminal:  # piped or logged: do not squeeze the columns to 80
        console = Console(width=140)
    console.print(t)


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'moekit[plot]'") from None
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_load(stats: list[LayerStats], path: Path) -> Path:
    """Heatmap: share of each layer's routed slots per expert (1/E everywhere = balanced)."""
    import numpy as np

    plt = _plt()
    load = np.array([s.tokens_per_expert for s in stats], dtype=float)
    share = load / np.maximum(load.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * load.shape[1], 1.0 + 0.4 * len(stats)))
    im = ax.imshow(share, cmap="viridis", aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(stats)), [str(s.layer) for s in stats])
    ax.set_title(f"share of routed tokens (balanced = {1 / load.shape[1]:.3f})")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_matrices(stats: list[LayerStats], key: str, path: Path, title: str) -> Path:
    """One heatmap per layer: ``coactivation`` (E x E) or ``label_expert`` (rows normalised)."""
    import numpy as np

    plt = _plt()
    n = len(stats)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows), squeeze=False)
    for ax, s in zip(axes.flat, stats):
        m = np.array(getattr(s, key), dtype=float)
        if key == "label_expert":
            m = m / np.maximum(m.sum(1, keepdims=True), 1)
            ax.set_yticks(range(len(s.labels)), s.labels)
            spec = "" if s.specialisation is None else f"  score {s.specialisation:.3f}"
            ax.set_title(f"layer {s.layer}{spec}", fontsize=9)
        else:
            ax.set_title(f"layer {s.layer}", fontsize=9)
        im = ax.imshow(m, cmap="magma", aspect="auto")
        ax.set_xlabel("expert", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def plot_dynamics(dynamics: dict, path: Path) -> Path:
    """Max/mean load, load entropy and (when logged) mean router entropy per token, per
    layer over training steps."""
    plt = _plt()
    logged = any(e is not None for d in dynamics["layers"].values() for e in d["router_entropy"])
    fig, axes = plt.subplots(1, 3 if logged else 2, figsize=(14 if logged else 10, 3.5))
    a, b = axes[0], axes[1]
    for i, d in dynamics["layers"].items():
        a.plot(dynamics["steps"], d["max_over_mean"], label=f"layer {i}")
        b.plot(dynamics["steps"], d["load_entropy"], label=f"layer {i}")
        if logged:
            points = [(s, e) for s, e in zip(dynamics["steps"], d["router_entropy"]) if e is not None]
            axes[2].plot([p[0] for p in points], [p[1] for p in points], label=f"layer {i}")
    a.set_title("busiest expert / mean load")
    b.set_title("entropy of the load (nats)")
    if logged:
        axes[2].set_title("router entropy per token (nats)")
    for ax in axes:
        ax.set_xlabel("step")
    a.legend(fontsize=7)
    return _save(fig, path)


def plot_tokens(pieces: list[str], routes: dict[int, list[list[int]]], num_experts: int, path: Path) -> Path:
    """Each layer a row of the sample text's tokens, coloured by their top-1 expert."""
    plt = _plt()
    cmap = plt.get_cmap("tab20" if num_experts > 10 else "tab10")
    n = min(len(pieces), 80)
    fig, ax = plt.subplots(figsize=(min(0.16 * n + 2, 18), 0.45 * len(routes) + 1.2))
    for row, (layer, r) in enumerate(sorted(routes.items())):
        for i in range(n):
            ax.add_patch(plt.Rectangle((i, row), 1, 0.9, color=cmap(r[i][0] % cmap.N)))
            text = pieces[i].replace("\n", "⏎").replace(" ", "·")
            ax.text(i + 0.5, row + 0.45, text[:3], ha="center", va="center", fontsize=6)
    ax.set_xlim(0, n)
    ax.set_ylim(0, len(routes))
    ax.set_yticks([r + 0.45 for r in range(len(routes))], [f"layer {layer}" for layer in sorted(routes)])
    ax.set_xticks([])
    ax.set_title("top-1 expert of each token (colour = expert)")
    return _save(fig, path)


def write_html(path: Path, title: str, summary: dict, stats: list[LayerStats], images: dict[str, Path],
               extra_tables: dict[str, list[list[str]]] | None = None) -> Path:
    """One self-contained HTML file: the table, the plots embedded as base64 PNGs."""
    def table(header, rows):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}img{max-width:100%}")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{style}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             "<ul>" + "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in summary.items()) + "</ul>",
             "<h2>Routing per layer</h2>", table(COLUMNS, table_rows(stats)),
             f"<p>{html.escape(THRESHOLDS)}</p>"]
    for name, rows in (extra_tables or {}).items():
        parts += [f"<h2>{html.escape(name)}</h2>", table(rows[0], rows[1:])]
    for name, img in images.items():
        data = base64.b64encode(Path(img).read_bytes()).decode()
        parts += [f"<h2>{html.escape(name)}</h2>", f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"]
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def write_json(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return path
