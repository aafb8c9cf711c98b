"""Plots (matplotlib, Agg): accuracy vs GMACs / throughput Pareto fronts, segmentation mIoU vs
GMACs, and per-block token counts per method."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _front(points):
    """Points sorted by cost; one line per method."""
    return sorted(points)


def _save(fig, out: Path, name: str, figs: list) -> None:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    figs.append(name)


def _scatter_by_method(rows, xkey, ykey, title, xlabel, ylabel, out, name, figs, label_key="method"):
    by = {}
    for r in rows:
        if r.get(xkey) is None or r.get(ykey) is None:
            continue
        by.setdefault(r[label_key], []).append((float(r[xkey]), float(r[ykey])))
    if not by:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m, pts in sorted(by.items()):
        pts = _front(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out, name, figs)


def write_all(ctx, out: Path) -> list:
    figs: list = []
    src = ctx.profile["data_source"]
    acc = ctx.tables.get("accuracy", {}).get("rows", [])
    if acc:
        for kind in ("off-the-shelf", "fine-tuned"):
            rows = [r for r in acc if r.get("kind") == kind]
            _scatter_by_method(rows, "gmacs", "top1", f"top-1 vs GMACs ({kind}, {src} data)", "GMACs",
                               f"top-1 (%) on {src} val", out, f"acc_vs_gmacs_{kind.replace('-', '_')}.png", figs)
            _scatter_by_method(rows, "speedup", "top1", f"top-1 vs measured speed-up ({kind}, {src} data)",
                               "speed-up vs unreduced (measured)", f"top-1 (%) on {src} val", out,
                               f"acc_vs_speedup_{kind.replace('-', '_')}.png", figs)
    seg = ctx.tables.get("segmentation", {}).get("rows", [])
    if seg:
        _scatter_by_method(seg, "gmacs_per_window", "miou", f"mIoU vs GMACs (Segmenter, {src} data)",
                           "GMACs per window", "mIoU (%)", out, "seg_miou_vs_gmacs.png", figs)
    blocks = getattr(ctx, "block_tokens", [])
    if blocks:
        model = blocks[0]["model"]
        sel = [b for b in blocks if b["model"] == model]
        fig, ax = plt.subplots(figsize=(7.2, 4.6))
        for b in sel:
            if b["config"] == "none":
                continue
            ax.plot(range(len(b["mlp_tokens"])), b["mlp_tokens"], marker=".", label=b["config"], alpha=0.8)
        ax.set_xlabel("block")
        ax.set_ylabel("tokens processed by the MLP")
        ax.set_title(f"Per-block token counts ({model})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        _save(fig, out, "tokens_per_block.png", figs)
    return figs
