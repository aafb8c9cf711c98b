"""``./run_all.sh test``: the test suite, then the smoke profile and the CI regression gate.

The smoke profile runs with ``--force`` (fresh measurements, never the cache) into
``.cache/reports/smoke`` so a test run leaves the committed reports untouched.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from . import env

SMOKE_DIR = env.ROOT / ".cache" / "reports" / "smoke"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    py = sys.executable
    t0 = time.time()
    rc_tests = subprocess.call([py, "-m", "pytest", "-q", *argv], cwd=env.ROOT)
    if rc_tests == 5:
        print("run_all test: pytest collected no tests", file=sys.stderr)
    t1 = time.time()
    if argv and os.environ.get("PMBENCH_GATE", "1") != "1":
        return rc_tests
    print(f"\n[run_all test] tests took {t1 - t0:.0f} s; running the smoke profile + regression gate", flush=True)
    rc_smoke = subprocess.call([py, "-m", "bench.orchestrate", "--profile", "smoke", "--force",
                                "--out", str(SMOKE_DIR)], cwd=env.ROOT)
    rc_gate = subprocess.call([py, "-m", "bench.gate", str(SMOKE_DIR)], cwd=env.ROOT) if rc_smoke == 0 else 1
    print(f"[run_all test] smoke + gate took {time.time() - t1:.0f} s")
    failed = sum(rc != 0 for rc in (rc_tests, rc_smoke, rc_gate))
    print(f"suites: {3 - failed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
