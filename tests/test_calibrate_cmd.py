"""``pmbench calibrate``: the generic calibration command any Calibrated method runs through (alone, or
as the torchrun job of ``--launcher torchrun``; tests/test_orchestrate.py launches it with 2 ranks)."""
from __future__ import annotations

import json

import pytest
import torch

from bench.cli import main
from bench.runtime.checkpoint import load_model, read_checkpoint

COMMON = ["--model", "pmbench_proxy_vit", "--data", "proxy:smoke", "--iters", "2", "--batch-size", "8",
          "--no-progress", "--json"]


def _same(a, b, where="reducer_state"):
    """Nested structures (dicts, lists, tensors) equal exactly."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if k == "seconds":  # the calibration's wall time
                continue
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_calibrate_gives_pm_calibrates_structure(tmp_path, capsys):
    """The generic command and PM's own pm-calibrate score the same batches into the same structure,
    matrices and predictions."""
    a, b = tmp_path / "generic.pt", tmp_path / "pm.pt"
    assert main(["calibrate", "--reducer", "pm:keep=0.7,prune=0.1", *COMMON, "--out", str(a)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["spec"].startswith("pm:") and res["world_size"] == 1
    assert res["sum_tokens"] == 12 * int(196 * 0.7) + 12 and len(res["per_layer"]) == 12
    assert main(["pm-calibrate", "--keep", "0.7", "--prune", "0.1", *COMMON, "--out", str(b)]) == 0
    capsys.readouterr()
    ca, cb = read_checkpoint(a), read_checkpoint(b)
    _same(ca["reducer_state"], cb["reducer_state"])
    (ma, ra), (mb, rb) = load_model(a), load_model(b)
    assert ra.calibrated and ra.per_layer()["tokens"] == rb.per_layer()["tokens"]
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(ma.eval()(x), mb.eval()(x))


def test_calibrate_refuses_a_method_without_a_learned_structure(tmp_path, capsys):
    rc = main(["calibrate", "--reducer", "tome:r=8", *COMMON, "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "'tome' has no learned structure" in err and "pm" in err
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("flag", ["--iters", "--batch-size"])
def test_calibrate_checks_counts_before_work(tmp_path, capsys, flag):
    counts = {"--iters": "2", "--batch-size": "8", flag: "0"}
    rc = main(["calibrate", "--reducer", "pm", "--model", "pmbench_proxy_vit", "--data", "proxy:smoke",
               *[a for kv in counts.items() for a in kv], "--out", str(tmp_path / "x.pt")])
    assert rc == 2 and flag in capsys.readouterr().err
