"""Loading Segmenter weights under torch's ``weights_only`` default (docs/environment.md §1).

Accepted files:

* mmseg Segmenter checkpoints (``{'state_dict': {'backbone.layers...', 'decode_head...'}, 'meta'}``):
  backbone keys are renamed on load by ``PMBenchViT`` (see :mod:`bench.seg.backbone`);
* checkpoints saved by mmengine's Runner (they also pickle a ``HistoryBuffer``): loaded with
  ``weights_only=True`` plus mmengine's ``HistoryBuffer`` and numpy scalar types allowed;
* this suite's own checkpoints (``state_dict`` + ``meta`` only: plain weights_only files);
* original Segmenter releases (rstrudel/segmenter ``checkpoint.pth``: ``{'model': {'encoder.*',
  'decoder.*'}}``): the encoder maps to ``PMBenchViT`` (timm layout, patch bias, so the config
  needs ``patch_bias=True``) and the decoder to ``SegmenterMaskTransformerHead``.

Nothing here unpickles arbitrary objects unless ``trust=True`` (or
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``) is given for a file the user trusts.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from bench.core.reducer import ConfigError

# --------------------------------------------------------------------------- key conversion
# One transformer block: (timm ``Block`` sub-key, mmseg ``TransformerEncoderLayer`` sub-key).  The
# encoder conversion in both directions and the original Segmenter's decoder conversion
# (below) are all generated from this one table.
BLOCK_KEYS = [
    ("norm1.", "ln1."),
    ("norm2.", "ln2."),
    ("attn.qkv.weight", "attn.attn.in_proj_weight"),
    ("attn.qkv.bias", "attn.attn.in_proj_bias"),
    ("attn.proj.", "attn.attn.out_proj."),
    ("mlp.fc1.", "ffn.layers.0.0."),
    ("mlp.fc2.", "ffn.layers.1."),
]


def block_rules(src: str, dst: str, to_timm: bool) -> list[tuple[str, str]]:
    """Regex rules renaming ``<src><i>.<sub-key>`` to ``<dst><i>.<other sub-key>`` for every block
    entry of :data:`BLOCK_KEYS` (mmseg -> timm names when ``to_timm``, else timm -> mmseg)."""
    rules = []
    for timm_key, mmseg_key in BLOCK_KEYS:
        a, b = (mmseg_key, timm_key) if to_timm else (timm_key, mmseg_key)
        tail = "" if a.endswith(".") else "$"  # a prefix ("ln1.") or a whole parameter name
        rules.append((rf"^{re.escape(src)}(\d+)\.{re.escape(a)}{tail}", dst + r"\1." + b))
    return rules


def _safe_globals():
    """What mmengine Runner checkpoints pickle besides tensors: the message hub's
    ``HistoryBuffer`` (numpy arrays inside, whose numpy-2 pickles also reference
    ``builtins.getattr`` for dtype classes).  Only these are allowed, nothing else."""
    out = []
    try:
        from mmengine.logging.history_buffer import HistoryBuffer

        out.append(HistoryBuffer)
    except ImportError:  # pragma: no cover
        pass
    import builtins

    from torch.torch_version import TorchVersion

    out.append(TorchVersion)

    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    out += [np.dtype, np.ndarray, _reconstruct, scalar, builtins.getattr, bytes]
    out += [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "uint8", "bool")]
    return out


def load_weights(path, trust: bool = False) -> dict:
    """``torch.load`` a checkpoint on CPU, safely; a clear error for missing or unsafe files."""
    s = str(path)
    if s.startswith(("http://", "https://")):
        try:
            from torch.hub import load_state_dict_from_url

            return load_state_dict_from_url(s, map_location="cpu", weights_only=not trust)
        except Exception as e:
            raise ConfigError(
                f"cannot fetch weights {s} ({type(e).__name__}: {e}); offline, download the file elsewhere and "
                f"pass its local path (--checkpoint FILE, or model.pretrained=FILE)"
            ) from None
    p = Path(s).expanduser()
    if not p.is_file():
        raise ConfigError(f"checkpoint file {p} not found")
    def unreadable(e: Exception) -> ConfigError:
        msg = str(e).splitlines()[0].split(". ")[0][:160] if str(e) else type(e).__name__
        return ConfigError(f"cannot read checkpoint {p} ({msg}): the file is truncated or not a torch "
                           "checkpoint; re-download or re-save it")

    if trust or os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") == "1":
        try:
            return torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - one line for any unreadable file
            raise unreadable(e) from None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():  # a damaged pickle, not a refused global
            raise unreadable(e) from None
    except Exception as e:  # noqa: BLE001 - truncated zip, empty file, not a checkpoint
        raise unreadable(e) from None
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise unreadable(e) from None
        raise ConfigError(
            f"{p} holds Python objects that torch's weights_only loading refuses ({str(e).splitlines()[0][:200]}); "
            f"if you trust the file, pass --trust-checkpoint (or set TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1)"
        ) from None
    except Exception as e:  # noqa: BLE001
        raise unreadable(e) from None


def _segmenter_decoder_rules() -> list[tuple[str, str]]:
    return [
        (r"^decoder\.proj_dec\.", "decode_head.dec_proj."),
        (r"^decoder\.cls_emb$", "decode_head.cls_emb"),
        (r"^decoder\.proj_patch$", "decode_head.patch_proj.weight"),
        (r"^decoder\.proj_classes$", "decode_head.classes_proj.weight"),
        (r"^decoder\.decoder_norm\.", "decode_head.decoder_norm."),
        (r"^decoder\.mask_norm\.", "decode_head.mask_norm."),
        *block_rules("decoder.blocks.", "decode_head.layers.", to_timm=False),
    ]


def segmenter_release_to_mmseg(model_sd: dict) -> dict:
    """Original Segmenter (rstrudel) ``model`` state dict -> mmseg EncoderDecoder keys.

    Segmenter stores the patch/class projections as raw (D, D) parameters used as
    ``x @ P``; mmseg's ``nn.Linear(bias=False)`` computes ``x @ W.T``, hence the transpose.
    """
    out, rules = {}, _segmenter_decoder_rules()
    for k, v in model_sd.items():
        if k.startswith("encoder."):
            out["backbone." + k[len("encoder."):]] = v  # renamed by PMBenchViT on load
            continue
        for pat, rep in rules:
            if re.match(pat, k):
                nk = re.sub(pat, rep, k)
                if nk.endswith(("patch_proj.weight", "classes_proj.weight")):
                    v = v.t().contiguous()
                out[nk] = v
                break
    return out


def model_state(ckpt: dict) -> dict:
    """The EncoderDecoder state dict inside any supported checkpoint format."""
    if not isinstance(ckpt, dict):
        raise ConfigError(f"unrecognised checkpoint: a {type(ckpt).__name__}, not a dict of weights")
    if "state_dict" in ckpt:
        return ckpt["state_dict"]
    if "model" in ckpt and isinstance(ckpt["model"], dict) and any(k.startswith("encoder.") for k in ckpt["model"]):
        return segmenter_release_to_mmseg(ckpt["model"])
    if any(k.startswith(("backbone.", "decode_head.")) for k in ckpt):
        return ckpt
    raise ConfigError("unrecognised checkpoint: expected an mmseg/mmengine checkpoint ('state_dict') "
                      "or an original Segmenter release ('model' with encoder./decoder. keys)")


def load_into(model, path, trust: bool = False, strict: bool = True) -> dict:
    """Load a Segmenter checkpoint into an EncoderDecoder with a PMBenchViT backbone.

    Reducer modules absent from the file (e.g. an unreduced checkpoint evaluated with a
    reducer whose parameters are calibrated or trained later) are reported, not fatal.
    """
    ckpt = load_weights(path, trust=trust)
    sd = dict(model_state(ckpt))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    reducer_missing = [k for k in missing if ".reducer_modules." in k]
    missing = [k for k in missing if ".reducer_modules." not in k]
    if strict and (missing or unexpected):
        raise ConfigError(
            f"checkpoint {path} does not fit the config: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); check the config size (vit-t/s/b/proxy)"
        )
    meta = ckpt.get("meta", {}) if isinstance(ckpt, dict) else {}
    if isinstance(meta, dict) and "dataset_meta" in meta:
        model.dataset_meta = meta["dataset_meta"]
    return {"missing_reducer_modules": reducer_missing, "meta": meta}


def save_clean(model, path, meta: dict | None = None) -> Path:
    """Save ``{'state_dict', 'meta'}`` only: loads with plain ``weights_only=True``.  ``model``: a
    module, or its state dict."""
    from bench.runtime.outputs import temp_file

    p = Path(path)
    sd = {k: v.detach().cpu() for k, v in (model if isinstance(model, dict) else model.state_dict()).items()}
    with temp_file(p) as tmp:  # removed on every exit path
        torch.save({"state_dict": sd, "meta": meta or {}}, tmp)
    return p
