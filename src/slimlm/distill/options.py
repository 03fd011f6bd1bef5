"""The synthetic-text stage's options, declared once (``slimlm.options``): ``slimlm generate``'s
flags, a recipe's ``synthetic:`` section and ``GenerationOptions`` in Python."""
from __future__ import annotations

from dataclasses import dataclass

from slimlm.options import Options, option


@dataclass
class GenerationOptions(Options):
    """How the teacher writes synthetic text: ``num_prompts`` prompts, each continued by
    ``num_return_sequences`` samples of at most ``max_new_tokens`` tokens (temperature and
    nucleus sampling), ``batch_size`` prompts at a time, as a user turn of the chat template
    with ``chat``; ``mix`` is the share of synthetic blocks in a recipe's distillation."""

    SECTION = "synthetic"

    num_prompts: int = option(256, "prompts to continue", check="positive")
    max_new_tokens: int = option(128, "new tokens per generation at most", check="positive")
    temperature: float = option(0.8, "sampling temperature", check="positive")
    top_p: float = option(0.95, "nucleus sampling: the smallest set of tokens holding this probability",
                          check="positive_fraction")
    num_return_sequences: int = option(1, "generations per prompt", check="positive")
    batch_size: int = option(8, "prompts per generation batch", check="positive")
    chat: bool = option(False, "wrap each prompt as a user turn of the tokenizer's chat template")
    mix: float = option(0.3, "share of synthetic blocks in the distillation's training mix (a recipe's; "
                             "slimlm distill takes --mix)", check="fraction", cli=False)

    def sampling(self, seed: int) -> dict:
        """The keyword arguments of ``generate_stage``/``check_generation`` these options give."""
        return dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                    num_return_sequences=self.num_return_sequences, batch_size=self.batch_size, seed=seed,
                    chat_template=True if self.chat else None)
