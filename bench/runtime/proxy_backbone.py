"""The proxy backbone: the shipped weights (checked against their manifest), the cached checkpoint,
and the training that makes it when no shipped weights fit (``bench.runtime.proxy`` holds the task and the
model; this module the one trained model of it).

A fresh clone loads the shipped weights (``data_files/proxy_backbone.json`` names the file, its
SHA-256, the recipe and data version, and the ``pmbench train`` command that made it); a changed recipe
or data version, or ``--retrain-proxy``, trains the backbone in this process, exactly as that command
does (:func:`train_backbone`).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from bench.core import registry
from bench.core.reducer import ConfigError, ModelInfo
from bench.runtime import data as data_mod, distributed as dist, models, preprocess as pp, proxy, shipped
from bench.runtime.checkpoint import load_model, read_checkpoint, save_checkpoint
from bench.runtime.train import DataJob, TrainConfig, build_loaders, compose_config, run_extra, seed_everything, train
from bench.runtime.weights import load_file_weights


# --------------------------------------------------------------------------- backbone
def train_command(size: str = "default", out: Optional[Path] = None) -> list[str]:
    """The ``pmbench train`` command line equivalent to :func:`train_backbone` (recorded in the shipped
    manifest, so anyone can re-create the weights by hand)."""
    sz = proxy.SIZES[size]
    out = Path(out) if out is not None else proxy.backbone_path(size)
    return [sys.executable, "-m", "bench.cli", "train", "--model", proxy.PROXY_MODEL, "--reducer", "none",
            "--data", "proxy" if size == "default" else f"proxy:{size}",
            "--epochs", str(sz.epochs), "--batch-size", str(sz.batch_size), "--lr", str(sz.lr),
            "--warmup-epochs", f"{sz.warmup_epochs:g}", "--weight-decay", "0.05",
            "--label-smoothing", f"{sz.label_smoothing:g}",
            *(["--deep-supervision", ",".join(str(b) for b in sz.deep_supervision)] if sz.deep_supervision else []),
            "--out", str(out), "--json"]


# --------------------------------------------------------------------------- shipped weights
# The default backbone is trained once with train_command("default") and shipped in the package
# (docs/proxy.md, "Shipped weights"): a fresh clone loads it instead of training for minutes.  The
# manifest names the file, its SHA-256, the recipe and data version it was trained with, the command,
# and the validation top-1 it reached; `--retrain-proxy` re-creates it with the suite's own trainer.
SHIPPED_DIR = shipped.SHIPPED_DIR
SHIPPED_MANIFEST = SHIPPED_DIR / "proxy_backbone.json"


def shipped_entry(size: str = "default") -> Optional[dict]:
    """The manifest entry of the shipped weights for ``size`` if they were trained with the current
    data version and recipe, else None (then the backbone is trained)."""
    return shipped.manifest_entry(SHIPPED_MANIFEST, size, data_version=proxy.data_version(size),
                                  recipe=proxy.SIZES[size].recipe())


def load_shipped(entry: dict):
    """The shipped backbone as a model, after checking the file's SHA-256 against the manifest."""
    f = shipped.verified_file(entry, SHIPPED_MANIFEST, "proxy weights", "`./run_all.sh --retrain-proxy`")
    return load_file_weights(proxy.pmbench_proxy_vit(), f).eval()


def backbone_origin(path: Path) -> str:
    """``shipped`` or ``trained``: where the cached backbone came from (recorded in its checkpoint)."""
    return (read_checkpoint(path).get("extra") or {}).get("origin", "trained")


def ensure_backbone(force: bool = False, *, size: str = "default") -> Path:
    """Path of the proxy backbone checkpoint: the cached one, else the shipped weights (checked and
    converted once), else trained (:func:`train_backbone`).  ``force`` retrains (``--retrain-proxy``)."""
    proxy.check_task()
    path = proxy.backbone_path(size)
    if path.exists() and not force:
        return path
    with proxy.cache_lock(f"backbone-{size}"):
        if path.exists() and not force:  # made by another process while we waited
            return path
        entry = None if force else shipped_entry(size)
        if entry is not None:
            save_checkpoint(path, load_shipped(entry), extra={"origin": "shipped", "sha256": entry["sha256"],
                                                              "recipe": entry["recipe"]})
            print(f"[pmbench] proxy backbone: the shipped weights ({entry['file']}, sha256 "
                  f"{entry['sha256'][:12]}, val top-1 {entry['val_top1']:.1f}%)", file=sys.stderr)
            return path
        train_backbone(size, path)
    return path


def train_backbone(size: str, out: Path) -> dict:
    """Train the proxy backbone of ``size`` into the checkpoint ``out`` in this process: exactly what
    ``train_command(size, out)`` (``pmbench train``, the command the shipped manifest records) does,
    to the bit (tests/test_proxy_weights.py).  Returns the training history."""
    if dist.is_distributed():
        raise ConfigError("the proxy backbone is not cached and cannot be trained inside a multi-process job: "
                          "create it first in one process (`pmbench eval --data proxy`, or `./run_all.sh`)")
    cmd = train_command(size, out)
    print(f"[pmbench] training the proxy backbone (as `pmbench {' '.join(cmd[3:])}`)", file=sys.stderr)
    sz, data = proxy.SIZES[size], cmd[cmd.index("--data") + 1]
    proxy.ensure_proxy_data(size=size)
    seed_everything(TrainConfig().seed)  # before the model exists: its initial weights come from it
    model = models.create(proxy.PROXY_MODEL, num_classes=data_mod.describe_data(data)["num_classes"])
    labels = data_mod.resolve_labels(data_mod.data_root(data), model.num_classes, "auto")
    prep = pp.resolve(proxy.PROXY_MODEL, model)
    red = registry.build("none")
    recipe = {"epochs": sz.epochs, "batch_size": sz.batch_size, "lr": sz.lr, "warmup_epochs": sz.warmup_epochs,
              "weight_decay": 0.05, "label_smoothing": sz.label_smoothing, "deep_supervision": list(sz.deep_supervision)}
    cfg_d = compose_config(red, ModelInfo.from_model(model), None, recipe,
                           dict(device=None, ckpt_path=str(out), resume=False, progress=True))
    cfg_d["extra"] = run_extra(data_mod.describe_data(data, labels=labels), proxy.PROXY_MODEL, red, prep)
    cfg = TrainConfig.from_dict(cfg_d)
    train_loader, val_loader = build_loaders(DataJob(data, prep, labels), cfg)
    return train(model, train_loader, cfg, val_loader=val_loader)


def load_proxy_backbone(device="cpu", *, size: str = "default"):
    """The trained proxy backbone (unpatched, eval mode), training it first if needed."""
    model, _ = load_model(ensure_backbone(size=size), proxy.PROXY_MODEL, device=device)
    return model.eval()
