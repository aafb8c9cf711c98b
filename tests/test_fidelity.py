"""Real-data fidelity: the model's own preprocessing, canonical ImageNet labels, resolved specs,
per-image predictions with paired statistics, and one-line errors for bad input."""
from __future__ import annotations

import csv
import json
import math

import pytest
import timm
import torch

from bench import cli
from bench.core.reducer import ConfigError
from bench.runtime import data, preprocess, stats
from fixtures_data import SYNSETS, make_imagefolder, make_synset_folder

AUGREG = "vit_tiny_patch16_224"  # pinned to .augreg_in21k_ft_in1k: mean = std = 0.5


@pytest.fixture(scope="module")
def augreg_weights(tmp_path_factory):
    """A real timm ViT-Ti/16 architecture saved as a plain state dict (random weights, fixed seed)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "vit_tiny.pth"
    torch.save(timm.create_model(AUGREG).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def synset_root(tmp_path_factory):
    return make_synset_folder(tmp_path_factory.mktemp("inet") / "imagenet")


def run_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------- preprocessing
def test_preprocessing_comes_from_the_pretrained_cfg():
    vit = preprocess.resolve(AUGREG)
    assert vit.mean == (0.5, 0.5, 0.5) and vit.std == (0.5, 0.5, 0.5)
    assert "augreg_in21k_ft_in1k" in vit.norm_from and vit.interpolation == "bicubic"
    norm = vit.eval_transform().transforms[-1]
    assert tuple(norm.mean) == (0.5, 0.5, 0.5) and tuple(norm.std) == (0.5, 0.5, 0.5)
    deit = preprocess.resolve("deit_small_patch16_224")  # DeiT: unchanged, ImageNet statistics
    assert deit.key() == preprocess.default(224).key()
    assert deit.crop_pct == 0.875 and deit.crop_pct_from == "protocol" and deit.resize_size() == 256
    assert preprocess.resolve("deit_small_patch16_224", crop_pct="model").crop_pct == 0.9  # timm's cfg value
    over = preprocess.resolve(AUGREG, mean=[0.485, 0.456, 0.406], std="0.229 0.224 0.225", crop_pct=0.9)
    assert over.mean == data.IMAGENET_MEAN and over.crop_pct == 0.9 and over.norm_from.startswith("--mean")
    with pytest.raises(ConfigError, match=r"crop_pct must be in \(0, 1\]"):
        preprocess.resolve(AUGREG, crop_pct=0)


def test_eval_of_an_augreg_state_dict_uses_its_normalisation(capsys, augreg_weights, synset_root, tmp_path):
    """F1 + F4: no flag needed; a 3-class subset of synsets evaluates against the 1000-way head with
    canonical labels; saved predictions reproduce the reported top-1."""
    preds = tmp_path / "preds.csv"
    base = ["eval", "--model", AUGREG, "--weights", str(augreg_weights), "--data", f"imagenet:{synset_root}",
            "--json", "--no-progress"]
    rc, out, _ = run_cli(capsys, *base, "--save-preds", str(preds))
    assert rc == 0
    res = json.loads(out)
    assert res["preprocess"]["mean"] == [0.5, 0.5, 0.5] and res["preprocess"]["std"] == [0.5, 0.5, 0.5]
    assert res["labels"] == "imagenet-1k" and res["n_classes_present"] == 3 and res["data"]["num_classes"] == 1000
    rows = list(csv.DictReader(open(preds)))
    assert sorted({int(r["label"]) for r in rows}) == sorted(SYNSETS.values())
    for r in rows:
        assert SYNSETS[r["path"].split("/")[1]] == int(r["label"])
    assert 100.0 * sum(int(r["correct"]) for r in rows) / len(rows) == pytest.approx(res["top1"], abs=1e-3)
    rc, out, _ = run_cli(capsys, *base, "--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225")
    other = json.loads(out)
    assert rc == 0 and other["preprocess"]["norm_from"].startswith("--mean")
    assert abs(other["loss"] - res["loss"]) > 1e-4  # the two normalisations give different logits


def test_cache_keys_differ_when_only_normalisation_differs(tmp_path, monkeypatch):
    monkeypatch.setenv("PMBENCH_CACHE", str(tmp_path / "cache"))
    root = make_imagefolder(tmp_path / "inet", n_classes=2, train_per_class=1, val_per_class=2)
    a = data.build_dataset(f"imagenet:{root}", "val", cache=True, prep=preprocess.default(32))
    b = data.build_dataset(f"imagenet:{root}", "val", cache=True,
                           prep=preprocess.resolve(AUGREG, img_size=32))
    assert a.path != b.path
    assert not torch.equal(a[0][0], b[0][0])  # same pixels, other normalisation
    # the accuracy stage's job key holds the model's preprocessing (the fixture model is AugReg-like)
    from types import SimpleNamespace

    from bench.pipeline.stages.sources import RealSource

    ctx = SimpleNamespace(args=SimpleNamespace(fixture=True), work_dir=tmp_path / "work", device="cpu")
    key = RealSource(ctx, None).input_key()
    assert key["preprocess"]["mean"] == [0.5, 0.5, 0.5] and key["labels"] in ("imagenet-1k", "folders")


# --------------------------------------------------------------------------- labels
def test_synset_subsets_map_to_canonical_indices(tmp_path):
    """F2: a train split with other synsets than val keeps ImageNet's indices (not 0, 1, 2)."""
    root = make_synset_folder(tmp_path / "a", synsets=("n02085620", "n04254680"),
                              train_synsets=("n07920052",), per_class=1)
    space = data.resolve_labels(root, 1000)
    assert space.kind == "imagenet-1k" and space.num_classes == 1000
    assert [lab for _, lab in data.scan_split(root, "train", space)[1]] == [967]
    assert [lab for _, lab in data.scan_split(root, "val", space)[1]] == [151, 805]
    ys = [y for _, y in data.build_dataset(f"imagenet:{root}", "train", img_size=32, labels=space)]
    assert ys == [967]
    # a head of another size with synset folders: sorted folders, so the splits and the count must match
    with pytest.raises(ConfigError, match="different class folders .*a head of 10 classes"):
        data.resolve_labels(root, 10)
    with pytest.raises(ConfigError, match="the model has 10 classes but .* 3 class folders"):
        data.resolve_labels(make_synset_folder(tmp_path / "c", per_class=1), 10)
    # train with non-synset folders under synset val: mismatched splits fail before any compute
    bad = make_synset_folder(tmp_path / "b", per_class=1)
    (bad / "train" / "n02085620").rename(bad / "train" / "dogs")
    with pytest.raises(ConfigError, match="both splits need the same kind of class folders"):
        data.resolve_labels(bad, 1000)


def test_max_images_is_a_seeded_class_stratified_sample(tmp_path):
    root = make_imagefolder(tmp_path / "inet", n_classes=3, train_per_class=1, val_per_class=4)
    a = data.build_dataset(f"imagenet:{root}", "val", img_size=32, max_images=3, seed=1)
    b = data.build_dataset(f"imagenet:{root}", "val", img_size=32, max_images=3, seed=1)
    assert a.indices == b.indices and sorted(lab for _, lab in a.samples) == [0, 1, 2]
    c = data.build_dataset(f"imagenet:{root}", "val", img_size=32, max_images=7, seed=2)
    counts = [sum(lab == k for _, lab in c.samples) for k in range(3)]
    assert sorted(counts) == [2, 2, 3]


# --------------------------------------------------------------------------- paired statistics
def test_paired_drop_on_a_constructed_case():
    """800 both right, 30 only the reference, 10 only the reduced model, 160 neither."""
    ref = "1" * 800 + "1" * 30 + "0" * 10 + "0" * 160
    red = "1" * 800 + "0" * 30 + "1" * 10 + "0" * 160
    s = stats.paired_drop(ref, red)
    assert s["drop"] == pytest.approx(-2.0) and (s["ref_only"], s["reduced_only"]) == (30, 10)
    se = math.sqrt((30 + 10) - (30 - 10) ** 2 / 1000) / 1000 * 100  # the paired (Wald) standard error
    assert s["ci_low"] == pytest.approx(-2.0 - 1.96 * se, abs=0.15)
    assert s["ci_high"] == pytest.approx(-2.0 + 1.96 * se, abs=0.15)
    assert s["mcnemar_p"] == pytest.approx(0.0022214337732293643, rel=1e-9)  # scipy.stats.binomtest(10, 40)
    same = stats.paired_drop(ref, ref)
    assert same["drop"] == 0 and same["ci_low"] == same["ci_high"] == 0 and same["mcnemar_p"] == 1.0
    with pytest.raises(ConfigError, match="same images"):
        stats.paired_drop("101", "10")


def test_accuracy_rows_get_paired_drops():
    from bench.pipeline.stages.accuracy import add_paired_drops

    rows = [{"timm_model": "m", "config": "none", "kind": "off-the-shelf", "correct": "1" * 90 + "0" * 10},
            {"timm_model": "m", "config": "tome:r=13", "kind": "off-the-shelf", "correct": "1" * 80 + "0" * 20},
            {"timm_model": "m", "config": "tome:r=13", "kind": "fine-tuned", "correct": "1" * 90 + "0" * 10}]
    add_paired_drops(rows)
    assert rows[1]["drop"] == -10.0 and rows[1]["drop_ci_high"] < 0 and rows[1]["mcnemar_p"] < 0.01
    assert rows[2]["drop"] == 0.0 and rows[2]["drop_ci95"] == "[+0.0, +0.0]"
    assert "drop" not in rows[0]


# --------------------------------------------------------------------------- results say what they measured
def test_eval_json_has_the_resolved_spec_and_progress_on_stderr(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PMBENCH_CACHE", str(tmp_path / "cache"))
    from bench.runtime.fixtures import ensure_fixture

    fx = ensure_fixture()
    rc, out, err = run_cli(capsys, "eval", "--model", fx["model"], "--weights", fx["weights"], "--data",
                           f"imagenet:{fx['imagenet']}", "--reducer", "tome:r=4", "--json")
    res = json.loads(out)  # stdout holds exactly the JSON object
    assert rc == 0 and res["reducer"] == "tome:r=4"
    assert res["reducer_full"].startswith("tome:") and "r=4" in res["reducer_full"]
    assert res["reducer_full"].count("=") > 1  # every option spelled out, defaults included
    assert "eval" in err  # progress goes to stderr, also with --json
    rc, out, _ = run_cli(capsys, "eval", "--model", fx["model"], "--weights", fx["weights"], "--data",
                         f"imagenet:{fx['imagenet']}", "--reducer", "dynamicvit", "--json", "--no-progress")
    res = json.loads(out)
    assert rc == 0 and res["untrained_reducer_modules"] and "untrained" in res["note"]


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import os

    old = os.environ.get("PMBENCH_CACHE")
    os.environ["PMBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        from bench.runtime.fixtures import ensure_fixture

        fx = ensure_fixture()
    finally:
        if old is None:
            os.environ.pop("PMBENCH_CACHE")
        else:
            os.environ["PMBENCH_CACHE"] = old
    nan = tmp_path_factory.mktemp("nan") / "nan.pth"
    sd = torch.load(fx["weights"])["model"]
    sd["head.weight"][0, 0] = float("nan")
    torch.save({"model": sd}, nan)
    return {**fx, "nan": str(nan)}


@pytest.mark.parametrize("extra, message", [
    (["--crop-pct", "0"], "crop_pct must be in"),
    (["--crop-pct", "-1"], "crop_pct must be in"),
    (["--batch-size", "0"], "--batch-size must be a whole number >= 1"),
    (["--max-images", "0"], "--max-images must be a whole number >= 1"),
    (["--max-images", "-1"], "--max-images must be a whole number >= 1"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
    (["--reducer", "tome:r=13,,"], "tome:r=13,,"),
    (["--mean", "0.5", "0.5"], "--mean takes one or three numbers"),
    (["--save-preds", "/tmp"], "is a directory"),
])
def test_bad_eval_input_is_one_line_rc2(capsys, tiny, extra, message):
    rc, out, err = run_cli(capsys, "eval", "--model", tiny["model"], "--weights", tiny["weights"], "--data",
                           f"imagenet:{tiny['imagenet']}", "--no-progress", *extra)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("pmbench eval: error:") and message in lines[0]


def test_non_vit_nan_weights_and_worker_errors_are_one_line(capsys, tiny, tmp_path):
    rc, _, err = run_cli(capsys, "eval", "--model", "resnet18", "--weights", str(tmp_path / "r.pth"),
                         "--data", f"imagenet:{tiny['imagenet']}")
    assert rc == 2 and "not a ViT" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(capsys, "eval", "--model", tiny["model"], "--weights", tiny["nan"], "--data",
                         f"imagenet:{tiny['imagenet']}", "--no-progress")
    assert rc == 2 and "non-finite logits" in err and len(err.strip().splitlines()) == 1
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(tiny["imagenet"], root)
    victim = sorted((root / "val").rglob("*.JPEG"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated JPEG
    rc, _, err = run_cli(capsys, "eval", "--model", tiny["model"], "--weights", tiny["weights"], "--data",
                         f"imagenet:{root}", "--no-progress", "--workers", "2", "--batch-size", "2")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "cannot read image" in lines[0] and "Traceback" not in err


@pytest.mark.parametrize("short, arch", [("vit-t", "vit_tiny_patch16_384"), ("vit-s", "vit_small_patch16_384"),
                                         ("vit-b", "vit_base_patch16_384")])
def test_segmenter_preprocessor_matches_its_backbone(short, arch):
    """The stock Segmenter configs load AugReg ViT backbones: their mmseg data preprocessor (0-255
    scale) must normalise as the backbone's timm pretrained_cfg does (mean = std = 0.5)."""
    from bench.seg import configs

    cfg = configs.load(short)
    dp = cfg.model.data_preprocessor
    want = preprocess.resolve(f"{arch}.augreg_in21k_ft_in1k")
    assert [m / 255 for m in dp.mean] == pytest.approx(list(want.mean))
    assert [s / 255 for s in dp.std] == pytest.approx(list(want.std))


def test_calibration_and_training_use_canonical_labels_and_the_model_input(capsys, augreg_weights, tmp_path):
    """F2: a train/ holding three synsets under a 1000-class model calibrates with their real indices and
    the model's 0.5/0.5 input, with progress on stderr under --json (F6); a train split of another kind
    than val fails before any compute."""
    root = make_synset_folder(tmp_path / "inet", per_class=1)
    rc, out, err = run_cli(capsys, "pm-calibrate", "--model", AUGREG, "--weights", str(augreg_weights), "--data",
                           f"imagenet:{root}", "--max-images", "3", "--batch-size", "3", "--out",
                           str(tmp_path / "pm.pt"), "--json")
    res = json.loads(out)
    assert rc == 0 and res["labels"] == "imagenet-1k" and res["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert "pm-calibrate" in err
    loader = data.build_loader(f"imagenet:{root}", "train", 3, labels=data.resolve_labels(root, 1000),
                               shuffle=True)
    assert sorted(torch.cat([y for _, y in loader]).tolist()) == sorted(SYNSETS.values())
    (root / "train" / "n02085620").rename(root / "train" / "dogs")
    for cmd in (["pm-calibrate", "--out", str(tmp_path / "pm2.pt")], ["train", "--out", str(tmp_path / "t.pt")]):
        rc, _, err = run_cli(capsys, *cmd, "--model", AUGREG, "--weights", str(augreg_weights),
                             "--data", f"imagenet:{root}")
        assert rc == 2 and "same kind of class folders" in err and len(err.strip().splitlines()) == 1
