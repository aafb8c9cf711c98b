"""``pmbench train``: pretrain the proxy backbone or fine-tune a reduced model (torchrun-aware).

Config precedence: ``TrainConfig`` defaults < the reducer's ``recipe(info)`` < explicit flags.
For fine-tuning, ``--init CKPT`` (or ``--weights FILE`` / ``--pretrained``) gives the
student's starting weights and ``--teacher self`` is that same unreduced model.
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import asdict, fields

from bench.cli import emit
from bench.core import patch, registry
from bench.core.reducer import ConfigError, ModelInfo, Trainable
from bench.runtime import data as data_mod, distributed as dist, env, models, preprocess as pp
from bench.runtime.train import (RUN_FIELDS, DataJob, TrainConfig, build_loaders, compose_config, run_extra,
                                 seed_everything, train)


def _block_list(v: str) -> list[int]:
    """``3,6,9`` -> [3, 6, 9] (block indices of --deep-supervision)."""
    try:
        return [int(b) for b in v.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated block indices such as 3,6,9, not {v!r}") from None


# flag -> TrainConfig field (all default None = "not given")
_FLAGS = [
    ("--epochs", float, "epochs"), ("--batch-size", int, "batch_size"), ("--lr", float, "lr"),
    ("--min-lr", float, "min_lr"), ("--warmup-epochs", float, "warmup_epochs"),
    ("--weight-decay", float, "weight_decay"), ("--clip-grad", float, "clip_grad"),
    ("--label-smoothing", float, "label_smoothing"), ("--mixup", float, "mixup"), ("--cutmix", float, "cutmix"),
    ("--distill", str, "distill"), ("--distill-alpha", float, "distill_alpha"), ("--distill-tau", float, "distill_tau"),
    ("--distill-form", str, "distill_form"), ("--seed", int, "seed"), ("--max-steps", int, "max_steps"),
    ("--log", str, "log_path"), ("--ckpt-every-steps", int, "ckpt_every_steps"),
    ("--deep-supervision", _block_list, "deep_supervision"),
    ("--deep-supervision-weight", float, "deep_supervision_weight"),
]


def add_parser(sub):
    p = sub.add_parser("train", help="train / fine-tune a model (+ reducer) with the suite's trainer")
    p.add_argument("--model", default="pmbench_proxy_vit", help="timm model name (default: %(default)s)")
    p.add_argument("--reducer", default="none", help="reducer spec (default: none)")
    p.add_argument("--data", default="proxy", help="proxy | proxy:smoke | imagenet:PATH (default: proxy)")
    p.add_argument("--img-size", type=int, default=None)
    pp.add_arguments(p)
    p.add_argument("--labels", default="auto", choices=data_mod.LABEL_MODES,
                   help="label indices: auto (ImageNet synset folders in canonical order for a 1000-class "
                        "model, else sorted folders), imagenet-1k or folders")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--init", default=None, help="start from this pmbench checkpoint (e.g. the proxy backbone)")
    src.add_argument("--weights", default=None, help="start from a local timm/DeiT .pth/.safetensors file")
    src.add_argument("--pretrained", action="store_true", help="start from the hub weights (pinned tag)")
    p.add_argument("--teacher", default=None, help="none | self | CHECKPOINT (default: self when needed)")
    p.add_argument("--config", default=None, metavar="JSON",
                   help="a JSON file of TrainConfig fields, applied over the reducer's recipe (the flags below "
                        "win); how the orchestrator hands a fine-tuning recipe to torchrun")
    for flag, typ, dest in _FLAGS:
        p.add_argument(flag, type=typ, default=None, dest=dest)
    p.add_argument("--eval-mode", action="store_true", help="keep model.eval() while training (train_mode=False)")
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--max-train-images", type=int, default=None)
    p.add_argument("--max-val-images", type=int, default=None)
    p.add_argument("--no-val", action="store_true", help="skip the per-epoch validation")
    p.add_argument("--out", default=None, help="checkpoint path (written atomically)")
    p.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=run)


def build_student(args, n_classes: int):
    """(student model unpatched or patched, reducer, unreduced copy for the teacher or None)."""
    from bench.runtime.checkpoint import load_model

    red_spec = args.reducer
    base = None
    if args.init:
        model, red = load_model(args.init, args.model, reducer=red_spec if red_spec != "none" else None)
        if red.name != "none":
            base, _ = load_model(args.init, args.model)
            if patch.is_patched(base):
                patch.remove(base)
        else:
            base = model
        return model, red, base
    if args.weights or args.pretrained:
        from bench.runtime.weights import load_pretrained

        model = load_pretrained(args.model, weights=args.weights, num_classes=n_classes, img_size=args.img_size)
    else:
        kw = {"img_size": args.img_size} if args.img_size else {}
        model = models.create(args.model, num_classes=n_classes, **kw)
    base = model
    red = registry.build(red_spec)
    if red.name != "none":
        base = copy.deepcopy(model)
        patch.apply(model, red)
    return model, red, base


def check_args(args) -> dict:
    """Bad values fail here, before any data, model or compute: 0 and negative counts are errors,
    never read as "not given"; --out / --log must be writable file paths.  Returns the ``--config``
    file's TrainConfig fields ({} without one), read and checked once."""
    from bench.runtime.outputs import check_out_file, finite, positive

    for flag, dest in (("--batch-size", "batch_size"), ("--max-steps", "max_steps"),
                       ("--ckpt-every-steps", "ckpt_every_steps"), ("--img-size", "img_size"),
                       ("--max-train-images", "max_train_images"), ("--max-val-images", "max_val_images")):
        positive(getattr(args, dest), flag)
    positive(args.epochs, "--epochs", kind="float")
    positive(args.lr, "--lr", kind="float")
    for flag, dest in (("--min-lr", "min_lr"), ("--warmup-epochs", "warmup_epochs"),
                       ("--weight-decay", "weight_decay"), ("--mixup", "mixup"), ("--cutmix", "cutmix"),
                       ("--distill-alpha", "distill_alpha")):
        finite(getattr(args, dest), flag, low=0.0)
    finite(args.label_smoothing, "--label-smoothing", low=0.0, high=0.999999)
    finite(args.clip_grad, "--clip-grad", low=0.0, low_open=True)
    finite(args.distill_tau, "--distill-tau", low=0.0, low_open=True)
    if args.seed is not None and args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    check_out_file(args.out, "--out")
    check_out_file(args.log_path, "--log")
    if args.resume and not args.out:
        raise ConfigError("--resume continues from --out; give --out CHECKPOINT")
    return read_config(args.config, {f.name for f in fields(TrainConfig)})


# TrainConfig fields that flags of this command set (refused in --config, named with their flag)
_CONFIG_BY_FLAG = dict(zip(RUN_FIELDS, ("--device", "--out", "--resume", "--no-progress", "(written by the command)")))


def read_config(path, fields_) -> dict:
    """``--config FILE``: TrainConfig fields as a JSON object; unknown or flag-owned keys are errors."""
    if path is None:
        return {}
    import json

    try:
        with open(path) as fh:
            d = json.load(fh)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of TrainConfig fields")
    unknown = sorted(set(d) - set(fields_))
    if unknown:
        raise ConfigError(f"--config {path}: unknown TrainConfig field(s) {unknown}; known: {', '.join(sorted(fields_))}")
    owned = sorted(k for k in d if k in _CONFIG_BY_FLAG)
    if owned:
        raise ConfigError(f"--config {path}: {', '.join(owned)} are set by flags ("
                          + ", ".join(_CONFIG_BY_FLAG[k] for k in owned) + "), not by the config file")
    return d


def _teacher(args, cfg, red, model, base) -> tuple:
    """(teacher model or None, its spec) from ``--teacher``: ``self`` (a copy of the unreduced starting
    weights), a checkpoint (unpatched) or none; the default is ``self`` when distillation or the
    reducer needs a teacher."""
    teacher = None
    wants_teacher = cfg.distill != "none" or (isinstance(red, Trainable) and red.needs_teacher)
    tspec = args.teacher if args.teacher is not None else ("self" if wants_teacher else "none")
    if tspec == "self":
        if base is None or (base is model and red.name != "none"):
            raise ConfigError("--teacher self needs the unreduced starting weights: give --init or --weights")
        if not (args.init or args.weights or args.pretrained):
            raise ConfigError("--teacher self: the model starts from random weights; give --init/--weights or a "
                              "--teacher CHECKPOINT")
        teacher = copy.deepcopy(base) if base is model else base
    elif tspec not in ("none", None):
        from bench.runtime.checkpoint import load_model

        teacher, tred = load_model(tspec)
        if patch.is_patched(teacher):
            patch.remove(teacher)
    if wants_teacher and teacher is None:
        raise ConfigError(f"distill={cfg.distill} / reducer '{red.spec()}' needs a teacher: --teacher self or PATH")
    return teacher, tspec


def run(args):
    config_file = check_args(args)
    pp.merge_size_flags(args)
    dist.init(args.device)
    main = dist.is_main()

    info_data = data_mod.describe_data(args.data)
    # Seed before the model exists: a from-scratch run's initial weights come from the global RNG,
    # and an unseeded init made two identical `pmbench train` commands disagree.
    seed_everything(args.seed if args.seed is not None else TrainConfig().seed)
    model, red, base = build_student(args, info_data["num_classes"])
    models.require_vit(model, args.model)
    # labels checked against the model's head, preprocessing from the model, before any compute
    labels = data_mod.resolve_labels(data_mod.data_root(args.data), model.num_classes, args.labels)
    info_data = data_mod.describe_data(args.data, labels=labels)
    prep = pp.from_args(args, args.model, model)
    minfo = ModelInfo.from_model(model)

    flags = {dest: getattr(args, dest) for _, _, dest in _FLAGS if getattr(args, dest) is not None}
    if args.eval_mode:
        flags["train_mode"] = False
    cfg_d = compose_config(red, minfo, None, config_file, flags,
                           dict(device=args.device, ckpt_path=args.out, resume=args.resume, progress=not args.no_progress))
    cfg_d["extra"] = run_extra(info_data, args.model, red, prep, init=args.init, weights=args.weights)
    cfg = TrainConfig.from_dict(cfg_d)

    teacher, tspec = _teacher(args, cfg, red, model, base)

    train_loader, val_loader = build_loaders(
        DataJob(args.data, prep, labels, workers=args.workers, distributed=dist.is_distributed(),
                max_train_images=args.max_train_images, max_val_images=args.max_val_images,
                validate=not args.no_val), cfg)
    if main and not args.json:
        print(f"training {args.model} reducer {red.spec()} on {info_data['source']} data "
              f"({len(train_loader.dataset)} train images, {dist.world_size()} process(es)) "
              f"for {cfg.epochs} epochs", file=sys.stderr)
    hist = train(model, train_loader, cfg, teacher=teacher, val_loader=val_loader)
    last = hist["epochs"][-1] if hist["epochs"] else {}
    out = {
        "model": args.model, "reducer": red.spec(), "reducer_full": red.full_spec(), "data": info_data,
        "preprocess": prep.as_dict(), "checkpoint": args.out,
        "wall_s": round(hist["wall_s"], 2), "steps": hist["final_step"], "epochs": cfg.epochs,
        "world_size": dist.world_size(), "val_top1": last.get("val_top1"), "val_top5": last.get("val_top5"),
        "history": hist["epochs"], "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
        "teacher": tspec, "stamp": env.stamp(dist.device_for_rank(args.device)),
    }
    if main:
        txt = (f"done in {hist['wall_s']:.0f} s ({hist['final_step']} steps); val top-1 {last.get('val_top1')}"
               + (f"; checkpoint {args.out}" if args.out else ""))
        emit(out, args.json, txt)
    dist.cleanup()
    return 0
