"""Segmentation integration (slow-marked): the CLI on the ADE20K layout, Runner training and
fine-tuning, PM calibration in Segmenter.  Shares one 2-iteration proxy Segmenter."""
from __future__ import annotations

import json

import pytest
import numpy as np
import torch

pytest.importorskip("mmseg")

from test_seg import ade_fixture  # noqa: E402,F401  (fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proxy_ckpt(tmp_path_factory):
    from bench.seg.train import train_segmenter

    d = tmp_path_factory.mktemp("seg")
    out = d / "p.pth"
    meta = train_segmenter("proxy", out, data="proxy:smoke", max_iters=2, work_dir=d / "w")
    assert meta["max_iters"] == 2 and "mIoU" in meta["val"]
    return out


def test_seg_eval_cli_on_ade20k_layout(ade_fixture, capfd):
    """The real ADE20K path (ADE20KDataset, Resize to 512, slide test) end to end, one JSON object."""
    from bench.cli import main

    rc = main(["seg-eval", "--config", "vit-t", "--reducer", "evit:keep=0.7", "--data", f"ade20k:{ade_fixture}",
               "--random-weights", "--json"])
    out, _ = capfd.readouterr()
    assert rc == 0
    res = json.loads(out)
    assert res["n_images"] == 2 and 0.0 <= res["miou"] <= 100.0 and res["reducer"] == "evit"
    assert res["window"] == [512, 512]
    # 48x64 -> resized to 512x683 -> two 512x512 windows per image
    assert res["gmacs_per_image"] == pytest.approx(2 * res["gmacs_per_window"], rel=1e-3)
    assert out.strip().startswith("{") and out.strip().endswith("}")  # nothing else on stdout


def test_train_and_evaluate_proxy(tmp_path, proxy_ckpt):
    """Runner training (2 iterations) on the proxy set, clean checkpoint, evaluation with a reducer."""
    from bench.seg.evaluate import seg_eval
    from bench.seg.train import train_segmenter

    out = proxy_ckpt
    torch.load(out, weights_only=True)
    res = seg_eval("proxy", "tome:r=8", "proxy:smoke", out, speed=True, fps_batches=(2,), speed_repeats=1,
                   max_images=2)
    assert res["n_images"] == 2 and res["fps_bs2"] > 0 and res["gmacs_per_window"] > 0
    base = seg_eval("proxy", "none", "proxy:smoke", out, speed=False, max_images=2)
    assert res["gmacs_per_window"] < base["gmacs_per_window"]
    # fine-tuning with a reducer starts from the given weights (Runner initialises, then loads them)
    out2 = tmp_path / "ft.pth"
    train_segmenter("proxy", out2, reducer="evit:keep=0.7", data="proxy:smoke", load_from=out, max_iters=1,
                    work_dir=tmp_path / "w2", cfg_options={"optim_wrapper.optimizer.lr": 1e-7})
    a = torch.load(out, weights_only=True)["state_dict"]
    b = torch.load(out2, weights_only=True)["state_dict"]
    k = "backbone.vit.blocks.5.attn.qkv.weight"
    torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0)


def test_pm_calibration_in_segmenter(tmp_path, proxy_ckpt):
    """PM's structure from pixel-CE gradient scores, saved, reloaded by the backbone, evaluated."""
    from bench.seg.evaluate import calibrate_to_file
    from bench.seg.evaluate import seg_eval

    spec = "pm:keep=0.5,prune=0,structure=local,trainable=false"
    st = tmp_path / "pm.pth"
    summary = calibrate_to_file("proxy", spec, "proxy:smoke", proxy_ckpt, st, iters=1)
    assert summary["calibration"]["iterations"] == 1 and st.exists()
    # seeded loader: a second calibration (global RNGs disturbed) gives the same structure
    torch.manual_seed(123), np.random.seed(123)
    st2 = tmp_path / "pm2.pth"
    calibrate_to_file("proxy", spec, "proxy:smoke", proxy_ckpt, st2, iters=1)
    a, b = (torch.load(p, weights_only=False)["reducer_state"] for p in (st, st2))
    a["meta"].pop("seconds"), b["meta"].pop("seconds")  # wall time
    assert _same(a, b)


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b
    res = seg_eval("proxy", spec, "proxy:smoke", proxy_ckpt, reducer_structure=st, speed=False, max_images=1)
    assert res["reducer_structure"] == str(st)
    base = seg_eval("proxy", "none", "proxy:smoke", proxy_ckpt, speed=False, max_images=1)
    assert res["gmacs_encoder_per_window"] < 0.75 * base["gmacs_encoder_per_window"]
