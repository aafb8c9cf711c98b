"""FLOPs (bench/core/flops.py): analytic count vs a measured count, and vs every published figure.

The field's "GFLOPs" are GMACs (docs/flops.md §1).  The analytic count derives from the
reducer's declared token schedule; the measured one runs the patched model under torch's
FlopCounterMode (fused attention counted), so a wrong schedule or a reducer that does not really
remove tokens shows up as a disagreement.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from bench.core import flops, patch, registry
from bench.core.reducer import ModelInfo

ROOT = Path(__file__).resolve().parent.parent
PAPER_CSV = ROOT.parent / "shared" / "reference" / "paper_numbers.csv"
if not PAPER_CSV.exists():  # the packaged copy (same content) when the shared folder is absent
    PAPER_CSV = ROOT / "bench" / "data_files" / "paper_numbers.csv"
PMBENCH = [sys.executable, "-m", "bench.cli"]


def _model(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **kw).eval()


# --------------------------------------------------------------------------- analytic vs measured
@pytest.mark.parametrize("name,spec", [
    ("deit_small_patch16_224", "none"),
    ("deit_small_patch16_224", "tome:r=13"),
    ("deit_small_patch16_224", "evit:keep=0.7"),
    ("deit_tiny_patch16_224", "tome:r=16,inflect=-1"),
    ("deit_tiny_patch16_224", "evit:keep=0.5,fuse=false"),
    ("deit_tiny_distilled_patch16_224", "tome:r=8"),
    ("deit_tiny_distilled_patch16_224", "evit:keep=0.6"),
])
def test_analytic_matches_measured(name, spec):
    model = _model(name)
    red = registry.build(spec)
    patch.apply(model, red)
    analytic = flops.analytic(ModelInfo.from_model(model), red).total
    measured = flops.measured_macs(model)
    assert abs(measured - analytic) / analytic < 0.01, (analytic, measured)


def test_measured_counts_fused_attention():
    """FlopCounterMode skips the CPU fused kernel unless taught; fused and unfused must agree."""
    model = _model("deit_tiny_patch16_224")
    fused = flops.measured_macs(model)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    assert flops.measured_macs(model) == fused
    assert abs(fused / 1e9 - 1.2537) < 0.005


def test_analytic_at_other_resolution():
    model = _model("deit_tiny_patch16_224", img_size=112)
    red = registry.build("tome:r=8")
    patch.apply(model, red)
    rep = flops.analytic(ModelInfo.from_model(model), red)
    assert rep.blocks[0]["attn_tokens"] == 50 and rep.img_size == (112, 112)
    assert abs(flops.measured_macs(model, (112, 112)) - rep.total) / rep.total < 0.01


def test_block_formula_deit_small():
    """docs/flops.md §1: a DeiT-S block on 197 tokens is 378.4 M MACs; the model 4.60 G."""
    info = ModelInfo.from_model(_meta("deit_small_patch16_224"))
    a, m = flops.block_macs(info, 197, 197)
    assert (a, m) == (197 * 4 * 384 ** 2 + 2 * 197 ** 2 * 384, 197 * 8 * 384 ** 2)
    assert round((a + m) / 1e6, 1) == 378.4
    rep = flops.analytic(info, registry.build("none"))
    assert rep.patch_embed == 196 * 3 * 16 * 16 * 384 and rep.head == 384 * 1000
    assert round(rep.gmacs, 2) == 4.60


# --------------------------------------------------------------------------- published figures
MODELS = {  # paper_numbers.csv model -> (timm name, create kwargs)
    "DeiT-T": ("deit_tiny_patch16_224", {}),
    "DeiT-S": ("deit_small_patch16_224", {}),
    "DeiT-S/16": ("deit_small_patch16_224", {}),
    "DeiT-B": ("deit_base_patch16_224", {}),
    "DeiT-S@384": ("deit_small_patch16_224", {"img_size": 384}),
    "ViT-S/16 (AugReg)": ("vit_small_patch16_224", {}),
    "ViT-L/16 (MAE)": ("vit_large_patch16_224", {"global_pool": "avg"}),
}

# rows in the selection that the suite cannot reproduce to +-0.05, with the reason
SKIP = {
    ("DynamicViT paper (secondary copy)", "DeiT-B", "none", ""):
        "17.5 is a truncated figure: the formula gives 17.56 (fvcore/timm 17.58, PM README 17.6)",
    ("ToMe paper (secondary copy)", "ViT-H/14 (MAE)", "ToMe", "r=7;constant"):
        "formula 92.83 vs 92.9 (docs/flops.md §1): the paper's ViT-H count differs by 0.07",
    ("ToMe paper (secondary copy)", "ViT-H/14 (MAE)", "ToMe", "r=7;decreasing"):
        "formula 72.55 vs 72.6: off by 0.054; the ViT-H baseline is off too (167.30 vs 167.4)",
    ("EViT README", "DeiT-S", "EViT", "keep=0.8;fuse=no"):
        "the README repeats the fused column (3.5) for no-fuse; no-fuse has 3 fewer tokens per stage and "
        "the formula gives 3.444 (~3.4); the fused 3.477 row is reproduced",
}


def _selected_rows():
    """DeiT baselines (method none) plus every ToMe and EViT row with a GFLOPs figure."""
    rows = []
    with open(PAPER_CSV, newline="") as f:
        for r in csv.DictReader(f):
            if r["task"] != "imagenet" or not r["gmacs"].strip():
                continue
            if (r["method"] == "none" and r["model"].startswith("DeiT")) or r["method"] in ("ToMe", "EViT"):
                rows.append(r)
    return rows


def _spec_of(method, config):
    """paper_numbers.csv method/config -> reducer spec (None: the config cannot be expressed)."""
    opts = dict(kv.split("=", 1) for kv in config.split(";") if "=" in kv)
    flags = [kv for kv in config.split(";") if kv and "=" not in kv]
    if method == "none":
        return "none"  # configs of baseline rows are timing settings (amp, bs) only
    if method == "ToMe":
        spec = f"tome:r={opts.pop('r')}"
        if "decreasing" in flags:
            spec += ",inflect=-1"
            flags.remove("decreasing")
        flags = [f for f in flags if f != "constant"]
        return spec if not opts and not flags else None
    if method == "EViT":
        fuse = {"yes": "true", "no": "false"}[opts.pop("fuse", "yes")]
        spec = f"evit:keep={opts.pop('keep')},fuse={fuse}"
        return spec if not opts and not flags else None
    return None


def _meta(name, **kw):
    with torch.device("meta"):  # geometry only: no weights allocated
        return timm.create_model(name, **kw)


_INFO_CACHE: dict = {}


def _info(name, kw):
    key = (name, tuple(sorted(kw.items())))
    if key not in _INFO_CACHE:
        _INFO_CACHE[key] = ModelInfo.from_model(_meta(name, **kw))
    return _INFO_CACHE[key]


def test_published_gflops_reproduced():
    rows = _selected_rows()
    checked, skipped, problems = [], [], []
    for r in rows:
        key = (r["source"], r["model"], r["method"], r["config"])
        if key in SKIP:
            skipped.append(key)
            continue
        if r["model"] not in MODELS:
            problems.append(f"unmapped model {key}")
            continue
        spec = _spec_of(r["method"], r["config"])
        if spec is None:
            problems.append(f"unexpressed config {key}")
            continue
        name, kw = MODELS[r["model"]]
        info = _info(name, kw)
        got = flops.analytic(info, registry.build(spec)).gmacs
        want = float(r["gmacs"])
        if abs(got - want) > 0.05:
            problems.append(f"{key}: {spec} gives {got:.3f}, published {want}")
        checked.append((key, spec, round(got, 3)))
    assert not problems, "\n".join(problems)
    assert set(skipped) == set(SKIP), "a SKIP entry no longer matches a row"
    assert len(checked) >= 30  # the selection is real: 3 DeiT baselines x sources, 10 EViT, 9 ToMe ...
    methods = {k[2] for k, _, _ in checked}
    assert methods == {"none", "ToMe", "EViT"}


# --------------------------------------------------------------------------- CLI JSON
@pytest.mark.parametrize("spec,target", [("tome:r=13", 2.7), ("evit:keep=0.7", 3.0)])
def test_cli_flops_json(spec, target):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(PMBENCH + ["flops", "--model", "deit_small_patch16_224", "--reducer", spec, "--json"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)  # exactly one JSON object on stdout
    assert abs(out["gmacs"] - target) <= 0.05
    assert "MACs" in out["unit_note"] and "GFLOPs" in out["unit_note"]
    assert len(out["blocks"]) == 12 and out["reducer"] == registry.build(spec).spec()
    assert out["total_macs"] == out["patch_embed"] + out["head"] + out["reducer_extra"] + sum(
        b["attn_macs"] + b["mlp_macs"] for b in out["blocks"])
