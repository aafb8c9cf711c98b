"""run_all.sh orchestration: result cache, reports, published mapping, CI gate, paper profile on fixtures."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.pipeline import gate
from bench.report import published
from bench.runtime.results import ResultCache, atomic_write_json

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- result cache
def test_cache_skips_done_and_force_remeasures(tmp_path):
    calls = []

    def fn():
        calls.append(1)
        return {"v": len(calls)}

    c = ResultCache(tmp_path)
    desc = {"kind": "x", "model": "m", "spec": "tome:r=13"}
    r1, cached1 = c.get_or_run(desc, fn)
    r2, cached2 = c.get_or_run(desc, fn)
    assert (cached1, cached2) == (False, True) and r2["result"] == {"v": 1} and len(calls) == 1
    # a different description is a different configuration
    _, cached3 = c.get_or_run({**desc, "spec": "tome:r=8"}, fn)
    assert not cached3 and len(calls) == 2
    forced = ResultCache(tmp_path, force=True)
    _, cached4 = forced.get_or_run(desc, fn)
    assert not cached4 and len(calls) == 3


def test_cache_damaged_file_is_remeasured(tmp_path):
    c = ResultCache(tmp_path)
    desc = {"kind": "x", "a": 1}
    c.put(desc, {"v": 1})
    c.path(desc).write_text("{ truncated")
    assert c.get(desc) is None


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "r.json"
    atomic_write_json(p, {"ok": 1})

    class Boom:
        def __str__(self):
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write_json(p, {"bad": Boom()})
    assert json.loads(p.read_text()) == {"ok": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind


# --------------------------------------------------------------------------- published numbers
def test_published_mapping(monkeypatch):
    norm = lambda m, c: published.normalise_spec(published.spec_for(m, c))  # noqa: E731
    assert published.spec_for("ToMe", "r=13") == "tome:r=13"
    assert norm("EViT", "keep=0.7;fuse=no") == published.normalise_spec("evit:keep=0.7,fuse=false")
    assert norm("EViT", "keep=0.7;fuse=yes") == published.normalise_spec("evit:keep=0.7")
    assert published.spec_for("DynamicViT", "rho=0.7") == "dynamicvit:rho=0.7"
    assert published.spec_for("PM", "keep=0.6") == "pm:keep=0.6"
    assert published.spec_for("ToMe (ablation)", "r=8;feature=K") is None  # not a registered method
    assert published.spec_for("ToMe", "r=8;decreasing") is None  # a tag the method has no option for
    assert published.spec_for("ToMe", "r=8;feature=K") is None  # an option it does not have
    assert published.spec_for("EViT", "keep=1.7") is None  # a value it refuses
    # a headline without a configuration: only where the defaults are the published setting
    assert published.spec_for("PM", "") is None and published.spec_for("MSTM", "") == "mstm"
    # the method column is matched against the registry, so a plug-in's published rows map too
    from bench.core import registry
    from bench.core.reducer import Option, Reducer

    class Toy(Reducer):
        name = "toy"
        options = {"k": Option("int", 1, "tokens removed")}
        paper_count_sources = ("Toy paper",)

    monkeypatch.setitem(registry._registered, "toy", Toy)
    assert published.spec_for("Toy", "k=3") == "toy:k=3" and published.spec_for("Toy", "") is None
    assert published.uses_paper_count({"source": "Toy paper", "spec": "toy:k=3"})
    assert not published.uses_paper_count({"source": "Toy README", "spec": "toy:k=3"})
    rows = published.comparable_rows()
    assert any(r["spec"] == "tome:r=13" and r["timm_model"] == "deit_small_patch16_224" for r in rows)
    sp = published.published_speedups(rows)
    # PM README: DeiT-S 1153 -> 1793 img/s
    assert sp[("PM README", "deit_small_patch16_224", "pm:keep=0.6")] == pytest.approx(1793 / 1153)


# --------------------------------------------------------------------------- gate
def _report(tmp_path, gm=2.7, top1=80.0, sp=1.5):
    d = tmp_path / "rep"
    d.mkdir(exist_ok=True)
    atomic_write_json(d / "flops.json", {"rows": [{"model": "DeiT-T", "config": "tome:r=13", "gmacs": gm}]})
    atomic_write_json(d / "accuracy.json", {"rows": [{"model": "proxy ViT", "config": "tome:r=13",
                                                      "kind": "off-the-shelf", "top1": top1}]})
    atomic_write_json(d / "throughput.json", {"rows": [{"model": "DeiT-T", "config": "tome:r=13", "precision": "fp32",
                                                        "batch_size": 8, "speedup": sp}]})
    return d


def test_gate_accepts_then_detects_regressions(tmp_path):
    exp = tmp_path / "smoke.json"
    gate.accept(_report(tmp_path), exp)
    e = json.loads(exp.read_text())
    assert gate.check(gate.collect(_report(tmp_path)), e) == []
    probs = gate.check(gate.collect(_report(tmp_path, gm=2.8, top1=80.0 - gate.ACCURACY_TOLERANCE - 5, sp=0.5)), e)
    text = "\n".join(probs)
    assert "GMACs" in text and "accuracy" in text and "speed-up" in text and len(probs) == 3
    # within tolerance: a small accuracy wobble and a speed-up above the floor pass
    assert gate.check(gate.collect(_report(tmp_path, top1=80.0 - gate.ACCURACY_TOLERANCE + 0.5, sp=1.0)), e) == []


def test_gate_cli_prints_what_regressed_and_how_to_accept(tmp_path):
    exp = tmp_path / "smoke.json"
    gate.accept(_report(tmp_path), exp)
    bad = _report(tmp_path, gm=3.0)
    out = subprocess.run([sys.executable, "-m", "bench.pipeline.gate", str(bad), "--expect", str(exp)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1
    assert "GMACs DeiT-T|tome:r=13" in out.stdout and "./run_all.sh accept" in out.stdout
    assert "1 failed" in out.stdout


def _speed_row(base_s, reduced_s, **extra):
    """A throughput row built from constructed per-repeat timings, as bench.runtime.speed reports them."""
    import statistics

    ratios = sorted(b / t for b, t in zip(base_s, reduced_s))
    return {"model": "DeiT-T", "config": "tome:r=13", "precision": "fp32", "batch_size": 8,
            "speedup": round(statistics.median(ratios), 3), "speedup_min": round(ratios[0], 3),
            "speedup_max": round(ratios[-1], 3), **extra}


def test_gate_speed_rule_on_constructed_timings():
    floor = 0.8
    base = [0.10, 0.10, 0.10]
    # quiet machine, fast enough: pass
    assert gate.judge_speedup(1.33, floor, (1.30, 1.36, "min..max"))[0] == "pass"
    # quiet machine, every repeat well below the floor: a real regression
    r = _speed_row(base, [0.16, 0.155, 0.165])  # speed-ups 0.61..0.65
    v, why = gate.judge_speedup(r["speedup"], floor, gate.speedup_interval(r))
    assert v == "fail" and "entirely below" in why
    # busy machine (the issue: ToMe 0.52-0.79x per repeat against a 0.798 floor, spread > 40%):
    # not judged, not failed
    r = _speed_row(base, [0.19, 0.14, 0.095])  # 0.53, 0.71, 1.05
    v, why = gate.judge_speedup(r["speedup"], floor, gate.speedup_interval(r))
    assert v == "noisy" and "machine too noisy to judge speed" in why
    # median a little below the floor, the run's own spread reaches it: pass
    r = _speed_row(base, [0.13, 0.127, 0.118])  # 0.77, 0.79, 0.85
    assert gate.judge_speedup(r["speedup"], floor, gate.speedup_interval(r))[0] == "pass"
    # no spread recorded (old reports): the floor alone decides
    assert gate.judge_speedup(0.7, floor, None)[0] == "fail"
    # a bootstrap interval of the median, when present, is preferred over min..max
    r = _speed_row(base, [0.19, 0.14, 0.095], speedup_ci_low=0.70, speedup_ci_high=0.72)
    lo, hi, _ = gate.speedup_interval(r)
    assert (lo, hi) == (0.70, 0.72)
    assert gate.judge_speedup(r["speedup"], floor, (lo, hi, "interval"))[0] == "fail"


def test_gate_cli_says_machine_too_noisy_without_failing(tmp_path, capsys):
    exp = tmp_path / "smoke.json"
    gate.accept(_report(tmp_path, sp=1.33), exp)  # floor 0.798
    bad = _report(tmp_path)
    atomic_write_json(bad / "throughput.json", {"rows": [_speed_row([0.1] * 3, [0.19, 0.14, 0.095])]})
    assert gate.main([str(bad), "--expect", str(exp)]) == 0
    out = capsys.readouterr().out
    assert "machine too noisy to judge speed" in out and "0 failed" in out and "1 not judged" in out
    # the same median with a tight spread fails
    atomic_write_json(bad / "throughput.json", {"rows": [_speed_row([0.1] * 3, [0.142, 0.14, 0.138])]})
    assert gate.main([str(bad), "--expect", str(exp)]) == 1
    assert "speed-up DeiT-T|tome:r=13|fp32|bs8" in capsys.readouterr().out


def test_committed_expectations_exist_and_cover_every_table_type():
    e = json.loads((ROOT / "tests" / "expectations" / "smoke.json").read_text())
    assert e["gmacs"] and e["accuracy"] and e["speedup_floor"]
    methods = {k.split("|")[1].split(":")[0] for k in e["gmacs"]}
    assert {"tome", "evit", "pm", "dynamicvit", "mstm"} <= methods


# --------------------------------------------------------------------------- orchestrator
def _run(args, env_extra=None, timeout=600):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "bench.orchestrate", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_cost_stage_writes_stamped_tables_and_resumes(tmp_path):
    env = {"PMBENCH_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "rep"
    r = _run(["--profile", "smoke", "--only", "cost", "--out", str(out)], env)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (out / "flops.md").read_text()
    for field in ("profile: smoke", "device:", "torch:", "timm:", "commit:", "date:"):
        assert field in md
    rows = json.loads((out / "flops.json").read_text())["rows"]
    by = {x["config"]: x["gmacs"] for x in rows}
    assert by["tome:r=13"] < by["none"] and by["evit:keep=0.7"] < by["none"]
    assert (out / "flops.csv").read_text().splitlines()[0].startswith("model,")
    assert (out / "README.md").exists() and (out / "manifest.json").exists()
    jobs1 = json.loads((out / "manifest.json").read_text())["jobs"]
    assert jobs1["measured"] > 0 and jobs1["from_cache"] == 0
    # second run: everything cached, and the manifest / results page say so
    r2 = _run(["--profile", "smoke", "--only", "cost", "--out", str(out)], env)
    assert r2.returncode == 0 and "(cached)" in r2.stderr and "ETA" in r2.stderr
    jobs2 = json.loads((out / "manifest.json").read_text())["jobs"]
    assert jobs2 == {"measured": 0, "from_cache": jobs1["measured"]}
    assert f"{jobs1['measured']} taken from the result cache" in (out / "README.md").read_text()


def test_paper_profile_without_data_is_a_clear_error():
    r = _run(["--profile", "paper"])
    assert r.returncode == 2
    assert "--imagenet" in r.stderr and "--ade20k" in r.stderr and "--only cost,speed" in r.stderr


def test_paper_profile_cost_needs_no_data(tmp_path):
    """GMACs (and throughput, e.g. on a GPU for reports/gpu/) of the paper profile run without data;
    the PM rows say they use the uniform structure because nothing was calibrated."""
    out = tmp_path / "rep"
    r = _run(["--profile", "paper", "--only", "cost", "--out", str(out)], {"PMBENCH_CACHE": str(tmp_path / "c")})
    assert r.returncode == 0, r.stderr[-2000:]
    t = json.loads((out / "flops.json").read_text())
    by = {(x["model"], x["config"]): x["gmacs"] for x in t["rows"]}
    assert by[("DeiT-S", "none")] == pytest.approx(4.599, abs=1e-3)
    assert by[("DeiT-S", "tome:r=13")] == pytest.approx(2.703, abs=1e-3)
    assert any("uniform structure" in n for n in t["meta"]["notes"])
    # every published DynamicViT figure is compared with the count its source used (tests/test_dynamicvit.py)
    paper = {(x["model"], x["config"]): x["paper_count_gmacs"] for x in t["rows"]}
    assert paper[("DeiT-S", "dynamicvit:rho=0.5")] == pytest.approx(2.181, abs=1e-3)
    assert paper[("DeiT-S", "tome:r=13")] is None
    pub = [x for x in json.loads((out / "published_vs_reproduced.json").read_text())["rows"]
           if x["config"].startswith("dynamicvit") and x["published_gmacs"] is not None]
    count = {(x["source"], x["model"], x["config"]): (x["ours_count"], x["gmacs_agree"]) for x in pub}
    assert len(count) == 9
    for (source, _, _), (ours_count, agree) in count.items():
        assert (ours_count, agree) == (("suite", "ours truncated") if source == "DynamicViT README"
                                       else ("method paper's rule", "within 0.05"))


@pytest.mark.slow
def test_paper_profile_runs_on_fixtures(tmp_path):
    """The real path (ImageNet layout, local DeiT-format weights, calibration, fine-tuning,
    evaluation, cost, speed) on small fixtures with a tiny model."""
    env = {"PMBENCH_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "rep"
    r = _run(["--profile", "paper", "--fixture", "--only", "accuracy,cost,speed", "--out", str(out)], env,
             timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    acc = json.loads((out / "accuracy.json").read_text())
    assert acc["meta"]["data_source"] == "real"
    kinds = {(x["config"], x["kind"]) for x in acc["rows"]}
    assert ("none", "off-the-shelf") in kinds and ("tome:r=13", "fine-tuned") in kinds
    assert ("pm:keep=0.6", "fine-tuned") in kinds
    assert all(0.0 <= x["top1"] <= 100.0 for x in acc["rows"])
    # the fixture model's own (AugReg-style) normalisation, paired drops, resolved specs, per-image file
    assert acc["meta"]["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert all(x["drop_ci95"].startswith("[") for x in acc["rows"] if x["config"] != "none")
    assert all(x["config_full"].startswith(x["config"].split(":")[0]) for x in acc["rows"])
    per_image = (out / "accuracy_per_image.csv").read_text().splitlines()
    assert len(per_image) == 1 + acc["rows"][0]["n_images"]
    assert "drop_ci95" in (out / "accuracy.md").read_text()
    sp = json.loads((out / "throughput.json").read_text())["rows"]
    assert {x["precision"] for x in sp} == {"fp32", "bf16"}
    # PM's fine-tuned rows carry their own GMACs and speed-up (its fine-tuned M, R are dense), next to
    # the calibrated ones, and every table says which is which
    fl = {(x["config"], x.get("structure")): x for x in json.loads((out / "flops.json").read_text())["rows"]}
    cal, ft = fl[("pm:keep=0.6", "calibrated")], fl[("pm:keep=0.6", "fine-tuned")]
    assert ft["gmacs"] > cal["gmacs"] and "dense" in ft["implementation"] and cal["implementation"] == "sparse (gather)"
    spd = {(x["config"], x.get("structure")): x for x in sp if x["precision"] == "fp32" and x["variant"] == "eager"}
    assert spd[("pm:keep=0.6", "fine-tuned")]["mac_speedup"] < spd[("pm:keep=0.6", "calibrated")]["mac_speedup"]
    accr = {(x["config"], x["kind"]): x for x in acc["rows"]}
    assert accr[("pm:keep=0.6", "fine-tuned")]["structure"] == "fine-tuned"
    assert accr[("pm:keep=0.6", "off-the-shelf")]["note"].startswith("calibrated, not fine-tuned")
    assert not accr[("pm:keep=0.6", "fine-tuned")].get("note") and not accr[("none", "off-the-shelf")].get("note")
    assert accr[("pm:keep=0.6", "fine-tuned")]["gmacs"] > accr[("pm:keep=0.6", "off-the-shelf")]["gmacs"]
    assert accr[("pm:keep=0.6", "fine-tuned")]["speedup"] == spd[("pm:keep=0.6", "fine-tuned")]["speedup"]
    # reports: 3 classes -> no top-5; every header says it is a fixture run and which stages it skipped
    assert "top5" not in acc["rows"][0] and "top5" not in (out / "accuracy.md").read_text()
    for name in ("accuracy", "flops", "throughput"):
        md = (out / f"{name}.md").read_text()
        assert "[fixture run]" in md.splitlines()[0] and "--fixture" in md
        assert "skipped: seg (not requested" in md and "ablations (not requested" in md
    readme = (out / "README.md").read_text()
    assert "(fixture run)" in readme.splitlines()[0] and "Stages: run: accuracy, cost, speed" in readme
    # every stage plans exactly the jobs it runs (calibrations, fine-tuned cost rows included, a method
    # that needs training left out of the off-the-shelf evaluations): each stage's last job reaches the
    # total the next stage then raises, and the counter never passes it
    counts = [tuple(map(int, m)) for m in re.findall(r"^\[(\d+)/(\d+)\] ", r.stderr, re.M)]
    stage_ends = [a for a, b in zip(counts, counts[1:]) if b[1] != a[1]] + counts[-1:]
    assert len(stage_ends) == 3 and all(k == n for k, n in stage_ends), counts
    assert all(k <= n for k, n in counts), counts


@pytest.mark.slow
def test_paper_profile_through_torchrun_with_two_gloo_ranks(tmp_path, monkeypatch):
    """`--nproc 2`: PM calibration, fine-tuning and evaluation run as torchrun jobs of 2 gloo ranks (the
    launcher path of a GPU node, on CPU); evaluation gives the very numbers of one process."""
    import argparse
    import types

    import torch

    from bench.runtime.fixtures import ensure_fixture, pmbench_tiny_vit
    from bench.pipeline.stages.sources import RealSource

    cache, out = tmp_path / "cache", tmp_path / "rep"
    monkeypatch.setenv("PMBENCH_CACHE", str(cache))
    fx = ensure_fixture()
    torch.manual_seed(3)  # weights whose predictions differ between images (seed 0's predict one class)
    torch.save({"model": pmbench_tiny_vit().state_dict()}, fx["weights"])
    pf = tmp_path / "small.toml"  # one launched job of each kind: calibrate, evaluate, fine-tune (+ evaluate)
    pf.write_text('accuracy_configs = ["tome:r=13"]\nfinetune_configs = ["pm:keep=0.6"]\n')
    r = _run(["--profile", "paper", "--fixture", "--only", "accuracy", "--nproc", "2", "--device", "cpu",
              "--profile-file", str(pf), "--out", str(out)], {"PMBENCH_CACHE": str(cache)}, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert "[run_all] torchrun (2 ranks): calibrate pm:keep=0.6" in r.stderr

    manifest = json.loads((out / "manifest.json").read_text())
    jobs = manifest["torchrun_jobs"]
    assert [j["command"] for j in jobs] == ["calibrate", "eval", "train", "eval"]
    assert all(j["world_size"] == 2 for j in jobs)  # as each job's rank 0 reported it
    acc = json.loads((out / "accuracy.json").read_text())
    assert acc["meta"]["launcher"] == {"kind": "torchrun", "nproc_per_node": 2, "nnodes": 1, "world_size": 2}
    assert "--nproc 2" in acc["meta"]["command"] and any("torchrun" in n for n in acc["meta"]["notes"])
    rows = {(x["config"], x["kind"]): x for x in acc["rows"]}
    tome, pm = rows[("tome:r=13", "off-the-shelf")], rows[("pm:keep=0.6", "fine-tuned")]
    assert tome["eval_world_size"] == 2 and pm["eval_world_size"] == 2 and pm["finetune_world_size"] == 2

    ckpts = cache / "runs" / "paper" / "checkpoints"
    cal = torch.load(next(ckpts.glob("pm-*-torchrun2.pt")), weights_only=True)
    assert cal["extra"]["world_size"] == 2 and cal["extra"]["calibration"]["per_layer"]  # `pmbench calibrate`
    ft_path = next(ckpts.glob("ft-*.pt"))
    ft = torch.load(ft_path, weights_only=True)
    assert ft["extra"]["finetune"]["world_size"] == 2 and "optimizer" not in ft  # as a one-process checkpoint

    # the same evaluations in this process: identical per-image outcomes and top-1
    per_image = {}
    import csv

    with open(out / "accuracy_per_image.csv", newline="") as fh:
        for line in csv.DictReader(fh):
            for k, v in line.items():
                per_image.setdefault(k, []).append(v)
    ctx = types.SimpleNamespace(args=argparse.Namespace(fixture=True, imagenet=None, weights=None),
                                work_dir=cache / "runs" / "paper", device="cpu")
    src = RealSource(ctx, None)
    for (spec, kind), model in ((("tome:r=13", "off-the-shelf"), src.patched_backbone("tome:r=13")[0]),
                                (("pm:keep=0.6", "fine-tuned"), src.load_checkpoint(ft_path)[0])):
        res = src.evaluate(model)
        launched = "".join(per_image[f"pmbench_tiny_vit|{spec}|{kind}"])
        assert res["correct"] == launched and round(res["top1"], 2) == rows[(spec, kind)]["top1"]
    assert set(per_image["pmbench_tiny_vit|tome:r=13|off-the-shelf"]) == {"0", "1"}  # a non-trivial check


def test_ablations_stage_takes_any_method(tmp_path):
    """The ablations stage is method-agnostic: a calibrated variant is calibrated first, any other starts
    from the backbone as it is; both are fine-tuned with their own recipe, and the calibrated one's
    structure reaches the learned-structure table."""
    env = {"PMBENCH_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "rep"
    pf = tmp_path / "abl.toml"
    pf.write_text('ablations = [["ToMe r=4 (no calibration)", "tome:r=4"], ["PM keep 0.6", "pm:keep=0.6"]]\n'
                  'ablation_max_steps = 1\n')
    r = _run(["--profile", "paper", "--fixture", "--only", "ablations", "--profile-file", str(pf),
              "--out", str(out)], env, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert "pm-calibrate pm:keep=0.6" in r.stderr and "tome-calibrate" not in r.stderr
    abl = json.loads((out / "ablations.json").read_text())
    rows = {x["config"]: x for x in abl["rows"]}
    assert set(rows) == {"tome:r=4", "pm:keep=0.6"}
    assert all(0 <= x["top1_off_the_shelf"] <= 100 and 0 <= x["top1_finetuned"] <= 100 and x["steps"] == 1
               for x in rows.values())
    assert "tome, pm" in abl["title"] and any("table 3" in n for n in abl["meta"]["notes"])
    st = json.loads((out / "learned_structure.json").read_text())
    assert [x["config"] for x in st["rows"]] == ["pm:keep=0.6"] and st["rows"][0]["sum"] > 0


def test_a_cpu_run_fixes_the_allocator_before_its_first_stage(tmp_path, monkeypatch):
    """Every stage on CPU runs from glibc's fixed thresholds (docs/speed.md, section 1, item 8), not only the
    speed stage: the run sets them once, before the first stage."""
    from bench import orchestrate
    from bench.pipeline.stages import cost
    from bench.runtime import speed

    events = []
    monkeypatch.setattr(speed, "steady_allocator", lambda: events.append("allocator") or "steady")
    real_run = cost.run
    monkeypatch.setattr(cost, "run", lambda ctx: (events.append("cost"), real_run(ctx))[1])
    monkeypatch.setenv("PMBENCH_CACHE", str(tmp_path / "cache"))
    rc = orchestrate.main(["--profile", "smoke", "--only", "cost", "--device", "cpu", "--out", str(tmp_path / "rep")])
    assert rc == 0 and events[:2] == ["allocator", "cost"]


# --------------------------------------------------------------------------- job workers
def test_job_claims_skip_wait_and_fail_over(tmp_path):
    """Two job workers of one run share the cache: the first to reach a job claims it, the other skips
    it (JobTaken) or, asked to wait, gets the first one's record; a failed claimer stops the waiting."""
    import threading

    from bench.runtime.results import JobTaken

    claims = tmp_path / "claims" / "run1"
    a = ResultCache(tmp_path, run_id="run1", claims=claims, worker=0, poll_s=0.01)
    b = ResultCache(tmp_path, run_id="run1", claims=claims, worker=1, poll_s=0.01)
    desc = {"kind": "eval", "spec": "tome:r=13"}
    started, release = threading.Event(), threading.Event()

    def slow():
        started.set()
        release.wait(10)
        return {"top1": 50.0}

    t = threading.Thread(target=lambda: a.get_or_run(desc, slow))
    t.start()
    assert started.wait(10)
    with pytest.raises(JobTaken):  # a leaf job: skipped, the other worker measures it
        b.get_or_run(desc, lambda: pytest.fail("measured twice"))
    threading.Timer(0.1, release.set).start()
    rec, cached = b.get_or_run(desc, lambda: pytest.fail("measured twice"), wait=True)  # needed: waits
    t.join(10)
    assert cached and rec["result"] == {"top1": 50.0} and rec["worker"] == 0 and rec["run_id"] == "run1"
    assert b.made_by_worker(rec) and not ResultCache(tmp_path, run_id="run2").made_by_worker(rec)

    def boom():
        raise RuntimeError("out of memory")

    bad = {"kind": "calibrate", "spec": "pm:keep=0.6"}
    with pytest.raises(RuntimeError):
        a.get_or_run(bad, boom)
    with pytest.raises(JobTaken, match="failed"):  # not a wait forever
        b.get_or_run(bad, lambda: pytest.fail("not this worker's job"), wait=True)
    # the run's own pass (no claims) measures what the workers left
    own = ResultCache(tmp_path, run_id="run1")
    assert own.get_or_run(bad, lambda: {"ok": 1})[0]["result"] == {"ok": 1}


def test_force_keeps_what_this_run_measured_and_remeasure_redoes_it(tmp_path):
    calls = []

    def fn():
        calls.append(1)
        return {"v": len(calls)}

    desc = {"kind": "x", "a": 1}
    ResultCache(tmp_path, run_id="old").get_or_run(desc, fn)
    run = ResultCache(tmp_path, force=True, run_id="new")
    assert run.get_or_run(desc, fn) == (run.get(desc), False) and len(calls) == 2  # an earlier run's: redone
    assert run.get_or_run(desc, fn)[1] and len(calls) == 2  # this run's (or its workers'): kept
    with run.remeasure():  # e.g. the checkpoint a record names has gone
        assert not run.get_or_run(desc, fn)[1] and len(calls) == 3
    assert run.get_or_run(desc, fn)[1] and len(calls) == 3


def test_job_worker_count_and_command_line(tmp_path, monkeypatch):
    import argparse

    from bench.core.errors import ConfigError
    from bench.pipeline import workers

    assert workers.count(None, environ={}, cpus=2) == 2 and workers.count(None, environ={}, cpus=16) == 4
    assert workers.count(None, environ={}, cpus=1) == 1 and workers.count(3, environ={}, cpus=2) == 3
    assert workers.count(None, environ={"PMBENCH_JOB_WORKERS": "1"}, cpus=8) == 1
    for bad in (lambda: workers.count(0, environ={}), lambda: workers.count(None, environ={"PMBENCH_JOB_WORKERS": "x"}),
                lambda: workers.parse_worker("3/2"), lambda: workers.parse_worker("a")):
        with pytest.raises(ConfigError):
            bad()
    assert workers.parse_worker("2/2") == (1, 2) and workers.parse_worker(None) is None
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(profile="paper", force=True, device="cpu", fixture=True, imagenet="data/in",
                              ade20k=None, weights=None, profile_file="p.toml", configs=["tome:r=4"],
                              retrain_proxy=True)
    argv = workers.worker_argv(args, ["accuracy", "cost", "speed", "ablations"], 0, 2)
    assert argv[:6] == ["--profile", "paper", "--only", "accuracy,ablations", "--job-worker", "1/2"]
    assert "--retrain-proxy" not in argv and "--force" in argv and "--fixture" in argv
    assert argv[argv.index("--imagenet") + 1] == str(tmp_path / "data" / "in")  # absolute: any working folder
    assert argv[argv.index("--profile-file") + 1] == str(tmp_path / "p.toml") and argv[-2:] == ["--configs", "tome:r=4"]


@pytest.mark.slow
def test_job_workers_share_the_jobs_and_give_the_one_process_tables(tmp_path):
    """`--job-workers 2`: two one-thread workers measure the accuracy and ablations jobs, each job once
    (claims), the run's own pass counts them as measured and writes the tables; they equal a one-process
    run's, image by image (one thread everywhere, so bit for bit)."""
    env = {"PMBENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    pf = tmp_path / "small.toml"
    pf.write_text('accuracy_configs = ["none", "tome:r=13", "pm:keep=0.6"]\nfinetune_configs = ["pm:keep=0.6"]\n'
                  'ablations = [["PM keep 0.6", "pm:keep=0.6"], ["ToMe r=4", "tome:r=4"]]\nablation_max_steps = 1\n')
    base = ["--profile", "paper", "--fixture", "--only", "accuracy,ablations", "--profile-file", str(pf)]
    r = _run([*base[:4], "accuracy,cost,ablations", *base[5:], "--job-workers", "2", "--out", str(tmp_path / "w")], env,
             timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    err = r.stderr
    assert "jobs: 2 worker processes" in err and err.count("worker done") == 2
    # each job measured by exactly one worker (a label with a time, not skipped or waited for)
    measured = re.findall(r"^\[worker (\d)/2\] \[\d+/\d+\] (.+?) \(\d+\.\ds\)", err, flags=re.M)
    labels = [lab for _, lab in measured]
    assert labels and len(labels) == len(set(labels)), measured
    main_lines = re.findall(r"^\[\d+/\d+\] (.+?) \(worker (\d), \d+\.\ds\)", err, flags=re.M)
    assert sorted(lab for lab, _ in main_lines) == sorted(labels)  # the run's pass took all of them from the workers
    own = re.findall(r"^\[\d+/\d+\] (.+) \(\d+\.\ds\)", err, flags=re.M)
    assert own and all(lab.startswith("cost ") for lab in own), own  # and measured only the cost stage itself
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert manifest["jobs"]["measured"] == len(labels) + len(own) and manifest["job_workers"] == 2
    acc_w = json.loads((tmp_path / "w" / "accuracy.json").read_text())
    assert "2 worker processes" in acc_w["meta"]["job_workers"] and "job workers" in (tmp_path / "w" / "accuracy.md").read_text()
    assert "job_workers" in json.loads((tmp_path / "w" / "ablations.json").read_text())["meta"]
    assert "job_workers" not in json.loads((tmp_path / "w" / "flops.json").read_text())["meta"]  # not the workers' stage
    assert not (tmp_path / "cache" / "results" / "paper-fixture" / "claims").exists() or not any(
        (tmp_path / "cache" / "results" / "paper-fixture" / "claims").iterdir())  # claims cleaned up

    r1 = _run([*base, "--job-workers", "1", "--force", "--out", str(tmp_path / "one")], env, timeout=900)
    assert r1.returncode == 0, r1.stderr[-4000:]
    assert "[worker" not in r1.stderr and "job_workers" not in json.loads((tmp_path / "one" / "accuracy.json").read_text())["meta"]
    for name, keys in (("accuracy", ("config", "kind", "top1")), ("ablations", ("config", "top1_off_the_shelf", "top1_finetuned"))):
        w = json.loads((tmp_path / "w" / f"{name}.json").read_text())["rows"]
        one = json.loads((tmp_path / "one" / f"{name}.json").read_text())["rows"]
        assert [[x[k] for k in keys] for x in w] == [[x[k] for k in keys] for x in one], name
    assert (tmp_path / "w" / "accuracy_per_image.csv").read_text() == (tmp_path / "one" / "accuracy_per_image.csv").read_text()


def test_ctrl_c_while_job_workers_run_stops_them_and_clears_the_claims(tmp_path, monkeypatch):
    """Ctrl-C in the run: its workers are stopped (not left running), the claim folder goes, and the
    interrupt reaches main (exit 130, every finished measurement cached)."""
    import argparse
    import types

    from bench.pipeline import workers
    from bench.pipeline.stages import sources

    started = []

    class FakeWorker:
        def __init__(self, cmd, env):
            self.cmd, self.env, self.stopped = cmd, env, False
            started.append(self)

        def wait(self):
            if self.stopped:
                return -15
            raise KeyboardInterrupt

        def terminate(self):
            self.stopped = True

    monkeypatch.setattr(workers.subprocess, "Popen", FakeWorker)
    monkeypatch.setattr(sources.Source, "for_profile", staticmethod(lambda ctx: []))
    cache = ResultCache(tmp_path, run_id="r1")
    (tmp_path / "claims" / "r1").mkdir(parents=True)
    ctx = types.SimpleNamespace(cache=cache, run_id="r1", progress=None)
    args = argparse.Namespace(profile="smoke", force=False, device="cpu", fixture=False, configs=None)
    with pytest.raises(KeyboardInterrupt):
        workers.run(ctx, args, ["accuracy", "ablations"], 2)
    assert len(started) == 2 and all(w.stopped for w in started)
    assert all(w.env["OMP_NUM_THREADS"] == "1" and w.env[workers.RUN_ID_ENV] == "r1" for w in started)
    assert [w.cmd[w.cmd.index("--job-worker") + 1] for w in started] == ["1/2", "2/2"]
    assert not (tmp_path / "claims" / "r1").exists()


def test_job_workers_asked_for_where_they_do_not_apply_says_why(tmp_path, monkeypatch, capsys):
    from bench import orchestrate

    monkeypatch.setenv("PMBENCH_CACHE", str(tmp_path / "cache"))
    rc = orchestrate.main(["--profile", "smoke", "--only", "cost", "--job-workers", "2", "--out", str(tmp_path / "rep")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "--job-workers 2: not used, no accuracy or ablations stage" in err and "[worker" not in err
    assert json.loads((tmp_path / "rep" / "manifest.json").read_text())["job_workers"] == 1


def test_progress_eta_ignores_job_workers_times():
    """Lines read back from job workers carry no ETA, and their one-thread times do not set the pace of
    what this process still runs: only its own measured jobs do."""
    import io

    from bench.orchestrate import Progress

    out = io.StringIO()
    p = Progress(out)
    p.plan(4, 40.0)  # four jobs of 10 s each, by estimate
    p.finished("a", 10.0, 300.0, False, by="worker 1")  # slow on one thread, in parallel with others
    p.finished("b", 10.0, 300.0, False, by="worker 2")
    p.finished("c", 10.0, 20.0, False)  # this process: twice the estimate
    lines = out.getvalue().splitlines()
    assert "(worker 1, 300.0s)" in lines[0] and "ETA" not in lines[0] and "ETA" not in lines[1]
    assert lines[2].endswith("ETA 0m20s")  # one 10 s job left at this process's pace (2x), not 30x
