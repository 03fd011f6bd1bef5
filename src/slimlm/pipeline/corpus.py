"""A real-text corpus that exists wherever slimlm is installed: the documentation of the
installed Python packages it depends on (docstrings of their modules, classes and functions,
and their bundled .md/.rst/.txt files).

Deterministic: files are visited in the order of the SHA-256 of their path relative to
site-packages (so packages interleave and the machine's install location does not matter),
and a file goes to the held-out split when that hash is ≡ 0 mod ``heldout_every``; splitting
by file keeps any text of a held-out document out of training and calibration. The same
package versions give the same corpus on any machine.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import warnings

from tqdm.auto import tqdm

from slimlm import outputs

DEFAULT_PACKAGES = ("transformers", "torch", "numpy", "huggingface_hub", "tokenizers", "safetensors", "tqdm",
                    "yaml", "jinja2", "matplotlib", "accelerate", "gguf")
DOC_SUFFIXES = (".md", ".rst", ".txt")


def _package_root(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def python_docstrings(source: str) -> list[str]:
    """Docstrings of a module and of every class and function in it, in source order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old files are not our concern
        tree = ast.parse(source)
    nodes = [tree] + [node for node in ast.walk(tree)
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    nodes[1:] = sorted(nodes[1:], key=lambda node: node.lineno)
    return [doc for doc in (ast.get_docstring(node, clean=True) for node in nodes) if doc]


def _document(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        source = handle.read()
    if path.endswith(".py"):
        return "\n\n".join(python_docstrings(source))
    return source


def collect_package_docs(*, train_chars: int, heldout_chars: int, packages=DEFAULT_PACKAGES, heldout_every: int = 10,
                         min_chars: int = 400, max_doc_chars: int = 20_000, progress: bool = True) -> dict:
    """{"train": [...], "heldout": [...], "sources": {"train": [...], "heldout": [...]}, "packages": {...}}:
    documents (one per file, capped at ``max_doc_chars``, at least ``min_chars`` long) until each
    split holds ``train_chars`` / ``heldout_chars`` characters. Raises ValueError when the
    installed packages hold too little text."""
    candidates = []
    versions = {}
    for name in packages:
        root = _package_root(name)
        if root is None:
            continue
        base = os.path.dirname(root)
        try:
            from importlib.metadata import version

            versions[name] = version(name if name != "yaml" else "pyyaml")
        except Exception:  # a package without metadata still has docs; its version is just unknown
            versions[name] = "?"
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d not in ("__pycache__", "tests", "testing"))
            for file in files:
                if file.endswith((".py",) + DOC_SUFFIXES):
                    relative = os.path.relpath(os.path.join(folder, file), base).replace(os.sep, "/")
                    candidates.append((hashlib.sha256(relative.encode()).hexdigest(), relative, base))
    if not candidates:
        raise ValueError(f"none of the packages {', '.join(packages)} is installed")
    candidates.sort()
    splits = {"train": [], "heldout": []}
    sources = {"train": [], "heldout": []}
    budget = {"train": train_chars, "heldout": heldout_chars}
    filled = {"train": 0, "heldout": 0}
    bar = tqdm(total=train_chars + heldout_chars, desc="collecting docs", unit="char", unit_scale=True,
               disable=not progress)
    for digest, relative, base in candidates:
        split = "heldout" if int(digest, 16) % heldout_every == 0 else "train"
        if filled[split] >= budget[split]:
            if all(filled[key] >= budget[key] for key in budget):
                break
            continue
        try:
            text = _document(os.path.join(base, relative)).strip()
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        if len(text) < min_chars:
            continue
        text = text[:max_doc_chars]
        splits[split].append(text)
        sources[split].append(relative)
        taken = min(len(text), budget[split] - filled[split])
        filled[split] += len(text)
        bar.update(taken)
    bar.close()
    for split in budget:
        if filled[split] < min(budget[split], 10 * min_chars):
            raise ValueError(f"the installed packages hold only {filled[split]:,} characters of documentation for the "
                             f"{split} split; install more of: {', '.join(packages)}")
    return {**splits, "sources": sources, "packages": versions}


def write_corpus(corpus: dict, folder: str) -> dict:
    """Write ``train.jsonl`` and ``heldout.jsonl`` ({"text", "source"} per line) into ``folder``; returns their paths."""
    for split in ("train", "heldout"):
        lines = (json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n"
                 for text, source in zip(corpus[split], corpus["sources"][split]))
        outputs.write_text(os.path.join(folder, f"{split}.jsonl"), "".join(lines))
    outputs.write_json(os.path.join(folder, "packages.json"), corpus["packages"])
    return {split: os.path.join(folder, f"{split}.jsonl") for split in ("train", "heldout")}
