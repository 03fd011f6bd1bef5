"""The ``slimlm`` command: score → prune → distill → evaluate, one subcommand per stage, plus
``export`` (GGUF), ``run`` (a whole recipe), ``demo`` and ``bench``. Each subcommand is one module here
(``slimlm/cli/<command>.py``) with its parser (``add_parser``) beside its handler (``run``);
``arguments`` holds what they share.

Exit codes: 0 success; 2 bad input, that is an argparse usage error or a
``slimlm.errors.InputError`` (a missing, corrupt or truncated model or scores file, a data
path, a recipe field, an unknown value, a target larger than the model, an output that is,
holds or sits inside an input, an existing output without ``--overwrite`` or one slimlm did not
write, checkpoints of another run); 1 anything else, a runtime failure, a ValueError from deep
inside included (a command turns the bad input it checks into InputError where it checks it);
130 interrupted. Errors print one line, ``slimlm <command>: error: ...``; a runtime failure's
names its type and ends ``(SLIMLM_DEBUG=1 or --debug shows the traceback)``. ``--debug`` (before
the command, or after it except for distill and search, whose unknown flags go on to
``TrainingArguments``) or ``SLIMLM_DEBUG=1`` raises the error with its traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import textwrap

from slimlm.cli.arguments import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Parser, examples, quiet_progress
from slimlm.errors import InputError

__all__ = ["COMMANDS", "EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "build_parser", "entry", "main"]

# The subcommands in the order ``slimlm --help`` lists them; each is the module slimlm.cli.<name>
# (a dash in the command's name an underscore in the module's).
COMMANDS = ("tokenize", "importance", "plan", "search", "prune", "generate", "teacher-cache", "distill", "gradual",
            "eval", "export", "run", "demo", "bench")
DEBUG_HELP = "on an error, raise it with its traceback instead of one line (as SLIMLM_DEBUG=1 does)"


def build_parser() -> argparse.ArgumentParser:
    from slimlm import __version__

    parser = Parser(prog="slimlm", description=textwrap.dedent("""\
        Prune a Hugging Face causal LM (depth and width) and distill the teacher back into it.
        Pipeline: importance → plan/prune → generate → distill → eval, or all of it with run."""),
        epilog=examples("slimlm demo --quick", "slimlm run examples/recipe.yaml",
                        "slimlm importance --model M --data 'docs/*.txt' --out scores/"))
    parser.add_argument("--version", action="version", version=f"slimlm {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="command", parser_class=Parser)
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(f"slimlm.cli.{name.replace('-', '_')}").add_parser(subparsers)
        command = subparsers.choices[name]
        # A passthrough command (distill, search) leaves --debug to TrainingArguments' own flag.
        if not command.get_default("passthrough"):
            command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's) and run the subcommand; returns its exit code.
    A subcommand marked ``passthrough`` (distill) gets the flags slimlm does not know as
    ``args.training_args``; any other reports them as argparse does (exit 2)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.parse_args(argv)  # reports the unknown flags with argparse's usage line, exit 2
    args.training_args = rest
    debug = args.debug or os.environ.get("SLIMLM_DEBUG") == "1"
    name = f"slimlm {args.command}"
    try:
        if getattr(args, "no_progress", False):
            quiet_progress()
        from slimlm import outputs

        with outputs.command(name):  # names its outputs' markers; its output locks end with it
            return args.handler(args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except InputError as error:
        if debug:
            raise
        print(f"{name}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # a runtime failure: one line, the traceback only when debugging
        if debug:
            raise
        print(f"{name}: error: {type(error).__name__}: {_one_line(error)} "
              "(SLIMLM_DEBUG=1 or --debug shows the traceback)", file=sys.stderr)
        return EXIT_FAILURE


def entry() -> None:
    """The ``slimlm`` executable: ``main`` then exit with its code.

    A process of a distributed run (torchrun/accelerate, gloo or NCCL) ends with its process
    group torn down and a hard exit: at interpreter teardown a communicator thread still
    joinable aborts the process now and then (SIGABRT, seen 1 run in 3 with gloo), which would
    turn a finished run into a failed one. Everything is written and flushed by then.
    """
    code = main()
    try:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
    except ImportError:
        distributed = False
    if distributed:
        try:
            dist.destroy_process_group()
        finally:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    sys.exit(code)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
