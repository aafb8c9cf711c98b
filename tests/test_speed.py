"""Throughput harness (bench/runtime/speed.py, ``pmbench speed``): functional checks only.

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

from bench.cli import main
from bench.core import patch, registry
from bench.orchestrate import StageArtefacts
from bench.runtime import speed

STAMP_KEYS = {"device", "device_type", "threads", "torch", "timm", "python", "commit", "date"}


def _pair(make_vit, spec="tome:r=8"):
    base = make_vit()
    red = copy.deepcopy(base)
    patch.apply(red, registry.build(spec))
    return {"baseline": base, spec: red}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_measure_interleaved(make_vit, precision):
    # contention_pct 100: no timing is left out, so every timing of the pairing below is in the output
    cfg = speed.SpeedConfig(batch_size=2, precision=precision, warmup=1, iters=1, repeats=3, img_size=(64, 64),
                            contention_pct=100.0)
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
    assert "interleaved" in c["protocol"] and "median" in c["protocol"] and "bootstrap" in c["protocol"]
    base, red = res["models"]["baseline"], res["models"]["tome:r=8"]
    assert len(base["times_s"]) == 4 and len(red["times_s"]) == 3  # the baseline brackets every repeat
    for m in (base, red):
        assert all(t > 0 for t in m["times_s"]) and m["iters"] == 1
        assert 0 < m["img_s_min"] <= m["img_s"] <= m["img_s_max"] and m["step_ms"] > 0
        assert m["attn_kernel"] == "flash (cpu)" and m["fused_sdpa"] is True
    assert "speedup" not in base
    assert 0 < red["speedup_min"] <= red["speedup_ci_low"] <= red["speedup"] <= red["speedup_ci_high"] <= red["speedup_max"]
    assert isinstance(red["noisy"], bool)
    # per pair: the mean of the two baseline timings around the model's timing, over its timing
    bt, rt = base["times_s"], red["times_s"]
    ratios = [(bt[i] + bt[i + 1]) / 2 / rt[i] for i in range(3)]
    assert red["ratios"] == pytest.approx(ratios)
    assert red["speedup"] == pytest.approx(sorted(ratios)[1])  # median of per-pair ratios
    # warm-up (1 each) + calibration (1 each), then B R B R B R B
    k0, k1 = "baseline", "tome:r=8"
    assert order == [k0, k0, k1, k1] + [k0, k1, k0, k1, k0, k1, k0]


def test_schedule_chunks_and_alternation():
    names = ["B", "a", "b", "c"]
    assert [n for _, n in speed.schedule(names, "B", 2)] == ["B", "a", "b", "c", "B", "c", "b", "a", "B"]
    assert [n for _, n in speed.schedule(names, "B", 1, pair_every=2)] == ["B", "a", "b", "B", "c", "B"]
    assert [n for _, n in speed.schedule(["a", "b"], None, 2)] == ["a", "b", "b", "a"]


def test_calibrated_iterations_reach_min_time():
    cfg = speed.SpeedConfig(min_time=1.0, min_iters=1).resolved()
    assert speed.calibrate_iters(0.15, cfg) == 7  # 7 x 0.15 s >= 1 s
    assert speed.calibrate_iters(3.0, cfg) == 1
    assert speed.calibrate_iters(0.001, speed.SpeedConfig(device="cuda", min_time=0.05).resolved()) == 50
    assert speed.calibrate_iters(0.5, speed.SpeedConfig(device="cuda", min_time=0.05).resolved()) == 10  # min_iters
    assert speed.calibrate_iters(0.01, speed.SpeedConfig(iters=4).resolved()) == 4  # fixed count wins


def test_bootstrap_interval_is_seeded_and_flags_noise():
    tight = [1.50, 1.51, 1.49, 1.50, 1.52]
    lo, hi = speed.bootstrap_median_ci(tight, 2000, seed=0)
    assert (lo, hi) == speed.bootstrap_median_ci(tight, 2000, seed=0)  # repeatable
    assert min(tight) <= lo <= 1.50 <= hi <= max(tight)
    cfg = speed.SpeedConfig().resolved()
    assert speed.speedup_stats(tight, cfg)["noisy"] is False
    wide = speed.speedup_stats([1.2, 1.5, 1.8, 1.4, 1.6], cfg)
    assert wide["noisy"] is True and wide["speedup"] == 1.5
    assert wide["speedup_ci_low"] < 1.5 * 0.95 or wide["speedup_ci_high"] > 1.5 * 1.05


def _tagged_models(monkeypatch, names) -> dict:
    """Stand-in models whose "forward" returns their name (``speed.prepare`` patched), so a fake
    ``timed_loop`` can tell which model it is timing."""

    class Tag(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.tag = name

    monkeypatch.setattr(speed, "prepare", lambda m, cfg, compile=None, channels_last=None: (lambda x: m.tag))
    return {k: Tag(k) for k in names}


def test_noisy_rows_get_extra_paired_rounds(monkeypatch):
    """``extra_repeats``: after the scheduled rounds, only the rows whose interval is still wider than
    +-5% are timed again, each right before a baseline timing, one round at a time, until the interval
    is inside or the extra rounds are used up; a steady row keeps its scheduled pairs."""
    clock = {"steady": iter([0.5] * 100), "noisy": iter([0.5, 0.5, 0.42, 0.6, 0.5, 0.5, 0.45] + [0.5] * 100),
             "wild": iter([0.3, 0.9] * 100), "none": iter([1.0] * 400)}
    calls = []
    models = _tagged_models(monkeypatch, ("none", "steady", "noisy", "wild"))

    def fake_loop(fn, iters, device):
        name = fn()
        calls.append(name)
        return next(clock[name])

    monkeypatch.setattr(speed, "timed_loop", fake_loop)
    monkeypatch.setattr(speed.HostLoad, "share", lambda self, wall: 0.0)  # an idle host: noise alone decides
    cfg = speed.SpeedConfig(batch_size=1, warmup=1, iters=1, repeats=7, extra_repeats=6, pair_every=1, img_size=(8, 8),
                            check_kernels=False, allocator="system")
    res = speed.measure(models, cfg, baseline="none")
    m = res["models"]
    assert m["steady"]["pairs"] == 7 and m["steady"]["noisy"] is False
    assert m["wild"]["pairs"] == 13 and m["wild"]["noisy"] is True  # never settles: all 6 extra rounds
    assert m["noisy"]["pairs"] == 11 and m["noisy"]["noisy"] is False  # settles, then stops
    timed = calls[4 + 1 + 3 * 7 * 2:]  # after warm-up calibration (4) and the scheduled B (R B)x3x7
    assert all(timed[i + 1] == "none" for i in range(0, len(timed), 2))  # every extra timing then a baseline
    assert "steady" not in timed and timed.count("wild") == 6 and timed.count("noisy") == 4
    assert "more paired rounds" in res["config"]["protocol"]
    without = speed.SpeedConfig(**{**cfg.__dict__, "extra_repeats": 0})
    assert "more paired rounds" not in without.describe()


def test_contended_timings_leave_their_pairs_out(monkeypatch):
    """A timing during which other processes or the hypervisor took more than ``contention_pct`` of the
    machine is contended: the pairs it belongs to (the row's timing or a bracketing baseline timing) are
    left out of the speed-up, the row gets extra rounds until it has ``repeats`` clean pairs again, and
    the output says how many were left out.  A row with fewer than ``min_clean_pairs`` clean pairs keeps
    them all and says so."""
    # row "hit": its 2nd scheduled timing is slow (ratio 1.0 instead of 2.0) and contended; "calm" never is
    # (each clock's first value is the calibration call's)
    clock = {"none": iter([1.0] * 400), "calm": iter([0.5] * 100), "hit": iter([0.5, 0.5, 1.0] + [0.5] * 100),
             "always": iter([0.5, 0.25] * 100)}
    busy = {"always"}  # every timing of this row is contended
    calls, loads = [], []
    models = _tagged_models(monkeypatch, ("none", "calm", "hit", "always"))

    def fake_loop(fn, iters, device):
        name = fn()
        calls.append(name)
        n_hit = calls.count("hit")
        # calls: calibration, then the scheduled timings; the 3rd call of "hit" is its 2nd (slow) timing
        loads.append(0.4 if name in busy or (name == "hit" and n_hit == 3) else 0.01)
        return next(clock[name])

    monkeypatch.setattr(speed, "timed_loop", fake_loop)
    monkeypatch.setattr(speed.HostLoad, "share", lambda self, wall: loads[-1])
    cfg = speed.SpeedConfig(batch_size=1, warmup=1, iters=1, repeats=5, extra_repeats=3, pair_every=1, img_size=(8, 8),
                            check_kernels=False, allocator="system", noisy_pct=50.0)
    res = speed.measure(models, cfg, baseline="none")
    m = res["models"]
    assert m["calm"]["speedup"] == pytest.approx(2.0) and m["calm"]["contended_pairs"] == 0 and m["calm"]["pairs"] == 5
    # the slow timing is left out (else the median of 5 ratios with one 1.0 would still be 2.0, but its
    # pairs count says so), and one extra round restores 5 clean pairs
    assert m["hit"]["contended_pairs"] == 1 and m["hit"]["pairs"] == 5 and 1.0 not in m["hit"]["ratios"]
    assert m["hit"]["kept_unclean"] is False and m["hit"]["contended_timings"] == 1
    # every pair contended: fewer than min_clean_pairs clean ones, so all are kept and flagged
    assert m["always"]["kept_unclean"] is True and m["always"]["contended_pairs"] == m["always"]["pairs"]
    assert calls.count("calm") == 1 + 5  # calibration, scheduled rounds: no extra round
    assert calls.count("hit") == 1 + 5 + 1  # one extra round for the pair it lost
    h = res["host_load"]
    assert h["measured"] and h["contended"] == m["always"]["contended_timings"] + 1 and h["max_pct"] == 40.0
    assert "host load" in res["config"]["protocol"]


def test_unsteady_pairs_leave_out_a_host_speed_change(monkeypatch):
    """A pair whose two baseline timings differ by more than ``bracket_pct`` of their mean is unsteady:
    the host's speed changed while it was timed, and its ratio (against the mean of the two) is off.  It
    is left out like a contended pair and the row gets extra rounds; ``bracket_pct=0`` keeps it."""
    # the 3rd scheduled baseline timing is 30% slow (the first clock value is the calibration call's), so
    # the row's 2nd and 3rd timings have brackets 1.0/1.3 and 1.3/1.0: ratio 2.3 instead of 2.0
    def run(bracket_pct):
        clock = {"none": iter([1.0, 1.0, 1.0, 1.3] + [1.0] * 100), "row": iter([0.5] * 100)}
        calls = []
        models = _tagged_models(monkeypatch, ("none", "row"))

        def fake_loop(fn, iters, device):
            calls.append(fn())
            return next(clock[calls[-1]])

        monkeypatch.setattr(speed, "timed_loop", fake_loop)
        monkeypatch.setattr(speed.HostLoad, "share", lambda self, wall: 0.0)  # /proc/stat sees nothing
        cfg = speed.SpeedConfig(batch_size=1, warmup=1, iters=1, repeats=5, extra_repeats=3, pair_every=1,
                                img_size=(8, 8), check_kernels=False, allocator="system", noisy_pct=50.0,
                                bracket_pct=bracket_pct)
        return speed.measure(models, cfg, baseline="none"), calls

    res, calls = run(10.0)
    m = res["models"]["row"]
    # the output keeps every timing in order, so the speed-up can be recomputed under other settings
    assert [k for k, _, _ in res["timings"]] == calls[2:]  # after the two calibration calls
    replay = [(0, k, t) for k, t, _ in res["timings"]]
    off = speed.SpeedConfig(bracket_pct=0.0, noisy_pct=50.0)
    assert speed.row_speedup(replay, "none", "row", off, set())["unsteady_pairs"] == 0
    assert speed.row_speedup(replay, "none", "row", speed.SpeedConfig(noisy_pct=50.0), set())["ratios"] == m["ratios"]
    assert m["unsteady_pairs"] == 2 and m["contended_pairs"] == 0 and m["kept_unclean"] is False
    assert m["pairs"] == 5 and m["ratios"] == [pytest.approx(2.0)] * 5  # the two 2.3 ratios left out
    assert calls.count("row") == 1 + 5 + 2  # calibration, scheduled rounds, two extra rounds to refill
    assert "unsteady" in res["config"]["protocol"]
    res, calls = run(0.0)  # rule off: the pairs stay, no extra round
    m = res["models"]["row"]
    assert m["unsteady_pairs"] == 0 and m["pairs"] == 5 and sorted(m["ratios"])[-2:] == [pytest.approx(2.3)] * 2
    assert calls.count("row") == 1 + 5 and "unsteady" not in res["config"]["protocol"]


def test_rows_short_of_clean_pairs_get_refill_rounds(monkeypatch):
    """``refill_repeats``: after the extra rounds, a row that still has fewer clean pairs than ``repeats``
    (here: its first 6 timings are contended, so their pairs are left out) gets up to that many more paired
    rounds, until it has ``repeats`` clean pairs; a row that is only noisy gets none of them."""
    def run(refill):
        clock = {"none": iter([1.0] * 200), "row": iter([0.5] * 100), "wild": iter([0.3, 0.9] * 100)}
        calls, loads = [], []
        models = _tagged_models(monkeypatch, ("none", "row", "wild"))

        def fake_loop(fn, iters, device):
            calls.append(fn())
            # calibration is the row's first call: its next 6 timings (scheduled and extra) are contended
            loads.append(0.4 if calls[-1] == "row" and 2 <= calls.count("row") <= 7 else 0.0)
            return next(clock[calls[-1]])

        monkeypatch.setattr(speed, "timed_loop", fake_loop)
        monkeypatch.setattr(speed.HostLoad, "share", lambda self, wall: loads[-1])
        cfg = speed.SpeedConfig(batch_size=1, warmup=1, iters=1, repeats=4, extra_repeats=2, refill_repeats=refill,
                                pair_every=1, img_size=(8, 8), check_kernels=False, allocator="system",
                                min_clean_pairs=1)
        return speed.measure(models, cfg, baseline="none"), calls

    res, calls = run(0)
    assert res["models"]["row"]["clean_pairs"] == 0 and calls.count("row") == calls.count("wild") == 1 + 4 + 2
    res, calls = run(6)
    m = res["models"]
    assert m["row"]["clean_pairs"] == 4 and m["row"]["ratios"] == [pytest.approx(2.0)] * 4
    assert calls.count("row") == 1 + 4 + 2 + 4 and calls.count("wild") == 1 + 4 + 2  # refill for "row" only
    assert m["wild"]["noisy"] is True
    assert "clean pairs" in res["config"]["protocol"]


@pytest.mark.skipif(speed.host_busy_s() is None, reason="no /proc/stat on this system (not Linux)")
def test_host_load_sees_another_process():
    """While another process spins, the share of the machine's CPU time it takes shows as host load."""
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time() - t < 20: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        host = speed.HostLoad()
        host.start()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.6:  # this process spins too (its own CPU time is not foreign)
            pass
        share = host.share(time.perf_counter() - t0)
    finally:
        child.kill()
        child.wait()
    # the child alone takes about one CPU of the machine's: at least a fifth of a machine of up to 4 CPUs
    assert share is not None and share > min(0.2, 0.8 / len(speed.host_cpus()))


def test_host_busy_counts_only_this_process_cpus(monkeypatch, tmp_path):
    """The busy time is read from the ``cpuN`` lines of the CPUs asked for (the process's affinity), so
    other jobs on other cores of a large node are not counted; ``None`` asks for the whole machine.
    Busy = user + nice + system + irq + softirq + steal; idle and iowait are not."""
    import os

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 1 10 900 5 2 3 7 0 0\n"
                    "cpu0 60 1 5 400 5 1 2 4 0 0\n"
                    "cpu1 40 0 5 500 0 1 1 3 0 0\n"
                    "intr 12345\n")
    monkeypatch.setattr(speed, "_PROC_STAT", str(stat))
    tick = os.sysconf("SC_CLK_TCK")
    assert speed.host_busy_s() == pytest.approx((100 + 1 + 10 + 2 + 3 + 7) / tick)
    assert speed.host_busy_s({1}) == pytest.approx((40 + 0 + 5 + 1 + 1 + 3) / tick)
    assert speed.host_busy_s({0, 1}) == pytest.approx((73 + 50) / tick)
    assert speed.host_busy_s({5}) is None  # no such CPU line: unknown, not zero
    monkeypatch.setattr(speed, "_PROC_STAT", str(tmp_path / "missing"))
    assert speed.host_busy_s() is None and speed.HostLoad().share(1.0) is None


def test_host_load_note():
    from bench.pipeline.stages.speed import host_load_note

    assert host_load_note([]) == []  # no group timed: no line
    assert "not measured" in host_load_note([{"measured": False}])[0]
    line = host_load_note([{"measured": True, "timings": 40, "contended": 2, "median_pct": 0.5, "max_pct": 31.0,
                            "threshold_pct": 10.0},
                           {"measured": True, "timings": 20, "contended": 0, "median_pct": 1.5, "max_pct": 4.0,
                            "threshold_pct": 10.0}])[0]
    assert "median 1.5%" in line and "max 31.0%" in line and "2 of 60 timings above 10%" in line


def test_kernel_labels():
    assert speed.kernels_from_names(["aten::_scaled_dot_product_flash_attention_for_cpu"]) == \
        {"attn_kernel": "flash (cpu)", "fused_sdpa": True}
    assert speed.kernels_from_names(["aten::_scaled_dot_product_efficient_attention", "aten::addmm"]) == \
        {"attn_kernel": "mem-efficient", "fused_sdpa": True}
    assert speed.kernels_from_names(["aten::_scaled_dot_product_attention_math"])["fused_sdpa"] is False
    assert speed.kernels_from_names(["aten::softmax"]) == {"attn_kernel": "none seen", "fused_sdpa": False}


def test_variants_and_failures_are_reported(make_vit):
    """A plain-timm variant (channels-last) is timed next to the eager baseline; a model that cannot
    run is left out with its reason instead of failing the measurement."""

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    base = make_vit()
    cfg = speed.SpeedConfig(batch_size=2, warmup=1, iters=1, repeats=2, img_size=(64, 64))
    res = speed.measure({"none": base, "none [cl]": copy.deepcopy(base), "bad": Broken()}, cfg, baseline="none",
                        variants={"none [cl]": {"channels_last": True}})
    assert set(res["models"]) == {"none", "none [cl]"} and res["models"]["none [cl]"]["channels_last"] is True
    assert "boom" in res["failed"]["bad"] and "speedup" in res["models"]["none [cl]"]


def test_autocast_labels():
    assert speed.autocast_ctx("amp", "cpu")[1] == "autocast bfloat16"  # fp16 autocast is no CPU fast path
    assert speed.autocast_ctx("fp32", "cpu")[1] == "float32"
    with pytest.raises(ValueError):
        speed.autocast_ctx("fp8", "cpu")


def test_defaults_follow_device():
    c = speed.SpeedConfig().resolved()
    assert (c.warmup, c.iters, c.min_time, c.min_iters, c.repeats) == (2, None, 1.0, 1, 5)
    g = speed.SpeedConfig(device="cuda").resolved()
    assert (g.warmup, g.iters, g.min_time, g.min_iters) == (10, None, 0.2, 10)


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


# --------------------------------------------------------------------------- the speed stage, paper settings on CPU
class _Ctx(StageArtefacts):
    """The parts of bench.orchestrate.RunContext the speed stage uses; results go through a JSON round
    trip as they do through the result cache."""

    def __init__(self, prof):
        import io

        from bench.orchestrate import Progress

        super().__init__()
        self.profile, self.device, self.failures, self.tables = prof, "cpu", [], {}
        self.progress = Progress(io.StringIO())

    def job(self, desc, fn, label, est=1.0):
        json.dumps(desc, default=str)
        out = json.loads(json.dumps(fn(), default=str))
        self.progress.finished(label, est, 0.0, False)
        return out

    def meta(self, **kw):
        return kw

    def add_table(self, name, title, rows, meta, columns=None):
        self.tables[name] = {"rows": rows, "meta": meta, "columns": columns}


@pytest.mark.parametrize("compile_ok", [True, False], ids=["compile", "compile-fails"])
def test_paper_speed_settings_on_cpu(monkeypatch, compile_ok):
    """The GPU table's machinery (batch sweep, AMP/fp32/bf16, timm baselines, compiled configs, kernel
    check, budget) run on CPU with a tiny model and tiny counts.  torch.compile is stubbed: identity
    (the rows appear) or an error (the rows say why, the run goes on)."""
    from bench.runtime import fixtures
    from bench.pipeline import profiles
    from bench.pipeline.stages import speed as stage

    def fake_compile(model, **kw):
        if not compile_ok:
            raise RuntimeError("no C++ compiler (stub)")
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    prof = profiles.get("paper")
    sp = prof["speed"]
    assert sp["batch_sizes"] == [256, 64, 1] and {"fp32", "bf16"} <= set(sp["also_precisions"])
    assert "compile" in sp["timm_baselines"] and "channels_last" in sp["timm_baselines"]
    sp.update(models=[fixtures.TINY_MODEL], configs=["none", "tome:r=13", "pm:keep=0.6"],
              batch_sizes=[2, 1], warmup=1, iters=1, repeats=2, extra_repeats=1, compile_configs=["tome:r=13"],
              compile_batch_sizes=[2])
    ctx = _Ctx(prof)
    stage.run(ctx)
    rows = ctx.tables["throughput"]["rows"]
    assert not ctx.failures
    precs = {r["precision"] for r in rows}
    assert precs == {"amp", "fp32", "bf16"} and {r["batch_size"] for r in rows} == {1, 2}
    eager = [r for r in rows if r["variant"] == "eager"]
    assert len(eager) == 3 * 3 * 2  # configs x precisions x batch sizes
    for r in eager:
        assert r["img_s"] > 0 and r["attn_kernel"] == "flash (cpu)" and r["fused_sdpa"] is True
        assert r["speedup_ci_low"] <= r["speedup"] <= r["speedup_ci_high"] and isinstance(r["noisy"], bool)
        if r["config"] != "none":  # the profile's extra_repeats reaches the protocol: 2 pairs, 3 if noisy
            assert r["pairs"] in (2, 3)
            assert r["mac_speedup"] > 1 and r["efficiency"] == pytest.approx(r["speedup"] / r["mac_speedup"], abs=2e-3)
    assert any("up to 1 more paired rounds" in n for n in ctx.tables["throughput"]["meta"]["notes"])
    cl = [r for r in rows if r["variant"] == "channels-last"]
    assert len(cl) == 6 and all(r["config"] == "none" and r["img_s"] > 0 for r in cl)
    comp = [r for r in rows if r["variant"] == "compile"]
    assert {(r["config"], r["batch_size"]) for r in comp} == {("none", 2), ("tome:r=13", 2)} and len(comp) == 6
    if compile_ok:
        assert all(r["img_s"] > 0 and r["mac_speedup"] is None for r in comp)
    else:
        assert all(r["img_s"] is None and "no C++ compiler" in r["note"] for r in comp)
    notes = " ".join(ctx.tables["throughput"]["meta"]["notes"])
    assert "bootstrap" in notes and "channels-last" in notes


def test_budget_skips_later_groups(monkeypatch):
    from bench.runtime import fixtures
    from bench.pipeline import profiles
    from bench.pipeline.stages import speed as stage

    prof = profiles.get("paper")
    prof["speed"].update(models=[fixtures.TINY_MODEL], configs=["none", "tome:r=13"], batch_sizes=[2, 1],
                         also_precisions=[], warmup=1, iters=1, repeats=2, timm_baselines=[], compile_configs=[],
                         budget_s=0.0)
    ctx = _Ctx(prof)
    stage.run(ctx)
    rows = ctx.tables["throughput"]["rows"]
    assert {r["batch_size"] for r in rows} == {2}  # the first group always runs, the next is over budget
    assert any("time budget" in n for n in ctx.tables["throughput"]["meta"]["notes"])


def test_protocol_lines_name_their_models():
    """Models timed with different per-model settings each get their protocol line, labelled with the
    models it applies to; one shared protocol is one unlabelled line."""
    from bench.runtime import fixtures
    from bench.pipeline import profiles
    from bench.pipeline.stages import speed as stage

    def notes(per_model):
        prof = profiles.get("paper")
        prof["speed"].update(models=[fixtures.TINY_MODEL, "pmbench_proxy_vit"], configs=["none"], batch_sizes=[1],
                             also_precisions=[], precision="fp32", warmup=1, iters=1, repeats=2, extra_repeats=0,
                             timm_baselines=[], compile_configs=[], per_model=per_model)
        ctx = _Ctx(prof)
        stage.run(ctx)
        assert not ctx.failures
        return [n for n in ctx.tables["throughput"]["meta"]["notes"] if n.startswith("protocol")]

    lines = notes({"pmbench_proxy_vit": {"repeats": 3}})
    assert len(lines) == 2
    assert lines[0].startswith(f"protocol ({fixtures.TINY_MODEL}): ") and "2 interleaved repeats" in lines[0]
    assert lines[1].startswith("protocol (proxy ViT): ") and "3 interleaved repeats" in lines[1]
    shared = notes({})
    assert len(shared) == 1 and shared[0].startswith("protocol: ")


def test_default_profile_speed_protocol():
    from bench.pipeline import profiles

    for name in ("default", "smoke"):
        sp = profiles.get(name)["speed"]
        assert sp["repeats"] >= 5 and sp.get("iters") is None and sp["min_time"] > 0
    from bench.pipeline.stages.speed import _setting

    d = profiles.get("default")["speed"]

    def eff(model, key):  # the value the speed stage uses for this model
        return _setting(d, d["per_model"].get(model, {}), key)

    for model in d["models"]:  # at least 5 interleaved repeats everywhere, each row between two baseline timings
        assert eff(model, "repeats") >= 5 and eff(model, "pair_every") == 1
    # DeiT-S/B, whose rows the agreement benchmark compares: >= 0.4 s timings, extra rounds for noisy rows
    for model in ("deit_small_patch16_224", "deit_base_patch16_224"):
        assert eff(model, "min_time") >= 0.4 and eff(model, "extra_repeats") >= 3
    # DeiT-B: many short pairs (batch 2, >= 10 repeats) held between runs where batch 4 with 5 did not
    assert eff("deit_base_patch16_224", "repeats") >= 10 and eff("deit_base_patch16_224", "batch_size") <= 2
    # DeiT-S is the reference of the accuracy table's speed-ups: every paper configuration, 10 repeats
    assert eff("deit_small_patch16_224", "repeats") >= 10
    assert set(eff("deit_small_patch16_224", "configs")) == set(profiles.PAPER_CONFIGS)
    assert "compile" in d["per_model"]["deit_small_patch16_224"]["timm_baselines"]


def test_cli_speed_timm_baselines(capsys):
    rc = main(["speed", "--model", "deit_tiny_patch16_224", "--img-size", "64", "--reducer", "tome:r=4",
               "--vs", "baseline", "--timm-baselines", "channels-last", "--batch-size", "1", "--repeats", "2",
               "--min-time", "0.01", "--warmup", "1", "--device", "cpu", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)["runs"][0]
    assert set(r["models"]) == {"baseline", "tome:r=4", "baseline [channels-last]"}
    cl = r["models"]["baseline [channels-last]"]
    assert cl["channels_last"] is True and cl["speedup"] > 0 and "speedup_ci_low" in cl
    assert r["config"]["min_time"] == 0.01 and r["config"]["iters"] is None


@pytest.mark.parametrize("argv", [["--timm-baselines", "compile"], ["--vs", "baseline", "--timm-baselines", "jit"],
                                  ["--min-time", "0"], ["--vs", "baseline", "--extra-repeats", "-1"]])
def test_cli_speed_bad_flags(capsys, argv):
    rc = main(["speed", "--model", "deit_tiny_patch16_224", "--reducer", "tome:r=4", *argv])
    assert rc == 2


_FAULTS_SCRIPT = r"""
import copy, json, sys, torch
from bench.core import patch, registry
from bench.runtime import models, speed
desc = speed.steady_allocator() if sys.argv[1] == "steady" else "system"
torch.manual_seed(0)
base = models.create("deit_tiny_patch16_224").eval()
red = copy.deepcopy(base)
patch.apply(red, registry.build("tome:r=13"))
x = torch.randn(4, 3, 224, 224)
with torch.inference_mode():
    for _ in range(2):  # warm-up, as the protocol does
        base(x), red(x)
    windows = []
    for _ in range(5):  # interleaved, as the protocol times them
        f0 = speed.minor_faults()
        base(x), red(x)
        windows.append((speed.minor_faults() - f0) / 2)
print(json.dumps({"desc": desc, "faults": sorted(windows)[2]}))  # median over the windows
"""


def _fresh_python(code: str, env: dict, *args: str) -> list[str]:
    """The stdout lines of ``code`` run in a fresh interpreter with ``env`` (process-wide settings)."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.strip().splitlines()


def test_steady_allocator_removes_page_fault_churn():
    """glibc returns a forward's freed activations to the system (unmap or trim) and faults them in
    again on the next forward; how many pages depends on the process's history, because glibc's
    mmap threshold adapts to it (CI once measured 147 per iteration, this machine 1300-5700).  Both
    processes therefore start from the same churning heap: glibc's own default threshold (128 KiB)
    fixed through its documented environment tunable, so the dynamic adjustment is off.  The steady
    allocator must remove the churn from there.  Each setting runs in its own process (process-wide)."""
    import os

    churning = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = {alloc: json.loads(_fresh_python(_FAULTS_SCRIPT, churning, alloc)[-1]) for alloc in ("system", "steady")}
    assert out["steady"]["desc"].startswith("steady (glibc")
    # every activation above 128 KiB is a fresh mapping: thousands of pages faulted in per forward
    assert out["system"]["faults"] > 1000, out
    # a warm heap: none, or a little heap growth now and then (measured: 0 or 74 against 1300-5700)
    assert out["steady"]["faults"] * 10 < out["system"]["faults"], out


def test_measure_pins_the_allocator_and_counts_faults(make_vit):
    models = _pair(make_vit)
    cfg = speed.SpeedConfig(batch_size=2, warmup=1, iters=1, repeats=2, img_size=(64, 64), check_kernels=False)
    res = speed.measure(models, cfg, baseline="baseline")
    assert res["config"]["allocator"] == "steady"
    assert res["config"]["allocator_desc"].startswith("steady (glibc")
    assert res["config"]["allocator_desc"].endswith(speed.huge_pages())
    assert "malloc thresholds pinned" in res["config"]["protocol"]
    assert ("large tensors on huge pages" in res["config"]["protocol"]) == speed.huge_pages_active()
    assert all(m["page_faults_per_iter"] >= 0 for m in res["models"].values())


_HUGE_PAGES_SCRIPT = """
import bench
from bench.runtime import speed
print(speed.huge_pages())
print(speed.steady_allocator())
"""


def _huge_pages_in_fresh_process(**env_changes) -> list[str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    return _fresh_python(_HUGE_PAGES_SCRIPT, {**env, **env_changes})[-2:]


def test_importing_bench_puts_large_tensors_on_huge_pages():
    """Importing bench asks torch for transparent huge pages before torch's first allocation (speed-ups
    vary less between processes, docs/speed.md item 9); the probe checks that the pages were really given
    and the steady allocator's description (every speed output's ``allocator_desc``) says so."""
    probe, allocator = _huge_pages_in_fresh_process()
    mode = speed.thp_kernel_mode()
    if mode in ("madvise", "always"):
        assert probe.startswith("large tensors on transparent huge pages (THP_MEM_ALLOC_ENABLE=1"), probe
    else:  # a kernel without THP: the output says why there are none
        assert probe.startswith("no transparent huge pages ("), probe
    assert allocator.endswith(probe), allocator


def test_huge_pages_can_be_turned_off():
    probe, _ = _huge_pages_in_fresh_process(THP_MEM_ALLOC_ENABLE="0")
    if speed.thp_kernel_mode() == "madvise":
        assert probe.startswith("no transparent huge pages (THP_MEM_ALLOC_ENABLE=0"), probe
    else:  # "always": the kernel gives them anyway, and the probe must say which it saw
        assert probe.startswith(("large tensors on transparent huge pages", "no transparent huge pages (")), probe


def test_allocator_option_is_checked():
    with pytest.raises(ValueError, match="unknown allocator"):
        speed.SpeedConfig(allocator="jemalloc")
    assert "malloc thresholds pinned" in speed.SpeedConfig().resolved().describe()
    assert "malloc" not in speed.SpeedConfig(allocator="system").resolved().describe()
