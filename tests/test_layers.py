"""The package's layers (../shared/STYLE.md, README's architecture): a module imports from its
own row and the rows above it, never from a row below — checked on every import statement of
the source tree, at module level or inside a function (import-linter's "layers" contract)."""
import ast
import pathlib

import pytest

import slimlm

# Top to bottom. A module's row is its top-level package or module under slimlm. The
# measurements (held-out perplexity, speed) sit right under the foundation: the distillation
# measures its student along the training with them.
ROWS = (
    ("errors", "options", "outputs", "fingerprint", "models", "data", "shards", "_extension", "_C"),
    ("evaluate", "speed"),
    ("architectures",),
    ("kernels",),
    ("losses",),
    ("importance",),
    ("surgery",),
    ("distill",),
    ("search",),
    ("report", "export"),
    ("pipeline",),
    ("demo",),
    ("cli",),
)
# The package's face and its ``python -m slimlm`` entry stand outside the rows.
OUTSIDE = {"__init__", "__main__"}
SOURCE = pathlib.Path(slimlm.__file__).parent
ROW_OF = {name: index for index, row in enumerate(ROWS) for name in row}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "slimlm" and len(parts) > 1 else None


def imported_parts(path: pathlib.Path, source: pathlib.Path = SOURCE) -> list[tuple[int, str]]:
    """(line, slimlm part) for every slimlm import in the file at ``path`` (under ``source``)."""
    package = ".".join(("slimlm",) + path.relative_to(source).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, _part(alias.name)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "slimlm":
                found += [(node.lineno, alias.name) for alias in node.names]
            else:
                found.append((node.lineno, _part(module)))
    return [(line, part) for line, part in found if part is not None]


def downward_imports(source: pathlib.Path = SOURCE) -> list[str]:
    """Every import of a lower row than the importing module's, as 'file:line imports part'."""
    problems = []
    for path in sorted(source.rglob("*.py")):
        part = path.relative_to(source).parts[0].removesuffix(".py")
        if part in OUTSIDE:
            continue
        assert part in ROW_OF, f"{path.relative_to(source)} belongs to no row: add it to ROWS"
        for line, imported in imported_parts(path, source):
            if imported not in OUTSIDE and ROW_OF.get(imported, -1) > ROW_OF[part]:
                problems.append(f"{path.relative_to(source)}:{line} imports slimlm.{imported}")
    return problems


def test_no_module_imports_from_a_lower_row():
    assert downward_imports() == []


def test_a_planted_downward_import_is_caught(tmp_path):
    (tmp_path / "surgery").mkdir()
    (tmp_path / "surgery" / "apply.py").write_text("def f():\n    from slimlm.distill.trainer import X\n")
    (tmp_path / "distill").mkdir()
    (tmp_path / "distill" / "trainer.py").write_text("from slimlm.surgery import apply\nfrom ..search import y\n")
    assert downward_imports(tmp_path) == ["distill/trainer.py:2 imports slimlm.search",
                                          "surgery/apply.py:2 imports slimlm.distill"]


@pytest.mark.parametrize("row", ROWS)
def test_every_row_names_modules_that_exist(row):
    assert any((SOURCE / name).is_dir() or (SOURCE / f"{name}.py").is_file() or list(SOURCE.glob(f"{name}*.so"))
               for name in row)
