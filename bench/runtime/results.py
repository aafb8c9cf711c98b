"""Resumable result cache: one JSON file per measured configuration, written atomically.

A configuration is identified by its full description (model, reducer spec
with every option, checkpoint hash, data, precision, batch size, device,
library versions ...).  The cache key is a hash of that description, so a
re-run skips everything already measured, a changed description re-measures,
and an interrupted run (Ctrl-C) loses nothing that was written: each file is
written to a temporary name and renamed into place.

Parallel job workers (``./run_all.sh --job-workers N``, :mod:`bench.pipeline.workers`): several
processes of one run walk the same job list and share one cache.  Each job is claimed by the first
worker that reaches it (a file created with ``O_EXCL`` in the run's claim folder); another worker
skips it (:class:`JobTaken`), or, for a job whose result it needs to go on (``wait=True``, e.g. a
calibrated structure), waits for it.  Every record says which run (``run_id``) and which worker
made it, so the run's own pass over the stages takes what its workers measured, ``--force``
included, and counts it as measured in this run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
import time
from typing import Any, Callable, Optional


def atomic_write_text(path: Path | str, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def file_hash(path: Path | str, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def describe_key(desc: dict) -> str:
    blob = json.dumps(desc, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class JobTaken(RuntimeError):
    """A job worker skipped a job because another worker of the same run claimed it (or, for a job
    it waited for, because that worker failed); the run's own pass measures whatever is missing."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class ResultCache:
    """``run_id``: this run (records made in it are valid under ``force``); ``claims``: the claim
    folder shared by the run's job workers (set in a worker only); ``worker``: this worker's index."""

    def __init__(self, root: Path | str, force: bool = False, run_id: Optional[str] = None,
                 claims: Path | str | None = None, worker: Optional[int] = None, poll_s: float = 0.5):
        self.root = Path(root)
        self.force = force
        self.run_id = run_id
        self.claims = Path(claims) if claims is not None else None
        self.worker = worker
        self.poll_s = poll_s
        self._redo = False
        self.root.mkdir(parents=True, exist_ok=True)
        if self.claims is not None:
            self.claims.mkdir(parents=True, exist_ok=True)

    def path(self, desc: dict) -> Path:
        return self.root / f"{desc.get('kind', 'result')}-{describe_key(desc)}.json"

    @contextlib.contextmanager
    def remeasure(self):
        """Jobs run inside re-measure whatever the cache holds (e.g. a result whose checkpoint file is gone)."""
        self._redo, before = True, self._redo
        try:
            yield
        finally:
            self._redo = before

    def get(self, desc: dict) -> Optional[dict]:
        p = self.path(desc)
        if self._redo or not p.exists():
            return None
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a damaged file is re-measured
        if rec.get("desc") != json.loads(json.dumps(desc, default=str)):
            return None
        if self.force and (self.run_id is None or rec.get("run_id") != self.run_id):
            return None  # --force: only what this very run measured (its workers included)
        return rec

    def made_by_worker(self, rec: dict) -> bool:
        """Whether ``rec`` was measured by a job worker of this run (not taken from an earlier run)."""
        return self.run_id is not None and rec.get("run_id") == self.run_id and rec.get("worker") is not None

    def put(self, desc: dict, result: dict, wall_s: Optional[float] = None) -> dict:
        rec = {"desc": desc, "result": result}
        if self.run_id is not None:
            rec["run_id"] = self.run_id
        if self.worker is not None:
            rec["worker"] = self.worker
        if wall_s is not None:
            rec["wall_s"] = round(wall_s, 2)
        atomic_write_json(self.path(desc), rec)
        return rec

    # -- claims (job workers) -------------------------------------------------------------------
    def _claim_path(self, desc: dict) -> Path:
        return self.claims / (self.path(desc).stem + ".claim")

    def _claim(self, desc: dict) -> bool:
        try:
            fd = os.open(self._claim_path(desc), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:  # this worker's own claim (a job it measures again, e.g. a checkpoint file went missing)
                return self._claim_path(desc).read_text().strip() == self._owner()
            except OSError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(self._owner())
        return True

    def _owner(self) -> str:
        return f"{os.getpid()}:{self.worker}"

    def _wait(self, desc: dict) -> dict:
        """The record another worker is measuring, once it is written; :class:`JobTaken` if that worker
        failed or died first."""
        claim = self._claim_path(desc)
        while True:
            rec = self.get(desc)
            if rec is not None:
                return rec
            try:
                owner = claim.read_text().strip()
            except OSError:
                owner = ""
            pid = owner.split(":")[0]
            if owner == "failed" or (pid.isdigit() and not _pid_alive(int(pid))):
                raise JobTaken(f"{desc.get('kind', 'job')}: the worker that claimed it failed")
            time.sleep(self.poll_s)

    def get_or_run(self, desc: dict, fn: Callable[[], dict], wait: bool = False) -> tuple[dict, bool]:
        """(record, cached?).  In a job worker a job another worker claimed raises :class:`JobTaken`,
        or with ``wait`` returns that worker's record once written."""
        rec = self.get(desc)
        if rec is not None:
            return rec, True
        if self.claims is not None and not self._claim(desc):
            if not wait:
                raise JobTaken(f"{desc.get('kind', 'job')}: measured by another job worker")
            return self._wait(desc), True
        t0 = time.time()
        try:
            result = fn()
        except BaseException:
            if self.claims is not None:  # a worker waiting for it stops waiting
                atomic_write_text(self._claim_path(desc), "failed")
            raise
        return self.put(desc, result, wall_s=time.time() - t0), False
