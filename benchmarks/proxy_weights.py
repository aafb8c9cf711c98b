"""Ship the proxy backbone's weights, or check that retraining reproduces them (issue 13).

The default profile loads the proxy backbone from ``bench/data_files/`` (SHA-256 checked against
``proxy_backbone.json``) instead of training it for many minutes on every fresh clone.  The weights
are produced by the suite's own trainer with the recipe in ``bench.runtime.proxy.SIZES``; this script is
how they were made and how anyone re-checks them::

    python benchmarks/proxy_weights.py ship                 # train with the recipe, evaluate, write the
                                                            # .safetensors and its manifest entry
    python benchmarks/proxy_weights.py ship --checkpoint C  # ship an already trained pmbench checkpoint
                                                            # (it must have been trained with the recipe)
    python benchmarks/proxy_weights.py check                # retrain into a temporary folder; exit 1 if its
                                                            # val top-1 is more than --tolerance points from
                                                            # the shipped weights'

Not a unit test: training takes tens of minutes on 2 CPU cores.  ``./run_all.sh --retrain-proxy``
retrains inside a run instead (and then uses the retrained backbone for every table).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.runtime import env, proxy, proxy_backbone  # noqa: E402
from bench.runtime.results import atomic_write_json, file_hash  # noqa: E402


def _run_json(cmd: list[str]) -> dict:
    res = subprocess.run(cmd, cwd=str(ROOT), stdout=subprocess.PIPE, text=True)
    if res.returncode != 0:
        raise SystemExit(f"failed (exit {res.returncode}): {' '.join(cmd[2:])}")
    return json.loads(res.stdout)


def train(size: str, out: Path) -> float:
    """Train with the recipe of ``size`` into ``out``; returns the seconds it took."""
    proxy.ensure_proxy_data(size=size)
    cmd = proxy_backbone.train_command(size, out)
    print(f"training: {' '.join(cmd[2:])}", file=sys.stderr)
    t0 = time.time()
    _run_json(cmd)
    return time.time() - t0


def val_top1(ckpt: Path, size: str) -> dict:
    data = "proxy" if size == "default" else f"proxy:{size}"
    return _run_json([sys.executable, "-m", "bench.cli", "eval", "--checkpoint", str(ckpt), "--data", data,
                      "--no-progress", "--json"])


def ship(args) -> int:
    from safetensors.torch import save_file

    from bench.runtime.checkpoint import read_checkpoint, state_dict_of

    size = args.size
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "backbone.pt"
        seconds = args.train_seconds if args.checkpoint else train(size, ckpt)
        ev = val_top1(ckpt, size)
        sd = {k: v.contiguous() for k, v in state_dict_of(read_checkpoint(ckpt)).items()}
        name = f"proxy_backbone-v{proxy.DATA_VERSION}-{size}.safetensors"
        dest = proxy_backbone.SHIPPED_DIR / name
        save_file(sd, str(dest), metadata={"recipe": proxy.SIZES[size].recipe(),
                                           "data_version": str(proxy.DATA_VERSION)})
    try:
        manifest = json.loads(proxy_backbone.SHIPPED_MANIFEST.read_text())
    except (OSError, ValueError):
        manifest = {}
    st = env.stamp("cpu")
    cmd = proxy_backbone.train_command(size, Path("OUT.pt"))
    manifest[size] = {
        "file": name, "sha256": file_hash(dest, n=64), "data_version": proxy.DATA_VERSION,
        "recipe": proxy.SIZES[size].recipe(), "command": " ".join(["pmbench", *cmd[3:]]),
        "val_top1": round(ev["top1"], 2), "n_val": ev["n_images"], "train_seconds": seconds and round(seconds),
        "trained_on": st["device"], "torch": st["torch"], "timm": st["timm"], "commit": st["commit"], "date": st["date"],
    }
    atomic_write_json(proxy_backbone.SHIPPED_MANIFEST, manifest)
    print(json.dumps(manifest[size], indent=1))
    return 0


def check(args) -> int:
    e = proxy_backbone.shipped_entry(args.size)
    if e is None:
        raise SystemExit(f"no shipped weights for '{args.size}' with the current recipe ({proxy.SIZES[args.size].recipe()}) "
                         f"and data version {proxy.DATA_VERSION}: run `python benchmarks/proxy_weights.py ship` first")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "backbone.pt"
        seconds = train(args.size, ckpt)
        ev = val_top1(ckpt, args.size)
    diff = ev["top1"] - e["val_top1"]
    ok = abs(diff) <= args.tolerance
    print(f"shipped {e['val_top1']:.2f}%  retrained {ev['top1']:.2f}%  difference {diff:+.2f} points "
          f"(tolerance {args.tolerance}); training took {seconds / 60:.1f} min: {'OK' if ok else 'NOT REPRODUCED'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ship", help="train (or take --checkpoint), evaluate, write the weights and the manifest")
    s.add_argument("--checkpoint", default=None, help="a checkpoint trained with the recipe (default: train one now)")
    s.add_argument("--train-seconds", type=float, default=None, help="with --checkpoint: how long its training took")
    c = sub.add_parser("check", help="retrain and compare val top-1 with the shipped weights")
    c.add_argument("--tolerance", type=float, default=1.0)
    for q in (s, c):
        q.add_argument("--size", default="default", choices=sorted(proxy.SIZES))
    a = p.parse_args(argv)
    return ship(a) if a.cmd == "ship" else check(a)


if __name__ == "__main__":
    sys.exit(main())
