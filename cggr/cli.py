"""The ``cggr`` command. Subcommands: ``bench`` (see ``cggr bench --help`` and docs/bench.md)."""
import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="cggr", description="CGGR: selective-token training tools")
    sub = parser.add_subparsers(dest="command", required=True)
    from .bench.cli import add_arguments, run

    bench = sub.add_parser("bench", help="time-to-quality benchmark on real text",
                           description="Train a causal LM with each configuration under the same seed, data "
                                       "order, LR schedule and optimizer; report validation loss against "
                                       "wall-clock time and tokens (docs/bench.md).",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(bench)
    bench.set_defaults(func=run)
    args = parser.parse_args(argv)
    return args.func(args, bench)


if __name__ == "__main__":
    sys.exit(main())
