"""An embedded default corpus, generated procedurally so that training needs no download and no data files.

Document ``i`` of seed ``s`` depends only on ``(s, i)``, so corpora of different sizes share their prefixes and a
validation split taken from the tail never overlaps the training documents. Each document is a few sections,
each of one of four kinds, chosen so that a tiny byte-level model has plenty to learn beyond unigram
statistics, at several difficulties:

* stories: a small grammar ("the quick fox sees the old tree.") plus a cast of names and objects that the
  document keeps repeating, with bookkeeping whose answers follow from earlier lines (copying, in-context facts);
* arithmetic: ``12 + 7 = 19`` style facts over small numbers (deterministic answers, memorisable tables);
* code: tiny Python functions whose names are reused in calls, with the printed result as a comment;
* sequences: counting up or down, and spelling words letter by letter (pure algorithmic continuation).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

_NAMES = ("ada", "bob", "cyd", "dan", "eve", "fay", "gus", "hal", "ivy", "joe", "kim", "lea", "max", "ned")
_ADJS = ("big", "small", "red", "old", "new", "quick", "lazy", "happy", "green", "tiny", "brave", "quiet")
_NOUNS = ("fox", "dog", "cat", "bird", "tree", "house", "river", "stone", "robot", "ship", "lamp", "book")
_VERBS = ("sees", "likes", "finds", "helps", "follows", "paints", "moves", "hears", "builds", "cleans")
_ITEMS = ("apple", "pear", "coin", "shell", "card", "key", "cup", "ball")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_FUNC_VERBS = ("add", "mix", "scale", "join", "shift", "merge", "count", "fold")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    # Indexing a tuple is ~20x faster than rng.choice, which converts the options to an array on every call.
    return options[int(rng.integers(len(options)))]


def _story(rng: np.random.Generator) -> list[str]:
    cast = [_NAMES[i] for i in rng.permutation(len(_NAMES))[:3]]
    item = _pick(rng, _ITEMS)
    have = {name: int(rng.integers(1, 10)) for name in cast}
    lines = [f"{name} has {have[name]} {item}s." for name in cast]
    for _ in range(int(rng.integers(3, 8))):
        if rng.random() < 0.5:
            a, n1, v, n2 = (_pick(rng, w) for w in (_ADJS, _NOUNS, _VERBS, _NOUNS))
            lines.append(f"the {a} {n1} {v} the {n2}.")
            continue
        giver, taker = (cast[i] for i in rng.permutation(3)[:2])
        k = int(rng.integers(0, have[giver] + 1))
        have[giver] -= k
        have[taker] += k
        # The "now" line is implied by the document so far: learnable by tracking the counts in context.
        lines.append(
            f"{giver} gives {k} {item}s to {taker}. now {giver} has {have[giver]} and {taker} has {have[taker]}."
        )
    return lines


def _arithmetic(rng: np.random.Generator) -> list[str]:
    lines = []
    for _ in range(int(rng.integers(4, 12))):
        op = _pick(rng, tuple(_OPS))
        hi = 10 if op == "*" else 50
        a, b = int(rng.integers(0, hi)), int(rng.integers(0, hi))
        lines.append(f"{a} {op} {b} = {_OPS[op](a, b)}")
    return lines


def _code(rng: np.random.Generator) -> list[str]:
    name = f"{_pick(rng, _FUNC_VERBS)}_{_pick(rng, _NOUNS)}"
    op = _pick(rng, tuple(_OPS))
    lines = [f"def {name}(x, y):", f"    z = x {op} y", "    return z", ""]
    for _ in range(int(rng.integers(1, 4))):
        a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
        lines += [f"print({name}({a}, {b}))", f"# {_OPS[op](a, b)}"]
    return lines


def _sequence(rng: np.random.Generator) -> list[str]:
    if rng.random() < 0.5:
        word = _pick(rng, _NOUNS + _ADJS + _ITEMS)
        return [f"spell {word}: {' '.join(word)}"]
    start, length = int(rng.integers(0, 90)), int(rng.integers(4, 10))
    if rng.random() < 0.5:
        return ["count up: " + " ".join(str(start + i) for i in range(length))]
    return ["count down: " + " ".join(str(start + length - i) for i in range(length))]


_SECTIONS = (_story, _arithmetic, _code, _sequence)


def generate_document(index: int, seed: int = 0) -> str:
    """Document ``index`` of the corpus with ``seed``: 2 to 5 sections of random kinds, blank-line separated."""
    rng = np.random.default_rng([seed, index])
    sections = [_SECTIONS[int(rng.integers(len(_SECTIONS)))](rng) for _ in range(int(rng.integers(2, 6)))]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def default_corpus(num_docs: int = 4096, seed: int = 0) -> list[str]:
    """The embedded corpus: ``num_docs`` documents, deterministic in ``seed``.

    Documents average about 430 bytes, so the default size is about 1.8 MB (1.8M byte-level tokens).
    """
    return [generate_document(i, seed) for i in range(num_docs)]


def train_validation_split(docs: Sequence[str], validation_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Splits off the last ``validation_fraction`` of ``docs`` (at least one) as the validation set.

    Documents are independent draws, so the tail is as good a sample as any and the split needs no randomness.
    """
    if not 0.0 < validation_fraction < 1.0 or len(docs) < 2:
        raise ValueError(f"need 0 < validation_fraction < 1 and >= 2 docs, got {validation_fraction}, {len(docs)}")
    n_val = max(1, round(len(docs) * validation_fraction))
    return list(docs[:-n_val]), list(docs[-n_val:])


def unigram_entropy(token_lists: Iterable[Iterable[int]]) -> float:
    """Entropy of the empirical token distribution, in nats per token.

    It is the cross-entropy of the best model that ignores context, so a language model whose loss falls
    clearly below it has learned something from context.
    """
    counts: Counter[int] = Counter()
    for tokens in token_lists:
        counts.update(int(t) for t in tokens)
    total = sum(counts.values())
    if total == 0:
        raise ValueError("unigram_entropy needs at least one token")
    return -sum(c / total * math.log(c / total) for c in counts.values())
