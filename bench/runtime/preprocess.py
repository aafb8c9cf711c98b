"""Input preprocessing resolved from the model, as timm does it.

A pretrained ViT only scores what it was trained to score when its input is
normalised the way it was trained: DeiT uses ImageNet's mean/std, the AugReg
ViTs (``vit_*.augreg_*``) use mean = std = 0.5, and other families differ again
(interpolation, input size).  Evaluating an AugReg ViT-Ti/16 with ImageNet's
statistics costs ~30 points of top-1 without any error, so nothing here is a
fixed constant: :func:`resolve` reads the model's timm ``pretrained_cfg`` (for a
bare architecture name, the config of the tag the suite pins, see
``bench.runtime.weights.PINNED_TAGS``) through ``timm.data.resolve_data_config``, and
explicit overrides (``--mean``, ``--std``, ``--crop-pct``, ``--interpolation``,
``--input-size``) win over it.

One field is a protocol choice rather than a model property: the centre-crop
ratio.  The papers this suite reproduces (DeiT, EViT, DynamicViT, ToMe's DeiT
rows, PM) evaluate with DeiT's transform, resize ``int(224 / 0.875) = 256`` and
crop 224, while timm's configs say 0.9 (about 0.1 point of difference).  The
suite fixes one protocol, the papers' 0.875, for every model (``crop_pct_from``
says so in every result); ``--crop-pct model`` takes the model's own value and a
number sets it.  See docs/preprocessing.md.

The resolved :class:`Preprocess` is stamped into every result and is part of
every cache key (validation cache, result cache).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence, Union

from bench.core.reducer import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROTOCOL_CROP_PCT = 0.875  # DeiT's evaluation transform, used by every paper the suite reproduces
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class Preprocess:
    """Everything that turns a decoded image into the tensor a model sees."""

    img_size: int
    crop_pct: float = PROTOCOL_CROP_PCT
    interpolation: str = "bicubic"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    norm_from: str = "default"  # where mean/std/interpolation came from (a pretrained_cfg, a flag, the default)
    crop_pct_from: str = "protocol"  # protocol | pretrained_cfg | --crop-pct

    def __post_init__(self):
        _check(self)

    def key(self) -> dict:
        """What changes the pixels (a cache key part); provenance fields are left out."""
        return {"img_size": self.img_size, "crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "mean": [round(float(v), 6) for v in self.mean], "std": [round(float(v), 6) for v in self.std]}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def describe(self) -> str:
        m = ",".join(f"{v:.3g}" for v in self.mean)
        s = ",".join(f"{v:.3g}" for v in self.std)
        return (f"{self.img_size}px, resize {self.resize_size()} {self.interpolation} + centre crop "
                f"(crop_pct {self.crop_pct:g}, {self.crop_pct_from}), mean ({m}) std ({s}) from {self.norm_from}")

    def resize_size(self) -> int:
        return int(math.floor(self.img_size / self.crop_pct))

    def with_size(self, img_size: int) -> "Preprocess":
        return replace(self, img_size=int(img_size))

    # -- transforms ----------------------------------------------------------------------------
    def _interp(self):
        from torchvision.transforms import InterpolationMode

        return InterpolationMode(self.interpolation)

    def eval_transform(self, *, to_tensor: bool = True):
        """Resize the short side to ``floor(img / crop_pct)``, centre crop, normalise
        (timm's ``transforms_imagenet_eval`` with crop_mode 'center'; DeiT's transform at 0.875)."""
        from torchvision import transforms as T

        t = [T.Resize(self.resize_size(), interpolation=self._interp()), T.CenterCrop(self.img_size)]
        if to_tensor:
            t += [T.ToTensor(), self.normalizer()]
        return T.Compose(t)

    def normalizer(self):
        from torchvision import transforms as T

        return T.Normalize(self.mean, self.std)

    def train_transform(self, source: str):
        """Training augmentation with this normalisation.  Proxy: RandomResizedCrop(0.5-1) and colour
        jitter, no flip (a flip turns the proxy's 'diag45' texture class into 'diag135').  Real data:
        DeiT's recipe through ``timm.data.create_transform`` (RandAugment rand-m9-mstd0.5-inc1, colour
        jitter 0.3, random erasing 0.25); mixup / cutmix / label smoothing are the trainer's."""
        if source == "proxy":
            from torchvision import transforms as T

            return T.Compose([
                T.RandomResizedCrop(self.img_size, scale=(0.5, 1.0), interpolation=self._interp()),
                T.ColorJitter(0.3, 0.3, 0.3),
                T.ToTensor(), self.normalizer()])
        from timm.data import create_transform

        return create_transform(self.img_size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                color_jitter=0.3, interpolation=self.interpolation, re_prob=0.25, re_mode="pixel",
                                re_count=1, mean=tuple(self.mean), std=tuple(self.std))


def _check(p: Preprocess) -> None:
    if not isinstance(p.img_size, int) or p.img_size < 1:
        raise ConfigError(f"input size must be a positive integer, not {p.img_size!r}")
    if not (isinstance(p.crop_pct, (int, float)) and 0 < p.crop_pct <= 1 and math.isfinite(p.crop_pct)):
        raise ConfigError(f"crop_pct must be in (0, 1] (the papers use 0.875, timm's configs 0.9), not {p.crop_pct!r}")
    if p.interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation '{p.interpolation}' is not one of {', '.join(INTERPOLATIONS)}")
    for name, v in (("mean", p.mean), ("std", p.std)):
        if len(v) != 3 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
            raise ConfigError(f"{name} needs three finite numbers (one per RGB channel), not {list(v)!r}")
    if any(x <= 0 for x in p.std):
        raise ConfigError(f"std values must be > 0, not {list(p.std)!r}")


# --------------------------------------------------------------------------- resolution
def pretrained_cfg_of(model_name: str, model=None) -> tuple[dict, str]:
    """(the timm pretrained_cfg that describes ``model_name``'s training input, where it came from).

    A bare architecture the suite pins (``deit_small_patch16_224`` -> ``.fb_in1k``,
    ``vit_tiny_patch16_224`` -> ``.augreg_in21k_ft_in1k``) takes the pinned tag's config, also for
    ``--weights FILE`` (the file is that release); a tagged name takes its tag's; otherwise the
    model instance's own ``pretrained_cfg`` (the suite's proxy and fixture models set one)."""
    import timm.models

    from bench.runtime.weights import pinned_name

    name = pinned_name(model_name)
    cfg = None
    try:
        pc = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - unknown to timm's table: fall back to the instance
        pc = None
    if pc is not None:
        cfg = pc.to_dict() if hasattr(pc, "to_dict") else dict(pc)
        if cfg.get("mean") is not None:
            return cfg, f"pretrained_cfg {name}"
    if model is None:
        try:
            from bench.runtime import models

            model = models.create(model_name.split(".")[0])
        except ConfigError:
            model = None
    own = dict(getattr(model, "pretrained_cfg", None) or {}) if model is not None else {}
    if own.get("mean") is not None:
        return own, f"pretrained_cfg {own.get('architecture') or model_name}"
    return {}, "default (ImageNet mean/std; the model has no pretrained_cfg)"


def _triple(v, flag: str) -> Optional[tuple]:
    if v is None:
        return None
    if isinstance(v, str):
        v = [x for x in v.replace(",", " ").split() if x]
    try:
        vals = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} takes three numbers (R G B), e.g. {flag} 0.5 0.5 0.5, not {v!r}") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise ConfigError(f"{flag} takes one or three numbers (R G B), got {len(vals)}")
    return vals


def parse_input_size(v) -> Optional[int]:
    """``224`` or ``3 224 224`` (timm's form) -> 224; square inputs only."""
    if v is None:
        return None
    vals = v if isinstance(v, (list, tuple)) else [v]
    try:
        vals = [int(x) for x in vals]
    except (TypeError, ValueError):
        raise ConfigError(f"--input-size takes N or 3 N N, not {v!r}") from None
    if len(vals) == 3:
        if vals[0] != 3 or vals[1] != vals[2]:
            raise ConfigError(f"--input-size {' '.join(map(str, vals))}: only square RGB inputs (3 N N) are supported")
        vals = vals[1:2]
    if len(vals) != 1 or vals[0] < 1:
        raise ConfigError(f"--input-size must be a positive size (N or 3 N N), not {v!r}")
    return vals[0]


def resolve(model_name: str, model=None, *, img_size: Optional[int] = None,
            crop_pct: Union[None, float, str] = None, interpolation: Optional[str] = None,
            mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> Preprocess:
    """The model's preprocessing (its pretrained_cfg through ``timm.data.resolve_data_config``),
    with the protocol crop ratio and any explicit override applied."""
    from timm.data import resolve_data_config

    cfg, origin = pretrained_cfg_of(model_name, model)
    dc = resolve_data_config(pretrained_cfg=cfg) if cfg else {}
    size = img_size
    if size is None and model is not None and getattr(model, "patch_embed", None) is not None:
        pe_size = getattr(model.patch_embed, "img_size", None)
        size = int(pe_size[0]) if pe_size is not None else None
    if size is None and dc.get("input_size"):
        size = int(dc["input_size"][-1])
    if size is None:
        raise ConfigError(f"cannot tell the input size of '{model_name}'; pass --input-size N")
    norm_from = origin
    m, s = _triple(mean, "--mean"), _triple(std, "--std")
    if m is not None or s is not None:
        norm_from = "--mean/--std" + (f" (rest from {origin})" if (m is None or s is None) else "")
    interp = interpolation or dc.get("interpolation") or "bicubic"
    if interp not in INTERPOLATIONS:  # e.g. 'bilinear' spelled differently, or 'random'
        interp = "bicubic"
    if crop_pct is None:
        cp, cp_from = PROTOCOL_CROP_PCT, "protocol"
    elif isinstance(crop_pct, str) and crop_pct.strip().lower() == "model":
        cp, cp_from = float(dc.get("crop_pct") or PROTOCOL_CROP_PCT), "pretrained_cfg"
    else:
        try:
            cp = float(crop_pct)
        except (TypeError, ValueError):
            raise ConfigError(f"--crop-pct takes a number in (0, 1] or 'model', not {crop_pct!r}") from None
        cp_from = "--crop-pct"
    return Preprocess(img_size=int(size), crop_pct=cp, interpolation=interp,
                      mean=m or tuple(dc.get("mean") or IMAGENET_MEAN), std=s or tuple(dc.get("std") or IMAGENET_STD),
                      norm_from=norm_from, crop_pct_from=cp_from)


def default(img_size: int, crop_pct: float = PROTOCOL_CROP_PCT) -> Preprocess:
    """DeiT's evaluation input (ImageNet mean/std, bicubic) when no model is named."""
    return Preprocess(img_size=int(img_size), crop_pct=float(crop_pct), norm_from="default (ImageNet mean/std)",
                      crop_pct_from="protocol" if crop_pct == PROTOCOL_CROP_PCT else "--crop-pct")


def add_arguments(p) -> None:
    """The preprocessing flags shared by eval / train / calibration commands."""
    p.add_argument("--crop-pct", default=None,
                   help="centre-crop ratio: a number in (0, 1], or 'model' for the model's pretrained_cfg "
                        f"(default: the papers' protocol, {PROTOCOL_CROP_PCT})")
    p.add_argument("--mean", nargs="+", default=None, metavar="M", help="input mean (default: the model's pretrained_cfg)")
    p.add_argument("--std", nargs="+", default=None, metavar="S", help="input std (default: the model's pretrained_cfg)")
    p.add_argument("--interpolation", default=None, choices=INTERPOLATIONS,
                   help="resize interpolation (default: the model's pretrained_cfg)")
    p.add_argument("--input-size", nargs="+", default=None, metavar="N",
                   help="input size, N or 3 N N (default: the model's); same as --img-size")


def merge_size_flags(args) -> None:
    """Fold ``--input-size`` into ``--img-size`` (models are built with ``img_size``); an error if the
    two disagree.  Call before building the model."""
    size = parse_input_size(getattr(args, "input_size", None))
    if size is not None:
        if getattr(args, "img_size", None) not in (None, size):
            raise ConfigError(f"--img-size {args.img_size} and --input-size {size} disagree; give one")
        args.img_size = size


def from_args(args, model_name: str, model=None) -> Preprocess:
    """Resolve from a command's parsed flags (see :func:`add_arguments`)."""
    size = parse_input_size(getattr(args, "input_size", None))
    if getattr(args, "img_size", None) is not None:
        if args.img_size < 1:
            raise ConfigError(f"--img-size must be a positive integer, not {args.img_size}")
        if size is not None and size != args.img_size:
            raise ConfigError(f"--img-size {args.img_size} and --input-size {size} disagree; give one")
        size = args.img_size
    return resolve(model_name, model, img_size=size, crop_pct=getattr(args, "crop_pct", None),
                   interpolation=getattr(args, "interpolation", None), mean=getattr(args, "mean", None),
                   std=getattr(args, "std", None))
