"""slimlm.outputs: where an output may go, and the one atomic write every output uses."""
import os
import stat

import pytest

from slimlm import outputs
from slimlm.errors import InputError


def test_a_failed_write_leaves_the_old_output_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with outputs.atomic_output(out) as staging:
            (open(os.path.join(staging, "weights"), "w")).write("half")
            raise RuntimeError("killed mid-write")
    assert (out / "weights").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging copy left behind


def test_a_folder_is_swapped_in_whole_and_readable_by_others(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-only").write_text("old")
    with outputs.atomic_output(out) as staging:
        with open(os.path.join(staging, "weights"), "w") as handle:
            handle.write("new")
    assert sorted(os.listdir(out)) == ["weights"] and (out / "weights").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # Created with the umask (0755 under the usual 022), not mkdtemp's 0700.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~umask


def test_the_fallback_swap_never_leaves_the_path_without_an_output(tmp_path, monkeypatch):
    """Without renameat2 the old folder is renamed aside first; a crash right then is undone."""
    monkeypatch.setattr(outputs, "_exchange", lambda first, second: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("old")
    renames = []
    real_rename = os.rename

    def crash_after_moving_the_old_aside(source, destination):
        renames.append(destination)
        real_rename(source, destination)
        if len(renames) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", crash_after_moving_the_old_aside)
    with pytest.raises(KeyboardInterrupt):
        with outputs.atomic_output(out) as staging:
            with open(os.path.join(staging, "weights"), "w") as handle:
                handle.write("new")
    monkeypatch.setattr(os, "rename", real_rename)
    outputs.recover(out)
    assert (out / "weights").read_text() == "old"
    with outputs.atomic_output(out) as staging:
        with open(os.path.join(staging, "weights"), "w") as handle:
            handle.write("new")
    assert (out / "weights").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]


def test_files_are_replaced_atomically(tmp_path):
    path = tmp_path / "eval.json"
    outputs.write_json(path, [{"perplexity": 3.0}])
    outputs.write_json(path, [{"perplexity": 2.0}])
    assert path.read_text().count("2.0") == 1 and sorted(os.listdir(tmp_path)) == ["eval.json"]


@pytest.mark.parametrize("out, relation", [(".", "contains"), ("teacher", "is"), ("teacher/sub", "is inside"),
                                           ("data", "contains"), ("teacher/model.safetensors", "is inside")])
def test_an_output_may_not_be_contain_or_sit_inside_an_input(tmp_path, monkeypatch, out, relation):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "model.safetensors").write_text("w")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}")
    inputs = {"teacher": "teacher", "data": ["data/*.jsonl"]}
    with pytest.raises(InputError, match=f"output {out} {relation} the"):
        outputs.check_output(out, True, inputs)
    outputs.check_output("elsewhere", False, inputs)


def test_overwrite_replaces_only_slimlm_outputs(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_text("meow")
    with pytest.raises(InputError, match="already exists; pass --overwrite"):
        outputs.check_output(foreign, False)
    with pytest.raises(InputError, match="not written by slimlm"):
        outputs.check_output(foreign, True)
    ours = tmp_path / "distilled"
    ours.mkdir()
    (ours / "slimlm_distill.json").write_text("{}")
    outputs.check_output(ours, True)
