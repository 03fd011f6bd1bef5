"""Every output slimlm writes goes through here: where it may go, and how it is put in place.

Where: an output path is resolved once (``resolve``: links and ``..`` as the OS follows them),
checked at that path and written to exactly that path. It may never be, contain or sit inside
one of the command's inputs (teacher, student, model, data files, prompts, scores, recipe),
with or without ``--overwrite``; an existing output must be a regular file or a folder, and is
replaced only with ``overwrite`` and only when it is slimlm's own: a folder holding the marker
``slimlm-output.json``, or a file with ``.<name>.slimlm-output.json`` beside it recording its
digest (``owned``). A command holds a lock on each output (``.<name>.slimlm-lock``) for its
life, so two commands never write one output. ``check_output`` is called before any work starts.
(One module, a little over 400 lines: the checks, the marker, the lock and the swap all act on
the one resolved path and must agree on it.)

How: ``atomic_output(path)`` yields a staging sibling to write into; on success everything
in it is fsynced and it is swapped with ``path`` so that at every instant either the old or
the new complete output exists at ``path``. Folders are swapped with one
``renameat2(RENAME_EXCHANGE)`` where the kernel has it; elsewhere the old folder is renamed
aside (``.<name>.slimlm-old``), the new one renamed in, then the old one deleted — and a
later ``atomic_output`` or ``recover`` puts an old folder left aside by a crash back.
A failure or an interrupt deletes the staging copy and leaves ``path`` as it was.
"""
from __future__ import annotations

import atexit
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
MARKER = "slimlm-output.json"  # in a folder slimlm wrote; beside a file it wrote: .<name>.slimlm-output.json
LOCK_SUFFIX = ".slimlm-lock"
_COMMAND = ["python API"]


def set_command(name: str) -> None:
    """Name the command whose outputs are being written (recorded in their markers and locks)."""
    _COMMAND[0] = name


def resolve(path) -> str:
    """The one path an output is checked at and written to: ``~`` expanded, made absolute and
    every symbolic link resolved the way the OS resolves it (``link/..`` climbs from the link's
    target, not from the folder holding the link)."""
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def _inside_or_same(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def overlaps(first, second) -> bool:
    """Whether two paths are the same, or one is inside the other (links resolved)."""
    first, second = resolve(first), resolve(second)
    return _inside_or_same(first, second) or _inside_or_same(second, first)


def input_paths(spec) -> list[str]:
    """The local paths an input names: a path as is, a glob expanded; a hub id or a missing
    path names none."""
    spec = os.fspath(spec)
    if glob.has_magic(spec):
        return glob.glob(os.path.expanduser(spec), recursive=True)
    return [spec] if os.path.exists(os.path.expanduser(spec)) else []


def check_output(out, overwrite: bool, inputs: dict | None = None, *, what: str = "output",
                 related=(), lock: bool = True) -> str:
    """Check an output path before any work starts and return it resolved (``resolve``): the
    caller writes exactly that path. Refuses (InputError) an output that is, contains or sits
    inside an input of ``inputs`` ({description: path, glob or list of them}); one that exists
    and is neither a regular file nor a folder (a device, a FIFO, a socket); one whose folder
    cannot be written (a file on the way, a read-only folder); and an existing non-empty one
    unless ``overwrite`` and slimlm's own (``owned``). ``related``: more paths this command
    writes (checkpoints, staging), held to the same rule about inputs. ``lock``: hold the
    output's lock (``lock_output``) from now until ``release_locks``, so that a second command
    writing the same output is refused."""
    shown = os.fspath(out)
    out = resolve(out)
    for target in (out, *related):
        target_real = resolve(target)
        for name, specs in (inputs or {}).items():
            for spec in specs if isinstance(specs, (list, tuple)) else [specs]:
                if spec is None:
                    continue
                for path in input_paths(spec):
                    path_real = resolve(path)
                    if _inside_or_same(target_real, path_real) or _inside_or_same(path_real, target_real):
                        relation = ("is" if target_real == path_real else
                                    "is inside" if _inside_or_same(target_real, path_real) else "contains")
                        target_shown = shown if target_real == out else os.fspath(target)
                        raise InputError(f"{what} {target_shown} {relation} the {name} {path}; choose another "
                                         "output path")
    if os.path.lexists(out) and not (os.path.isfile(out) or os.path.isdir(out)):
        raise InputError(f"{what} {shown} exists and is not a regular file or a folder (a device, FIFO or socket); "
                         "refusing to replace it")
    _check_writable(out, shown, what)
    if lock:
        lock_output(out, what=what, shown=shown)
    exists = os.path.isfile(out) or os.path.isdir(out) and bool(os.listdir(out))
    if exists and not overwrite:
        raise InputError(f"{what} {shown} already exists; pass --overwrite to replace it")
    if exists and not owned(out):
        raise InputError(f"{what} {shown} exists and was not written by slimlm (it has no {MARKER} marker); "
                         "refusing to replace it even with --overwrite (choose another output path or remove it "
                         "yourself)")
    return out


def _check_writable(out: str, shown: str, what: str) -> None:
    """The nearest existing folder on the way to ``out`` is a folder and takes a new entry
    (probed by creating one: permissions alone do not tell for root or a read-only mount)."""
    import tempfile

    folder = os.path.dirname(out)
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise InputError(f"{what} {shown}: {folder} is a file, not a folder")
    try:
        descriptor, probe = tempfile.mkstemp(dir=folder, prefix=".slimlm-probe-")
    except OSError as error:
        raise InputError(f"{what} {shown}: cannot write in {folder} ({error.strerror or error})") from None
    os.close(descriptor)
    os.remove(probe)


def marker_path(path) -> str:
    """Where slimlm's marker of the output ``path`` is: inside a folder, beside a file."""
    path = resolve(path)
    if os.path.isdir(path):
        return os.path.join(path, MARKER)
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{MARKER}")


def _marker(kind: str, **fields) -> str:
    from slimlm import __version__

    return json.dumps({"written_by": "slimlm", "kind": kind, "command": _COMMAND[0], "version": __version__,
                       **fields}, indent=1)


def claim(folder) -> None:
    """Make ``folder`` (created if missing) slimlm's own output: write its marker."""
    folder = resolve(folder)
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, MARKER)
    if not os.path.isfile(marker):
        with open(marker, "w", encoding="utf-8") as handle:
            handle.write(_marker("folder"))


def read_json(path: str) -> dict | None:
    """A JSON object from ``path``; None when it is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _read_marker(path: str) -> dict | None:
    value = read_json(path)
    return value if value is not None and value.get("written_by") == "slimlm" else None


def owned(path) -> bool:
    """Whether ``path`` is slimlm's own output: a folder holding slimlm's marker (``MARKER``),
    or a file whose marker beside it records this very file's digest (a file the user edited
    or put in its place since is not slimlm's any more)."""
    path = resolve(path)
    marker = _read_marker(marker_path(path))
    if marker is None:
        return False
    if os.path.isdir(path):
        return marker.get("kind") == "folder"
    return marker.get("kind") == "file" and marker.get("sha256") == file_digest(path)


def lock_output(path, *, what: str = "output", shown=None) -> None:
    """Hold an exclusive lock on the output ``path`` (a ``.<name>.slimlm-lock`` file beside it)
    until ``release_locks``; another process holding it is an InputError naming it. Only one
    process of a distributed run (rank 0, the one that writes) takes it."""
    import fcntl

    path = resolve(path)
    if path in _LOCKS or os.environ.get("RANK", "0") != "0":
        return
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    lock_file = os.path.join(folder, f".{name}{LOCK_SUFFIX}")
    while True:
        descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with contextlib.suppress(OSError):
                holder = os.read(descriptor, 512).decode("utf-8", "replace").strip()
            os.close(descriptor)
            raise InputError(f"{what} {shown or path} is being written by another slimlm command "
                             f"({holder or 'unknown'}); wait for it to finish or choose another output path") from None
        # The holder before us may have deleted the file after we opened it: lock the live one.
        try:
            same = os.stat(lock_file).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(descriptor)
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"pid {os.getpid()}, {_COMMAND[0]}".encode())
    _LOCKS[path] = (descriptor, lock_file)


_LOCKS: dict[str, tuple[int, str]] = {}


def release_locks(keep=()) -> None:
    """Release the output locks this process holds (all but those of ``keep``) and delete
    their lock files; at exit every one is."""
    for path in [path for path in _LOCKS if path not in keep]:
        descriptor, lock_file = _LOCKS.pop(path)
        with contextlib.suppress(OSError):
            os.remove(lock_file)
        os.close(descriptor)


atexit.register(release_locks)


@contextlib.contextmanager
def command(name: str):
    """The scope of one command: its name goes into the markers and locks of its outputs, and
    the locks taken within it are released when it ends, however it ends."""
    previous, held = _COMMAND[0], set(_LOCKS)
    set_command(name)
    try:
        yield
    finally:
        release_locks(keep=held)
        set_command(previous)


# ------------------------------------------------------------------ how
def staging_path(path) -> str:
    """The sibling an output of ``path`` is written into before it is swapped in."""
    folder, name = os.path.split(resolve(path))
    return os.path.join(folder, f".{name}{NEW_SUFFIX}")


def aside_path(path) -> str:
    """Where an old output waits while its replacement is put in place."""
    folder, name = os.path.split(resolve(path))
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
    claim(staging)
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
def atomic_output(path, *, folder: bool = True, mark: bool = False):
    """Yield a staging path (a folder holding only slimlm's marker, or a file path with
    ``folder=False``) to write the output of ``path`` into; it replaces ``path`` atomically
    when the block ends without an exception, and is deleted otherwise. ``mark``: the file is
    a command's output of its own (not a file inside an output folder), so its marker is
    written beside it (``mark_file``)."""
    path = resolve(path)
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
    if mark and not folder:
        mark_file(path)


def mark_file(path) -> None:
    """Record beside the file ``path`` that slimlm wrote it, with its digest (``owned``)."""
    path = resolve(path)
    marker = marker_path(path)
    staging = staging_path(marker)
    with open(staging, "w", encoding="utf-8") as handle:
        handle.write(_marker("file", sha256=file_digest(path)))
    os.replace(staging, marker)


def write_text(path, text: str, *, mark: bool = False) -> None:
    """Write a text file atomically (``mark``: see ``atomic_output``)."""
    with atomic_output(path, folder=False, mark=mark) as staging:
        with open(staging, "w", encoding="utf-8") as handle:
            handle.write(text)


def write_json(path, value, *, mark: bool = False) -> None:
    """Write JSON atomically, so a reader never sees half a record (``mark``: see ``atomic_output``)."""
    write_text(path, json.dumps(value, indent=2, default=str), mark=mark)


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
