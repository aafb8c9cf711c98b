"""``pmbench seg-eval``, ``seg-train`` and ``seg-cost``: Segmenter with any reducer.

With ``--json`` exactly one JSON object goes to stdout; mmengine's logging and the
metric tables are sent to stderr (file-descriptor level, so nothing leaks).
"""
from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def _stdout_to_stderr(active: bool):
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    old = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)
        sys.stdout = old


def _common(p):
    p.add_argument("--config", default="proxy",
                   help="vit-t | vit-s | vit-b | proxy, or a config file path (default: %(default)s)")
    p.add_argument("--reducer", default="none", help="reducer spec, e.g. tome:r=13, evit:keep=0.7 (default: none)")
    p.add_argument("--reducer-structure", default=None,
                   help="structure file for reducers calibrated offline (e.g. PM from pm-calibrate)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--verbose", action="store_true",
                   help="show mmengine's logs (default: its warnings and errors only)")


def _logs(args) -> None:
    from bench.seg import logs

    logs.set_verbose(args.verbose)


def add_parser(sub):
    p = sub.add_parser("seg-eval", help="Segmenter mIoU (sliding window, IoUMetric), GMACs and FPS with a reducer")
    _common(p)
    p.add_argument("--data", default="proxy", help="proxy | proxy:smoke | ade20k:PATH (default: %(default)s)")
    p.add_argument("--checkpoint", default=None,
                   help="mmseg Segmenter checkpoint, original Segmenter release or pmbench checkpoint "
                        "(default for --config proxy: the cached proxy Segmenter, trained on first use)")
    p.add_argument("--random-weights", action="store_true", help="untrained weights (pipeline smoke tests only)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling arbitrary objects from the checkpoint (trusted files only)")
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--speed", action="store_true", help="also measure FPS (batch 32 and 1 of a real crop)")
    p.add_argument("--fps-batches", default="32,1", help="batch sizes for --speed (default: %(default)s)")
    p.add_argument("--iters", type=int, default=1, help="timed iterations per repeat for --speed (default 1: CPU)")
    p.add_argument("--repeats", type=int, default=3, help="repeats for --speed; median reported (default 3)")
    p.set_defaults(func=run_eval)

    t = sub.add_parser("seg-train", help="train / fine-tune a Segmenter with mmengine's Runner "
                                         "(CPU, torchrun gloo, CUDA); saves a clean checkpoint")
    _common(t)
    t.add_argument("--data", default="proxy", help="proxy | proxy:smoke | ade20k:PATH")
    t.add_argument("--out", default=None, help="output checkpoint (default: the proxy cache for --config proxy)")
    t.add_argument("--load-from", default=None, help="initial weights (mmseg / Segmenter / pmbench checkpoint)")
    t.add_argument("--max-iters", type=int, default=None, help="override the schedule length")
    t.add_argument("--force", action="store_true", help="retrain the cached proxy Segmenter")
    t.set_defaults(func=run_train)

    c = sub.add_parser("seg-cost", help="analytic Segmenter GMACs per 512x512 window (no weights, no data)")
    _common(c)
    c.add_argument("--img-size", type=int, default=None, help="window size (default: the config's crop)")
    c.add_argument("--measure", action="store_true", help="cross-check with torch FlopCounterMode")
    c.set_defaults(func=run_cost)


def _check(args, *flags) -> None:
    """Counts >= 1 (0 and negative values are errors, never "not given"), before any work."""
    from bench.runtime.outputs import positive

    for flag in ("--threads",) + flags:
        positive(getattr(args, flag[2:].replace("-", "_")), flag)


def _fps_batches(text: str) -> tuple:
    from bench.core.reducer import ConfigError

    try:
        out = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise ConfigError(f"--fps-batches must be comma-separated whole numbers, got {text!r}") from None
    if not out or any(b < 1 for b in out):
        raise ConfigError(f"--fps-batches must list batch sizes >= 1, got {text!r}")
    return out


def run_eval(args):
    _logs(args)
    _check(args, "--max-images", "--iters", "--repeats")
    fps_batches = _fps_batches(args.fps_batches)
    import torch

    from bench.cli import emit

    from bench.seg.evaluate import SegEvalConfig, seg_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    opts = SegEvalConfig(random_weights=args.random_weights, trust=args.trust_checkpoint, speed=args.speed,
                         fps_batches=fps_batches, speed_iters=args.iters, speed_repeats=args.repeats,
                         device=args.device, max_images=args.max_images, reducer_structure=args.reducer_structure)
    with _stdout_to_stderr(args.json):
        res = seg_eval(args.config, args.reducer, args.data, args.checkpoint, opts,
                       log=lambda m: print(m, file=sys.stderr))
    lines = [
        f"Segmenter {args.config}  reducer {res['reducer']}  data {args.data}  ({res['n_images']} images)",
        f"weights: {res['weights']}",
        f"mIoU {res['miou']:.2f}   aAcc {res['aAcc']:.2f}",
        f"GMACs per {res['window'][0]}x{res['window'][1]} window {res['gmacs_per_window']:.3f} "
        f"(encoder {res['gmacs_encoder_per_window']:.3f} + head {res['gmacs_head_per_window']:.3f}); "
        f"per image {res['gmacs_per_image']:.3f}",
    ]
    for k, v in (res.get("speed") or {}).items():
        lines.append(f"FPS {k}: {v['img_s']:.2f} windows/s  [{v['protocol']}]")
    if res["missing_reducer_modules"]:
        lines.append(f"note: reducer parameters not in the checkpoint (untrained): {len(res['missing_reducer_modules'])}")
    st = res["stamp"]
    lines.append(f"{st['device']}  torch {st['torch']}  timm {st['timm']}  mmseg {st['mmseg']}  {st['date']}")
    emit(res, args.json, "\n".join(lines))
    return 0


def run_train(args):
    _logs(args)
    from pathlib import Path

    import torch

    from bench.cli import emit
    from bench.runtime.outputs import check_out_file

    _check(args, "--max-iters")
    check_out_file(args.out, "--out")
    if args.out is not None:
        check_out_file(str(args.out) + ".json", "--out (its metadata file)")

    from bench.seg import train

    if args.threads:
        torch.set_num_threads(args.threads)
    with _stdout_to_stderr(args.json):
        if args.out is None:
            if args.config != "proxy" or args.reducer != "none" or args.load_from:
                from bench.core.reducer import ConfigError

                raise ConfigError("--out is required except for the default proxy Segmenter")
            out = train.ensure_proxy_segmenter(force=args.force, max_iters=args.max_iters,
                                               log=lambda m: print(m, file=sys.stderr))
            meta = train.proxy_training_info() if args.max_iters is None else {}
        else:
            out = Path(args.out)
            meta = train.train_segmenter(args.config, out, train.SegTrainConfig(
                reducer=args.reducer, data=args.data, load_from=args.load_from, max_iters=args.max_iters))
    res = {"checkpoint": str(out), **meta}
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # torchrun: rank 0 reports
    emit(res, args.json, f"checkpoint {out}\n{meta.get('train_seconds', '?')} s; val {meta.get('val', {})}")
    return 0


def run_cost(args):
    _logs(args)
    from bench.cli import emit

    _check(args, "--img-size")
    from bench.seg.configs import build_config
    from bench.seg.cost import measured_window_macs, window_macs
    from bench.seg.evaluate import build_segmentor

    with _stdout_to_stderr(args.json):
        cfg = build_config(args.config, args.reducer, None, reducer_structure=args.reducer_structure)
        model, _ = build_segmentor(cfg, None, random_weights=True)
        crop = tuple(cfg.model.test_cfg.get("crop_size", cfg.model.backbone.img_size))
        if args.img_size:
            crop = (args.img_size, args.img_size)
        w = window_macs(model, crop)
        res = {"config": args.config, "reducer": model.backbone.reducer.spec(), "window": list(crop),
               "gmacs_per_window": round(w["total_macs"] / 1e9, 4),
               "gmacs_encoder": round(w["encoder_macs"] / 1e9, 4), "gmacs_head": round(w["head_macs"] / 1e9, 4),
               "tokens_per_block": w["tokens_per_block"]}
        if args.measure:
            res["measured_gmacs"] = round(measured_window_macs(model, crop) / 1e9, 4)
    text = (f"Segmenter {args.config} reducer {res['reducer']} window {crop[0]}x{crop[1]}: "
            f"{res['gmacs_per_window']:.3f} GMACs (encoder {res['gmacs_encoder']:.3f} + head {res['gmacs_head']:.3f})")
    if args.measure:
        text += f"\nmeasured (FlopCounterMode): {res['measured_gmacs']:.3f}"
    emit(res, args.json, text)
    return 0
