"""The command line as a user meets it: a fast ``--help`` (no torch import), ``--version``, the
command table agreeing with the modules, Ctrl-C as one line and exit code 130 everywhere, and
``./run_all.sh test <pytest args>`` running only pytest unless asked."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import bench
from bench import cli, entry, testrun

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "timm", "mmseg", "mmengine", "mmcv", "numpy", "pandas")

_PROBE = """
import sys, time
t = time.perf_counter()
from bench.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print("RC", rc, "HEAVY", sorted(m for m in {heavy!r} if m in sys.modules), "T", time.perf_counter() - t,
      file=sys.stderr)
"""


def _probe(*args):
    p = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    last = p.stderr.strip().splitlines()[-1]
    return p, last


def test_help_and_version_import_nothing_heavy():
    p, last = _probe("--help")
    assert "RC 0 HEAVY []" in last, p.stderr
    for name, _, _ in cli.COMMANDS:  # every command is listed with its help
        assert name in p.stdout
    p, last = _probe("--version")
    assert "RC 0 HEAVY []" in last and p.stdout.strip() == f"pmbench {bench.__version__}"
    p, last = _probe("no-such-command")
    assert "RC 2 HEAVY []" in last and "invalid choice" in p.stderr


def test_help_under_three_seconds():
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "bench.cli", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    wall = time.perf_counter() - t
    assert p.returncode == 0 and "seg-cost" in p.stdout
    assert wall < 3.0, f"pmbench --help took {wall:.1f} s"


def test_version_matches_the_package_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert bench.__version__ == meta["project"]["version"]


def test_command_table_agrees_with_the_modules():
    """``pmbench --help`` is built from ``cli.COMMANDS`` without importing the modules: each module must
    register exactly the commands the table gives it, with the same help."""
    parser = cli.build_parser()  # every module imported
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    registered = {a.dest: a.help for a in sub._choices_actions}
    assert registered == {name: help_text for name, _, help_text in cli.COMMANDS}
    # real parsers (with their options and --help), not the help-only listings
    assert all("--help" in sub.choices[name]._option_string_actions for name in registered)


def test_command_help_builds_only_its_module(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["list", "--help"])
    assert e.value.code == 0 and "--json" in capsys.readouterr().out


def test_ctrl_c_in_a_command_is_one_line(monkeypatch, capsys):
    from bench.commands import list_cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(list_cmd, "run", interrupted)
    assert cli.main(["list"]) == 130
    assert capsys.readouterr().err.strip() == "pmbench list: interrupted"


def test_ctrl_c_while_importing_is_one_line(monkeypatch, capsys):
    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load_module", interrupted)
    assert cli.main(["seg-cost", "--config", "vit-t"]) == 130
    assert capsys.readouterr().err.strip() == "pmbench seg-cost: interrupted"


def test_run_all_entry_turns_ctrl_c_into_130(monkeypatch, capsys):
    import bench.orchestrate as orch

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(orch, "main", interrupted)
    assert entry.main(["orchestrate", "--profile", "smoke"]) == 130
    assert capsys.readouterr().err.strip() == "run_all: interrupted"
    assert entry.main(["nonsense"]) == 2


def test_orchestrate_ctrl_c_keeps_what_was_measured(monkeypatch, capsys, tmp_path):
    import bench.orchestrate as orch
    from bench.pipeline.stages import cost

    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setenv("PMBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(cost, "run", interrupted)
    assert orch.main(["--profile", "smoke", "--only", "cost", "--out", str(tmp_path / "rep")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("run_all: interrupted; every finished measurement is cached")


def test_testrun_gate_only_for_the_whole_suite():
    assert testrun.wants_gate([], {}) is True
    assert testrun.wants_gate(["tests/test_cli.py"], {}) is False
    assert testrun.wants_gate(["tests/test_cli.py"], {"PMBENCH_GATE": "1"}) is True
    assert testrun.wants_gate([], {"PMBENCH_GATE": "0"}) is False


def test_testrun_runs_the_whole_suite_on_one_worker_per_core(monkeypatch):
    assert testrun.workers([], {}, cpus=2) == 2
    assert testrun.workers([], {}, cpus=1) == 1
    assert testrun.workers([], {}, cpus=64) == 4  # capped: memory and subprocesses per worker
    assert testrun.workers(["tests/test_cli.py"], {}, cpus=2) == 1  # arguments mean what they say
    assert testrun.workers([], {"PMBENCH_TEST_WORKERS": "1"}, cpus=2) == 1
    assert testrun.workers(["tests/test_cli.py"], {"PMBENCH_TEST_WORKERS": "3"}, cpus=2) == 3
    with pytest.raises(SystemExit, match="PMBENCH_TEST_WORKERS must be a positive integer, got 'two'"):
        testrun.workers([], {"PMBENCH_TEST_WORKERS": "two"})

    cmds = []
    monkeypatch.setattr(testrun.subprocess, "call", lambda cmd, cwd=None: cmds.append(cmd) or 0)
    monkeypatch.setattr(testrun.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(testrun.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("PMBENCH_TEST_WORKERS", raising=False)
    monkeypatch.setenv("PMBENCH_GATE", "0")
    assert testrun.main([]) == 0
    assert cmds[0][1:] == ["-m", "pytest", "-q", "-n", "2", "--dist", "worksteal"]
    import xdist  # noqa: F401  (the bootstrap installs it: the flags above need it)


def test_testrun_with_pytest_args_runs_pytest_only(monkeypatch):
    calls = []

    def fake_call(cmd, cwd=None):
        calls.append(cmd[1:3])
        return 0

    monkeypatch.setattr(testrun.subprocess, "call", fake_call)
    monkeypatch.delenv("PMBENCH_GATE", raising=False)
    assert testrun.main(["tests/test_cli.py", "-k", "flops"]) == 0
    assert calls == [["-m", "pytest"]]
    calls.clear()
    monkeypatch.setenv("PMBENCH_GATE", "1")
    assert testrun.main(["tests/test_cli.py"]) == 0
    assert calls == [["-m", "pytest"], ["-m", "bench.orchestrate"], ["-m", "bench.pipeline.gate"]]


def test_run_all_script_documents_and_uses_the_entry_wrapper():
    text = (ROOT / "run_all.sh").read_text()
    assert "bench.entry orchestrate" in text and "bench.entry testrun" in text


def test_every_entry_name_run_all_uses_resolves_to_a_module_with_main():
    """`./run_all.sh accept` runs `bench.entry gate`: every name run_all.sh hands the wrapper must import
    (the gate once moved to bench.pipeline and the wrapper still looked for bench.gate)."""
    import importlib
    import re

    from bench import entry

    used = set(re.findall(r"bench\.entry (\w+)", (ROOT / "run_all.sh").read_text()))
    assert used and used <= set(entry.NAMES)
    for name in used:
        assert callable(importlib.import_module(entry.NAMES[name][0]).main)


def test_entry_gate_runs_the_gate(tmp_path, capsys):
    from bench import entry

    rc = entry.main(["gate", str(tmp_path / "no-such-report")])
    assert rc != 0 and "No module named" not in capsys.readouterr().err
