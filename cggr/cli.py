"""The ``cggr`` command. Subcommands: ``bench`` (see ``cggr bench --help`` and docs/bench.md) and ``env``
(the versions and hardware a bug report needs; cggr.env).

``cggr --help`` needs torch only: a subcommand's module (and its dependencies) is imported only when that
subcommand runs, after its dependencies are checked, so a missing one is named once with the extra of
setup.py that brings it (cggr._deps), not met as a traceback.
"""
import argparse
import sys
from typing import List, Optional

from . import _deps

# What `cggr bench` cannot run without (the `bench` extra of setup.py); matplotlib (the plots) and tqdm
# (the progress bar) are optional: without them the bench says once what it skips.
BENCH_REQUIRES = ("numpy", "transformers")
BENCH_MIN_VERSIONS = {"transformers": "5.0"}  # cggr.router follows the transformers 5.x model forward


def _subcommand(argv: List[str]) -> Optional[str]:
    """The subcommand named on the command line (the first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def _check_bench_dependencies() -> int:
    """0 when the bench's dependencies are installed, else print one line naming them (and the extra) and
    return 2, as argparse does for a usage error."""
    try:
        _deps.require(BENCH_REQUIRES, "bench", "cggr bench", BENCH_MIN_VERSIONS)
    except _deps.MissingDependency as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="cggr", description="CGGR: selective-token training tools")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time-to-quality benchmark on real text",
                           description="Train a causal LM with each configuration under the same seed, data "
                                       "order, LR schedule and optimizer; report validation loss against "
                                       "wall-clock time and tokens (docs/bench.md).",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if _subcommand(argv) == "bench":
        try:
            from .bench.cli import add_arguments, run
        except ImportError:  # the argument module needs a dependency of the bench: name them all, once
            if _deps.missing(BENCH_REQUIRES):
                return _check_bench_dependencies()
            raise
        add_arguments(bench)
        bench.set_defaults(func=run)
    sub.add_parser("env", help="print what a bug report needs: versions of cggr, torch, CUDA, Triton and "
                              "transformers, the compiled ops, the GPU",
                   description="Print the versions of cggr, Python, torch, CUDA, Triton and transformers, whether "
                               "the CUDA ops were compiled (and for which architectures), the GPU, and whether "
                               "the Triton kernels can run; paste it into a bug report.")
    args = parser.parse_args(argv)  # `cggr --help` and `cggr bench --help` exit here
    if args.command == "env":
        from . import env

        return env.main()
    if args.command == "bench":
        status = _check_bench_dependencies()
        if status:
            return status
        if not getattr(args, "prepare_only", False):
            _deps.note_missing("matplotlib", "bench", "cggr bench", "the report has no plot (its table, JSON and "
                               "CSV are written)", log=lambda msg: print(msg, flush=True))
    return args.func(args, bench)


if __name__ == "__main__":
    sys.exit(main())
