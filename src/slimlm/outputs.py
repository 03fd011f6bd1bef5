"""Every output slimlm writes goes through here: where it may go, and how it is put in place.

Where: an output may never be, contain or sit inside one of the command's inputs (teacher,
student, model, data files, prompts, scores, recipe), with or without ``--overwrite``; an
existing output is replaced only with ``overwrite`` and only when it is slimlm's own
(``owned`` says what counts). ``check_output`` is called before any work starts.

How: ``atomic_output(path)`` yields a staging sibling to write into; on success everything
in it is fsynced and it is swapped with ``path`` so that at every instant either the old or
the new complete output exists at ``path``. Folders are swapped with one
``renameat2(RENAME_EXCHANGE)`` where the kernel has it; elsewhere the old folder is renamed
aside (``.<name>.slimlm-old``), the new one renamed in, then the old one deleted — and a
later ``atomic_output`` or ``recover`` puts an old folder left aside by a crash back.
A failure or an interrupt deletes the staging copy and leaves ``path`` as it was.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import json
import os
import shutil

from slimlm.errors import InputError

NEW_SUFFIX, OLD_SUFFIX = ".slimlm-new", ".slimlm-old"


# ------------------------------------------------------------------ where
def _real(path) -> str:
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def _inside_or_same(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def overlaps(first, second) -> bool:
    """Whether two paths are the same, or one is inside the other (links resolved)."""
    first, second = _real(first), _real(second)
    return _inside_or_same(first, second) or _inside_or_same(second, first)


def input_paths(spec) -> list[str]:
    """The local paths an input names: a path as is, a glob expanded; a hub id or a missing
    path names none."""
    spec = os.fspath(spec)
    if glob.has_magic(spec):
        return glob.glob(os.path.expanduser(spec), recursive=True)
    return [spec] if os.path.exists(os.path.expanduser(spec)) else []


def check_output(out, overwrite: bool, inputs: dict | None = None, *, what: str = "output",
                 related=()) -> None:
    """Refuse (InputError) an output that is, contains or sits inside an input of ``inputs``
    ({description: path, glob or list of them}), and an existing non-empty one unless
    ``overwrite`` and slimlm's own. ``related``: more paths this command writes (checkpoints,
    staging), held to the same rule about inputs."""
    out = os.fspath(out)
    for target in (out, *related):
        target_real = _real(target)
        for name, specs in (inputs or {}).items():
            for spec in specs if isinstance(specs, (list, tuple)) else [specs]:
                if spec is None:
                    continue
                for path in input_paths(spec):
                    path_real = _real(path)
                    if _inside_or_same(target_real, path_real) or _inside_or_same(path_real, target_real):
                        relation = ("is" if target_real == path_real else
                                    "is inside" if _inside_or_same(target_real, path_real) else "contains")
                        raise InputError(f"{what} {target} {relation} the {name} {path}; choose another output path")
    exists = os.path.isfile(out) or os.path.isdir(out) and bool(os.listdir(out))
    if exists and not overwrite:
        raise InputError(f"{what} {out} already exists; pass --overwrite to replace it")
    if exists and not owned(out):
        raise InputError(f"{what} {out} exists and was not written by slimlm; refusing to replace it even with "
                         "--overwrite (choose another output path or remove it yourself)")


# Files that mark a folder as slimlm's own output.
OWN_MARKERS = ("slimlm_distill.json", "slimlm_prune.json", "recipe.yaml", "meta.json", "slimlm_run.json",
               "slimlm_stage.json", "search.json")


def owned(path) -> bool:
    """Whether ``path`` is slimlm's own output: a folder holding one of its records, a JSONL of
    generations, a JSON file of evaluation results (perplexity and/or speed per model), or a
    GGUF file (``slimlm export`` replaces a GGUF file, never anything else)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return any(os.path.isfile(os.path.join(path, marker)) for marker in OWN_MARKERS)
    if path.endswith(".gguf"):
        return is_gguf(path)
    try:
        with open(path, encoding="utf-8") as handle:
            if path.endswith(".jsonl"):
                record = json.loads(handle.readline())
                return isinstance(record, dict) and {"prompt", "generation"} <= set(record)
            value = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(value, list) and all(isinstance(item, dict) and ("perplexity" in item or "speed" in item)
                                           for item in value)


def is_gguf(path) -> bool:
    """Whether the file ``path`` starts with GGUF's magic bytes."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


# ------------------------------------------------------------------ how
def staging_path(path) -> str:
    """The sibling an output of ``path`` is written into before it is swapped in."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}{NEW_SUFFIX}")


def aside_path(path) -> str:
    """Where an old output waits while its replacement is put in place."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}{OLD_SUFFIX}")


def remove(path) -> None:
    """Delete a file or a folder tree (nothing if absent)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def recover(path) -> None:
    """Put back an old output that a crash left renamed aside while it was being replaced."""
    aside = aside_path(path)
    if os.path.lexists(aside):
        if os.path.lexists(path):
            remove(aside)
        else:
            os.rename(aside, path)


def _fsync_tree(path: str) -> None:
    if os.path.isfile(path):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        return
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _exchange(first: str, second: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    return False


def prepare(path) -> str:
    """A fresh, empty staging folder for ``path`` (a leftover of an interrupted write is
    deleted), created with the user's umask; returns it."""
    recover(path)
    staging = staging_path(path)
    remove(staging)
    os.makedirs(staging)
    return staging


def commit(staging: str, path) -> None:
    """fsync ``staging`` and swap it into ``path`` (file or folder); the old output is
    deleted only once the new one is in place."""
    path = os.path.abspath(os.fspath(path))
    _fsync_tree(staging)
    parent = os.path.dirname(path)
    if os.path.isdir(staging) and os.path.lexists(path):
        if _exchange(staging, path):
            _fsync_dir(parent)
            remove(staging)
            return
        aside = aside_path(path)
        remove(aside)
        os.rename(path, aside)
        try:
            os.rename(staging, path)
        except BaseException:
            os.rename(aside, path)
            raise
        _fsync_dir(parent)
        remove(aside)
        return
    if os.path.isdir(path) and not os.path.isdir(staging):
        raise IsADirectoryError(f"{path} is a folder; a file cannot replace it")
    os.replace(staging, path)
    _fsync_dir(parent)


@contextlib.contextmanager
def atomic_output(path, *, folder: bool = True):
    """Yield a staging path (an empty folder, or a file path with ``folder=False``) to write
    the output of ``path`` into; it replaces ``path`` atomically when the block ends without
    an exception, and is deleted otherwise."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if folder:
        staging = prepare(path)
    else:
        staging = staging_path(path)
        remove(staging)
    try:
        yield staging
        commit(staging, path)
    except BaseException:
        remove(staging)
        raise


def write_text(path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_output(path, folder=False) as staging:
        with open(staging, "w", encoding="utf-8") as handle:
            handle.write(text)


def write_json(path, value) -> None:
    """Write JSON atomically, so a reader never sees half a record."""
    write_text(path, json.dumps(value, indent=2, default=str))


def file_digest(path) -> str:
    """SHA-256 (16 hex digits) of a file's bytes, or of a folder's files (names and bytes)."""
    import hashlib

    digest = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(folder, name) for folder, _, files in os.walk(path) for name in files)
    for file in paths:
        digest.update(os.path.relpath(file, path).encode() if file != path else b"")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
