"""Install a plug-in fixture package the way pip would, without network or build step (tests only)."""
from __future__ import annotations

import shutil
import tomllib
from pathlib import Path


def install(fixture: Path, target: Path) -> Path:
    """The fixture's modules plus a ``*.dist-info`` with its entry points (what pip would write)."""
    meta = tomllib.loads((fixture / "pyproject.toml").read_text())
    proj = meta["project"]
    target.mkdir(parents=True, exist_ok=True)
    for mod in meta["tool"]["setuptools"]["py-modules"]:
        shutil.copy(fixture / f"{mod}.py", target / f"{mod}.py")
    dist = target / f"{proj['name'].replace('-', '_')}-{proj['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {proj['name']}\nVersion: {proj['version']}\n")
    lines = []
    for group, eps in proj["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in eps.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return target
