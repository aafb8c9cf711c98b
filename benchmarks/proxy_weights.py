"""Ship the proxy backbone's or the proxy Segmenter's weights, or check that retraining reproduces them.

The default profile loads the proxy backbone and the proxy Segmenter from ``bench/data_files/``
(SHA-256 checked against ``proxy_backbone.json`` / ``proxy_segmenter.json``) instead of training them on
every fresh clone.  The backbone is made by the suite's own trainer with the recipe in
``bench.runtime.proxy.SIZES``, the Segmenter by ``pmbench seg-train --config proxy`` (mmengine's Runner, the
proxy config); this script is how they were shipped and how anyone re-checks them::

    python benchmarks/proxy_weights.py ship                 # train with the recipe, evaluate, write the
                                                            # .safetensors and its manifest entry
    python benchmarks/proxy_weights.py ship --checkpoint C  # ship an already trained pmbench checkpoint
                                                            # (it must have been trained with the recipe)
    python benchmarks/proxy_weights.py check                # retrain into a temporary folder; exit 1 if its
                                                            # val top-1 is more than --tolerance points from
                                                            # the shipped weights'
    python benchmarks/proxy_weights.py ship --what segmenter [--checkpoint C]   # the same for the Segmenter
    python benchmarks/proxy_weights.py check --what segmenter                   # (val mIoU; ~3 min)

Not a unit test: training takes tens of minutes on 2 CPU cores.  ``./run_all.sh --retrain-proxy``
retrains both inside a run instead (and then uses the retrained weights for every table).
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
        name = f"proxy_backbone-v{proxy.data_version(size)}-{size}.safetensors"
        dest = proxy_backbone.SHIPPED_DIR / name
        save_file(sd, str(dest), metadata={"recipe": proxy.SIZES[size].recipe(),
                                           "data_version": str(proxy.data_version(size))})
    try:
        manifest = json.loads(proxy_backbone.SHIPPED_MANIFEST.read_text())
    except (OSError, ValueError):
        manifest = {}
    st = env.stamp("cpu")
    cmd = proxy_backbone.train_command(size, Path("OUT.pt"))
    manifest[size] = {
        "file": name, "sha256": file_hash(dest, n=64), "data_version": proxy.data_version(size),
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
                         f"and data version {proxy.data_version(args.size)}: run `python benchmarks/proxy_weights.py ship` first")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "backbone.pt"
        seconds = train(args.size, ckpt)
        ev = val_top1(ckpt, args.size)
    diff = ev["top1"] - e["val_top1"]
    ok = abs(diff) <= args.tolerance
    print(f"shipped {e['val_top1']:.2f}%  retrained {ev['top1']:.2f}%  difference {diff:+.2f} points "
          f"(tolerance {args.tolerance}); training took {seconds / 60:.1f} min: {'OK' if ok else 'NOT REPRODUCED'}")
    return 0 if ok else 1


def ship_segmenter(args) -> int:
    """Train the default proxy Segmenter (or take --checkpoint, a clean checkpoint with its ``.json``) and
    write its safetensors and manifest entry."""
    from safetensors.torch import save_file

    from bench.seg import train as segtrain
    from bench.seg.checkpoint import load_weights, model_state

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "segmenter.pth"
        if not args.checkpoint:
            segtrain.train_segmenter("proxy", ckpt, segtrain.SegTrainConfig(data="proxy"))
        meta = json.loads(Path(str(ckpt) + ".json").read_text())
        if meta.get("origin") == "shipped" or meta.get("config") != "proxy" or meta.get("reducer") not in (None, "none"):
            raise SystemExit(f"{ckpt} is not an unreduced proxy Segmenter trained by this suite: {meta.get('config')}, "
                             f"reducer {meta.get('reducer')}, origin {meta.get('origin', 'trained')}")
        sd = {k: v.contiguous() for k, v in model_state(load_weights(ckpt)).items()}
        name = f"proxy_segmenter-v{segtrain.PROXY_VERSION}-default.safetensors"
        dest = segtrain.SHIPPED_MANIFEST.parent / name
        save_file(sd, str(dest), metadata={"key": segtrain.proxy_key("default")})
    entry = {"file": name, "sha256": file_hash(dest, n=64), "key": segtrain.proxy_key("default"),
             "command": segtrain.RETRAIN_COMMAND, "val_miou": round(meta["val"]["mIoU"], 2),
             "train_seconds": meta.get("train_seconds"), "meta": meta}
    atomic_write_json(segtrain.SHIPPED_MANIFEST, {"default": entry})
    print(json.dumps({k: v for k, v in entry.items() if k != "meta"}, indent=1))
    return 0


def check_segmenter(args) -> int:
    from bench.seg import train as segtrain

    e = segtrain.shipped_segmenter_entry()
    if e is None:
        raise SystemExit("no shipped proxy Segmenter for the current config and data version (key "
                         f"{segtrain.proxy_key('default')}): run `python benchmarks/proxy_weights.py ship --what segmenter`")
    with tempfile.TemporaryDirectory() as tmp:
        meta = segtrain.train_segmenter("proxy", Path(tmp) / "segmenter.pth", segtrain.SegTrainConfig(data="proxy"))
    got = meta["val"]["mIoU"]
    diff = got - e["val_miou"]
    ok = abs(diff) <= args.tolerance
    print(f"shipped val mIoU {e['val_miou']:.2f}  retrained {got:.2f}  difference {diff:+.2f} points "
          f"(tolerance {args.tolerance}); training took {meta['train_seconds'] / 60:.1f} min: "
          f"{'OK' if ok else 'NOT REPRODUCED'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ship", help="train (or take --checkpoint), evaluate, write the weights and the manifest")
    s.add_argument("--checkpoint", default=None, help="a checkpoint trained with the recipe (default: train one now)")
    s.add_argument("--train-seconds", type=float, default=None, help="with --checkpoint: how long its training took")
    c = sub.add_parser("check", help="retrain and compare val top-1 (mIoU) with the shipped weights")
    c.add_argument("--tolerance", type=float, default=1.0)
    for q in (s, c):
        q.add_argument("--what", default="backbone", choices=["backbone", "segmenter"])
        q.add_argument("--size", default="default", choices=sorted(proxy.SIZES), help="backbone only")
    a = p.parse_args(argv)
    if a.what == "segmenter":
        return ship_segmenter(a) if a.cmd == "ship" else check_segmenter(a)
    return ship(a) if a.cmd == "ship" else check(a)


if __name__ == "__main__":
    sys.exit(main())
