"""One training loop for proxy pretraining and for fine-tuning reduced models.

DeiT's recipe pieces: AdamW with no weight decay on 1-D parameters (norms,
biases) and on position embeddings / CLS, distillation and register tokens;
per-step cosine schedule with linear warm-up; gradient clipping; AMP on CUDA;
mixup / cutmix / label smoothing through ``timm.data.Mixup``; soft or hard
distillation from a teacher (the unreduced model) exactly as DeiT's
``DistillationLoss``::

    soft KD = kl_div(log_softmax(s/T), log_softmax(t/T), reduction="sum", log_target=True) * T*T / s.numel()
    hard KD = cross_entropy(s, t.argmax(1))
    distill_form "deit": (1 - a) * base + a * KD        "add": base + a * KD  (Prune and Merge)

A reducer of the model (``bench.core.patch.get_reducer``) with the
:class:`bench.core.reducer.Trainable` capability plugs in through its training hooks:
``lr_multiplier`` (per parameter and step), ``extra_losses`` (added to the loss
and logged), ``on_step`` and ``needs_teacher``.  ``reducer.recipe`` is *not*
applied here (the CLI merges it into the config defaults), so ``train`` does
exactly what its config says.

Exact resume: every step re-seeds the RNGs from (seed, step, rank) and the
sampler's per-epoch permutation is seeded, so training N steps straight equals
training k, saving, resuming and training N - k (with ``workers=0``).
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from bench.core import patch
from bench.core.reducer import ConfigError, Trainable
from bench.runtime import data as data_mod, distributed as dist
from bench.runtime.checkpoint import read_checkpoint, save_checkpoint

NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token", "pos_embed_prefix")


@dataclass
class TrainConfig:
    epochs: float = 1.0
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    clip_grad: Optional[float] = None
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    distill: str = "none"  # none | soft | hard
    distill_alpha: float = 0.5
    distill_tau: float = 1.0
    distill_form: str = "deit"  # deit: (1-a)*CE + a*KD | add: CE + a*KD
    train_mode: bool = True  # False: keep model.eval() while training (EViT fine-tuning, PM calibration)
    # deep supervision: the CLS token after each of these blocks (0-based) is also classified, by the
    # model's own final norm and head, and the mean of those losses (x the weight) is added
    deep_supervision: list = field(default_factory=list)
    deep_supervision_weight: float = 1.0
    amp: Optional[bool] = None  # None: on for CUDA
    seed: int = 0
    device: Optional[str] = None
    max_steps: Optional[int] = None
    log_path: Optional[str] = None
    log_every: int = 10
    ckpt_path: Optional[str] = None
    ckpt_every_steps: Optional[int] = None
    resume: bool = False
    find_unused_parameters: Optional[bool] = None  # DDP; None: on when the model has reducer modules
    progress: bool = True
    extra: dict = field(default_factory=dict)  # stored in checkpoints (e.g. data description)

    def validate(self) -> None:
        """Every value checked up front: 0 and negative counts and non-finite rates are errors,
        never read as "not given"."""
        if self.distill not in ("none", "soft", "hard"):
            raise ConfigError(f"distill must be none, soft or hard, not {self.distill!r}")
        if self.distill_form not in ("deit", "add"):
            raise ConfigError(f"distill_form must be deit or add, not {self.distill_form!r}")
        for name in ("epochs", "lr", "min_lr", "warmup_epochs", "warmup_lr", "weight_decay", "label_smoothing",
                     "mixup", "cutmix", "distill_alpha", "distill_tau", "clip_grad", "deep_supervision_weight"):
            v = getattr(self, name)
            if v is None and name == "clip_grad":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, got {v!r}")
            if v < 0:
                raise ConfigError(f"{name} must be >= 0, got {v}")
        for name in ("batch_size", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {v!r}")
        for name in ("max_steps", "ckpt_every_steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a whole number >= 1 (or not given), got {v!r}")
        if self.epochs == 0 and self.max_steps is None:
            raise ConfigError("epochs must be > 0 (epochs 0 needs max_steps, which then sets the schedule)")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"clip_grad must be > 0 (or not given), got {self.clip_grad}")
        if self.distill_tau <= 0:
            raise ConfigError(f"distill_tau must be > 0, got {self.distill_tau}")
        if self.label_smoothing >= 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        ds = self.deep_supervision
        if not isinstance(ds, (list, tuple)) or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in ds) \
                or len(set(ds)) != len(ds):
            raise ConfigError(f"deep_supervision must be a list of distinct block indices >= 0, got {ds!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ConfigError(f"unknown TrainConfig field(s) {bad}; valid: {sorted(names)}")
        return cls(**d)


# TrainConfig fields that describe one run, not a recipe: set by the caller (``pmbench train``'s flags),
# never by a recipe or a config file
RUN_FIELDS = ("device", "ckpt_path", "resume", "progress", "extra")


def compose_config(red, info, source_defaults: Optional[dict] = None, *later: dict) -> dict:
    """The one composition of a training configuration, for ``pmbench train`` and the pipeline's
    fine-tuning alike: TrainConfig's defaults < ``source_defaults`` (the caller's baseline) < the
    reducer's recipe (:meth:`bench.core.reducer.Trainable.recipe`) < each of ``later`` in order (a config
    file, flags, the run's settings, a data source's overrides).  Returns a complete field dict; a
    recipe field TrainConfig does not have is a ConfigError naming the reducer."""
    defaults = TrainConfig()
    d = {f.name: getattr(defaults, f.name) for f in fields(TrainConfig)}
    d.update(source_defaults or {})
    recipe = red.recipe(info) if isinstance(red, Trainable) else {}
    bad = sorted(set(recipe) - set(d))
    if bad:
        raise ConfigError(f"reducer '{red.spec()}' recipe sets unknown TrainConfig fields {bad}")
    d.update(recipe)
    for layer in later:
        d.update(layer)
    return d


@dataclass
class DataJob:
    """The data side of one training run (``pmbench train``'s data flags): which split to read, how
    to preprocess and label it, and how much of it."""
    data: str  # a data spec: proxy | proxy:SIZE | imagenet:PATH
    prep: object  # bench.runtime.preprocess.Preprocess
    labels: object  # bench.runtime.data.LabelSpace
    workers: int = 0
    distributed: bool = False
    max_train_images: Optional[int] = None
    max_val_images: Optional[int] = None
    validate: bool = True  # False: no per-epoch validation loader


def build_loaders(job: DataJob, cfg: "TrainConfig") -> tuple:
    """(train loader, validation loader or None) of ``job`` at ``cfg``'s batch size and seed; the one
    place a training run's loaders are made (``pmbench train``, the proxy backbone)."""
    train_loader = data_mod.build_loader(job.data, "train", cfg.batch_size, train=True, prep=job.prep,
                                         labels=job.labels, workers=job.workers, distributed=job.distributed,
                                         max_images=job.max_train_images, seed=cfg.seed)
    val_loader = None
    if job.validate:
        val_loader = data_mod.build_loader(job.data, "val", max(1, cfg.batch_size * 2), prep=job.prep,
                                           labels=job.labels, workers=job.workers, distributed=job.distributed,
                                           max_images=job.max_val_images)
    return train_loader, val_loader


def run_extra(data_info: dict, model_name: str, red, prep, **sources) -> dict:
    """TrainConfig.extra of a run (stored in its checkpoints): the data, the model, the reducer, the
    preprocessing and where the starting weights came from (``init``, ``weights``)."""
    return {"data": data_info, "model_name": model_name, "reducer": red.spec(), "init": sources.get("init"),
            "weights": sources.get("weights"), "reducer_full": red.full_spec(), "preprocess": prep.as_dict()}


class TrainingDiverged(ConfigError):
    """The loss or the updated weights became non-finite; no checkpoint was written after it."""


# --------------------------------------------------------------------------- pieces
def nonfinite_weights(model) -> Optional[str]:
    """Name of the first floating-point weight or buffer holding NaN/inf, or None."""
    for name, t in model.state_dict().items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2 ** 31)


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups, one per trainable parameter (``name``): its learning rate is set every step, the
    schedule's times the reducer's :meth:`~bench.core.reducer.Trainable.lr_multiplier`; no weight decay on
    1-D parameters, biases and tokens."""
    out = []
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES or name.endswith(".bias")
        out.append({"params": [p], "weight_decay": 0.0 if no_decay else weight_decay, "name": name})
    return out


class CosineSchedule:
    """Per-step linear warm-up then cosine to ``min_lr`` (timm's CosineLRScheduler, t_in_epochs=False)."""

    def __init__(self, lr: float, min_lr: float, total_steps: int, warmup_steps: int, warmup_lr: float):
        self.lr, self.min_lr, self.total, self.warmup, self.warmup_lr = lr, min_lr, max(1, total_steps), warmup_steps, warmup_lr
        self.step_num = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / max(1, self.warmup)
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))

    def state_dict(self) -> dict:
        return {"step_num": self.step_num, "lr": self.lr, "min_lr": self.min_lr, "total": self.total,
                "warmup": self.warmup, "warmup_lr": self.warmup_lr}

    def load_state_dict(self, d: dict) -> None:
        self.step_num = int(d["step_num"])


def distill_loss(student_logits, teacher_logits, kind: str, tau: float) -> torch.Tensor:
    if kind == "soft":
        T = tau
        return F.kl_div(F.log_softmax(student_logits / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                        reduction="sum", log_target=True) * (T * T) / student_logits.numel()
    if kind == "hard":
        return F.cross_entropy(student_logits, teacher_logits.argmax(dim=1))
    raise ConfigError(f"unknown distillation kind {kind!r}")


def _split_outputs(out):
    if isinstance(out, (tuple, list)):
        return out[0], out[1]
    return out, out


def check_deep_supervision(model, blocks) -> None:
    """A ConfigError unless ``model`` can be deep-supervised at ``blocks``: a ViT with ``blocks``,
    ``norm`` and ``forward_head`` (timm's), and every index below its depth."""
    if not blocks:
        return
    if not all(hasattr(model, a) for a in ("blocks", "norm", "forward_head")):
        raise ConfigError(f"deep_supervision needs a timm ViT (blocks, norm, forward_head); "
                          f"{type(model).__name__} has not")
    bad = [b for b in blocks if b >= len(model.blocks)]
    if bad:
        raise ConfigError(f"deep_supervision blocks {bad} do not exist: the model has {len(model.blocks)} "
                          f"blocks (0-based indices 0..{len(model.blocks) - 1})")


def _aux_logits(model, tapped):
    """A tapped block output through the model's final norm and head.  A (B, C) tap is the CLS token alone
    (:class:`_BlockTaps`; the norm is per token, so the others would be wasted work); it is handed to
    ``forward_head`` as a one-token sequence, which it pools to that token."""
    if tapped.ndim == 2:
        return model.forward_head(model.norm(tapped).unsqueeze(1))
    return model.forward_head(model.norm(tapped))


class _BlockTaps:
    """Forward hooks that keep the output of the given blocks during one forward pass (for a CLS-pooled
    ViT, its CLS token).  The CLS token is selected inside the hook, as when the shipped proxy backbone was
    trained: selecting it after the forward changes the order in which autograd adds the gradients of a
    block's output, and the weights then differ in their last bits (docs/proxy.md)."""

    def __init__(self, model, blocks):
        self.model, self.blocks, self.out, self.hooks = model, list(blocks), [], []
        self.cls_only = getattr(model, "global_pool", "token") == "token"

    def __enter__(self):
        for i in self.blocks:
            self.hooks.append(self.model.blocks[i].register_forward_hook(
                lambda m, a, o: self.out.append(o[:, 0] if self.cls_only else o)))
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        return False


class JsonLog:
    def __init__(self, path: Optional[str], enabled: bool):
        self.fh = None
        if path and enabled:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(path, "a")

    def write(self, **rec) -> None:
        if self.fh:
            self.fh.write(json.dumps(rec, default=float) + "\n")
            self.fh.flush()

    def close(self):
        if self.fh:
            self.fh.close()


# --------------------------------------------------------------------------- the loop
def train(model, train_loader, cfg: TrainConfig, *, teacher=None, val_loader=None) -> dict:
    """Train ``model`` (patched or not) in place; returns the history (losses, accuracy, wall time)."""
    return _Trainer(model, train_loader, cfg, teacher, val_loader).run()


class _Trainer:
    """The state of one :func:`train` call; each piece of the loop is one method."""

    def __init__(self, model, train_loader, cfg: TrainConfig, teacher, val_loader):
        cfg.validate()
        self.t_start = time.time()
        self.cfg, self.train_loader, self.val_loader = cfg, train_loader, val_loader
        self.rank = dist.rank()
        self.device = device = torch.device(dist.device_for_rank(cfg.device))
        self.amp = (device.type == "cuda") if cfg.amp is None else bool(cfg.amp)
        seed_everything(cfg.seed + self.rank)
        model.to(device)
        self.model = model
        red = patch.get_reducer(model)
        self.reducer = red if isinstance(red, Trainable) else None  # the trainer's hooks: recipe losses, lr, schedule
        self.teacher = self._prepare_teacher(teacher)
        self._build_schedule()
        self.start_step = 0
        self.last_good: Optional[tuple] = None  # (path, step) of the newest checkpoint known finite
        if cfg.resume and cfg.ckpt_path and Path(cfg.ckpt_path).exists():
            self._resume()
        self.ddp_model = self._wrap_ddp()
        self.mixup_fn = self._make_mixup()
        self.log = JsonLog(cfg.log_path, dist.is_main())
        self.history = {"steps": [], "epochs": [], "total_steps": self.total_steps,
                        "schedule_steps": self.sched_steps, "steps_per_epoch": self.spe}
        self.sampler = getattr(train_loader, "sampler", None)
        self.pbar = None
        if cfg.progress and dist.is_main():
            from tqdm import tqdm

            self.pbar = tqdm(total=self.total_steps, initial=self.start_step, desc="train", file=sys.stderr,
                             mininterval=2.0, dynamic_ncols=True)
        self.step = self.start_step
        self.it = None
        self.cur_epoch = -1
        self.run_loss, self.run_n = 0.0, 0
        self.model_obj = unwrap(model)
        check_deep_supervision(self.model_obj, cfg.deep_supervision)

    # ----------------------------------------------------------------------- setup
    def _prepare_teacher(self, teacher):
        cfg, reducer = self.cfg, self.reducer
        use_teacher = cfg.distill != "none" or bool(reducer is not None and reducer.needs_teacher)
        if use_teacher and teacher is None:
            raise ConfigError("this training needs a teacher (distillation or the reducer's losses); "
                              "pass --teacher self (the unreduced model) or a checkpoint")
        if teacher is not None and use_teacher:
            teacher.to(self.device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            return teacher
        return None

    def _build_schedule(self) -> None:
        """Step counts, optimizer, learning-rate schedule and AMP scaler."""
        cfg = self.cfg
        self.spe = spe = len(self.train_loader)
        if spe == 0:
            raise ConfigError("the training loader yields no batches (dataset smaller than one batch?)")
        # the schedule spans cfg.epochs; max_steps only stops early (so a capped run equals the
        # first steps of the full one)
        self.sched_steps = max(1, int(round(cfg.epochs * spe))) if cfg.epochs > 0 else int(cfg.max_steps)
        self.total_steps = min(self.sched_steps, cfg.max_steps) if cfg.max_steps is not None else self.sched_steps
        # The reducers' schedule hooks get the schedule length in (possibly fractional) epochs and the
        # fractional epoch of each step, so fractions of a schedule (DynamicViT's 1/6 freeze) hold for
        # a schedule shorter than one epoch too.
        self.num_epochs = self.sched_steps / spe
        groups = param_groups(self.model, cfg.weight_decay)
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        self.sched = CosineSchedule(cfg.lr, cfg.min_lr, self.sched_steps, int(round(cfg.warmup_epochs * spe)),
                                    cfg.warmup_lr)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp and self.device.type == "cuda" else None

    def _resume(self) -> None:
        cfg, model = self.cfg, self.model
        ck = read_checkpoint(cfg.ckpt_path)
        unwrap(model).load_state_dict(ck["model"], strict=True)
        if "optimizer" in ck:
            self.opt.load_state_dict(ck["optimizer"])
        if "scheduler" in ck:
            self.sched.load_state_dict(ck["scheduler"])
        self.start_step = int(ck.get("step") or 0)
        if self.scaler is not None and "scaler" in ck.get("extra", {}):
            self.scaler.load_state_dict(ck["extra"]["scaler"])
        bad = nonfinite_weights(unwrap(model))
        if bad is not None:
            raise ConfigError(f"cannot resume from {cfg.ckpt_path}: its weights are not finite ({bad}); "
                              "start again from an earlier checkpoint")
        self.last_good = (cfg.ckpt_path, self.start_step)

    def _wrap_ddp(self):
        model, device = self.model, self.device
        if not dist.is_distributed():
            return model
        fu = self.cfg.find_unused_parameters
        if fu is None:
            fu = hasattr(unwrap(model), "reducer_modules") and len(list(unwrap(model).reducer_modules.parameters())) > 0
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=fu)

    def _make_mixup(self):
        cfg = self.cfg
        num_classes = unwrap(self.model).num_classes if hasattr(unwrap(self.model), "num_classes") else None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup

            return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                         num_classes=num_classes)
        return None

    # ----------------------------------------------------------------------- checks, epochs, checkpoints
    def _base_loss(self, logits, targets):
        if targets.ndim == 2:  # soft targets (mixup / cutmix)
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.cfg.label_smoothing)

    def _diverged(self, what: str, at: int) -> TrainingDiverged:
        """The error for a divergence in (1-based) step ``at``; nothing is saved after it."""
        if self.pbar is not None:
            self.pbar.close()
        self.log.write(event="diverged", step=at, reason=what)
        self.log.close()
        if self.last_good is not None:
            where = (f"the last good checkpoint {self.last_good[0]} (step {self.last_good[1]}) is intact: resume "
                     "it with --resume and a lower --lr or --clip-grad")
        elif self.cfg.ckpt_path:
            where = (f"no checkpoint was written by this run ({self.cfg.ckpt_path} untouched); "
                     "lower --lr or enable --clip-grad")
        else:
            where = "lower --lr or enable --clip-grad"
        return TrainingDiverged(f"training diverged at step {at} of {self.total_steps}: {what}; {where}")

    def _check_weights(self) -> None:
        bad = nonfinite_weights(self.model_obj)
        if bad is not None:
            raise self._diverged(f"its update made the weights non-finite ({bad})", self.step)

    def _end_epoch(self, e: int) -> None:
        self._check_weights()  # validation of NaN weights would report a meaningless score
        _end_epoch(e, self.history, self.log, self.model_obj, self.val_loader, self.device, self.amp,
                   self.run_loss, self.run_n)

    def _save_checked(self, done_steps: int) -> None:
        self._check_weights()
        if self.cfg.ckpt_path:
            _save(self.cfg, self.model_obj, self.opt, self.sched, done_steps, self.spe, self.scaler)
            self.last_good = (self.cfg.ckpt_path, done_steps)

    def _start_epoch(self, epoch: int) -> None:
        """Close the running epoch (if any) and position the loader at ``self.step`` of ``epoch``."""
        if self.cur_epoch >= 0:
            self._end_epoch(self.cur_epoch)
            self.run_loss, self.run_n = 0.0, 0
        self.cur_epoch = epoch
        sampler, spe, loader = self.sampler, self.spe, self.train_loader
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if sampler is not None and hasattr(sampler, "skip"):
            sampler.skip = (self.step % spe) * loader.batch_size  # consumed by the next pass
            self.it = iter(loader)
        else:
            self.it = iter(loader)
            for _ in range(self.step % spe):
                next(self.it)
        self.ddp_model.train(self.cfg.train_mode)

    # ----------------------------------------------------------------------- one step
    def _next_batch(self):
        s = _step_seed(self.cfg.seed, self.step, self.rank)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        x, y = next(self.it)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.mixup_fn is not None:
            if x.shape[0] % 2:
                x, y = x[:-1], y[:-1]
            x, y = self.mixup_fn(x, y)
        return x, y

    def _set_lr(self, epoch_f: float) -> float:
        """The learning rate of this step (x the reducer's per-parameter multiplier)."""
        lr = self.sched.lr_at(self.step)
        reducer = self.reducer
        for g in self.opt.param_groups:
            g["lr"] = lr * reducer.lr_multiplier(g["name"], epoch_f, self.num_epochs) if reducer is not None else lr
        return lr

    def _loss_terms(self, x, y) -> dict:
        """The named loss terms of one forward pass (base, distillation, the reducer's)."""
        cfg, teacher, reducer, model_obj = self.cfg, self.teacher, self.reducer, self.model_obj
        with _BlockTaps(model_obj, cfg.deep_supervision) as taps, patch.training_step(model_obj):
            out = self.ddp_model(x)  # (the reducer is told, not left to guess, that this is a step)
        logits, logits_kd = _split_outputs(out)
        terms = {"ce": self._base_loss(logits, y)}
        if taps.out:  # deep supervision: each tapped block's tokens through the model's own norm and head
            aux = [self._base_loss(_split_outputs(_aux_logits(model_obj, t))[0], y)
                   for t in taps.out]
            terms["deep_sup"] = cfg.deep_supervision_weight * sum(aux) / len(aux)
        teacher_out = None
        if teacher is not None:
            with torch.no_grad():
                f = teacher.forward_features(x)
                teacher_out = {"logits": teacher.forward_head(f), "features": f}
        if cfg.distill != "none":
            kd = distill_loss(logits_kd, teacher_out["logits"], cfg.distill, cfg.distill_tau)
            a = cfg.distill_alpha
            if cfg.distill_form == "deit":
                terms["ce"] = terms["ce"] * (1 - a)
                terms["kd"] = kd * a
            else:
                terms["kd"] = kd * a
        if reducer is not None:
            extra = reducer.extra_losses(model_obj, out, y, patch.last_state(model_obj), teacher_out)
            for k, v in (extra or {}).items():
                terms[k if k not in terms else f"reducer_{k}"] = v
        return terms

    def _backward_and_update(self, loss) -> None:
        cfg, opt, scaler = self.cfg, self.opt, self.scaler
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if cfg.clip_grad:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(self.ddp_model.parameters(), cfg.clip_grad)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.ddp_model.parameters(), cfg.clip_grad)
            opt.step()

    def _record(self, loss, terms: dict, lr: float, epoch_f: float, batch: int) -> None:
        """Running epoch loss, progress bar, step log and the periodic checkpoint after a step."""
        cfg, step = self.cfg, self.step
        lv = float(loss.detach())
        self.run_loss += lv * batch
        self.run_n += batch
        if self.pbar is not None:
            self.pbar.update(1)
            self.pbar.set_postfix(loss=f"{lv:.3f}", lr=f"{lr:.2e}", refresh=False)
        if step % cfg.log_every == 0 or step == self.total_steps:
            rec = {"step": step, "epoch": round(epoch_f, 4), "lr": lr, "loss": lv,
                   **{k: float(v.detach()) for k, v in terms.items()}}
            self.history["steps"].append(rec)
            self.log.write(**rec)
        if cfg.ckpt_path and cfg.ckpt_every_steps and step % cfg.ckpt_every_steps == 0 and step < self.total_steps:
            self._save_checked(step)  # only after the loss and the updated weights are checked finite

    def _train_step(self) -> None:
        epoch = self.step // self.spe
        if epoch != self.cur_epoch:
            self._start_epoch(epoch)
        x, y = self._next_batch()
        epoch_f = self.step / self.spe
        if self.reducer is not None:
            self.reducer.on_step(self.model_obj, epoch_f, self.num_epochs)
        lr = self._set_lr(epoch_f)
        device = self.device
        with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                            enabled=self.amp):
            terms = self._loss_terms(x, y)
            loss = sum(terms.values())
        if not torch.isfinite(loss):
            bad = {k: float(v.detach()) for k, v in terms.items() if not torch.isfinite(v.detach()).all()}
            raise self._diverged(f"the loss is {loss.item()}" + (f" ({', '.join(f'{k} {v}' for k, v in bad.items())})"
                                                                  if len(terms) > 1 and bad else ""), self.step + 1)
        self._backward_and_update(loss)
        self.step += 1
        self.sched.step_num = self.step
        self._record(loss, terms, lr, epoch_f, x.shape[0])

    def run(self) -> dict:
        while self.step < self.total_steps:
            self._train_step()
        if self.cur_epoch >= 0:
            self._end_epoch(self.cur_epoch)
        self._save_checked(self.step)  # the final weights are checked even without a checkpoint path
        if self.pbar is not None:
            self.pbar.close()
        history = self.history
        history["wall_s"] = time.time() - self.t_start
        history["final_step"] = self.step
        self.log.write(event="done", wall_s=history["wall_s"], step=self.step)
        self.log.close()
        return history


def _end_epoch(epoch, history, log, model, val_loader, device, amp, run_loss, run_n):
    rec = {"epoch": epoch, "train_loss": run_loss / max(1, run_n)}
    if val_loader is not None:
        from bench.runtime.evaluate import evaluate

        was = model.training
        res = evaluate(model, val_loader, device=device, amp=amp)
        model.train(was)
        rec.update({"val_top1": res["top1"], "val_top5": res["top5"], "val_loss": res["loss"]})
    history["epochs"].append(rec)
    log.write(event="epoch", **rec)


def _save(cfg, model, opt, sched, step, spe, scaler):
    if not dist.is_main():
        dist.barrier()
        return
    extra = dict(cfg.extra)
    extra["train_config"] = {k: v for k, v in asdict(cfg).items() if k != "extra"}
    if scaler is not None:
        extra["scaler"] = scaler.state_dict()
    save_checkpoint(cfg.ckpt_path, model, optimizer=opt, scheduler=sched, epoch=step // spe, step=step, extra=extra)
    dist.barrier()
