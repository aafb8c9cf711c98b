"""Write every table, the published-vs-reproduced comparison, the plots and the results page."""
from __future__ import annotations

import json
from pathlib import Path

from . import plots, published
from .report import PROXY_WARNING, write_table
from .results import atomic_write_json, atomic_write_text


def _published_table(ctx) -> None:
    """Table 4: every published row the profile covers, next to ours."""
    flops_rows = ctx.tables.get("flops", {}).get("rows", [])
    speed_rows = ctx.tables.get("throughput", {}).get("rows", [])
    acc_rows = ctx.tables.get("accuracy", {}).get("rows", [])
    ours_flops = {(r["timm_model"], published.normalise_spec(r["config"])): r for r in flops_rows}
    ours_speed = {}
    for r in speed_rows:
        if r.get("variant", "eager") != "eager":  # plain-timm baselines (compile, channels-last) are not configs
            continue
        ours_speed.setdefault((r["model"], published.normalise_spec(r["config"])), r["speedup"])
    from .stages.common import short_model

    pub = published.comparable_rows("imagenet")
    pub_sp = published.published_speedups(pub)
    proxy = ctx.profile["data_source"] == "proxy"
    rows = []
    for p in pub:
        spec = published.normalise_spec(p["spec"])
        key = (p["timm_model"], spec)
        fr = ours_flops.get(key, {})
        og, count = fr.get("gmacs"), "suite"
        if published.uses_paper_count(p) and fr.get("paper_count_gmacs") is not None:
            og, count = fr["paper_count_gmacs"], "method paper's rule"
        osp = ours_speed.get((short_model(p["timm_model"]), spec))
        psp = pub_sp.get((p["source"], p["timm_model"], p["spec"]))
        if og is None and osp is None:
            continue
        row = {
            "model": p["model"], "config": spec, "source": p["source"], "confidence": p["confidence"],
            "trained": p["trained"],
            "published_gmacs": p["gmacs_f"], "ours_gmacs": og, "ours_count": count if og is not None else None,
            "gmacs_diff": round(og - p["gmacs_f"], 3) if (og is not None and p["gmacs_f"] is not None) else None,
            "gmacs_agree": published.gmacs_agreement(og, p["gmacs_f"]),
            "published_speedup": round(psp, 3) if psp else None, "published_hw": p["hardware"],
            "ours_speedup": osp,
            "published_top1": p["top1_f"],
        }
        if not proxy:
            ours_top1 = next((a["top1"] for a in acc_rows if a.get("timm_model") == p["timm_model"]
                              and published.normalise_spec(a["config"]) == spec), None)
            row["ours_top1"] = ours_top1
        rows.append(row)
    notes = ["Published numbers from paper_numbers.csv (source column); ours measured by this run."]
    if proxy:
        notes.append("Proxy profile: only GMACs (counted at the real DeiT sizes) and speed-up ratios are comparable; "
                     "published top-1 is shown for reference only; our proxy accuracy is not an ImageNet accuracy.")
    notes.append("Speed-ups: ours on this run's device and batch size; published ones on the source's hardware.")
    notes.append("ours_count: 'suite' = the flops table's count; \"method paper's rule\" = the count the method's "
                 "own publication used, where it differs (flops table, paper_count_gmacs): DynamicViT's paper summed "
                 "the official per-layer formula without the predictors; the PM README uses PM's code formula.")
    notes.append("gmacs_agree: 'within 0.05' = the published figure is ours rounded; 'ours truncated' = it is our "
                 "count cut to one decimal (DynamicViT's README prints its fvcore counts, predictors included, that "
                 "way); 'differs' = neither.")
    ctx.add_table("published_vs_reproduced", "Published vs reproduced", rows,
                  ctx.meta(data_source=ctx.profile["data_source"], notes=notes),
                  ["model", "config", "source", "confidence", "trained", "published_gmacs", "ours_gmacs",
                   "ours_count", "gmacs_diff", "gmacs_agree", "published_speedup", "ours_speedup", "published_hw",
                   "published_top1", "ours_top1"])


ORDER = ["accuracy", "flops", "throughput", "segmentation", "pm_ablations", "pm_structure", "published_vs_reproduced"]


def _join_speedups(ctx) -> None:
    """Accuracy rows get the speed-up measured for the same config at the DeiT-S size (or the first
    measured model): the proxy shares DeiT's 196-token geometry."""
    acc = ctx.tables.get("accuracy", {}).get("rows", [])
    sp_rows = ctx.tables.get("throughput", {}).get("rows", [])
    if not acc or not sp_rows:
        return
    models = [r["model"] for r in sp_rows]
    ref = "DeiT-S" if "DeiT-S" in models else models[0]
    sp = {r["config"]: r["speedup"] for r in sp_rows
          if r["model"] == ref and r.get("variant", "eager") == "eager"}
    for r in acc:
        r["speedup"] = sp.get(r["config"])
    ctx.tables["accuracy"]["meta"].setdefault("notes", []).append(
        f"speedup column: measured at the {ref} size in this run (same 196-token geometry)")


def write_all(ctx, wall_s: float) -> None:
    out: Path = ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)
    _join_speedups(ctx)
    try:
        _published_table(ctx)
    except Exception as e:
        ctx.failures.append(f"published table: {e}")
    written = []
    for name in sorted(ctx.tables, key=lambda n: ORDER.index(n) if n in ORDER else 99):
        t = ctx.tables[name]
        write_table(out, name, t["title"], t["rows"], t["meta"], t["columns"])
        written.append((name, t["title"]))
    figs = []
    try:
        figs = plots.write_all(ctx, out)
    except Exception as e:
        ctx.failures.append(f"plots: {e}")
    prog = ctx.progress
    jobs = {"measured": prog.n_done - prog.n_cached, "from_cache": prog.n_cached}
    manifest = {"profile": ctx.profile["name"], "wall_s": round(wall_s, 1), "jobs": jobs,
                "tables": [n for n, _ in written],
                "plots": figs, "meta": ctx.meta(), "failures": ctx.failures}
    atomic_write_json(out / "manifest.json", manifest)
    lines = [f"# PM-Bench results: profile `{ctx.profile['name']}`", ""]
    m = ctx.meta()
    lines += [f"Generated by `{m['command']}` at commit `{m['commit']}` on {m['device']}, {m['date']} "
              f"(torch {m['torch']}, timm {m['timm']}, mmseg {m['mmseg']}); wall time {wall_s / 60:.1f} min "
              f"({jobs['measured']} jobs measured in this run, {jobs['from_cache']} taken from the result cache: "
              "measured before, in this run or an earlier one, under the same description; `--force` re-measures "
              "all).", ""]
    if ctx.profile["data_source"] == "proxy":
        lines += [PROXY_WARNING, ""]
    lines += ["## Tables", ""]
    for name, title in written:
        lines.append(f"- [{title}]({name}.md) ([csv]({name}.csv), [json]({name}.json))")
    if figs:
        lines += ["", "## Plots", ""]
        for f in figs:
            lines += [f"![{f}]({f})", ""]
    for name in ("accuracy", "flops"):
        if name in ctx.tables and ctx.tables[name]["rows"]:
            lines += ["", f"## {ctx.tables[name]['title']} (excerpt)", "",
                      f"See [{name}.md]({name}.md) for the full table and its provenance header.", ""]
    if ctx.failures:
        lines += ["", "## Failures in this run", ""] + [f"- {f}" for f in ctx.failures]
    atomic_write_text(out / "README.md", "\n".join(lines) + "\n")
