"""python -m bench: the full decode benchmark suite (arguments of `pidkern bench` plus the suite's own)."""
import argparse
import sys

from pidkern.benchmark import add_arguments

from bench.suite import run


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m bench", description=__doc__))
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
