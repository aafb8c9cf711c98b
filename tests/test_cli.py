"""The ``pmbench`` command line: installed entry point, JSON output, and user errors.

Every user error (unknown reducer/model, bad option, bad value, impossible config) must print
one clear line on stderr and exit with status 2, before any model forward.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _console_script():
    exe = Path(sys.executable).parent / "pmbench"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "bench.cli"]


def test_list_json(capsys):
    assert main(["list", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["entry_point_group"] == "pmbench.reducers"
    rows = {r["name"]: r for r in out["reducers"]}
    assert rows["tome"]["source"] == "builtin" and set(rows["tome"]["options"]) == {"r", "inflect", "prop_attn"}
    assert rows["tome"]["default_spec"] == "tome:inflect=none,prop_attn=true,r=13"
    assert {"keep", "loc", "fuse"} <= set(rows["evit"]["options"])
    assert rows["none"]["default_spec"] == "none"


def test_console_script_error_exit_code():
    """The installed ``pmbench`` script (subprocess): exit status 2 and one line on stderr."""
    p = subprocess.run(_console_script() + ["flops", "--model", "deit_tiny_patch16_224", "--reducer",
                                            "evit:keep=0", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2
    assert p.stdout == ""  # no half-written JSON
    assert p.stderr.count("\n") == 1 and "(0, 1]" in p.stderr


def test_flops_text_output(capsys):
    assert main(["flops", "--model", "deit_tiny_patch16_224", "--reducer", "tome:r=8"]) == 0
    text = capsys.readouterr().out
    assert "GMACs: 0.924" in text and "GFLOPs" in text
    assert text.count("\n") >= 12 + 4  # per-block breakdown


def test_flops_json_measure(capsys):
    assert main(["flops", "--model", "deit_tiny_patch16_224", "--img-size", "112", "--reducer", "evit:keep=0.5",
                 "--measure", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["img_size"] == [112, 112] and out["blocks"][0]["attn_tokens"] == 50
    assert abs(out["measured_macs"] - out["total_macs"]) / out["total_macs"] < 0.01


@pytest.mark.parametrize("reducer,needles", [
    ("tomee:r=3", ["unknown reducer 'tomee'", "tome", "evit", "none"]),
    ("tome:k=3", ["unknown option", "valid options: inflect, prop_attn, r"]),
    ("evit:keep=abc", ["bad value", "keep"]),
    ("tome:r=1.5", ["bad value", "tome:r", "1.5"]),
    ("tome:r=99", ["r <= 98"]),
    ("evit:keep=1.5", ["(0, 1]"]),
    ("evit:loc=[3,6,12]", ["past the model depth 12"]),
    ("tome:r", ["expected key=value"]),
])
@pytest.mark.parametrize("command", ["flops", "speed"])
def test_user_errors_one_line_exit_2(capsys, monkeypatch, command, reducer, needles):
    from bench.runtime import models
    from bench.core import patch

    forwards, created = [], []
    real_apply, real_create = patch.apply, models.create
    monkeypatch.setattr(patch, "apply", lambda m, *a, **k: (m.register_forward_pre_hook(
        lambda *_: forwards.append(1)), real_apply(m, *a, **k))[1])
    monkeypatch.setattr(models, "create", lambda *a, **k: (created.append(1), real_create(*a, **k))[1])
    args = [command, "--model", "deit_tiny_patch16_224", "--reducer", reducer, "--json"]
    if command == "speed":
        args += ["--repeats", "1", "--iters", "1", "--warmup", "1", "--batch-size", "1", "--device", "cpu"]
    assert main(args) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    err = cap.err
    assert err.count("\n") == 1 and err.startswith(f"pmbench {command}: error: ")
    for n in needles:
        assert n in err, err
    assert forwards == []  # no compute
    model_dependent = reducer in ("tome:r=99", "evit:loc=[3,6,12]")
    assert bool(created) == model_dependent  # spec errors fail before a model is even built


@pytest.mark.parametrize("bs", ["abc", "0", "1,x", ""])
def test_speed_bad_batch_size(capsys, bs):
    assert main(["speed", "--model", "deit_tiny_patch16_224", "--batch-size", bs, "--json"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size" in err and err.count("\n") == 1


def test_list_text(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    assert "tome" in text and "evit" in text and "default: tome" in text


def test_unknown_model(capsys):
    assert main(["flops", "--model", "deit_nonexistent", "--json"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'deit_nonexistent'" in err and err.count("\n") == 1
