"""Segmenter configs: stock mmseg configs with ``PMBenchViT`` and one ``reducer`` option.

Config files live in ``bench/seg/configs/`` and inherit the stock
``segmenter_vit-{t,s,b}_mask_8xb1-160k_ade20k-512x512`` configs shipped inside mmseg
(``_base_ = ['mmseg::segmenter/...']``), replacing only the backbone type.  The
reducer is ``model.backbone.reducer`` (a spec string), so
``--cfg-options model.backbone.reducer=tome:r=13`` works with mmseg's own tools too.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

from bench.core import registry
from bench.core.reducer import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SHORT = {
    "vit-t": "segmenter_vit-t_pmbench_ade20k-512x512.py",
    "vit-s": "segmenter_vit-s_pmbench_ade20k-512x512.py",
    "vit-b": "segmenter_vit-b_pmbench_ade20k-512x512.py",
    "proxy": "segmenter_proxy.py",
}


def config_path(config) -> Path:
    """A short name (vit-t, vit-s, vit-b, proxy) or a config file path."""
    if str(config) in SHORT:
        return CONFIG_DIR / SHORT[str(config)]
    p = Path(config).expanduser()
    if not p.is_file():
        raise ConfigError(f"config '{config}' is neither a short name ({', '.join(SHORT)}) nor a file")
    return p


def load(config):
    """An mmengine Config (the stock mmseg base resolved), with our modules imported."""
    from mmengine.config import Config

    import bench.seg.backbone  # noqa: F401  (registers PMBenchViT)
    import bench.seg.data  # noqa: F401  (registers the proxy dataset)

    if hasattr(config, "model") and hasattr(config, "filename"):
        return config
    p = config_path(config).resolve()
    key = (str(p), p.stat().st_mtime_ns)
    if key not in _CACHE:  # parsing the mmseg base chain costs ~1 s; configs are deep-copied out
        _CACHE[key] = Config.fromfile(str(p))
    return copy.deepcopy(_CACHE[key])


_CACHE: dict = {}


def _datasets(cfg):
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        dl = cfg.get(key)
        if dl is not None and "dataset" in dl:
            yield key, dl.dataset


def build_config(config, reducer: Optional[str] = None, data: Optional[str] = None, *,
                 num_workers: int = 0, work_dir: Optional[str] = None, reducer_structure=None,
                 splits=("validation",)):
    """Config ``config`` with the reducer and dataset chosen.

    ``data``: ``proxy[:SIZE]`` or ``ade20k:PATH`` (validated: a bad path is a ConfigError
    naming the expected layout).  ``num_workers`` applies to every dataloader
    (0 = load in the main process, the sensible choice on a small CPU).
    """
    from bench.seg import data as segdata

    cfg = load(config)
    if cfg.model.backbone.get("type") != "PMBenchViT":
        raise ConfigError(f"config {config}: backbone type is {cfg.model.backbone.get('type')}, not PMBenchViT")
    if reducer is not None:
        red = registry.build(reducer)  # fail early on a bad spec
        cfg.model.backbone.reducer = red.spec()
    if reducer_structure is not None:
        cfg.model.backbone.reducer_structure = str(reducer_structure)
    if data is not None:
        kind, root = segdata.resolve(data, splits)
        n_cls = cfg.model.decode_head.num_classes
        want = len(segdata.proxy_data.CLASSES) if kind == "proxy" else 150
        if n_cls != want:
            raise ConfigError(
                f"config {config} predicts {n_cls} classes but --data {kind} has {want}; "
                f"use --config {'proxy' if kind == 'proxy' else 'vit-t/vit-s/vit-b'}"
            )
        for _, ds in _datasets(cfg):
            ds.data_root = str(root)
            if kind == "proxy":
                ds.type = "PMBenchProxySegDataset"
    else:
        # the proxy config points at the default proxy set: make sure it exists
        for _, ds in _datasets(cfg):
            if ds.get("type") == "PMBenchProxySegDataset":
                from bench.seg.proxy_data import ensure_proxy_seg

                ds.data_root = str(ensure_proxy_seg("default"))
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        dl = cfg.get(key)
        if dl is not None:
            dl.num_workers = num_workers
            dl.persistent_workers = bool(num_workers) and dl.get("persistent_workers", False)
    if work_dir is not None:
        cfg.work_dir = str(work_dir)
    from bench.seg import logs

    logs.apply(cfg)  # quiet mmengine unless --verbose
    return cfg


def model_spec(cfg) -> dict:
    """The model part of a config as plain data (for round-trip checks and cache keys)."""
    return cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model)
