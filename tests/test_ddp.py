"""torchrun with 2 gloo ranks on CPU: distributed accuracy == single-process accuracy, and a
DDP training step leaves identical weights on both ranks.  One launch covers both checks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from bench.runtime import data, models
from bench.runtime.evaluate import evaluate
from fixtures_data import make_imagefolder

WORKER = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from bench.runtime import data, distributed as dist, models
    from bench.runtime.evaluate import evaluate
    from bench.runtime.train import TrainConfig, train

    root, out = sys.argv[1], sys.argv[2]
    assert dist.init("cpu") and dist.world_size() == 2
    spec = "imagenet:" + root
    torch.manual_seed(0)
    model = models.create("pmbench_proxy_vit", img_size=32, num_classes=3)
    val = data.build_loader(spec, "val", 2, img_size=32, distributed=True)
    res = evaluate(model, val)
    tl = data.build_loader(spec, "train", 4, train=True, img_size=32, distributed=True, seed=1)
    train(model, tl, TrainConfig(epochs=1, lr=1e-2, progress=False, seed=1, max_steps=2))
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save(flat, f"{out}/params{dist.rank()}.pt")
    json.dump({**res, "local": len(val.sampler)}, open(f"{out}/eval{dist.rank()}.json", "w"))
    dist.cleanup()
""")


def test_two_gloo_ranks(tmp_path):
    root = make_imagefolder(tmp_path / "inet", n_classes=3, train_per_class=4, val_per_class=3)  # 9 val: odd
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(root), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]

    r0, r1 = (json.loads((tmp_path / f"eval{r}.json").read_text()) for r in (0, 1))
    assert r0["local"] + r1["local"] == 9  # each sample on exactly one rank
    torch.manual_seed(0)
    model = models.create("pmbench_proxy_vit", img_size=32, num_classes=3)
    single = evaluate(model, data.build_loader(f"imagenet:{root}", "val", 2, img_size=32))
    for r in (r0, r1):  # all-reduced: both ranks report the global numbers
        assert r["n_images"] == single["n_images"] == 9
        assert r["top1"] == single["top1"] and r["top5"] == single["top5"]
        assert abs(r["loss"] - single["loss"]) < 1e-5

    p0, p1 = torch.load(tmp_path / "params0.pt"), torch.load(tmp_path / "params1.pt")
    assert torch.equal(p0, p1)
    fresh = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.equal(p0, fresh)  # the step did change the weights
