"""PM's fine-tuned cost next to its calibrated one, and reports that read right (issue 15, items 3 and 5).

A miniature run of the cost and speed stages and the report writer on the fixtures' tiny model (64
patches), with a calibrated and a "fine-tuned" PM checkpoint made here (M and R filled off their
support, as free fine-tuning does), in a few seconds."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from bench.core import flops, patch, registry
from bench.core.reducer import ConfigError, ModelInfo
from bench.pipeline import profiles
from bench.report import plots
from bench.runtime.checkpoint import save_checkpoint
from pm.calibrate import calibrate

SPEC = "pm:keep=0.6"


def _data(n=2, bs=4, img=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, img, img, generator=g), torch.randint(0, 3, (bs,), generator=g)) for _ in range(n)]


def _densify(model, layers):
    """What free fine-tuning does to M and R: every entry non-zero (here: small noise off the support)."""
    mats = model.reducer_modules["pm"]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for l in layers:
            for p in (mats.merge[str(l)], mats.recover[str(l)]):
                p.add_(1e-3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def pm_checkpoints(tmp_path_factory):
    """(calibrated, fine-tuned) PM checkpoints of the fixtures' tiny ViT (blocks 0, 2, 5 densified)."""
    from bench.runtime.fixtures import TINY_MODEL, pmbench_tiny_vit

    d = tmp_path_factory.mktemp("pm")
    torch.manual_seed(0)
    m = pmbench_tiny_vit().eval()
    red = registry.build(SPEC)
    calibrate(m, red, _data())
    cal = d / "calibrated.pt"
    save_checkpoint(cal, m)
    _densify(m, [0, 2, 5])
    ft = d / "finetuned.pt"
    save_checkpoint(ft, m)
    return TINY_MODEL, cal, ft, m


def test_transplanted_matrices_run_as_the_fine_tuned_model(pm_checkpoints):
    """The fine-tuned M, R on a wider model of the same token geometry: same structure, the same
    matrices, dense (matmul) exactly where fine-tuning filled them, and a cost that adds 2*C*N*D per
    dense block (what FlopCounterMode measures too)."""
    from timm.models.vision_transformer import VisionTransformer

    from bench.pipeline.stages.common import transplant

    _, cal, ft, src = pm_checkpoints
    torch.manual_seed(0)
    wide = VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=12, num_heads=2, num_classes=3).eval()
    red = registry.build(SPEC)
    transplant(wide, red, ft)
    mats, smats = wide.reducer_modules["pm"], src.reducer_modules["pm"]
    for l in range(12):
        assert torch.equal(mats.merge[str(l)], smats.merge[str(l)])
        assert torch.equal(mats.recover[str(l)], smats.recover[str(l)])
    assert [red._inference_impl(l) for l in range(12)] == \
        ["matmul" if l in (0, 2, 5) else "gather" for l in range(12)]
    info = ModelInfo.from_model(wide)
    counts = red.tokens_per_block(info)
    cal_red = registry.build(SPEC)
    cal_red.load_structure(cal)
    assert counts == cal_red.tokens_per_block(info)  # fine-tuning leaves the structure as it was
    N, D = info.n_tokens, info.dim
    extra = sum(2 * counts[l] * N * D for l in (0, 2, 5))
    extra += sum(2 * int(red._layers[l].cols.numel()) * D for l in range(12) if l not in (0, 2, 5))
    assert red.extra_macs(info) == extra
    assert flops.analytic(info, red).gmacs > flops.analytic(info, cal_red).gmacs
    measured = flops.measured_macs(wide, (64, 64))
    assert abs(measured - flops.analytic(info, red).total) / measured < 0.01
    # another token geometry is refused, not silently mis-costed
    other = VisionTransformer(img_size=48, patch_size=8, embed_dim=32, depth=12, num_heads=2, num_classes=3)
    with pytest.raises(ConfigError, match="does not match"):
        transplant(other, registry.build(SPEC), ft)


def _ctx(tmp_path, fixture=True):
    from bench.orchestrate import RunContext

    prof = profiles.fixture_variant(profiles.get("paper")) if fixture else profiles.get("smoke")
    prof["cost_configs"] = ["none", SPEC, "tome:r=4"]
    prof["speed"] = {"batch_size": 2, "precision": "fp32", "warmup": 1, "iters": 1, "repeats": 2,
                     "models": prof["cost_models"] if fixture else ["pmbench_tiny_vit"]}
    args = argparse.Namespace(force=False, device="cpu", fixture=fixture)
    ctx = RunContext(prof, args, tmp_path / "rep", tmp_path / "cache" / "results" / "x")
    return ctx


def _accuracy_table(ctx, model):
    from bench.pipeline.stages.common import short_model

    name = short_model(model)
    rows = [{"model": name, "timm_model": model, "method": "none", "config": "none", "kind": "off-the-shelf",
             "top1": 70.0, "gmacs": 0.05},
            {"model": name, "timm_model": model, "method": "pm", "config": SPEC, "kind": "off-the-shelf",
             "structure": "calibrated", "top1": 68.0, "gmacs": 0.03},
            {"model": name, "timm_model": model, "method": "pm", "config": SPEC, "kind": "fine-tuned",
             "structure": "fine-tuned", "top1": 69.0, "gmacs": 0.04},
            {"model": name, "timm_model": model, "method": "tome", "config": "tome:r=4", "kind": "off-the-shelf",
             "top1": 66.0, "gmacs": 0.035}]
    ctx.add_table("accuracy", "Top-1 on the fixture", rows, ctx.meta(data_source="real"),
                  ["model", "method", "config", "kind", "structure", "top1", "gmacs", "speedup"])


def test_fine_tuned_pm_rows_in_flops_throughput_and_accuracy(tmp_path, pm_checkpoints, monkeypatch):
    """Cost and speed stages give PM's fine-tuned checkpoint rows of its own (labelled), the accuracy
    table pairs each PM row with the speed-up of its own matrices, the other rows keep their GMACs,
    and the fixture run says so in every header, with the stages it skipped."""
    from bench.pipeline import gate
    from bench.report import writer
    from bench.pipeline.stages import cost, speed

    model, cal, ft, _ = pm_checkpoints
    ctx = _ctx(tmp_path)
    ctx.stages = ["accuracy", "cost", "speed", "seg"]
    ctx.calibrated = {SPEC: cal}
    ctx.finetuned = {(model, SPEC): ft}
    cost.run(ctx)
    fl = ctx.tables["flops"]["rows"]
    by = {(r["config"], r["structure"]): r for r in fl}
    assert set(by) == {("none", None), (SPEC, "calibrated"), (SPEC, "fine-tuned"), ("tome:r=4", None)}
    c, f = by[(SPEC, "calibrated")], by[(SPEC, "fine-tuned")]
    assert f["gmacs"] > c["gmacs"] and f["paper_count_gmacs"] == c["paper_count_gmacs"]
    assert c["implementation"] == "sparse (gather)" and f["implementation"] == "sparse + dense (per block)"
    # the other rows are what they were without fine-tuned checkpoints
    ctx2 = _ctx(tmp_path / "b")
    ctx2.calibrated = {SPEC: cal}
    cost.run(ctx2)
    assert {(r["config"], r["gmacs"]) for r in ctx2.tables["flops"]["rows"]} == \
        {(r["config"], r["gmacs"]) for r in fl if r["structure"] != "fine-tuned"}
    assert any("checkpoints fine-tuned on the pmbench_tiny_vit" in n for n in ctx.tables["flops"]["meta"]["notes"])

    speed.run(ctx)
    sp = ctx.tables["throughput"]["rows"]
    spb = {(r["config"], r["structure"]): r for r in sp if r["variant"] == "eager"}
    assert (SPEC, "fine-tuned") in spb and (SPEC, "calibrated") in spb
    assert spb[(SPEC, "fine-tuned")]["mac_speedup"] < spb[(SPEC, "calibrated")]["mac_speedup"]

    _accuracy_table(ctx, model)
    from bench.pipeline.stages import seg

    seg.run(ctx)  # the fixture run has no ADE20K fixture: skipped, and said so
    figs = {}

    def save(fig, out, name, lst):
        figs[name] = fig
        lst.append(name)
        fig.savefig(out / name, dpi=40)

    monkeypatch.setattr(plots, "_save", save)
    writer.write_all(ctx, 1.0)
    acc = {(r["config"], r["kind"]): r for r in ctx.tables["accuracy"]["rows"]}
    assert acc[(SPEC, "fine-tuned")]["speedup"] == spb[(SPEC, "fine-tuned")]["speedup"]
    assert acc[(SPEC, "off-the-shelf")]["speedup"] == spb[(SPEC, "calibrated")]["speedup"]
    # the gate keys the fine-tuned rows apart; the calibrated rows keep their keys
    cur = gate.collect(ctx.out_dir)
    m = by[(SPEC, "calibrated")]["model"]
    assert cur["gmacs"][f"{m}|{SPEC}"] == c["gmacs"] and cur["gmacs"][f"{m}|{SPEC}|fine-tuned"] == f["gmacs"]
    assert f"{m}|{SPEC}|fine-tuned|fp32|bs2" in cur["speedup"]

    out = ctx.out_dir
    for name in ("flops", "throughput", "accuracy", "published_vs_reproduced"):
        md = (out / f"{name}.md").read_text()
        assert "[fixture run]" in md.splitlines()[0] and "**Fixture run.**" in md, name
        assert "--profile paper --fixture" in md and "skipped: seg (the fixture run has no ADE20K fixture" in md, name
    assert "| structure" in (out / "flops.md").read_text() and "fine-tuned" in (out / "throughput.md").read_text()
    readme = (out / "README.md").read_text()
    assert readme.splitlines()[0].endswith("(fixture run)") and "**Fixture run.**" in readme
    assert "ablations (not requested: --only accuracy,cost,speed,seg)" in readme
    # excerpts hold tables, not just a link
    for title in ("Top-1 on the fixture (excerpt)", "(excerpt)"):
        assert title in readme
    exc = readme.split("(excerpt)", 1)[1]
    assert "| config" in exc and "fine-tuned" in exc

    # plots: one colour per method everywhere, the model named on the GMACs axis, a baseline in each
    assert set(figs) >= {"acc_vs_gmacs_off_the_shelf.png", "acc_vs_gmacs_fine_tuned.png",
                         "acc_vs_speedup_off_the_shelf.png", "acc_vs_speedup_fine_tuned.png", "tokens_per_block.png"}
    for name, fig in figs.items():
        labels = {}
        for ax in fig.axes:
            for line in ax.get_lines():
                labels.setdefault(line.get_label(), set()).add(line.get_color())
        if name.startswith("acc_vs"):
            ax = fig.axes[0]
            assert labels["pm"] == {plots.method_colour("pm")} and "unreduced model" in labels, name
            assert "_vs_gmacs" not in name or ax.get_xlabel() == f"GMACs of the {m}"
            assert "_vs_speedup" not in name or "measured at the" in ax.get_xlabel()
    tok = figs["tokens_per_block.png"]
    panels = [ax for ax in tok.axes if ax.get_visible()]
    assert sorted(ax.get_title() for ax in panels) == ["pm", "tome"]
    for ax in panels:
        names = [ln.get_label() for ln in ax.get_lines()]
        assert "unreduced" in names
        assert {ln.get_color() for ln in ax.get_lines() if ln.get_label() != "unreduced"} == \
            {plots.method_colour(ax.get_title())}
    assert json.loads((out / "manifest.json").read_text())["plots"]


def test_method_colours_are_fixed_and_distinct():
    names = ["pm", "tome", "evit", "dynamicvit", "mstm"]
    cols = [plots.method_colour(n) for n in names]
    assert len(set(cols)) == 5 and plots.BASELINE_COLOUR not in cols
    assert plots.method_colour("mstm (restore=own)") == plots.method_colour("mstm")
    assert plots.method_colour("droptail") == plots.method_colour("droptail")  # plug-ins: stable by name
    assert plots.method_colour("none") == plots.BASELINE_COLOUR


def test_published_table_shows_the_explanation(tmp_path):
    """PM DeiT-S keep 0.6: 'differs' (3.0 vs ours) comes with the CSV note that says why."""
    from bench.report import published, writer

    ctx = _ctx(tmp_path, fixture=False)
    ctx.add_table("flops", "GMACs", [{"model": "DeiT-S", "timm_model": "deit_small_patch16_224", "method": "pm",
                                      "config": "pm:keep=0.6", "structure": "calibrated", "gmacs": 2.95,
                                      "paper_count_gmacs": 2.725},
                                     {"model": "DeiT-S", "timm_model": "deit_small_patch16_224", "method": "pm",
                                      "config": "pm:keep=0.6", "structure": "fine-tuned", "gmacs": 3.2,
                                      "paper_count_gmacs": 2.725}], ctx.meta(), None)
    writer._published_table(ctx)
    t = ctx.tables["published_vs_reproduced"]
    # the table's config column holds the canonical spec (keep=0.6 is PM's default: 'pm')
    want = published.normalise_spec("pm:keep=0.6")
    row = next(r for r in t["rows"] if r["source"] == "PM README" and r["config"] == want
               and r["model"] == "DeiT-S")
    assert row["ours_gmacs"] == 2.725 and row["gmacs_agree"] == "differs"  # the calibrated row, paper rule
    assert "2.71" in row["note"] and "note" in t["columns"]


def test_header_of_a_non_fixture_table_is_unchanged():
    from bench.report.tables import header_lines

    lines = header_lines("T", {"profile": "default", "data_source": "proxy"})
    assert lines[0] == "## T" and not any("Fixture" in x for x in lines)


def test_proxy_ranking_note_compares_with_the_real_model():
    """The accuracy table's computed note: the run's off-the-shelf order of the reference
    configurations against the real ViT-Ti's, with a verdict either way."""
    from bench.runtime import proxy_ranking

    rows = [{"config": "pm:keep=0.6", "kind": "off-the-shelf", "drop": 0.2, "drop_ci95": "[-1.8, +2.2]"},
            {"config": "tome:r=13", "kind": "off-the-shelf", "drop": -0.2},
            {"config": "evit:keep=0.7", "kind": "off-the-shelf", "drop": -9.1},
            {"config": "mstm:keep=0.7", "kind": "off-the-shelf", "drop": -8.6},
            {"config": "tome:r=13", "kind": "fine-tuned", "drop": -30.0}]
    note = proxy_ranking.ranking_note(rows)
    assert note.startswith("off-the-shelf ranking on this proxy, least loss first: pm:keep=0.6 +0.2 [-1.8, +2.2], "
                           "tome:r=13 -0.2, mstm:keep=0.7 -8.6, evit:keep=0.7 -9.1")
    assert "does NOT agree" in note and "tome:r=13 > mstm:keep=0.7 > evit:keep=0.7 > pm:keep=0.6" in note
    good = [dict(r, drop=proxy_ranking.REAL_REFERENCE[r["config"]]) for r in rows[:4]]
    assert "it agrees with the real model's order" in proxy_ranking.ranking_note(good)
    assert proxy_ranking.ranking_note(rows[:1]) is None  # one configuration ranks nothing
    # the converged deep-supervised proxy of docs/proxy.md: MSTM and EViT tie, PM set apart
    tied = [{"config": "tome:r=13", "kind": "off-the-shelf", "drop": 0.0, "drop_ci95": "[+0.0, +0.0]"},
            {"config": "evit:keep=0.7", "kind": "off-the-shelf", "drop": -0.1, "drop_ci95": "[-0.3, +0.0]"},
            {"config": "mstm:keep=0.7", "kind": "off-the-shelf", "drop": -0.2, "drop_ci95": "[-0.4, +0.0]"},
            {"config": "pm:keep=0.6", "kind": "off-the-shelf", "drop": -8.6, "drop_ci95": "[-10.4, -6.9]"}]
    note = proxy_ranking.ranking_note(tied)
    assert "agrees with the real model's order within the paired intervals (mstm:keep=0.7 and evit:keep=0.7 " \
           "overlap), and pm:keep=0.6's interval lies below all the others'" in note
    apart = [dict(r, drop=-0.35, drop_ci95="[-0.4, -0.3]") if r["config"] == "mstm:keep=0.7" else r for r in tied]
    apart[1] = dict(apart[1], drop_ci95="[-0.1, +0.0]")  # EViT now clearly loses less than MSTM: contradicted
    assert "does NOT agree" in proxy_ranking.ranking_note(apart)
    near = [dict(r, drop_ci95="[-9.0, -0.1]") if r["config"] == "pm:keep=0.6" else r for r in tied]
    assert "lies below" not in proxy_ranking.ranking_note(near)  # PM's interval reaches into the others'
    # a backbone at chance (docs/proxy.md, object-shape): every drop near 0, every pair of intervals overlaps;
    # the point estimates happen to fall in the real order, but the run orders nothing
    chance = [{"config": k, "kind": "off-the-shelf", "drop": d, "drop_ci95": ci} for k, d, ci in (
        ("tome:r=13", 0.1, "[+0.0, +0.3]"), ("mstm:keep=0.7", 0.1, "[-0.9, +1.1]"),
        ("evit:keep=0.7", 0.0, "[-1.0, +1.0]"), ("pm:keep=0.6", -0.1, "[-1.1, +0.8]"))]
    note = proxy_ranking.ranking_note(chance)
    assert "does not resolve any order" in note and "agrees" not in note and "lies below" not in note
    assert "-19.8" in proxy_ranking.CHECKED and "docs/proxy.md" in proxy_ranking.CHECKED


def test_pm_off_the_shelf_rows_say_calibrated_not_fine_tuned():
    from bench.core import registry
    from bench.pipeline.stages import accuracy

    assert "note" in accuracy.COLUMNS
    assert registry.build("pm:keep=0.6").off_the_shelf_note.startswith("calibrated, not fine-tuned: on real "
                                                                       "pretrained ViTs this loses heavily")
    assert registry.build("tome:r=13").off_the_shelf_note is None


def test_a_renamed_table_leaves_no_files_behind(tmp_path):
    """Files of a table the previous manifest lists under a retired name go; current tables (and
    tables of stages a --only run skipped) stay."""
    from bench.report import writer

    out = tmp_path / "rep"
    out.mkdir()
    for name in ("pm_ablations", "flops", "ablations"):
        for ext in ("md", "csv", "json"):
            (out / f"{name}.{ext}").write_text("x")
    (out / "manifest.json").write_text(json.dumps({"tables": ["flops", "pm_ablations", "../escape"]}))
    (tmp_path / "escape.md").write_text("not ours")
    assert writer.drop_retired_tables(out) == ["pm_ablations"]
    assert not any(out.glob("pm_ablations.*"))
    assert len(list(out.glob("flops.*"))) == 3 and len(list(out.glob("ablations.*"))) == 3
    assert (tmp_path / "escape.md").exists()
    assert writer.drop_retired_tables(tmp_path / "absent") == []


def test_json_rows_keep_integer_columns_integer(tmp_path):
    """A count with a missing value (the baseline's pairs) stays an integer in the JSON file, where pandas
    alone would write 7.0; float columns, NaN and text are pandas' as before."""
    from bench.report.tables import write_table

    rows = [{"config": "none", "pairs": None, "speedup": 1.0, "top1": float("nan")},
            {"config": "tome:r=13", "pairs": 7, "speedup": 1.5, "top1": 80.0}]
    write_table(tmp_path, "t", "T", rows, {"profile": "default"})
    got = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert got == [{"config": "none", "pairs": None, "speedup": 1.0, "top1": None},
                   {"config": "tome:r=13", "pairs": 7, "speedup": 1.5, "top1": 80.0}]
    assert isinstance(got[1]["pairs"], int) and isinstance(got[1]["speedup"], float)
