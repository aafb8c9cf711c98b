"""The README's plug-in example, taken from README.md itself, installed with pip and run.

The code blocks of the README's "Adding a method (plug-in)" section whose first line names a file
(``# my_reducers/...``) are written out as they stand; the project folder the README's ``pip install``
line names is then installed by pip, offline (``--no-deps --no-build-isolation --no-index``: the
venv's setuptools builds it, nothing is downloaded), into a temporary target folder that the
commands get on ``PYTHONPATH``, so the suite's environment is left untouched.  (The README installs
it editable; pip's editable install works through a ``.pth`` file, which only a site directory
reads, so the test installs the same folder as a regular package: the layout, metadata and entry
point are the ones the README's text declares.)  The README's own ``pmbench`` and ``./run_all.sh``
lines then run against it, the slow ones with small settings added.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SECTION = "## Adding a method (plug-in)"
SPEC = "droptail:n=20,at=3"


def readme_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end > 0 else len(text)]


def code_blocks(section: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", section, re.S | re.M)]


def plugin_files(section: str) -> dict[str, str]:
    """``{relative path: text}`` of every block whose first line is ``# <path>``."""
    files = {}
    for lang, body in code_blocks(section):
        m = re.match(r"#\s*(\S+\.(?:py|toml))\s*\n", body)
        if lang in ("python", "toml") and m:
            files[m.group(1)] = body
    return files


def commands(section: str) -> list[list[str]]:
    """The README's shell lines (comments dropped), split like a shell would."""
    out = []
    for lang, body in code_blocks(section):
        if lang == "bash":
            out += [shlex.split(line, comments=True) for line in body.splitlines() if line.strip()]
    return [c for c in out if c]


def _find(cmds, head) -> list[list[str]]:
    return [c for c in cmds if c[: len(head)] == head]


def _env(site: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _run(argv, site, timeout=300, extra_env=None):
    """A README line: ``pmbench ...`` through ``python -m bench.cli``, ``./run_all.sh ...`` through
    ``python -m bench.orchestrate`` (the environment already exists), run from the repository root."""
    if argv[0] == "pmbench":
        cmd = [sys.executable, "-m", "bench.cli", *argv[1:]]
    elif argv[0] == "./run_all.sh":
        cmd = [sys.executable, "-m", "bench.orchestrate", *argv[1:]]
    else:  # pragma: no cover
        raise AssertionError(argv)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**_env(site), **(extra_env or {})})


# --------------------------------------------------------------------------- the text itself
def test_readme_layout_gives_the_entry_point_a_module():
    """The entry point names a module that exists where the README puts the files (the bug of a
    ``droptail.py`` beside ``pyproject.toml`` with an entry point into ``my_reducers``)."""
    files = plugin_files(readme_section())
    tomls = [p for p in files if p.endswith("pyproject.toml")]
    assert len(tomls) == 1, files.keys()
    project = Path(tomls[0]).parent
    meta = tomllib.loads(files[tomls[0]])
    eps = meta["project"]["entry-points"]["pmbench.reducers"]
    assert eps == {"droptail": "my_reducers.droptail:DropTail"}
    for value in eps.values():
        module = value.partition(":")[0]
        pkg = module.split(".")[0]
        assert (project / Path(*module.split("."))).with_suffix(".py").as_posix() in files
        assert (project / pkg / "__init__.py").as_posix() in files
    # the README's install line installs the folder that holds pyproject.toml
    pip = _find(commands(readme_section()), ["pip", "install"])
    assert pip and Path(pip[0][-1]) == project


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    section = readme_section()
    src = tmp_path_factory.mktemp("readme_plugin")
    for rel, text in plugin_files(section).items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text, encoding="utf-8")
    pip = _find(commands(section), ["pip", "install"])[0]
    assert pip[:3] == ["pip", "install", "-e"], pip
    site = src / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
                        "--no-build-isolation", "--no-index", "--target", str(site), str(src / pip[-1])],
                       capture_output=True, text=True, cwd=src, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert (site / "my_reducers" / "droptail.py").is_file()
    return site


def test_readme_plugin_list(installed):
    (line,) = _find(commands(readme_section()), ["pmbench", "list"])
    p = _run(line + ["--json"], installed)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads(p.stdout)["reducers"]}
    row = rows["droptail"]
    assert "error" not in row, row
    assert row["source"] == "plugin (my_reducers.droptail:DropTail)"
    assert set(row["options"]) == {"n", "at"} and row["default_spec"] == "droptail:at=0,n=4"
    # the text form the README shows
    p = _run(line, installed)
    assert p.returncode == 0 and "droptail" in p.stdout and "patch tokens dropped" in p.stdout


def test_readme_plugin_flops(installed):
    (line,) = _find(commands(readme_section()), ["pmbench", "flops"])
    assert SPEC in line
    p = _run(line + ["--json"], installed)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert out["reducer"] == "droptail:at=3,n=20"
    counts = [(b["attn_tokens"], b["mlp_tokens"]) for b in out["blocks"]]
    assert counts == [(197, 197)] * 3 + [(197, 177)] + [(177, 177)] * 8
    # its check() reaches the CLI as one line, exit code 2
    bad = _run(["pmbench", "flops", "--model", "deit_tiny_patch16_224", "--reducer", "droptail:at=12"], installed)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "past depth 12" in bad.stderr


def test_readme_plugin_speed(installed):
    (line,) = _find(commands(readme_section()), ["pmbench", "speed"])
    tiny = ["--model", "deit_tiny_patch16_224", "--batch-size", "2", "--warmup", "1", "--iters", "2",
            "--repeats", "2", "--threads", "1", "--json"]
    p = _run(line + tiny, installed)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert out["reducer"] == "droptail:n=20"  # the canonical spec: options that differ from their defaults
    m = out["runs"][0]["models"]
    assert set(m) == {"baseline", "droptail:n=20"} and m["droptail:n=20"]["speedup"] > 0


def _smoke_line():
    (line,) = _find(commands(readme_section()), ["./run_all.sh"])
    assert line[line.index("--profile") + 1] == "smoke" and line[line.index("--configs") + 1] == SPEC
    return line


def test_readme_plugin_in_the_smoke_cost_and_speed_tables(installed, tmp_path):
    """``./run_all.sh --profile smoke --configs droptail:...``: the plug-in has rows in the FLOPs and
    throughput tables (short timings from a profile file), and the tables say how they were made."""
    tiny = tmp_path / "tiny.toml"
    tiny.write_text("[speed]\nmin_time = 0.05\nrepeats = 3\n")
    out = tmp_path / "rep"
    p = _run(_smoke_line() + ["--only", "cost,speed", "--out", str(out), "--profile-file", str(tiny)], installed,
             timeout=600, extra_env={"PMBENCH_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-3000:]
    flops = json.loads((out / "flops.json").read_text())
    by = {r["config"]: r for r in flops["rows"]}
    assert by[SPEC]["method"] == "droptail" and by[SPEC]["gmacs"] < by["none"]["gmacs"]
    assert by[SPEC]["config_full"] == "droptail:at=3,n=20"
    sp = json.loads((out / "throughput.json").read_text())
    assert any(r["config"] == SPEC and r["speedup"] > 0 for r in sp["rows"])
    for t in (flops, sp):
        assert "--configs" in t["meta"]["command"] and SPEC in t["meta"]["profile_overrides"]
    assert "profile overrides:" in (out / "flops.md").read_text()
    man = json.loads((out / "manifest.json").read_text())
    assert man["meta"]["profile_overrides_detail"]["configs"] == [SPEC]
    assert man["meta"]["profile_overrides_detail"]["replaced"] == {"speed": {"min_time": 0.05, "repeats": 3}}


@pytest.mark.slow
def test_readme_plugin_in_the_smoke_accuracy_table(installed, tmp_path):
    """The smoke profile's accuracy stage with the plug-in: an off-the-shelf and a fine-tuned row
    (the profile's own configurations trimmed to the unreduced model by a profile file)."""
    trim = tmp_path / "trim.json"
    trim.write_text(json.dumps({"accuracy_configs": ["none"], "finetune_configs": []}))
    out = tmp_path / "rep"
    p = _run(_smoke_line() + ["--only", "accuracy", "--out", str(out), "--profile-file", str(trim)], installed,
             timeout=1200, extra_env={"PMBENCH_CACHE": os.environ.get("PMBENCH_CACHE", str(tmp_path / "cache"))})
    assert p.returncode == 0, p.stderr[-3000:]
    acc = json.loads((out / "accuracy.json").read_text())
    kinds = {(r["config"], r["kind"]) for r in acc["rows"]}
    assert kinds == {("none", "off-the-shelf"), (SPEC, "off-the-shelf"), (SPEC, "fine-tuned")}
    assert all(0 <= r["top1"] <= 100 for r in acc["rows"])
