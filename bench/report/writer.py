"""Write every table, the published-vs-reproduced comparison, the plots and the results page."""
from __future__ import annotations

import json
import re
from pathlib import Path

from bench.pipeline.stages.common import method_notes, short_model
from bench.report import plots, published
from bench.report.tables import FIXTURE_WARNING, PROXY_WARNING, _fmt, write_table
from bench.runtime.proxy_ranking import CHECKED
from bench.runtime.results import atomic_write_json, atomic_write_text


def _published_table(ctx) -> None:
    """Table 4: every published row the profile covers, next to ours."""
    flops_rows = ctx.tables.get("flops", {}).get("rows", [])
    speed_rows = ctx.tables.get("throughput", {}).get("rows", [])
    acc_rows = ctx.tables.get("accuracy", {}).get("rows", [])
    # the calibrated rows of methods with learned modules (a paper count excludes what fine-tuning
    # changes, e.g. PM's merge/reconstruct products; the fine-tuned rows' suite count is in the flops table)
    ours_flops = {(r["timm_model"], published.normalise_spec(r["config"])): r for r in flops_rows
                  if r.get("structure") != "fine-tuned"}
    ours_speed = {}
    for r in speed_rows:
        if r.get("variant", "eager") != "eager":  # plain-timm baselines (compile, channels-last) are not configs
            continue
        if r.get("structure") == "fine-tuned":
            continue
        ours_speed.setdefault((r["model"], published.normalise_spec(r["config"])), r["speedup"])

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
            "note": (p.get("note") or "").strip() or None,
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
                 "own publication used, where it differs (flops table, paper_count_gmacs).")
    notes.append("gmacs_agree: 'within 0.05' = the published figure is ours rounded; 'ours truncated' = it is our "
                 "count cut to one decimal (as some sources print their counts); 'differs' = neither. note = the "
                 "source row's explanation from paper_numbers.csv (what the figure counts, configuration caveats), "
                 "which says why a figure differs where it is known.")
    notes += method_notes(list(dict.fromkeys(r["config"] for r in rows)), "published")
    ctx.add_table("published_vs_reproduced", "Published vs reproduced", rows,
                  ctx.meta(data_source=ctx.profile["data_source"], notes=notes),
                  ["model", "config", "source", "confidence", "trained", "published_gmacs", "ours_gmacs",
                   "ours_count", "gmacs_diff", "gmacs_agree", "published_speedup", "ours_speedup", "published_hw",
                   "published_top1", "ours_top1", "note"])


ORDER = ["accuracy", "flops", "throughput", "segmentation", "ablations", "learned_structure", "published_vs_reproduced"]


def _join_speedups(ctx) -> None:
    """Accuracy rows get the speed-up measured for the same config at the DeiT-S size (or the first
    measured model): the proxy shares DeiT's 196-token geometry."""
    acc = ctx.tables.get("accuracy", {}).get("rows", [])
    sp_rows = ctx.tables.get("throughput", {}).get("rows", [])
    if not acc or not sp_rows:
        return
    models = [r["model"] for r in sp_rows]
    ref = "DeiT-S" if "DeiT-S" in models else models[0]
    sp = {}
    first = next(r for r in sp_rows if r["model"] == ref)
    for r in sp_rows:  # the stage's first precision and batch size (several may have been measured)
        if r["model"] == ref and r.get("variant", "eager") == "eager" and \
                (r.get("precision"), r.get("batch_size")) == (first.get("precision"), first.get("batch_size")):
            sp.setdefault((r["config"], r.get("structure") == "fine-tuned"), r["speedup"])
    for r in acc:
        # a fine-tuned row gets the speed-up of its fine-tuned modules, never the calibrated one's
        ft = r.get("structure") == "fine-tuned"
        r["speedup"] = sp.get((r["config"], ft))
    ctx.speedup_ref = ref
    ctx.tables["accuracy"]["meta"].setdefault("notes", []).append(
        f"speedup column: measured at the {ref} size in this run (same 196-token geometry; "
        f"{first.get('precision')}, batch {first.get('batch_size')}); rows of methods with learned modules: "
        "with their own modules (calibrated or fine-tuned, see structure)")


def _excerpt(rows: list[dict], columns: list[str]) -> list[str]:
    """A markdown table of ``rows`` restricted to ``columns`` (those present in some row)."""
    import pandas as pd

    cols = [c for c in columns if any(r.get(c) is not None for r in rows)]
    if not rows or not cols:
        return []
    df = pd.DataFrame([{c: r.get(c) for c in cols} for r in rows])
    return [df.map(_fmt).to_markdown(index=False), ""]


def _excerpts(ctx) -> list[str]:
    """The results page's excerpts: every accuracy row in short, the GMACs of the reference model."""
    lines = []
    acc = ctx.tables.get("accuracy", {}).get("rows", [])
    if acc:
        t = ctx.tables["accuracy"]
        lines += ["", f"## {t['title']} (excerpt)", "",
                  f"Top-1, its drop vs the unreduced model (points), GMACs of the {acc[0].get('model', 'model')} and "
                  f"the speed-up measured at the {ctx.speedup_ref or 'speed stage'} size. "
                  f"See [accuracy.md](accuracy.md) for the full table (intervals, McNemar p-values) and its "
                  "provenance header.", ""]
        lines += _excerpt(acc, ["model", "config", "kind", "structure", "top1", "drop", "gmacs", "speedup"])
    fl = ctx.tables.get("flops", {}).get("rows", [])
    if fl:
        models = [r["model"] for r in fl]
        ref = "DeiT-S" if "DeiT-S" in models else models[0]
        t = ctx.tables["flops"]
        lines += ["", f"## {t['title']} (excerpt)", "",
                  f"{ref} only; see [flops.md](flops.md) for every model, the method papers' own counts and the "
                  "provenance header.", ""]
        lines += _excerpt([r for r in fl if r["model"] == ref],
                          ["model", "config", "structure", "gmacs", "gmacs_ratio", "reducer_gmacs"])
    return lines


def drop_retired_tables(out: Path) -> list[str]:
    """Remove the files of tables the folder's previous manifest lists under a name the suite no longer
    writes (a renamed table, e.g. ``pm_ablations`` -> ``ablations``), so a report folder never shows a
    table this code cannot regenerate.  Tables of other stages (a ``--only`` run) are kept.  Returns the
    names removed."""
    try:
        old = json.loads((out / "manifest.json").read_text()).get("tables", [])
    except (OSError, ValueError, AttributeError):
        return []
    gone = [n for n in old if isinstance(n, str) and n not in ORDER and re.fullmatch(r"[A-Za-z0-9_]+", n)]
    for name in gone:
        for ext in ("md", "csv", "json"):
            (out / f"{name}.{ext}").unlink(missing_ok=True)
    return gone


def write_all(ctx, wall_s: float) -> None:
    out: Path = ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)
    drop_retired_tables(out)
    _join_speedups(ctx)
    if getattr(ctx, "fixture", False):  # the stages line is known only now (seg runs after the tables' stages)
        fm = {k: v for k, v in ctx.meta().items() if k in ("fixture", "stages", "command")}
        for t in ctx.tables.values():
            t["meta"] = {**t["meta"], **fm}
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
    if getattr(ctx, "launcher", None) is not None:  # --nproc: every torchrun job of this run (cached ones ran none)
        manifest["torchrun_jobs"] = list(ctx.launcher.jobs)
    manifest["job_workers"] = getattr(ctx, "job_workers", 1)  # processes that measured accuracy/ablations jobs
    atomic_write_json(out / "manifest.json", manifest)
    fixture = bool(getattr(ctx, "fixture", False))
    lines = [f"# PM-Bench results: profile `{ctx.profile['name']}`" + (" (fixture run)" if fixture else ""), ""]
    m = ctx.meta()
    lines += [f"Generated by `{m['command']}` at commit `{m['commit']}` on {m['device']}, {m['date']} "
              f"(torch {m['torch']}, timm {m['timm']}, mmseg {m['mmseg']}); wall time {wall_s / 60:.1f} min "
              f"({jobs['measured']} jobs measured in this run, {jobs['from_cache']} taken from the result cache: "
              "measured before, in this run or an earlier one, under the same description; `--force` re-measures "
              "all).", ""]
    if ctx.profile["data_source"] == "proxy":
        lines += [PROXY_WARNING, "", CHECKED, ""]
    if fixture:
        lines += [FIXTURE_WARNING, ""]
    if hasattr(ctx, "stages_line"):
        lines += [f"Stages: {ctx.stages_line()}.", ""]
    lines += ["## Tables", ""]
    for name, title in written:
        lines.append(f"- [{title}]({name}.md) ([csv]({name}.csv), [json]({name}.json))")
    if figs:
        lines += ["", "## Plots", ""]
        for f in figs:
            lines += [f"![{f}]({f})", ""]
    lines += _excerpts(ctx)
    if ctx.failures:
        lines += ["", "## Failures in this run", ""] + [f"- {f}" for f in ctx.failures]
    atomic_write_text(out / "README.md", "\n".join(lines) + "\n")
