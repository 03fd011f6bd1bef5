"""The demo's own parts, not the pipeline's business: its corpus collector (text every machine
has: packages' docs, the standard library, READMEs, man and info pages, and a general held-out
split) and its builtin recipes (``demo.yaml``, ``demo-quick.yaml``, each with a ``corpus:``
section the collector takes). ``slimlm demo`` collects the corpus once, then runs the recipe
through ``slimlm.pipeline``.

Layer: above ``slimlm.pipeline`` (whose recipe reader and runner it uses) and below
``slimlm.cli`` (whose ``demo`` command is its entry).
"""
from importlib import resources

from slimlm.demo.corpus import collect_corpus, write_corpus

__all__ = ["builtin_recipe", "collect_corpus", "write_corpus"]


def builtin_recipe(name: str) -> dict:
    """A recipe shipped with the package (``demo``, ``demo-quick``) as a raw mapping, read by the
    recipe reader every recipe goes through (``slimlm.pipeline.recipe.read_yaml``)."""
    from slimlm.pipeline.recipe import read_yaml

    text = resources.files("slimlm.demo").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return read_yaml(text, f"builtin recipe {name}")
