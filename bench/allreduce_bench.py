"""All-reduce strategies against loopback TCP, nccl-tests style: the ``scalesgd allreduce-bench`` subcommand.

    python bench/allreduce_bench.py                       # 4 KB … 64 MB, P = 2 and 4, all strategies
    python bench/allreduce_bench.py --quick               # a few sizes, P = 2, well under a minute
    python bench/allreduce_bench.py --strategies allreduce ring --workers 2 --json out.json

Expected (issue 5): ring busbw ≥ 0.75× the built-in all-reduce's for 4–25 MB at P = 2; messages ≤ 4 KB
within 3× the TCP round trip; the fitted α–β model within ±20 % from 64 KB to 64 MB. On a shared CPU box
the times are noisy: compare strategies only within one run (they are interleaved call by call).
"""

import argparse
import sys

from scalesgd import allreduce_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="allreduce_bench.py")
    sub = parser.add_subparsers(dest="command")
    allreduce_bench.add_parser(sub)
    args = parser.parse_args(["allreduce-bench", *sys.argv[1:]])
    sys.exit(args.func(args))
