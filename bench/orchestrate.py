"""``./run_all.sh [--profile P]``: regenerate every table of a profile.

Flow (each stage lives in ``bench/pipeline/stages/``):

1. ``accuracy``  the proxy (or ImageNet) top-1: off-the-shelf and fine-tuned rows; the structure of
                 every Calibrated method is calibrated here and reused by the cost and speed stages
2. ``cost``      GMACs of every configuration at the real DeiT sizes (analytic, per block)
3. ``speed``     throughput, every configuration of a model interleaved with its baseline
4. ``seg``       Segmenter mIoU, GMACs, FPS
5. ``ablations`` PM ablations
6. reports      tables (md/csv/json) + published-vs-reproduced + plots + README

Paper profile with ``--nproc N`` (or ``--launcher torchrun``): calibration, fine-tuning and evaluation
of the accuracy and ablations stages run as torchrun jobs of ``pmbench`` commands (:mod:`bench.runtime.launch`,
multi-node flags included); everything else stays in this process.  Without it (the default) all runs
in this process, as before.

Every measurement is a job whose full description keys the result cache
(``.cache/results/<profile>/``): a re-run skips what is done unless
``--force``; files are written atomically, so Ctrl-C loses nothing measured.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

from bench.core import registry
from bench.core.reducer import Calibrated, ConfigError
from bench.pipeline import overrides, profiles, workers
from bench.runtime import env, launch, proxy, proxy_backbone, startup
from bench.runtime.checkpoint import load_structure
from bench.runtime.results import JobTaken, ResultCache, file_hash

ROOT = env.ROOT
STAGES = ["accuracy", "cost", "speed", "seg", "ablations"]


class Progress:
    """Job counter with elapsed time and an ETA from per-job estimates corrected by measured pace."""

    def __init__(self, stream=None, tag: str = ""):
        self.t0 = time.time()
        self.stream = stream or sys.stderr  # the stream of the moment (not the one at import)
        self.tag = tag  # a job worker's line prefix ("[worker 1/2] ")
        self.total_est = 0.0
        self.done_est = 0.0
        # the pace: measured / estimated seconds of the jobs this process ran itself (a job worker's
        # times are one thread's, spent in parallel, and say nothing of what is left here)
        self.pace_est = 0.0
        self.pace_real = 0.0
        self.n_total = 0
        self.n_done = 0
        self.n_cached = 0  # jobs answered by the result cache (their time was spent in an earlier run)

    def plan(self, n: int, est_seconds: float) -> None:
        self.n_total += n
        self.total_est += est_seconds

    def finished(self, label: str, est: float, real: float, cached: bool, quiet: bool = False,
                 by: Optional[str] = None) -> None:
        """``quiet``: a job another job worker measures (counted, not printed); ``by``: the job worker
        that measured it in this run (``real`` is its time there; counted as measured, not cached).  A
        line read back from a job worker has no ETA: the worker printed one while it ran, and the jobs
        after it here are most likely read back too."""
        self.n_done += 1
        self.n_cached += bool(cached)
        self.done_est += est
        if not cached and not by:
            self.pace_est += est
            self.pace_real += real
        if quiet:
            return
        pace = (self.pace_real / self.pace_est) if self.pace_est and self.pace_real else 1.0
        remaining = max(0.0, (self.total_est - self.done_est) * pace)
        el = time.time() - self.t0
        tag = "cached" if cached else (f"{by}, {real:.1f}s" if by else f"{real:.1f}s")
        eta = "" if by else f"  ETA {_hms(remaining)}"
        self.stream.write(f"{self.tag}[{self.n_done}/{self.n_total}] {label} ({tag})  elapsed {_hms(el)}{eta}\n")
        self.stream.flush()

    def note(self, msg: str) -> None:
        self.stream.write(f"{self.tag}[run_all] {msg}\n")
        self.stream.flush()


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{(s % 3600) // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class StageArtefacts:
    """What one stage hands to the next, declared (written by the first, read by the later ones)."""

    def __init__(self):
        self.calibrated: dict[str, Path] = {}  # accuracy: spec -> checkpoint of a Calibrated method's structure
        self.structure_summaries: dict[str, list] = {}  # accuracy: spec -> per-layer tokens of that structure
        self.finetuned: dict[tuple[str, str], Path] = {}  # accuracy: (model, canonical spec) -> fine-tuned
        #   checkpoint of a Calibrated method (cost and speed cost its own learned modules)
        self.block_tokens: list[dict] = []  # cost: per-block token counts (the plots)
        self.speedup_ref = None  # reports: the speed stage's reference size of the accuracy table's speed-ups

    # -- learned structures (Calibrated methods) shared between stages ------------------------------
    def _structure_path(self, spec: str):
        want = registry.build(spec).spec()
        for s, path in self.calibrated.items():
            if registry.build(s).spec() == want:
                return path
        return None

    def structure_for(self, red) -> None:
        """Give a Calibrated reducer the structure calibrated in this run (same 196-token geometry as
        DeiT), so cost and speed at the real sizes use the learned per-layer counts."""
        if isinstance(red, Calibrated):
            path = self._structure_path(red.spec())
            if path is not None:
                load_structure(red, path)

    def structure_key(self, spec: str):
        """Cache key part of a row whose method learns a structure (None for other methods)."""
        if not registry.is_calibrated(spec):
            return None
        path = self._structure_path(spec)
        if path is None:
            return "default-structure"
        return file_hash(path)


class RunContext(StageArtefacts):
    """What every stage gets: the profile, the cache, the output folder, progress and the tables, and
    the artefacts the stages hand on (:class:`StageArtefacts`)."""

    def __init__(self, profile: dict, args, out_dir: Path, cache_dir: Path):
        super().__init__()
        self.profile = profile
        self.args = args
        self.out_dir = out_dir
        self.run_id = os.environ.get(workers.RUN_ID_ENV) or uuid.uuid4().hex[:12]
        self.worker = workers.parse_worker(getattr(args, "job_worker", None))  # (index, count) in a job worker
        claims = workers.claims_dir(cache_dir, self.run_id) if self.worker else None
        self.cache = ResultCache(cache_dir, force=args.force, run_id=self.run_id, claims=claims,
                                 worker=self.worker[0] if self.worker else None)
        self._from_workers: set[str] = set()  # cache files measured by this run's job workers (counted once)
        self.job_workers = 1  # processes that measured the accuracy/ablations jobs (bench.pipeline.workers)
        self.current_stage: Optional[str] = None  # the stage running now (its tables' headers)
        self.work_dir = cache_dir.parent.parent / "runs" / profile["name"]
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.progress = Progress(tag=f"[worker {self.worker[0] + 1}/{self.worker[1]}] " if self.worker else "")
        self.tables: dict[str, dict] = {}  # name -> {"title", "rows", "meta", "columns"}
        self.device = args.device or env.default_device()
        self.versions = env.versions()
        self.failures: list[str] = []
        self.stages: list[str] = list(STAGES)  # the stages this invocation runs (set by main)
        self.skipped_stages: dict[str, str] = {}  # stage -> why it produced no table
        self.launcher = None  # bench.runtime.launch.Launcher with --nproc / --launcher torchrun (paper profile)
        self.proxy_retrained = False  # --retrain-proxy: the backbone was trained again in this run
        self._proxy_backbone_line: Optional[str] = None  # proxy_backbone_line(), computed once

    @property
    def fixture(self) -> bool:
        return bool(self.profile.get("fixture") or getattr(self.args, "fixture", False))

    def skip_stage(self, stage: str, why: str) -> None:
        """Record that a stage ran but measured nothing (e.g. no data for it): every header says so."""
        self.skipped_stages[stage] = why
        self.progress.note(f"{stage}: skipped, {why}")

    def stages_line(self) -> str:
        """Which stages ran and which were skipped, and why (every table header of a fixture run)."""
        ran = [s for s in self.stages if s not in self.skipped_stages]
        skipped = [f"{s} ({self.skipped_stages[s]})" for s in STAGES if s in self.skipped_stages]
        skipped += [f"{s} (not requested: --only {','.join(self.stages)})" for s in STAGES
                    if s not in self.stages and s not in self.skipped_stages]
        return f"run: {', '.join(ran) or 'none'}" + (f"; skipped: {'; '.join(skipped)}" if skipped else "")

    def job(self, desc: dict, fn, label: str, est: float = 1.0, wait: bool = False) -> dict:
        """Run ``fn`` unless the cache holds ``desc``; returns the result dict.  In a job worker
        (:mod:`bench.pipeline.workers`) a job another worker claimed raises
        :class:`bench.runtime.results.JobTaken`, unless ``wait`` (later jobs need its result: wait for it)."""
        desc = {**desc, "profile": self.profile["name"], "versions": self.versions}
        if isinstance(desc.get("spec"), str):  # the key says exactly what is measured, defaults included
            desc["spec_full"] = full_spec(desc["spec"])
        t = time.time()
        try:
            rec, cached = self.cache.get_or_run(desc, fn, wait=wait)
        except JobTaken:
            self.progress.finished(label, est, 0.0, True, quiet=True)
            raise
        by, quiet = None, False
        if cached and self.cache.made_by_worker(rec):
            key = self.cache.path(desc).name
            if self.cache.worker is not None:  # a worker: another worker of this run measured it
                quiet = True
            elif key not in self._from_workers:  # measured in this run by a job worker: counted once, as measured
                self._from_workers.add(key)
                cached, by = False, f"worker {rec['worker'] + 1}"
        self.progress.finished(label, est, rec.get("wall_s", 0.0) if by else time.time() - t, cached, quiet=quiet,
                               by=by)
        return rec["result"]

    def meta(self, **kw) -> dict:
        st = env.stamp(self.device)
        m = {
            "profile": self.profile["name"],
            "data_source": self.profile["data_source"],
            "device": st["device"],
            "torch": st["torch"],
            "timm": st["timm"],
            "mmseg": st["mmseg"],
            "commit": st["commit"],
            "date": st["date"],
            "command": self.command(),
        }
        ov = self.profile.get("overrides") or {}
        if ov:  # --configs / --profile-file: said in every table header, and in full in the JSON
            m["profile_overrides"] = overrides.describe(ov)
            m["profile_overrides_detail"] = ov
        if self.job_workers > 1 and self.current_stage in workers.STAGES:  # the tables of the stages they ran
            m["job_workers"] = workers.describe(self.job_workers)
        if self.launcher is not None:
            m["launcher"] = {"kind": "torchrun", "nproc_per_node": self.launcher.cfg.nproc_per_node,
                             "nnodes": self.launcher.cfg.nnodes, "world_size": self.launcher.world_size}
        if self.profile["data_source"] == "proxy":
            m["proxy_backbone"] = self.proxy_backbone_line()
        if self.fixture:
            from bench.runtime.fixtures import TINY_MODEL

            m["fixture"] = (f"yes: small fixture data in the real formats and the tiny {TINY_MODEL} (random "
                            "weights); tests the paper profile's code path, NOT paper results")
            m["stages"] = self.stages_line()
        m.update(kw)
        return m

    def proxy_backbone_line(self) -> str:
        """Where this run's proxy backbone came from: the shipped weights or a training run.  Read
        from the checkpoint once per run (every table header asks), after the backbone was loaded."""
        size = self.profile.get("proxy_size", "default")
        p = proxy.backbone_path(size)
        if not p.exists():
            return "not loaded in this run"
        if self._proxy_backbone_line is None:
            if proxy_backbone.backbone_origin(p) == "shipped":
                e = proxy_backbone.shipped_entry(size) or {}
                self._proxy_backbone_line = (
                    f"shipped weights {e.get('file', '?')} (sha256 {str(e.get('sha256', '?'))[:12]}, recipe "
                    f"{e.get('recipe', '?')}, val top-1 {e.get('val_top1', float('nan')):.1f}% when shipped; "
                    "`--retrain-proxy` re-creates them)")
            else:
                how = "retrained in this run (--retrain-proxy)" if self.proxy_retrained else "trained by this suite"
                self._proxy_backbone_line = f"{how}: {proxy.SIZES[size].recipe()}, file {p.name}"
            if proxy.task_note(size):
                self._proxy_backbone_line += f"; {proxy.task_note(size)}"
        return self._proxy_backbone_line

    def command(self) -> str:
        """The command line that reproduces this run's tables (profile, fixture flag, overrides)."""
        cmd = ["./run_all.sh", "--profile", self.profile["name"]]
        if self.profile.get("fixture"):
            cmd.append("--fixture")
        for text in getattr(self.args, "configs", None) or []:
            cmd += ["--configs", text]
        if getattr(self.args, "profile_file", None):
            cmd += ["--profile-file", self.args.profile_file]
        if getattr(self.args, "retrain_proxy", False):
            cmd.append("--retrain-proxy")
        if self.launcher is not None:  # the world size changes calibration and fine-tuning (not evaluation)
            cmd += ["--nproc", str(self.launcher.cfg.nproc_per_node)]
            if self.launcher.cfg.nnodes > 1:
                cmd += ["--nnodes", str(self.launcher.cfg.nnodes)]
        return shlex.join(cmd)

    def add_table(self, name: str, title: str, rows: list, meta: dict, columns=None) -> None:
        """Register a table; every row naming a reducer ``config`` also carries ``config_full``
        (every option resolved) in the CSV/JSON, next to the short spec."""
        for r in rows:
            if isinstance(r.get("config"), str) and "config_full" not in r:
                try:
                    r["config_full"] = full_spec(r["config"])
                except ConfigError:
                    pass
        self.tables[name] = {"title": title, "rows": rows, "meta": meta, "columns": columns}


def full_spec(spec: str) -> str:
    return registry.build(spec).full_spec()


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="run_all.sh", description="Regenerate every PM-Bench table of a profile.")
    p.add_argument("--profile", default="default", choices=sorted(profiles.PROFILES))
    p.add_argument("--force", action="store_true", help="re-measure everything (ignore the result cache)")
    p.add_argument("--only", default=None, help=f"comma list of stages to run ({','.join(STAGES)})")
    p.add_argument("--out", default=None, help="report folder (default reports/<profile>)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--imagenet", default=None, help="paper profile: ImageNet root (train/ and val/ class folders)")
    p.add_argument("--ade20k", default=None, help="paper profile: ADEChallengeData2016 root")
    p.add_argument("--weights", default=None,
                   help="paper profile: folder of local weight files named <timm model name>.pth/.safetensors")
    p.add_argument("--fixture", action="store_true",
                   help="paper profile on small fixture data with tiny models (tests the real path)")
    p.add_argument("--configs", action="append", default=None, metavar="SPEC[,SPEC...]",
                   help="add reducer specs to every classification table (accuracy off-the-shelf and fine-tuned, "
                        "FLOPs, throughput), e.g. a plug-in's: --configs droptail:n=20,at=3,tome:r=8 (an item "
                        "key=value continues the spec before it; repeatable)")
    p.add_argument("--profile-file", default=None, metavar="FILE",
                   help="TOML/JSON/YAML file of profile keys to set, [add] lists to extend, [speed] settings to "
                        "merge, configs to add everywhere (see bench/pipeline/overrides.py and the README)")
    p.add_argument("--retrain-proxy", action="store_true",
                   help="default/smoke profiles: train the proxy backbone and the proxy Segmenter again with the "
                        "suite's trainers instead of loading the shipped weights (docs/proxy.md)")
    p.add_argument("--job-workers", type=int, default=None, metavar="N",
                   help="CPU runs: measure the accuracy and ablations jobs on N one-thread worker processes "
                        "(default: one per core, at most 4, or PMBENCH_JOB_WORKERS; 1: all in this process); "
                        "speed and segmentation always run in this process")
    p.add_argument("--job-worker", default=None, help=argparse.SUPPRESS)  # I/N: this process is a job worker
    launch.add_arguments(p)
    return p.parse_args(argv)


LAUNCHED_STAGES = ("accuracy", "ablations")  # the stages whose jobs run through torchrun with --nproc


def check_launch(cfg, prof: dict, stages: list) -> None:
    """torchrun launching applies to the paper profile's accuracy and ablations stages."""
    if prof.get("data_source") != "real":
        raise ConfigError(f"--nproc / --launcher torchrun apply to the paper profile (ImageNet, or --fixture); the "
                          f"{prof['name']} profile runs on the embedded proxy in one process: drop them")
    if not any(s in LAUNCHED_STAGES for s in stages):
        raise ConfigError(f"--nproc / --launcher torchrun: none of the requested stages ({', '.join(stages)}) runs "
                          f"through torchrun (only {' and '.join(LAUNCHED_STAGES)} do: calibration, fine-tuning "
                          "and evaluation); drop the launcher flags or add one of those stages to --only")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        prof = profiles.get(args.profile)
        stages = args.only.split(",") if args.only else STAGES
        bad = [s for s in stages if s not in STAGES]
        if bad:
            raise ConfigError(f"unknown stage(s) {bad}; available: {', '.join(STAGES)}")
        # cost and speed need no data (random weights, synthetic input): `--only cost,speed` runs the
        # paper profile's GMACs and throughput anywhere, e.g. on a GPU for reports/gpu/
        needs_data = set(stages) - {"cost", "speed"}
        if args.profile == "paper" and not args.fixture and needs_data and not (args.imagenet or args.ade20k):
            raise ConfigError(
                f"the paper profile's {', '.join(sorted(needs_data))} stage(s) need real data: --imagenet PATH "
                "(train/ val/ class folders) and/or --ade20k PATH (ADEChallengeData2016), plus pretrained weights "
                "(--weights DIR or a reachable hub); `--only cost,speed` needs none; the embedded proxy runs with "
                "--profile default"
            )
        if args.retrain_proxy and prof.get("data_source") != "proxy":
            raise ConfigError(f"--retrain-proxy applies to the proxy profiles (default, smoke); the {args.profile} "
                              "profile uses pretrained weights")
        if args.fixture:
            if args.profile != "paper":
                raise ConfigError("--fixture applies to the paper profile")
            prof = profiles.fixture_variant(prof)
        prof = overrides.apply(prof, args.configs, args.profile_file)
        device = args.device or env.default_device()
        lcfg = launch.from_args(args, device)
        if lcfg is not None:
            check_launch(lcfg, prof, stages)
            if not lcfg.leader:  # another node of a multi-node run: run its share of node 0's jobs, nothing else
                return launch.follow(lcfg)
        out_dir = Path(args.out) if args.out else ROOT / "reports" / (args.profile + ("-fixture" if args.fixture else ""))
        cache_dir = Path(os.environ.get("PMBENCH_CACHE", ROOT / ".cache")) / "results" / (
            args.profile + ("-fixture" if args.fixture else ""))
        ctx = RunContext(prof, args, out_dir, cache_dir)
        ctx.stages = list(stages)
        t0 = time.time()
        ctx.progress.note(f"profile {args.profile} on {env.device_name(ctx.device)}; stages {', '.join(stages)}")
        if ctx.device == "cpu":
            # Every stage, not only the speed stage, runs the same few tensor shapes over and over: with
            # glibc's adaptive thresholds a large block can be a fresh mapping each time, and evaluating
            # the proxy backbone took about 15% longer (docs/speed.md, section 1, item 8)
            from bench.runtime.speed import steady_allocator

            steady_allocator()
        if lcfg is not None:
            ctx.launcher = launch.Launcher(lcfg, ctx.work_dir, stream=ctx.progress.stream)
            ctx.progress.note(f"launcher: {lcfg.describe()} for calibration, fine-tuning and evaluation "
                              f"({', '.join(s for s in stages if s in LAUNCHED_STAGES)}); the rest in this process")
        if ctx.worker is not None:  # a job worker: one thread, its share of the jobs, no report
            import torch

            torch.set_num_threads(1)
            ctx.out_dir = ctx.work_dir / f"worker-{ctx.worker[0] + 1}"
        else:
            n_workers = workers.count(args.job_workers)
            why_not = workers.applies(ctx, stages)
            if n_workers > 1 and why_not is None:
                ctx.progress.note(f"{' and '.join(s for s in stages if s in workers.STAGES)} jobs: {n_workers} "
                                  "worker processes of one thread each (--job-workers 1: all in this process)")
                workers.run(ctx, args, stages, n_workers)
                ctx.job_workers = n_workers
            elif args.job_workers and args.job_workers > 1:  # asked for explicitly: say why it does not apply
                ctx.progress.note(f"--job-workers {args.job_workers}: not used, {why_not}")
        try:
            for name in stages:
                ctx.current_stage = name
                mod = importlib.import_module(f"bench.pipeline.stages.{name}")
                ctx.progress.note(f"stage {name}")
                mod.run(ctx)
        finally:
            ctx.current_stage = None
            if ctx.launcher is not None:  # followers (other nodes) stop waiting for jobs
                ctx.launcher.close(wait_s=60.0 if sys.exc_info()[0] is None else 5.0)
        if ctx.worker is not None:
            ctx.progress.note(f"worker done in {_hms(time.time() - t0)}")
            return 0
        from bench.report import writer

        writer.write_all(ctx, wall_s=time.time() - t0)
        ctx.progress.note(f"done in {_hms(time.time() - t0)}; reports in {out_dir}")
        if ctx.failures:
            ctx.progress.note("FAILURES:\n  " + "\n  ".join(ctx.failures))
            return 1
        return 0
    except ConfigError as e:
        print(f"run_all: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nrun_all: interrupted; every finished measurement is cached, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    _rc = main()
    startup.settle()
    sys.exit(_rc)
