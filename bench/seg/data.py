"""Segmentation data: the proxy dataset class and the ``--data`` argument.

``--data proxy[:SIZE]`` is the embedded proxy set (generated once under
``.cache/proxy_seg``); ``--data ade20k:PATH`` is an ADE20K tree read by mmseg's
``ADE20KDataset``.  A wrong path or layout fails before any model is built, with the
expected layout in the message.
"""
from __future__ import annotations

from pathlib import Path

from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

from bench.core.reducer import ConfigError

from bench.seg import proxy_data

ADE_LAYOUT = (
    "ADEChallengeData2016 layout: PATH/images/{training,validation}/*.jpg and "
    "PATH/annotations/{training,validation}/*.png (same file stems; labels 0=other, 1..150 = classes)"
)


class PMBenchProxySegDataset(BaseSegDataset):
    """The embedded proxy set (ADE20K layout, 6 classes, label 0 ignored)."""

    METAINFO = dict(classes=proxy_data.CLASSES, palette=proxy_data.PALETTE)

    def __init__(self, img_suffix=".jpg", seg_map_suffix=".png", reduce_zero_label=True,
                 data_prefix=dict(img_path="images/validation", seg_map_path="annotations/validation"),
                 **kwargs):
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=reduce_zero_label, data_prefix=data_prefix, **kwargs)


def _register():
    """Register :class:`PMBenchProxySegDataset` in mmseg's ``DATASETS`` once; a second import keeps and
    returns the class registered first."""
    if "PMBenchProxySegDataset" not in DATASETS.module_dict:
        DATASETS.register_module(module=PMBenchProxySegDataset)
    return DATASETS.module_dict["PMBenchProxySegDataset"]


PMBenchProxySegDataset = _register()


def check_ade_layout(path, splits=("validation",)) -> Path:
    """The ADE20K root for ``path`` (the root itself or a folder holding ADEChallengeData2016)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"ADE20K path {p} does not exist; expected the {ADE_LAYOUT}")
    if not (p / "images").is_dir() and (p / "ADEChallengeData2016").is_dir():
        p = p / "ADEChallengeData2016"
    for split in splits:
        imgs = p / "images" / split
        anns = p / "annotations" / split
        missing = [str(d) for d in (imgs, anns) if not d.is_dir()]
        if missing:
            raise ConfigError(f"{p} is not an ADE20K tree: missing {', '.join(missing)}; expected the {ADE_LAYOUT}")
        stems = {f.stem for f in imgs.glob("*.jpg")}
        if not stems:
            raise ConfigError(f"no .jpg images in {imgs}; expected the {ADE_LAYOUT}")
        ann = {f.stem for f in anns.glob("*.png")}
        lacking = sorted(stems - ann)
        if lacking:
            raise ConfigError(
                f"{len(lacking)} image(s) in {imgs} have no annotation in {anns} (e.g. {lacking[0]}.png); "
                f"expected the {ADE_LAYOUT}"
            )
    return p


def resolve(data: str, splits=("validation",)) -> tuple[str, Path]:
    """``'proxy'``, ``'proxy:smoke'`` or ``'ade20k:PATH'`` -> (kind, root)."""
    if not isinstance(data, str) or not data:
        raise ConfigError("--data must be 'proxy', 'proxy:SIZE' or 'ade20k:PATH'")
    kind, _, arg = data.partition(":")
    kind = kind.strip().lower()
    if kind == "proxy":
        return "proxy", proxy_data.ensure_proxy_seg(arg or "default")
    if kind == "ade20k":
        if not arg:
            raise ConfigError(f"--data ade20k needs a path: ade20k:PATH with the {ADE_LAYOUT}")
        return "ade20k", check_ade_layout(arg, splits)
    raise ConfigError(f"unknown --data '{data}'; use 'proxy', 'proxy:SIZE' ({', '.join(proxy_data.SIZES)}) "
                      f"or 'ade20k:PATH'")
