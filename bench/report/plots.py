"""Plots (matplotlib, Agg): accuracy vs GMACs / measured speed-up, segmentation mIoU vs GMACs, and
per-block token counts (one panel per method).

Conventions shared by every plot: one colour per method (:func:`method_colour`, the same in every
figure; plug-in methods get a stable colour of their own from their name), the unreduced model drawn
as a black star and dashed line, and axis labels that name the model whose GMACs or speed-ups they
show (e.g. "GMACs of the proxy ViT").
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BASELINE_COLOUR = "#222222"
METHOD_COLOURS = {
    "pm": "#d62728",  # red
    "tome": "#1f77b4",  # blue
    "evit": "#2ca02c",  # green
    "dynamicvit": "#9467bd",  # purple
    "mstm": "#ff7f0e",  # orange
}
_SPARE = ["#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f", "#aec7e8", "#98df8a", "#c5b0d5"]
BASELINE_CONFIGS = ("none", "baseline")
_STYLES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D", "v", "P"]


def method_colour(method: str) -> str:
    """The colour of ``method`` in every plot (a label like 'mstm (restore=own)' takes its method's)."""
    base = str(method).split(" ", 1)[0].split(":", 1)[0]
    if base in BASELINE_CONFIGS:
        return BASELINE_COLOUR
    if base in METHOD_COLOURS:
        return METHOD_COLOURS[base]
    return _SPARE[zlib.crc32(base.encode()) % len(_SPARE)]


def _save(fig, out: Path, name: str, figs: list) -> None:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    figs.append(name)


def _baseline(ax, x, y, label="unreduced model") -> None:
    """The unreduced model: a black star, with a dashed line at its accuracy."""
    ax.axhline(y, color=BASELINE_COLOUR, ls="--", lw=0.9, alpha=0.7)
    if x is not None:
        ax.plot([x], [y], marker="*", ms=13, color=BASELINE_COLOUR, ls="none", label=label, zorder=5)
    else:
        ax.plot([], [], color=BASELINE_COLOUR, ls="--", label=label)


@dataclass
class _Scatter:
    """One figure of :func:`_scatter_by_method`: ``xkey`` / ``ykey`` of the rows against each other,
    saved as ``name``; ``baseline``: (x, y) of the unreduced model (x None: only its line);
    ``xline``: a vertical reference (speed-up 1); ``label_key``: the row key naming a line."""
    xkey: str
    ykey: str
    title: str
    xlabel: str
    ylabel: str
    name: str
    baseline: Optional[tuple] = None
    xline: Optional[float] = None
    label_key: str = "method"


def _scatter_by_method(rows, spec: _Scatter, out, figs) -> None:
    """One line per method (sorted by x), coloured by method (see :class:`_Scatter`)."""
    xkey, ykey, label_key, baseline, xline = spec.xkey, spec.ykey, spec.label_key, spec.baseline, spec.xline
    by = {}
    for r in rows:
        if r.get(xkey) is None or r.get(ykey) is None:
            continue
        if str(r.get("config", "")) in BASELINE_CONFIGS or str(r.get(label_key)) in BASELINE_CONFIGS:
            continue  # drawn as the baseline
        by.setdefault(str(r[label_key]), []).append((float(r[xkey]), float(r[ykey])))
    if not by:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if baseline is not None and baseline[1] is not None:
        _baseline(ax, baseline[0], float(baseline[1]))
    if xline is not None:
        ax.axvline(xline, color=BASELINE_COLOUR, ls=":", lw=0.9, alpha=0.6)
    variants: dict = {}
    for m, pts in sorted(by.items()):
        pts = sorted(pts)
        base = m.split(" ", 1)[0]
        k = variants.setdefault(base, [])
        k.append(m)
        i = len(k) - 1
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=_MARKERS[i % len(_MARKERS)],
                ls=_STYLES[i % len(_STYLES)], color=method_colour(m), label=m)
    ax.set_xlabel(spec.xlabel)
    ax.set_ylabel(spec.ylabel)
    ax.set_title(spec.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    _save(fig, out, spec.name, figs)


def _accuracy_plots(ctx, acc: list, src: str, out: Path, figs: list) -> None:
    ref = ctx.speedup_ref
    models = list(dict.fromkeys(r.get("model") for r in acc))
    for model in models:
        mrows = [r for r in acc if r.get("model") == model]
        base = next((r for r in mrows if r.get("config") == "none" and r.get("kind") == "off-the-shelf"), None)
        suffix = "" if len(models) == 1 else "_" + str(model).replace(" ", "_").replace("/", "_")
        for kind in ("off-the-shelf", "fine-tuned"):
            rows = [r for r in mrows if r.get("kind") == kind]
            tag = kind.replace("-", "_")
            ylabel = f"top-1 (%) of the {model} on {src} val"
            _scatter_by_method(rows, _Scatter("gmacs", "top1", f"top-1 vs GMACs ({kind}, {src} data)",
                                              f"GMACs of the {model}", ylabel, f"acc_vs_gmacs_{tag}{suffix}.png",
                                              baseline=(base["gmacs"], base["top1"]) if base else None), out, figs)
            where = f"measured at the {ref} size" if ref else "measured"
            _scatter_by_method(rows, _Scatter("speedup", "top1", f"top-1 vs measured speed-up ({kind}, {src} data)",
                                              f"speed-up vs the unreduced model ({where})", ylabel,
                                              f"acc_vs_speedup_{tag}{suffix}.png",
                                              baseline=(1.0, base["top1"]) if base else None, xline=1.0), out, figs)


def _seg_plot(seg: list, src: str, out: Path, figs: list) -> None:
    cms = list(dict.fromkeys(r.get("config_model") for r in seg))
    for cm in cms:
        rows = [r for r in seg if r.get("config_model") == cm]
        base = next((r for r in rows if r.get("config") == "none"), None)
        name = "seg_miou_vs_gmacs.png" if len(cms) == 1 else f"seg_miou_vs_gmacs_{cm}.png"
        model = "proxy Segmenter" if cm == "proxy" else f"Segmenter {str(cm).upper()}"
        _scatter_by_method(rows, _Scatter("gmacs_per_window", "miou", f"mIoU vs GMACs ({model}, {src} data)",
                                          f"GMACs per window of the {model}", "mIoU (%)", name,
                                          baseline=(base["gmacs_per_window"], base["miou"])
                                          if base and base.get("miou") is not None else None), out, figs)


def _short_cfg(spec: str) -> str:
    return spec.split(":", 1)[1] if ":" in spec else spec


def tokens_plot(blocks: list, out: Path, figs: list, name: str = "tokens_per_block.png") -> None:
    """Small multiples: one panel per method, its configurations in its colour, the unreduced model's
    tokens per block as a dashed black line in every panel, a shared y axis."""
    if not blocks:
        return
    model = blocks[0]["model"]
    sel = [b for b in blocks if b["model"] == model]
    base = next((b for b in sel if b["config"] in BASELINE_CONFIGS), None)
    by: dict = {}
    for b in sel:
        if b["config"] in BASELINE_CONFIGS:
            continue
        by.setdefault(b["config"].split(":", 1)[0], []).append(b)
    if not by:
        return
    from bench.pipeline.stages.common import short_model

    n = len(by)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), sharex=True, sharey=True,
                             squeeze=False)
    top = max(max(b["mlp_tokens"]) for b in sel)
    for ax, (method, bl) in zip(axes.flat, sorted(by.items())):
        if base is not None:
            ax.plot(range(len(base["mlp_tokens"])), base["mlp_tokens"], color=BASELINE_COLOUR, ls="--", lw=1.0,
                    label="unreduced")
        for i, b in enumerate(bl):
            ax.plot(range(len(b["mlp_tokens"])), b["mlp_tokens"], color=method_colour(method),
                    ls=_STYLES[i % len(_STYLES)], marker=_MARKERS[i % len(_MARKERS)], ms=3,
                    alpha=1.0 - 0.12 * (i % 4), label=_short_cfg(b["config"]))
        ax.set_title(method, fontsize=10, color=method_colour(method))
        ax.set_ylim(0, top * 1.08)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="lower left", framealpha=0.85)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("block")
    for ax in axes[:, 0]:
        ax.set_ylabel("tokens into the MLP")
    fig.suptitle(f"Tokens per block ({short_model(model)}; one panel per method)", fontsize=10)
    _save(fig, out, name, figs)


def write_all(ctx, out: Path) -> list:
    figs: list = []
    src = ctx.profile["data_source"]
    acc = ctx.tables.get("accuracy", {}).get("rows", [])
    if acc:
        _accuracy_plots(ctx, acc, src, out, figs)
    seg = ctx.tables.get("segmentation", {}).get("rows", [])
    if seg:
        _seg_plot(seg, src, out, figs)
    tokens_plot(ctx.block_tokens, out, figs)
    return figs
