"""``slimlm distill``: distill the teacher into the pruned student; any Hugging Face
``TrainingArguments`` flag passes through (``args.training_args``), and the same command runs
under ``accelerate launch`` / ``torchrun``."""
from __future__ import annotations

import argparse
import os

from slimlm.cli import arguments
from slimlm.cli.arguments import EXIT_OK
from slimlm.distill.options import DistillOptions, GenerationOptions
from slimlm.errors import InputError


def add_parser(subparsers) -> None:
    positive_int = arguments.positive_int
    sub = arguments.add_command(
        subparsers, "distill", "distill the teacher into the pruned student (logit KD; any HF TrainingArguments flag "
        "passes through)",
        ["slimlm distill --teacher M --student student/ --data train.jsonl --max-tokens 2000000 --out distilled/",
         "slimlm distill --teacher M --student student/ --data train.jsonl --synthetic synthetic.jsonl "
         "--mix 0.5 --lr 1e-4 --gradient_accumulation_steps 4 --bf16 true --save-dtype bfloat16 --out distilled/",
         "accelerate launch -m slimlm distill --teacher M --student student/ --data train.jsonl --out distilled/",
         "torchrun --nproc-per-node 8 -m slimlm distill … (same flags)",
         "slimlm distill --student student/ --data shards/ --teacher-cache cache/ --out distilled/  "
         "(no teacher: slimlm teacher-cache)"])
    arguments.add_model_options(sub, flag="--teacher", required=False,
                                help_text="teacher model: a folder, a .gguf file or a cached hub id (not with "
                                          "--teacher-cache)")
    sub.add_argument("--teacher-cache", help="learn from the teacher's cached top-k (slimlm teacher-cache, made on "
                                             "the --data shards) instead of a live teacher")
    sub.add_argument("--student", required=True, help="pruned model folder (slimlm prune)")
    arguments.add_data_options(sub)
    sub.add_argument("--synthetic", help="JSONL from slimlm generate (with the teacher's top-k of it in "
                                         "<file>.topk/ when generate kept them: then no teacher pass on it)")
    sub.add_argument("--mix", type=float, default=GenerationOptions().mix,
                     help=f"fraction of synthetic blocks in the training mix (default {GenerationOptions().mix})")
    DistillOptions.add_arguments(sub)
    sub.add_argument("--correct-teacher-tokens", type=positive_int,
                     help="Minitron's teacher correction: first fine-tune the teacher on this many tokens of --data "
                     "with cross-entropy, in --student-precision, saved to <out>.teacher-corrected (reused by a rerun of the same inputs, "
                     "replaced otherwise; the distillation's checkpoints record it) (default: no correction)")
    sub.add_argument("--correct-teacher-lr", type=arguments.positive_float,
                     help="learning rate of the teacher correction (default: a tenth of --lr)")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--out", required=True)
    arguments.add_save_dtype_option(sub)
    sub.add_argument("--overwrite", action="store_true",
                     help="replace an earlier output of slimlm and start over (its checkpoints are deleted)")
    sub.set_defaults(handler=run, passthrough=True)


def run(args) -> int:
    import torch

    from slimlm import outputs
    from slimlm.pipeline.synthetic import load_synthetic
    from slimlm.distill.trainer import check_vocabularies
    from slimlm.distill.training import training_arguments
    from slimlm.models import load_model, load_tokenizer, resolve_dtype
    from slimlm.pipeline import distill
    from slimlm.pipeline.correct import correct_teacher_stage

    options = DistillOptions.from_args(args)
    if (args.teacher is None) == (args.teacher_cache is None):
        raise InputError("give --teacher or --teacher-cache (one of them)")
    if args.teacher_cache is not None:
        _check_cache_settings(args, options)
    else:
        arguments.check_model_path(args.teacher)
    arguments.check_model_path(args.student)
    if not os.path.isdir(args.student):
        raise InputError(f"student {args.student} is not a model folder (make one with slimlm prune)")
    arguments.check_paths_exist(args.data, "data")
    if args.synthetic is not None:
        arguments.check_paths_exist([args.synthetic], "synthetic data")
    GenerationOptions.from_args(argparse.Namespace(mix=args.mix))  # --mix in [0, 1], named as a flag
    if args.correct_teacher_lr is not None and args.correct_teacher_tokens is None:
        raise InputError("--correct-teacher-lr needs --correct-teacher-tokens")
    if args.correct_teacher_tokens is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("--correct-teacher-tokens runs in one process, not under torchrun/accelerate: "
                         "distill with it in one process, or pass a corrected teacher as --teacher")
    resolved = outputs.resolve(args.out)
    checkpoints = resolved + ".checkpoints"
    corrected_dir = resolved + ".teacher-corrected"
    args.out = outputs.check_output(args.out, args.overwrite,
                                    {"teacher": args.teacher, "student": args.student, "data": args.data,
                                     "synthetic data": args.synthetic, "teacher cache": args.teacher_cache},
                                    related=[checkpoints, outputs.staging_path(resolved), corrected_dir])
    training_args = (["--use_cpu", "true"] if args.device == "cpu" else []) + args.training_args
    training_arguments(training_args, output_dir=checkpoints)
    # Under accelerate/torchrun every process loads both models on CPU and the Trainer places
    # them. The student keeps float32 master weights (mixed precision: --bf16 true).
    dtype = resolve_dtype(args.dtype, "cuda" if torch.cuda.is_available() else "cpu")
    trust = args.trust_remote_code
    try:
        student = load_model(args.student, dtype=torch.float32, trust_remote_code=trust)
        tokenizer = load_tokenizer(args.student, trust_remote_code=trust)
        teacher = None
        if args.teacher is not None:
            teacher = load_model(args.teacher, dtype=dtype, trust_remote_code=trust)
            teacher_tokenizer = load_tokenizer(args.teacher, trust_remote_code=trust)
    except FileNotFoundError as error:
        raise InputError(str(error)) from None
    if teacher is not None:
        check_vocabularies(student, teacher, tokenizer, teacher_tokenizer)
    # Teacher-written text: its cached top-k targets when slimlm generate kept them, else its texts by source.
    synthetic = load_synthetic(args.synthetic) if args.synthetic else None
    synthetic_caches = synthetic.caches if synthetic is not None and synthetic.caches else None
    synthetic_texts = synthetic.texts_by_source() if synthetic is not None and not synthetic_caches else None
    rank_zero = os.environ.get("RANK", "0") == "0"
    train = arguments.training_data(args)
    if args.teacher_cache is not None:
        _check_cache(args.teacher_cache, train, student, tokenizer, options)
    if args.correct_teacher_tokens is not None:
        from slimlm.distill.training import student_precision_flags

        # The correction trains in the student's precision (bfloat16 mixed where native with auto).
        correction_flags = student_precision_flags(options.student_precision,
                                                   ["--use_cpu", "true"] if args.device == "cpu" else [],
                                                   log=lambda line: None)
        teacher = correct_teacher_stage(
            teacher, teacher_tokenizer, train, corrected_dir, tokens=args.correct_teacher_tokens,
            seq_len=options.seq_len, batch_size=options.batch_size,
            learning_rate=args.correct_teacher_lr or options.lr / 10,
            seed=args.seed, training_args=correction_flags, overwrite=True, inplace=True,
            disable_tqdm=not arguments.progress(args),
            log=print if rank_zero else (lambda line: None))
    layer_map = distill.pruned_layer_map(args.student, student, teacher) if options.hidden_loss_weight > 0 else None
    _, log_history = distill.distill_stage(
        teacher, student, tokenizer, train, args.out, options, synthetic_texts=synthetic_texts,
        synthetic_caches=synthetic_caches, mix_fraction=args.mix if synthetic is not None else 0.0, seed=args.seed, training_args=training_args,
        layer_map=layer_map, teacher_cache=args.teacher_cache, overwrite=args.overwrite, resume=not args.overwrite,
        disable_tqdm=not arguments.progress(args), save_dtype=args.save_dtype,
        extra_record={"teacher": args.teacher, "student": args.student},
        log=print if rank_zero else (lambda line: None))
    if not rank_zero:
        return EXIT_OK
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    if losses:
        print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f} over {len(losses)} logged steps")
    print(f"distilled model written to {args.out}")
    return EXIT_OK


def _check_cache_settings(args, options) -> None:
    """What a distillation from a teacher cache cannot have: a live teacher's settings."""
    arguments.check_paths_exist([args.teacher_cache], "teacher cache")
    needs = [flag for flag, given in (("--correct-teacher-tokens", args.correct_teacher_tokens),
                                      ("--synthetic", args.synthetic),
                                      ("--hidden-loss-weight", options.hidden_loss_weight),
                                      ("--on-policy-fraction", options.on_policy_fraction)) if given]
    if needs:
        raise InputError(f"--teacher-cache replaces the live teacher, which {', '.join(needs)} need(s)")


def _check_cache(path: str, train, student, tokenizer, options) -> None:
    """The cache was made on these shards' blocks of --seq-len tokens, with this tokenizer, at
    this temperature and for this vocabulary (InputError naming what differs)."""
    from slimlm.distill.topk_cache import load_teacher_topk, tokenizer_identity
    from slimlm.distill.lm_heads import vocab_rows
    from slimlm.pipeline.records import STAGE_RECORD, data_digest, read_json
    from slimlm.shards import TokenShards

    if not isinstance(train, TokenShards):
        raise InputError("--teacher-cache: --data must be the token shards the cache was made on (slimlm tokenize)")
    cache = load_teacher_topk(path)
    try:
        # the vocabulary, not where the tokenizer was read from (the student's folder has a copy)
        vocabulary = {key: value for key, value in tokenizer_identity(tokenizer).items() if key != "tokenizer"}
        cache.check_compatible(vocab_size=vocab_rows(student), temperature=options.temperature,
                               tokenizer=vocabulary, shards=data_digest(train))
    except ValueError as error:
        raise InputError(f"--teacher-cache {path}: {error}") from None
    made = (read_json(os.path.join(path, STAGE_RECORD)) or {}).get("inputs", {})
    if made.get("seq_len") not in (None, options.seq_len):
        raise InputError(f"--teacher-cache {path} holds blocks of {made['seq_len']} tokens; --seq-len is "
                         f"{options.seq_len}")
