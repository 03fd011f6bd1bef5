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
    assert sorted(os.listdir(out)) == [outputs.MARKER, "weights"] and (out / "weights").read_text() == "new"
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
    with outputs.atomic_output(ours) as staging:
        (open(os.path.join(staging, "weights"), "w")).write("new")
    assert outputs.check_output(ours, True) == str(ours)


@pytest.mark.parametrize("name", ["meta.json", "recipe.yaml", "slimlm_distill.json", "search.json"])
def test_a_common_file_name_does_not_make_a_folder_ours(tmp_path, name):
    project = tmp_path / "myproj"
    project.mkdir()
    (project / name).write_text("{}")
    (project / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not written by slimlm"):
        outputs.check_output(project, True)
    # Nor does a marker someone else wrote, with other content.
    (project / outputs.MARKER).write_text('{"tool": "mine"}')
    with pytest.raises(InputError, match="not written by slimlm"):
        outputs.check_output(project, True)


def test_a_file_is_ours_only_while_it_holds_what_slimlm_wrote(tmp_path):
    generations = tmp_path / "curated.jsonl"
    generations.write_text('{"prompt": "a", "generation": "b"}\n')
    with pytest.raises(InputError, match="not written by slimlm"):
        outputs.check_output(generations, True)
    results = tmp_path / "eval.json"
    outputs.write_json(results, [{"perplexity": 3.0}], mark=True)
    assert outputs.check_output(results, True) == str(results)
    results.write_text('[{"perplexity": 1.0}]')  # edited by hand since: the user's now
    with pytest.raises(InputError, match="not written by slimlm"):
        outputs.check_output(results, True)


@pytest.mark.parametrize("kind", ["fifo", "char device", "socket"])
def test_an_output_that_is_not_a_regular_file_or_folder_is_refused(tmp_path, kind):
    import socket

    special = tmp_path / "special.json"
    if kind == "fifo":
        os.mkfifo(special)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(special))
        server.close()
    else:
        try:
            os.mknod(special, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("creating a device node needs root")
    link = tmp_path / "link.json"
    link.symlink_to(special)
    for path in (special, link):
        with pytest.raises(InputError, match="not a regular file or a folder"):
            outputs.check_output(path, True)
    assert stat.S_IFMT(os.lstat(special).st_mode) != stat.S_IFREG


def test_a_symlink_then_dotdot_is_checked_and_written_where_the_os_goes(tmp_path, monkeypatch):
    """``lk/..`` climbs from the link's target: the path checked is the path written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "lk").symlink_to("x/y")
    (tmp_path / "m" / "teacher").mkdir(parents=True)
    (tmp_path / "m" / "teacher" / "model.safetensors").write_text("weights")
    resolved = outputs.check_output("lk/../m/teacher", False, {"teacher": "m/teacher"})
    assert resolved == str(tmp_path / "x" / "m" / "teacher")
    with outputs.atomic_output("lk/../m/teacher") as staging:
        (open(os.path.join(staging, "scores"), "w")).write("new")
    assert (tmp_path / "x" / "m" / "teacher" / "scores").read_text() == "new"
    assert os.listdir(tmp_path / "m" / "teacher") == ["model.safetensors"]
    # Resolving into the input is refused, however the path is spelled.
    (tmp_path / "x" / "m").rename(tmp_path / "elsewhere")
    (tmp_path / "x" / "m").symlink_to(tmp_path / "m")
    for spelled in ("lk/../m/teacher", "x/m/teacher/", "lk/../../m/./teacher", "x/m/../m/teacher"):
        with pytest.raises(InputError, match="is the teacher"):
            outputs.check_output(spelled, True, {"teacher": "m/teacher"})


def test_an_unwritable_place_is_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        outputs.check_output(tmp_path / "afile" / "e.json", False)
    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(InputError, match="cannot write in .*Read-only file system"):
        outputs.check_output(tmp_path / "new" / "out", False)


def test_two_commands_cannot_write_one_output(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "pp"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from slimlm import outputs; outputs.set_command('slimlm prune');"
        f"outputs.check_output({str(out)!r}, True); print('locked', flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=rf"being written by another slimlm command \(pid {holder.pid}, slimlm prune\)"):
            outputs.check_output(out, True)
    finally:
        holder.communicate("")
    assert not os.path.lexists(tmp_path / ".pp.slimlm-lock")  # released (and removed) at exit
    assert outputs.check_output(out, True) == str(out)
    # The same process may check its own output again (a command's stages, the Python API).
    assert outputs.check_output(out, True) == str(out)
