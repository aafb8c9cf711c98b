"""FLOPs (the field's 'GFLOPs' are multiply-accumulates, MACs) from declared token counts.

The analytic count is the formula that reproduces the published GFLOPs of
DeiT, ToMe, EViT and DynamicViT (docs/flops.md §1), generalised to any
width, MLP ratio and attention dim:

    patch embedding   n_patches * (in_chans * p * p) * D
    per block         attention: N_attn * (3*D*A + A*D) + 2 * N_attn^2 * A   (qkv, proj, QK^T, AV)
                      MLP:       N_mlp * 2 * D * hidden
    head              D * num_classes (x2 for distilled DeiT)
    + the reducer's own MACs (predictors, merge matrices, fusion)

N_attn / N_mlp come from the reducer's :meth:`token_schedule`.  Softmax, norms,
GELU, matching and top-k are not counted (as in fvcore, torchprofile and the
papers).  :func:`measured_macs` counts the patched model with torch's
FlopCounterMode, with the fused CPU attention kernel registered (it has no
formula of its own, so it would otherwise be silently skipped), and is used by
the tests as an independent cross-check.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from bench.core.reducer import ModelInfo, Reducer


@dataclass
class FlopsReport:
    model: str
    reducer: str
    img_size: tuple
    patch_embed: int
    blocks: list  # per block dict(attn_tokens, mlp_tokens, attn_macs, mlp_macs)
    head: int
    reducer_extra: int

    @property
    def total(self) -> int:
        return self.patch_embed + sum(b["attn_macs"] + b["mlp_macs"] for b in self.blocks) + self.head + self.reducer_extra

    @property
    def gmacs(self) -> float:
        return self.total / 1e9

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_macs"] = self.total
        d["gmacs"] = round(self.gmacs, 4)
        d["unit_note"] = "GMACs (multiply-accumulates); the token-reduction literature calls these GFLOPs"
        return d


def block_macs(info: ModelInfo, n_attn: int, n_mlp: int) -> tuple[int, int]:
    D, A = info.dim, info.attn_dim
    attn = n_attn * (3 * D * A + A * D) + 2 * n_attn * n_attn * A
    mlp = n_mlp * 2 * D * info.mlp_hidden
    return attn, mlp


def analytic(info: ModelInfo, reducer: Reducer, model_name: str = "") -> FlopsReport:
    sched = reducer.token_schedule(info)
    if len(sched) != info.depth:
        raise ValueError(f"{reducer.name}: token_schedule gave {len(sched)} blocks for depth {info.depth}")
    blocks = []
    for i, bt in enumerate(sched):
        a, m = block_macs(info, bt.attn, bt.mlp)
        blocks.append({"block": i, "attn_tokens": bt.attn, "mlp_tokens": bt.mlp, "attn_macs": a, "mlp_macs": m})
    ph, pw = info.patch_size
    patch = info.n_patches * info.in_chans * ph * pw * info.dim
    head = info.dim * info.num_classes * info.num_heads_out
    return FlopsReport(
        model=model_name,
        reducer=reducer.spec(),
        img_size=(info.grid[0] * ph, info.grid[1] * pw),
        patch_embed=patch,
        blocks=blocks,
        head=head,
        reducer_extra=int(reducer.extra_macs(info)),
    )


_REGISTERED = False


def _register_cpu_sdpa_formula() -> None:
    """Teach FlopCounterMode the fused CPU attention kernel (same count as SDPA)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    ops = [getattr(torch.ops.aten, n, None) for n in ("_scaled_dot_product_flash_attention_for_cpu",)]
    for op in ops:
        if op is None or op in flop_registry:
            continue

        @register_flop_formula(op)
        def _f(query, key, value, *args, out_shape=None, **kwargs):  # noqa: ANN001
            return sdpa_flop_count(query, key, value)  # shapes are passed in

    _REGISTERED = True


@torch.no_grad()
def measured_macs(model, img_size=(224, 224), batch: int = 1) -> int:
    """MACs counted by torch's FlopCounterMode on a real forward (2 FLOPs per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa_formula()
    model.eval()
    x = torch.randn(batch, 3, *img_size)
    with FlopCounterMode(display=False) as fcm:
        model(x)
    return fcm.get_total_flops() // 2 // batch
