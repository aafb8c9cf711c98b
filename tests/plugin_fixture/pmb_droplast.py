"""A minimal plug-in reducer: drop the last ``n`` tokens after the attention of block ``block``.

It is the smallest complete example of the interface: options, a model-dependent check,
one hook that changes the token count, the grid tracking, and the declared token schedule
from which ``pmbench flops`` derives the cost.
"""
import torch

from bench.core.reducer import BlockTokens, ConfigError, Option, Reducer


class DropLast(Reducer):
    name = "droplast"
    summary = "test plug-in: drop the last n tokens inside one block"
    options = {
        "n": Option("int", 1, "tokens dropped"),
        "block": Option("int", 0, "0-based index of the block that drops them"),
    }

    def validate_options(self):
        if self.cfg["n"] < 0:
            raise ConfigError(f"droplast: n must be >= 0, got {self.cfg['n']}")

    def check(self, info):
        if self.cfg["block"] >= info.depth:
            raise ConfigError(f"droplast: block {self.cfg['block']} past the model depth {info.depth}")
        if self.cfg["n"] >= info.n_patches:
            raise ConfigError(f"droplast: n must be < {info.n_patches} patch tokens")

    def post_attn(self, i, block, x, extras, state):
        if i != self.cfg["block"] or self.cfg["n"] == 0:
            return x
        B, N, _ = x.shape
        keep = N - self.cfg["n"]
        old_to_new = torch.arange(N, device=x.device).masked_fill(torch.arange(N, device=x.device) >= keep, -1)
        state.remap(x, old_to_new.expand(B, -1))
        return x[:, :keep]

    def token_schedule(self, info):
        n, out = info.n_tokens, []
        for i in range(info.depth):
            m = n - self.cfg["n"] if i == self.cfg["block"] else n
            out.append(BlockTokens(n, m))
            n = m
        return out
