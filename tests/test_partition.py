import numpy as np
import pytest

from fedpft_dist.config import load_config
from fedpft_dist.data.partition import (apply_size_imbalance, dirichlet, iid, label_skew, labels_per_client,
                                        partition)
from fedpft_dist.data.tasks import split_clients
from fedpft_dist.errors import ConfigError

NUM_CLASSES = 10
# 10 classes of unequal size (40..130 samples), interleaved as a real data set would be.
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(NUM_CLASSES), np.arange(4, 14) * 10)).tolist()
N = len(LABELS)

SCHEMES = [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("dirichlet", {"alpha": 100.0}),
           ("labels", {"k": 2}), ("labels", {"k": 3})]


def assert_exact_cover(parts, n=N):
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n)), "every sample must be assigned exactly once"
    assert all(part == sorted(part) for part in parts)
    assert all(isinstance(i, int) for i in flat)


@pytest.mark.parametrize("scheme,kwargs", SCHEMES)
@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_every_sample_assigned_once(scheme, kwargs, sigma):
    parts = partition(LABELS, 12, scheme, seed=3, size_sigma=sigma, **kwargs)
    assert len(parts) == 12
    assert_exact_cover(parts)
    assert min(len(p) for p in parts) >= 1


@pytest.mark.parametrize("scheme,kwargs", SCHEMES)
def test_same_seed_same_split_other_seed_other_split(scheme, kwargs):
    a = partition(LABELS, 8, scheme, seed=5, size_sigma=0.5, **kwargs)
    assert partition(LABELS, 8, scheme, seed=5, size_sigma=0.5, **kwargs) == a
    assert partition(LABELS, 8, scheme, seed=6, size_sigma=0.5, **kwargs) != a


def test_iid_sizes_differ_by_at_most_one():
    parts = iid(LABELS, 7, seed=1)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert label_skew(parts, LABELS, NUM_CLASSES) < 0.15


def test_skew_grows_as_alpha_falls():
    def mean_skew(alpha):
        return np.mean([label_skew(dirichlet(LABELS, 10, alpha, seed), LABELS, NUM_CLASSES) for seed in range(3)])

    low, mid, high = mean_skew(0.1), mean_skew(1.0), mean_skew(100.0)
    assert low > mid > high
    assert low > 0.5 and high < 0.15


def test_dirichlet_min_size_and_errors():
    parts = dirichlet(LABELS, 20, 0.1, seed=0, min_size=10)
    assert min(len(p) for p in parts) >= 10
    assert_exact_cover(parts)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(LABELS, 4, 0.0, seed=0)
    with pytest.raises(ValueError, match="cannot give 10 clients 100 samples"):
        dirichlet(LABELS, 10, 0.5, seed=0, min_size=100)
    # Feasible in principle, but with alpha this small one client nearly always ends up short.
    with pytest.raises(ValueError, match="no split giving all 10 clients >= 3 samples"):
        dirichlet([0] * 20 + [1] * 20, 10, 0.001, seed=0, min_size=3)


@pytest.mark.parametrize("k", [1, 2, 3, NUM_CLASSES])
def test_labels_per_client_gives_exactly_k_labels(k):
    labels = np.asarray(LABELS)
    parts = labels_per_client(LABELS, 15, k, seed=2)
    assert_exact_cover(parts)
    assert all(len(set(labels[p].tolist())) == k for p in parts)
    # Each label's samples are split evenly among its holders.
    for c in range(NUM_CLASSES):
        shares = [int((labels[p] == c).sum()) for p in parts if (labels[p] == c).any()]
        assert max(shares) - min(shares) <= 1


def test_labels_per_client_errors():
    with pytest.raises(ValueError, match="k must be in"):
        labels_per_client(LABELS, 10, NUM_CLASSES + 1, seed=0)
    with pytest.raises(ValueError, match="num_clients \\* k >= 10"):
        labels_per_client(LABELS, 4, 2, seed=0)
    with pytest.raises(ValueError, match="label 1 has 1 samples for 2 clients"):
        labels_per_client([0, 0, 1], 2, 2, seed=0)


def test_size_imbalance_spreads_sizes_and_keeps_samples():
    base = iid(LABELS, 10, seed=0)
    mild, strong = apply_size_imbalance(base, 0.2, seed=0), apply_size_imbalance(base, 2.0, seed=0)
    for parts in (mild, strong):
        assert_exact_cover(parts)
        assert min(len(p) for p in parts) >= 1
    spread = [np.std([len(p) for p in parts]) for parts in (base, mild, strong)]
    assert spread[0] < spread[1] < spread[2]
    assert apply_size_imbalance(base, 0.0, seed=0) == base
    with pytest.raises(ValueError, match="sigma"):
        apply_size_imbalance(base, -1.0, seed=0)


def test_size_imbalance_keeps_label_skew():
    skewed = labels_per_client(LABELS, 10, 1, seed=0)
    resized = apply_size_imbalance(skewed, 1.0, seed=0)
    assert label_skew(resized, LABELS, NUM_CLASSES) > 0.6


def test_label_skew_extremes():
    labels = [0, 0, 1, 1]
    assert label_skew([[0, 2], [1, 3]], labels, 2) == 0.0
    assert label_skew([[0, 1], [2, 3]], labels, 2) == 0.5
    with pytest.raises(ValueError, match="labels must be in"):
        label_skew([[0]], [2], 2)


def test_partition_errors():
    with pytest.raises(ValueError, match="unknown partition scheme 'shards'"):
        partition(LABELS, 4, "shards", seed=0)
    with pytest.raises(ValueError, match="cannot split 3 samples among 4 clients"):
        partition([0, 1, 0], 4, "iid", seed=0)
    with pytest.raises(ValueError, match="num_clients must be >= 1"):
        iid(LABELS, 0, seed=0)


# ---- the tasks' split: impossible settings are config errors naming the key


def fed(*overrides):
    return load_config(None, list(overrides)).fed


SMALL = [i % 3 for i in range(120)]  # 3 classes of 40


def test_split_clients_is_partition():
    for overrides, kwargs in (((), {}), (("fed.partition=dirichlet", "fed.alpha=0.3", "fed.size_sigma=1"),
                                          {"alpha": 0.3, "size_sigma": 1.0}),
                              (("fed.partition=labels", "fed.labels_per_client=3"), {"k": 3})):
        cfg = fed("fed.num_clients=12", *overrides)
        assert split_clients(LABELS, cfg, 4) == partition(LABELS, 12, cfg.partition, 4, **kwargs)


def test_impossible_dirichlet_split_names_fed_alpha():
    with pytest.raises(ConfigError) as info:
        split_clients(SMALL, fed("fed.partition=dirichlet", "fed.alpha=0.01", "fed.num_clients=100"), 0)
    assert info.value.key == "fed.alpha"
    assert str(info.value) == ("fed.alpha: dirichlet partition (alpha=0.01) found no split giving all 100 clients "
                               ">= 1 samples in 1000 draws; raise alpha or lower num_clients or min_size")


@pytest.mark.parametrize("overrides, pattern", [
    (("fed.labels_per_client=4", "fed.num_clients=10"),
     r"labels-per-client k must be in \[1, 3\] \(the number of classes\), got 4"),
    # 200 label slots dealt over 3 classes: 66 or 67 holders for 40 samples each
    (("fed.labels_per_client=2", "fed.num_clients=100"),
     r"labels-per-client: label \d has 40 samples for 6[67] clients; lower num_clients or k"),
])
def test_impossible_labels_split_names_fed_labels_per_client(overrides, pattern):
    with pytest.raises(ConfigError, match=rf"^fed\.labels_per_client: {pattern}$") as info:
        split_clients(SMALL, fed("fed.partition=labels", *overrides), 0)
    assert info.value.key == "fed.labels_per_client"


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "labels"])
def test_more_clients_than_samples_names_fed_num_clients(scheme):
    with pytest.raises(ConfigError) as info:
        split_clients(SMALL, fed(f"fed.partition={scheme}", "fed.num_clients=121", "fed.size_sigma=1"), 0)
    assert str(info.value) == "fed.num_clients: 121 clients but only 120 training examples"
