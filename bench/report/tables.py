"""Tables: markdown + CSV + JSON, each carrying its provenance header.

Every table states the profile, data source (proxy or real), device,
precision, batch size, torch/timm/mmseg versions, git commit and date.  Rows
are only ever built from measured records (the result cache); published
numbers appear only in the published-vs-reproduced table, beside ours, with
their source.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pandas as pd

from bench.runtime.proxy_ranking import CHECKED
from bench.runtime.results import atomic_write_json, atomic_write_text

PROXY_WARNING = (
    "**Proxy data.** Accuracy / mIoU columns are measured on the suite's synthetic proxy dataset with the "
    "proxy backbone; they are NOT ImageNet or ADE20K numbers and must not be compared with published accuracies."
)


FIXTURE_WARNING = (
    "**Fixture run.** `--profile paper --fixture` runs the paper profile's code on small fixture data with a tiny "
    "random-weight model: it tests the real code path; none of its numbers is a result."
)


def header_lines(title: str, meta: dict) -> list[str]:
    keys = [
        ("profile", "profile"),
        ("fixture run", "fixture"),
        ("stages", "stages"),
        ("data source", "data_source"),
        ("device", "device"),
        ("precision", "precision"),
        ("batch size", "batch_size"),
        ("torch", "torch"),
        ("timm", "timm"),
        ("mmseg", "mmseg"),
        ("commit", "commit"),
        ("date", "date"),
        ("command", "command"),
        ("job workers", "job_workers"),
        ("profile overrides", "profile_overrides"),
        ("proxy backbone", "proxy_backbone"),
    ]
    fixture = bool(meta.get("fixture"))
    lines = [f"## {title}" + (" [fixture run]" if fixture else ""), ""]
    for label, k in keys:
        if k in meta and meta[k] not in (None, ""):
            lines.append(f"- {label}: {meta[k]}")
    for note in meta.get("notes", []):
        lines.append(f"- {note}")
    if meta.get("data_source") == "proxy":
        lines += ["", PROXY_WARNING, "", CHECKED]
    if fixture:
        lines += ["", FIXTURE_WARNING]
    lines.append("")
    return lines


def _fmt(v):
    if isinstance(v, float):
        if v != v:  # NaN
            return ""
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return "" if v is None else v


def _full_specs(df: pd.DataFrame) -> list[str]:
    """A footnote giving every short reducer spec of the table with all its options resolved."""
    if "config" not in df.columns or "config_full" not in df.columns:
        return []
    pairs = dict(zip(df["config"], df["config_full"]))
    lines = ["", "Reducer specs with every option resolved:", ""]
    lines += [f"- `{k}`: `{v}`" for k, v in pairs.items() if isinstance(v, str)]
    return lines


def write_table(out_dir: Path, name: str, title: str, rows: list[dict], meta: dict,
                columns: Optional[list[str]] = None) -> pd.DataFrame:
    """Write ``name``.md/.csv/.json under ``out_dir``; returns the DataFrame."""
    out_dir = Path(out_dir)
    full = pd.DataFrame(rows)
    df = full
    if columns:
        cols = [c for c in columns if c in full.columns]
        df = full[cols + [c for c in full.columns if c not in cols]]  # CSV/JSON: every field of the rows
    md_df = full[[c for c in columns if c in full.columns]] if columns else full
    md = header_lines(title, meta)
    if df.empty:
        md.append("_no rows (nothing measured for this table in this profile)_")
    else:
        md.append(md_df.map(_fmt).to_markdown(index=False))
        md += _full_specs(full)
    md.append("")
    atomic_write_text(out_dir / f"{name}.md", "\n".join(md))
    stamp_cols = {k: meta.get(k) for k in ("profile", "data_source", "device", "commit")}
    csv_df = df.copy()
    for k, v in stamp_cols.items():
        if k not in csv_df.columns:
            csv_df[k] = v
    atomic_write_text(out_dir / f"{name}.csv", csv_df.to_csv(index=False))
    atomic_write_json(out_dir / f"{name}.json", {"meta": meta, "title": title, "rows": _json_rows(df, rows)})
    return df


def _json_rows(df: pd.DataFrame, rows: list[dict]) -> list[dict]:
    """The JSON file's rows: pandas' conversion (NaN -> null, numpy -> Python numbers), except that a column
    whose measured values are all integers stays integer (pandas stores an integer column with a missing
    value as floats: a count of 7 would read 7.0)."""
    out = json.loads(df.to_json(orient="records"))
    for c in df.columns:
        vals = [r.get(c) for r in rows if r.get(c) is not None]
        if vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            for o in out:
                if o.get(c) is not None:
                    o[c] = int(o[c])
    return out
