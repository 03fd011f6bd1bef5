"""The ``slimlm`` command: score → prune → distill → evaluate, one subcommand per stage, plus
``run`` (a whole recipe), ``demo`` and ``bench``.

Exit codes: 0 success; 1 a runtime failure; 2 a usage error or bad input (a missing, corrupt
or truncated model or scores file, a data path, an unknown value, a target larger than the
model, an output that is, holds or sits inside an input, an existing output without
``--overwrite`` or one slimlm did not write, checkpoints of another run). Errors print one
line, ``slimlm <command>: error: ...``; ``SLIMLM_DEBUG=1``
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import textwrap

from slimlm.errors import InputError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse with examples shown verbatim and no abbreviated flags (so HF TrainingArguments
    flags pass through ``distill`` untouched)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _int_list(value: str) -> list[int]:
    try:
        numbers = [int(item) for item in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not numbers:
        raise argparse.ArgumentTypeError(f"expected at least one layer index, got {value!r}")
    return numbers


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not (number > 0 and math.isfinite(number)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value!r}")
    return number


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _add_model_options(parser, *, flag="--model", required=True, help_text="model: a folder, a .gguf file or a cached hub id"):
    parser.add_argument(flag, required=required, help=help_text)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    _add_trust_option(parser)


def _add_trust_option(parser):
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the Python code a model folder ships (config.json auto_map); off by default: "
                             "only do this for a model whose code you have read")


def _add_data_options(parser, *, required=True):
    parser.add_argument("--data", nargs="+", required=required, metavar="D",
                        help="text files, JSONL/Parquet files, saved datasets or globs (slimlm.data.load_texts)")
    parser.add_argument("--text-field", default="text", help="field of JSONL/Parquet records holding the text")


def _progress(args) -> bool:
    return not getattr(args, "no_progress", False)


def _quiet_progress() -> None:
    """--no-progress also silences transformers' own bars (weight loading, GGUF conversion)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# ------------------------------------------------------------------ loading
def _load(spec: str, args, *, device=None):
    """(model, tokenizer), with a missing path or unknown id as an InputError."""
    from slimlm.models import load_model, load_tokenizer
    from slimlm.models import default_device, resolve_dtype

    device = device or args.device or default_device()
    try:
        model = load_model(spec, dtype=resolve_dtype(args.dtype, device), device=device,
                           trust_remote_code=args.trust_remote_code)
        tokenizer = load_tokenizer(spec, trust_remote_code=args.trust_remote_code)
    except FileNotFoundError as error:
        raise InputError(str(error)) from None
    return model, tokenizer


def _texts(args) -> list[str]:
    from slimlm.data import load_texts

    return load_texts(args.data, text_field=args.text_field)


def _check_paths_exist(paths, what: str) -> None:
    import glob

    for path in paths:
        if not (os.path.exists(path) or glob.has_magic(path) and glob.glob(path, recursive=True)):
            raise InputError(f"{what} {path} does not exist")


def _check_model_path(spec: str) -> None:
    """Fail before any import-heavy work when a model path that looks local is missing."""
    if (spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or os.sep in spec.rstrip(os.sep)
            and spec.count("/") != 1) and not os.path.exists(spec):
        raise InputError(f"model {spec} does not exist")


# ------------------------------------------------------------------ commands
def cmd_importance(args) -> int:
    from slimlm import outputs
    from slimlm.data import tokenize_blocks
    from slimlm.pipeline import importance

    _check_model_path(args.model)
    _check_paths_exist(args.data, "data")
    outputs.check_output(args.out, args.overwrite, {"model": args.model, "data": args.data})
    model, tokenizer = _load(args.model, args)
    blocks = tokenize_blocks(_texts(args), tokenizer, args.seq_len, model=model)
    scores = importance.importance_stage(model, blocks, args.out, metrics=args.metrics, depth=args.depth,
                                     num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
                                     loss_drop_samples=args.loss_drop_samples, progress=_progress(args))
    scores.summary()
    if args.plot:
        print(f"plot: {scores.plot(os.path.join(args.out, 'importance.png'))}")
    print(f"scores written to {args.out}")
    return EXIT_OK


def _target(args) -> dict:
    target = {}
    if args.target_params is not None:
        target["target_params"] = _target_params(args.target_params)
    for name in ("hidden_size", "intermediate_size", "num_layers"):
        if getattr(args, name) is not None:
            target[name] = getattr(args, name)
    if args.num_heads is not None:
        target["num_attention_heads"] = args.num_heads
    if args.num_kv_heads is not None:
        target["num_key_value_heads"] = args.num_kv_heads
    if args.drop_layers is not None:
        target["drop_layers"] = args.drop_layers
    if not target:
        raise InputError("say what to prune to: --target-params, a size flag (--hidden-size …) or --drop-layers")
    return target


def _target_params(value: str) -> float | int | str:
    """'0.5' is a fraction of the model (in (0, 1]); '70M', '1.2B' and '70000000' are counts.
    A number above 1 that is not whole (1.5) is neither: refused rather than read as 1."""
    try:
        number = float(value)
    except ValueError:
        return value  # '70M': the planner parses it
    if not math.isfinite(number) or number <= 0:
        raise InputError(f"--target-params {value}: expected a fraction in (0, 1] or a parameter count")
    if number <= 1.0:
        return number
    if not number.is_integer():
        raise InputError(f"--target-params {value}: a fraction must be in (0, 1] and a count a whole number of "
                         "parameters (e.g. 70M, 70000000)")
    return int(number)


def _add_target_options(parser):
    group = parser.add_argument_group("target (a budget, explicit sizes, or layers to drop)")
    group.add_argument("--target-params", help="parameter budget: a fraction (0.5) or a count (70M, 1.2B, 70000000)")
    group.add_argument("--hidden-size", type=_positive_int)
    group.add_argument("--intermediate-size", type=_positive_int)
    group.add_argument("--num-heads", type=_positive_int, help="query heads per layer")
    group.add_argument("--num-kv-heads", type=_positive_int)
    group.add_argument("--num-layers", type=_positive_int, help="layers to keep (which: by the scores' layer axis)")
    group.add_argument("--drop-layers", type=_int_list, help="layer indices to drop, e.g. 3,4,5")


def cmd_plan(args) -> int:
    from slimlm.surgery import plan

    _check_model_path(args.model)
    target = _target(args)
    model, _ = _load(args.model, args, device="cpu")
    the_plan = plan(model, target)
    print(the_plan.table())
    bytes_per = next(model.parameters()).element_size()  # the dtype it loaded in (auto: float32 on CPU)
    print(f"weights in memory: {the_plan.params_before['total'] * bytes_per / 2**20:,.0f} MiB → "
          f"{the_plan.params_after['total'] * bytes_per / 2**20:,.0f} MiB at {bytes_per} bytes/parameter")
    if args.json:
        print(json.dumps(the_plan.to_dict(), indent=2))
    return EXIT_OK


def cmd_prune(args) -> int:
    from slimlm import outputs
    from slimlm.pipeline import importance, prune

    _check_model_path(args.model)
    target = _target(args)
    needs_scores = not (set(target) <= {"drop_layers"})
    if needs_scores and args.scores is None:
        raise InputError("--scores is required unless only --drop-layers is given (compute them with slimlm importance)")
    if args.scores is not None and not os.path.isdir(args.scores):
        raise InputError(f"scores folder {args.scores} does not exist")
    outputs.check_output(args.out, args.overwrite, {"model": args.model, "scores": args.scores})
    model, tokenizer = _load(args.model, args, device="cpu")
    scores = importance.load_scores(args.scores, model=model) if args.scores is not None else None
    _, the_plan = prune.prune_stage(model, scores, target, args.out,
                                     tokenizer=tokenizer, overwrite=args.overwrite)
    print(the_plan.table())
    print(f"pruned model written to {args.out}")
    return EXIT_OK


def cmd_generate(args) -> int:
    from slimlm.distill.generate import load_prompts, prompts_from_texts
    from slimlm import outputs
    from slimlm.pipeline import records, synthetic

    _check_model_path(args.teacher)
    if (args.prompts is None) == (args.from_data is None):
        raise InputError("give exactly one of --prompts P.jsonl and --from-data D")
    if args.prompts is not None:
        _check_paths_exist([args.prompts], "prompts file")
    else:
        _check_paths_exist(args.from_data, "data")
    if os.path.isdir(args.out):
        raise InputError(f"output {args.out} is a folder; --out names a JSONL file")
    inputs = {"teacher": args.teacher, "prompts file": args.prompts, "data": args.from_data}
    outputs.check_output(args.out, args.overwrite, inputs, related=[args.out + records.SYNTHETIC_DONE_SUFFIX])
    # Every input is read and checked before the old output is touched; it is replaced only
    # when the new one is complete.
    if args.prompts is not None:
        prompts = load_prompts(args.prompts)
    else:
        from slimlm.data import load_texts

        prompts = prompts_from_texts(load_texts(args.from_data, text_field=args.text_field), max_prompts=args.num_prompts)
        if not prompts:
            raise InputError(f"no prompt of at least 20 characters could be cut from {' '.join(args.from_data)}")
    prompts = prompts[: args.num_prompts]
    teacher, tokenizer = _load(args.teacher, args)
    dataset = synthetic.generate_stage(teacher, tokenizer, prompts, args.out, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_p=args.top_p,
                                    num_return_sequences=args.num_return_sequences, batch_size=args.batch_size,
                                    seed=args.seed, chat_template=True if args.chat else None,
                                    progress=_progress(args))
    print(f"{len(dataset)} generations in {args.out}")
    return EXIT_OK


def cmd_distill(args, training_args: list[str]) -> int:
    import torch

    from slimlm.distill.generate import SyntheticDataset
    from slimlm.distill.trainer import check_vocabularies
    from slimlm.models import load_model, load_tokenizer
    from slimlm import outputs
    from slimlm.distill.training import training_arguments
    from slimlm.models import resolve_dtype
    from slimlm.pipeline import distill

    _check_model_path(args.teacher)
    _check_model_path(args.student)
    if not os.path.isdir(args.student):
        raise InputError(f"student {args.student} is not a model folder (make one with slimlm prune)")
    _check_paths_exist(args.data, "data")
    if args.synthetic is not None:
        _check_paths_exist([args.synthetic], "synthetic data")
    distill.check_distill_settings(learning_rate=args.lr, temperature=args.temperature, beta=args.beta,
                                  kd_weight=args.kd_weight, ce_weight=args.ce_weight, max_minutes=args.max_minutes,
                                  mix_fraction=args.mix)
    checkpoints = args.out.rstrip(os.sep) + ".checkpoints"
    from slimlm.outputs import staging_path

    outputs.check_output(args.out, args.overwrite,
                        {"teacher": args.teacher, "student": args.student, "data": args.data,
                         "synthetic data": args.synthetic},
                        related=[checkpoints, staging_path(args.out)])
    extra = ["--use_cpu", "true"] if args.device == "cpu" else []
    training_arguments(extra + training_args, output_dir=checkpoints)
    # Under accelerate/torchrun every process loads both models on CPU and the Trainer places
    # them. The student keeps float32 master weights (mixed precision: --bf16 true).
    dtype = resolve_dtype(args.dtype, "cuda" if torch.cuda.is_available() else "cpu")
    trust = args.trust_remote_code
    try:
        teacher = load_model(args.teacher, dtype=dtype, trust_remote_code=trust)
        student = load_model(args.student, dtype=torch.float32, trust_remote_code=trust)
        tokenizer = load_tokenizer(args.student, trust_remote_code=trust)
        teacher_tokenizer = load_tokenizer(args.teacher, trust_remote_code=trust)
    except FileNotFoundError as error:
        raise InputError(str(error)) from None
    check_vocabularies(student, teacher, tokenizer, teacher_tokenizer)
    synthetic_texts = SyntheticDataset.load(args.synthetic).texts() if args.synthetic else None
    rank_zero = os.environ.get("RANK", "0") == "0"
    _, log_history = distill.distill_stage(
        teacher, student, tokenizer, _texts(args), args.out, synthetic_texts=synthetic_texts,
        mix_fraction=args.mix if synthetic_texts else 0.0, seq_len=args.seq_len, max_tokens=args.max_tokens,
        max_minutes=args.max_minutes, batch_size=args.batch_size, learning_rate=args.lr,
        temperature=args.temperature, beta=args.beta, kd_weight=args.kd_weight, ce_weight=args.ce_weight,
        seed=args.seed, training_args=extra + training_args, overwrite=args.overwrite, resume=not args.overwrite,
        disable_tqdm=not _progress(args), extra_record={"teacher": args.teacher, "student": args.student},
        log=print if rank_zero else (lambda line: None))
    if not rank_zero:
        return EXIT_OK
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    if losses:
        print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f} over {len(losses)} logged steps")
    print(f"distilled model written to {args.out}")
    return EXIT_OK


def cmd_eval(args) -> int:
    from slimlm.evaluate import comparison_rows, evaluate_model, format_table
    from slimlm import outputs
    from slimlm.data import tokenize_blocks

    specs = [args.model] + list(args.compare or [])
    for spec in specs:
        _check_model_path(spec)
    _check_paths_exist(args.data, "data")
    if args.json is not None:
        if os.path.isdir(args.json):
            raise InputError(f"--json {args.json} is a folder; it names the JSON file to write")
        outputs.check_output(args.json, args.overwrite, {"model": specs, "data": args.data}, what="--json file")
    prompts = list(args.prompt or [])
    results = []
    tokenizer = None
    blocks = None
    for spec in specs:
        model, model_tokenizer = _load(spec, args)
        if tokenizer is None:
            tokenizer = model_tokenizer
            blocks = tokenize_blocks(_texts(args), tokenizer, args.seq_len, model=model)
            blocks = blocks.select(range(min(len(blocks), args.max_blocks)))
        elif model_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise InputError(f"{spec} has another tokenizer than {specs[0]}; perplexities would not be comparable")
        results.append(evaluate_model(model, blocks, tokenizer=tokenizer, prompts=prompts,
                                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, spec=spec,
                                      progress=_progress(args), name=spec))
        del model
    print(format_table(comparison_rows(results)))
    for prompt in prompts:
        print(f"\nprompt: {prompt}")
        for result in results:
            print(f"  {result['name']}: {' '.join(result['samples'][prompt].split())}")
    if args.json:
        outputs.write_json(args.json, results)
        print(f"results written to {args.json}")
    return EXIT_OK


def _print_summary(summary: dict) -> None:
    print()
    print(summary["table"])
    print(f"\nreport: {summary['report']['markdown']}")
    print(f"        {summary['report']['html']}")
    print(f"done in {summary['seconds'] / 60:.1f} min")


def cmd_run(args) -> int:
    from slimlm.pipeline import load_recipe, run_recipe

    recipe = load_recipe(args.recipe)
    if args.out is not None:
        recipe["out"] = os.path.abspath(args.out)
    if args.device is not None:
        recipe["device"] = args.device
    summary = run_recipe(recipe, overwrite=args.overwrite, progress=_progress(args),
                         command=f"slimlm run {args.recipe}", recipe_path=args.recipe,
                         trust_remote_code=args.trust_remote_code)
    _print_summary(summary)
    return EXIT_OK


def cmd_demo(args) -> int:
    from slimlm.models import smollm2_gguf_path
    from slimlm.pipeline import builtin_recipe, run_recipe, validate_recipe
    from slimlm.pipeline.corpus import collect_package_docs, write_corpus

    name = "demo-quick" if args.quick else "demo"
    raw = builtin_recipe(name)
    corpus_settings = raw.pop("corpus")
    out = os.path.abspath(args.out or f"slimlm-{name}")
    try:
        teacher = smollm2_gguf_path()
    except FileNotFoundError as error:
        raise InputError(f"{error}; `make build` installs it") from None
    data_folder = os.path.join(out + ".data")
    paths = {split: os.path.join(data_folder, f"{split}.jsonl") for split in ("train", "heldout")}
    if not all(os.path.isfile(path) for path in paths.values()):
        print(f"[data] collecting the documentation of installed packages into {data_folder}")
        paths = write_corpus(collect_package_docs(progress=_progress(args), **corpus_settings), data_folder)
    raw.update(teacher=teacher, out=out, data={"train": paths["train"], "heldout": paths["heldout"]})
    if args.device is not None:
        raw["device"] = args.device
    recipe = validate_recipe(raw, f"builtin recipe {name}")
    summary = run_recipe(recipe, overwrite=args.overwrite, progress=_progress(args),
                         command=f"slimlm demo{' --quick' if args.quick else ''}")
    _print_summary(summary)
    return EXIT_OK


def cmd_bench(args) -> int:
    folder = args.benchmarks or _find_benchmarks()
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


def _find_benchmarks() -> str | None:
    for base in (os.getcwd(), os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))):
        candidate = os.path.join(base, "benchmarks")
        if os.path.isfile(os.path.join(candidate, "conftest.py")):
            return candidate
    return None


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slimlm", description=textwrap.dedent("""\
        Prune a Hugging Face causal LM (depth and width) and distill the teacher back into it.
        Pipeline: importance → plan/prune → generate → distill → eval, or all of it with run."""),
        epilog=_examples("slimlm demo --quick", "slimlm run examples/recipe.yaml",
                         "slimlm importance --model M --data 'docs/*.txt' --out scores/"))
    from slimlm import __version__

    parser.add_argument("--version", action="version", version=f"slimlm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    commands.required = True

    def command(name, help_text, examples):
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=_examples(*examples))
        sub.add_argument("--no-progress", action="store_true", help="no progress bars")
        return sub

    sub = command("importance", "score heads, KV groups, neurons, hidden channels and layers on calibration text",
                  ["slimlm importance --model SmolLM2.gguf --data 'docs/*.md' --num-samples 256 --seq-len 512 --out scores/",
                   "slimlm importance --model model/ --data train.jsonl --metrics activation,wanda "
                   "--depth block_influence,loss_drop --out scores/"])
    _add_model_options(sub)
    _add_data_options(sub)
    sub.add_argument("--out", required=True, help="folder for scores.safetensors + meta.json")
    sub.add_argument("--num-samples", type=_positive_int, default=1024, help="calibration blocks (default 1024)")
    sub.add_argument("--seq-len", type=_positive_int, default=2048, help="tokens per block (default 2048)")
    sub.add_argument("--batch-size", type=_positive_int, default=8)
    sub.add_argument("--metrics", type=_csv, default=["activation"], help="width metrics: activation,wanda,magnitude")
    sub.add_argument("--depth", type=_csv, default=["block_influence", "loss_drop"],
                     help="depth metrics: block_influence,loss_drop (empty string: none)")
    sub.add_argument("--loss-drop-samples", type=_positive_int, default=None, help="cap on the samples loss_drop uses")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--plot", action="store_true", help="also write importance.png")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    sub.set_defaults(handler=cmd_importance)

    sub = command("plan", "dry run: the pruned sizes, parameter counts per part and memory (no weights written)",
                  ["slimlm plan --model SmolLM2.gguf --target-params 0.5",
                   "slimlm plan --model model/ --hidden-size 512 --intermediate-size 1024 --json"])
    _add_model_options(sub)
    _add_target_options(sub)
    sub.add_argument("--json", action="store_true", help="also print the plan as JSON")
    sub.set_defaults(handler=cmd_plan)

    sub = command("prune", "prune a model by its importance scores and save a standard checkpoint",
                  ["slimlm prune --model M --scores scores/ --target-params 0.5 --out student/",
                   "slimlm prune --model M --scores scores/ --intermediate-size 768 --num-layers 24 --out student/",
                   "slimlm prune --model M --drop-layers 3,4,5 --out student/"])
    _add_model_options(sub)
    sub.add_argument("--scores", help="folder written by slimlm importance (not needed for --drop-layers alone)")
    _add_target_options(sub)
    sub.add_argument("--out", required=True)
    sub.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    sub.set_defaults(handler=cmd_prune)

    sub = command("generate", "sample synthetic distillation text from the teacher (JSONL, resumable)",
                  ["slimlm generate --teacher M --from-data 'docs/*.md' --num-prompts 256 --out synthetic.jsonl",
                   "slimlm generate --teacher M --prompts prompts.jsonl --chat --temperature 0.7 --out synthetic.jsonl"])
    _add_model_options(sub, flag="--teacher")
    sub.add_argument("--prompts", help="JSONL with a 'prompt' field, or a text file with one prompt per line")
    sub.add_argument("--from-data", nargs="+", metavar="D", help="cut prompts (first sentences) from these texts")
    sub.add_argument("--text-field", default="text")
    sub.add_argument("--num-prompts", type=_positive_int, default=256)
    sub.add_argument("--out", required=True,
                     help="JSONL output (written beside it first, so an interrupted run is continued)")
    sub.add_argument("--max-new-tokens", type=_positive_int, default=128)
    sub.add_argument("--temperature", type=float, default=0.8)
    sub.add_argument("--top-p", type=float, default=0.95)
    sub.add_argument("--num-return-sequences", type=_positive_int, default=1)
    sub.add_argument("--batch-size", type=_positive_int, default=8)
    sub.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--overwrite", action="store_true")
    sub.set_defaults(handler=cmd_generate)

    sub = command("distill", "distill the teacher into the pruned student (logit KD; any HF TrainingArguments flag "
                  "passes through)",
                  ["slimlm distill --teacher M --student student/ --data train.jsonl --max-tokens 2000000 --out distilled/",
                   "slimlm distill --teacher M --student student/ --data train.jsonl --synthetic synthetic.jsonl "
                   "--mix 0.5 --lr 1e-4 --gradient_accumulation_steps 4 --bf16 true --out distilled/",
                   "accelerate launch -m slimlm distill --teacher M --student student/ --data train.jsonl --out distilled/",
                   "torchrun --nproc-per-node 8 -m slimlm distill … (same flags)"])
    _add_model_options(sub, flag="--teacher")
    sub.add_argument("--student", required=True, help="pruned model folder (slimlm prune)")
    _add_data_options(sub)
    sub.add_argument("--synthetic", help="JSONL from slimlm generate")
    sub.add_argument("--mix", type=float, default=0.5, help="fraction of synthetic blocks in the training mix")
    sub.add_argument("--seq-len", type=_positive_int, default=512)
    sub.add_argument("--batch-size", type=_positive_int, default=8, help="per-device batch (blocks)")
    sub.add_argument("--max-tokens", type=_positive_int, help="training budget in tokens (sets --max_steps)")
    sub.add_argument("--max-minutes", type=_positive_float, help="stop training after this many minutes")
    sub.add_argument("--lr", type=float, default=1e-4)
    sub.add_argument("--temperature", type=float, default=1.0)
    sub.add_argument("--beta", type=float, default=0.0, help="0 forward KL, 1 reverse KL, between: JSD(beta)")
    sub.add_argument("--kd-weight", type=float, default=1.0)
    sub.add_argument("--ce-weight", type=float, default=0.0)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--out", required=True)
    sub.add_argument("--overwrite", action="store_true",
                     help="replace an earlier output of slimlm and start over (its checkpoints are deleted)")
    sub.set_defaults(handler=cmd_distill, passthrough=True)

    sub = command("eval", "held-out perplexity and tokens/s, optional greedy samples; --compare for a table",
                  ["slimlm eval --model distilled/ --data heldout.jsonl",
                   "slimlm eval --model teacher.gguf --compare student/ distilled/ --data heldout.jsonl "
                   "--prompt 'The model' --prompt 'To prune'"])
    _add_model_options(sub)
    sub.add_argument("--compare", nargs="+", metavar="M2", help="more models, evaluated on the same blocks")
    _add_data_options(sub)
    sub.add_argument("--seq-len", type=_positive_int, default=512)
    sub.add_argument("--max-blocks", type=_positive_int, default=64)
    sub.add_argument("--batch-size", type=_positive_int, default=8)
    sub.add_argument("--prompt", action="append", help="a prompt for a greedy sample (repeatable)")
    sub.add_argument("--max-new-tokens", type=_positive_int, default=32)
    sub.add_argument("--json", help="also write the results to this JSON file")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing --json file of an earlier eval")
    sub.set_defaults(handler=cmd_eval)

    sub = command("run", "the whole pipeline from one recipe YAML; finished stages are skipped, so a rerun resumes",
                  ["slimlm run examples/recipe.yaml", "slimlm run recipe.yaml --out run2/ --overwrite"])
    sub.add_argument("recipe", help="recipe YAML (see examples/recipe.yaml)")
    sub.add_argument("--out", help="output folder (default: the recipe's out)")
    sub.add_argument("--device", help="overrides the recipe's device")
    sub.add_argument("--overwrite", action="store_true", help="replace an output folder made by another recipe")
    _add_trust_option(sub)
    sub.set_defaults(handler=cmd_run)

    sub = command("demo", "prune SmolLM2-135M-Instruct to half, distill it back, and write a report",
                  ["slimlm demo            # about 30 minutes on 2 CPU cores",
                   "slimlm demo --quick    # a few minutes: the smoke test"])
    sub.add_argument("--quick", action="store_true", help="a few-minute version (tiny budgets)")
    sub.add_argument("--out", help="output folder (default ./slimlm-demo or ./slimlm-demo-quick)")
    sub.add_argument("--device", help="cpu, cuda … (default: cuda when available)")
    sub.add_argument("--overwrite", action="store_true", help="start over in an output folder of another run")
    sub.set_defaults(handler=cmd_demo)

    sub = command("bench", "run the kernel benchmarks (pytest-benchmark) and print their table",
                  ["slimlm bench", "slimlm bench --quick --filter kl_div"])
    sub.add_argument("--quick", action="store_true", help="small shapes (SLIMLM_BENCH_QUICK=1)")
    sub.add_argument("--filter", help="pytest -k expression")
    sub.add_argument("--benchmarks", help="benchmarks folder (default: ./benchmarks of the checkout)")
    sub.set_defaults(handler=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.parse_args(argv)  # reports the unknown flags with argparse's usage line, exit 2
    debug = os.environ.get("SLIMLM_DEBUG") == "1"
    name = f"slimlm {args.command}"
    try:
        if getattr(args, "no_progress", False):
            _quiet_progress()
        if getattr(args, "passthrough", False):
            return args.handler(args, rest)
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except (InputError, ValueError, FileNotFoundError) as error:
        if debug:
            raise
        print(f"{name}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # a runtime failure: one line, the traceback only with SLIMLM_DEBUG=1
        if debug:
            raise
        print(f"{name}: error: {type(error).__name__}: {_one_line(error)} (SLIMLM_DEBUG=1 shows the traceback)",
              file=sys.stderr)
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
