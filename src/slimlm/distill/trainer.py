"""Knowledge distillation on the Hugging Face Trainer.

``DistillationTrainer`` is constructed like ``transformers.Trainer`` plus a teacher::

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args,
                                  train_dataset=ds, distillation_config=DistillationConfig(temperature=1.0))
    trainer.train()

The loss never materialises logits: both models run with ``logits_to_keep`` empty and
``fused_linear_kl_div_loss`` works from their last hidden states and LM-head weights in
row chunks. Loss = kd_weight·KD + ce_weight·CE + hidden_loss_weight·hidden (the hidden term
optionally rescaled each step to the KD term's size, ``hidden_loss_schedule="minitron"``), the
logit terms normalised by the global number of valid (shifted) label tokens that the Trainer
passes as ``num_items_in_batch``, so gradient accumulation and data parallelism give the loss of one
big batch. DDP, FSDP and DeepSpeed come from the Trainer (``accelerate launch``/``torchrun``).

The student's side of the loss runs inside the student's own (wrapped) forward call, where
FSDP holds its LM head whole and routes the head's gradient to the sharded parameter (FSDP1
reshards even the root unit after forward). Under FSDP the teacher is replicated on each
rank's device, or, when larger than one device, passed in already sharded
(``FullyShardedDataParallel`` or ``fully_shard``); its LM head is gathered once. Tested with
two CPU processes on gloo for DDP, FSDP1 and FSDP2; accelerate's ``--fsdp`` plugin itself
needs an accelerator.

The module stays one file past 400 lines because most of it is one class: the trainer's loss,
its teacher handling (device, precision, the whole LM head) and its checkpointing of the
hidden-loss projections are overrides of one ``transformers.Trainer`` subclass that share its
state (``self.teacher``, ``self.hidden_distiller``), with the config that class checks.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import transformers

from safetensors.torch import load_file, save_file

from slimlm.architectures import LMHead, lm_head
from slimlm.distill.items import SeededOrder
from slimlm.distill.lm_heads import check_vocabularies, is_dtensor, vocab_rows, whole_lm_head
from slimlm.distill.teacher import check_teacher_precision, prepare_teacher
from slimlm.distill.on_policy import OnPolicySampler
from slimlm.distill.topk_cache import TeacherTopKCache, load_teacher_topk
from slimlm.losses import (
    HiddenStateDistiller,
    depth_layer_map,
    fused_linear_kl_div_loss,
    fused_linear_topk_kl_div_loss,
)
from slimlm.models import DTYPE_NAMES, DTYPES, portable_tokenizer_config


HIDDEN_LOSS_KINDS = ("cosine", "mse")
# "auto" (follow the Trainer's mixed precision) and the one dtype table's names.
GEMM_DTYPES = {"auto": None, **{name: DTYPES[name] for name in DTYPE_NAMES}}
HIDDEN_LOSS_SCHEDULES = ("fixed", "minitron")


@dataclass
class DistillationConfig:
    """How the student learns from the teacher.

    kd_weight, ce_weight: weights of the logit distillation loss and of the next-token
    cross-entropy on the labels (kd_weight=0, ce_weight=1 is plain fine-tuning).
    temperature, beta: as in ``slimlm.losses`` (β=0 forward KL, 1 reverse KL, between JSD).
    hidden_loss_weight, hidden_loss_kind, layer_map: an extra cosine/MSE loss between hidden
    states; ``layer_map`` maps indices into the student's and teacher's ``hidden_states``
    tuples (0: embeddings, i: after layer i; default ``slimlm.losses.depth_layer_map``), with
    a learnable projection per mapped layer when the widths differ (saved with checkpoints
    as ``hidden_projections.safetensors``). ``hidden_loss_weight`` > 0 turns the loss on.
    hidden_loss_schedule: how the hidden loss is weighted each step. "fixed" (default):
    ``hidden_loss_weight · hidden``. "minitron" (Minitron's dynamic weighting):
    ``hidden_loss_weight · sg(kd / hidden) · hidden``, with sg the stop-gradient and kd the
    step's logit distillation term, so the hidden term has the logit term's size every step
    (and scales with it under gradient accumulation) while its gradient is the hidden loss's;
    needs kd_weight > 0.
    on_policy_fraction, on_policy_prompt_fraction, on_policy_temperature: on-policy
    distillation (GKD, ``slimlm.distill.on_policy``): on this fraction λ of the batches
    (default 0: none) the student samples, at ``on_policy_temperature`` (default 1), the rest of
    each block after its first ``on_policy_prompt_fraction`` (default 0.5), and the loss (β as
    above: β = 0.5 is GKD's JSD) counts only the sampled tokens, with the Trainer's
    normaliser of the batch as drawn (so each counted token weighs the same in a step).
    Needs a live teacher and a model ``generate`` can run (not FSDP).
    chunk_size: rows per chunk of the fused loss (None: chosen from a memory budget).
    topk, topk_tail: a folder written by ``slimlm.distill.cache_teacher_topk``: the student then
    learns from the cached sparse teacher (``fused_linear_topk_kl_div_loss`` with tail "bucket" or
    "renormalize") and no live teacher is needed; the training set is the cache's sequences.
    gemm_dtype: operands of the LM-head GEMMs inside the loss: "auto" follows the Trainer's
    mixed precision (bfloat16 under ``bf16=True``, float16 under ``fp16=True``, else exact
    float32), or "float32" / "bfloat16" / "float16". Softmax, KL and CE are float32 in every case.
    teacher_precision: what the live teacher's forward runs in, ``slimlm.distill.teacher``:
    None (default: the teacher as given, in its own dtype, exact), "float32", "bfloat16", "int8"
    or "auto" (bfloat16 where the CPU has it natively); its LM head in the loss stays the caller's.
    freeze_embeddings: keep the student's token embedding and LM head (one matrix when tied) as
    they are: the trainer sets ``requires_grad=False`` on them, so the loss skips the head's
    weight gradient (a third of the head's arithmetic) and the optimizer their update. Default
    False: faster per token but less recovery per token (BENCHMARKS.md, "Frozen embeddings").
    """

    kd_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    beta: float = 0.0
    hidden_loss_weight: float = 0.0
    hidden_loss_kind: str = "cosine"
    hidden_loss_schedule: str = "fixed"
    layer_map: dict[int, int] | None = None
    on_policy_fraction: float = 0.0
    on_policy_prompt_fraction: float = 0.5
    on_policy_temperature: float = 1.0
    chunk_size: int | None = None
    topk: str | None = None
    topk_tail: str = "bucket"
    gemm_dtype: str = "auto"
    teacher_precision: str | None = None
    freeze_embeddings: bool = False

    def check(self) -> None:
        for name in ("kd_weight", "ce_weight", "hidden_loss_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.kd_weight == 0 and self.ce_weight == 0 and self.hidden_loss_weight == 0:
            raise ValueError("kd_weight, ce_weight and hidden_loss_weight are all 0: there is nothing to learn")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if self.topk is not None and self.hidden_loss_weight > 0:
            raise ValueError("hidden_loss_weight needs a live teacher; it cannot be used with a top-k cache (topk)")
        if self.topk_tail not in ("bucket", "renormalize"):
            raise ValueError(f"topk_tail must be 'bucket' or 'renormalize', got {self.topk_tail!r}")
        if self.gemm_dtype not in GEMM_DTYPES:
            raise ValueError(f"gemm_dtype must be one of {', '.join(GEMM_DTYPES)}, got {self.gemm_dtype!r}")
        if self.hidden_loss_kind not in HIDDEN_LOSS_KINDS:
            raise ValueError(f"hidden_loss_kind must be one of {', '.join(HIDDEN_LOSS_KINDS)}, "
                             f"got {self.hidden_loss_kind!r}")
        if self.teacher_precision is not None:
            check_teacher_precision(self.teacher_precision)
        if not isinstance(self.freeze_embeddings, bool):
            raise ValueError(f"freeze_embeddings must be True or False, got {self.freeze_embeddings!r}")
        for name, value, ok, rule in (
                ("on_policy_fraction", self.on_policy_fraction, 0.0 <= self.on_policy_fraction <= 1.0, "in [0, 1]"),
                ("on_policy_prompt_fraction", self.on_policy_prompt_fraction,
                 0.0 < self.on_policy_prompt_fraction < 1.0, "in (0, 1)"),
                ("on_policy_temperature", self.on_policy_temperature, self.on_policy_temperature > 0, "> 0")):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
                raise ValueError(f"{name} must be {rule}, got {value!r}")
        if self.topk is not None and self.on_policy_fraction > 0:
            raise ValueError("on_policy_fraction needs a live teacher to score the student's samples; "
                             "it cannot be used with a top-k cache (topk)")
        if self.hidden_loss_schedule not in HIDDEN_LOSS_SCHEDULES:
            raise ValueError(f"hidden_loss_schedule must be one of {', '.join(HIDDEN_LOSS_SCHEDULES)}, "
                             f"got {self.hidden_loss_schedule!r}")
        if self.hidden_loss_schedule == "minitron" and self.hidden_loss_weight > 0 and self.kd_weight == 0:
            raise ValueError("hidden_loss_schedule='minitron' weights the hidden loss by the logit loss: "
                             "it needs kd_weight > 0")


PROJECTIONS_FILE = "hidden_projections.safetensors"
TOPK_COLUMNS = ("topk_logprobs", "topk_indices")


def _no_logits(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.long, device=input_ids.device)


class DistillationTrainer(SeededOrder, transformers.Trainer):
    """``transformers.Trainer`` whose loss distills ``teacher_model`` into ``model``.

    teacher_model: any causal LM with the student's tokenizer; it runs in eval mode under
    no_grad, on ``teacher_device`` (default: the training device), or where it already is when
    loaded with ``device_map`` or sharded by FSDP, in ``DistillationConfig.teacher_precision``
    (a cheaper copy of it where that asks for one; the caller's model is not cast). Logs per step: each
    loss term, tokens/s, teacher forward seconds, peak memory.
    """

    def __init__(self, model=None, teacher_model=None, args=None, distillation_config=None, teacher_device=None, **kwargs):
        self.distillation_config = distillation_config or DistillationConfig()
        self.distillation_config.check()
        self.topk_cache = None
        if self.distillation_config.topk is not None:
            self.topk_cache = load_teacher_topk(self.distillation_config.topk)
            self.topk_cache.check_compatible(
                vocab_size=vocab_rows(model), temperature=self.distillation_config.temperature
            )
            if kwargs.get("train_dataset") is None:
                kwargs["train_dataset"] = topk_examples(self.topk_cache)
        elif teacher_model is None:
            raise ValueError("DistillationTrainer needs teacher_model (or a top-k cache: DistillationConfig(topk=...))")
        if model is not None and model is teacher_model:
            raise ValueError("the student and the teacher are the same model object; prune or copy the teacher first")
        train_dataset = kwargs.get("train_dataset")
        if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
            raise ValueError("train_dataset is empty: there is nothing to distill on")
        if model is not None and self.distillation_config.freeze_embeddings:
            freeze_embeddings(model)
        if model is not None and not any(p.requires_grad for p in model.parameters()):
            # e.g. a student pruned from a teacher a trainer had frozen: pruning keeps the flags
            raise ValueError("the student has no parameter that requires grad, so there is nothing to train; "
                             "call student.requires_grad_(True) (a model pruned from a frozen one keeps its flags)")
        super().__init__(model=model, args=args, **kwargs)
        self.teacher = teacher_model
        if teacher_model is not None:
            self.vocab_size = check_vocabularies(self.model, teacher_model)
            if getattr(teacher_model, "hf_device_map", None) is None:
                teacher_model.to(teacher_device or self.args.device)
            teacher_model.eval()
            teacher_model.requires_grad_(False)
            # Read once: a sharded teacher's head is gathered here, as the loss uses it outside its forward.
            # It is the caller's head, in its own dtype, whatever precision the teacher's blocks then run in.
            self.teacher_head = whole_lm_head(teacher_model)
            if self.distillation_config.teacher_precision is not None:
                self.teacher = prepare_teacher(teacher_model, self.distillation_config.teacher_precision,
                                               log=transformers.logging.get_logger(__name__).warning)
        else:
            self.vocab_size = vocab_rows(self.model)
        self.hidden_distiller = None
        if self.distillation_config.hidden_loss_weight > 0:
            student_config, teacher_config = self.model.config, teacher_model.config
            layer_map = self.distillation_config.layer_map or depth_layer_map(
                student_config.num_hidden_layers, teacher_config.num_hidden_layers
            )
            self.hidden_distiller = HiddenStateDistiller(
                student_config.hidden_size, teacher_config.hidden_size, layer_map,
                kind=self.distillation_config.hidden_loss_kind, device=self.args.device,
            )
        config = self.distillation_config
        self.on_policy = OnPolicySampler(
            config.on_policy_fraction, prompt_fraction=config.on_policy_prompt_fraction,
            temperature=config.on_policy_temperature, seed=self.args.seed) if config.on_policy_fraction > 0 else None
        self._metrics: dict[str, float] = {}
        self._window_start = time.perf_counter()
        self.gemm_dtype = GEMM_DTYPES[self.distillation_config.gemm_dtype]
        if self.gemm_dtype is None:
            # compute_loss runs outside the autocast that mixed precision wraps the model's forward in.
            self.gemm_dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None

    # ------------------------------------------------------------------ loss
    @staticmethod
    def _call(model, inputs):
        """The model on the batch, hidden states out and no logits (``logits_to_keep`` empty)."""
        return model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            logits_to_keep=_no_logits(inputs["input_ids"]),
            output_hidden_states=True,
            use_cache=False,
        )

    def _student_loss(self, model, inputs, loss_fn):
        """Runs the student and ``loss_fn(hidden_states, LMHead)`` inside ONE call of the
        (possibly DDP/FSDP-wrapped) model: FSDP1 reshards even the root unit after forward, so
        the LM head is only whole, with its gradient routed to the sharded parameter, while the
        wrapped forward runs. The inner model's forward is swapped for the call and restored."""
        inner = self.accelerator.unwrap_model(model)
        had_own = "forward" in inner.__dict__
        original = inner.forward  # accelerate's autocast wrapper when mixed precision is on

        def forward_with_loss(*args, **kwargs):
            outputs = original(*args, **kwargs)
            return loss_fn(outputs.hidden_states, self._student_head(inner))

        inner.forward = forward_with_loss
        try:
            return self._call(model, inputs)
        finally:
            if had_own:
                inner.forward = original
            else:
                del inner.forward

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        config = self.distillation_config
        if self.on_policy is not None and model.training:
            inputs = self._on_policy_inputs(model, inputs)
        labels = inputs.get("labels")
        if labels is None:
            labels = inputs["input_ids"].masked_fill(inputs.get("attention_mask", 1) == 0, -100)
        if "topk_logprobs" in inputs:
            return self._topk_loss(model, inputs, labels, num_items_in_batch, return_outputs)

        teacher_device = next(self.teacher.parameters()).device
        teacher_inputs = {k: v.to(teacher_device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        start = time.perf_counter()
        with torch.no_grad():
            teacher_states = self._call(self.teacher, teacher_inputs).hidden_states
        if teacher_device.type == "cuda":
            torch.cuda.synchronize(teacher_device)
        self._add_metric("teacher_forward_s", time.perf_counter() - start)
        if config.hidden_loss_weight == 0:
            teacher_states = teacher_states[-1:]  # only the last layer's is needed past this point

        def loss_fn(student_states, student_head):
            device = student_states[-1].device
            shifted_labels = labels[:, 1:].reshape(-1).to(device)
            student_hidden = student_states[-1][:, :-1].reshape(-1, student_states[-1].shape[-1])
            teacher_hidden = teacher_states[-1][:, :-1].reshape(-1, teacher_states[-1].shape[-1]).to(device)
            teacher_head = self.teacher_head
            count = num_items_in_batch if num_items_in_batch is not None else (shifted_labels != -100).sum()
            terms = fused_linear_kl_div_loss(
                student_hidden,
                student_head.first_rows(self.vocab_size),
                teacher_hidden,
                teacher_head.first_rows(self.vocab_size, device),
                return_terms=True,
                **self._loss_options(shifted_labels, count),
            )
            loss = terms["loss"]
            if config.hidden_loss_weight > 0:
                mask = inputs.get("attention_mask")
                hidden = self.hidden_distiller(
                    student_states, [state.to(device) for state in teacher_states], mask.bool() if mask is not None else None
                )
                terms["hidden"] = hidden.detach()
                loss = loss + config.hidden_loss_weight * hidden_loss_scale(config, terms["kd"], hidden) * hidden
            return {"loss": loss, **{f"{name}_loss": terms[name] for name in ("kd", "ce", "hidden") if name in terms}}

        result = self._student_loss(model, inputs, loss_fn)
        for name in ("kd_loss", "ce_loss", "hidden_loss"):
            if name in result:
                self._add_metric(name, float(result[name]))
        self._add_metric("tokens", float(inputs["input_ids"].numel()))
        return self._finish(result["loss"], num_items_in_batch, return_outputs)

    def _on_policy_inputs(self, model, inputs):
        if self.is_fsdp_enabled:
            raise RuntimeError("on-policy distillation samples with generate(), which FSDP-sharded students do not run")
        start = time.perf_counter()
        resampled = self.on_policy.maybe_resample(self.accelerator.unwrap_model(model), inputs, self.state.global_step)
        if resampled is not inputs:
            self._add_metric("student_sampling_s", time.perf_counter() - start)
        return resampled

    def _finish(self, loss, num_items_in_batch, return_outputs):
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and self.args.world_size > 1:
            # DDP and FSDP average gradients over ranks; the loss is already divided by the global count.
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def _topk_loss(self, model, inputs, labels, num_items_in_batch, return_outputs):
        config = self.distillation_config

        def loss_fn(student_states, head):
            student_last = student_states[-1]
            shifted_labels = labels[:, 1:].reshape(-1)
            count = num_items_in_batch if num_items_in_batch is not None else (shifted_labels != -100).sum()
            # Cache row t is the teacher's distribution for the token at t + 1, as the student's logits at t.
            k = inputs["topk_logprobs"].shape[-1]
            return {"loss": fused_linear_topk_kl_div_loss(
                student_last[:, :-1].reshape(-1, student_last.shape[-1]),
                head,
                inputs["topk_logprobs"][:, :-1].reshape(-1, k),
                inputs["topk_indices"][:, :-1].reshape(-1, k),
                tail=config.topk_tail,
                **self._loss_options(shifted_labels, count),
            )}

        loss = self._student_loss(model, inputs, loss_fn)["loss"]
        self._add_metric("topk_loss", float(loss.detach()))
        self._add_metric("tokens", float(inputs["input_ids"].numel()))
        return self._finish(loss, num_items_in_batch, return_outputs)

    def _loss_options(self, shifted_labels, count) -> dict:
        """The options the live-teacher and top-k losses share, from the config."""
        config = self.distillation_config
        return dict(labels=shifted_labels, temperature=config.temperature, beta=config.beta,
                    num_items_in_batch=count, chunk_size=config.chunk_size, kd_weight=config.kd_weight,
                    ce_weight=config.ce_weight, gemm_dtype=self.gemm_dtype)

    def _student_head(self, model) -> LMHead:
        head = lm_head(model)
        weight = head.weight
        if weight.dim() != 2 or is_dtensor(weight):
            raise RuntimeError(
                f"the student's LM head weight is sharded inside its forward ({type(weight).__name__} "
                f"{tuple(weight.shape)}); keep the LM head (and tied embeddings) in the FSDP root unit, "
                "e.g. auto-wrap only the decoder layers"
            )
        return head

    def _set_signature_columns_if_needed(self):
        # The Trainer drops dataset columns the model's forward does not take; keep the cached teacher's.
        super()._set_signature_columns_if_needed()
        for column in TOPK_COLUMNS:
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    # ------------------------------------------- hidden-state projections
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.hidden_distiller is not None and any(True for _ in self.hidden_distiller.parameters()):
            optimizer.add_param_group({"params": list(self.hidden_distiller.parameters()), "weight_decay": 0.0})
        return optimizer

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:  # a tokenizer the Trainer saved (processing_class) loads in older readers too
            portable_tokenizer_config(output_dir)
        if self.hidden_distiller is not None and len(self.hidden_distiller.projections) and self.args.should_save:
            state = {k: v.detach().cpu().contiguous() for k, v in self.hidden_distiller.state_dict().items()}
            save_file(state, os.path.join(output_dir, PROJECTIONS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PROJECTIONS_FILE)
        if self.hidden_distiller is not None and os.path.isfile(path):
            self.hidden_distiller.load_state_dict(load_file(path, device=str(self.args.device)))

    # --------------------------------------------------------------- logging
    def _add_metric(self, name: str, value: float) -> None:
        self._metrics[name] = self._metrics.get(name, 0.0) + value
        self._metrics[f"_{name}_count"] = self._metrics.get(f"_{name}_count", 0.0) + 1

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Adds to each training log entry, over the window since the previous one: the mean
        kd/ce/hidden losses, ``tokens_per_s``, ``teacher_forward_s`` (the teacher's forward seconds
        summed over the window's steps), ``teacher_forward_share`` (that over the window's wall
        time) and ``peak_memory_mb``."""
        if self._metrics and "loss" in logs:
            elapsed = time.perf_counter() - self._window_start
            for name in ("kd_loss", "ce_loss", "hidden_loss", "topk_loss"):
                if name in self._metrics:
                    logs[name] = round(self._metrics[name] / self._metrics[f"_{name}_count"], 6)
            logs["tokens_per_s"] = round(self._metrics.get("tokens", 0.0) / max(elapsed, 1e-9), 2)
            # Seconds summed over the logging window (logging_steps steps), and their share of
            # the window's wall time: a per-step reading of the sum overstates the teacher.
            logs["teacher_forward_s"] = round(self._metrics.get("teacher_forward_s", 0.0), 4)
            logs["teacher_forward_share"] = round(self._metrics.get("teacher_forward_s", 0.0) / max(elapsed, 1e-9), 3)
            if "student_sampling_s" in self._metrics:
                logs["student_sampling_s"] = round(self._metrics["student_sampling_s"], 4)
            logs["peak_memory_mb"] = round(peak_memory_bytes(self.args.device) / 2**20, 1)
            self._metrics = {}
            self._window_start = time.perf_counter()
        super().log(logs, *args, **kwargs)


def hidden_loss_scale(config: DistillationConfig, kd: torch.Tensor, hidden: torch.Tensor):
    """The factor the hidden loss is multiplied by besides ``hidden_loss_weight``: 1 for the
    "fixed" schedule; for "minitron", kd / hidden, detached (a constant of the step, so no
    gradient flows through it; 0 when the hidden loss is 0)."""
    if config.hidden_loss_schedule == "fixed":
        return 1.0
    hidden = hidden.detach()
    return torch.where(hidden > 0, kd.detach() / hidden.clamp(min=torch.finfo(hidden.dtype).tiny), 0.0)


class TopKExamples(torch.utils.data.Dataset):
    """Training examples of a top-k cache, read and decoded per sequence when the Trainer asks
    (the cache stays on disk, memory-mapped): input_ids, attention_mask, labels and the teacher's
    top-k log-probs/indices per token (sequences of one length batch with the default collator)."""

    def __init__(self, cache: TeacherTopKCache):
        if cache.num_sequences == 0:
            raise ValueError(f"the top-k cache {cache.path} holds no sequences")
        self.cache = cache

    def __len__(self) -> int:
        return self.cache.num_sequences

    def __getitem__(self, index: int) -> dict:
        item = self.cache.sequence(index)
        ids = item["input_ids"]
        return {**item, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def topk_examples(cache: TeacherTopKCache) -> TopKExamples:
    """The training examples of ``cache`` (``TopKExamples``)."""
    return TopKExamples(cache)


def freeze_embeddings(model) -> None:
    """``requires_grad=False`` on ``model``'s token embedding and LM head (the same matrix when
    tied); ValueError for a model without them."""
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    if any(module is None for module in modules):
        raise ValueError(f"freeze_embeddings: {type(model).__name__} has no input or output embeddings to freeze")
    for module in modules:
        module.requires_grad_(False)


def correct_teacher(teacher, train_dataset, args: transformers.TrainingArguments, **trainer_kwargs):
    """Minitron's "teacher correction": fine-tune the teacher briefly with next-token
    cross-entropy on the distillation data before distilling, so that it predicts that data
    well when its original training set is not available. Returns the teacher, in eval mode."""
    if len(train_dataset) == 0:
        raise ValueError("teacher correction needs a non-empty train_dataset")
    teacher.requires_grad_(True)
    teacher.train()
    CorrectionTrainer(model=teacher, args=args, train_dataset=train_dataset, **trainer_kwargs).train()
    return teacher.eval()


class CorrectionTrainer(SeededOrder, transformers.Trainer):
    """The teacher correction's Trainer: plain cross-entropy, the training set in a seeded order."""


def peak_memory_bytes(device) -> int:
    """Peak memory so far: the CUDA allocator's peak, else the process's peak resident set."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

