"""Where the accuracy stage gets its backbone, data and training: the proxy or the real thing.

``ProxySource``: the suite's synthetic dataset and proxy backbone (trained here, cached).
``RealSource``: ImageNet + pretrained weights (paper profile), or the same path on small
fixture data with a tiny model (``--fixture``, what the tests run).
"""
from __future__ import annotations

from pathlib import Path

import torch

from bench.core import registry
from bench.core.reducer import ConfigError, ModelInfo
from bench.runtime import proxy, proxy_backbone
from bench.runtime.calibration import calibrate_and_save
from bench.runtime.results import file_hash


class Source:
    model_name: str
    data: str
    data_label: str
    data_desc: dict
    img_size: tuple
    eval_batch: int = 128
    train_batch: int = 64
    calib_iters: int = 8
    calib_batch: int = 32

    @staticmethod
    def for_profile(ctx) -> list:
        p = ctx.profile
        if p["data_source"] == "proxy":
            return [ProxySource(ctx, size=p.get("proxy_size", "default"))]
        if getattr(ctx.args, "fixture", False):
            return [RealSource(ctx, None)]
        return [RealSource(ctx, m) for m in p["accuracy_models"]]

    def __init__(self, ctx):
        self.ctx = ctx
        self._val = None
        self._input = None

    # -- torchrun (``--nproc``; bench.runtime.launch) -----------------------------------------------
    @property
    def launcher(self):
        """The orchestrator's torchrun launcher, or None: calibrate, fine-tune and evaluate in this process."""
        return getattr(self.ctx, "launcher", None)

    @property
    def world(self) -> int:
        return self.launcher.world_size if self.launcher is not None else 1

    def launch_key(self) -> dict:
        """Cache-key part of a job whose result depends on the number of ranks (calibration scores summed
        over the ranks' shares of each batch, DDP fine-tuning): empty for one process, so one-process
        results (in this process or a one-rank torchrun) share their keys."""
        return {"world_size": self.world} if self.world > 1 else {}

    def check_launch(self) -> None:
        """Every global batch must split evenly over the ranks (checked before any compute)."""
        if self.launcher is not None:
            from bench.runtime.launch import per_rank_batch

            per_rank_batch(self.calib_batch, self.world, "calibration")
            per_rank_batch(self.train_batch, self.world, "fine-tuning")

    def cli_input_args(self) -> list:
        """The ``pmbench`` flags that make a launched command see exactly this source's model, data,
        preprocessing, labels and device."""
        p = self.prep
        labels = self.labels.kind if self.labels.kind in ("imagenet-1k", "folders") else "auto"
        # "cuda": each rank takes the GPU of its local rank (a fixed cuda:N would put every rank on one GPU)
        device = "cuda" if str(self.ctx.device).startswith("cuda") else str(self.ctx.device)
        return ["--model", self.model_name, "--data", self.data, "--img-size", str(p.img_size),
                "--crop-pct", repr(float(p.crop_pct)), "--interpolation", p.interpolation,
                "--mean", *[repr(float(v)) for v in p.mean], "--std", *[repr(float(v)) for v in p.std],
                "--labels", labels, "--device", device]

    def launch_eval(self, path, reducer=None, label=None) -> dict:
        """``pmbench eval`` of checkpoint ``path`` (``reducer``: applied off-the-shelf to an unreduced
        checkpoint; None: the checkpoint's own) under torchrun: the numbers of :meth:`evaluate`
        (top-1/top-5 recomputed from the exact counts, each image's outcome in dataset order), plus the
        GMACs, resolved spec and world size the command reports."""
        import csv

        args = ["eval", "--checkpoint", str(path), *self.cli_input_args(), "--batch-size", str(self.eval_batch),
                "--save-preds", "{job}/preds.csv"]
        if reducer is not None:
            args += ["--reducer", reducer]
        label = label or f"eval {reducer or Path(path).name}"

        def read(job, res):
            with open(job / "preds.csv", newline="") as fh:
                return res, sorted((int(r["index"]), int(r["correct"])) for r in csv.DictReader(fh))

        res, rows = self.launcher.run(args, label, read)
        n = res["n_images"]
        if len(rows) != n:
            raise RuntimeError(f"{label}: {len(rows)} per-image predictions for {n} images")
        return {"top1": 100.0 * res["correct_top1"] / n, "top5": 100.0 * res["correct_top5"] / n, "n_images": n,
                "correct": "".join(str(c) for _, c in rows), "gmacs": res["gmacs"],
                "reducer_full": res["reducer_full"], "world_size": res["world_size"]}

    # -- data ----------------------------------------------------------------------------
    def _resolve_input(self) -> None:
        """The model's preprocessing (its pretrained_cfg) and the data's label space, checked
        against the model's head before any compute."""
        if self._input is None:
            from bench.runtime import data as data_mod
            from bench.runtime import models, preprocess

            model = models.create(self.model_name)
            prep = preprocess.resolve(self.model_name, model, img_size=self.img_size[0])
            labels = data_mod.resolve_labels(data_mod.data_root(self.data), model.num_classes)
            self._input = (prep, labels)

    @property
    def prep(self):
        self._resolve_input()
        return self._input[0]

    @property
    def labels(self):
        self._resolve_input()
        return self._input[1]

    def input_key(self) -> dict:
        """What the data and its preprocessing are (part of every job's cache key)."""
        return {**self.data_desc, "preprocess": self.prep.key(), "labels": self.labels.kind}

    def val_loader(self):
        from bench.runtime.data import build_loader

        if self._val is None:
            self._val = build_loader(self.data, "val", self.eval_batch, prep=self.prep, labels=self.labels)
        return self._val

    def train_loader(self, batch_size: int, aug: bool = True):
        from bench.runtime.data import build_loader

        # shuffled (seeded) also without augmentation: calibration takes the first batches, and in
        # folder order those would hold the first class or two only (the official code shuffles too)
        return build_loader(self.data, "train", batch_size, train=aug, prep=self.prep, labels=self.labels,
                            shuffle=True)

    def evaluate(self, model) -> dict:
        """Top-1 with every image's outcome (``correct``: a 0/1 string in dataset order)."""
        from bench.runtime.evaluate import correct_bits, evaluate

        res = evaluate(model, self.val_loader(), device=self.ctx.device, keep_preds=True)
        res["correct"] = correct_bits(res.pop("preds"))
        return res

    # -- models ----------------------------------------------------------------------------
    def patched_backbone(self, spec: str):
        """The backbone with reducer ``spec`` applied; reducer modules (predictors, fusion) start from
        a seeded init, whatever ran before in this process, so every run builds the same model."""
        from bench.runtime.checkpoint import apply_off_the_shelf

        model = self.load_backbone()
        red = registry.build(spec)
        apply_off_the_shelf(model, red, img_size=self.img_size)
        return model, red

    def load_backbone(self):
        from bench.runtime.checkpoint import load_model

        model, _ = load_model(self.ensure_backbone(), self.model_name, device=self.ctx.device)
        return model.eval()

    def load_checkpoint(self, path):
        from bench.runtime.checkpoint import load_model

        return load_model(path, self.model_name, device=self.ctx.device)

    def _work(self, name: str) -> Path:
        d = self.ctx.work_dir / "checkpoints"
        d.mkdir(parents=True, exist_ok=True)
        return d / name

    def calibrate(self, spec: str, ctx, wait: bool = True) -> Path:
        """Calibrate a :class:`bench.core.reducer.Calibrated` method's structure on the training split; returns
        the checkpoint (cached by content).  In a job worker, a calibration another worker has claimed is
        waited for (``wait``) or skipped (:class:`bench.runtime.results.JobTaken`)."""
        name = registry.build(spec).name
        bb = self.ensure_backbone()
        desc = {"kind": f"{name}-calibrate", "spec": spec, "backbone": file_hash(bb), "data": self.input_key(),
                "iters": self.calib_iters, "batch": self.calib_batch, **self.launch_key()}
        out = self._work(f"{name}-{registry.build(spec).spec().replace(':', '_').replace('=', '').replace(',', '_')}"
                         f"-{file_hash(bb, 8)}{self._launch_tag()}.pt")

        def run():
            if self.launcher is not None:
                return self._launch_calibrate(spec, bb, out)
            model, red = self.patched_backbone(spec)
            summ = calibrate_and_save(model, red, self.train_loader(self.calib_batch, aug=False),
                                      iters=self.calib_iters, device=self.ctx.device, out=out,
                                      model_name=self.model_name)
            return {"path": str(out), "hash": file_hash(out), "per_layer": summ.get("per_layer"),
                    "sum_tokens": summ.get("sum_tokens")}

        rec = ctx.job(desc, run, f"{name}-calibrate {spec}", 15.0, wait=wait)
        if not Path(rec["path"]).exists() or file_hash(rec["path"]) != rec["hash"]:
            with ctx.cache.remeasure():
                rec = ctx.job(desc, run, f"{name}-calibrate {spec} (re-run: checkpoint missing)", 15.0, wait=True)
        ctx.structure_summaries[spec] = rec.get("per_layer")
        return Path(rec["path"])

    def _launch_tag(self) -> str:
        """File-name part of a launched job's checkpoint (never overwrites a one-process run's file)."""
        return f"-torchrun{self.world}" if self.launcher is not None else ""

    def _launch_calibrate(self, spec: str, bb: Path, out: Path) -> dict:
        """``pmbench calibrate`` under torchrun: the same images as one process (the global batch split
        over the ranks: the shuffled order's first ``batch`` images); the method combines its
        statistics over the ranks (``Calibrated.calibrate``)."""
        from bench.runtime.launch import per_rank_batch

        b = per_rank_batch(self.calib_batch, self.world, f"{registry.build(spec).name} calibration")
        res = self.launcher.run(["calibrate", "--init", str(bb), "--reducer", spec, *self.cli_input_args(),
                                 "--iters", str(self.calib_iters), "--batch-size", str(b), "--seed", "0",
                                 "--out", str(out)], f"calibrate {spec}")
        return {"path": str(out), "hash": file_hash(out), "per_layer": res.get("per_layer"),
                "sum_tokens": res.get("sum_tokens"), "world_size": res.get("world_size")}

    def _launch_finetune(self, spec: str, init, model, red, cfg: dict, n_train: int, max_steps, out: Path):
        """``pmbench train`` under torchrun (DDP) with exactly the in-process config: the same start
        (``init``, or the patched backbone saved with its seeded reducer modules), teacher, recipe and
        global batch (split over the ranks), the same schedule length; returns (ckpt, history)."""
        import json

        import torch

        from bench.runtime.checkpoint import read_checkpoint, save_checkpoint
        from bench.runtime.data import ShardedEpochSampler
        from bench.runtime.launch import per_rank_batch
        from bench.runtime.outputs import temp_file
        from bench.runtime.train import RUN_FIELDS

        b = per_rank_batch(cfg["batch_size"], self.world, "fine-tuning")
        cfg = {**cfg, "batch_size": b}
        if max_steps:  # the step budget is the whole schedule: epochs = budget / steps per epoch of each rank
            per_rank = len(ShardedEpochSampler(n_train, shuffle=True, world=self.world, pad=True))
            spe = per_rank // b if per_rank >= b else -(-per_rank // b)
            cfg["epochs"] = max_steps / spe
        start = init
        tmp_files = []
        if start is None:  # the patched backbone with its seeded reducer modules, as in this process
            start = out.with_name(out.stem + ".start.pt")
            save_checkpoint(start, model)
            tmp_files.append(start)
        cfg_file = out.with_name(out.stem + ".config.json")
        cfg_file.write_text(json.dumps({k: v for k, v in cfg.items() if k not in RUN_FIELDS}, indent=1))
        tmp_files.append(cfg_file)
        try:
            res = self.launcher.run(["train", "--init", str(start), "--teacher", str(self.ensure_backbone()),
                                     "--config", str(cfg_file), *self.cli_input_args(), "--no-val", "--out", str(out)],
                                    f"fine-tune {spec}")
        finally:
            for f in tmp_files:
                Path(f).unlink(missing_ok=True)
        # the trainer's checkpoint also holds the optimiser state (for --resume): keep what a one-process
        # fine-tuning saves (weights, reducer, structure) and its recipe
        ck = read_checkpoint(out)
        for k in ("optimizer", "scheduler"):
            ck.pop(k, None)
        ck.setdefault("extra", {})["finetune"] = {"spec": spec, "epochs": cfg["epochs"], "config": cfg,
                                                  "world_size": res.get("world_size")}
        with temp_file(out) as tmp:
            torch.save(ck, tmp)
        return out, {"wall_s": res.get("wall_s", 0.0), "total_steps": res.get("steps"),
                     "world_size": res.get("world_size")}

    def evaluate_checkpoint(self, path, model=None, label=None, reducer=None) -> dict:
        """Top-1 etc. of checkpoint ``path`` with its own reducer (or ``reducer``, a spec applied
        off-the-shelf to an unreduced checkpoint): in this process (``model``: the checkpoint already
        loaded, with that reducer) or through the launcher (``label``: the job's name in the progress)."""
        if self.launcher is not None:
            return self.launch_eval(path, reducer=reducer, label=label)
        if model is None:
            model, _ = self.load_checkpoint(path)
        return self.evaluate(model)

    def finetune(self, spec: str, init, epochs: float, ctx, max_steps=None):
        """Fine-tune ``spec`` with its recipe from the backbone (or ``init``: a calibrated checkpoint); returns
        (ckpt, history)."""
        from bench.runtime.checkpoint import save_checkpoint
        from bench.runtime.train import TrainConfig, compose_config, train

        teacher = self.load_backbone() if self.launcher is None else None
        if init is not None:
            model, red = self.load_checkpoint(init)
        else:
            model, red = self.patched_backbone(spec)
        info = ModelInfo.from_model(model, self.img_size)
        cfg = compose_config(red, info, {"batch_size": self.train_batch, "lr": 1e-4, "min_lr": 1e-6, "weight_decay": 0.05,
                                         "distill": "none"},
                             {"epochs": epochs, "device": self.ctx.device, "seed": 0, "progress": False},
                             self.finetune_overrides(spec))
        max_steps = max_steps or ctx.profile.get("finetune_max_steps")
        loader = self.train_loader(cfg["batch_size"])
        if max_steps:
            # A step budget becomes the whole schedule (epochs = budget / steps per epoch), so the
            # recipe's shape -- cosine decay, DynamicViT's backbone freeze for the first 1/6, keep-rate
            # warm-ups -- plays out inside the budget instead of being cut off at its start.
            cfg["epochs"] = max_steps / len(loader)
            cfg["max_steps"] = max_steps
        from bench.runtime.results import describe_key

        key = {'spec': spec, 'epochs': epochs, 'steps': max_steps, 'init': str(init), 'm': self.model_name,
               'overrides': self.finetune_overrides(spec)}
        if self.launcher is not None:
            key["launch"] = self._launch_tag()
            out = self._work(f"ft-{describe_key(key)}.pt")
            return self._launch_finetune(spec, init, model, red, cfg, len(loader.dataset), max_steps, out)
        tc = TrainConfig.from_dict(cfg)
        hist = train(model, loader, tc, teacher=teacher)
        out = self._work(f"ft-{describe_key(key)}.pt")
        save_checkpoint(out, model, extra={"finetune": {"spec": spec, "epochs": epochs, "config": cfg}})
        return out, hist

    def finetune_overrides(self, spec: str) -> dict:
        return {}

    def describe(self) -> str:
        return self.data_label


class ProxySource(Source):
    def __init__(self, ctx, size: str = "default"):
        super().__init__(ctx)
        self.size = size
        self.model_name = proxy.PROXY_MODEL
        self.data = "proxy" if size == "default" else f"proxy:{size}"
        self.img_size = (proxy.IMG_SIZE, proxy.IMG_SIZE)
        self.data_label = "the proxy validation split (synthetic; NOT ImageNet)"
        from bench.runtime.data import describe_data

        self.data_desc = {"data": self.data, **{k: v for k, v in describe_data(self.data).items() if k != "path"}}
        # fine-tunes at batch 32: the profile's step budget then fits the 20-minute default run
        self.train_batch = 32
        if size == "smoke":
            self.eval_batch, self.calib_iters, self.calib_batch = 40, 2, 16

    def ensure_backbone(self) -> Path:
        """The cached backbone; else the shipped weights (hash-checked); else trained.  With
        ``--retrain-proxy`` the first call of the run retrains it with the suite's trainer."""
        t = self.ctx.progress
        p = proxy.backbone_path(self.size)
        retrain = bool(getattr(self.ctx.args, "retrain_proxy", False)) and not self.ctx.proxy_retrained
        if retrain:
            t.note(f"--retrain-proxy: training the proxy backbone ({self.size}) with the suite's trainer")
        elif not p.exists():
            t.note(f"proxy backbone ({self.size}): " + ("the shipped weights" if proxy_backbone.shipped_entry(self.size)
                                                         else "training it; cached afterwards"))
        path = proxy_backbone.ensure_backbone(force=retrain, size=self.size)
        if retrain:
            self.ctx.proxy_retrained = True
        return path

    def finetune_overrides(self, spec: str) -> dict:
        # Proxy recipes: the methods' ImageNet recipes assume 30-300 epochs at batch 512-2048 from
        # pretrained DeiT; on the proxy the profile's short schedule keeps each method's losses,
        # distillation, train/eval mode and parameter groups, with a learning rate suited to the
        # converged backbone (5e-5: at 2e-4, 40 steps cost PM keep 0.6 1.8 points, 88.2 -> 86.4%, where
        # 5e-5 keeps 88.2%), no warm-up, and no mixup/cutmix (the proxy backbone was trained without).
        return {"lr": 5e-5, "min_lr": 1e-6, "warmup_epochs": 0.0, "mixup": 0.0, "cutmix": 0.0}

    def describe(self) -> str:
        return f"proxy backbone trained by this suite on the synthetic proxy set: {self.ctx.proxy_backbone_line()}"


class RealSource(Source):
    """ImageNet + pretrained weights.  With ``--fixture`` the same code runs on a small
    fixture folder in ImageNet layout with a tiny model (the tests use this)."""

    def __init__(self, ctx, model_name):
        super().__init__(ctx)
        a = ctx.args
        if getattr(a, "fixture", False):
            from bench.runtime.fixtures import ensure_fixture

            fx = ensure_fixture()
            self.data = f"imagenet:{fx['imagenet']}"
            self.model_name = fx["model"]
            self._weights = Path(fx["weights"])
            self.eval_batch, self.train_batch, self.calib_iters, self.calib_batch = 16, 8, 1, 8
        else:
            if not a.imagenet:
                from bench.core.reducer import ConfigError

                raise ConfigError("the accuracy stage of the paper profile needs --imagenet PATH")
            self.data = f"imagenet:{a.imagenet}"
            self.model_name = model_name
            self._weights = Path(a.weights) if a.weights else None  # a file or a folder of <model>.pth
        from bench.runtime.data import describe_data

        self.data_desc = {"data": self.data, **{k: v for k, v in describe_data(self.data).items() if k != "path"}}
        self.img_size = (224, 224) if not getattr(a, "fixture", False) else (fx["img_size"],) * 2
        self.data_label = "ImageNet-1k val" if not getattr(a, "fixture", False) else "the ImageNet-layout fixture"
        self.check_launch()

    def ensure_backbone(self) -> Path:
        """A checkpoint of the pretrained model in the suite's format (converted once)."""
        from bench.runtime.checkpoint import save_checkpoint
        from bench.runtime.weights import load_pretrained

        out = self._work(f"backbone-{self.model_name}.pt")
        if not out.exists():
            model = load_pretrained(self.model_name, str(self._weights) if self._weights else None)
            save_checkpoint(out, model)
        return out

    def describe(self) -> str:
        return f"pretrained {self.model_name}"
