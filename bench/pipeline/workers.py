"""Job workers: the accuracy and ablations stages' jobs measured by several one-thread processes.

Why: on a small CPU, torch's intra-op threads do little for the proxy's small matrices.  Measured on
a 2-core AMD EPYC (docs/proxy.md, "Run time: job workers"): one process with 2 threads evaluated a batch of 128
proxy images in 1.08 s and ran a fine-tuning step (batch 32, with the teacher) in 1.07 s; two
processes with one thread each took 1.67-1.71 s and 1.40-1.55 s each, i.e. 21% and 31% more work done
per second.  Calibration, evaluation and fine-tuning jobs are independent measurements, so they can
run side by side.

How (``./run_all.sh --job-workers N``; default: one per core this process may use, at most 4;
``--job-workers 1`` runs every job in the run's own process, as before):

1. the run prepares what every job reads (the proxy data and backbone; ``--retrain-proxy`` trains here);
2. it starts N workers: ``bench.orchestrate`` with the same profile and options, ``--only`` the
   accuracy/ablations stages it runs, ``--job-worker I/N``, one torch thread each.  They walk the same
   job list and share the result cache: the first worker to reach a job claims it
   (:class:`bench.runtime.results.ResultCache`), the others skip it, or wait for it when the jobs after
   it need its result (a calibrated structure).  They write no report;
3. the run's own pass then goes over every stage as usual.  The workers' results come from the cache
   (counted and shown as measured in this run, "worker k"), and a job a worker did not measure (it
   failed, or was interrupted) is measured there, in this process.  So the tables never depend on how
   the jobs were shared out; only floating-point rounding (one thread instead of several) can differ
   from a one-process run, and every table header says when workers ran.

The speed and segmentation stages stay in the run's process: they time models, and a timing needs the
machine to itself.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from bench.core.errors import ConfigError
from bench.runtime.startup import usable_cpus

RUN_ID_ENV = "PMBENCH_RUN_ID"  # a worker's run (its records count as this run's, --force included)
WORKERS_ENV = "PMBENCH_JOB_WORKERS"  # the default of --job-workers
STAGES = ("accuracy", "ablations")  # stages whose jobs the workers measure
MAX_AUTO = 4


def parse_worker(text: Optional[str]) -> Optional[tuple[int, int]]:
    """``--job-worker I/N`` (1-based) -> (I - 1, N); None for the run's own process."""
    if not text:
        return None
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ConfigError(f"--job-worker takes I/N (e.g. 1/2), not '{text}'") from None
    if not 1 <= i <= n:
        raise ConfigError(f"--job-worker {text}: I must be between 1 and N")
    return i - 1, n


def claims_dir(cache_root: Path, run_id: str) -> Path:
    """The folder where the job workers of run ``run_id`` claim their jobs."""
    return Path(cache_root) / "claims" / run_id


def count(requested: Optional[int], environ=os.environ, cpus: Optional[int] = None) -> int:
    """Workers for this run: ``--job-workers``, else ``PMBENCH_JOB_WORKERS``, else one per usable core (at
    most 4)."""
    if requested is None:
        raw = environ.get(WORKERS_ENV, "").strip()
        if raw:
            if not raw.isdigit():
                raise ConfigError(f"{WORKERS_ENV} must be a positive integer, not '{raw}'")
            requested = int(raw)
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--job-workers must be >= 1, not {requested}")
        return requested
    return max(1, min(MAX_AUTO, usable_cpus() if cpus is None else cpus))


def applies(ctx, stages: list) -> Optional[str]:
    """None when this run's jobs go to workers, else why not (the log says it when --job-workers was given)."""
    if not any(s in STAGES for s in stages):
        return "no accuracy or ablations stage"
    if ctx.launcher is not None:
        return "torchrun runs the jobs (--nproc)"
    if ctx.device != "cpu":
        return f"the jobs run on {ctx.device}"
    return None


def worker_argv(args, stages: list, index: int, n: int) -> list[str]:
    """The worker's command-line options: the run's profile, data and overrides, its stages, its index.
    Paths are made absolute; ``--retrain-proxy`` is not passed (the run trained before the workers)."""
    argv = ["--profile", args.profile, "--only", ",".join(s for s in stages if s in STAGES),
            "--job-worker", f"{index + 1}/{n}"]
    if args.force:
        argv.append("--force")
    if args.device:
        argv += ["--device", args.device]
    if getattr(args, "fixture", False):
        argv.append("--fixture")
    for flag in ("imagenet", "ade20k", "weights", "profile_file"):
        value = getattr(args, flag, None)
        if value:
            argv += [f"--{flag.replace('_', '-')}", str(Path(value).resolve())]
    for text in getattr(args, "configs", None) or []:
        argv += ["--configs", text]
    return argv


def run(ctx, args, stages: list, n: int) -> None:
    """Prepare the shared inputs and run ``n`` workers to the end."""
    from bench.pipeline.stages.sources import Source

    for src in Source.for_profile(ctx):  # data and backbone once, before any worker reads them
        src.ensure_backbone()
    env = {**os.environ, RUN_ID_ENV: ctx.run_id, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "bench.orchestrate", *worker_argv(args, stages, i, n)], env=env)
             for i in range(n)]
    try:
        codes = [p.wait() for p in procs]
    except BaseException:  # Ctrl-C: stop the workers too; what they finished is cached
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    finally:
        shutil.rmtree(claims_dir(ctx.cache.root, ctx.run_id), ignore_errors=True)
    failed = sum(c != 0 for c in codes)
    if failed:
        ctx.progress.note(f"{failed} of {n} job workers stopped early (exit codes {codes}); this process "
                          "measures what they left")


def describe(n: int) -> str:
    """The table-header line of a run whose accuracy/ablations jobs ran on ``n`` workers."""
    return (f"accuracy and ablations jobs measured by {n} worker processes of one torch thread each "
            "(./run_all.sh --job-workers; 1 = one process); only floating-point rounding can differ from "
            "a one-process run")
