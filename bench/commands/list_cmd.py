"""``pmbench list``: every registered reducer (built-in and plug-in) with its options."""
from __future__ import annotations

from bench.cli import emit
from bench.core import registry


def add_parser(sub):
    p = sub.add_parser("list", help="list reducers and their options")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=run)


def run(args):
    rows = registry.describe_all()
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:12s} ERROR: {r['error']}")
            continue
        lines.append(f"{r['name']:12s} {r['summary']}  [{r['source']}]")
        lines.append(f"{'':12s} default: {r['default_spec']}")
        for k, o in r["options"].items():
            lines.append(f"{'':14s}{k} ({o['type']}, default {o['default']}): {o['help']}")
    emit({"reducers": rows, "entry_point_group": registry.ENTRY_POINT_GROUP}, args.json, "\n".join(lines))
    return 0
