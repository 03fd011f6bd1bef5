"""``prune``: cut a Hugging Face causal LM down to a ``PrunePlan``, in place, one layer at a time.

Hidden channels go from the embeddings, every norm, every projection and the LM head
(tied embeddings stay tied). Because RMSNorm divides by the root mean square over the
*remaining* channels, every hidden-size norm's gain is multiplied by
sqrt(hidden_before / hidden_after): a pruned channel that carried no signal then changes
nothing, and low-energy channels (the ones importance removes) change little. Gemma's
sqrt(hidden_size) embedding scale is compensated the same way (through the final norm when
the LM head is tied to the embeddings).
"""
from __future__ import annotations

import copy
import math

import torch

from slimlm.architectures import AttentionProjections, DecoderAdapter, MlpProjections, get_adapter, model_sizes
from slimlm.fingerprint import model_fingerprint
from slimlm.importance.scores import ImportanceScores
from slimlm.surgery.planning import PrunePlan, meta_model, plan, pruned_config
from slimlm.surgery.reconstruct import ReconstructionStats, compensate_layer
from slimlm.surgery.selection import Selection, select_units
from slimlm.surgery.slicing import head_rows, slice_embedding, slice_linear, slice_norm

# Plain attributes a module may derive from the config (head counts, sizes, layer_idx,
# layer types, sliding windows) are refreshed from a fresh module of the new config.
_PLAIN = (int, float, bool, str, type(None), tuple)


def _refuse_quantized(model) -> None:
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    # GGUF weights are dequantized into plain tensors at load; other quantizers hold packed weights.
    if str(getattr(method, "value", method)) != "gguf":
        raise ValueError(f"cannot prune a model quantized with {method}: load it unquantized")


def _shrink_layer(layer, adapter: DecoderAdapter, before: dict, original_index: int, selection: Selection,
                  norm_scale: float) -> None:
    """Slice one decoder layer: its heads, neurons and hidden channels."""
    attention, mlp = adapter.attention(layer), adapter.mlp(layer)
    hidden = selection.hidden
    head_dim = before["head_dim"]
    q_rows = kv_rows = None
    if selection.heads is not None:
        q_rows = head_rows(selection.heads[original_index], head_dim)
        kv_rows = head_rows(selection.kv_heads[original_index], head_dim)
    if attention.qkv is not None:
        qkv_rows = None
        if q_rows is not None:
            q_size, kv_size = before["num_attention_heads"] * head_dim, before["num_key_value_heads"] * head_dim
            qkv_rows = AttentionProjections.fused_rows(q_rows, kv_rows, q_size, kv_size)
        slice_linear(attention.qkv, rows=qkv_rows, cols=hidden)
    else:
        slice_linear(attention.q, rows=q_rows, cols=hidden)
        slice_linear(attention.k, rows=kv_rows, cols=hidden)
        slice_linear(attention.v, rows=kv_rows, cols=hidden)
    slice_linear(attention.o, rows=hidden, cols=q_rows)

    neurons = None if selection.neurons is None else selection.neurons[original_index]
    if mlp.gate_up is not None:
        gate_up_rows = None if neurons is None else MlpProjections.fused_rows(neurons, before["intermediate_size"])
        slice_linear(mlp.gate_up, rows=gate_up_rows, cols=hidden)
    else:
        slice_linear(mlp.gate, rows=neurons, cols=hidden)
        slice_linear(mlp.up, rows=neurons, cols=hidden)
    slice_linear(mlp.down, rows=hidden, cols=neurons)

    if hidden is not None:
        for norm in adapter.hidden_norms(layer):
            slice_norm(norm, hidden, norm_scale, adapter.norm_offset)


def _shrink_ends(model, adapter: DecoderAdapter, before: dict, after: dict, hidden: torch.Tensor,
                 norm_scale: float) -> None:
    """Slice the hidden channels of the embeddings, the final norm and the LM head."""
    embedding, lm_head = adapter.embedding(model), adapter.lm_head(model)
    tied = adapter.tied(model)
    embed_scale = adapter.embedding_scale(before["hidden_size"], after["hidden_size"])
    slice_embedding(embedding, hidden, embed_scale)
    if tied:
        lm_head.weight = embedding.weight
        lm_head.in_features = after["hidden_size"]
        # The LM head now carries embed_scale too; the final norm takes it back out.
        final_scale = norm_scale / embed_scale
    else:
        slice_linear(lm_head, cols=hidden)
        final_scale = norm_scale
    slice_norm(adapter.final_norm(model), hidden, final_scale, adapter.norm_offset)


def sync_with_config(model, check_only: bool = False) -> None:
    """Check every parameter's name and shape against a fresh (meta-device) model of
    ``model.config`` — what ``from_pretrained`` will build — and, unless ``check_only``,
    copy the plain attributes modules derive from the config (layer_idx, head counts,
    layer types, ...) from the fresh modules, so the model in memory behaves as it will
    after a reload. ValueError naming the first mismatches otherwise."""
    fresh = meta_model(type(model), model.config)
    ours = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    theirs = {name: tuple(p.shape) for name, p in fresh.named_parameters(remove_duplicate=False)}
    problems = [f"{name}: missing" for name in theirs.keys() - ours.keys()]
    problems += [f"{name}: unexpected" for name in ours.keys() - theirs.keys()]
    problems += [f"{name}: {ours[name]} but the config gives {theirs[name]}"
                 for name in ours.keys() & theirs.keys() if ours[name] != theirs[name]]
    if problems:
        raise ValueError("the config does not match the weights: " + "; ".join(sorted(problems)[:8]))
    if check_only:
        return
    fresh_modules = dict(fresh.named_modules())
    for name, module in model.named_modules():
        reference = fresh_modules[name]
        for key, value in vars(reference).items():
            if key.startswith("_") or key == "training" or not isinstance(value, _PLAIN):
                continue
            if key in vars(module) and vars(module)[key] != value:
                setattr(module, key, value)


def prune(model, scores: ImportanceScores | None, target, *, inplace: bool = True,
          reconstruct: ReconstructionStats | None = None):
    """Prune ``model`` to ``target`` (a ``Target``, a dict of its fields, or a ``PrunePlan``),
    keeping the top-scoring units of each axis per ``scores``, and return it.

    Everything is checked before any weight changes (sizes, divisibility of heads by KV
    groups, score shapes and fingerprint, transformers' validation of the new config): on
    a ValueError the model is untouched. ``scores`` may be None when no axis needs them
    (e.g. only ``drop_layers``). With ``inplace=False`` a deep copy is pruned instead (two
    models in memory). The config is rewritten and checked against the weights; the
    returned model carries ``slimlm_prune_record`` (plan, kept layers, source fingerprint),
    which ``save_pruned`` writes beside the checkpoint.

    ``reconstruct``: statistics of ``model`` from ``reconstruction_stats``; each kept layer's
    ``o_proj`` / ``down_proj`` columns are then refitted to the heads / neurons that stay
    (``slimlm.surgery.reconstruct``), so the pruned layer's output stays closer to the original's.
    """
    adapter = get_adapter(model, "slimlm.surgery", "prunes")
    _refuse_quantized(model)
    before = model_sizes(model.config)
    if isinstance(target, PrunePlan):
        the_plan = target
        if the_plan.sizes_before != before or the_plan.model_type != adapter.model_type:
            raise ValueError(f"this PrunePlan was made for another model ({the_plan.sizes_before}), not {before}")
    else:
        the_plan = plan(model, target)
    after = the_plan.sizes_after
    if scores is not None:
        scores.check_model(model)
    if reconstruct is not None:
        reconstruct.check(model)
    selection = select_units(scores, before, after, the_plan.drop_layers, the_plan.depth_selection)
    # Validates the new config (transformers' own checks) while the model is still untouched.
    pruned_config(model.config, adapter, after, selection.kept_layers)
    source_fingerprint = model_fingerprint(model)

    if not inplace:
        model = copy.deepcopy(model)
    layers = adapter.layers(model)
    if len(selection.kept_layers) < len(layers):
        adapter.set_layers(model, [layers[i] for i in selection.kept_layers])
    norm_scale = math.sqrt(before["hidden_size"] / after["hidden_size"])
    for layer, original_index in zip(adapter.layers(model), selection.kept_layers):
        if reconstruct is not None:
            compensate_layer(adapter.attention(layer).o, adapter.mlp(layer).down, original_index,
                             None if selection.heads is None else selection.heads[original_index],
                             None if selection.neurons is None else selection.neurons[original_index],
                             before["head_dim"], reconstruct)
        _shrink_layer(layer, adapter, before, original_index, selection, norm_scale)
    if selection.hidden is not None:
        _shrink_ends(model, adapter, before, after, selection.hidden, norm_scale)

    # The modules share model.config, so it is rewritten in place rather than replaced.
    adapter.rewrite_config(model.config, after, selection.kept_layers)
    sync_with_config(model)
    adapter.after_resize(model)
    previous = getattr(model, "slimlm_prune_record", None)
    model.slimlm_prune_record = {
        "source_fingerprint": source_fingerprint,
        "source": getattr(model, "name_or_path", None) or None,
        "plan": the_plan.to_dict(),
        "kept_layers": selection.kept_layers,
        "reconstruct": reconstruct.record() if reconstruct is not None else None,
        "scores_meta": {k: v for k, v in (scores.meta if scores is not None else {}).items()
                        if isinstance(v, (str, int, float, bool))},
        "previous": previous,
    }
    return model
