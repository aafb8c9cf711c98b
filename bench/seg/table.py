"""The segmentation table's configurations and rows (used by the orchestration).

Keep rates 0.8 / 0.7 / 0.5 as in PM-Segmenter (docs/methods/pm.md §3.3).  Each method reads "keep" in
its own way (PM: tokens per compressed block; EViT and MSTM: per reduction stage;
DynamicViT: rho per stage); ToMe has no keep rate, so its r is chosen per keep rate to
match EViT's encoder GMACs at that keep rate on the same window (:func:`matched_tome_r`).
PM runs with PM-Segmenter's settings (per-layer keep, no pruning, frozen M/R).
"""
from __future__ import annotations

from bench.core import flops as bflops, registry
from bench.core.reducer import ConfigError, ModelInfo

KEEPS = (0.8, 0.7, 0.5)
# The rows of one keep rate k, in table order: (method, label or None, spec template).  "{tome_r}" is
# ToMe's r matched to EViT's encoder GMACs at that keep rate.  Segmentation is our extension of
# MSTM: both restore rules (baselines/mstm.py docstring).
ROWS = [
    ("pm", None, "pm:keep={k},prune=0,structure=local,trainable=false"),
    ("tome", None, "tome:r={tome_r}"),
    ("evit", None, "evit:keep={k}"),
    ("dynamicvit", None, "dynamicvit:rho={k}"),
    ("mstm", None, "mstm:keep={k}"),
    ("mstm", "mstm (restore=own)", "mstm:keep={k},restore=own"),
]


# What the rows above mean, for the table's notes (each method's own lines come from its report_notes)
TABLE_NOTES = ["ToMe has no keep rate: its r is chosen per keep rate to match EViT's encoder GMACs"]


def matched_tome_r(info: ModelInfo, target_macs: int) -> int:
    """The constant ToMe r whose analytic encoder MACs are closest to ``target_macs``."""
    best, best_d = 0, None
    limit = (info.n_tokens - info.n_prefix) // 2
    for r in range(0, limit + 1):
        try:
            red = registry.build(f"tome:r={r}")
            red.check(info)
        except ConfigError:
            break
        d = abs(bflops.analytic(info, red).total - target_macs)
        if best_d is None or d < best_d:
            best, best_d = r, d
    return best


def table_specs(info: ModelInfo, keeps=KEEPS, methods=None) -> list[dict]:
    """Rows ``{"method", "keep", "spec"}`` (plus ``"label"`` where a method has several rows per
    keep rate) for the table (baseline first); methods whose module is missing are left out."""
    methods = methods or list(dict.fromkeys(m for m, _, _ in ROWS))
    have = set()
    for m in methods:
        try:
            registry.get(m)
            have.add(m)
        except (ImportError, ConfigError):
            pass
    rows = [{"method": "baseline", "keep": 1.0, "spec": "none"}]
    for k in keeps:
        for method, label, template in ROWS:
            if method not in have:
                continue
            fill = {"k": k}
            if "{tome_r}" in template:
                target = bflops.analytic(info, registry.build(f"evit:keep={k}")).total
                fill["tome_r"] = matched_tome_r(info, target)
            rows.append({"method": method, **({"label": label} if label else {}), "keep": k,
                         "spec": template.format(**fill)})
    return [r for r in rows if r["method"] in have or r["method"] == "baseline"]


def config_info(config) -> ModelInfo:
    """Encoder geometry of a config at its crop size (random weights; no data needed)."""
    from bench.seg.configs import build_config
    from bench.seg.evaluate import build_segmentor

    cfg = build_config(config)
    model, _ = build_segmentor(cfg, None, random_weights=True)
    crop = tuple(cfg.model.test_cfg.get("crop_size", cfg.model.backbone.img_size))
    return model.backbone.model_info(crop)
