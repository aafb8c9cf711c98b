"""Stage ``cost``: analytic GMACs of every configuration at the real model sizes.

Configurations of Calibrated methods get a second row when the accuracy stage fine-tuned them
(``structure`` = fine-tuned): the fine-tuned checkpoint's structure and learned modules transplanted onto
the model (:func:`bench.pipeline.stages.common.transplant`), costed as that model runs them (PM: dense matmuls
where fine-tuning filled M and R).  The calibrated rows, and every other row, are unchanged."""
from __future__ import annotations

from bench.core import flops
from bench.core.reducer import split_conventions
from bench.pipeline.stages.common import (FINETUNED, finetuned_key, info_for, method_notes, method_of,
                                          finetuned_copy, finetuned_note, finetuned_path, structure_note,
                                          reducer_for, short_model, structure_label)


def run(ctx) -> None:
    prof = ctx.profile
    rows, blocks = [], []
    jobs = [(m, s) for m in prof["cost_models"] for s in prof["cost_configs"]]
    has_finetuned = {(m, s): finetuned_path(ctx, m, s) is not None for m, s in jobs}  # a second, fine-tuned row
    n_jobs = len(jobs) + sum(has_finetuned.values())
    ctx.progress.plan(n_jobs, 0.5 * n_jobs)
    base_gmacs = {}

    def counts(red, info, model_name):
        rep = flops.analytic(info, red, model_name)
        paper, conv = split_conventions(red, info)
        res = {"gmacs": rep.gmacs, "reducer_gmacs": rep.reducer_extra / 1e9, "spec": red.spec(),
               "blocks": rep.blocks, "paper_count_gmacs": None if paper is None else paper / 1e9,
               "implementation": red.implementation(info)}
        if conv:
            res["method_conventions"] = conv
        return res

    for model_name, spec in jobs:
        def measure(model_name=model_name, spec=spec):
            info = info_for(model_name)
            red = reducer_for(ctx, spec)
            red.check(info)
            return counts(red, info, model_name)

        def measure_finetuned(model_name=model_name, spec=spec):
            # the fine-tuned checkpoint's structure and learned modules on this model: the implementation
            # (e.g. PM: gather where M, R kept their calibrated support, matmul where fine-tuning filled them)
            m, red = finetuned_copy(ctx, model_name, spec)
            res = counts(red, info_for(model_name), model_name)
            del m
            return res

        variants = [("calibrated", measure)]
        if has_finetuned[(model_name, spec)]:
            variants.append((FINETUNED, measure_finetuned))
        for variant, fn in variants:
            ft = variant == FINETUNED
            desc = {"kind": "cost", "rev": 3, "model": model_name, "spec": spec,
                    "structure": ctx.structure_key(spec)}
            if ft:
                desc["matrices"] = finetuned_key(ctx, model_name, spec)
            try:  # rev 3: results carry paper_count_gmacs and implementation; older cached results are not reused
                r = ctx.job(desc, fn, f"cost {short_model(model_name)} {spec}" + (" (fine-tuned)" if ft else ""),
                            0.5)
            except Exception as e:  # a method that cannot be built is reported, not hidden
                ctx.failures.append(f"cost {model_name} {spec}{' (fine-tuned)' if ft else ''}: {e}")
                continue
            if spec == "none":
                base_gmacs[model_name] = r["gmacs"]
            rows.append({"model": short_model(model_name), "timm_model": model_name, "method": method_of(spec),
                         "config": spec, "structure": FINETUNED if ft else structure_label(ctx, spec),
                         "canonical": r["spec"], "gmacs": round(r["gmacs"], 3),
                         "reducer_gmacs": round(r["reducer_gmacs"], 4),
                         "implementation": r.get("implementation"),
                         "paper_count_gmacs": None if r.get("paper_count_gmacs") is None
                         else round(r["paper_count_gmacs"], 3)})
            if not ft:
                blocks.append({"model": model_name, "config": spec,
                               "attn_tokens": [b["attn_tokens"] for b in r["blocks"]],
                               "mlp_tokens": [b["mlp_tokens"] for b in r["blocks"]]})
    for row in rows:
        b = base_gmacs.get(row["timm_model"])
        row["gmacs_ratio"] = round(row["gmacs"] / b, 3) if b else None
    ctx.add_table(
        "flops", "GMACs (multiply-accumulates; the papers call them GFLOPs)", rows,
        ctx.meta(data_source="none (analytic count at the real model sizes)", batch_size=1, precision="n/a",
                 notes=["Counted from per-block token counts: patch embedding + attention (qkv, proj, QK^T, AV) "
                        "+ MLP + head + the method's own modules; norms/softmax not counted (as fvcore).",
                        "paper_count_gmacs: the count the method's own publication used, where it differs "
                        "from ours; for comparison with published figures only.",
                        *method_notes(prof["cost_configs"], "flops"),
                        *structure_note(ctx, prof["cost_configs"]),
                        *finetuned_note(ctx, prof["cost_configs"], [r["model"] for r in rows])]),
        ["model", "method", "config", "structure", "gmacs", "gmacs_ratio", "reducer_gmacs", "implementation",
         "paper_count_gmacs"],
    )
    ctx.block_tokens = blocks
