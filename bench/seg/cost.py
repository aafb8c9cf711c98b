"""Segmentation cost: GMACs per sliding window / per image, and FPS.

Convention (as the classification tables, docs/flops.md §1): multiply-accumulates,
called "GFLOPs" in the papers.

* encoder: :func:`bench.core.flops.analytic` on the timm encoder at the window size, with
  the reducer's declared token schedule (patch embedding + blocks; no classifier);
* decode head (``SegmenterMaskTransformerHead``), counted analytically with the same
  rules: ``dec_proj`` N·C_in·D; each of its L layers on N+K tokens
  (N+K)·4D² + 2(N+K)²D + (N+K)·2·D·hidden; ``patch_proj`` N·D², ``classes_proj`` K·D²,
  masks N·K·D; norms, softmax, the final bilinear upsampling and the window
  stitching are not counted (like softmax/norms in the encoder count).
* per image: the sum over the windows that mmseg's ``slide_inference`` visits, each
  at its actual crop size (a window of a small image is smaller than the crop).

FPS (ALGM's protocol, docs/flops.md §2): a batch of B copies of one real crop of the
evaluation data (B = 32, and 1), ``encode_decode`` (encoder + head + upsampling to the
crop), eval + ``inference_mode``, warm-up then timed iterations, median over repeats.
On a small CPU the iteration counts are tiny and are stated in the result.
"""
from __future__ import annotations

import statistics

import torch

from bench.core import flops as bflops
from bench.runtime import speed as bspeed


def head_macs(head, n_patches: int) -> int:
    """Analytic MACs of a SegmenterMaskTransformerHead on ``n_patches`` tokens."""
    D = head.dec_proj.out_features
    c_in = head.dec_proj.in_features
    K = head.num_classes
    n = n_patches + K
    total = n_patches * c_in * D
    for layer in head.layers:
        hidden = layer.ffn.layers[0][0].out_features
        total += n * 4 * D * D + 2 * n * n * D + n * 2 * D * hidden
    total += n_patches * D * D + K * D * D + n_patches * K * D
    return int(total)


def window_macs(segmentor, hw) -> dict:
    """MACs of one window of size ``hw`` (encoder per block + head)."""
    bb = segmentor.backbone
    p = bb.patch_size
    gh, gw = -(-hw[0] // p), -(-hw[1] // p)
    info = bb.model_info((gh * p, gw * p))
    rep = bflops.analytic(info, bb.reducer, "segmenter-encoder")
    enc = rep.total
    head = head_macs(segmentor.decode_head, gh * gw)
    return {"encoder_macs": enc, "head_macs": head, "total_macs": enc + head,
            "tokens_per_block": [(b["attn_tokens"], b["mlp_tokens"]) for b in rep.blocks]}


def slide_windows(h: int, w: int, crop, stride) -> list[tuple[int, int]]:
    """The crop sizes mmseg's ``slide_inference`` evaluates for an h x w input."""
    hc, wc = crop
    hs, ws = stride
    hg = max(h - hc + hs - 1, 0) // hs + 1
    wg = max(w - wc + ws - 1, 0) // ws + 1
    return [(min(hc, h), min(wc, w))] * (hg * wg)


@torch.no_grad()
def measured_window_macs(segmentor, hw) -> int:
    """Cross-check: FlopCounterMode on ``encode_decode`` of one window (2 FLOPs per MAC).

    mmcv's attention wraps ``nn.MultiheadAttention``, whose eval fast path is not counted;
    the head is therefore run in train mode here (dropout rates are 0 in Segmenter)."""
    from torch.utils.flop_counter import FlopCounterMode

    bflops._register_cpu_sdpa_formula()
    segmentor.eval()
    segmentor.decode_head.train()
    x = torch.randn(1, 3, *hw)
    meta = [dict(img_shape=tuple(hw), ori_shape=tuple(hw), pad_shape=tuple(hw))]
    with FlopCounterMode(display=False) as fcm:
        feats = segmentor.extract_feat(x)
        segmentor.decode_head.forward(feats)
    segmentor.decode_head.eval()
    return fcm.get_total_flops() // 2


@torch.inference_mode()
def fps(segmentor, crop: torch.Tensor, batch: int, warmup: int = 1, iters: int = 2, repeats: int = 3,
        device: str = "cpu") -> dict:
    """Images (windows) per second of ``encode_decode`` on ``batch`` copies of ``crop`` (3, h, w)."""
    segmentor.eval().to(device)
    allocator = bspeed.steady_allocator() if torch.device(device).type == "cpu" else "system"
    x = crop.unsqueeze(0).expand(batch, -1, -1, -1).contiguous().to(device)
    hw = tuple(x.shape[-2:])
    metas = [dict(img_shape=hw, ori_shape=hw, pad_shape=hw)] * batch
    for _ in range(warmup):
        segmentor.encode_decode(x, metas)
    # the suite's one timing loop (bench.runtime.speed.timed_loop: device sync before and after the clock)
    times = [bspeed.timed_loop(lambda: segmentor.encode_decode(x, metas), iters, device) for _ in range(repeats)]
    ips = sorted(batch / t for t in times)
    return {"img_s": statistics.median(ips), "img_s_min": ips[0], "img_s_max": ips[-1], "batch": batch,
            "window": list(hw), "allocator": allocator, "protocol": f"ALGM-style: {batch} copies of one real {hw[0]}x{hw[1]} crop, "
            f"encode_decode, eval+inference_mode, {warmup} warm-up + {iters} timed x {repeats} repeats, median"}
