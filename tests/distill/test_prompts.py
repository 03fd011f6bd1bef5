"""The general prompt set, the prompt sources and their mix, the joined teacher sequence, and the
filters for degenerate samples (slimlm.distill.prompts)."""
import re
from collections import Counter

import pytest
from tokenizers import processors

from slimlm.distill import prompts as prompts_module
from slimlm.distill.prompts import (
    GENERAL_TOPICS,
    SOURCE_KINDS,
    TASKS,
    FilterCounts,
    PromptSource,
    degeneration,
    general_prompt_count,
    general_prompts,
    joined_ids,
    joined_text,
    mix_prompts,
    parse_sources,
    repeated_ngram_share,
    source_counts,
    trim_cut,
)
from slimlm.errors import InputError
from tiny import bpe_tokenizer

# Ordinary text in the shapes a chat teacher writes: an explanation, a list, a story, advice.
PROSE = (
    "The stock market is a place where people buy and sell small pieces of companies, called shares. When a "
    "company wants money to grow, it can sell shares to the public, and anyone who buys one owns a tiny part of "
    "that business. Prices move every day because buyers and sellers keep changing their minds about what a "
    "company is worth. Good news about profits tends to push a price up, while worries about debt or a weak "
    "economy can pull it down. Over many years, the market as a whole has usually grown, but single companies "
    "can fail, which is why most people spread their savings across many of them.",
    "Here are three practical tips for keeping houseplants alive:\n\n1. Check the light. Most common plants "
    "prefer bright, indirect light, so a spot near a window without harsh afternoon sun works well.\n2. Water "
    "less often than you think. Push a finger into the soil, and water only when the top few centimetres feel "
    "dry; soggy roots rot quickly.\n3. Watch the leaves. Yellow leaves often mean too much water, brown crispy "
    "edges suggest dry air, and pale new growth can be a sign that the plant is hungry for fertiliser.",
    "Mira found the old map folded inside a library book about lighthouses. The paper was soft as cloth, and "
    "someone had drawn a small red star on the cliffs north of town. That evening she packed a torch, two "
    "apples and her grandfather's compass, and she walked along the coast path until the houses disappeared "
    "behind her. The wind smelled of salt and rain. When she reached the cliffs, the star turned out to mark "
    "nothing more than a crooked bench, but from it she could see the whole bay glowing in the last light, and "
    "she understood why someone had wanted to remember the place.",
    "Saving money gets easier when it happens automatically. Ask your bank to move a fixed amount into a "
    "separate account on the day your salary arrives, before you have a chance to spend it. Start small if you "
    "need to; even a modest sum adds up over a year, and you can raise it whenever your income grows. Keep a "
    "simple record of where your money goes for one month, because most people are surprised by how much "
    "disappears on small daily purchases like snacks, coffee and delivery fees.",
)
# Loops: a stuck word, a sentence said over and over, and prose that falls into a short loop at the end.
LOOPS = (
    "the " * 60,
    "I really like going to the park with my dog on sunny days. " * 5,
    PROSE[0] + " and so on" * 30,
    "Sewing is fun. People often ask about sewing, but they often don't ask about the basics of sewing, and "
    "they often don't ask about the basics of sewing, and they often don't ask about the basics of sewing, and "
    "they often don't ask about the basics of sewing.",
)


def word_ids(text: str, vocab: dict) -> list[int]:
    """Words and punctuation as ids: a tokenizer-free stand-in for a teacher's tokens."""
    return [vocab.setdefault(word, len(vocab)) for word in re.findall(r"\w+|[^\w\s]", text)]


# ------------------------------------------------------------------ the general set
def test_topics_and_tasks_are_well_formed():
    assert set(TASKS) == {"explain", "narrate", "advise", "describe", "compare", "answer"}
    assert len(GENERAL_TOPICS) >= 16
    topics = [topic for category in GENERAL_TOPICS.values() for topic in category]
    assert len(topics) == len(set(topics)), "a topic is listed twice"
    assert all(len(category) >= 8 for category in GENERAL_TOPICS.values())
    assert not any("{" in topic or "}" in topic or topic != topic.strip() for topic in topics)
    for task, templates in TASKS.items():
        assert len(templates) >= 4 and len(set(templates)) == len(templates)
        for template in templates:
            assert "{topic}" in template and ("{other}" in template) == (task == "compare"), template


def test_general_prompts_are_all_distinct_and_counted():
    everything = general_prompts()
    assert len(everything) == general_prompt_count() == len(set(everything))
    assert general_prompt_count() >= 3000
    assert not any("{" in prompt for prompt in everything)
    assert "Compare olive oil and butter." in everything and "Compare tea and baking bread at home." in everything
    assert f"= {general_prompt_count()} distinct prompts" in " ".join(prompts_module.__doc__.split())


def _cell_of() -> dict:
    """{prompt: (task, category)}, rebuilt from the tables independently of the module's draw."""
    cells = {}
    for task, templates in TASKS.items():
        for category, topics in GENERAL_TOPICS.items():
            for template in templates:
                for index, topic in enumerate(topics):
                    cells[template.format(topic=topic, other=topics[(index + 1) % len(topics)])] = (task, category)
    return cells


@pytest.mark.parametrize("count", [7, 100, 216, 1000])
def test_general_prompts_are_balanced_over_tasks_and_categories(count):
    cells = _cell_of()
    drawn = general_prompts(count, seed=5)
    assert len(drawn) == count == len(set(drawn))
    tasks = Counter(cells[prompt][0] for prompt in drawn)
    categories = Counter(cells[prompt][1] for prompt in drawn)
    assert max(tasks.values()) - min(tasks[task] for task in TASKS) <= 1
    assert max(categories.values()) - min(categories[name] for name in GENERAL_TOPICS) <= len(TASKS)


def test_general_prompts_are_seeded_and_nested():
    assert general_prompts(300, seed=1) == general_prompts(300, seed=1)
    assert general_prompts(300, seed=1) != general_prompts(300, seed=2)
    assert general_prompts(40, seed=1) == general_prompts(300, seed=1)[:40]
    assert sorted(general_prompts(seed=3)) == sorted(general_prompts(seed=4))
    assert general_prompts(0) == []


def test_general_prompts_refuse_bad_counts():
    total = general_prompt_count()
    with pytest.raises(InputError, match=f"holds {total}"):
        general_prompts(total + 1)
    with pytest.raises(InputError, match="non-negative"):
        general_prompts(-1)


# ------------------------------------------------------------------ sources
def test_parse_sources_reads_a_recipe_mapping_and_a_cli_string_alike(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hello?"}\n')
    other = tmp_path / "q.txt"
    other.write_text("Why?\n")
    expected = [PromptSource("general", 0.7), PromptSource("data", 0.3), PromptSource("file", 0.2, str(prompts))]
    assert parse_sources({"general": 0.7, "data": 0.3, "file": {"path": str(prompts), "weight": 0.2}}) == expected
    assert parse_sources(f"general=0.7, data=0.3,file:{prompts}=0.2") == expected
    assert parse_sources({"general": 0.7, "data": "0.3", f"file:{prompts}": 0.2}) == expected
    several = parse_sources({"bos": 1, "file": [{"path": "p.jsonl", "weight": 1}, {"path": "q.txt", "weight": 2}]},
                            root=tmp_path)
    assert [source.name for source in several] == ["bos", f"file:{prompts}", f"file:{other}"]
    assert [source.weight for source in several] == [1.0, 1.0, 2.0]
    assert parse_sources("general=1,data=0") == [PromptSource("general", 1.0), PromptSource("data", 0.0)]
    assert SOURCE_KINDS == ("general", "bos", "data", "file")


@pytest.mark.parametrize("spec, message", [
    ("general=0.5,wiki=0.5", "unknown value 'wiki'"),
    ({"general": -0.1}, "finite number >= 0"),
    ("general=lots", "not a number: 'lots'"),
    ({"general": True}, "not a number"),
    ({"general": [0.5]}, "not a number"),
    ("general=nan", "finite number"),
    ("general=0,data=0", "every prompt source has weight 0"),
    ("file=0.2", "needs a path"),
    ({"file": 0.2}, "needs a path"),
    ({"file": {"weight": 0.2}}, "needs a path"),
    ({"file": {"path": "p.txt"}}, "a mapping {path: PATH, weight: W}"),
    ("file:missing.jsonl=0.2", "prompts file missing.jsonl does not exist"),
    ("general=0.5,general=0.5", "'general' is given twice"),
    ("general", "has no weight"),
    ("", "no prompt sources given"),
    ({}, "no prompt sources given"),
    (0.5, "must be a mapping or a string"),
])
def test_parse_sources_refuses_bad_specs_in_one_line(spec, message):
    with pytest.raises(InputError, match=re.escape(message)) as caught:
        parse_sources(spec)
    assert "\n" not in str(caught.value)


def test_parse_sources_refuses_the_same_file_twice_but_takes_two_files(tmp_path):
    (tmp_path / "a.txt").write_text("A?\n")
    (tmp_path / "b.txt").write_text("B?\n")
    with pytest.raises(InputError, match="given twice"):
        parse_sources("file:a.txt=1,file:a.txt=2", root=tmp_path)
    assert len(parse_sources("file:a.txt=1,file:b.txt=2", root=tmp_path)) == 2


# ------------------------------------------------------------------ the mix
POOLS = {"general": [f"g{i}" for i in range(50)], "data": [f"d{i}" for i in range(5)], "bos": [""]}


@pytest.mark.parametrize("weights, total, expected", [
    ({"general": 0.7, "data": 0.3}, 10, {"general": 7, "data": 3}),
    ({"general": 1, "data": 1, "bos": 1}, 10, {"general": 4, "data": 3, "bos": 3}),
    ({"general": 0.5, "data": 0.3, "bos": 0.2}, 7, {"general": 4, "data": 2, "bos": 1}),
    ({"general": 2, "data": 0}, 9, {"general": 9}),
    ({"general": 1}, 0, {}),
])
def test_mix_counts_follow_the_weights_by_largest_remainder(weights, total, expected):
    assert {name: n for name, n in source_counts(weights, total).items() if n} == expected
    mixed = mix_prompts(POOLS, weights, total, seed=0)
    assert len(mixed) == total and Counter(name for name, _ in mixed) == Counter(expected)
    assert all(prompt in POOLS[name] for name, prompt in mixed)


def test_mix_draws_without_repetition_then_cycles_evenly():
    mixed = mix_prompts(POOLS, {"general": 0.5, "data": 0.5}, 24, seed=3)
    general = [prompt for name, prompt in mixed if name == "general"]
    data = Counter(prompt for name, prompt in mixed if name == "data")
    assert len(general) == len(set(general)) == 12
    assert set(data) == set(POOLS["data"]) and set(data.values()) <= {2, 3}
    assert [prompt for name, prompt in mixed if name == "bos"] == []


def test_mix_is_seeded_interleaved_and_each_source_draws_on_its_own():
    weights = {"general": 0.5, "data": 0.25, "bos": 0.25}
    assert mix_prompts(POOLS, weights, 40, seed=1) == mix_prompts(POOLS, weights, 40, seed=1)
    assert mix_prompts(POOLS, weights, 40, seed=1) != mix_prompts(POOLS, weights, 40, seed=2)
    names = [name for name, _ in mix_prompts(POOLS, weights, 40, seed=1)]
    assert names != sorted(names, key=list(weights).index), "sources are not interleaved"
    alone = {prompt for _, prompt in mix_prompts(POOLS, {"general": 1}, 20, seed=1)}
    beside = {prompt for name, prompt in mix_prompts(POOLS, {"general": 1, "bos": 1}, 40, seed=1) if name == "general"}
    assert alone == beside


def test_mix_refuses_a_weighted_source_without_text():
    with pytest.raises(InputError, match="prompt source 'data' has no text"):
        mix_prompts({"general": ["a"], "data": []}, {"general": 1, "data": 0.1}, 5, seed=0)
    with pytest.raises(InputError, match="prompt source 'file:p.txt' has no text"):
        mix_prompts({"general": ["a"]}, {"general": 1, "file:p.txt": 1}, 5, seed=0)
    assert mix_prompts({"general": ["a"], "data": []}, {"general": 1, "data": 0}, 2, seed=0) == [("general", "a")] * 2
    with pytest.raises(InputError, match="weight 0"):
        mix_prompts(POOLS, {"general": 0}, 5, seed=0)
    with pytest.raises(InputError, match="non-negative"):
        mix_prompts(POOLS, {"general": 1}, -1, seed=0)


# ------------------------------------------------------------------ the joined sequence
def test_joined_ids_is_the_plain_concatenation():
    prompt, new = [1, 5, 6], [7, 2]
    assert joined_ids(prompt, new) == [1, 5, 6, 7, 2] and prompt == [1, 5, 6] and new == [7, 2]


def test_joined_text_keeps_the_chat_template_and_round_trips():
    tokenizer = bpe_tokenizer()
    prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": "the model is small?"}],
                                                add_generation_prompt=True, tokenize=True)["input_ids"])
    new = tokenizer("the student is good.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    text = joined_text(tokenizer, prompt, new)
    # This tokenizer adds no BOS of its own, so the template's leading <|im_start|> stays.
    assert text == ("<|im_start|>user\nthe model is small?<|im_end|>\n"
                    "<|im_start|>assistant\nthe student is good.<|im_end|>")
    assert tokenizer(text)["input_ids"] == joined_ids(prompt, new)


def test_joined_text_drops_the_bos_the_tokenizer_adds_back():
    tokenizer = bpe_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", tokenizer.bos_token_id)])
    prompt = tokenizer("the teacher")["input_ids"]
    assert prompt[0] == tokenizer.bos_token_id
    new = tokenizer(" will distill the student.", add_special_tokens=False)["input_ids"]
    text = joined_text(tokenizer, prompt, new)
    assert text == "the teacher will distill the student."
    assert tokenizer(text)["input_ids"] == joined_ids(prompt, new)


# ------------------------------------------------------------------ filters
@pytest.mark.parametrize("text", PROSE)
def test_prose_passes(text):
    ids = word_ids(text, {})
    assert repeated_ngram_share(ids) < 0.1
    assert degeneration(ids, text, "stop") is None
    assert degeneration(ids, text + " And then the", "length") is None


@pytest.mark.parametrize("text", LOOPS)
def test_loops_are_repetition(text):
    ids = word_ids(text, {})
    assert degeneration(ids, text, "stop") == "repetition"
    assert degeneration(ids, text.rstrip(". ") + " and", "length") == "repetition"


def test_repeated_ngram_share_of_copies():
    passage = list(range(20))
    assert repeated_ngram_share(passage) == 0.0
    assert repeated_ngram_share(passage * 4) == pytest.approx(1 - 20 / 77)
    assert repeated_ngram_share([1, 2, 3]) == 0.0


def test_degeneration_reasons_in_order():
    words = word_ids(PROSE[2], {})
    assert degeneration([], "", "stop") == "empty"
    assert degeneration([5, 6], "  \n", "stop") == "empty"
    assert degeneration(words[:7], "Mira found the old map folded inside", "stop") == "short"
    assert degeneration(words[:7], "Mira found the old map folded inside", "stop", min_new_tokens=4) is None
    assert degeneration(words[:30], "Mira found the old map folded inside a library book about", "length") == "cut"
    assert degeneration(words[:30], "Mira found the old map folded inside a library book about", "stop") is None
    with pytest.raises(ValueError, match="unknown value 'eos'"):
        degeneration(words, PROSE[2], "eos")


@pytest.mark.parametrize("text, kept", [
    ("One. Two three", "One."),
    ('He said "stop!" and then', 'He said "stop!"'),
    ("Is it? (Yes.) Then we", "Is it? (Yes.)"),
    ("It grew 3.5 percent in", ""),
    ("Done.\n\nNext we", "Done."),
    ("All done.", "All done."),
    ("", ""),
    ("今日は晴れです。明日は", "今日は晴れです。"),
])
def test_trim_cut_keeps_up_to_the_last_sentence_end(text, kept):
    assert trim_cut(text) == kept


def test_filter_counts():
    counts = FilterCounts()
    for reason in (None, "short", None, "short", "cut"):
        counts.add(reason)
    assert counts.as_record() == {"kept": 2, "empty": 0, "short": 2, "repetition": 0, "cut": 1}
    with pytest.raises(ValueError, match="unknown value 'loop'"):
        counts.add("loop")


# ------------------------------------------------------------------ on SmolLM2's tokenizer
@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from slimlm.models import load_tokenizer, smollm2_gguf_path

    return load_tokenizer(smollm2_gguf_path())


@pytest.mark.slow
def test_smollm2_joined_text_and_filters(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": "What is the stock market?"}],
                                                add_generation_prompt=True, tokenize=True)["input_ids"])
    new = tokenizer(PROSE[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    text = joined_text(tokenizer, prompt, new)
    # SmolLM2's BOS is <|im_start|> and its tokenizer adds none, so the template's first one stays.
    assert text.startswith("<|im_start|>system\n")
    assert "What is the stock market?<|im_end|>\n<|im_start|>assistant\nThe stock market is a place" in text
    assert text.endswith("of them.<|im_end|>")
    assert tokenizer(text)["input_ids"] == joined_ids(prompt, new)

    raw_prompt = tokenizer("The stock market")["input_ids"]
    raw_new = tokenizer(" is where shares are traded.", add_special_tokens=False)["input_ids"]
    raw = joined_text(tokenizer, raw_prompt, raw_new)
    assert raw == "The stock market is where shares are traded."
    assert tokenizer(raw)["input_ids"] == joined_ids(raw_prompt, raw_new)

    for prose in PROSE:
        assert degeneration(tokenizer(prose)["input_ids"], prose, "stop") is None, prose[:40]
    for loop in LOOPS:
        assert degeneration(tokenizer(loop)["input_ids"], loop, "stop") == "repetition", loop[:40]
