"""``slimlm plan``: a dry run of pruning — the sizes, parameter counts and memory; nothing written."""
from __future__ import annotations

import json

from slimlm.cli import arguments
from slimlm.cli.arguments import EXIT_OK
from slimlm.errors import InputError


def add_parser(subparsers) -> None:
    sub = arguments.add_command(
        subparsers, "plan", "dry run: the pruned sizes, parameter counts per part and memory (no weights written)",
        ["slimlm plan --model SmolLM2.gguf --target-params 0.5",
         "slimlm plan --model model/ --hidden-size 512 --intermediate-size 1024 --json"])
    arguments.add_model_options(sub)
    arguments.add_target_options(sub)
    sub.add_argument("--json", action="store_true", help="also print the plan as JSON")
    sub.set_defaults(handler=run)


def run(args) -> int:
    from slimlm.surgery import plan

    arguments.check_model_path(args.model)
    target = arguments.target(args)
    model, _ = arguments.load(args.model, args, device="cpu")
    try:
        the_plan = plan(model, target)
    except ValueError as error:  # a target this model cannot meet (larger than it, a layer it lacks)
        raise InputError(str(error)) from None
    print(the_plan.table())
    bytes_per = next(model.parameters()).element_size()  # the dtype it loaded in (auto: float32 on CPU)
    print(f"weights in memory: {the_plan.params_before['total'] * bytes_per / 2**20:,.0f} MiB → "
          f"{the_plan.params_after['total'] * bytes_per / 2**20:,.0f} MiB at {bytes_per} bytes/parameter")
    if args.json:
        print(json.dumps(the_plan.to_dict(), indent=2))
    return EXIT_OK
