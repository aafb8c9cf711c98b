"""``pmbench scoredrop-info CKPT``: the positions a calibrated scoredrop checkpoint drops."""
import json


def add_parser(sub):
    p = sub.add_parser("scoredrop-info",
                       help="scoredrop plug-in: print the positions a checkpoint drops")
    p.add_argument("checkpoint")
    p.set_defaults(func=run)


def run(args):
    from bench.runtime.checkpoint import read_checkpoint

    print(json.dumps(read_checkpoint(args.checkpoint)["reducer_state"]["drop"]))
    return 0
