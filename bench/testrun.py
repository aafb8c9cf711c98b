"""``./run_all.sh test [pytest args]``: the test suite, then the smoke profile and the CI regression gate.

* ``./run_all.sh test``: pytest (the whole suite), then the smoke profile and the gate (what CI runs);
* ``./run_all.sh test <pytest args>`` (e.g. ``tests/test_cli.py -k flops``): pytest with those
  arguments only;
* ``PMBENCH_GATE=1`` forces the smoke profile + gate after pytest, ``PMBENCH_GATE=0`` skips them.

The whole suite runs on parallel pytest-xdist workers (:func:`workers`: one per core, at most 4;
``PMBENCH_TEST_WORKERS=1`` runs it in one process).  Each test runs torch on one thread
(tests/conftest.py), so one process keeps one core busy and leaves the other idle; with 2 workers
the suite takes about 60% of the time on 2 cores.  Processes that create the same cached proxy
data or weights take a file lock, so parallel workers share them.  pytest-benchmark switches its
timing off under xdist (it warns so): the benchmarks are measured on their own
(``pytest tests/test_bench_speed.py --benchmark-only``), never as part of the suite.

The smoke profile runs with ``--force`` (fresh measurements, never the cache) into
``.cache/reports/smoke`` so a test run leaves the committed reports untouched.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE_DIR = ROOT / ".cache" / "reports" / "smoke"


def wants_gate(argv: list, environ=os.environ) -> bool:
    """Smoke profile + gate: by default only for the whole suite (no pytest arguments);
    ``PMBENCH_GATE=1`` forces it, ``PMBENCH_GATE=0`` skips it."""
    flag = environ.get("PMBENCH_GATE", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    return not argv


def workers(argv: list, environ=os.environ, cpus=None) -> int:
    """pytest-xdist workers for this run: ``PMBENCH_TEST_WORKERS`` when set, else for the whole suite
    (no pytest arguments) one per core, at most 4 (each test holds a model or two in memory and
    some start subprocesses); 1 (no xdist) when pytest arguments were given, so they mean what they
    say."""
    raw = environ.get("PMBENCH_TEST_WORKERS", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise SystemExit(f"run_all test: PMBENCH_TEST_WORKERS must be a positive integer, got '{raw}'")
        return int(raw)
    if argv:
        return 1
    if cpus is None:  # the cores this process may run on (a container or taskset can allow fewer)
        from bench.runtime.startup import usable_cpus

        cpus = usable_cpus()
    return max(1, min(4, cpus))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    py = sys.executable
    try:
        n = workers(argv)
        # worksteal: a worker that runs out of tests takes pending ones from the other, so one long
        # integration test does not leave a core idle at the end
        parallel = ["-n", str(n), "--dist", "worksteal"] if n > 1 else []
        t0 = time.time()
        rc_tests = subprocess.call([py, "-m", "pytest", "-q", *parallel, *argv], cwd=ROOT)
        if rc_tests == 5:
            print("run_all test: pytest collected no tests", file=sys.stderr)
        t1 = time.time()
        if not wants_gate(argv):
            return rc_tests
        print(f"\n[run_all test] tests took {t1 - t0:.0f} s; running the smoke profile + regression gate", flush=True)
        rc_smoke = subprocess.call([py, "-m", "bench.orchestrate", "--profile", "smoke", "--force",
                                    "--out", str(SMOKE_DIR)], cwd=ROOT)
        rc_gate = subprocess.call([py, "-m", "bench.pipeline.gate", str(SMOKE_DIR)], cwd=ROOT) if rc_smoke == 0 else 1
        print(f"[run_all test] smoke + gate took {time.time() - t1:.0f} s")
        failed = sum(rc != 0 for rc in (rc_tests, rc_smoke, rc_gate))
        print(f"suites: {3 - failed} passed, {failed} failed")
        return 0 if failed == 0 else 1
    except KeyboardInterrupt:
        print("\nrun_all test: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
