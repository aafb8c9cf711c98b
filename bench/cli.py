"""``pmbench``: the command-line interface.

Each sub-command lives in its own module exposing ``add_parser(subparsers)``;
the module list below is the whole CLI.  ``--json`` prints exactly one JSON
object on stdout (human text goes to stderr or is suppressed).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from .reducer import ConfigError

COMMANDS = [
    "bench.commands.list_cmd",
    "bench.commands.flops_cmd",
    "bench.commands.speed_cmd",
    "bench.commands.train_cmd",
    "bench.commands.eval_cmd",
    "bench.commands.data_cmd",
    "pm.cli",
    "bench.seg.cli",
]


class UserError(Exception):
    """Bad input: printed as one clear message, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pmbench", description="Token-reduction benchmark for Vision Transformers")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in COMMANDS:
        importlib.import_module(mod).add_parser(sub)
    return p


def emit(obj: dict, as_json: bool, text: str = "") -> None:
    if as_json:
        json.dump(obj, sys.stdout, indent=2, default=_json_default)
        sys.stdout.write("\n")
    else:
        print(text)


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except (ConfigError, UserError, FileNotFoundError) as e:
        print(f"pmbench {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
