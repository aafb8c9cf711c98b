"""Stage ``speed``: throughput of every configuration, interleaved with the unreduced model.

One job per (model, precision, batch size): every configuration of the model and the plain timm
baselines the profile asks for (``timm_baselines``: the unreduced model ``channels_last`` and/or
``compile``d) are timed interleaved with the eager unreduced model (protocol: ``bench/runtime/speed.py``,
``docs/speed.md``).  ``compile`` groups (the unreduced model compiled, and ``compile_configs``
compiled) run after every eager group, each only while the stage is inside its ``budget_s``; a
compile that fails is recorded with its reason and the run goes on.

Settings (``profile["speed"]``, each overridable per model under ``per_model``): ``batch_size`` or
``batch_sizes``, ``precision`` + ``also_precisions``, ``warmup``, ``iters`` (fixed count) or
``min_time``/``min_iters`` (calibrated count), ``repeats``, ``pair_every``, ``extra_repeats``, ``refill_repeats``,
``contention_pct``/``bracket_pct``/``min_clean_pairs`` (pairs left out), ``configs``,
``timm_baselines``, ``compile_configs``, ``compile_batch_sizes``, ``budget_s``.
"""
from __future__ import annotations

import copy
import time

import torch

from bench.core import flops
from bench.runtime import env, speed
from bench.pipeline.stages.common import (FINETUNED, base_model, finetuned_key, info_for, method_of, patched_copy,
                                          finetuned_copy, finetuned_note, finetuned_path, structure_note,
                                          reducer_for, short_model, structure_label)

# "finetuned": a Calibrated method with the fine-tuned checkpoint's learned modules (an eager row of its own)
VARIANT_LABEL = {"compile": "compile", "channels_last": "channels-last", "finetuned": FINETUNED}
COLUMNS = ["model", "method", "config", "structure", "variant", "precision", "batch_size", "img_s", "img_s_min",
           "img_s_max", "speedup", "speedup_ci_low", "speedup_ci_high", "noisy", "pairs", "contended", "unsteady", "speedup_min",
           "speedup_max", "mac_speedup", "efficiency", "attn_kernel", "note"]
_CFG_KEYS = ("warmup", "iters", "repeats", "min_time", "min_iters", "pair_every", "extra_repeats", "refill_repeats",
             "contention_pct", "bracket_pct", "min_clean_pairs")


def _name(spec: str, variant: str) -> str:
    return spec if variant == "eager" else f"{spec} [{VARIANT_LABEL.get(variant, variant)}]"


def _setting(sp: dict, over: dict, key: str, default=None):
    return over.get(key, sp.get(key, default))


def _gmacs(ctx, model_name: str, spec: str, red=None):
    try:
        red = red if red is not None else reducer_for(ctx, spec)
        return flops.analytic(info_for(model_name), red, model_name).gmacs
    except Exception:  # noqa: BLE001 - an uncountable config simply has no MAC ratio
        return None


def _free(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


_BUILT: dict = {}  # (model, spec, variant) -> (module, canonical spec): reused across one model's groups
_REDUCERS: dict = {}  # (model, spec, variant) -> the patched reducer (its cost as it runs)


def _build(ctx, model_name: str, spec: str, variant: str):
    if not any(k[0] == model_name for k in _BUILT):  # a new model: drop the previous one's copies
        _BUILT.clear()
        _REDUCERS.clear()
    key = (model_name, spec, variant)
    if key not in _BUILT:
        base = base_model(model_name)
        if spec == "none":
            _BUILT[key] = (base if variant == "eager" else copy.deepcopy(base), "none")
        else:
            m, red = (finetuned_copy if variant == "finetuned" else patched_copy)(ctx, model_name, spec)
            _BUILT[key] = (m, red.spec())
            _REDUCERS[key] = red
    return _BUILT[key]


def _measure_group(ctx, model_name: str, entries: list, cfg: speed.SpeedConfig) -> dict:
    """``entries``: (spec, variant) pairs; ("none", "eager") is the baseline and comes first."""
    ms, specs, variants, gm = {}, {}, {}, {}
    for spec, variant in entries:
        key = _name(spec, variant)
        try:
            # a compiled reduced config gets its own copy (compilation specialises on the module)
            bv = variant if variant in ("compile", "finetuned") else "eager"
            m, specs[key] = _build(ctx, model_name, spec, bv) if spec != "none" else \
                _build(ctx, model_name, spec, variant)
        except Exception as e:  # noqa: BLE001
            ctx.failures.append(f"speed {model_name} {spec}: {e}")
            continue
        ms[key] = m
        if variant not in ("eager", "finetuned"):
            variants[key] = {variant: True}
        gm[key] = _gmacs(ctx, model_name, spec, _REDUCERS.get((model_name, spec, "finetuned"))
                         if variant == "finetuned" else None)
    res = speed.measure(ms, cfg, baseline="none", variants=variants)
    res["specs"], res["gmacs"] = specs, gm
    res["entries"] = [[s, v] for s, v in entries]
    for m in res["models"].values():  # res["timings"] keeps every timing in order (the cache, not the table)
        m.pop("times_s", None)
    del ms
    _free(cfg.device)
    return res


def release() -> None:
    """Drop the models built for the speed groups (end of the stage)."""
    _BUILT.clear()
    _REDUCERS.clear()


def _rows(model_name: str, prec: str, r: dict, with_baseline: bool = True, structures=None) -> list[dict]:
    """``structures``: spec -> the 'structure' label of its calibrated (eager) row (PM rows)."""
    rows = []
    base_g = r["gmacs"].get("none")
    for (spec, variant) in r["entries"]:
        key = _name(spec, variant)
        if not with_baseline and (spec, variant) == ("none", "eager"):
            continue  # the reference of a compile group: its row comes from the eager group
        m = r["models"].get(key)
        ft = variant == "finetuned"
        row = {"model": short_model(model_name), "method": method_of(spec), "config": spec,
               "structure": FINETUNED if ft else (structures or {}).get(spec),
               "variant": "eager" if ft else VARIANT_LABEL.get(variant, variant),
               "precision": prec, "batch_size": r["config"]["batch_size"], "device": r["stamp"]["device"]}
        if m is None:  # could not be built/compiled/run: the reason is the row
            reason = r.get("failed", {}).get(key, "not measured")
            rows.append({**row, "img_s": None, "speedup": None, "note": reason})
            continue
        g = r["gmacs"].get(key)
        mac = (base_g / g) if (base_g and g and variant in ("eager", "finetuned")) else None  # eager rows only
        sp = m.get("speedup", 1.0)
        rows.append({
            **row,
            "img_s": round(m["img_s"], 2), "img_s_min": round(m["img_s_min"], 2),
            "img_s_max": round(m["img_s_max"], 2), "img_s_iqr": round(m["img_s_iqr"], 2),
            "img_s_ci_low": round(m["img_s_ci_low"], 2), "img_s_ci_high": round(m["img_s_ci_high"], 2),
            "speedup": round(sp, 3),
            "speedup_min": round(m.get("speedup_min", 1.0), 3), "speedup_max": round(m.get("speedup_max", 1.0), 3),
            "speedup_iqr": round(m.get("speedup_iqr", 0.0), 3),
            "speedup_ci_low": round(m.get("speedup_ci_low", 1.0), 3),
            "speedup_ci_high": round(m.get("speedup_ci_high", 1.0), 3),
            "noisy": bool(m.get("noisy", False)), "pairs": m.get("pairs"),
            "contended": m.get("contended_pairs"), "unsteady": m.get("unsteady_pairs"),
            "kept_unclean": m.get("kept_unclean"),
            "host_load_max_pct": None if m.get("host_load_max") is None else round(100 * m["host_load_max"], 1),
            "mac_speedup": round(mac, 3) if mac else None,
            "efficiency": round(sp / mac, 3) if mac else None,
            "iters": m.get("iters"), "attn_kernel": m.get("attn_kernel"), "fused_sdpa": m.get("fused_sdpa"),
            "first_call_s": round(m.get("first_call_s", 0.0), 2),
        })
    return rows


def host_load_note(loads: list[dict]) -> list[str]:
    """One line on how busy the host was while the groups were timed (``speed.measure``'s ``host_load``)."""
    if not loads:  # no group was timed
        return []
    measured = [h for h in loads if h.get("measured")]
    if not measured:
        return ["host load: not measured (no /proc/stat on this system); no pair was left out for contention"]
    n = sum(h["timings"] for h in measured)
    c = sum(h["contended"] for h in measured)
    worst = max(h["max_pct"] for h in measured)
    med = max(h["median_pct"] for h in measured)
    return [f"host load (CPU time of other processes and hypervisor steal, share of the time of the CPUs this process runs on, per timing): "
            f"median {med:.1f}% (the busiest group's), max {worst:.1f}%; {c} of {n} timings above "
            f"{measured[0]['threshold_pct']:g}% were contended, and the pairs they belong to are left out of the "
            f"speed-ups (contended: pairs left out per row; unsteady: pairs left out because their two baseline "
            f"timings disagree; a row with fewer than the protocol's minimum of clean pairs keeps them all, "
            f"kept_unclean in the CSV/JSON)"]


def _plan_jobs(ctx, prof: dict, sp: dict) -> tuple[list, list]:
    """The timing groups of the profile's ``speed`` section: (eager jobs, compile jobs), each a list of
    ``(model name, precision, SpeedConfig, [(config, variant), ...])``."""
    eager_jobs, compile_jobs = [], []
    for model_name in sp["models"]:
        over = sp.get("per_model", {}).get(model_name, {})
        configs = _setting(sp, over, "configs", prof["cost_configs"])
        precisions = [_setting(sp, over, "precision")] + list(_setting(sp, over, "also_precisions", []))
        batches = _setting(sp, over, "batch_sizes") or [_setting(sp, over, "batch_size")]
        timm_variants = list(_setting(sp, over, "timm_baselines", []))
        compile_configs = [c for c in _setting(sp, over, "compile_configs", []) if c != "none"]
        kw = {k: _setting(sp, over, k) for k in _CFG_KEYS if _setting(sp, over, k) is not None}
        for prec in precisions:
            for bs in batches:
                cfg = speed.SpeedConfig(batch_size=bs, precision=prec, device=ctx.device,
                                        img_size=tuple(base_model(model_name).patch_embed.img_size), **kw)
                eager = [("none", "eager")]
                for s in configs:
                    if s != "none":
                        eager.append((s, "eager"))
                        if finetuned_path(ctx, model_name, s) is not None:
                            eager.append((s, "finetuned"))  # the fine-tuned model's cost, next to it
                eager += [("none", v) for v in timm_variants if v != "compile"]
                eager_jobs.append((model_name, prec, cfg, eager))
                comp_bs = _setting(sp, over, "compile_batch_sizes") or batches
                if ("compile" in timm_variants or compile_configs) and bs in comp_bs:
                    comp = [("none", "eager"), ("none", "compile")] + [(s, "compile") for s in compile_configs]
                    compile_jobs.append((model_name, prec, cfg, comp))
    return eager_jobs, compile_jobs


def run(ctx) -> None:
    prof = ctx.profile
    sp = prof["speed"]
    rows, skipped, loads = [], [], []
    protocols: dict = {}  # protocol line -> the models timed with it (per_model settings differ)
    t0 = time.time()
    budget = sp.get("budget_s")
    eager_jobs, compile_jobs = _plan_jobs(ctx, prof, sp)
    ran = 0

    def est_one(cfg, n: int) -> float:
        """Seconds a group of ``n`` models (the baseline first) is expected to take, for the progress line's
        ETA: the protocol's own schedule, plus extra rounds (a row and a baseline timing each) for about half
        the rows, as on the 2-core machine; a timing lasts about 1.5 x min_time (whole calls)."""
        names = list(range(n))
        timings = (len(speed.schedule(names, names[0], cfg.repeats, cfg.pair_every))
                   + (n - 1) * (cfg.extra_repeats + cfg.refill_repeats // 2))
        return timings * (cfg.min_time or 1.0) * 1.5 + 2.0

    ctx.progress.plan(len(eager_jobs) + len(compile_jobs),
                      sum(est_one(j[2], len(j[3])) for j in eager_jobs + compile_jobs))
    for kind, jobs in (("eager", eager_jobs), ("compile", compile_jobs)):
        for model_name, prec, cfg, entries in jobs:
            label = (f"speed {short_model(model_name)} x{len(entries)} {prec} bs{cfg.batch_size}"
                     + (" compile" if kind == "compile" else ""))
            est = est_one(cfg, len(entries))
            why = speed.precision_supported(prec, ctx.device)
            if why is None and budget is not None and ran and time.time() - t0 > budget:
                why = f"over the stage's time budget ({budget:.0f} s)"
            if why is not None:
                skipped.append(f"{label}: skipped, {why}")
                ctx.progress.finished(label + " (skipped)", est, 0.0, True)
                continue
            desc = {"kind": "speed", "rev": 5, "model": model_name, "entries": entries, "cfg": cfg.__dict__,
                    "device": env.device_name(ctx.device),
                    "structure": [ctx.structure_key(s) for s, _ in entries]}
            if any(v == "finetuned" for _, v in entries):
                desc["matrices"] = [finetuned_key(ctx, model_name, s) if v == "finetuned" else None
                                    for s, v in entries]
            try:
                r = ctx.job(desc, lambda m=model_name, e=entries, c=cfg: _measure_group(ctx, m, e, c), label, est)
            except Exception as e:  # noqa: BLE001 - one group failing must not lose the others
                ctx.failures.append(f"{label}: {type(e).__name__}: {e}")
                continue
            ran += 1
            if r.get("host_load"):
                loads.append(r["host_load"])
            rows += _rows(model_name, prec, r, with_baseline=kind == "eager",
                          structures={s: structure_label(ctx, s) for s, _ in entries})
            models = protocols.setdefault(r["config"]["protocol"], [])
            if short_model(model_name) not in models:
                models.append(short_model(model_name))
    meta = ctx.meta(data_source="synthetic input (random weights; cost and speed need no trained weights)",
                    precision=", ".join(sorted({r["precision"] for r in rows})) or sp["precision"],
                    batch_size=", ".join(sorted({str(r["batch_size"]) for r in rows}, key=int)) or "",
                    threads=torch.get_num_threads(),
                    notes=[*(f"protocol: {p}" if len(protocols) == 1 else f"protocol ({', '.join(m)}): {p}"
                             for p, m in protocols.items()),
                           "speed-up = median over repeats of t_baseline / t_row, t_baseline the eager unreduced "
                           "model timed right before and after the row, in one process; [ci_low, ci_high]: "
                           "bootstrap 95% interval of that median; noisy: the interval leaves +-5% of it; pairs: "
                           "the number of paired timings it is the median of (a row still noisy after the scheduled "
                           "rounds gets more, up to the protocol's limit)",
                           "mac_speedup = GMACs(unreduced) / GMACs(config); efficiency = speedup / mac_speedup",
                           "variant: eager (the suite's rows), compile (torch.compile, default mode), channels-last "
                           "(input and patch-embedding conv in channels-last): plain timm baselines that show what a "
                           "compiler or layout change gives the unreduced model for free",
                           "attn_kernel: the kernel scaled_dot_product_attention used in the last warm-up call (eager: the "
                           "backend SDPA selected for the real inputs; compiled: the profiler's op names); "
                           "fused_sdpa in the CSV/JSON",
                           *host_load_note(loads),
                           *structure_note(ctx, sorted({r["config"] for r in rows})),
                           *finetuned_note(ctx, sorted({r["config"] for r in rows}),
                                              sorted({r["model"] for r in rows})), *skipped])
    release()
    ctx.add_table("throughput", "Throughput (images/s) and speed-up vs the unreduced model", rows, meta, COLUMNS)
