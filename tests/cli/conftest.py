"""The workspace every command test shares: a tiny random Llama saved to disk with its
tokenizer, four training files and a held-out file (made once for tests/cli)."""
import pytest

from tests.tiny import tiny_model, word_tokenizer

from .helpers import sentences


@pytest.fixture(scope="package")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = word_tokenizer()
    # Wide enough that half the parameters is reachable within the planner's per-axis floors.
    model = tiny_model("llama", "training", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    model.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    (root / "data").mkdir()
    for index in range(4):
        (root / "data" / f"train{index}.txt").write_text("\n\n".join(sentences(12, index)))
    (root / "heldout.txt").write_text("\n\n".join(sentences(10, 99)))
    return root
