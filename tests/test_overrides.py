"""``./run_all.sh --configs`` and ``--profile-file``: profile overrides, validated before any work,
recorded in every table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.core.reducer import ConfigError
from bench.pipeline import overrides, profiles

ROOT = Path(__file__).resolve().parent.parent


def test_split_configs():
    s = overrides.split_configs
    assert s("tome:r=8") == ["tome:r=8"]
    assert s("evit:keep=0.7,fuse=true,tome:r=8,none") == ["evit:keep=0.7,fuse=true", "tome:r=8", "none"]
    assert s("tome:r=[16,16,8],pm") == ["tome:r=[16,16,8]", "pm"]
    assert s("tome, evit:keep=0.5") == ["tome", "evit:keep=0.5"]
    assert s("tome,r=8") == ["tome:r=8"]  # a bare name followed by an option
    with pytest.raises(ConfigError, match="no reducer before it"):
        s("r=8,tome")
    with pytest.raises(ConfigError):
        s("tome:r=8,,evit")


def test_configs_reach_every_classification_list():
    prof = overrides.apply(profiles.get("default"), ["tome:r=4,evit:keep=0.7", "tome:r=4"])
    for key in ("accuracy_configs", "finetune_configs", "cost_configs"):
        assert prof[key].count("tome:r=4") == 1 and prof[key].count("evit:keep=0.7") == 1
    assert "tome:r=4" in prof["speed"]["configs"]
    assert "tome:r=4" in prof["speed"]["per_model"]["deit_base_patch16_224"]["configs"]
    assert prof["overrides"] == {"configs": ["tome:r=4", "evit:keep=0.7", "tome:r=4"]}
    # smoke has no speed config list of its own: its throughput table uses cost_configs
    smoke = overrides.apply(profiles.get("smoke"), ["tome:r=4"])
    assert "configs" not in smoke["speed"] and "tome:r=4" in smoke["cost_configs"]
    # nothing given: the profile unchanged, an empty record
    assert overrides.apply(profiles.get("smoke")) == {**profiles.get("smoke"), "overrides": {}}


def test_profile_file_toml_and_json(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text('configs = ["tome:r=4"]\nfinetune_max_steps = 7\ncost_models = ["deit_small_patch16_224"]\n'
                    '[add]\naccuracy_configs = ["evit:keep=0.5"]\n[speed]\nbatch_size = 2\nrepeats = 3\n')
    prof = overrides.apply(profiles.get("smoke"), profile_file=str(toml))
    assert prof["finetune_max_steps"] == 7 and prof["cost_models"] == ["deit_small_patch16_224"]
    assert prof["accuracy_configs"][-2:] == ["evit:keep=0.5", "tome:r=4"]
    assert "tome:r=4" in prof["finetune_configs"] and "evit:keep=0.5" not in prof["finetune_configs"]
    sp = prof["speed"]
    assert (sp["batch_size"], sp["repeats"], sp["models"]) == (2, 3, ["deit_tiny_patch16_224"])  # merged
    rec = prof["overrides"]
    assert rec["file_configs"] == ["tome:r=4"] and rec["added"] == {"accuracy_configs": ["evit:keep=0.5"]}
    assert set(rec["replaced"]) == {"finetune_max_steps", "cost_models", "speed"}
    assert "p.toml" in overrides.describe(rec) and "sha256" in overrides.describe(rec)
    js = tmp_path / "p.json"
    js.write_text(json.dumps({"accuracy_configs": ["none", "tome:r=4"], "ablations": [["x", "pm:keep=0.5"]]}))
    prof = overrides.apply(profiles.get("smoke"), ["evit:keep=0.6"], str(js))
    assert prof["accuracy_configs"] == ["none", "tome:r=4", "evit:keep=0.6"]
    assert prof["ablations"] == [("x", "pm:keep=0.5")]


@pytest.mark.parametrize("text, match", [
    ('foo = 1', "unknown key 'foo'; allowed: configs, add, accuracy_configs"),
    ('[speed]\nbatchsize = 4', "speed.batchsize: unknown speed setting 'batchsize'"),
    ('finetune_max_steps = 0', "finetune_max_steps: expected a whole number >= 1, got 0"),
    ('finetune_epochs = true', "finetune_epochs: expected a whole number >= 1"),
    ('accuracy_configs = "tome"', "accuracy_configs: expected a list of reducer specs"),
    ('accuracy_configs = ["tome:q=1"]', "accuracy_configs: .*valid options"),
    ('configs = ["nosuch"]', "configs: spec 'nosuch': unknown reducer 'nosuch'"),
    ('[add]\nfinetune_epochs = 3', r"\[add\] finetune_epochs: not a list setting"),
    ('[speed]\nprecision = "fp16"', "speed.precision: expected one of fp32, amp, bf16"),
    ('[speed.per_model.deit_tiny_patch16_224]\nrepeats = -1', "per_model.deit_tiny_patch16_224.repeats"),
    ('[speed]\nextra_repeats = -2', "speed.extra_repeats"),
    ('seg_keeps = [0.7, 1.5]', r"seg_keeps: expected a non-empty list of keep rates in \(0, 1\]"),
    ('accuracy_configs = [', "cannot parse"),
])
def test_profile_file_errors_are_one_line(tmp_path, text, match):
    f = tmp_path / "bad.toml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError, match=match) as e:
        overrides.apply(profiles.get("smoke"), profile_file=str(f))
    assert "\n" not in str(e.value) and "bad.toml" in str(e.value)


def test_profile_file_path_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        overrides.apply(profiles.get("smoke"), profile_file=str(tmp_path / "missing.toml"))
    (tmp_path / "p.ini").write_text("x")
    with pytest.raises(ConfigError, match="unknown format '.ini'; use .toml, .json or .yaml"):
        overrides.apply(profiles.get("smoke"), profile_file=str(tmp_path / "p.ini"))
    (tmp_path / "p.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a table of profile keys"):
        overrides.apply(profiles.get("smoke"), profile_file=str(tmp_path / "p.json"))


def test_bad_configs_spec():
    with pytest.raises(ConfigError, match="--configs: spec 'tome:bogus=1': .*valid options: inflect, prop_attn, r"):
        overrides.apply(profiles.get("smoke"), ["tome:bogus=1"])
    with pytest.raises(ConfigError, match="--configs: spec 'nosuch': unknown reducer 'nosuch'"):
        overrides.apply(profiles.get("smoke"), ["nosuch"])


def _orchestrate(args, tmp_path, timeout=300):
    env = {**os.environ, "PMBENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bench.orchestrate", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_run_all_rejects_bad_overrides_in_one_line(tmp_path):
    (tmp_path / "p.toml").write_text("[speed]\nbogus = 1\n")
    for args, needle in ((["--configs", "tome:bogus=1"], "tome:bogus=1"),
                         (["--profile-file", str(tmp_path / "p.toml")], "unknown speed setting 'bogus'")):
        r = _orchestrate(["--profile", "smoke", "--only", "cost", "--out", str(tmp_path / "rep"), *args], tmp_path)
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.startswith("run_all: error:") and r.stderr.count("\n") == 1 and needle in r.stderr
        assert not (tmp_path / "rep").exists()  # nothing ran


def test_run_all_records_overrides(tmp_path):
    out = tmp_path / "rep"
    (tmp_path / "p.toml").write_text('cost_models = ["deit_tiny_patch16_224"]\n[add]\ncost_configs = ["evit:keep=0.5"]\n')
    r = _orchestrate(["--profile", "smoke", "--only", "cost", "--out", str(out), "--configs", "tome:r=4",
                      "--profile-file", str(tmp_path / "p.toml")], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    t = json.loads((out / "flops.json").read_text())
    configs = [x["config"] for x in t["rows"]]
    assert configs[-2:] == ["evit:keep=0.5", "tome:r=4"]
    assert t["meta"]["command"] == (f"./run_all.sh --profile smoke --configs tome:r=4 "
                                    f"--profile-file {tmp_path / 'p.toml'}")
    assert "tome:r=4" in t["meta"]["profile_overrides"]
    md = (out / "flops.md").read_text()
    assert "- profile overrides: --configs added tome:r=4" in md and "--profile-file" in md
    man = json.loads((out / "manifest.json").read_text())
    assert man["meta"]["profile_overrides_detail"]["added"] == {"cost_configs": ["evit:keep=0.5"]}
    assert "--configs tome:r=4" in (out / "README.md").read_text()
