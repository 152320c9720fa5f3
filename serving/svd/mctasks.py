"""Multiple-choice tasks generated in code (no data set downloads): the bench's tasks and the
tests' examples. Every item is a prompt, options that each start with a space, and the index
of the right option; a train example is {"prompt", "target"} with the right option as target.
Splits are disjoint by prompt and fixed by the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class MCItem:
    prompt: str
    options: tuple[str, ...]
    answer: int

    def as_example(self) -> dict:
        return {"prompt": self.prompt, "target": self.options[self.answer]}


def _compare(rng: random.Random) -> MCItem:
    a, b = rng.sample(range(10, 1000), 2)
    return MCItem(f"Question: Which number is larger, {a} or {b}?\nAnswer:", (f" {a}", f" {b}"), 0 if a > b else 1)


def _parity(rng: random.Random) -> MCItem:
    n = rng.randrange(10, 100000)
    return MCItem(f"Question: Is {n} an odd or an even number?\nAnswer:", (" odd", " even"), n % 2)


def _addition(rng: random.Random) -> MCItem:
    a, b = rng.randrange(10, 500), rng.randrange(10, 500)
    right = a + b
    options = [right, right + 10, right - 10, right + 1]
    rng.shuffle(options)
    return MCItem(f"Question: What is {a} + {b}?\nAnswer:", tuple(f" {x}" for x in options), options.index(right))


GENERATORS = {"compare": _compare, "parity": _parity, "addition": _addition}


def make_task(name: str, n_train: int, n_calib: int, n_test: int, seed: int = 0) -> dict[str, list[MCItem]]:
    """{"train", "calib", "test"} lists of distinct items of task `name`."""
    if name not in GENERATORS:
        raise ValueError(f"unknown MC task {name!r}; choose one of: {', '.join(GENERATORS)}")
    rng = random.Random(f"{name}:{seed}")
    seen, items = set(), []
    total = n_train + n_calib + n_test
    for _ in range(100 * total):
        item = GENERATORS[name](rng)
        if item.prompt not in seen:
            seen.add(item.prompt)
            items.append(item)
        if len(items) == total:
            break
    else:
        raise ValueError(f"task {name!r} cannot give {total} distinct items")
    return {"train": items[:n_train], "calib": items[n_train:n_train + n_calib], "test": items[n_train + n_calib:]}
