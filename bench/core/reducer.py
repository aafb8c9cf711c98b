"""The token-reducer contract every method implements.

A *reducer* is a plain Python object (not an ``nn.Module``) configured from a
spec string such as ``tome:r=13``.  :func:`bench.core.patch.apply` swaps the classes
of an existing timm ``VisionTransformer`` and of its blocks so that one shared
block (``bench.core.patch.ReducedBlockMixin``) calls the reducer's hooks at four
points of every block ``i``::

    x = reducer.pre_block(i, block, x, state)                 # e.g. DynamicViT selection, PM merge
    a, extras = attention(norm1(x), reducer.attn_request(i, block, x, state))
    x = x + ls1(a)
    x = reducer.post_attn(i, block, x, extras, state)         # e.g. ToMe merge, EViT/MSTM top-k
    x = x + ls2(mlp(norm2(x)))
    x = reducer.post_block(i, block, x, state)                # e.g. PM reconstruct + shortcut

Two tiers.  :class:`Reducer` is the inference core every method implements (options, checks, the
hooks above, ``begin``/``end``, the declared :meth:`Reducer.token_schedule` and
:meth:`Reducer.extra_macs` from which the harness derives FLOPs, :meth:`Reducer.flops_conventions`,
the dense-prediction :meth:`Reducer.restore`, and ``export_state``/``import_state`` for
checkpoints).  A method that needs more declares a capability by subclassing it, and the harness
asks ``isinstance``, never the method's name:

* :class:`Trainable`: a fine-tuning recipe, extra losses, a per-parameter learning-rate multiplier
  and a per-step schedule;
* :class:`Calibrated`: a structure learned from data (``calibrate``), carried through checkpoints.

Weights are untouched; a reducer that owns parameters (predictors, merge matrices, fusion scales)
registers them under ``model.reducer_modules`` so they are trained and saved with the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

from bench.core.errors import ConfigError  # defined torch-free, re-exported here (the plug-in contract)


# --------------------------------------------------------------------------- options
def _parse_bool(v: str) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on", "y", "t"):
        return True
    if s in ("0", "false", "no", "off", "n", "f"):
        return False
    raise ValueError(f"not a boolean: {v!r} (use true/false)")


def _parse_list(v, item):
    if isinstance(v, (list, tuple)):
        return [item(x) for x in v]
    s = str(v).strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    parts = [p for p in s.replace("/", ",").replace(";", ",").split(",") if p.strip()]
    return [item(p.strip()) for p in parts]


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "int": lambda v: int(v) if not isinstance(v, float) or v.is_integer() else _bad(v, "an integer"),
    "float": float,
    "bool": lambda v: v if isinstance(v, bool) else _parse_bool(v),
    "str": str,
    "intlist": lambda v: _parse_list(v, int),
    "floatlist": lambda v: _parse_list(v, float),
}


def _bad(v, what):
    raise ValueError(f"{v!r} is not {what}")


@dataclass(frozen=True)
class Option:
    """One configurable option of a reducer: type, default, meaning."""

    type: str  # int | float | bool | str | intlist | floatlist
    default: Any
    help: str
    choices: Optional[Sequence[Any]] = None
    optional: bool = False  # None allowed (written as "none")

    def parse(self, raw: Any) -> Any:
        if raw is None or (isinstance(raw, str) and raw.strip().lower() == "none" and self.optional):
            return None
        try:
            val = _PARSERS[self.type](raw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"expected {self.type}: {e}") from None
        if self.choices is not None and val not in self.choices:
            raise ConfigError(f"{val!r} is not one of {list(self.choices)}")
        return val


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if v is None:
        return "none"
    if isinstance(v, float):
        return repr(v).rstrip("0").rstrip(".") if "e" not in repr(v) else repr(v)
    return str(v)


# --------------------------------------------------------------------------- model description
@dataclass(frozen=True)
class ModelInfo:
    """Geometry of a ViT as the FLOPs model and the validity checks need it."""

    depth: int
    dim: int
    num_heads: int
    attn_dim: int  # num_heads * head_dim
    mlp_hidden: int
    n_prefix: int  # CLS + distillation + register tokens
    grid: tuple[int, int]  # patch grid (rows, cols)
    patch_size: tuple[int, int]
    in_chans: int
    num_classes: int
    num_heads_out: int = 1  # 2 for distilled DeiT (head + head_dist)
    has_cls: bool = True
    has_dist: bool = False

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_patches + self.n_prefix

    @staticmethod
    def from_model(model, img_size: Optional[tuple[int, int]] = None) -> "ModelInfo":
        pe = model.patch_embed
        ps = tuple(pe.patch_size) if isinstance(pe.patch_size, (tuple, list)) else (pe.patch_size,) * 2
        if img_size is None:
            grid = tuple(pe.grid_size)
        else:
            grid = (img_size[0] // ps[0], img_size[1] // ps[1])
        blk = model.blocks[0]
        attn = blk.attn
        heads = attn.num_heads
        attn_dim = attn.qkv.out_features // 3
        hidden = blk.mlp.fc1.out_features if hasattr(blk.mlp, "fc1") else 4 * model.embed_dim
        head = model.head
        ncls = head.out_features if isinstance(head, torch.nn.Linear) else 0
        has_dist = getattr(model, "dist_token", None) is not None
        return ModelInfo(
            depth=len(model.blocks),
            dim=model.embed_dim,
            num_heads=heads,
            attn_dim=attn_dim,
            mlp_hidden=hidden,
            n_prefix=int(getattr(model, "num_prefix_tokens", 1)),
            grid=grid,
            patch_size=ps,
            in_chans=pe.proj.in_channels,
            num_classes=ncls,
            num_heads_out=2 if has_dist else 1,
            has_cls=getattr(model, "cls_token", None) is not None,
            has_dist=has_dist,
        )


@dataclass
class BlockTokens:
    """Tokens seen by one block's attention and by its MLP (the FLOPs model's input)."""

    attn: int
    mlp: int


# --------------------------------------------------------------------------- per-forward state
@dataclass
class AttnRequest:
    """What a reducer needs from one block's attention.

    bias:      additive attention bias broadcastable to (B, heads, N, N), e.g. ToMe's log(size)
    keys:      return the keys averaged over heads, (B, N, head_dim) (ToMe's metric)
    cls_attn:  return the CLS query's attention probabilities averaged over heads, (B, N)
    policy:    DynamicViT training keep-policy (B, N, 1); forces the explicit softmax
    probs_hook: called with the post-softmax probabilities (B, H, N, N); forces explicit attention
    """

    bias: Optional[torch.Tensor] = None
    keys: bool = False
    cls_attn: bool = False
    policy: Optional[torch.Tensor] = None
    probs_hook: Optional[Callable[[torch.Tensor], None]] = None

    @property
    def needs_explicit(self) -> bool:
        return self.policy is not None or self.probs_hook is not None


NO_REQUEST = AttnRequest()


@dataclass
class TokenState:
    """Bookkeeping for one forward pass, shared by the shared block and the reducer.

    size:   (B, N, 1) number of original patches each current token stands for
            (None until a method needs it; 1 everywhere before any merge)
    origin: (B, N0) index of the current token that carries each *original* token
            (-1 once the token was dropped); only when ``track`` is set
    last:   (B, N0, C) last features of dropped original tokens (for dense restore)
    train_step: the forward is a training step (set explicitly by the trainer; a method's training
            behaviour, e.g. EViT's keep-rate warm-up, must not be guessed from autograd or train mode)
    """

    batch: int
    n_prefix: int
    grid: tuple[int, int]
    n0: int
    track: bool = False
    train_step: bool = False  # a training step of the shared trainer (bench.core.patch.training_step)
    size: Optional[torch.Tensor] = None
    origin: Optional[torch.Tensor] = None
    last: Optional[torch.Tensor] = None
    scratch: dict = field(default_factory=dict)

    def ensure_size(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is None:
            self.size = x.new_ones(x.shape[0], x.shape[1], 1)
        return self.size

    # -- grid tracking: every token operation is described by an old->new index map
    def remap(self, x_old: torch.Tensor, old_to_new: torch.Tensor) -> None:
        """Record a token operation.

        ``old_to_new`` is (B, N_old) long: the new index each old token went to
        (merged tokens share one), or -1 for a token that left the sequence;
        dropped tokens keep their last features in ``self.last``.
        """
        if not self.track:
            return
        B, N_old, C = x_old.shape
        if self.origin is None:
            self.origin = torch.arange(self.n0, device=x_old.device).expand(B, -1).clone()
        if self.last is None:
            self.last = x_old.new_zeros(B, self.n0, C)
        alive = self.origin >= 0
        cur = self.origin.clamp(min=0)
        new = torch.gather(old_to_new, 1, cur)
        dropped_now = alive & (new < 0)
        if dropped_now.any():
            feats = torch.gather(x_old, 1, cur.unsqueeze(-1).expand(-1, -1, C))
            self.last = torch.where(dropped_now.unsqueeze(-1), feats.to(self.last.dtype), self.last)
        self.origin = torch.where(alive, new, self.origin)


# --------------------------------------------------------------------------- the reducer contract
class Reducer:
    """Base class of every token-reduction method.

    Subclasses set ``name``, ``options`` (name -> :class:`Option`) and
    ``summary``, and override the hooks they need.  Defaults describe the
    unreduced model, so ``Reducer`` itself behaves as ``none``.
    """

    name: ClassVar[str] = "none"
    summary: ClassVar[str] = "unreduced model"
    options: ClassVar[dict[str, Option]] = {}
    # Flags the harness reads
    needs_training: ClassVar[bool] = False  # off-the-shelf numbers are meaningless without it
    changes_token_count: ClassVar[bool] = True
    # Lines the report tables add when the method has rows, by table ("accuracy"; "structure": FLOPs and
    # throughput; "flops"; "segmentation"; "ablations"; "learned_structure"; "published": the
    # published-vs-reproduced table; in "accuracy", "{model}" is replaced by the table's model); plain
    # text, no behaviour
    report_notes: ClassVar[dict[str, str]] = {}
    # Publications (the ``source`` names of bench/data_files/paper_numbers.csv) whose GFLOPs follow this
    # method's own rule (flops_conventions' PAPER_COUNT key) rather than the suite's count
    paper_count_sources: ClassVar[tuple[str, ...]] = ()
    # A published row of this method that states no configuration means the defaults (the defaults
    # were chosen to be the publication's headline setting)
    defaults_are_published: ClassVar[bool] = False
    # Shown in the note column of the method's off-the-shelf accuracy rows: what such a row is and
    # is not (e.g. a calibrated-only model that is known to lose heavily before fine-tuning)
    off_the_shelf_note: ClassVar[Optional[str]] = None

    def __init__(self, **opts: Any):
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            valid = ", ".join(sorted(self.options)) or "(none)"
            raise ConfigError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for reducer '{self.name}'; "
                f"valid options: {valid}"
            )
        self.cfg: dict[str, Any] = {}
        for key, opt in self.options.items():
            raw = opts.get(key, opt.default)
            try:
                self.cfg[key] = opt.parse(raw) if key in opts else opt.default
            except ConfigError as e:
                raise ConfigError(f"bad value for {self.name}:{key}={raw!r}: {e}") from None
        self.validate_options()

    # -- configuration --------------------------------------------------------------
    def validate_options(self) -> None:
        """Model-independent checks of ``self.cfg`` (ranges).  Raise ConfigError."""

    def check(self, info: ModelInfo) -> None:
        """Model-dependent checks (layer indices, token budgets).  Raise ConfigError."""

    def spec(self) -> str:
        """Canonical spec: the name plus every option that differs from its default."""
        parts = [
            f"{k}={self.format_option(k, v)}"
            for k, v in sorted(self.cfg.items())
            if v != self.options[k].default
        ]
        return self.name + (":" + ",".join(parts) if parts else "")

    def format_option(self, key: str, value: Any) -> str:
        return format_value(value)

    def full_spec(self) -> str:
        """Spec with every option spelled out (used as a cache key)."""
        parts = [f"{k}={self.format_option(k, v)}" for k, v in sorted(self.cfg.items())]
        return self.name + (":" + ",".join(parts) if parts else "")

    def __repr__(self) -> str:
        return f"<reducer {self.spec()}>"

    # -- patching ---------------------------------------------------------------------
    def on_patch(self, model, info: ModelInfo) -> None:
        """Called after the class swap: create parameters under ``model.reducer_modules``."""

    def on_unpatch(self, model) -> None:
        """Called before the class swap is undone."""

    # -- checkpointing -------------------------------------------------------------------
    def export_state(self) -> dict:
        """Non-parameter structure a checkpoint must hold to rebuild the patched model
        (e.g. PM's per-layer token counts and masks).  Tensors allowed; saved by
        ``bench.runtime.checkpoint`` next to the model state_dict and the spec."""
        return {}

    def import_state(self, state: dict) -> None:
        """Restore what :meth:`export_state` returned; called *before* :func:`bench.core.patch.apply`."""

    # -- per-forward hooks (called by the shared block) ---------------------------------
    def begin(self, model, x: torch.Tensor, state: TokenState) -> None:
        """Start of a forward pass, after patch embedding and position embedding."""

    def pre_block(self, i: int, block, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        return x

    def attn_request(self, i: int, block, x: torch.Tensor, state: TokenState) -> AttnRequest:
        return NO_REQUEST

    def post_attn(self, i: int, block, x: torch.Tensor, extras: dict, state: TokenState) -> torch.Tensor:
        return x

    def post_block(self, i: int, block, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        return x

    def end(self, model, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        """After the last block, before the final norm."""
        return x

    # -- declarations for the FLOPs model ------------------------------------------------
    def token_schedule(self, info: ModelInfo) -> list[BlockTokens]:
        n = info.n_tokens
        return [BlockTokens(n, n) for _ in range(info.depth)]

    def implementation(self, info: ModelInfo) -> Optional[str]:
        """How this configuration runs at inference, for a method with several implementations whose
        cost differs (the FLOPs table's ``implementation`` column; e.g. PM: sparse gathers or dense
        matmuls for its merge/reconstruct matrices); None: the method has one."""
        return None

    def extra_macs(self, info: ModelInfo) -> int:
        """MACs of the method's own modules (predictors, merge matrices, fusion)."""
        return 0

    def flops_conventions(self, info: ModelInfo) -> dict:
        """Named counts made by other conventions than the suite's (``bench.core.flops.analytic``), e.g. a
        paper's own rule or an official code's formula; ``{}`` when the method has none.

        The key :data:`PAPER_COUNT` (MACs, an int) is the count the method's own publication made
        its GFLOPs with: the published-vs-reproduced table compares a paper's figure with it
        (the sources in ``paper_count_sources``).  Every other key is reported as is (JSON-able)
        next to the suite's count by ``pmbench flops`` and the cost stage (``method_conventions``).
        The suite's tables always use the suite's own count."""
        return {}

    # -- dense prediction ------------------------------------------------------------------
    def restore(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        """Map the final (reduced) tokens back to the full token grid, prefix tokens first.

        The default uses the grid tracking of :class:`TokenState`: a token still in
        the sequence is copied from the token that carries it (ToMe: its merged
        token), a dropped token keeps its last features.
        """
        if state is None or state.origin is None:
            return x
        B, N, C = x.shape
        origin = state.origin
        alive = origin >= 0
        gathered = torch.gather(x, 1, origin.clamp(min=0).unsqueeze(-1).expand(-1, -1, C))
        last = state.last.to(x.dtype) if state.last is not None else torch.zeros_like(gathered)
        return torch.where(alive.unsqueeze(-1), gathered, last)

    # -- reporting ------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"name": self.name, "spec": self.spec(), "options": dict(self.cfg)}


class Trainable(Reducer):
    """Capability: a method with its own fine-tuning (a recipe, extra losses, per-parameter learning
    rates or a per-step schedule).  The shared trainer (``bench.runtime.train``) and the stages ask
    ``isinstance(red, Trainable)``; any other reducer is fine-tuned with the trainer's defaults."""

    needs_teacher: ClassVar[bool] = False  # extra_losses wants the unreduced teacher's outputs

    def recipe(self, info: ModelInfo) -> dict:
        """The method's fine-tuning defaults as ``bench.runtime.train.TrainConfig`` field overrides
        (e.g. distillation weights, learning rate, epochs scaled to the profile)."""
        return {}

    def extra_losses(self, model, outputs, targets, state: Optional[TokenState], teacher_out=None) -> dict:
        """Extra training losses (already weighted), e.g. DynamicViT's ratio loss.

        ``state`` is the student's last TokenState; ``teacher_out`` (when the
        trainer runs a teacher) is a dict with ``logits`` and ``features`` (the
        teacher's normed tokens from ``forward_features``)."""
        return {}

    def lr_multiplier(self, name: str, epoch: float, num_epochs: float) -> float:
        """Learning-rate multiplier of parameter ``name`` (as in ``model.named_parameters()``) at a
        (fractional) epoch of a schedule of ``num_epochs`` epochs (fractional for a schedule shorter
        than one epoch); 0 freezes it for that step."""
        return 1.0

    def on_step(self, model, epoch: float, num_epochs: float) -> None:
        """Called before every training step; ``epoch`` is fractional (e.g. EViT's keep-rate schedule)."""


def keep_map(idx: torch.Tensor, n_tokens: int, n_prefix: int) -> torch.Tensor:
    """The ``old_to_new`` map (:meth:`TokenState.remap`) of a top-k selection: the prefix tokens stay in
    front, the kept patch tokens ``idx`` (B, k; patch indices in the order they are kept) follow them,
    every other token maps to -1 (left the sequence; a method that merges them may overwrite that)."""
    B, k = idx.shape
    old_to_new = torch.full((B, n_tokens), -1, dtype=torch.long, device=idx.device)
    old_to_new[:, :n_prefix] = torch.arange(n_prefix, device=idx.device)
    old_to_new.scatter_(1, idx + n_prefix, (n_prefix + torch.arange(k, device=idx.device)).expand(B, -1))
    return old_to_new


PAPER_COUNT = "paper_count_macs"  # the key of Reducer.flops_conventions the published table compares with


def split_conventions(red: "Reducer", info: ModelInfo) -> tuple[Optional[int], dict]:
    """``(paper count in MACs or None, the other named counts)`` of ``red.flops_conventions(info)``."""
    conv = dict(red.flops_conventions(info))
    return conv.pop(PAPER_COUNT, None), conv


# --------------------------------------------------------------------------- declared capabilities
class Calibrated(Reducer):
    """Capability: a method whose structure is learned from data before it is used (Prune and Merge's
    per-layer centres; a plug-in's token scores).  The harness asks ``isinstance(red, Calibrated)``,
    never the method's name, and then

    1. patches the backbone with the reducer and calls :meth:`calibrate` on batches of its training
       split (classification: images and labels; segmentation: crops and pixel labels);
    2. re-patches the model (:func:`bench.core.patch.apply`), so modules built from the structure are
       rebuilt, and saves a checkpoint: :meth:`Reducer.export_state` carries the structure there, and
       :meth:`Reducer.import_state` brings it back before the reducer is patched onto a model;
    3. evaluates, fine-tunes, counts, times and segments with that structure; a checkpoint's
       structure reaches a reducer through :func:`bench.runtime.checkpoint.load_structure`.
    """

    structure_name: ClassVar[str] = "learned structure"  # what error messages call it
    default_structure: ClassVar[str] = "the method's data-free default structure"  # used before calibration
    def calibrate(self, model, batches, info: ModelInfo, *, loss_fn=None, iters: Optional[int] = None,
                  device=None, progress=None, meta: Optional[dict] = None, **options) -> dict:
        """Learn the structure on ``batches`` and adopt it; returns a JSON-able summary.

        ``model`` is patched with this reducer and maps a batch's inputs to logits; ``batches`` yields
        ``(inputs, targets)``; ``loss_fn(logits, targets)`` is the loss to score with (default: cross
        entropy; segmentation passes per-pixel logits with ignored pixels at -100); at most ``iters``
        batches are used.  ``meta`` is recorded with the structure (e.g. the task).  The summary may
        hold ``per_layer``: ``[{"layer": i, "tokens": n}, ...]`` for the per-block structure table.
        ``progress(iterations, images, seconds)``, if given, is called after each batch.

        Under torchrun (``pmbench calibrate``, which the pipeline launches with ``--nproc``) every
        rank calls this on its shard of the batches: combine the statistics over the ranks before
        choosing the structure (:func:`bench.runtime.distributed.all_reduce_sum`), so every rank adopts the
        same one."""
        raise NotImplementedError

    @property
    def calibrated(self) -> bool:
        """Whether the reducer holds a learned structure (not its data-free default)."""
        raise NotImplementedError

    def structure_in(self, checkpoint: dict) -> Optional[dict]:
        """The exported structure inside a checkpoint dict (None when it holds none)."""
        st = checkpoint.get("reducer_state") if isinstance(checkpoint, dict) else None
        return st or None


def keep_count(keep: float, n: int) -> int:
    """EViT's rule: ceil(keep * n) tokens kept out of n, computed in floating point exactly
    as the official code does (``math.ceil(keep_rate * (N - 1))``), clamped to [1, n]."""
    return max(1, min(n, math.ceil(keep * n)))
