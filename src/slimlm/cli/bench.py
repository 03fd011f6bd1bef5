"""``slimlm bench``: run the kernel benchmarks (pytest-benchmark) of a slimlm checkout."""
from __future__ import annotations

import os
import subprocess
import sys

from slimlm.cli import arguments
from slimlm.cli.arguments import EXIT_FAILURE, EXIT_OK
from slimlm.errors import InputError


def add_parser(subparsers) -> None:
    sub = arguments.add_command(
        subparsers, "bench", "run the kernel benchmarks (pytest-benchmark) and print their table",
        ["slimlm bench", "slimlm bench --quick --filter kl_div"])
    sub.add_argument("--quick", action="store_true", help="small shapes (SLIMLM_BENCH_QUICK=1)")
    sub.add_argument("--filter", help="pytest -k expression")
    sub.add_argument("--benchmarks", help="benchmarks folder (default: ./benchmarks of the checkout)")
    sub.set_defaults(handler=run)


def run(args) -> int:
    folder = args.benchmarks or find_benchmarks()
    if folder is None or not os.path.isdir(folder):
        raise InputError("no benchmarks/ folder found: run from a slimlm checkout or pass --benchmarks PATH")
    command = [sys.executable, "-m", "pytest", "-q", folder, "--benchmark-only", "-p", "no:cacheprovider"]
    if args.filter:
        command += ["-k", args.filter]
    environment = dict(os.environ)
    if args.quick:
        environment["SLIMLM_BENCH_QUICK"] = "1"
    print(" ".join(command))
    return EXIT_OK if subprocess.call(command, env=environment) == 0 else EXIT_FAILURE


def find_benchmarks() -> str | None:
    """``benchmarks/`` of the working directory, else of the checkout this package runs from."""
    checkout = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, os.pardir))
    for base in (os.getcwd(), checkout):
        candidate = os.path.join(base, "benchmarks")
        if os.path.isfile(os.path.join(candidate, "conftest.py")):
            return candidate
    return None
