"""Profiles of ``run_all.sh`` as plain data.

* ``smoke``   every method and every table type at the smallest sizes (part of
              ``./run_all.sh test``; feeds the CI regression gate)
* ``default`` the embedded proxy end to end, plus FLOPs and CPU throughput at the
              real DeiT-T/S/B sizes with random weights
* ``paper``   real ImageNet / ADE20K with pretrained weights on GPUs

A "config" is a reducer spec; ``PAPER_CONFIGS`` lists the configurations of
the papers each table covers.
"""
from __future__ import annotations

import copy

TOME = ["tome:r=8", "tome:r=13", "tome:r=16"]
EVIT = [f"evit:keep={k}" for k in (0.9, 0.8, 0.7, 0.6, 0.5)]
DYNAMICVIT = [f"dynamicvit:rho={k}" for k in (0.9, 0.8, 0.7)]
MSTM = ["mstm:keep=0.7"] + [f"mstm:keep={k}" for k in (0.9, 0.8, 0.6, 0.5)]
PM = ["pm:keep=0.7", "pm:keep=0.6"]

# Every configuration of the classification tables (accuracy, FLOPs, throughput).
PAPER_CONFIGS = ["none"] + PM + TOME + EVIT + DYNAMICVIT + MSTM

# The FLOPs table also counts the rest of DynamicViT's published keep-ratio sweep (GMACs only: no
# accuracy or speed rows), so every published DeiT-S figure has a row to be compared with.
COST_CONFIGS = PAPER_CONFIGS + [f"dynamicvit:rho={k}" for k in (0.6, 0.5)]

# Fine-tuned rows (each method's own recipe, via the shared trainer).
FINETUNE_CONFIGS = ["pm:keep=0.7", "pm:keep=0.6", "tome:r=13", "evit:keep=0.7", *DYNAMICVIT, "mstm:keep=0.7"]
# The default (proxy) profile fine-tunes DynamicViT at rho 0.7 only: 40 steps cannot train its new predictors
# (README, "Proxy numbers"), so its other fine-tuned rows cost 2.4 min of the run and say nothing more.
DEFAULT_FINETUNE_CONFIGS = [c for c in FINETUNE_CONFIGS if not c.startswith("dynamicvit:") or c == "dynamicvit:rho=0.7"]

# Segmentation: keep rates 0.8 / 0.7 / 0.5 (bench/seg/table.py builds each method's spec; ToMe's r is
# matched to EViT's GMACs at each keep rate).
SEG_KEEPS = [0.8, 0.7, 0.5]

# PM ablations (table 3), all at keep 0.6 on the proxy.
PM_ABLATIONS = [
    ("gradient-weighted score (official)", "pm:keep=0.6"),
    ("CLS-attention score", "pm:keep=0.6,score=cls_attn"),
    ("random score", "pm:keep=0.6,score=random"),
    ("prune only (no merge)", "pm:keep=0.6,merge=false"),
    ("frozen matrices", "pm:keep=0.6,trainable=false"),
    ("no shortcut", "pm:keep=0.6,shortcut=false"),
    ("per-layer structure", "pm:keep=0.6,structure=local"),
    ("2-D nearest-centre assignment", "pm:keep=0.6,assign=grid2d"),
]

# One configuration per method at the papers' headline operating point (PM at both of its keep rates).
HEADLINE_CONFIGS = ["none", "pm:keep=0.7", "pm:keep=0.6", "tome:r=13", "evit:keep=0.7", "dynamicvit:rho=0.7",
                    "mstm:keep=0.7"]

COST_MODELS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]

PROFILES = {
    "smoke": {
        "data_source": "proxy",
        "cost_models": ["deit_tiny_patch16_224"],
        "cost_configs": ["none", "pm:keep=0.6", "tome:r=13", "evit:keep=0.7", "dynamicvit:rho=0.7", "mstm:keep=0.7"],
        "speed": {"batch_size": 8, "precision": "fp32", "warmup": 1, "min_time": 0.2, "repeats": 5,
                  "models": ["deit_tiny_patch16_224"]},
        "accuracy_configs": ["none", "pm:keep=0.6", "tome:r=13", "evit:keep=0.7", "dynamicvit:rho=0.7", "mstm:keep=0.7"],
        "finetune_configs": ["pm:keep=0.6", "tome:r=13", "evit:keep=0.7", "dynamicvit:rho=0.7", "mstm:keep=0.7"],
        "finetune_epochs": 1,
        "finetune_max_steps": 3,
        "seg_keeps": [0.7],
        "ablations": PM_ABLATIONS[:3],
        "proxy_size": "smoke",
    },
    "default": {
        "data_source": "proxy",
        "cost_models": COST_MODELS,
        "cost_configs": COST_CONFIGS,
        # docs/speed.md: iterations calibrated per model to >= 0.4 s per timing, 10 interleaved repeats,
        # every row timed right between two baseline timings (pair_every 1: the ratio never spans other
        # rows, so drifts of the machine cancel); a row still noisy after them gets up to 3 more paired
        # rounds.  On 2 cores a DeiT-S timing is 1-2 forwards at batch 8, so more pairs, not longer
        # timings, make the medians hold between runs (docs/speed.md, section 7).  DeiT-S times every
        # configuration (the reference size of the accuracy table's speed-ups); DeiT-T and DeiT-B the
        # headline ones, DeiT-T as information (0.25 s, 5 repeats: the efficiency target is
        # benchmarks/efficiency.py, every configuration at 1 s), DeiT-B at batch 2 (short timings that
        # ride out the host's bursts, which made batch 4's rows disagree between runs).  Plain-timm
        # baselines on DeiT-T/S: channels-last, and torch.compile of the unreduced DeiT-S.  These sizes
        # are cut for the default run's 20-minute budget (docs/speed.md, section 2: its run time per CPU)
        "speed": {"batch_size": 8, "precision": "fp32", "warmup": 1, "min_time": 0.4, "repeats": 10, "pair_every": 1,
                  "extra_repeats": 3, "refill_repeats": 3,
                  "models": COST_MODELS, "configs": PAPER_CONFIGS,
                  "per_model": {"deit_tiny_patch16_224": {"min_time": 0.25, "repeats": 5, "extra_repeats": 0, "refill_repeats": 0,
                                                          "configs": HEADLINE_CONFIGS,
                                                          "timm_baselines": ["channels_last"]},
                                "deit_small_patch16_224": {"timm_baselines": ["channels_last", "compile"]},
                                "deit_base_patch16_224": {"batch_size": 2,
                                                          "configs": [c for c in HEADLINE_CONFIGS
                                                                      if c != "pm:keep=0.7"]}}},
        "accuracy_configs": PAPER_CONFIGS,
        "finetune_configs": DEFAULT_FINETUNE_CONFIGS,
        "finetune_epochs": 1,
        # 2-core CPU budget: a short fine-tune per row (steps of the source's train batch, 32 on the proxy;
        # the budget is the whole schedule), shorter for ablations
        "finetune_max_steps": 40,
        "ablation_max_steps": 10,
        "seg_keeps": SEG_KEEPS,
        "ablations": PM_ABLATIONS,
        "proxy_size": "default",
    },
    "paper": {
        "data_source": "real",
        "cost_models": COST_MODELS + ["vit_base_patch16_224"],
        "cost_configs": COST_CONFIGS,
        # One GPU in < 10 min (docs/speed.md): every configuration eager at batch 256/64/1 in AMP (float16),
        # fp32 and bfloat16 (where supported), >= 50 ms and >= 10 iterations per timing; then, while the
        # stage is inside budget_s, torch.compile of the unreduced model and of the headline configs
        "speed": {"batch_sizes": [256, 64, 1], "precision": "amp", "also_precisions": ["fp32", "bf16"],
                  "warmup": 5, "min_time": 0.05, "min_iters": 10, "repeats": 5,
                  "models": COST_MODELS, "configs": PAPER_CONFIGS,
                  "timm_baselines": ["compile", "channels_last"],
                  "compile_configs": ["pm:keep=0.6", "tome:r=13", "evit:keep=0.7"], "compile_batch_sizes": [256],
                  "budget_s": 420},
        "accuracy_models": COST_MODELS,
        "accuracy_configs": PAPER_CONFIGS,
        "finetune_configs": FINETUNE_CONFIGS,
        "finetune_epochs": 30,
        "seg_keeps": SEG_KEEPS,
        "ablations": PM_ABLATIONS,
    },
}


def get(name: str) -> dict:
    if name not in PROFILES:
        from bench.core.reducer import ConfigError

        raise ConfigError(f"unknown profile '{name}'; available: {', '.join(PROFILES)}")
    p = copy.deepcopy(PROFILES[name])
    p["name"] = name
    return p


def fixture_variant(p: dict) -> dict:
    """The paper profile on small fixtures in the real formats with a tiny model (``--fixture``):
    same code path (real loaders, local weight files, calibration, fine-tuning), tiny sizes."""
    from bench.runtime.fixtures import TINY_MODEL

    p = copy.deepcopy(p)
    p["fixture"] = True
    p["cost_models"] = [TINY_MODEL]
    p["accuracy_models"] = [TINY_MODEL]
    p["speed"] = {"batch_size": 2, "precision": "fp32", "warmup": 1, "iters": 1, "repeats": 2,
                  "models": [TINY_MODEL], "configs": PAPER_CONFIGS, "also_precisions": ["bf16"]}
    p["finetune_epochs"] = 1
    p["finetune_configs"] = ["pm:keep=0.6", "tome:r=13", "evit:keep=0.7", "dynamicvit:rho=0.7", "mstm:keep=0.7"]
    p["ablations"] = PM_ABLATIONS[:2]
    return p
