"""Stage ``cost``: analytic GMACs of every configuration at the real model sizes."""
from __future__ import annotations

from .. import flops
from .common import info_for, method_of, pm_structure_note, reducer_for, short_model


def run(ctx) -> None:
    prof = ctx.profile
    rows, blocks = [], []
    jobs = [(m, s) for m in prof["cost_models"] for s in prof["cost_configs"]]
    ctx.progress.plan(len(jobs), 0.5 * len(jobs))
    base_gmacs = {}
    for model_name, spec in jobs:
        def measure(model_name=model_name, spec=spec):
            info = info_for(model_name)
            red = reducer_for(ctx, spec)
            red.check(info)
            rep = flops.analytic(info, red, model_name)
            paper = red.paper_count_macs(info)
            res = {"gmacs": rep.gmacs, "reducer_gmacs": rep.reducer_extra / 1e9, "spec": red.spec(),
                   "blocks": rep.blocks, "paper_count_gmacs": None if paper is None else paper / 1e9}
            conv = getattr(red, "flops_report", None)
            if callable(conv):
                res["method_conventions"] = conv(info)
            return res

        try:  # rev 2: results carry paper_count_gmacs, so older cached results are not reused
            r = ctx.job({"kind": "cost", "rev": 2, "model": model_name, "spec": spec,
                         "structure": getattr(ctx, "structure_key", lambda s: None)(spec)},
                        measure, f"cost {short_model(model_name)} {spec}", 0.5)
        except Exception as e:  # a method that cannot be built is reported, not hidden
            ctx.failures.append(f"cost {model_name} {spec}: {e}")
            continue
        if spec == "none":
            base_gmacs[model_name] = r["gmacs"]
        rows.append({"model": short_model(model_name), "timm_model": model_name, "method": method_of(spec),
                     "config": spec, "canonical": r["spec"], "gmacs": round(r["gmacs"], 3),
                     "reducer_gmacs": round(r["reducer_gmacs"], 4),
                     "paper_count_gmacs": None if r.get("paper_count_gmacs") is None
                     else round(r["paper_count_gmacs"], 3)})
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
                        "(DynamicViT paper: the official per-layer formula, predictors excluded; PM README: "
                        "the official code's formula, no patch embedding, merge/reconstruct excluded); "
                        "for comparison with published figures only.",
                        *pm_structure_note(ctx, prof["cost_configs"])]),
        ["model", "method", "config", "gmacs", "gmacs_ratio", "reducer_gmacs", "paper_count_gmacs"],
    )
    ctx.block_tokens = blocks
