"""Output paths: checked before any compute, written without touching what the suite did not create.

Two kinds of output:

* a **file** (``--out model.pt``, ``--log run.jsonl``): :func:`check_out_file` runs before any work
  and fails with a :class:`~bench.core.reducer.ConfigError` (one line, exit code 2) when the path names a
  directory, its parent is a file, or the folder is not writable.  Writers then go through a
  per-process temporary file beside the target (:func:`temp_file`), removed on every exit path; a
  temporary left by a killed process (same name pattern, process gone) is removed on the next write.
* a **folder** made by a generator (the proxy data sets): :func:`build_dir` writes into a fresh
  temporary folder (created here, so ours) and renames it into place only if the target is absent,
  an empty folder, or a complete earlier output of the same generator, recognised by its manifest
  file, and holding nothing but that generator's files.  Anything else is an error and nothing is
  deleted.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

from bench.core.reducer import ConfigError

_TMP_SUFFIX = ".pmbench-tmp"  # our temporary folders: .<name>.<random>.pmbench-tmp
_OWNER_FILE = ".pmbench-partial"  # written first into each temporary folder: {"pid": ...}


# --------------------------------------------------------------------------- checks
def _existing_ancestor(p: Path) -> Path:
    a = p
    while not a.exists() and a != a.parent:
        a = a.parent
    return a


def _check_parent_writable(p: Path, flag: str) -> None:
    anc = _existing_ancestor(p.parent)
    if not anc.is_dir():
        raise ConfigError(f"{flag} {p}: {anc} is a file, not a folder; choose another path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {p}: the folder {anc} is not writable; choose another path")


def check_out_file(path, flag: str = "--out") -> Optional[Path]:
    """Validate an output *file* path before any compute (None passes through).

    The parent folder may not exist yet (it is created when the file is written) but must be
    creatable; an existing file must be writable; a directory is refused."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if str(path).strip() == "" or str(path).endswith(os.sep):
        raise ConfigError(f"{flag} {str(path)!r} is not a file name; give a file path such as run/model.pt")
    if p.is_dir():
        raise ConfigError(f"{flag} {p} is a directory; give a file path inside it, e.g. {p / 'model.pt'}")
    if p.exists() and not os.access(p, os.W_OK):
        raise ConfigError(f"{flag} {p} exists and is not writable; choose another path")
    _check_parent_writable(p, flag)
    return p


def check_out_dir(path, flag: str = "--out", *, manifest: Optional[str] = None) -> Optional[Path]:
    """Validate an output *folder* of a generator before any compute: absent (its parent creatable),
    an empty folder, or a folder holding the generator's ``manifest`` file."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {p} is a file, not a folder; choose a new folder name")
    if p.is_dir():
        if manifest is not None and not (p / manifest).is_file() and any(p.iterdir()):
            raise ConfigError(f"{flag} {p} already holds files this command did not write (no {manifest}); "
                              "nothing was changed: choose a new or empty folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {p} is not writable; choose another folder")
    _check_parent_writable(p, flag)
    return p


def positive(value, flag: str, *, allow_none: bool = True, kind: str = "int"):
    """``value`` >= 1 (a count); a ConfigError otherwise.  None passes when ``allow_none``."""
    if value is None:
        if allow_none:
            return None
        raise ConfigError(f"{flag} is required")
    if kind == "int":
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ConfigError(f"{flag} must be a whole number >= 1, got {value}")
    else:
        import math

        if not math.isfinite(float(value)) or value <= 0:
            raise ConfigError(f"{flag} must be a finite number > 0, got {value}")
    return value


def finite(value, flag: str, *, low: Optional[float] = None, low_open: bool = False, high: Optional[float] = None):
    """A finite float within [low, high] (``low_open``: (low, high]); None passes."""
    import math

    if value is None:
        return None
    v = float(value)
    bad = not math.isfinite(v) or (low is not None and (v <= low if low_open else v < low)) \
        or (high is not None and v > high)
    if bad:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        rng = " and ".join(s for s in (lo, hi) if s) or "finite"
        raise ConfigError(f"{flag} must be a finite number {rng}, got {value}")
    return value


# --------------------------------------------------------------------------- temporary files
def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(target: Path) -> None:
    """Remove ``<target>.tmp<pid>`` files whose writing process is gone (a killed save)."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    pat = re.compile(re.escape(target.name) + r"\.tmp(\d+)$")
    for q in parent.iterdir():
        m = pat.match(q.name)
        if m and q.is_file() and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                q.unlink()


@contextlib.contextmanager
def exclusive_lock(lock_path) -> Iterator[None]:
    """``with exclusive_lock(path):``: an exclusive advisory file lock, so of several processes that
    would create the same output (torchrun ranks, parallel test workers, two users of one cache) one
    creates it while the others wait, then find it made."""
    import fcntl

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def temp_file(target) -> Iterator[Path]:
    """``with temp_file(path) as tmp: write(tmp)``: ``tmp`` replaces ``path`` atomically on success
    and is removed on every other exit path (exception, Ctrl-C)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        raise ConfigError(f"{target} is a directory; cannot write a file there")
    remove_stale_temps(target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# --------------------------------------------------------------------------- generated folders
def _read_manifest(d: Path, manifest: str) -> Optional[dict]:
    try:
        m = json.loads((d / manifest).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def _only_generated(d: Path, allowed: Callable[[str], bool]) -> list[str]:
    """Relative paths under ``d`` that the generator does not write (empty: all ours)."""
    foreign = []
    for root, dirs, files in os.walk(d):
        for name in files + [x for x in dirs if os.path.islink(os.path.join(root, x))]:
            rel = os.path.relpath(os.path.join(root, name), d)
            if not allowed(rel):
                foreign.append(rel)
                if len(foreign) >= 5:
                    return foreign
    return foreign


def _clean_stale_dirs(out: Path) -> None:
    """Remove our temporary folders for ``out`` left by killed processes (owner file, process gone)."""
    parent = out.parent
    if not parent.is_dir():
        return
    prefix = f".{out.name}."
    for q in parent.iterdir():
        if not (q.name.startswith(prefix) and q.name.endswith(_TMP_SUFFIX) and q.is_dir() and not q.is_symlink()):
            continue
        owner = _read_manifest(q, _OWNER_FILE)
        if owner is None or not isinstance(owner.get("pid"), int) or _pid_alive(owner["pid"]):
            continue
        shutil.rmtree(q, ignore_errors=True)


def build_dir(out, build: Callable[[Path], None], *, manifest: str, is_ours: Callable[[dict], bool],
              allowed: Callable[[str], bool], flag: str = "--out", partial_ok: bool = False) -> Path:
    """Run ``build(tmp)`` in a fresh temporary folder beside ``out`` (it must write ``manifest``),
    then move it to ``out``.

    ``out`` may be absent, an empty folder, or an earlier output of the same generator: its
    ``manifest`` parses and ``is_ours(manifest)`` holds, and every file under it satisfies
    ``allowed(relative_path)``; that earlier output is replaced.  Anything else raises a
    ConfigError before any work and nothing is deleted.  The temporary folder is removed on
    every exit path.  ``partial_ok`` (only for the suite's own cache folders) also replaces a
    folder without manifest that holds nothing but generated files (an interrupted older run)."""
    out = Path(out).expanduser()
    check_out_dir(out, flag)

    def replaceable() -> bool:
        if not out.exists():
            return True
        if not out.is_dir() or out.is_symlink():
            return False
        if not any(out.iterdir()):
            return True
        m = _read_manifest(out, manifest)
        if (m is None and not partial_ok) or (m is not None and not is_ours(m)):
            return False
        return not _only_generated(out, lambda rel: rel == manifest or allowed(rel))

    def refuse():
        foreign = _only_generated(out, lambda rel: rel == manifest or allowed(rel)) if out.is_dir() else []
        what = f" (e.g. {', '.join(foreign[:3])})" if foreign else ""
        raise ConfigError(f"{flag} {out} already holds files this generator did not write{what}; "
                          "nothing was changed: choose a new or empty folder, or remove them yourself")

    if not replaceable():
        refuse()
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_dirs(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=_TMP_SUFFIX, dir=out.parent))
    old = None
    try:
        um = os.umask(0)
        os.umask(um)
        os.chmod(tmp, 0o777 & ~um)  # mkdtemp makes it private; the result gets the usual mode
        (tmp / _OWNER_FILE).write_text(json.dumps({"pid": os.getpid()}))
        build(tmp)
        if not (tmp / manifest).is_file():
            raise RuntimeError(f"generator did not write its manifest {manifest}")
        (tmp / _OWNER_FILE).unlink()
        for _attempt in range(3):  # another process may place its own output meanwhile
            if not replaceable():
                refuse()
            try:
                if out.exists() and any(out.iterdir()):
                    old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old{_TMP_SUFFIX}")
                    os.rename(out, old)
                elif out.exists():
                    out.rmdir()  # empty: a folder cannot be renamed onto it everywhere
            except (FileNotFoundError, OSError):
                old = None
                continue
            try:
                os.rename(tmp, out)
                break
            except OSError as e:
                if old is not None:
                    with contextlib.suppress(OSError):
                        os.rename(old, out)
                    old = None if not old.exists() else old
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        else:
            refuse()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out
