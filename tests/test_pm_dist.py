"""PM calibration under torch.distributed: 2 gloo ranks == 1 rank on the union of their batches."""
from __future__ import annotations

import socket

import torch
import torch.multiprocessing as mp

CFG = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)


def _model():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(**CFG).eval()


def _batches():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(4)]


def _scores(batches):
    from bench.core import patch, registry
    from bench.core.reducer import ModelInfo
    from pm.calibrate import collect_scores

    m = _model()
    r = registry.build("pm:keep=0.5,prune=0.1")
    patch.apply(m, r)
    s, _ = collect_scores(m, r, batches, ModelInfo.from_model(m))
    return s, r, ModelInfo.from_model(m)


def _worker(rank, world, port, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        s, _, _ = _scores(_batches()[rank::world])  # each rank scores its own shard, then all-reduce
        if rank == 0:
            torch.save(s, out)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_all_reduce_equals_one_rank_on_the_union(tmp_path):
    out = str(tmp_path / "scores.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    s2 = torch.load(out)
    s1, r, info = _scores(_batches())
    assert torch.allclose(s1, s2, rtol=1e-10, atol=0)
    local, _, _ = _scores(_batches()[0::2])  # what the official code keeps (rank 0's scores only)
    assert not torch.allclose(local, s1)
    st1 = r.structure_from_scores(s1, info)
    st2 = r.structure_from_scores(s2, info)
    assert [s.centers for s in st1] == [s.centers for s in st2]
    assert [s.pruned.tolist() for s in st1] == [s.pruned.tolist() for s in st2]
