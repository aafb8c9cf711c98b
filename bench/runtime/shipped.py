"""Weights that ship inside the package (``bench/data_files/``): the proxy backbone and the proxy
Segmenter, each trained once by the suite's own code (docs/proxy.md, "Shipped weights").

A manifest (JSON) next to the files holds one entry per shipped file: its name, SHA-256, what it was
trained with (which the caller compares with the current recipe before using it), the command that
re-creates it and the accuracy it reached.  A file is used only after its SHA-256 matches; a missing or
altered file is refused with the two ways out (restore it from git, or retrain).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from bench.core.reducer import ConfigError
from bench.runtime.results import file_hash

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "data_files"


def manifest_entry(manifest: Path, name: str, **must_match) -> Optional[dict]:
    """Entry ``name`` of ``manifest`` if every ``must_match`` field equals the given value, else None
    (no manifest, no entry, or weights of another recipe / data version: the caller trains)."""
    try:
        e = json.loads(Path(manifest).read_text()).get(name)
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(e, dict) or any(e.get(k) != v for k, v in must_match.items()):
        return None
    return e


def verified_file(entry: dict, manifest: Path, what: str, retrain: str) -> Path:
    """The shipped file of ``entry`` (in ``manifest``'s folder) after its SHA-256 check.  ``what`` names
    the weights in the error; ``retrain`` says how to train them instead (markdown, e.g. a command in backticks)."""
    manifest = Path(manifest)
    f = manifest.parent / entry["file"]
    fixes = f"restore it with `git checkout -- bench/data_files/`, or retrain with {retrain}"
    if not f.is_file():
        raise ConfigError(f"the shipped {what} {f} are missing (the manifest {manifest.name} names them): {fixes}")
    got = file_hash(f, n=64)
    if got != entry["sha256"]:
        raise ConfigError(f"the shipped {what} {f} fail their SHA-256 check (manifest {entry['sha256'][:16]}..., "
                          f"file {got[:16]}...): the file is damaged or was replaced without updating "
                          f"{manifest.name}; {fixes}")
    return f
