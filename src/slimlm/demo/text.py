"""Plain text out of the formats the demo's corpus reads: Python sources (their docstrings and
comments), roff man pages (man and mdoc macros, escapes and fonts dropped), info manuals (node
headers and menus dropped) and Project Gutenberg plain-text books (header, licence and front
matter dropped, paragraphs unwrapped). Each function takes a file's text and returns prose."""
from __future__ import annotations

import ast
import io
import re
import tokenize
import warnings


def python_docstrings(source: str) -> list[str]:
    """Docstrings of a module and of every class and function in it, in source order."""
    return [text for _, text in _docstrings(source)]


def _docstrings(source: str) -> list[tuple[int, str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old files are not our concern
        tree = ast.parse(source)
    nodes = [tree] + [node for node in ast.walk(tree)
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    nodes[1:] = sorted(nodes[1:], key=lambda node: node.lineno)
    found = ((getattr(node, "lineno", 0), ast.get_docstring(node, clean=True)) for node in nodes)
    return [(line, doc) for line, doc in found if doc]


def python_text(source: str) -> str:
    """A module's prose: its docstrings and its comment blocks (consecutive comment lines joined,
    the ``#`` dropped; shebang, coding and lint-pragma lines left out), in source order."""
    pieces = _docstrings(source)
    block, block_line, last_line = [], 0, -2
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        text = token.string.lstrip("#").strip()
        line = token.start[0]
        if line != last_line + 1 and block:
            pieces.append((block_line, " ".join(block)))
            block = []
        if not block:
            block_line = line
        last_line = line
        if text and not text.startswith(("!", "-*-", "noqa", "type:", "pragma", "fmt:", "pylint")):
            block.append(text)
    if block:
        pieces.append((block_line, " ".join(block)))
    return "\n\n".join(text for _, text in sorted(pieces, key=lambda piece: piece[0]) if text)


_ROFF_ESCAPES = [(re.compile(pattern), replacement) for pattern, replacement in (
    (r"\\f(\[[^\]]*\]|\(..|.)", ""), (r"\\s[+-]?\d", ""), (r"\\\*(\[[^\]]*\]|\(..|.)", ""),
    (r"\\\((aq|cq)", "'"), (r"\\\((dq|lq|rq)", '"'), (r"\\\((em|en|hy)", "-"), (r"\\\((bu|pc)", "*"),
    (r"\\\(..", ""), (r"\\\[[^\]]*\]", ""), (r"\\[-e]", lambda m: "-" if m.group(0) == "\\-" else "\\"),
    (r"\\[&/,%|^:){}]", ""), (r"\\[ ~0]", " "), (r"\\c?$", ""))]
_MDOC_MACRO = re.compile(r"[A-Z][a-z]")
_ROFF_HEADINGS = {"SH", "SS", "Sh", "Ss"}
_ROFF_ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI"}  # fonts alternate word by word, with no space between
_ROFF_TEXT = {"B", "I", "SM", "SB", "TP", "IP", "UR", "MT"} | _ROFF_ALTERNATING


def _roff_line(text: str) -> str:
    for pattern, replacement in _ROFF_ESCAPES:
        text = pattern.sub(replacement, text)
    return text


def roff_text(source: str) -> str:
    """The readable text of a man page's roff source: headings, paragraphs and the arguments of
    the font and list macros; comments, definitions and other requests dropped."""
    lines, skipping = [], False
    for line in source.splitlines():
        if skipping:
            skipping = line.strip() != ".."
            continue
        if line.startswith((".\\\"", "'\\\"", '.\\"')) or line.strip() in (".", "'"):
            continue
        if not line.startswith((".", "'")):
            lines.append(_roff_line(line))
            continue
        macro, _, arguments = line[1:].strip().partition(" ")
        if macro in ("de", "de1", "am", "ig"):
            skipping = True
        elif macro in _ROFF_HEADINGS:
            lines.extend(["", _roff_line(arguments.replace('"', "")).strip(), ""])
        elif macro in _ROFF_TEXT or (_MDOC_MACRO.fullmatch(macro) and macro not in ("Dd", "Dt", "Os")):
            words = [word.strip('"') for word in re.findall(r'"[^"]*"|\S+', arguments)]
            if macro in ("IP", "TP"):
                words = words[:1]
            if macro not in _ROFF_TEXT:  # mdoc: inline macros among the arguments; Fl is an option's dash
                words = ["-" + word if previous == "Fl" else word
                         for previous, word in zip([macro] + words, words) if not _MDOC_MACRO.fullmatch(word)]
            lines.append(_roff_line(("" if macro in _ROFF_ALTERNATING else " ").join(words)))
        elif macro in ("PP", "LP", "P", "sp", "Pp", "TP", "IP"):
            lines.append("")
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


_INFO_MENU = re.compile(r"\* (Menu:|[^:]*::|[^:]*: [^.]*\.)")


def info_text(source: str) -> str:
    """The readable text of an info file: its nodes, without the preamble, node headers, menus and tag tables."""
    kept = []
    for node in source.split("\x1f")[1:]:  # before the first separator: the file's preamble and dir entry
        node = node.lstrip("\n")
        if not node.startswith("File:"):  # tag tables, indirect tables, local variables
            continue
        node = re.sub(r"\x00\x08\[[^\]]*\x00\x08\]", "", node.partition("\n")[2])
        kept.append("\n".join(line for line in node.splitlines() if not _INFO_MENU.match(line)).strip())
    return "\n\n".join(piece for piece in kept if piece)


_GUTENBERG_MARKER = r"^\*\*\* ?{} OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT)\b,? ?(.*?) ?\*\*\*[ \t]*$"
_GUTENBERG_START = re.compile(_GUTENBERG_MARKER.format("START"), re.M | re.I)
_GUTENBERG_END = re.compile(_GUTENBERG_MARKER.format("END"), re.M | re.I)
_GUTENBERG_TITLE = re.compile(r"^Title: *(\S.*?)\s*$", re.M)
_GUTENBERG_CLOSING = re.compile(r"(End of )?(the |this )?Project Gutenberg", re.I)
# Italic marks first: they nest inside bold ones (=The _Gaspee_ Affair.=).
_BOOK_MARKUP = [re.compile(rf"{mark}(?=\S)([^{mark}]*?\S){mark}") for mark in "_=#"]
# A paragraph of running prose ends a sentence or a clause (quotes and brackets may follow); title
# pages, contents, credits and captions do not.
_PROSE_END = re.compile(r"[.!?:;,-][\"'\u201d\u2019)\]]*$")


def gutenberg_books(source: str) -> list[tuple[str, str]]:
    """(title, text) of each Project Gutenberg book in ``source`` (one book's file, or several
    concatenated): the text between the book's ``*** START OF ...`` and ``*** END OF ...`` lines,
    titled by the ``Title:`` line of its header (or, without one, the START line's name). Headers,
    licences and whatever lies outside the markers are left out."""
    books, position = [], 0
    for start in _GUTENBERG_START.finditer(source):
        if start.start() < position:
            continue
        end = _GUTENBERG_END.search(source, start.end())
        if end is None:
            break
        titles = _GUTENBERG_TITLE.findall(source, position, start.start())
        books.append(((titles[-1] if titles else start.group(1)).strip(), source[start.end():end.start()]))
        position = end.end()
    return books


def book_paragraphs(text: str) -> list[str]:
    """The running prose of a plain-text book, one string per paragraph (blocks between blank
    lines), its line breaks unwrapped and the ``_italic_``, ``=bold=`` and ``#bold#`` marks
    dropped. Left out: headings and numerals (no lowercase letter), indented or boxed blocks (title
    pages, tables, contents), footnotes (``*...``), bracketed notes (``[Illustration: ...]``, over
    one paragraph or several), Project Gutenberg's own lines, blocks that end with no punctuation
    (credits, captions, imprints) and blocks more than a tenth digits (index entries, reading
    lists, dates)."""
    kept, in_note = [], False
    for block in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        paragraph = " ".join(line.strip() for line in lines)
        if in_note or paragraph.startswith("["):
            in_note = not paragraph.endswith("]")
            continue
        if any(line[0] in " \t|+*" or "\t" in line for line in lines):
            continue
        for markup in _BOOK_MARKUP:
            paragraph = markup.sub(r"\1", paragraph)
        if (re.search(r"[a-z]", paragraph) and _PROSE_END.search(paragraph)
                and sum(character.isdigit() for character in paragraph) <= len(paragraph) / 10
                and not _GUTENBERG_CLOSING.match(paragraph)):
            kept.append(paragraph)
    return kept
