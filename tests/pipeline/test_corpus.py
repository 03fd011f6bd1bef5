"""slimlm.pipeline.corpus: the demo's corpus from the documentation of installed packages."""
import random

import pytest

from slimlm.data import load_texts
from tests.tiny import WORDS


def sentences(count, seed):
    generator = random.Random(seed)
    return [" ".join(generator.choice(WORDS) for _ in range(generator.randint(6, 14))) + " ." for _ in range(count)]


def test_package_docs_corpus_is_deterministic_and_split_by_file(tmp_path, monkeypatch):
    from slimlm.pipeline.corpus import collect_package_docs, write_corpus

    package = tmp_path / "site" / "docpkg"
    package.mkdir(parents=True)
    for index in range(40):
        body = " ".join(sentences(30, index))
        (package / f"mod{index}.py").write_text(f'"""Module {index}. {body}"""\n\ndef f():\n    """Function {index}."""\n')
    (package / "README.md").write_text("# docpkg\n\n" + " ".join(sentences(40, 1000)))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    first = collect_package_docs(train_chars=6000, heldout_chars=1000, packages=("docpkg",), heldout_every=5,
                                 min_chars=100, progress=False)
    second = collect_package_docs(train_chars=6000, heldout_chars=1000, packages=("docpkg",), heldout_every=5,
                                  min_chars=100, progress=False)
    assert first == second
    assert sum(map(len, first["train"])) >= 6000 and sum(map(len, first["heldout"])) >= 1000
    # A file's text is in one split only.
    assert not set(first["sources"]["train"]) & set(first["sources"]["heldout"])
    assert any(text.startswith("Module") and "Function" in text for text in first["train"])
    paths = write_corpus(first, tmp_path / "corpus")
    assert load_texts(paths["heldout"]) == first["heldout"]
    # Less text than asked is used as it is; too little to train on is an error.
    everything = collect_package_docs(train_chars=10**9, heldout_chars=10**9, packages=("docpkg",), heldout_every=5,
                                      min_chars=100, progress=False)
    assert len(everything["train"]) + len(everything["heldout"]) == 41
    (tmp_path / "site" / "tinydoc").mkdir()
    (tmp_path / "site" / "tinydoc" / "__init__.py").write_text('"""' + "word " * 40 + '"""\n')
    with pytest.raises(ValueError, match="holds only"):
        collect_package_docs(train_chars=10**6, heldout_chars=10, packages=("tinydoc",), min_chars=100,
                             progress=False)
    with pytest.raises(ValueError, match="none of the packages"):
        collect_package_docs(train_chars=10, heldout_chars=10, packages=("no_such_package_here",), progress=False)
