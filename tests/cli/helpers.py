"""What the command tests share: running ``slimlm`` in process, the scores and pruned model of
the shared workspace (made once, on first use), recipes, and reading one-line errors."""
import json
import os
import random
import shutil

import yaml

from slimlm import cli
from tests.tiny import WORDS


def sentences(count, seed):
    generator = random.Random(seed)
    return [" ".join(generator.choice(WORDS) for _ in range(generator.randint(6, 14))) + " ." for _ in range(count)]


def run_cli(capsys, *argv):
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def scores_dir(workspace, capsys):
    out = workspace / "scores"
    if not (out / "meta.json").is_file():
        code, _, err = run_cli(capsys, "importance", "--model", workspace / "teacher", "--data",
                               str(workspace / "data" / "*.txt"), "--num-samples", 8, "--seq-len", 16, "--out", out,
                               "--no-progress")
        assert code == 0, err
    return out


def pruned_dir(workspace, capsys):
    out = workspace / "pruned"
    if not (out / "config.json").is_file():
        code, _, err = run_cli(capsys, "prune", "--model", workspace / "teacher", "--scores",
                               scores_dir(workspace, capsys), "--target-params", "0.5", "--out", out)
        assert code == 0, err
    return out


def write_recipe(workspace, name="recipe.yaml", **changes):
    recipe = {
        "teacher": "teacher", "out": "run", "seed": 0,
        "data": {"train": "data/*.txt", "heldout": "heldout.txt"},
        "importance": {"num_samples": 8, "seq_len": 16, "depth": ["block_influence"]},
        "target": {"target_params": 0.5},
        "synthetic": {"num_prompts": 3, "max_new_tokens": 4, "mix": 0.3, "filters": False},
        "distill": {"seq_len": 16, "batch_size": 4, "max_tokens": 256, "lr": 1e-3,
                    "training_args": {"save_steps": 2}},
        "eval": {"seq_len": 16, "max_blocks": 4, "prompts": ["the model"], "max_new_tokens": 3},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            recipe[section][field] = value
        else:
            recipe[section] = value
    path = workspace / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def stage_lines(out):
    return [line for line in out.splitlines() if line.startswith("[")]


def one_line_error(code, err, command):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"slimlm {command}: error: "), err
    return lines[0]


def tree(folder):
    return sorted((os.path.relpath(os.path.join(root, name), folder), os.path.getsize(os.path.join(root, name)))
                  for root, _, files in os.walk(folder) for name in files)


def model_with_custom_code(folder, workspace, model_type):
    shutil.copytree(workspace / "teacher", folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    marker = folder.parent / f"{folder.name}-code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaConfig as EvilConfig\n"
                                    "from transformers import LlamaForCausalLM as EvilModel\n")
    return marker


def damaged_model(workspace, folder, damage):
    shutil.copytree(workspace / "teacher", folder)
    weights = folder / "model.safetensors"
    if damage == "corrupt weights":
        weights.write_bytes(b"\x00garbage" * 64)
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "invalid config":
        (folder / "config.json").write_text('{"model_type": "llama", ')
    elif damage == "no weights":
        weights.unlink()
