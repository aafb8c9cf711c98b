"""A toy *calibrated* reducer: score every patch position on calibration batches, then drop the
``n`` lowest-scoring positions after the attention of block ``at``.

The score of a position is the summed magnitude of the loss gradient with respect to the input
pixels of that patch, over the calibration batches.  Before calibration (the data-free default) the
last ``n`` positions are dropped.  The learned structure (the dropped positions and the grid they
index) is exported into checkpoints and imported back from them.
"""
import torch
import torch.nn.functional as F

from bench.core.reducer import BlockTokens, Calibrated, ConfigError, Option

FORMAT = "scoredrop/1"


class ScoreDrop(Calibrated):
    name = "scoredrop"
    summary = "test plug-in: drop the n patch positions with the lowest calibration scores"
    options = {
        "n": Option("int", 8, "patch positions dropped"),
        "at": Option("int", 1, "0-based block after whose attention they are dropped"),
    }
    default_structure = "scoredrop's data-free default (the last n positions dropped)"

    def __init__(self, **opts):
        super().__init__(**opts)
        self.drop = None  # learned positions (patch indices, 0-based) or None
        self.grid = None

    def validate_options(self):
        if self.cfg["n"] < 0:
            raise ConfigError(f"scoredrop: n must be >= 0, got {self.cfg['n']}")

    def check(self, info):
        if self.cfg["at"] >= info.depth:
            raise ConfigError(f"scoredrop: at={self.cfg['at']} is past depth {info.depth}")
        if self.cfg["n"] >= info.n_patches:
            raise ConfigError(f"scoredrop: n must be < {info.n_patches} patch tokens")

    # -- the Calibrated capability ----------------------------------------------------------
    @property
    def calibrated(self):
        return self.drop is not None

    def calibrate(self, model, batches, info, *, loss_fn=None, iters=None, device=None, progress=None,
                  meta=None, **options):
        loss_fn = loss_fn or F.cross_entropy
        dev = torch.device(device) if device else next(model.parameters()).device
        ph, pw = info.patch_size
        score, seen = None, 0
        for it, (x, y) in enumerate(batches):
            if iters is not None and it >= iters:
                break
            x = x.to(dev).requires_grad_(True)
            (g,) = torch.autograd.grad(loss_fn(model(x), y.to(dev)), x)
            B, _, H, W = g.shape
            per_patch = g.abs().sum(1)[:, : H // ph * ph, : W // pw * pw]
            per_patch = per_patch.reshape(B, H // ph, ph, W // pw, pw).sum((0, 2, 4)).flatten().double().cpu()
            score = per_patch if score is None else score + per_patch
            seen += 1
        if score is None:
            raise ConfigError("scoredrop: calibration saw no batch")
        self.grid = [H // ph, W // pw]
        self.drop = sorted(score.argsort()[: self.cfg["n"]].tolist())
        tokens = [n for n in (bt.mlp for bt in self.token_schedule(info))]
        return {"per_layer": [{"layer": i, "tokens": t} for i, t in enumerate(tokens)],
                "calibration": {"iterations": seen, **(meta or {})}, "drop": self.drop}

    def export_state(self):
        return {} if self.drop is None else {"format": FORMAT, "drop": list(self.drop), "grid": list(self.grid)}

    def import_state(self, state):
        if not state:
            return
        if state.get("format") != FORMAT:
            raise ConfigError(f"scoredrop: not a scoredrop structure ({state.get('format')!r})")
        self.drop, self.grid = list(state["drop"]), list(state["grid"])

    # -- inference ---------------------------------------------------------------------------
    def _dropped(self, n_patches):
        if self.drop is None:
            return list(range(n_patches - self.cfg["n"], n_patches))
        return [p for p in self.drop if p < n_patches]

    def post_attn(self, i, block, x, extras, state):
        if i != self.cfg["at"] or self.cfg["n"] == 0:
            return x
        B, N, _ = x.shape
        k = state.n_prefix
        dropped = torch.zeros(N, dtype=torch.bool, device=x.device)
        dropped[[k + p for p in self._dropped(N - k)]] = True
        old_to_new = torch.cumsum(~dropped, 0) - 1
        old_to_new = old_to_new.masked_fill(dropped, -1)
        state.remap(x, old_to_new.expand(B, -1))
        return x[:, ~dropped]

    def token_schedule(self, info):
        n, out = info.n_tokens, []
        for i in range(info.depth):
            m = n - len(self._dropped(info.n_patches)) if i == self.cfg["at"] else n
            out.append(BlockTokens(n, m))
            n = m
        return out
