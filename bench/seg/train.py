"""Segmenter training / fine-tuning through mmengine's Runner; the cached proxy Segmenter.

Launchers:

* CPU or one GPU, single process: ``Runner.from_cfg(cfg).train()`` as mmseg's ``tools/train.py``;
* ``torchrun`` (``WORLD_SIZE`` > 1): on CUDA mmengine's own ``pytorch`` launcher; on CPU torch
  the two workarounds of docs/environment.md §2: the gloo process group is created here
  before the Runner (mmengine's ``init_dist`` calls ``torch.cuda.set_device``), and the DDP
  wrapper gets ``device_ids=None`` (mmengine passes the local rank, which CPU DDP rejects).

Every run ends by writing a clean checkpoint (``state_dict`` + ``meta`` only), which loads
under torch's ``weights_only`` default, unlike the Runner's own checkpoints.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from bench.core.reducer import ConfigError
from bench.runtime import env, shipped

from bench.seg import configs as segconfigs
from bench.seg.checkpoint import save_clean

PROXY_VERSION = 1


def _setup_distributed(cfg) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        cfg.launcher = "none"
        return 1
    cfg.launcher = "pytorch"
    if not torch.cuda.is_available():
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)
        cfg.env_cfg = dict(cfg.get("env_cfg", {}), dist_cfg=dict(backend="gloo"))
    return world


@dataclass
class SegTrainConfig:
    """The options of :func:`train_segmenter`: ``reducer`` / ``data`` (as for ``seg_eval``);
    ``load_from``: weights to fine-tune from (any supported layout; ``trust`` allows pickled ones);
    ``max_iters``: shorten the config's schedule proportionally; ``work_dir`` (default
    ``.cache/seg/work/<out stem>``); ``seed``; ``cfg_options``: merged into the mmengine config."""
    reducer: Optional[str] = None
    data: Optional[str] = None
    load_from: Optional[Union[str, Path]] = None
    max_iters: Optional[int] = None
    work_dir: Optional[Union[str, Path]] = None
    seed: int = 0
    trust: bool = False
    cfg_options: Optional[dict] = None


def train_segmenter(config, out: Path, opts: Optional[SegTrainConfig] = None, **overrides) -> dict:
    """Train (or fine-tune from ``load_from``) and save a clean checkpoint at ``out``; ``opts``: a
    :class:`SegTrainConfig` (keyword ``overrides`` name its fields)."""
    from mmengine.runner import Runner

    o = dataclasses.replace(opts or SegTrainConfig(), **overrides)
    reducer, data, load_from, max_iters, work_dir = o.reducer, o.data, o.load_from, o.max_iters, o.work_dir
    seed, trust, cfg_options = o.seed, o.trust, o.cfg_options
    work_dir = Path(work_dir or env.ROOT / ".cache" / "seg" / "work" / Path(out).stem)
    cfg = segconfigs.build_config(config, reducer, data, work_dir=str(work_dir), splits=("training", "validation"))
    if max_iters is not None:  # shorten the schedule proportionally
        f = int(max_iters) / cfg.train_cfg.max_iters
        cfg.train_cfg.max_iters = int(max_iters)
        cfg.train_cfg.val_interval = int(max_iters)
        for s in cfg.get("param_scheduler", []):
            s["begin"] = int(s.get("begin", 0) * f)
            s["end"] = max(s["begin"] + 1, int(s.get("end", max_iters / f) * f))
            if "T_max" in s:
                s["T_max"] = s["end"] - s["begin"]
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.randomness = dict(seed=seed, deterministic=False)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=10**9, save_last=False)
    if load_from is not None:
        cfg.model.pretrained = None  # the checkpoint replaces the ImageNet-pretrained backbone
        cfg.model.backbone.pretrained = None
        # Runner.train() initialises the weights and then loads ``cfg.load_from``; give it a clean
        # copy (any supported layout, converted; loads under weights_only)
        from bench.seg.checkpoint import load_weights, model_state

        clean = work_dir / "init_weights.pth"
        clean.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": dict(model_state(load_weights(load_from, trust=trust))), "meta": {}}, clean)
        cfg.load_from = str(clean)
    world = _setup_distributed(cfg)
    runner = Runner.from_cfg(cfg)
    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    t0 = time.perf_counter()
    runner.train()
    train_s = time.perf_counter() - t0
    metrics = {}
    if runner.val_loop is not None and hasattr(runner, "message_hub"):
        for k in ("mIoU", "aAcc"):
            v = runner.message_hub.get_scalar(f"val/{k}") if f"val/{k}" in runner.message_hub.log_scalars else None
            if v is not None:
                metrics[k] = float(v.current())
    meta = {"dataset_meta": getattr(model, "dataset_meta", None) or runner.train_dataloader.dataset.metainfo,
            "config": str(config), "reducer": cfg.model.backbone.reducer, "train_seconds": round(train_s, 1),
            "max_iters": int(cfg.train_cfg.max_iters), "world_size": world, "val": metrics,
            "stamp": _plain(env.stamp("cuda" if torch.cuda.is_available() else "cpu"))}
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        meta = _plain(meta)
        save_clean(model, out, meta)
        Path(str(out) + ".json").write_text(json.dumps(_plain(meta), indent=1, default=str))
    return meta


def _plain(o):
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, str):
        return str(o)  # e.g. torch's TorchVersion, which weights_only loading refuses
    return o


SMOKE_ITERS = 30  # the smoke profile's proxy Segmenter: a pipeline check, not a model


def proxy_key(size: str = "default") -> str:
    """What the proxy Segmenter of ``size`` is trained from: the proxy config's text, the proxy set's
    size and :data:`PROXY_VERSION` (bumped when the proxy segmentation set changes)."""
    cfg_text = segconfigs.config_path("proxy").read_text()
    return hashlib.sha256(f"{PROXY_VERSION}\n{size}\n{cfg_text}".encode()).hexdigest()[:10]


def proxy_checkpoint_path(size: str = "default") -> Path:
    tag = "" if size == "default" else f"-{size}"
    return env.ROOT / ".cache" / "seg" / f"proxy_segmenter{tag}-{proxy_key(size)}.pth"


# The default proxy Segmenter ships in the package like the proxy backbone (docs/proxy.md, "Shipped
# weights"): training it took about 3 of the default run's minutes on 2 CPU cores.  The manifest entry
# holds the file's SHA-256, the proxy_key it was trained for (a changed config or data version has no
# shipped weights and trains), the training metadata and the command that re-creates it.
SHIPPED_MANIFEST = shipped.SHIPPED_DIR / "proxy_segmenter.json"
RETRAIN_COMMAND = "pmbench seg-train --config proxy --force"


def shipped_segmenter_entry() -> Optional[dict]:
    """The manifest entry of the shipped default proxy Segmenter if it fits the current config and
    data version, else None."""
    return shipped.manifest_entry(SHIPPED_MANIFEST, "default", key=proxy_key("default"))


def _install_shipped(entry: dict, out: Path) -> None:
    """The shipped weights (SHA-256 checked) as the cached clean checkpoint ``out`` and its ``.json``."""
    from safetensors.torch import load_file

    from bench.runtime.results import atomic_write_json

    f = shipped.verified_file(entry, SHIPPED_MANIFEST, "proxy Segmenter weights",
                              f"`{RETRAIN_COMMAND}` or `./run_all.sh --retrain-proxy`")
    meta = {**entry["meta"], "origin": "shipped", "file": entry["file"], "sha256": entry["sha256"]}
    save_clean(load_file(str(f)), out, meta)
    atomic_write_json(Path(str(out) + ".json"), meta)


def ensure_proxy_segmenter(force: bool = False, max_iters: Optional[int] = None, size: str = "default",
                           log=print) -> Path:
    """The proxy Segmenter's clean checkpoint: the cached one, else (default size, full schedule) the
    shipped weights, else trained (a few CPU minutes).

    Cached under ``.cache/seg/`` keyed by :func:`proxy_key` (``default``: the full schedule on the
    default set; ``smoke``: 30 iterations on the smoke set); ``force`` retrains.  Training metadata
    (time, val mIoU, stamp; ``origin: shipped`` for the shipped weights) sits next to it in ``<file>.json``.
    """
    from bench.seg.proxy_data import SIZES

    if size not in SIZES:
        raise ConfigError(f"unknown proxy size '{size}'; available: {', '.join(SIZES)}")
    if max_iters is None and size != "default":
        max_iters = SMOKE_ITERS
    out = proxy_checkpoint_path(size)
    if max_iters is not None and size == "default":
        out = out.with_name(out.stem + f"-it{max_iters}.pth")
    if out.exists() and not force:
        return out
    from bench.runtime.outputs import exclusive_lock

    # one process installs or trains it; others that need it at the same time (parallel test
    # workers, two runs sharing the cache) wait here and then reuse it
    with exclusive_lock(out.with_name(f".{out.name}.lock")):
        if out.exists() and not force:  # made by another process while we waited
            return out
        entry = shipped_segmenter_entry() if size == "default" and max_iters is None and not force else None
        if entry is not None:
            _install_shipped(entry, out)
            if log:
                log(f"[seg] proxy Segmenter: the shipped weights ({entry['file']}, sha256 {entry['sha256'][:12]}, "
                    f"val mIoU {entry['meta']['val'].get('mIoU', float('nan')):.1f})")
            return out
        if log:
            log(f"[seg] training the proxy Segmenter -> {out} (first use; a few minutes on a CPU)")
        data = "proxy" if size == "default" else f"proxy:{size}"
        meta = train_segmenter("proxy", out, SegTrainConfig(data=data, max_iters=max_iters))
        if log:
            log(f"[seg] proxy Segmenter trained in {meta['train_seconds']:.0f} s; val {meta['val']}")
    return out


def origin_line(checkpoint: Path) -> str:
    """Where a proxy Segmenter checkpoint came from, for table headers (from its ``.json``)."""
    try:
        meta = json.loads(Path(str(checkpoint) + ".json").read_text())
    except (OSError, ValueError):
        return f"{Path(checkpoint).name} (no training record)"
    miou = (meta.get("val") or {}).get("mIoU")
    acc = "" if miou is None else f", val mIoU {miou:.1f}"
    if meta.get("origin") == "shipped":
        return (f"shipped weights {meta.get('file')} (sha256 {str(meta.get('sha256'))[:12]}{acc} when shipped; "
                "`--retrain-proxy` re-creates them)")
    return f"trained by this suite ({meta.get('max_iters')} iterations in {meta.get('train_seconds')} s{acc})"


def proxy_training_info(size: str = "default") -> dict:
    p = Path(str(proxy_checkpoint_path(size)) + ".json")
    if not p.exists():
        raise ConfigError("the proxy Segmenter has not been trained yet (pmbench seg-train)")
    return json.loads(p.read_text())
