"""Published numbers (``paper_numbers.csv``), mapped onto the suite's model names and reducer specs.

The CSV ships with the package (``bench/data_files/paper_numbers.csv``; its sources are named in
its ``source`` column and in docs/methods/).  Only rows whose model and
configuration the suite can express are mapped; the rest are kept with the
reason they are not comparable.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Optional

CSV_PATH = Path(__file__).resolve().parents[1] / "data_files" / "paper_numbers.csv"

MODEL_MAP = {
    "DeiT-T": "deit_tiny_patch16_224",
    "DeiT-Ti/16": "deit_tiny_patch16_224",
    "DeiT-S": "deit_small_patch16_224",
    "DeiT-S/16": "deit_small_patch16_224",
    "DeiT-B": "deit_base_patch16_224",
    "ViT-B/16 (README name PM-ViT-MAE-base)": "vit_base_patch16_224",
}


def load_rows(path: Optional[Path] = None) -> list[dict]:
    p = Path(path) if path else CSV_PATH
    if not p.exists():
        raise FileNotFoundError(f"paper_numbers.csv not found at {p}")
    with open(p, newline="") as f:
        return list(csv.DictReader(f))


def _num(s: str) -> Optional[float]:
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def spec_for(method: str, config: str) -> Optional[str]:
    """Map a CSV (method, config) to a reducer spec, or None if the suite cannot express it.

    ``method`` names a registered reducer (case-insensitively; a built-in or a plug-in), ``config``
    lists that method's options as ``k=v;k=v``.  A row whose config has a tag the method has no
    option for (a resolution, a protocol) or a value it refuses is not comparable.  A row stating no
    option at all is comparable only when the method declares that its defaults are the published
    setting (``Reducer.defaults_are_published``); otherwise a headline without a configuration would be
    compared with an arbitrary default."""
    from bench.core import registry

    name = (method or "").strip().lower()
    if name == "none":
        return "none"
    if name not in registry.available():
        return None  # e.g. "ToMe (ablation)" rows, or methods the suite does not implement
    parts = [p.strip() for p in (config or "").split(";") if p.strip()]
    if any("=" not in p for p in parts):
        return None  # e.g. resolution/protocol tags we do not model
    if not parts and not registry.get(name).defaults_are_published:
        return None
    spec = name + (":" + ",".join(re.sub(r"\s+", "", p) for p in parts) if parts else "")
    try:
        registry.build(spec)
    except Exception:  # an option this method does not have, or a value it refuses
        return None
    return spec


def comparable_rows(task: str = "imagenet") -> list[dict]:
    """Rows with a model and spec the suite can express, with numeric fields parsed."""
    out = []
    for r in load_rows():
        if r["task"] != task:
            continue
        model = MODEL_MAP.get(r["model"])
        spec = spec_for(r["method"], r["config"])
        if model is None or spec is None:
            continue
        out.append({
            **r,
            "timm_model": model,
            "spec": spec,
            "top1_f": _num(r["top1"]),
            "gmacs_f": _num(r["gmacs"]),
            "img_s_f": _num(r["throughput_img_s"]),
        })
    return out


def published_speedups(rows: list[dict]) -> dict:
    """Speed-ups a source implies: reduced img/s over the same source's baseline img/s (same hardware)."""
    base = {}
    for r in rows:
        if r["spec"] == "none" and r["img_s_f"]:
            base[(r["source"], r["timm_model"])] = r["img_s_f"]
    out = {}
    for r in rows:
        b = base.get((r["source"], r["timm_model"]))
        if r["spec"] != "none" and r["img_s_f"] and b:
            out[(r["source"], r["timm_model"], r["spec"])] = r["img_s_f"] / b
    return out


def normalise_spec(spec: str) -> str:
    """Canonical spec via the registry, so 'evit:keep=0.70' and 'evit:keep=0.7' compare equal."""
    from bench.core import registry

    try:
        return registry.build(spec).spec()
    except Exception:
        return re.sub(r"\s+", "", spec)


def uses_paper_count(row: dict) -> bool:
    """Whether a comparable row's GFLOPs were made with its method's own rule rather than the suite's
    count: its source is one of the method's ``Reducer.paper_count_sources``."""
    from bench.core import registry

    if row["spec"] == "none":
        return False
    return row["source"] in registry.build(row["spec"]).paper_count_sources


def gmacs_agreement(ours: Optional[float], published: Optional[float]) -> Optional[str]:
    """How our GMACs relate to a published one-decimal figure.

    ``within 0.05``: the figure is ours rounded (or closer).  ``ours truncated``: the figure is our
    count cut to one decimal (published <= ours < published + 0.1), as DynamicViT's README prints its
    fvcore counts (tests/test_dynamicvit.py) and as some baseline rows are copied.  ``differs``:
    neither."""
    if ours is None or published is None:
        return None
    if abs(ours - published) <= 0.05 + 1e-9:
        return "within 0.05"
    if round(published, 1) == published and published <= ours + 1e-9 < published + 0.1:
        return "ours truncated"
    return "differs"
