"""Partitioners and loaders (no Ray)."""

import gzip
import pickle

import numpy as np
import pytest

from edgeray.errors import UserError
from pipelines.data import label_histogram, format_histogram, load_dataset, load_mnist, partition, plot_histogram


@pytest.fixture(scope="module")
def labels():
    return load_dataset("digits").y_train


def _check_disjoint_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n


def test_iid_equal_disjoint_and_seeded(labels):
    parts = partition(labels, 10, "iid", seed=1)
    _check_disjoint_cover(parts, len(labels))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    again = partition(labels, 10, "iid", seed=1)
    other = partition(labels, 10, "iid", seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_min_size_and_skew(labels):
    skewed = partition(labels, 10, "dirichlet", seed=0, alpha=0.1, min_size=20)
    flat = partition(labels, 10, "dirichlet", seed=0, alpha=100.0, min_size=20)
    _check_disjoint_cover(skewed, len(labels))
    assert min(map(len, skewed)) >= 20

    def mean_max_share(parts):
        hist = label_histogram(labels, parts, 10)
        return float((hist.max(1) / hist.sum(1)).mean())

    # small alpha: each client dominated by few labels; large alpha: close to uniform (0.1 each)
    assert mean_max_share(skewed) > 0.4 > 0.2 > mean_max_share(flat)


def test_shards_limit_labels_per_client(labels):
    parts = partition(labels, 20, "shards", seed=0, shards_per_client=2)
    _check_disjoint_cover(parts, len(labels))
    hist = label_histogram(labels, parts, 10)
    # a shard of a label-sorted array spans at most 2 labels, so 2 shards give at most 4
    assert ((hist > 0).sum(1) <= 4).all()
    assert (hist > 0).sum(1).mean() < 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_clients=5, scheme="dirichlet", alpha=0.0), "alpha=0.0 must be > 0"),
    (dict(num_clients=5, scheme="dirichlet", alpha=-1.0), "alpha=-1.0 must be > 0"),
    (dict(num_clients=10_000, scheme="iid"), "more than the 1437 training samples"),
    (dict(num_clients=5, scheme="random"), "unknown partition 'random'; choose one of: iid, dirichlet, shards"),
    (dict(num_clients=200, scheme="dirichlet", min_size=10), "exceeds the 1437 samples"),
    (dict(num_clients=0, scheme="iid"), "num_clients=0 must be >= 1"),
])
def test_partition_bad_input(labels, kwargs, message):
    with pytest.raises(UserError) as err:
        partition(labels, **kwargs)
    assert message in str(err.value)


def test_histogram_text_and_plot(labels, tmp_path):
    parts = partition(labels, 30, "iid", seed=0)
    hist = label_histogram(labels, parts, 10)
    assert hist.shape == (30, 10) and hist.sum() == len(labels)
    text = format_histogram(hist, max_rows=5)
    assert "... 25 more clients" in text and text.splitlines()[0].startswith("client")
    plot_histogram(hist, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_digits_shapes():
    d = load_dataset("digits")
    assert d.x_train.shape[1:] == (1, 8, 8) and d.x_train.dtype == np.float32
    assert len(d.y_train) + len(d.y_test) == 1797 and d.info["num_classes"] == 10


def test_mnist_missing_and_tampered(tmp_path):
    with pytest.raises(UserError, match="run scripts/setup.sh"):
        load_mnist(tmp_path / "mnist.pkl.gz")
    fake = tmp_path / "mnist.pkl.gz"
    with gzip.open(fake, "wb") as f:
        pickle.dump(((1, 2), (3, 4), (5, 6)), f)
    with pytest.raises(UserError, match="has sha256"):
        load_mnist(fake)
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("cifar")


def test_mnist_real_file_if_fetched():
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "data" / "mnist.pkl.gz"
    if not path.is_file():
        pytest.skip("data/mnist.pkl.gz not fetched (scripts/setup.sh fetches it)")
    d = load_mnist(path)
    assert d.x_train.shape == (50000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.info["num_classes"] == 10 and 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0


def test_text_bytes_are_sequences_with_one_group_per_file(tmp_path):
    for i, text in enumerate(["alpha " * 40, "beta gamma " * 30, "delta " * 50]):
        (tmp_path / f"doc{i}.txt").write_text(text)
    d = load_dataset("text-bytes", str(tmp_path), 0, {"seq_len": 16, "pattern": "*.txt"})
    assert d.x_train.dtype == np.int64 and d.x_train.shape[1] == 16 and d.info == {"vocab_size": 256, "seq_len": 16}
    assert sorted(np.unique(d.groups)) == [0, 1, 2] and len(d.groups) == len(d.x_train)
    assert bytes(d.x_train[d.groups == 1][0].astype(np.uint8)).decode() in ("beta gamma " * 30)
    parts = partition(d.y_train, 3, "groups", seed=0, groups=d.groups)
    assert sorted(len(np.unique(d.groups[p])) for p in parts) == [1, 1, 1]   # each client: one whole file
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(d.x_train)))
    with pytest.raises(UserError, match="4 clients but only 3 groups"):
        partition(d.y_train, 4, "groups", seed=0, groups=d.groups)
    with pytest.raises(UserError, match="splits by class label"):
        partition(d.y_train, 2, "dirichlet", seed=0)
    with pytest.raises(UserError, match="takes data.args seq_len, test_fraction, pattern; got sequence_length"):
        load_dataset("text-bytes", str(tmp_path), 0, {"sequence_length": 16})


def test_default_text_corpus_ships_with_scikit_learn():
    d = load_dataset("text-bytes")
    assert len(np.unique(d.groups)) >= 10 and len(d.x_test) > 0
