"""Every writing command against the path forms that once slipped past the output checks:
a symlink then ``..`` (which climbs from the link's target), nested symlinks, a symlink to a
parent of an input. Generated from one list of the writing commands: a path that resolves
into an input is refused with one line and exit 2, and one that only spells an input
(lexically) is written where the OS resolves it, the input untouched."""
import os

import pytest

from .helpers import one_line_error, pruned_dir, run_cli, scores_dir, tree, write_recipe

OUT = "{out}"
TINY_DISTILL = ["--seq-len", 16, "--batch-size", 2, "--max_steps", 1, "--save_strategy", "no", "--no-progress"]
# command → (argv with OUT where the output goes, the input a path form aims at)
WRITERS = {
    "tokenize": (["tokenize", "--tokenizer", "teacher", "--data", "data/*.txt", "--no-progress", "--out", OUT],
                 "teacher"),
    "importance": (["importance", "--model", "teacher", "--data", "data/*.txt", "--num-samples", 4, "--seq-len", 16,
                    "--no-progress", "--out", OUT], "teacher"),
    "prune": (["prune", "--model", "teacher", "--drop-layers", 1, "--out", OUT], "teacher"),
    "search": (["search", "--model", "teacher", "--scores", "scores", "--data", "data/*.txt", "--target-params", 0.6,
                "--top-n", 2, "--top-k", 0, "--seq-len", 16, "--batch-size", 4, "--held-out", 4, "--no-progress",
                "--out", OUT], "scores"),
    "generate": (["generate", "--no-filters", "--teacher", "teacher", "--from-data", "heldout.txt", "--num-prompts", 2,
                  "--max-new-tokens", 2, "--no-progress", "--out", OUT], "heldout.txt"),
    "teacher-cache": (["teacher-cache", "--teacher", "teacher", "--data", "shards", "--seq-len", 16, "--k", 4,
                       "--num-blocks", 2, "--no-progress", "--out", OUT], "shards"),
    "distill": (["distill", "--teacher", "teacher", "--student", "pruned", "--data", "heldout.txt", *TINY_DISTILL,
                 "--out", OUT], "pruned"),
    "gradual": (["gradual", "--teacher", "teacher", "--data", "data/*.txt", "--target-params", 0.6, "--max-tokens", 256,
                 "--seq-len", 16, "--batch-size", 4, "--num-samples", 4, "--depth", "block_influence", "--num-blocks",
                 12, "--held-out", 4, "--top-n", 2, "--top-k", 0, "--max-width-prune", 0.5, "--multiple-of", 16,
                 "--no-progress", "--out", OUT], "teacher"),
    "eval": (["eval", "--model", "teacher", "--data", "heldout.txt", "--seq-len", 16, "--max-blocks", 2,
              "--no-progress", "--json", OUT], "heldout.txt"),
    "export": (["export", "--model", "bpe-student", "--gguf", OUT], "bpe-student/model.gguf"),
    "run": (["run", "{recipe}", "--no-progress", "--out", OUT], "teacher"),
}


def _argv(command, out, recipe):
    argv, _ = WRITERS[command]
    return [str(arg).replace(OUT, str(out)).replace("{recipe}", str(recipe)) for arg in argv]


@pytest.fixture
def inputs(workspace, capsys, monkeypatch):
    scores_dir(workspace, capsys)
    pruned_dir(workspace, capsys)
    if not (workspace / "bpe-student").is_dir():  # GGUF export takes byte-level BPE tokenizers
        from slimlm.surgery import save_pruned
        from tests.tiny import bpe_tokenizer, tiny_model

        tokenizer = bpe_tokenizer()
        save_pruned(tiny_model("llama", vocab_size=len(tokenizer)), workspace / "bpe-student", tokenizer=tokenizer,
                    save_dtype="float32")
    if not (workspace / "shards" / "manifest.json").is_file():  # the teacher cache's input
        from slimlm.models import load_tokenizer
        from slimlm.shards import write_shards

        write_shards(str(workspace / "data" / "*.txt"), load_tokenizer(workspace / "teacher"), workspace / "shards",
                     log=lambda line: None)
    monkeypatch.chdir(workspace)
    recipe = write_recipe(workspace, "write-safety.yaml", synthetic=None, distill__max_tokens=32,
                          importance__num_samples=4, eval__max_blocks=2)
    return recipe


def _links(workspace, tmp_path, target):
    """Path forms that resolve to the input ``target`` (relative to the workspace)."""
    name = os.path.basename(target)
    parent = workspace / os.path.dirname(target)
    forms = {}
    # A symlink then ..: lk → <parent>/sub, so lk/.. is <parent>.
    (parent / f".sub-{name}").mkdir(exist_ok=True)
    link = tmp_path / "up"
    link.symlink_to(parent / f".sub-{name}")
    forms["symlink then .."] = f"{link}/../{name}"
    # Nested symlinks: l1 → l2 → the input's folder.
    (tmp_path / "l2").symlink_to(parent)
    (tmp_path / "l1").symlink_to(tmp_path / "l2")
    forms["nested symlinks"] = f"{tmp_path / 'l1'}/{name}"
    # A symlink to a parent of the input, then the rest of the path.
    (tmp_path / "p").symlink_to(workspace)
    forms["symlink to a parent"] = f"{tmp_path / 'p'}/{target}"
    return forms


@pytest.mark.parametrize("command", list(WRITERS))
def test_a_path_that_resolves_into_an_input_is_refused(workspace, inputs, capsys, tmp_path, command):
    _, target = WRITERS[command]
    forms = _links(workspace, tmp_path, target)
    before = tree(workspace)
    for form, out in forms.items():
        code, _, err = run_cli(capsys, *_argv(command, out, inputs))
        assert "the" in one_line_error(code, err, command), (form, err)
        assert tree(workspace) == before, form


@pytest.mark.parametrize("command", list(WRITERS))
def test_a_path_that_only_spells_an_input_is_written_where_the_os_goes(workspace, inputs, capsys, tmp_path, command):
    """``lk/../<input>`` with lk → x/y names x/<input> for the OS: written there, the input kept."""
    _, target = WRITERS[command]
    (tmp_path / "x" / "y").mkdir(parents=True)
    os.makedirs(tmp_path / "x" / os.path.dirname(target), exist_ok=True)
    link = workspace / f"lk-{command}"
    link.symlink_to(tmp_path / "x" / "y")
    try:
        before = tree(workspace)
        code, _, err = run_cli(capsys, *_argv(command, f"{link.name}/../{target}", inputs))
        assert code == 0, err
        assert tree(workspace) == before
        assert os.path.exists(tmp_path / "x" / target)
    finally:
        link.unlink()


def test_overwrite_never_replaces_a_folder_or_file_with_a_common_name(workspace, inputs, capsys, tmp_path):
    """Ownership is slimlm's marker, not a file name a user's project may hold too."""
    project = tmp_path / "myproj"
    project.mkdir()
    (project / "recipe.yaml").write_text("mine: true\n")
    (project / "meta.json").write_text("{}")
    (project / "notes.txt").write_text("keep me")
    curated = tmp_path / "curated.jsonl"
    curated.write_text('{"prompt": "p", "generation": "g"}\n')
    results = tmp_path / "results.json"
    results.write_text('[{"perplexity": 1.0}]')
    before = tree(tmp_path)
    for command, out in (("prune", project), ("importance", project), ("generate", curated), ("eval", results)):
        code, _, err = run_cli(capsys, *_argv(command, out, inputs), "--overwrite")
        assert "was not written by slimlm" in one_line_error(code, err, command)
    assert tree(tmp_path) == before
    # What slimlm wrote itself it replaces.
    for command, out in (("prune", tmp_path / "ours"), ("eval", tmp_path / "ours.json")):
        for _ in range(2):
            code, _, err = run_cli(capsys, *_argv(command, out, inputs), "--overwrite")
            assert code == 0, err


def test_eval_writes_nothing_where_it_cannot_and_compares_a_model_once(workspace, inputs, capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(capsys, *_argv("eval", tmp_path / "afile" / "e.json", inputs))
    assert "is a file, not a folder" in one_line_error(code, err, "eval")
    code, _, err = run_cli(capsys, *_argv("eval", tmp_path / "e.json", inputs), "--compare", "./teacher/")
    assert "is the same model as teacher" in one_line_error(code, err, "eval")
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_generate_refused_settings_leave_nothing_behind(workspace, inputs, capsys, tmp_path):
    argv = [arg if arg != "2" else arg for arg in _argv("generate", tmp_path / "g.jsonl", inputs)]
    argv[argv.index("--max-new-tokens") + 1] = "1000"
    code, _, err = run_cli(capsys, *argv)
    assert "exceeds the teacher's context" in one_line_error(code, err, "generate")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags, message", [
    (["--gradient_accumulation_steps", "-3"], "--gradient_accumulation_steps must be > 0"),
    (["--max_steps", "0"], "--max_steps must be a positive number of steps"),
    (["--num_train_epochs", "0"], "--num_train_epochs must be > 0"),
    (["--output_dir", "teacher"], "--output_dir cannot be passed through"),
    (["--logging_dir=teacher/logs"], "--logging_dir cannot be passed through"),
])
def test_distill_refuses_pass_through_settings_that_train_nothing_or_write_elsewhere(workspace, inputs, capsys,
                                                                                     tmp_path, flags, message):
    out = tmp_path / "student"
    argv = _argv("distill", out, inputs)
    assert run_cli(capsys, *argv)[0] == 0
    before = tree(tmp_path)
    ws_before = tree(workspace)
    if "--max_steps" in flags or "--num_train_epochs" in flags:
        at = argv.index("--max_steps")
        argv = argv[:at] + argv[at + 2:]
    code, _, err = run_cli(capsys, *argv, *flags, "--overwrite")
    assert message in one_line_error(code, err, "distill")
    assert tree(tmp_path) == before and tree(workspace) == ws_before


def test_a_distillation_that_trained_no_step_fails_and_keeps_the_old_output(workspace, inputs, capsys, tmp_path,
                                                                            monkeypatch):
    from slimlm.distill.trainer import DistillationTrainer

    out = tmp_path / "student"
    argv = _argv("distill", out, inputs)
    assert run_cli(capsys, *argv)[0] == 0
    before = tree(tmp_path)
    monkeypatch.setattr(DistillationTrainer, "train", lambda self, **kwargs: None)
    code, _, err = run_cli(capsys, *argv, "--overwrite")
    assert code == 1 and "trained 0 steps" in err
    assert tree(tmp_path) == before


def test_scores_of_a_teacher_changed_below_its_embedding_are_refused(workspace, inputs, capsys, tmp_path):
    """One down_proj matrix changed, the embedding untouched: another model."""
    import shutil

    from safetensors.torch import load_file, save_file

    changed = tmp_path / "changed"
    shutil.copytree(workspace / "teacher", changed)
    weights = load_file(changed / "model.safetensors")
    name = next(key for key in weights if key.endswith("mlp.down_proj.weight"))
    weights[name] = weights[name] + 0.01
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli(capsys, "prune", "--model", changed, "--scores", "scores", "--target-params", 0.5,
                           "--out", tmp_path / "pruned")
    assert "not on this model" in one_line_error(code, err, "prune")


def test_every_command_that_writes_is_in_the_list():
    """A new writing command joins WRITERS (and so every path form above); the demo runs the
    real model, so it is held to the same checks through the run it starts."""
    from slimlm.cli import COMMANDS, build_parser

    parser = build_parser()
    subcommands = next(action for action in parser._actions if action.dest == "command").choices
    writing = {name for name in COMMANDS
               if any(flag in ("--out", "--json", "--gguf") and action.nargs != 0
                      for action in subcommands[name]._actions for flag in action.option_strings)}
    assert writing - {"demo"} == set(WRITERS)


def test_a_run_reruns_every_stage_of_a_teacher_changed_below_its_embedding(workspace, inputs, capsys, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(workspace / "teacher", teacher)
    recipe = write_recipe(workspace, "changed-teacher.yaml", teacher=str(teacher), out=str(tmp_path / "run"),
                          synthetic=None, distill__max_tokens=32, importance__num_samples=4, eval__max_blocks=2)
    assert run_cli(capsys, "run", recipe, "--no-progress")[0] == 0
    weights = load_file(teacher / "model.safetensors")
    name = next(key for key in weights if key.endswith("mlp.down_proj.weight"))
    weights[name] = weights[name] * 1.5
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    code, out, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    assert not any("skipped" in line for line in out.splitlines()
                   if line.startswith(("[importance]", "[prune]", "[distill]")))
