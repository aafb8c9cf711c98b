"""Run ``pmbench`` sub-commands under torchrun for the orchestrator (``./run_all.sh --nproc N``).

The paper profile calibrates PM, fine-tunes and evaluates in one process unless asked otherwise.
``--nproc N`` (or ``--launcher torchrun``) runs each of those jobs as::

    python -m torch.distributed.run <torchrun flags> -m bench.cli {calibrate|train|eval} ... --json

``python`` is ``sys.executable`` (the suite's venv).  The result comes back through a file: rank 0's
``emit`` also writes its JSON object to ``$PMBENCH_RESULT_JSON`` (see :func:`bench.cli.emit`), and
every rank tees its stderr into ``$PMBENCH_RANK_LOG_DIR/rank<RANK>.log``, so a failure is reported
with the log tail of the rank torchrun names as the first to fail.  The children's stderr (progress
bars, messages) is relayed as it comes; their stdout is kept in the job folder.

Torchrun flags (:meth:`LaunchConfig.torchrun_flags`):

* one node: ``--standalone --nproc-per-node N`` (a free local port), or ``--master-port P`` if given;
* several nodes: ``--nnodes M --node-rank R --master-addr A --master-port P`` (static rendezvous), or
  ``--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id <job id>``;
* ``--torchrun-args "..."`` is appended verbatim (e.g. ``--max-restarts 1 --local-addr ...``); the
  flags above are the suite's and refused there.

Several nodes: every torchrun job needs a ``torchrun`` on every node.  The node with ``--node-rank 0``
runs the orchestrator (stages, cache, reports); the others, started with the same command but another
``--node-rank``, only *follow* (:func:`follow`): node 0 publishes each job (its ``pmbench`` arguments
and job id) in a small key-value store (torch's ``TCPStore``) at the master address, port
``master-port + 1``, and each follower starts its share of that job's ranks.  Paths in the jobs are node
0's (data, weights, checkpoints in the cache folder): every node must see them at the same paths (a
shared file system).  A failure on any node stops the job on all of them.

Ctrl-C stops the torchrun process group (torchrun and every rank) before the error propagates.
"""
from __future__ import annotations

import codecs
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from bench.core.errors import ConfigError

RESULT_ENV = "PMBENCH_RESULT_JSON"  # rank 0 writes its --json object here (bench.cli.emit)
RANK_LOG_ENV = "PMBENCH_RANK_LOG_DIR"  # every rank tees its stderr into rank<RANK>.log here (bench.cli.main)
LAUNCHERS = ("inprocess", "torchrun")
COMMANDS = ("train", "eval", "calibrate")  # the bench.cli commands that run under torchrun
DEFAULT_MASTER_PORT = 29500  # torchrun's own default

# torchrun flags the suite sets itself: refused in --torchrun-args (the orchestrator flag to use instead)
_OWN_FLAGS = {
    "--nproc-per-node": "--nproc", "--nproc_per_node": "--nproc", "--nnodes": "--nnodes",
    "--node-rank": "--node-rank", "--node_rank": "--node-rank", "--master-addr": "--master-addr",
    "--master_addr": "--master-addr", "--master-port": "--master-port", "--master_port": "--master-port",
    "--rdzv-endpoint": "--rdzv-endpoint", "--rdzv_endpoint": "--rdzv-endpoint",
    "--rdzv-backend": "--rdzv-endpoint", "--rdzv_backend": "--rdzv-endpoint", "--rdzv-id": "(set per job)",
    "--rdzv_id": "(set per job)", "--standalone": "(set for one node)", "-m": "(set by the suite)",
    "--module": "(set by the suite)", "--no-python": "(set by the suite)", "--no_python": "(set by the suite)",
    "--run-path": "(set by the suite)", "--run_path": "(set by the suite)",
}


# --------------------------------------------------------------------------- configuration
@dataclass
class LaunchConfig:
    """How the orchestrator launches its torchrun jobs (one per calibration, fine-tuning, evaluation)."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    rdzv_endpoint: Optional[str] = None
    torchrun_args: list = field(default_factory=list)
    device: str = "cpu"

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def leader(self) -> bool:
        return self.node_rank == 0

    def describe(self) -> str:
        where = f"{self.nproc_per_node} process(es) per node x {self.nnodes} node(s)"
        if self.nnodes > 1:
            where += (f", rendezvous c10d at {self.rdzv_endpoint}" if self.rdzv_endpoint
                      else f", master {self.master_addr}:{self.master_port or DEFAULT_MASTER_PORT}")
        return f"torchrun, {where} (world size {self.world_size}, {'NCCL' if self.cuda else 'gloo'})"

    @property
    def cuda(self) -> bool:
        return str(self.device).startswith("cuda")

    def torchrun_flags(self, job_id: str) -> list:
        """torchrun's own flags for one job (``job_id``: the c10d rendezvous id, equal on every node)."""
        f = ["--nproc-per-node", str(self.nproc_per_node)]
        if self.nnodes == 1 and not self.rdzv_endpoint:
            if self.master_port is None:
                f = ["--standalone"] + f
            else:
                f += ["--nnodes", "1", "--node-rank", "0", "--master-addr", self.master_addr or "127.0.0.1",
                      "--master-port", str(self.master_port)]
        elif self.rdzv_endpoint:
            f += ["--nnodes", str(self.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", self.rdzv_endpoint,
                  "--rdzv-id", job_id]
        else:
            f += ["--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank), "--master-addr",
                  str(self.master_addr), "--master-port", str(self.master_port or DEFAULT_MASTER_PORT)]
        return f + list(self.torchrun_args)

    def command(self, cli_args: list, job_id: str) -> list:
        """The whole command line of one job on this node."""
        return [sys.executable, "-m", "torch.distributed.run", *self.torchrun_flags(job_id), "-m", "bench.cli",
                *[str(a) for a in cli_args]]

    def control_address(self) -> tuple:
        """(host, port) of node 0's job store for the followers (several nodes only)."""
        if self.rdzv_endpoint:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            return host, int(port) + 1
        return str(self.master_addr), int(self.master_port or DEFAULT_MASTER_PORT) + 1


def add_arguments(p) -> None:
    """The orchestrator's launcher flags."""
    g = p.add_argument_group("multi-process launching (paper profile: calibration, fine-tuning, evaluation)")
    g.add_argument("--launcher", choices=LAUNCHERS, default=None,
                   help="inprocess (default: everything in this one process) or torchrun (implied by --nproc "
                        "and the multi-node flags; see docs/distributed.md)")
    g.add_argument("--nproc", type=int, default=None,
                   help="processes per node for torchrun (one per GPU); implies --launcher torchrun "
                        "(default: in-process; with --launcher torchrun alone: the GPUs present)")
    g.add_argument("--nnodes", type=int, default=None, help="nodes of each torchrun job (default 1)")
    g.add_argument("--node-rank", type=int, default=None,
                   help="this node's rank: 0 runs the stages and writes the reports; the others follow node 0 "
                        "and run their share of every torchrun job")
    g.add_argument("--master-addr", default=None, help="node 0's address (static rendezvous, several nodes)")
    g.add_argument("--master-port", type=int, default=None,
                   help=f"node 0's rendezvous port (default {DEFAULT_MASTER_PORT}); the followers also use "
                        "this port + 1")
    g.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="c10d rendezvous instead of --master-addr/--master-port; HOST is node 0 (its job store "
                        "for the other nodes listens on PORT + 1)")
    g.add_argument("--torchrun-args", default=None, metavar="'ARGS'",
                   help="extra torchrun flags, passed through verbatim; write it with '=', e.g. "
                        "--torchrun-args=\"--max-restarts 1\"")


def _multi_node_flags(args) -> list:
    names = [("--nnodes", "nnodes"), ("--node-rank", "node_rank"), ("--master-addr", "master_addr"),
             ("--master-port", "master_port"), ("--rdzv-endpoint", "rdzv_endpoint"),
             ("--torchrun-args", "torchrun_args")]
    return [flag for flag, dest in names if getattr(args, dest, None) is not None]


def parse_torchrun_args(text: Optional[str]) -> list:
    if not text:
        return []
    try:
        toks = shlex.split(text)
    except ValueError as e:
        raise ConfigError(f"--torchrun-args {text!r}: {e}; quote it as one shell word") from None
    for t in toks:
        name = t.split("=", 1)[0]
        if name in _OWN_FLAGS:
            use = _OWN_FLAGS[name]
            raise ConfigError(f"--torchrun-args: {name} is set by the suite; "
                              + (f"use the orchestrator's {use}" if use.startswith("--") else f"it is {use[1:-1]}")
                              + " instead of passing it through")
    return toks


def from_args(args, device: str, gpu_count: Optional[int] = None) -> Optional[LaunchConfig]:
    """The launch configuration the orchestrator flags ask for, or None for in-process (the default).
    Every inconsistency is a ConfigError naming the flag and the fix."""
    multi = _multi_node_flags(args)
    launcher = args.launcher or ("torchrun" if (args.nproc is not None or multi) else "inprocess")
    if launcher == "inprocess":
        given = (["--nproc"] if args.nproc is not None else []) + multi
        if given:
            raise ConfigError(f"{', '.join(given)} configure torchrun, but --launcher inprocess runs everything in "
                              "this process; drop them or use --launcher torchrun")
        return None
    cuda = str(device).startswith("cuda")
    if gpu_count is None:
        import torch

        gpu_count = torch.cuda.device_count() if cuda else 0
    nproc = args.nproc
    if nproc is None:
        if not cuda:
            raise ConfigError("--launcher torchrun on CPU needs --nproc N (processes per node; gloo ranks)")
        if gpu_count < 1:
            raise ConfigError("--launcher torchrun: no CUDA GPU is visible; give --nproc N with --device cpu")
        nproc = gpu_count
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, not {nproc}")
    if cuda and nproc > gpu_count:
        raise ConfigError(f"--nproc {nproc}: this node has {gpu_count} GPU(s) and each process needs its own; "
                          f"use --nproc {max(1, gpu_count)} or fewer")
    nnodes = 1 if args.nnodes is None else args.nnodes
    if nnodes < 1:
        raise ConfigError(f"--nnodes must be >= 1, not {nnodes}")
    node_rank = 0 if args.node_rank is None else args.node_rank
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"--node-rank {node_rank} is not a rank of {nnodes} node(s) (0..{nnodes - 1})")
    if args.master_port is not None and not 1 <= args.master_port <= 65534:
        raise ConfigError(f"--master-port must be a port in 1..65534 (port + 1 is also used), not {args.master_port}")
    if args.rdzv_endpoint is not None:
        if args.master_addr is not None or args.master_port is not None:
            raise ConfigError("give either --rdzv-endpoint HOST:PORT or --master-addr/--master-port, not both")
        host, sep, port = args.rdzv_endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65534:
            raise ConfigError(f"--rdzv-endpoint {args.rdzv_endpoint!r}: write HOST:PORT, e.g. node0:29400")
    if nnodes > 1 and not (args.master_addr or args.rdzv_endpoint):
        raise ConfigError(f"--nnodes {nnodes}: every node must reach node 0; give --master-addr ADDR (node 0's "
                          "address, the same on every node) or --rdzv-endpoint HOST:PORT")
    return LaunchConfig(nproc_per_node=nproc, nnodes=nnodes, node_rank=node_rank, master_addr=args.master_addr,
                        master_port=args.master_port, rdzv_endpoint=args.rdzv_endpoint,
                        torchrun_args=parse_torchrun_args(args.torchrun_args), device=str(device))


def per_rank_batch(global_batch: int, world: int, what: str) -> int:
    """The per-rank share of a global batch; the split must be exact so every rank sees as many images
    as a one-process run's batch holds."""
    if world < 1 or global_batch % world:
        ok = [n for n in range(1, global_batch + 1) if global_batch % n == 0]
        raise ConfigError(f"the {what} batch of {global_batch} images does not split evenly over {world} "
                          f"processes (the global batch is kept, so the recipe is unchanged); use a total of "
                          f"{', '.join(map(str, ok))} processes (--nproc x --nnodes)")
    return global_batch // world


# --------------------------------------------------------------------------- one process group
class _Relay(threading.Thread):
    """Copy a pipe to ``stream`` as it comes (progress bars' carriage returns included) and keep its tail."""

    def __init__(self, pipe, stream, log_path: Optional[Path], keep: int = 64_000):
        super().__init__(daemon=True)
        self.pipe, self.stream, self.keep = pipe, stream, keep
        self.log = open(log_path, "a", encoding="utf-8", errors="replace") if log_path else None
        self.buf = ""
        self.last = "\n"

    def run(self) -> None:
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while True:
                chunk = self.pipe.read1(8192) if hasattr(self.pipe, "read1") else self.pipe.read(8192)
                if not chunk:
                    break
                text = dec.decode(chunk)
                self.buf = (self.buf + text)[-self.keep:]
                if self.log:
                    self.log.write(text)
                    self.log.flush()
                self._write(text)
        finally:
            if self.last not in "\n":  # a progress bar left the line open: the next message starts a new one
                self._write("\n")
            if self.log:
                self.log.close()

    def _write(self, text: str) -> None:
        if not text:
            return
        self.last = text[-1]
        try:
            self.stream.write(text)
            self.stream.flush()
        except (ValueError, OSError):  # the stream was closed (interpreter exit): keep the tail only
            pass


def _stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to torchrun's whole process group (torchrun forwards it to the ranks), SIGKILL after ``grace``."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            # the group may outlive its leader for a moment (ranks being reaped): one more signal below
        except subprocess.TimeoutExpired:
            continue
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return


def run_process(argv: list, *, env: dict, cwd, stream, stdout_path: Path, stderr_path: Optional[Path] = None,
                abort: Optional[Callable[[], Optional[str]]] = None) -> tuple:
    """Run ``argv`` in its own process group; relay its stderr to ``stream``; its stdout goes to
    ``stdout_path``.  ``abort()`` is polled twice a second: a non-empty reason stops the group.
    Returns (exit code, stderr tail, abort reason or None).  Ctrl-C stops the group, then re-raises."""
    with open(stdout_path, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE, env=env, cwd=str(cwd),
                                start_new_session=True)
    relay = _Relay(proc.stderr, stream, stderr_path)
    reason = None
    try:  # from here on, a Ctrl-C at any point stops the group
        relay.start()
        while True:
            try:
                proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if abort is not None:
                reason = abort()
                if reason:
                    _stop_group(proc)
                    break
    except BaseException:  # Ctrl-C (KeyboardInterrupt), SystemExit: never leave the ranks running
        _stop_group(proc)
        if relay.is_alive():
            relay.join(timeout=5)
        raise
    relay.join(timeout=10)
    return proc.returncode, relay.buf, reason


# --------------------------------------------------------------------------- failures
_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)\s*exitcode\s*:\s*(-?\d+)", re.S)
_CLI_ERROR = re.compile(r"^pmbench(?: [\w-]+)?: error: (.+)$", re.M)


def _tail(text: str, n: int = 25) -> str:
    lines = [ln.rstrip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return "\n".join("    " + ln for ln in lines[-n:])


def failure(label: str, argv: list, rc: int, stderr_tail: str, rank_logs: Path, reason: Optional[str] = None):
    """The exception for a failed job: the first failing rank (torchrun's root cause) and its log tail.
    A rank that stopped on bad input (exit code 2, ``pmbench ...: error: ...``) makes it a ConfigError."""
    m = _ROOT_CAUSE.search(stderr_tail)
    rank, code = (int(m.group(1)), int(m.group(3))) if m else (None, rc)
    log_text, log_path = "", None
    cand = [rank_logs / f"rank{rank}.log"] if rank is not None else sorted(rank_logs.glob("rank*.log"))
    for p in cand:
        if p.exists():
            t = p.read_text(errors="replace")
            if rank is not None or "Traceback" in t or "error:" in t:
                log_text, log_path = t, p
                break
    err = _CLI_ERROR.findall(log_text) or _CLI_ERROR.findall(stderr_tail)
    who = f"rank {rank} exited with code {code}" if rank is not None else f"torchrun exited with code {rc}"
    head = f"torchrun job '{label}' failed: " + (reason if reason else who)
    if err:
        head += f" ({err[-1].strip()})"
    body = [head, "  command: " + shlex.join(str(a) for a in argv)]
    if log_text:
        body += [f"  log of rank {rank if rank is not None else '?'} ({log_path}), last lines:", _tail(log_text)]
    else:
        body += ["  torchrun's output, last lines:", _tail(stderr_tail)]
    msg = "\n".join(body)
    return ConfigError(msg) if code == 2 and err else RuntimeError(msg)


# --------------------------------------------------------------------------- node 0's job store
def _store(host: str, port: int, leader: bool, timeout_s: float):
    from torch.distributed import TCPStore

    return TCPStore(host, port, world_size=None, is_master=leader, wait_for_workers=False,
                    timeout=datetime.timedelta(seconds=timeout_s))


def _has(store, key: str) -> bool:
    return bool(store.check([key]))


# --------------------------------------------------------------------------- the launcher
class Launcher:
    """Runs ``bench.cli`` commands under torchrun with ``cfg``; one job at a time, job folders under
    ``work_dir/torchrun/``.  ``jobs`` records every job (command, label, world size, seconds)."""

    def __init__(self, cfg: LaunchConfig, work_dir: Path, stream=None, runner=None, cwd=None):
        self.cfg = cfg
        self.root = Path(work_dir) / "torchrun"
        self.stream = stream or sys.stderr
        self.runner = runner or run_process
        self.cwd = Path(cwd) if cwd else _repo_root()
        self.session = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.n = 0
        self.jobs: list = []
        self.store = None
        if cfg.nnodes > 1:
            host, port = cfg.control_address()
            try:
                self.store = _store(host, port, True, 600)
            except Exception as e:  # noqa: BLE001 - e.g. the port is taken
                raise ConfigError(f"cannot open node 0's job store on port {port} ({e}); choose another "
                                  "--master-port (the store uses the port after it)") from None
            self.store.set("pmbench/hello", json.dumps({"session": self.session, **asdict(cfg)}))

    @property
    def world_size(self) -> int:
        return self.cfg.world_size

    def run(self, cli_args: list, label: str, read: Optional[Callable] = None):
        """Run ``pmbench <cli_args>`` (``--json`` is added) and return rank 0's JSON object, or
        ``read(job_folder, object)`` when given (called before the folder is removed).
        ``cli_args`` may contain ``{job}``: the job folder (shared by every node)."""
        self.n += 1
        k = self.n
        job = self.root / f"{self.session}-{k:03d}-{cli_args[0]}"
        job.mkdir(parents=True, exist_ok=True)
        args = [str(a).replace("{job}", str(job)) for a in cli_args]
        if "--json" not in args:
            args.append("--json")
        job_id = f"pmbench-{self.session}-{k}"
        env_add = {RESULT_ENV: str(job / "result.json"), RANK_LOG_ENV: str(job / "ranks")}
        if self.store is not None:
            self.store.set(f"pmbench/job/{k}", json.dumps({"args": args, "env": env_add, "job_id": job_id,
                                                            "label": label}))
        argv = self.cfg.command(args, job_id)
        self.stream.write(f"[run_all] torchrun ({self.cfg.world_size} ranks): {label}\n")
        self.stream.flush()
        t0 = time.time()
        abort = None
        if self.store is not None:
            def abort(k=k):
                for node in range(1, self.cfg.nnodes):
                    key = f"pmbench/fail/{k}/{node}"
                    if _has(self.store, key):
                        return f"node {node} failed: {self.store.get(key).decode(errors='replace')}"
                return None
        try:
            rc, tail, reason = self.runner(argv, env=child_env(self.cfg, env_add), cwd=self.cwd, stream=self.stream,
                                           stdout_path=job / "stdout.log", stderr_path=job / "stderr.log",
                                           abort=abort)
        except BaseException:
            self._abort(k)
            raise
        result_file = job / "result.json"
        if rc != 0 or reason or not result_file.exists():
            self._abort(k)
            if rc == 0 and not reason:
                raise RuntimeError(f"torchrun job '{label}' ended without a result ({result_file} missing); "
                                   f"its output is in {job}")
            raise failure(label, argv, rc, tail, job / "ranks", reason)
        res = json.loads(result_file.read_text())
        out = read(job, res) if read is not None else res
        self.jobs.append({"command": args[0], "label": label, "world_size": res.get("world_size"),
                          "nproc_per_node": self.cfg.nproc_per_node, "nnodes": self.cfg.nnodes,
                          "wall_s": round(time.time() - t0, 1)})
        shutil.rmtree(job, ignore_errors=True)  # relayed already; a failed job's folder stays for reading
        return out

    def _abort(self, k: int) -> None:
        if self.store is not None:
            try:
                self.store.set(f"pmbench/abort/{k}", "1")
            except Exception:  # noqa: BLE001 - best effort: the followers also see node 0 go away
                pass

    def close(self, wait_s: float = 60.0) -> None:
        """Tell the followers there are no more jobs and wait (up to ``wait_s``) until they have read it."""
        if self.store is None:
            return
        self.store.set(f"pmbench/job/{self.n + 1}", json.dumps({"stop": True}))
        t0 = time.time()
        while time.time() - t0 < wait_s:
            if int(self.store.add("pmbench/stopped", 0)) >= self.cfg.nnodes - 1:
                break
            time.sleep(0.2)
        self.store = None


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def child_env(cfg: LaunchConfig, extra: dict) -> dict:
    """The ranks' environment: this one, the repository importable, the result/log paths, and one
    OpenMP thread share per rank unless OMP_NUM_THREADS is set (torchrun would print a banner and use 1)."""
    env = dict(os.environ)
    root = str(_repo_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc_per_node)))
    env.update(extra)
    return env


# --------------------------------------------------------------------------- nodes other than 0
def follow(cfg: LaunchConfig, stream=None, runner=None, connect_timeout_s: float = 1800.0,
           poll_s: float = 0.5) -> int:
    """A node with ``--node-rank`` > 0: start this node's ranks of every job node 0 publishes, until
    node 0 says it is done.  Returns 0, or 1 when node 0 disappears or disagrees on the layout."""
    stream = stream or sys.stderr
    runner = runner or run_process
    host, port = cfg.control_address()

    def note(msg):
        stream.write(f"[run_all] node {cfg.node_rank}: {msg}\n")
        stream.flush()

    note(f"following node 0 (job store {host}:{port}); this node runs its {cfg.nproc_per_node} rank(s) of every "
         "torchrun job and writes no reports")
    try:
        store = _store(host, port, False, connect_timeout_s)
        hello = json.loads(store.get("pmbench/hello"))
    except Exception as e:  # noqa: BLE001 - unreachable node 0: one clear line
        note(f"cannot reach node 0's job store at {host}:{port} ({e}); start node 0 with the same --master-addr/"
             "--master-port (or --rdzv-endpoint) and check that the port and the next one are open")
        return 1
    for key in ("nproc_per_node", "nnodes"):
        if hello.get(key) != getattr(cfg, key):
            note(f"node 0 runs with {key} = {hello.get(key)}, this node with {getattr(cfg, key)}: give every node "
                 "the same --nproc and --nnodes")
            store.add("pmbench/stopped", 1)
            return 1
    k = 1
    cwd = _repo_root()
    while True:
        key = f"pmbench/job/{k}"
        try:
            while not _has(store, key):
                time.sleep(poll_s)
            job = json.loads(store.get(key))
        except Exception as e:  # noqa: BLE001 - node 0 ended (or crashed) without saying so
            note(f"lost node 0's job store ({e}); stopping")
            return 1
        if job.get("stop"):
            store.add("pmbench/stopped", 1)
            note("node 0 is done")
            return 0
        argv = cfg.command(job["args"], job["job_id"])
        note(f"torchrun job {k}: {job.get('label', job['args'][0])}")
        Path(job["env"][RANK_LOG_ENV]).mkdir(parents=True, exist_ok=True)
        out_dir = Path(job["env"][RANK_LOG_ENV]).parent

        def abort(k=k):
            try:
                return "node 0 stopped this job" if _has(store, f"pmbench/abort/{k}") else None
            except Exception:  # noqa: BLE001
                return "lost node 0's job store"

        try:
            rc, tail, reason = runner(argv, env=child_env(cfg, job["env"]), cwd=cwd, stream=stream,
                                      stdout_path=out_dir / f"stdout.node{cfg.node_rank}.log",
                                      stderr_path=out_dir / f"stderr.node{cfg.node_rank}.log", abort=abort)
        except BaseException as e:  # Ctrl-C here: node 0's ranks would wait for ours until a timeout
            why = "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
            try:
                store.set(f"pmbench/fail/{k}/{cfg.node_rank}", f"node {cfg.node_rank} {why}")
            except Exception:  # noqa: BLE001
                pass
            raise
        if rc != 0 and not reason:
            msg = str(failure(job.get("label", ""), argv, rc, tail, Path(job["env"][RANK_LOG_ENV])))
            note(msg)
            try:
                store.set(f"pmbench/fail/{k}/{cfg.node_rank}", msg)
            except Exception:  # noqa: BLE001
                pass
        k += 1
