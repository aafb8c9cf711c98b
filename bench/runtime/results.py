"""Resumable result cache: one JSON file per measured configuration, written atomically.

A configuration is identified by its full description (model, reducer spec
with every option, checkpoint hash, data, precision, batch size, device,
library versions ...).  The cache key is a hash of that description, so a
re-run skips everything already measured, a changed description re-measures,
and an interrupted run (Ctrl-C) loses nothing that was written: each file is
written to a temporary name and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
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


class ResultCache:
    def __init__(self, root: Path | str, force: bool = False):
        self.root = Path(root)
        self.force = force
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, desc: dict) -> Path:
        return self.root / f"{desc.get('kind', 'result')}-{describe_key(desc)}.json"

    def get(self, desc: dict) -> Optional[dict]:
        if self.force:
            return None
        p = self.path(desc)
        if not p.exists():
            return None
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a damaged file is re-measured
        return rec if rec.get("desc") == json.loads(json.dumps(desc, default=str)) else None

    def put(self, desc: dict, result: dict) -> dict:
        rec = {"desc": desc, "result": result}
        atomic_write_json(self.path(desc), rec)
        return rec

    def get_or_run(self, desc: dict, fn: Callable[[], dict]) -> tuple[dict, bool]:
        """(record, cached?)"""
        rec = self.get(desc)
        if rec is not None:
            return rec, True
        return self.put(desc, fn()), False
