"""One-file recipes: the whole pipeline (tokenize → importance → prune → synthetic data → distill → eval →
speed → report) from a YAML file, resumable stage by stage.

A recipe (``examples/recipe.yaml`` is a commented one; ``demo.yaml`` / ``demo-quick.yaml``
here are the demo's)::

    teacher: path/to/model | model.gguf | org/name
    out: run/                      # default: the recipe's name + "-run" beside it
    save_dtype: auto               # pruned/ and distilled/ are saved in it; auto: the teacher's source dtype
    data: {train: "docs/*.txt", heldout: "heldout/*.txt"}   # or heldout_fraction: 0.1
    importance: {num_samples: 64, seq_len: 256, metrics: [activation], depth: [block_influence]}
    target: {target_params: 0.5}   # any slimlm.surgery.Target field
    synthetic: {num_prompts: 64, max_new_tokens: 64, mix: 0.3}   # optional
    distill: {seq_len: 256, max_tokens: 200000, lr: 1e-3, temperature: 1.0, training_args: {}}
    eval: {seq_len: 256, max_blocks: 32, prompts: ["The model"], max_new_tokens: 32,
           speed: false}           # true: teacher vs student inference speed (speed.json, a report section)

Every field is checked before any work starts; an error names the file and the field.
Stage outputs in ``out``: ``tokens/`` (the data's token shards, read by every later stage),
``scores/``, ``pruned/``, ``synthetic.jsonl``, ``teacher-cache/`` (with a ``teacher_cache``
section), ``distilled/``
(checkpoints in ``distilled.checkpoints/``, in the training dtype), ``eval.json``,
``speed.json`` (with ``eval.speed``), ``report/``. A stage is skipped
when its output exists and was made from the same inputs (fingerprints recorded beside it),
so a rerun after an interruption resumes where it stopped. Each stage is a ``Stage``
(``slimlm.pipeline.stage``) in its own module; ``Pipeline.run`` runs them in order.
"""
from slimlm.pipeline.recipe import RECIPE_FIELDS, load_recipe, validate_recipe
from slimlm.pipeline.runner import Pipeline, run_recipe
from slimlm.pipeline.stage import RunContext, Stage, run_stage

__all__ = ["RECIPE_FIELDS", "Pipeline", "RunContext", "Stage", "load_recipe", "run_recipe", "run_stage",
           "validate_recipe"]
