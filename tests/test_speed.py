"""Throughput harness (bench/speed.py, ``pmbench speed``): functional checks only.

Timings on a shared CPU are noise, so nothing here asserts a speed; speed goals live in the
pytest-benchmark file tests/test_bench_speed.py.  These tests check the protocol's bookkeeping:
the provenance stamp, interleaving, per-pair speed-ups and the CLI's JSON.
"""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch

from bench import patch, registry, speed
from bench.cli import main

STAMP_KEYS = {"device", "device_type", "threads", "torch", "timm", "python", "commit", "date"}


def _pair(make_vit, spec="tome:r=8"):
    base = make_vit()
    red = copy.deepcopy(base)
    patch.apply(red, registry.build(spec))
    return {"baseline": base, spec: red}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_measure_interleaved(make_vit, precision):
    cfg = speed.SpeedConfig(batch_size=2, precision=precision, warmup=1, iters=1, repeats=3, img_size=(64, 64))
    order = []
    models = _pair(make_vit)
    for name, m in models.items():  # record the call order to check the interleaving
        m.register_forward_pre_hook(lambda mod, a, name=name: order.append(name))
    res = speed.measure(models, cfg, baseline="baseline")
    assert STAMP_KEYS <= set(res["stamp"])
    assert res["stamp"]["torch"] == torch.__version__ and res["stamp"]["timm"] == timm.__version__
    assert res["stamp"]["threads"] == torch.get_num_threads()
    c = res["config"]
    assert (c["batch_size"], c["precision"], c["repeats"], c["iters"], c["warmup"]) == (2, precision, 3, 1, 1)
    assert c["precision_desc"] == ("float32" if precision == "fp32" else "autocast bfloat16")
    assert "interleaved" in c["protocol"] and "median" in c["protocol"]
    base, red = res["models"]["baseline"], res["models"]["tome:r=8"]
    for m in (base, red):
        assert len(m["times_s"]) == 3 and all(t > 0 for t in m["times_s"])
        assert 0 < m["img_s_min"] <= m["img_s"] <= m["img_s_max"] and m["step_ms"] > 0
    assert "speedup" not in base
    assert 0 < red["speedup_min"] <= red["speedup"] <= red["speedup_max"]
    ratios = sorted(b / t for b, t in zip(base["times_s"], red["times_s"]))
    assert red["speedup"] == pytest.approx(ratios[1])  # median of per-pair ratios
    # warm-up (1 each), then per repeat both models, order alternating
    k0, k1 = "baseline", "tome:r=8"
    assert order == [k0, k1] + [k0, k1] + [k1, k0] + [k0, k1]


def test_autocast_labels():
    assert speed.autocast_ctx("amp", "cpu")[1] == "autocast bfloat16"  # fp16 autocast is no CPU fast path
    assert speed.autocast_ctx("fp32", "cpu")[1] == "float32"
    with pytest.raises(ValueError):
        speed.autocast_ctx("fp8", "cpu")


def test_defaults_follow_device():
    c = speed.SpeedConfig().resolved()
    assert (c.warmup, c.iters) == (2, 3)
    g = speed.SpeedConfig(device="cuda").resolved()
    assert (g.warmup, g.iters) == (20, 50)


def test_cli_speed_json_vs_baseline_sweep(capsys):
    rc = main(["speed", "--model", "deit_tiny_patch16_224", "--img-size", "64", "--reducer", "tome:r=4",
               "--vs", "baseline", "--batch-size", "1,2", "--repeats", "2", "--iters", "1", "--warmup", "1",
               "--device", "cpu", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)  # one JSON object, nothing else on stdout
    assert out["model"] == "deit_tiny_patch16_224" and out["reducer"] == "tome:r=4"
    assert [r["batch_size"] for r in out["runs"]] == [1, 2]
    assert STAMP_KEYS <= set(out["stamp"])
    for r in out["runs"]:
        assert r["config"]["img_size"] == [64, 64] or tuple(r["config"]["img_size"]) == (64, 64)
        assert set(r["models"]) == {"baseline", "tome:r=4"}
        red = r["models"]["tome:r=4"]
        assert red["speedup"] > 0 and red["img_s"] > 0 and r["models"]["baseline"]["img_s"] > 0


def test_cli_speed_single_model_text(capsys):
    rc = main(["speed", "--model", "deit_tiny_patch16_224", "--img-size", "64", "--reducer", "evit:keep=0.5",
               "--batch-size", "1", "--repeats", "2", "--iters", "1", "--warmup", "1", "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "img/s" in text and "evit:keep=0.5" in text and "speed-up" not in text
    assert "torch" in text and "timm" in text and "precision fp32" in text
