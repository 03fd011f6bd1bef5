"""``slimlm bench``: run the kernel benchmarks (pytest-benchmark) of a slimlm checkout."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

from slimlm.cli import arguments
from slimlm.cli.arguments import EXIT_FAILURE, EXIT_OK
from slimlm.errors import InputError

PYTEST_USAGE_ERROR, PYTEST_NO_TESTS = 4, 5  # pytest.ExitCode (pytest is imported by the run, not here)


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
    names = benchmark_names(folder)
    if not names:
        raise InputError(f"--benchmarks {folder} holds no benchmark (bench_*.py)")
    command = [sys.executable, "-m", "pytest", "-q", folder, "--benchmark-only", "-p", "no:cacheprovider"]
    environment = dict(os.environ)
    if args.quick:
        environment["SLIMLM_BENCH_QUICK"] = "1"
    if args.filter:
        command += ["-k", args.filter]
        check_filter(command, args.filter, names, environment)
    print(" ".join(command))
    return EXIT_OK if subprocess.call(command, env=environment) == 0 else EXIT_FAILURE


def benchmark_names(folder: str) -> list[str]:
    """The benchmarks of ``folder``: ``kl_div`` for ``bench_kl_div.py``."""
    return sorted(os.path.basename(path)[len("bench_"):-len(".py")]
                  for path in glob.glob(os.path.join(glob.escape(folder), "bench_*.py")))


def check_filter(command: list[str], expression: str, names: list[str], environment: dict) -> None:
    """InputError when ``--filter`` is not a ``-k`` expression or selects no benchmark: found by
    collecting ``command`` (nothing runs) before the run prints anything."""
    collected = subprocess.run(command + ["--collect-only"], env=environment, capture_output=True, text=True)
    wrong = "ERROR: Wrong expression passed to '-k': "
    if collected.returncode == PYTEST_USAGE_ERROR:
        for line in collected.stderr.splitlines():
            if line.startswith(wrong):
                raise InputError(f"--filter is not a pytest -k expression: {line[len(wrong):]}")
    if collected.returncode == PYTEST_NO_TESTS:
        raise InputError(f"--filter {expression!r} selects no benchmark (benchmarks: {', '.join(names)})")


def find_benchmarks() -> str | None:
    """``benchmarks/`` of the working directory, else of the checkout this package runs from."""
    checkout = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, os.pardir))
    for base in (os.getcwd(), checkout):
        candidate = os.path.join(base, "benchmarks")
        if os.path.isfile(os.path.join(candidate, "conftest.py")):
            return candidate
    return None
