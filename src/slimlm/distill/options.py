"""The distillation's and the synthetic-text stage's options, each declared once
(``slimlm.options``): ``slimlm distill``'s and ``slimlm generate``'s flags, a recipe's
``distill:`` and ``synthetic:`` sections, and ``DistillOptions`` / ``GenerationOptions`` in Python."""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass

from slimlm.distill.teacher import TEACHER_PRECISIONS
from slimlm.distill.trainer import GEMM_DTYPES, HIDDEN_LOSS_KINDS, HIDDEN_LOSS_SCHEDULES
from slimlm.distill.training import STUDENT_PRECISIONS
from slimlm.errors import InputError
from slimlm.models import RENAMED_DTYPES
from slimlm.options import OptionError, Options, option


@dataclass
class GenerationOptions(Options):
    """How the teacher writes synthetic text: ``num_prompts`` prompts, each continued by
    ``num_return_sequences`` samples of at most ``max_new_tokens`` tokens (temperature and
    nucleus sampling), ``batch_size`` prompts at a time, as a user turn of the chat template
    with ``chat``; ``mix`` is the share of synthetic blocks in a recipe's distillation."""

    SECTION = "synthetic"

    num_prompts: int = option(256, "prompts to continue", check="positive")
    max_new_tokens: int = option(128, "new tokens per generation at most", check="positive")
    temperature: float = option(0.8, "sampling temperature", check="positive")
    top_p: float = option(0.95, "nucleus sampling: the smallest set of tokens holding this probability",
                          check="positive_fraction")
    num_return_sequences: int = option(1, "generations per prompt", check="positive")
    batch_size: int = option(8, "prompts per generation batch", check="positive")
    chat: bool = option(False, "wrap each prompt as a user turn of the tokenizer's chat template")
    sources: str = option("data=1", "prompt sources and their weights, e.g. 'general=0.8,data=0.2': general (the "
                                  "built-in everyday prompts for chat teachers), bos (free sampling from BOS, for "
                                  "base models), data (first sentences of the training documents), file:PATH")
    engine: str = option("slimlm", "what samples: slimlm (the batched sampler, each sample its own seeded stream), "
                                   "generate (Hugging Face generate) or vllm (vLLM over the teacher's Hugging Face "
                                   "folder, where vLLM is installed)", choices=("slimlm", "generate", "vllm"))
    engine_args: str = option("", "more vllm.LLM arguments for engine vllm, as a JSON object, e.g. "
                                  "'{\"tensor_parallel_size\": 2}'")
    server: str = option("", "engine vllm through a vLLM OpenAI-compatible server (vllm serve MODEL --max-logprobs K, "
                             "in its own environment) at this URL, e.g. http://localhost:8000, instead of in process")
    server_model: str = option("", "the teacher's model name on server (default: the teacher as given)")
    precision: str = option("auto", "what the teacher samples in (auto: bfloat16 on a CPU with native bfloat16, "
                                    "float32 on other CPUs, as loaded on a GPU)", choices=("auto", "float32", "bfloat16"),
                            renamed=RENAMED_DTYPES)
    keep_topk: int = option(64, "keep the teacher's top-k log-probs (at most its vocabulary) of every position while sampling, so "
                                "distilling on the text needs no teacher pass (0: keep none)", check="non_negative")
    filters: bool = option(True, "drop degenerate samples (empty, short, repetition loops) and trim answers "
                                 "cut by max_new_tokens to their last sentence end")
    min_new_tokens: int = option(8, "a kept sample's new tokens at least (at most max_new_tokens)",
                                 check="non_negative")
    writer: str = option("corrected", "which teacher writes the text in a recipe with a correct_teacher section: "
                                      "corrected (the one the distillation learns from, so the top-k targets kept "
                                      "while sampling are the ones a live teacher would give) or original",
                         choices=("corrected", "original"), cli=False)
    mix: float = option(0.3, "share of synthetic blocks in the distillation's training mix (a recipe's; "
                             "slimlm distill takes --mix)", check="fraction", cli=False)

    def check(self) -> None:
        from slimlm.distill.prompts import parse_sources
        from slimlm.distill.vllm_sampler import engine_kwargs

        parse_sources(self.sources)
        try:
            engine_kwargs(self.engine_args)
        except InputError as error:
            raise OptionError("engine_args", str(error).removeprefix("engine_args ")) from None
        for name in ("engine_args", "server", "server_model"):
            if getattr(self, name) and self.engine != "vllm":
                raise OptionError(name, "applies to {engine} vllm only, not " + self.engine, mentions=("engine",))
        if self.server and self.engine_args:
            raise OptionError("engine_args", "are vllm.LLM arguments of an engine in process; the {server} was "
                              "started with its own", mentions=("server",))
        if self.server_model and not self.server:
            raise OptionError("server_model", "names the model on a {server}: give it too", mentions=("server",))
        if self.server and not self.server.startswith(("http://", "https://")):
            raise OptionError("server", f"must be an http:// or https:// URL, got {self.server!r}")

    def sampling(self, seed: int) -> dict:
        """The keyword arguments of ``generate_stage``/``check_generation`` these options give."""
        return dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                    num_return_sequences=self.num_return_sequences, batch_size=self.batch_size, seed=seed,
                    chat_template=True if self.chat else None,
                    min_new_tokens=min(self.min_new_tokens, self.max_new_tokens))

    def writing(self, device: str = "cpu") -> dict:
        """The keyword arguments of ``generate_synthetic`` beyond the sampling: engine, dtype, filters, top-k."""
        import torch

        from slimlm.distill.training import cpu_has_bf16

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(self.precision)
        if self.precision == "auto" and device == "cpu":
            dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
        return dict(engine=self.engine, dtype=dtype, filters=self.filters, keep_topk=self.keep_topk or None,
                    **{name: getattr(self, name) for name in ("engine_args", "server", "server_model")
                       if getattr(self, name)})


@dataclass
class DistillOptions(Options):
    """How the pruned student is distilled: blocks of ``seq_len`` tokens, ``batch_size`` per
    device, at ``lr``; until ``max_tokens`` (or the time caps); the loss (temperature, β, KD and
    CE weights, the hidden-state term, on-policy batches) and the precisions teacher and student
    run in. ``training_args``: more ``TrainingArguments`` (a mapping in a recipe; on the command
    line any flag of theirs passes through)."""

    SECTION = "distill"

    seq_len: int = option(512, "tokens per training block", check="positive")
    batch_size: int = option(8, "blocks per device and step", check="positive")
    lr: float = option(1e-4, "peak learning rate (cosine schedule, 5% warmup)", check="positive")
    max_tokens: int | None = option(None, "training budget in tokens (sets max_steps)", check="positive")
    max_minutes: float | None = option(None, "stop training after this many minutes", check="positive")
    finish_by_minutes: float | None = option(
        None, "end the distillation by this minute of the whole run, whatever the stages before it took",
        check="positive", cli=False)
    fit_to_time: bool = option(False, "fit the learning-rate schedule to max_minutes: after the first steps, plan "
                                      "the steps that fit at the measured speed so warmup and decay end there (a "
                                      "resumed run keeps the plan)")
    temperature: float = option(1.0, "distillation temperature", check="positive")
    beta: float = option(0.0, "0 forward KL, 1 reverse KL, between: JSD(beta)", check="fraction")
    kd_weight: float = option(1.0, "weight of the distillation loss", check="non_negative")
    ce_weight: float = option(0.0, "weight of the next-token cross-entropy", check="non_negative")
    teacher_precision: str = option("auto", "what the teacher's forward runs in (auto: bfloat16 where the CPU has "
                                            "native bfloat16, else as loaded; int8: dynamic quantization on CPU)",
                                    choices=TEACHER_PRECISIONS, renamed=RENAMED_DTYPES)
    student_precision: str = option("auto", "what the student trains in (auto: bfloat16 mixed precision where "
                                            "bfloat16 is native, else float32; a --bf16/--fp16 flag wins)",
                                    choices=STUDENT_PRECISIONS, renamed=RENAMED_DTYPES)
    hidden_loss_weight: float = option(0.0, "weight of the hidden-state loss (each student layer against the "
                                            "teacher layer it was cut from)", check="non_negative")
    hidden_loss_schedule: str = option("fixed", "how the hidden loss is weighted over the steps",
                                       choices=HIDDEN_LOSS_SCHEDULES)
    hidden_loss_kind: str = option("cosine", "the hidden-state distance", choices=HIDDEN_LOSS_KINDS)
    on_policy_fraction: float = option(0.0, "share of batches continued by the student's own samples (GKD's "
                                            "lambda)", check="fraction")
    on_policy_prompt_fraction: float = option(0.5, "share of an on-policy block kept as the prompt the student "
                                                   "continues", check="open_fraction")
    on_policy_temperature: float = option(1.0, "the student's sampling temperature on on-policy batches",
                                          check="positive")
    chunk_size: int | None = option(None, "rows per chunk of the fused loss (default: from a memory budget)",
                                    check="positive")
    topk_tail: str = option("bucket", "with a teacher cache, the teacher's mass beyond its top k: one extra bucket on "
                                      "both sides, or the top k renormalised", choices=("bucket", "renormalize"))
    gemm_dtype: str = option("auto", "operands of the LM-head GEMMs in the loss (auto: the training's mixed "
                                     "precision; softmax, KL and CE are float32 always)", choices=tuple(GEMM_DTYPES),
                            renamed=RENAMED_DTYPES)
    freeze_embeddings: bool = option(False, "keep the student's token embedding and LM head as pruned")
    dynamic_mix: bool = option(False, "move the training mix's weights towards the sources where the student's "
                                      "held-out loss exceeds the teacher's most (Sheared-LLaMA); else a static mix")
    corpus_sources: bool = option(False, "each data source of the training shards (file, folder or dataset) is a "
                                         "source of the training mix, with its own weight and, with dynamic_mix, its "
                                         "own held-out slice; else the corpus is one source")
    corpus_weights: str = option("", "with corpus_sources, their static (starting) weights by name, e.g. "
                                     "'docs=0.7,books=0.3' (a file's name without extensions; default: by tokens)")
    mix_every: int = option(32, "steps between the dynamic mix's updates", check="positive")
    mix_heldout_blocks: int = option(4, "held-out blocks per source that the dynamic mix compares the losses on",
                                     check="positive")
    mix_step_size: float = option(1.0, "the dynamic mix's step: weights move by exp(step x excess loss)",
                                  check="positive")
    mix_smoothing: float = option(0.1, "share of the uniform mix blended into each dynamic update", check="fraction")
    eval_steps: int | None = option(None, "held-out NLL every this many steps (a recipe's held-out sets)",
                                    check="positive", cli=False)
    eval_blocks: int = option(8, "held-out blocks per evaluation along the training", check="positive", cli=False)
    training_args: dict = option({}, "more TrainingArguments, by name", cli=False)

    def check(self) -> None:
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise OptionError("kd_weight", "and {ce_weight} are both 0: nothing to train on", mentions=("ce_weight",))
        if self.fit_to_time and not (self.max_minutes or self.finish_by_minutes):
            raise OptionError("fit_to_time", "fits the schedule to {max_minutes}: give {max_minutes} too",
                              mentions=("max_minutes",))
        if self.corpus_weights:
            if not self.corpus_sources:
                raise OptionError("corpus_weights", "weighs the corpus's sources: set {corpus_sources} too",
                                  mentions=("corpus_sources",))
            try:
                parse_corpus_weights(self.corpus_weights)
            except InputError as error:
                raise OptionError("corpus_weights", f": {error}") from None
        if self.hidden_loss_schedule == "minitron" and self.hidden_loss_weight > 0 and self.kd_weight == 0:
            raise OptionError("hidden_loss_schedule", "minitron weights the hidden loss by the logit loss: it "
                                                      "needs {kd_weight} > 0", mentions=("kd_weight",))

    # The DistillationConfig fields that are options here; the loss's core four are recorded
    # under their own names, the rest only when changed (records of older runs stay valid).
    LOSS_FIELDS: typing.ClassVar[tuple[str, ...]] = ("kd_weight", "ce_weight", "temperature", "beta")
    EXTRA_FIELDS: typing.ClassVar[tuple[str, ...]] = (
        "hidden_loss_weight", "hidden_loss_schedule", "hidden_loss_kind", "on_policy_fraction",
        "on_policy_prompt_fraction", "on_policy_temperature", "chunk_size", "topk_tail", "gemm_dtype",
        "freeze_embeddings")

    def distillation_options(self) -> dict:
        """The ``DistillationConfig`` fields beyond the loss's core four that differ from their
        defaults (what a run records as ``distillation_options``)."""
        defaults = DistillOptions()
        return {name: getattr(self, name) for name in self.EXTRA_FIELDS if getattr(self, name) != getattr(defaults, name)}

    def distillation_config(self, *, layer_map: dict[int, int] | None = None, topk: str | None = None):
        """The trainer's ``DistillationConfig`` these options give (``layer_map``: the hidden
        loss's student → teacher layers; default the trainer's even spread)."""
        from slimlm.distill.trainer import DistillationConfig

        fields = {name: getattr(self, name) for name in self.LOSS_FIELDS + self.EXTRA_FIELDS}
        config = DistillationConfig(**fields, teacher_precision=self.teacher_precision, layer_map=layer_map, topk=topk)
        try:
            config.check()
        except ValueError as error:  # the combinations only the trainer knows (minitron without KD, …)
            raise InputError(str(error)) from None
        return config


@dataclass
class TeacherCacheOptions(Options):
    """The offline teacher: its top-k log-probabilities on the training blocks, computed once and
    stored compressed (``slimlm.distill.topk_cache``); the distillation then learns from the cache
    with no teacher loaded (logit distillation only: no hidden-state loss, no on-policy batches,
    no synthetic text). ``slimlm teacher-cache``'s flags, a recipe's ``teacher_cache:`` section and
    ``TeacherCacheOptions`` in Python."""

    SECTION = "teacher_cache"

    k: int = option(64, "log-probabilities kept per token (the teacher's k largest)", check="positive")
    prob_bits: int = option(6, "bits per stored probability (the codec's; 6: 142 bytes a token at k = 64)",
                            check="positive")
    batch_size: int = option(8, "blocks per teacher forward pass", check="positive")

    def check(self) -> None:
        if not 1 <= self.prob_bits <= 16:
            raise OptionError("prob_bits", f"must be in [1, 16], got {self.prob_bits}")

    @staticmethod
    def check_distillation(distill: dict, synthetic: dict | None) -> None:
        """InputError for a distillation (a recipe's ``distill`` and ``synthetic`` sections) that
        needs the live teacher a cache replaces."""
        needs = [name for name, value in (("distill.hidden_loss_weight", distill["hidden_loss_weight"]),
                                          ("distill.on_policy_fraction", distill["on_policy_fraction"]),
                                          ("synthetic.mix", (synthetic or {}).get("mix", 0.0))) if value]
        if needs:
            raise InputError(f"teacher_cache: the distillation learns from the cached teacher alone, but "
                             f"{', '.join(needs)} need(s) the live teacher: set them to 0 or drop teacher_cache")
        if distill.get("corpus_sources"):
            raise InputError("teacher_cache: the cached blocks are read in the cache's order, which "
                             "distill.corpus_sources cannot split by source: drop one of them")


def parse_corpus_weights(spec: str) -> dict[str, float]:
    """``"docs=0.7,books=0.3"`` as {name: weight}; InputError (one line) for an entry without
    ``=``, a name given twice, a weight that is not a finite number >= 0, or all weights 0."""
    weights: dict[str, float] = {}
    for entry in spec.split(","):
        name, sep, value = (part.strip() for part in entry.partition("="))
        if not sep or not name:
            raise InputError(f"{entry.strip()!r} is not NAME=WEIGHT (write e.g. 'docs=0.7,books=0.3')")
        if name in weights:
            raise InputError(f"source {name!r} is given twice")
        try:
            weight = float(value)
        except ValueError:
            raise InputError(f"the weight of {name!r} is not a number: {value!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise InputError(f"the weight of {name!r} must be a finite number >= 0, got {value}")
        weights[name] = weight
    if not any(weights.values()):
        raise InputError("every weight is 0; give at least one source a positive weight")
    return weights


def corpus_weights_of(spec: str, names: list[str], what: str) -> dict[str, float]:
    """``parse_corpus_weights(spec)``, checked to name exactly the sources ``names``; InputError
    starting with ``what`` (e.g. "corpus_weights") naming those unknown and missing."""
    given = parse_corpus_weights(spec)
    unknown, missing = sorted(set(given) - set(names)), [name for name in names if name not in given]
    if unknown or missing:
        raise InputError(f"{what} must name exactly the corpus's sources ({', '.join(names)})"
                         + (f": unknown {', '.join(unknown)}" if unknown else "")
                         + (f": missing {', '.join(missing)}" if missing else ""))
    return given
