"""One shared mechanism that lets any reducer run inside timm ViTs.

:func:`apply` swaps the class of the model and of every ``Block`` to a
subclass created on the fly (ToMe's trick): parameters, buffers and the
object identities stay the same, so pretrained weights are untouched and
:func:`remove` restores the original classes.  The block subclass keeps timm's
own sub-modules (``norm1``, ``attn``, ``ls1``, ``drop_path1``, ``mlp`` ...) and
only adds the reducer's hook points, so LayerScale, q/k-norm, scale-norm,
gated attention and any depth/width work without a per-method copy of timm's
Block.

Attention goes through :func:`attention`, which uses
``F.scaled_dot_product_attention`` whenever the reducer's request allows it
(additive biases such as ToMe's log-size term are passed as SDPA masks; EViT's
CLS attention row is recomputed from the CLS query alone) and falls back to
the explicit softmax only for requests that need probabilities or their
gradients (PM calibration, DynamicViT training) or when the module itself has
``fused_attn=False``.
"""
from __future__ import annotations

import contextlib

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.core.reducer import AttnRequest, ConfigError, ModelInfo, Reducer, TokenState

_PATCH_ATTR = "_pmb_ctx"


class PatchContext:
    """Shared by the patched model and its blocks (a plain object, not a Module)."""

    def __init__(self, reducer: Reducer, info: ModelInfo):
        self.reducer = reducer
        self.info = info
        self.state: Optional[TokenState] = None
        self.track = False  # record grid tracking (dense prediction, tests)
        self.train_step = False  # the current forward is a training step (training_step())
        self.orig_model_cls = None
        self.orig_block_cls: dict[int, type] = {}


# --------------------------------------------------------------------------- attention
def attention(attn: nn.Module, x: torch.Tensor, req: AttnRequest, attn_mask=None):
    """timm ``Attention`` forward with the extras a reducer asked for.

    Returns ``(out, extras)``; ``extras`` may hold ``keys`` (B, N, head_dim),
    ``cls_attn`` (B, N) and ``probs`` (B, H, N, N, explicit path only).
    """
    B, N, _ = x.shape
    H, hd = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)

    bias = req.bias
    if attn_mask is not None:
        bias = attn_mask if bias is None else bias + attn_mask
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    extras: dict = {}
    if req.keys:
        extras["keys"] = head_mean(k)
    drop_p = attn.attn_drop.p if attn.training else 0.0
    explicit = req.needs_explicit or not getattr(attn, "fused_attn", True)
    if not explicit:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop_p)
        if req.cls_attn:
            # EViT's importance: the CLS query's attention row, recomputed alone (O(N)).
            logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
            if bias is not None:
                b = bias if bias.shape[-2] == 1 else bias[..., :1, :]
                logits = logits + b
            extras["cls_attn"] = logits.softmax(dim=-1).mean(1)[:, 0]
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        if req.policy is not None:
            probs = softmax_with_policy(logits, req.policy)
        else:
            probs = logits.softmax(dim=-1)
        if req.probs_hook is not None:
            req.probs_hook(probs)
        if req.cls_attn:
            extras["cls_attn"] = probs[:, :, 0].mean(1)
        out = attn.attn_drop(probs) @ v
    out = out.transpose(1, 2).reshape(B, N, H * hd)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, extras


# Up to this many heads, a float32/float64 CPU head mean is summed head by head (below): with more,
# `sum` takes other orders for small tensors (seen at 6 heads), so `mean` itself runs.
_SEQUENTIAL_HEADS = 4


def head_mean(k: torch.Tensor) -> torch.Tensor:
    """``k.mean(1)`` of a (B, H, N, d) tensor, bit for bit (ToMe's metric: the keys averaged over heads).

    On CPU in float32/float64 with few heads, the head dimension of the attention's keys is an outer
    dimension of the reduction, which ``sum`` walks one head after the other, then ``mean`` divides by H.
    Adding the heads in that same order and dividing is therefore the same arithmetic, and about twice as
    fast at DeiT-T's three heads (docs/speed.md, ToMe's own work).  Lower precisions (which ``mean``
    accumulates in float32) and other devices use ``mean`` itself; ``tests/test_tome.py`` checks the
    equality over head counts and shapes."""
    H = k.shape[1]
    if k.device.type != "cpu" or k.dtype not in (torch.float32, torch.float64) or not 2 <= H <= _SEQUENTIAL_HEADS:
        return k.mean(1)
    acc = k[:, 0] + k[:, 1]
    for h in range(2, H):
        acc.add_(k[:, h])
    return acc.div_(H)


def softmax_with_policy(logits: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DynamicViT's masked softmax (official ``softmax_with_policy``).

    Keys whose policy is 0 are masked out for every query except themselves (the
    diagonal is forced to 1); computed in fp32 with the official eps smoothing.
    """
    B, N, _ = policy.shape
    B, H, N, _ = logits.shape
    attn_policy = policy.reshape(B, 1, 1, N)
    eye = torch.eye(N, dtype=attn_policy.dtype, device=attn_policy.device).view(1, 1, N, N)
    attn_policy = attn_policy + (1.0 - attn_policy) * eye
    max_att = torch.max(logits, dim=-1, keepdim=True)[0]
    logits = logits - max_att
    logits = logits.to(torch.float32).exp_() * attn_policy.to(torch.float32)
    probs = (logits + eps / N) / (logits.sum(dim=-1, keepdim=True) + eps)
    return probs.type_as(max_att)


# --------------------------------------------------------------------------- token selection
def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b]]`` for every b: (B, N, C) and (B, K) long -> (B, K, C).

    Exactly ``torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, C))`` (a copy, bit for bit), done as
    one ``index_select`` of whole rows of the flattened tokens, which on CPU is an order of magnitude
    faster than ``gather`` with a broadcast index.  ``idx`` may have batch 1 (shared by every image).
    """
    B, N, C = x.shape
    if idx.shape[0] != B:
        idx = idx.expand(B, -1)
    flat = idx + (torch.arange(B, device=idx.device) * N).unsqueeze(1)
    return x.reshape(B * N, C).index_select(0, flat.reshape(-1)).view(B, idx.shape[1], C)


def topk_keep(x: torch.Tensor, scores: torch.Tensor, k: int, n_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the prefix tokens and the ``k`` patch tokens of highest ``scores`` (B, N - n_prefix), in
    descending-score order (``torch.topk(sorted=True)``, as EViT's and DynamicViT's official code);
    returns ``(idx, kept)``: the kept patch indices (B, k) and the tokens (B, n_prefix + k, C), copied
    exactly (:func:`gather_tokens`).  Record the selection with ``state.remap(x, keep_map(idx, N, p))``."""
    idx = torch.topk(scores, k, dim=1, largest=True, sorted=True).indices
    B = x.shape[0]
    keep = torch.cat([torch.arange(n_prefix, device=x.device).expand(B, -1), idx + n_prefix], dim=1)
    return idx, gather_tokens(x, keep)


# --------------------------------------------------------------------------- shared block
class ReducedBlockMixin:
    """Forward of a timm ``Block`` with the reducer's hook points."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        ctx: PatchContext = getattr(self, _PATCH_ATTR)
        r, st, i = ctx.reducer, ctx.state, self._pmb_index
        if st is None:  # block used outside the patched model's forward
            raise RuntimeError("a reduced block must be called through its patched model")
        if is_causal:
            raise ConfigError("token reduction does not support causal attention")
        x = r.pre_block(i, self, x, st)
        req = r.attn_request(i, self, x, st)
        a, extras = attention(self.attn, self.norm1(x), req, attn_mask)
        x = x + self.drop_path1(self.ls1(a))
        x = r.post_attn(i, self, x, extras, st)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return r.post_block(i, self, x, st)


class ReducedViTMixin:
    """Forward of a timm ``VisionTransformer`` that owns the per-forward token state."""

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        ctx: PatchContext = getattr(self, _PATCH_ATTR)
        H, W = x.shape[-2:]
        ph, pw = ctx.info.patch_size
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        grid = (H // ph, W // pw)
        st = TokenState(
            batch=x.shape[0], n_prefix=ctx.info.n_prefix, grid=grid, n0=x.shape[1], track=ctx.track,
            train_step=ctx.train_step,
        )
        ctx.state = st
        ctx.reducer.begin(self, x, st)
        for blk in self.blocks:
            x = blk(x, attn_mask=attn_mask) if attn_mask is not None else blk(x)
        x = ctx.reducer.end(self, x, st)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        ctx: PatchContext = getattr(self, _PATCH_ATTR)
        pool_type = self.global_pool if pool_type is None else pool_type
        st = ctx.state
        if pool_type == "avg" and self.attn_pool is None and st is not None and st.size is not None:
            # ToMe's MAE fix: size-weighted mean so a merged token counts as many patches.
            p = self.num_prefix_tokens
            size = st.size[:, p:]
            return (x[:, p:] * size).sum(1) / size.sum(1)
        return super().pool(x, pool_type)


# --------------------------------------------------------------------------- apply / remove
def _is_vit(model) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model, "_pos_embed")


def _subclass(mixin: type, cls: type) -> type:
    name = f"Reduced{cls.__name__}"
    return type(name, (mixin, cls), {"_pmb_base": cls})


def apply(model: nn.Module, reducer: Reducer, img_size=None) -> nn.Module:
    """Patch ``model`` in place so ``reducer`` runs inside it; returns the model.

    Model-dependent checks run first (:meth:`Reducer.check`), so impossible
    configurations fail before any compute.
    """
    if not _is_vit(model):
        raise ConfigError(
            f"{type(model).__name__} is not a timm VisionTransformer (needs blocks, patch_embed, _pos_embed)"
        )
    if is_patched(model):
        remove(model)
    info = ModelInfo.from_model(model, img_size)
    reducer.check(info)
    if reducer.name == "none":
        return model
    for blk in model.blocks:
        for attr in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
            if not hasattr(blk, attr):
                raise ConfigError(
                    f"block type {type(blk).__name__} lacks '{attr}'; only timm's standard pre-norm Block is supported"
                )
    ctx = PatchContext(reducer, info)
    ctx.orig_model_cls = model.__class__
    model.__class__ = _subclass(ReducedViTMixin, model.__class__)
    setattr(model, _PATCH_ATTR, ctx)
    for i, blk in enumerate(model.blocks):
        ctx.orig_block_cls[i] = blk.__class__
        blk.__class__ = _subclass(ReducedBlockMixin, blk.__class__)
        setattr(blk, _PATCH_ATTR, ctx)
        blk._pmb_index = i
    reducer.on_patch(model, info)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: original classes back, reducer modules removed."""
    ctx: Optional[PatchContext] = getattr(model, _PATCH_ATTR, None)
    if ctx is None:
        return model
    ctx.reducer.on_unpatch(model)
    if hasattr(model, "reducer_modules"):
        del model.reducer_modules
    for i, blk in enumerate(model.blocks):
        blk.__class__ = ctx.orig_block_cls[i]
        delattr(blk, _PATCH_ATTR)
        del blk._pmb_index
    model.__class__ = ctx.orig_model_cls
    delattr(model, _PATCH_ATTR)
    return model


def is_patched(model) -> bool:
    return getattr(model, _PATCH_ATTR, None) is not None


def get_context(model) -> Optional[PatchContext]:
    return getattr(model, _PATCH_ATTR, None)


def get_reducer(model) -> Optional[Reducer]:
    ctx = get_context(model)
    return ctx.reducer if ctx is not None else None


def last_state(model) -> Optional[TokenState]:
    ctx = get_context(model)
    return ctx.state if ctx is not None else None


def set_tracking(model, enabled: bool = True) -> None:
    """Record which current token carries each original token (dense restore, visualisation)."""
    ctx = get_context(model)
    if ctx is None:
        raise ConfigError("model is not patched with a reducer")
    ctx.track = enabled


@contextlib.contextmanager
def training_step(model):
    """Forwards inside are training steps (``TokenState.train_step``): the trainer says so
    explicitly around the student's forward.  A no-op for an unpatched model."""
    ctx = get_context(model)
    if ctx is None:
        yield
        return
    before, ctx.train_step = ctx.train_step, True
    try:
        yield
    finally:
        ctx.train_step = before


def reducer_modules(model) -> nn.ModuleDict:
    """The ModuleDict where a reducer registers its own trainable modules."""
    if not hasattr(model, "reducer_modules"):
        model.reducer_modules = nn.ModuleDict()
    return model.reducer_modules
