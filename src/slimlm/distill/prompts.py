"""Prompts for the text the teacher writes, the mix of their sources, and the filters that drop
degenerate samples.

The built-in general prompt set is the cross product of everyday topics and task templates.
``GENERAL_TOPICS`` holds 18 categories of 16 topics each (people and relationships, health,
food, home, nature, weather, science, history, arts, music and film, sports, travel, work and
money, school, technology, society, language, hobbies), written for this package. ``TASKS``
holds six task types (explain, narrate, advise, describe, compare, answer) of five templates
each; a template takes ``{topic}``, and a compare template ``{topic}`` and ``{other}``, where
``other`` is the next topic of the same category (cyclically, so each topic is compared once
as ``topic`` and once as ``other``; neighbours in a category are written to make sensible
pairs). Every (task, category) cell therefore holds topics x templates prompts, and the whole
set 18 x 16 x 6 x 5 = 8640 distinct prompts (``general_prompt_count``). ``general_prompts``
draws them in a seeded order in which every prefix is balanced over task types and categories.

A run's prompts come from weighted sources (``parse_sources``, ``SOURCE_KINDS``): the general
set, free sampling from BOS (the empty prompt), first sentences of the training documents, or
a prompts file; ``mix_prompts`` draws ``total`` of them in proportion to the weights.

``joined_ids`` / ``joined_text`` give the sequence as the teacher saw it (chat template
included), and ``degeneration`` / ``trim_cut`` / ``FilterCounts`` judge and count the samples.
"""
from __future__ import annotations

import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping

from slimlm.errors import InputError
from slimlm.models import unknown_value

GENERAL_TOPICS: dict[str, tuple[str, ...]] = {
    "people and relationships": (
        "making friends as an adult", "keeping in touch with old friends", "sibling rivalry", "being an only child",
        "grandparents and grandchildren", "raising teenagers", "a first date", "long-distance relationships",
        "apologising after an argument", "forgiving someone", "meeting your partner's family",
        "living with roommates", "neighbours who become friends", "saying goodbye when a friend moves away",
        "loneliness in big cities", "small talk with strangers",
    ),
    "health and body": (
        "getting enough sleep", "afternoon naps", "drinking enough water", "drinking coffee", "walking every day",
        "running for beginners", "stretching", "yoga", "the common cold", "seasonal allergies", "healthy teeth",
        "good posture at a desk", "managing stress", "meditation", "the immune system", "the human heart",
    ),
    "food and cooking": (
        "baking bread at home", "making fresh pasta", "cooking rice", "cooking with lentils and beans",
        "olive oil", "butter", "spices in Indian cooking", "herbs in Italian cooking", "breakfast around the world",
        "street food", "fermented foods like kimchi and yogurt", "making cheese", "knife skills in the kitchen",
        "a well-stocked pantry", "chocolate", "tea",
    ),
    "home and everyday life": (
        "keeping a small apartment tidy", "decluttering a home", "doing laundry", "ironing clothes",
        "houseplants", "a small vegetable garden", "saving energy at home", "fixing a leaky tap",
        "morning routines", "evening routines", "grocery shopping on a budget", "planning meals for the week",
        "living with a dog", "living with a cat", "moving to a new home", "hosting a dinner party",
    ),
    "nature and animals": (
        "honeybees", "butterflies", "wolves", "foxes", "elephants", "whales", "octopuses", "coral reefs", "owls",
        "migrating birds", "old forests", "mushrooms and other fungi", "frogs", "turtles", "ants", "spiders",
    ),
    "weather and geography": (
        "thunderstorms", "hurricanes", "snow", "fog", "monsoon seasons", "droughts", "rainbows",
        "the four seasons", "mountains", "volcanoes", "deserts", "rainforests", "rivers", "lakes", "islands",
        "glaciers",
    ),
    "science": (
        "gravity", "magnetism", "photosynthesis", "how seeds grow into plants", "the water cycle",
        "the carbon cycle", "atoms", "chemical reactions", "the speed of light", "sound waves",
        "evolution by natural selection", "DNA and genes", "the solar system", "black holes", "the Moon",
        "the Sun",
    ),
    "history": (
        "ancient Egypt", "ancient Greece", "the Roman Empire", "the Han dynasty", "the Silk Road", "the Vikings",
        "medieval castles", "the printing press", "the age of exploration", "the Industrial Revolution",
        "the invention of the telephone", "the first airplanes", "the Moon landing", "the fall of the Berlin Wall",
        "the history of writing", "the history of money",
    ),
    "arts and literature": (
        "fairy tales", "myths and legends", "poetry", "haiku", "the novel", "short stories", "Shakespeare's plays",
        "Greek tragedy", "impressionist painting", "abstract art", "sculpture", "photography", "comic books",
        "children's picture books", "detective stories", "science fiction",
    ),
    "music and film": (
        "learning the piano", "learning the guitar", "jazz", "the blues", "classical symphonies", "opera",
        "folk songs", "hip-hop", "silent films", "animated films", "film soundtracks", "documentaries",
        "horror movies", "romantic comedies", "going to a concert", "going to the cinema",
    ),
    "sports and games": (
        "football", "basketball", "tennis", "table tennis", "swimming", "cycling", "marathon running",
        "mountain climbing", "the Olympic Games", "chess", "card games", "board games", "video games",
        "crossword puzzles", "team sports for children", "good sportsmanship",
    ),
    "travel and places": (
        "travelling by train", "road trips", "packing light", "travelling alone", "visiting a big city",
        "staying in a small village", "camping", "hiking trails", "beach holidays", "skiing holidays",
        "learning a few words of the local language", "trying local food abroad", "museums", "historic old towns",
        "visiting Japan", "visiting Italy",
    ),
    "work and money": (
        "a job interview", "writing a CV", "working from home", "working in an office", "saving money",
        "keeping a household budget", "paying off debt", "compound interest", "starting a small business",
        "working for a large company", "negotiating a salary", "asking for a raise", "time management at work",
        "meetings at work", "planning for retirement", "changing careers",
    ),
    "school and learning": (
        "learning a new language", "learning to read", "homework", "exams", "taking good notes",
        "memorising facts", "mathematics", "history lessons", "the first day at a new school",
        "going to university", "learning online", "learning from books", "teachers who inspire",
        "group projects", "curiosity", "learning from mistakes",
    ),
    "technology in daily life": (
        "smartphones", "laptops", "email", "video calls", "social media", "online shopping", "strong passwords",
        "online scams", "electric cars", "electric bicycles", "microwave ovens", "washing machines",
        "GPS navigation", "paper maps", "streaming music", "the radio",
    ),
    "society and community": (
        "volunteering", "local libraries", "public parks", "community gardens", "recycling",
        "reducing food waste", "voting in elections", "serving on a jury", "public transport",
        "cycling in cities", "festivals and holidays", "wedding traditions", "helping elderly neighbours",
        "welcoming newcomers to a town", "farmers' markets", "small local shops",
    ),
    "language and communication": (
        "learning new words", "idioms", "writing a clear email", "giving a speech", "listening well",
        "body language", "telling a good joke", "telling stories at the dinner table", "sign language",
        "learning to spell", "accents and dialects", "translation", "writing a thank-you note", "keeping a diary",
        "politeness in different cultures", "disagreeing respectfully",
    ),
    "hobbies and crafts": (
        "knitting", "sewing", "woodworking", "pottery", "drawing", "painting with watercolours", "birdwatching",
        "stargazing", "collecting stamps", "collecting coins", "fishing", "baking cakes", "model trains",
        "origami", "jigsaw puzzles", "photographing wildlife",
    ),
}

TASKS: dict[str, tuple[str, ...]] = {
    "explain": (
        "Explain {topic} in simple terms.",
        "Can you explain {topic} to a curious twelve-year-old?",
        "What is the basic idea behind {topic}, and why does it matter?",
        "Give me a short, clear explanation of {topic}.",
        "I have never really understood {topic}. Could you explain it?",
    ),
    "narrate": (
        "Write a short story in which {topic} plays a central role.",
        "Tell me a story about a person whose week is changed by {topic}.",
        "Write a diary entry by someone who spent the day thinking about {topic}.",
        "Tell a gentle bedtime story that involves {topic}.",
        "Write the opening paragraphs of a novel that begins with {topic}.",
    ),
    "advise": (
        "What advice would you give to a beginner interested in {topic}?",
        "What are common mistakes people make with {topic}, and how can they avoid them?",
        "Give me three practical tips about {topic}.",
        "My friend wants to learn more about {topic}. Where should they start?",
        "What should I keep in mind when it comes to {topic}?",
    ),
    "describe": (
        "Describe {topic} in a few vivid paragraphs.",
        "Write a short encyclopedia entry about {topic} for children.",
        "Describe {topic} to someone who has never seen or experienced it.",
        "Paint a picture in words of {topic}.",
        "Describe what makes {topic} special.",
    ),
    "compare": (
        "Compare {topic} and {other}.",
        "What are the main differences between {topic} and {other}?",
        "What do {topic} and {other} have in common, and how do they differ?",
        "Write a short essay comparing {topic} with {other}.",
        "How is {topic} similar to {other}, and how is it different?",
    ),
    "answer": (
        "What is a common misconception about {topic}?",
        "Why do so many people find {topic} interesting?",
        "What are three surprising facts about {topic}?",
        "How has {topic} changed over the last hundred years?",
        "What questions do people often ask about {topic}, and what are the answers?",
    ),
}


def _cells() -> dict[tuple[str, str], list[str]]:
    """{(task, category): its prompts, in template-then-topic order}."""
    cells = {}
    for task, templates in TASKS.items():
        for category, topics in GENERAL_TOPICS.items():
            pairs = [(topic, topics[(index + 1) % len(topics)]) for index, topic in enumerate(topics)]
            cells[task, category] = [template.format(topic=topic, other=other)
                                     for template in templates for topic, other in pairs]
    return cells


def general_prompt_count() -> int:
    """How many prompts the general set holds (``general_prompts()`` returns them all)."""
    return sum(len(prompts) for prompts in _cells().values())


def general_prompts(count: int | None = None, *, seed: int = 0) -> list[str]:
    """``count`` distinct prompts of the general set (all of them for None), the same for the same
    seed, and a prefix of the longer draws of that seed.

    The order is seeded and balanced: each (task, category) cell is shuffled, and the draw takes
    one prompt per cell per round, visiting the cells in blocks of one prompt per task type, each
    from a different category, the categories rotating from block to block. So in any prefix the
    task types' counts differ by at most one, and the categories' by at most the number of task
    types."""
    total = general_prompt_count()
    if count is None:
        count = total
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise InputError(f"the number of general prompts must be a non-negative integer, got {count!r}")
    if count > total:
        raise InputError(f"asked for {count} general prompts; the general set holds {total}")
    rng = random.Random(f"general/{seed}")
    cells = _cells()
    for prompts in cells.values():
        rng.shuffle(prompts)
    tasks, categories = list(TASKS), list(GENERAL_TOPICS)
    rng.shuffle(tasks)
    rng.shuffle(categories)
    drawn: list[str] = []
    depth = max(len(prompts) for prompts in cells.values())
    for round_index in range(depth):
        for block in range(len(categories)):
            for offset, task in enumerate(tasks):
                prompts = cells[task, categories[(block + offset) % len(categories)]]
                if round_index < len(prompts):
                    drawn.append(prompts[round_index])
    return drawn[:count]


# ------------------------------------------------------------------ sources and their mix
SOURCE_KINDS = ("general", "bos", "data", "file")
SOURCES_SYNTAX = "kind=weight, comma-separated, a file as file:PATH=weight (general=0.7,data=0.3,file:p.jsonl=0.2)"


@dataclass(frozen=True)
class PromptSource:
    """One source of prompts and its weight in the mix.

    kind: "general": the built-in set (``general_prompts``); "bos": free sampling from BOS (the
    prompt ""); "data": first sentences of the training documents; "file": a prompts file
    (``slimlm.distill.generate.load_prompts``) at ``path``."""

    kind: str
    weight: float
    path: str | None = None

    @property
    def name(self) -> str:
        """The source's key in ``mix_prompts``' pools and weights: its kind, or ``file:PATH``."""
        return f"file:{self.path}" if self.kind == "file" else self.kind


def _entries(spec) -> list[tuple[str, object, str | None]]:
    """(kind, raw weight, path) of each source a recipe mapping or a CLI string names."""
    if isinstance(spec, str):
        pairs = []
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            if "=" not in item:
                raise InputError(f"prompt source {item!r} has no weight; write {SOURCES_SYNTAX}")
            key, weight = item.rsplit("=", 1)
            pairs.append((key.strip(), weight.strip()))
    elif isinstance(spec, Mapping):
        pairs = list(spec.items())
    else:
        raise InputError(f"prompt sources must be a mapping or a string ({SOURCES_SYNTAX}), got {type(spec).__name__}")
    entries = []
    for key, value in pairs:
        key = str(key)
        if key.startswith("file:"):
            entries.append(("file", value, key[len("file:"):]))
        elif key == "file" and isinstance(value, (Mapping, list)):
            for item in value if isinstance(value, list) else [value]:
                if not isinstance(item, Mapping) or set(item) - {"path", "weight"} or "weight" not in item:
                    raise InputError(f"a file prompt source is a mapping {{path: PATH, weight: W}}, got {item!r}")
                entries.append(("file", item["weight"], item.get("path")))
        else:
            entries.append((key, value, None))
    return entries


def _weight(name: str, value) -> float:
    """A source's weight from a number or its text; InputError unless finite and >= 0."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InputError(f"the weight of prompt source {name!r} is not a number: {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"the weight of prompt source {name!r} is not a number: {value!r}")
    if not math.isfinite(value) or value < 0:
        raise InputError(f"the weight of prompt source {name!r} must be a finite number >= 0, got {value}")
    return float(value)


def parse_sources(spec, *, root: str | os.PathLike | None = None) -> list[PromptSource]:
    """The prompt sources a recipe mapping or a CLI string names, in the order given.

    Recipe: ``{general: 0.7, data: 0.3}``, a file as ``{file: {path: p.jsonl, weight: 0.2}}``
    (several: a list of such mappings) or ``{"file:p.jsonl": 0.2}``. CLI:
    ``"general=0.7,data=0.3,file:p.jsonl=0.2"`` (a path holding a comma cannot be written
    there). A relative file path is taken relative to ``root`` when given (a recipe's folder) and
    returned joined to it. InputError, one line: an unknown kind, a weight that is not a finite
    number >= 0, every weight 0, a file source without a path or whose file does not exist, a
    kind (or the same file) given twice, no source at all."""
    sources: list[PromptSource] = []
    for kind, raw_weight, path in _entries(spec):
        if kind not in SOURCE_KINDS:
            raise InputError(f"prompt source{unknown_value(kind, SOURCE_KINDS)}")
        if kind == "file":
            if not path:
                raise InputError(f"a file prompt source needs a path; write {SOURCES_SYNTAX}")
            path = os.fspath(path)
            if root is not None and not os.path.isabs(path):
                path = os.path.join(os.fspath(root), path)
            if not os.path.isfile(path):
                raise InputError(f"prompts file {path} does not exist")
        name = PromptSource(kind, 0.0, path).name
        if any(other.name == name for other in sources):
            raise InputError(f"prompt source {name!r} is given twice")
        sources.append(PromptSource(kind, _weight(name, raw_weight), path))
    if not sources:
        raise InputError(f"no prompt sources given; write {SOURCES_SYNTAX}")
    if not any(source.weight > 0 for source in sources):
        raise InputError("every prompt source has weight 0; give at least one a positive weight")
    return sources


def source_counts(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """How many of ``total`` prompts each source gets in ``mix_prompts``: ``total`` split in
    proportion to ``weights`` (>= 0, not all 0) by largest remainder, ties to the earlier name.
    A caller can size a pool with it, e.g. ``general_prompts(counts["general"], seed=seed)``
    keeps the general set's balanced draw whole."""
    scale = sum(weights.values())
    quotas = {name: total * weight / scale for name, weight in weights.items()}
    counts = {name: math.floor(quota) for name, quota in quotas.items()}
    by_remainder = sorted(quotas, key=lambda name: counts[name] - quotas[name])
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def _draw(pool: list[str], count: int, rng: random.Random) -> list[str]:
    """``count`` items of ``pool``: a seeded permutation, then fresh permutations once it runs out."""
    drawn: list[str] = []
    while len(drawn) < count:
        order = list(range(len(pool)))
        rng.shuffle(order)
        drawn += [pool[index] for index in order[: count - len(drawn)]]
    return drawn


def mix_prompts(pools: Mapping[str, list[str]], weights: Mapping[str, float], total: int, *,
                seed: int) -> list[tuple[str, str]]:
    """``total`` (source name, prompt) pairs, in a seeded interleaved order.

    Source ``name`` gets round(total * weight / sum of weights) of them by largest remainder
    (so the counts sum to ``total``), drawn from ``pools[name]`` without repetition while it
    lasts, then again in a fresh seeded order. Each source draws from its own seeded stream, so
    adding or reweighting another source does not change which prompts a source's first draws
    are. For "bos" the pool is [""]. InputError: a source of weight > 0 with an empty or missing
    pool ("prompt source 'x' has no text"), weights that are negative or all 0, ``total`` < 0."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise InputError(f"the number of prompts must be a non-negative integer, got {total!r}")
    weights = {name: _weight(name, weight) for name, weight in weights.items()}
    if not any(weight > 0 for weight in weights.values()):
        raise InputError("every prompt source has weight 0; give at least one a positive weight")
    for name, weight in weights.items():
        if weight > 0 and not pools.get(name):
            raise InputError(f"prompt source {name!r} has no text")
    mixed = [(name, prompt) for name, count in source_counts(weights, total).items()
             for prompt in _draw(list(pools.get(name, [])), count, random.Random(f"mix/{seed}/{name}"))]
    random.Random(f"mix/{seed}/order").shuffle(mixed)
    return mixed


# ------------------------------------------------------------------ the sequence the teacher saw
def joined_ids(prompt_ids: list[int], new_ids: list[int]) -> list[int]:
    """The teacher's whole sequence: ``prompt_ids + new_ids``, exactly what it read and wrote
    (chat template, a BOS and any stop token included as they are in the two lists)."""
    return list(prompt_ids) + list(new_ids)


def _added_prefix(tokenizer) -> list[int]:
    """The special ids the tokenizer puts before a text when it encodes it (e.g. [BOS]; [] for
    SmolLM2, whose BOS comes from its chat template only)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


def joined_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The teacher's sequence as text: ``joined_ids`` decoded with the special tokens kept (a chat
    teacher's "...stock market?<|im_end|>\\n<|im_start|>assistant\\nThe stock market...", a raw
    one's "prompt continuation" with the tokenizer's own spacing), without the leading special
    tokens that the tokenizer adds again when it encodes text (a BOS; kept where it does not).

    ``tokenizer(joined_text(...))["input_ids"] == joined_ids(...)`` holds when the ids are the
    tokenizer's own encoding of their text. It cannot hold where they are not: the teacher
    sampled a split of a word that the tokenizer would not choose (rare at normal temperatures,
    but any sample may have one), the prompt ends where its last token merges with the answer's
    first (a raw prompt ending mid-word or in a space), a byte-level token sequence that is not
    valid UTF-8 (a character cut by the length limit decodes to U+FFFD), or the answer spells a
    special token's text."""
    ids = joined_ids(prompt_ids, new_ids)
    prefix = _added_prefix(tokenizer)
    if prefix and ids[: len(prefix)] == prefix:
        ids = ids[len(prefix):]
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# ------------------------------------------------------------------ filters
FINISH_REASONS = ("stop", "length")
DEGENERATION_REASONS = ("empty", "short", "repetition", "cut")
# A loop: over a fifth of the 4-grams repeat an earlier one (a sentence said twice in a short
# answer is enough), or the sample ends in a short loop: under a quarter of its last 64 tokens are
# distinct (a window, so that the share does not fall with the length of ordinary text). Prose and
# chat answers, lists included, repeat few 4-grams and use many distinct tokens in any window; the
# tests hold crafted loops and prose on either side.
REPEAT_NGRAM = 4
MAX_REPEATED_NGRAM_SHARE = 0.2
DISTINCT_WINDOW = 64
MIN_DISTINCT_TOKEN_SHARE = 0.25
DISTINCT_MIN_TOKENS = 32
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s|$)|[。！？][」』”’）)]*")


def repeated_ngram_share(ids: list[int], n: int = REPEAT_NGRAM) -> float:
    """The share of the n-grams of ``ids`` that repeat an earlier one (0.0 with fewer than n ids):
    about (k-1)/k for a text that is k copies of a passage."""
    grams = [tuple(ids[start : start + n]) for start in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def trim_cut(text: str) -> str:
    """``text`` up to and including its last sentence end ("." "!" or "?" with any closing quotes
    or brackets, followed by a space, a line end or the end of the text, so "3.5" is none; or a
    CJK full stop, exclamation or question mark anywhere); "" when it has none. What a sample
    cut by the length limit keeps."""
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()] if ends else ""


def degeneration(new_ids: list[int], text: str, finish: str, *, min_new_tokens: int = 8) -> str | None:
    """None for a good sample, else why it is dropped, the first of:
    "empty": no token or only blank text; "short": fewer than ``min_new_tokens`` tokens;
    "repetition": a loop (``repeated_ngram_share`` above MAX_REPEATED_NGRAM_SHARE, or under
    MIN_DISTINCT_TOKEN_SHARE of the last DISTINCT_WINDOW tokens distinct, in a sample of at least
    DISTINCT_MIN_TOKENS); "cut": ``finish`` is "length" and the text has no sentence end to trim
    back to (``trim_cut``).

    ``new_ids`` and ``text`` are the generation alone (not the prompt, whose sentence ends
    would hide a cut), without the stop token; ``finish`` is "stop" (the teacher ended it) or
    "length" (max_new_tokens reached). A "length" sample that passes keeps ``trim_cut(text)``."""
    if finish not in FINISH_REASONS:
        raise ValueError(f"finish{unknown_value(finish, FINISH_REASONS)}")
    if not new_ids or not text.strip():
        return "empty"
    if len(new_ids) < min_new_tokens:
        return "short"
    tail = new_ids[-DISTINCT_WINDOW:]
    if repeated_ngram_share(new_ids) > MAX_REPEATED_NGRAM_SHARE or (
            len(new_ids) >= DISTINCT_MIN_TOKENS and len(set(tail)) / len(tail) < MIN_DISTINCT_TOKEN_SHARE):
        return "repetition"
    if finish == "length" and not trim_cut(text):
        return "cut"
    return None


@dataclass
class FilterCounts:
    """How many samples were kept and how many each reason dropped."""

    counts: Counter = field(default_factory=Counter)

    def add(self, reason: str | None) -> None:
        """Count one sample: None (``degeneration``'s verdict on a good one) as kept, else its reason."""
        if reason is not None and reason not in DEGENERATION_REASONS:
            raise ValueError(f"filter reason{unknown_value(reason, DEGENERATION_REASONS)}")
        self.counts["kept" if reason is None else reason] += 1

    def as_record(self) -> dict[str, int]:
        """{"kept": n, "empty": n, "short": n, "repetition": n, "cut": n}, zeros included."""
        return {key: self.counts[key] for key in ("kept", *DEGENERATION_REASONS)}
