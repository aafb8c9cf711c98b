"""Nothing lost, nothing meaningless (issue 16): outputs checked before compute, generators never
delete what they did not write, NaN never overwrites a checkpoint, 0/negative counts are errors,
PM under ``torch.inference_mode()``."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bench.core import patch, registry
from bench.core.reducer import ConfigError
from bench.runtime import checkpoint, models, outputs, proxy, proxy_backbone
from bench.runtime.data import ShardedEpochSampler
from fixtures_data import make_imagefolder


def _cli(argv, capsys):
    from bench.cli import main

    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def _no_compute(monkeypatch):
    """Any data loading, training or calibration fails the test: errors must come first."""
    import bench.runtime.data
    import bench.seg.evaluate
    import bench.seg.train
    import pm.calibrate

    def boom(*a, **k):
        raise AssertionError("compute started before the arguments were checked")

    data = bench.runtime.data
    for mod, name in ((data, "describe_data"), (data, "build_loader"), (data, "build_dataset"),
                      (pm.calibrate, "calibrate"), (models, "create"), (proxy, "ensure_proxy_data"),
                      (proxy_backbone, "ensure_backbone"), (bench.seg.evaluate, "seg_eval"),
                      (bench.seg.train, "train_segmenter"), (bench.seg.train, "ensure_proxy_segmenter")):
        monkeypatch.setattr(mod, name, boom)


# --------------------------------------------------------------------------- generators
def test_proxy_out_never_deletes_user_files(tmp_path, capsys):
    out = tmp_path / "x" / "v"
    out.mkdir(parents=True)
    (out / "f").write_text("a")
    sibling = tmp_path / "x" / "v.tmp"  # the old generator's scratch name: a user's folder here
    sibling.mkdir()
    (sibling / "g").write_text("b")
    with pytest.raises(ConfigError, match="did not write"):
        proxy.generate(out, train_per_class=1, val_per_class=1)
    rc, err = _cli(["data", "proxy", "--out", str(out), "--size", "smoke"], capsys)
    assert rc == 2 and len(err) == 1 and "did not write" in err[0]
    assert (out / "f").read_text() == "a" and (sibling / "g").read_text() == "b"
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["v", "v.tmp"]  # no temporary left
    # a file where the folder should be
    rc, err = _cli(["data", "proxy", "--out", str(out / "f"), "--size", "smoke"], capsys)
    assert rc == 2 and len(err) == 1 and (out / "f").read_text() == "a"


def test_proxy_replaces_only_its_own_earlier_output(tmp_path):
    out = tmp_path / "px"
    proxy.generate(out, train_per_class=1, val_per_class=1, seed=0)
    sibling = tmp_path / "px.tmp"
    sibling.mkdir()
    (sibling / "keep").write_text("k")
    proxy.generate(out, train_per_class=2, val_per_class=1, seed=0)  # an earlier set of ours: replaced
    assert json.loads((out / "proxy.json").read_text())["train_per_class"] == 2
    assert (sibling / "keep").read_text() == "k"
    (out / "train" / "mine.txt").write_text("user")  # a user's file inside an earlier set: refused
    with pytest.raises(ConfigError, match="mine.txt"):
        proxy.generate(out, train_per_class=1, val_per_class=1, seed=0)
    assert (out / "train" / "mine.txt").read_text() == "user"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temporaries cleaned


def test_seg_proxy_never_deletes_user_files(tmp_path):
    from bench.seg import proxy_data

    root = tmp_path / "seg"
    root.mkdir()
    (root / "notes.txt").write_text("n")
    with pytest.raises(ConfigError, match="did not write"):
        proxy_data.ensure_proxy_seg("tiny", root=root)
    assert (root / "notes.txt").read_text() == "n" and sorted(os.listdir(root)) == ["notes.txt"]


# --------------------------------------------------------------------------- --out before compute
@pytest.mark.parametrize("argv", [
    ["train", "--data", "proxy", "--out", "{d}"],
    ["pm-calibrate", "--model", "pmbench_proxy_vit", "--out", "{d}"],
    ["train", "--out", "{f}/model.pt"],  # parent is a file
    ["train", "--out", "run.pt", "--log", "{d}"],
    ["seg-train", "--config", "proxy", "--out", "{d}"],
])
def test_out_naming_a_directory_fails_before_compute(argv, tmp_path, capsys, monkeypatch):
    _no_compute(monkeypatch)
    (tmp_path / "afile").write_text("x")
    argv = [a.format(d=tmp_path, f=tmp_path / "afile") for a in argv]
    rc, err = _cli(argv, capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("pmbench ")
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_check_out_file_accepts_new_nested_paths(tmp_path):
    assert outputs.check_out_file(tmp_path / "a" / "b" / "m.pt") == tmp_path / "a" / "b" / "m.pt"
    assert not (tmp_path / "a").exists()  # checked, not created


# --------------------------------------------------------------------------- counts
@pytest.mark.parametrize("argv", [
    ["train", "--max-steps", "0"], ["train", "--max-steps", "-1"], ["train", "--batch-size", "0"],
    ["train", "--batch-size", "-4"], ["train", "--epochs", "0"], ["train", "--epochs", "-1"],
    ["train", "--lr", "nan"], ["train", "--lr", "-1"], ["train", "--lr", "inf"],
    ["train", "--ckpt-every-steps", "0"], ["train", "--max-train-images", "0"],
    ["flops", "--img-size", "0"], ["flops", "--img-size", "-1"], ["flops", "--num-classes", "-1"],
    ["flops", "--num-classes", "0"],
    ["pm-calibrate", "--out", "x.pt", "--iters", "0"], ["pm-calibrate", "--out", "x.pt", "--iters", "-2"],
    ["pm-calibrate", "--out", "x.pt", "--max-images", "0"], ["pm-calibrate", "--out", "x.pt", "--max-images", "-1"],
    ["pm-calibrate", "--out", "x.pt", "--batch-size", "0"],
    ["seg-eval", "--max-images", "0"], ["seg-eval", "--max-images", "-1"], ["seg-eval", "--repeats", "0"],
    ["seg-eval", "--iters", "0"], ["seg-eval", "--fps-batches", "32,0"], ["seg-cost", "--img-size", "0"],
    ["seg-train", "--max-iters", "0", "--out", "x.pth"], ["seg-eval", "--threads", "0"],
    ["data", "proxy", "--seed", "-1"],
])
def test_zero_and_negative_counts_are_rejected(argv, capsys, monkeypatch):
    _no_compute(monkeypatch)
    rc, err = _cli(argv, capsys)
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith(f"pmbench {argv[0]}: error: ")
    assert argv[-2].split("=")[0] in err[0] or argv[1] in err[0]


def test_stray_commas_in_a_spec_are_an_error():
    for spec in ("tome:r=13,,", "tome:,r=13", "tome:r=13,", "tome:r=[1,2", "tome:=3"):
        with pytest.raises(ConfigError):
            registry.parse_spec(spec)
    assert registry.parse_spec("tome:r=[16,16,8],trace_source=false")[1]["r"] == "[16,16,8]"


def test_truncated_segmenter_checkpoint_is_a_config_error(tmp_path):
    from bench.seg.checkpoint import load_weights

    p = tmp_path / "seg.pth"
    torch.save({"state_dict": {"a": torch.zeros(2000)}}, p)
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="truncated"):
        load_weights(p)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ConfigError, match="truncated"):
        load_weights(tmp_path / "empty.pth")


# --------------------------------------------------------------------------- checkpoints
def _tiny(seed=0):
    torch.manual_seed(seed)
    return models.create("pmbench_proxy_vit", img_size=32, num_classes=4)


def _loader(n=24, bs=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.arange(n) % 4
    return DataLoader(TensorDataset(x, y), batch_size=bs, sampler=ShardedEpochSampler(n, shuffle=True, seed=0),
                      drop_last=True)


def _finite(ck):
    return all(bool(torch.isfinite(v).all()) for v in ck["model"].values() if v.is_floating_point())


def test_diverging_update_keeps_last_good_checkpoint_resumable(tmp_path, monkeypatch):
    """The update of step 3 makes the weights NaN (loss still finite): the checkpoint of step 2
    stays, finite, and resuming it reproduces the straight run."""
    from bench.runtime.train import TrainConfig, TrainingDiverged, train

    cfg = dict(epochs=2, lr=1e-3, progress=False, seed=3)  # 3 steps per epoch, 6 in all
    straight = _tiny(1)
    train(straight, _loader(), TrainConfig(**cfg))
    ck = tmp_path / "run.pt"
    orig = torch.optim.AdamW.step
    n = {"steps": 0}

    def exploding_step(self, *a, **k):
        out = orig(self, *a, **k)
        n["steps"] += 1
        if n["steps"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", exploding_step)
    with pytest.raises(TrainingDiverged, match=r"step 3 of 6.*run\.pt \(step 2\) is intact"):
        train(_tiny(1), _loader(), TrainConfig(**cfg, ckpt_path=str(ck), ckpt_every_steps=1))
    monkeypatch.setattr(torch.optim.AdamW, "step", orig)
    saved = checkpoint.read_checkpoint(ck)
    assert saved["step"] == 2 and _finite(saved)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    resumed = _tiny(99)
    hist = train(resumed, _loader(), TrainConfig(**cfg, ckpt_path=str(ck), resume=True))
    assert hist["final_step"] == 6
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_cli_diverging_run_leaves_finite_checkpoint(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "inet", n_classes=3, train_per_class=4, val_per_class=1, size=32)
    out = tmp_path / "nan2.pt"
    rc, err = _cli(["train", "--model", "pmbench_tiny_vit", "--data", f"imagenet:{root}", "--lr", "1e6",
                    "--warmup-epochs", "1", "--epochs", "2", "--batch-size", "4", "--ckpt-every-steps", "1",
                    "--out", str(out), "--no-progress", "--no-val"], capsys)
    assert rc == 2 and "diverged at step" in err[-1] and str(out) in err[-1]
    ck = checkpoint.read_checkpoint(out)
    assert _finite(ck) and ck["step"] >= 1


def test_failed_save_leaves_no_temporary(tmp_path, monkeypatch):
    model = _tiny()
    dead = tmp_path / "m.pt.tmp999999999"  # a killed save of another (gone) process
    dead.write_bytes(b"")
    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path / "m.pt", model)
    monkeypatch.setattr(torch, "save", real_save)
    assert os.listdir(tmp_path) == []  # neither ours nor the stale one; no half-written target
    checkpoint.save_checkpoint(tmp_path / "m.pt", model)
    assert os.listdir(tmp_path) == ["m.pt"]


# --------------------------------------------------------------------------- PM
def test_pm_calibration_rejects_non_finite_loss(make_vit):
    from pm.calibrate import calibrate

    model = make_vit(depth=4)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    red = registry.build("pm:keep=0.6,prune=0.1")
    data = [(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))]
    with pytest.raises(ConfigError, match="not finite"):
        calibrate(model, red, data)


def test_pm_under_inference_mode(make_vit, tmp_path):
    x = torch.randn(2, 3, 64, 64)
    ref = make_vit(depth=4)
    patch.apply(ref, registry.build("pm:keep=0.6,prune=0.1"))
    with torch.no_grad():
        want = ref(x)
    model = make_vit(depth=4)
    with torch.inference_mode():  # patched inside inference mode
        patch.apply(model, registry.build("pm:keep=0.6,prune=0.1"))
        assert torch.allclose(model(x), want, atol=1e-6)
    proxy_ref = _tiny()
    patch.apply(proxy_ref, registry.build("pm:keep=0.6,prune=0.1"))
    xs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want_small = proxy_ref(xs)
    checkpoint.save_checkpoint(tmp_path / "pm.pt", proxy_ref)
    with torch.inference_mode():  # loaded inside inference mode
        loaded, _ = checkpoint.load_model(tmp_path / "pm.pt")
        assert torch.allclose(loaded(xs), want_small, atol=1e-6)
    model.train()  # the matrices made in inference mode still train
    model(x).sum().backward()
    assert model.reducer_modules["pm"].merge["0"].grad is not None


def test_exclusive_lock_makes_a_second_process_wait_until_the_first_is_done(tmp_path):
    """What lets parallel test workers, torchrun ranks and two runs share one cache: the second
    process that would create an output waits on the lock and then finds it made."""
    import subprocess
    import sys

    lock, made = tmp_path / ".x.lock", tmp_path / "made"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from bench.runtime.outputs import exclusive_lock\n"
         f"with exclusive_lock({str(lock)!r}):\n"
         "    print('held', flush=True); time.sleep(1.0)\n"
         f"    Path({str(made)!r}).write_text('done')\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not made.exists()
        with outputs.exclusive_lock(lock):
            assert made.read_text() == "done"  # we got the lock only after the holder had finished
    finally:
        holder.wait(timeout=60)
    assert holder.returncode == 0
