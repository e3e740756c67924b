"""Tests for fedsparse.data.partition: structure and statistical properties."""

import numpy as np
import pytest

# Imported from the module: the package re-exports the function `partition` under the
# module's own name.
from fedsparse.data.partition import PARTITIONERS
from fedsparse.data.partition import partition

NUM_CLASSES = 10


@pytest.fixture(scope='module')
def labels():
  """6,000 labels, 10 classes of slightly different sizes, in shuffled order."""
  rng = np.random.default_rng(123)
  counts = 600 + np.arange(NUM_CLASSES) * 4 - 18  # 582 .. 618, sums to 6000.
  return rng.permutation(np.repeat(np.arange(NUM_CLASSES), counts))


def _hist(labels, idx):
  return np.bincount(labels[idx], minlength=NUM_CLASSES) / len(idx)


def _tv(p, q):
  return 0.5 * np.abs(p - q).sum()


def _classes_for_90pct(labels, idx):
  """Smallest number of classes holding 90% of a client's examples."""
  share = np.sort(_hist(labels, idx))[::-1]
  return int(np.searchsorted(np.cumsum(share), 0.9 - 1e-9) + 1)


def _expected_covered(labels, method, num_clients, part, shards_per_client=2):
  n = labels.size
  if method == 'dirichlet_balanced':
    return n - n % num_clients
  if method == 'shards':
    return n - n % (num_clients * shards_per_client)
  if method == 'classes':
    # Every example of a class that was dealt to some client (all classes once
    # num_clients * classes_per_client >= NUM_CLASSES).
    dealt = np.unique(labels[np.concatenate(part.client_indices)])
    assert dealt.size == min(NUM_CLASSES, 2 * num_clients)
    return int(np.isin(labels, dealt).sum())
  return n


@pytest.mark.parametrize('method', PARTITIONERS)
@pytest.mark.parametrize('num_clients', [1, 7, 30])
def test_disjoint_in_range_and_covering(labels, method, num_clients):
  part = partition(labels, num_clients, method, seed=0)
  assert len(part.client_indices) + part.dropped_clients == num_clients
  flat = np.concatenate(part.client_indices)
  assert flat.dtype == np.int64
  assert np.unique(flat).size == flat.size, 'clients share examples'
  assert flat.min() >= 0 and flat.max() < labels.size
  assert flat.size == _expected_covered(labels, method, num_clients, part)
  for idx in part.client_indices:
    assert idx.size > 0
    assert np.all(np.diff(idx) > 0), 'indices are not sorted'


def test_iid_sizes_and_class_mix(labels):
  part = partition(labels, 10, 'iid', seed=0)
  sizes = [len(idx) for idx in part.client_indices]
  assert max(sizes) - min(sizes) <= 1
  glob = np.bincount(labels) / labels.size
  # 600 examples per client: sampling noise alone gives a TV distance around 0.05.
  tvs = [_tv(_hist(labels, idx), glob) for idx in part.client_indices]
  assert max(tvs) < 0.1
  chi2 = [np.sum((_hist(labels, idx) - glob) ** 2 / glob) * len(idx)
          for idx in part.client_indices]
  # chi-square with 9 degrees of freedom: its 99.9% quantile is 27.9.
  assert max(chi2) < 27.9


def test_iid_uneven_remainder():
  part = partition(np.zeros(10, np.int64), 3, 'iid', seed=0)
  assert sorted(len(i) for i in part.client_indices) == [3, 3, 4]


def test_dirichlet_balanced_equal_sizes(labels):
  part = partition(labels, 23, 'dirichlet_balanced', seed=1, alpha=0.1)
  assert {len(idx) for idx in part.client_indices} == {labels.size // 23}
  assert part.dropped_clients == 0


def test_dirichlet_balanced_skew_decreases_with_alpha(labels):
  glob = np.bincount(labels) / labels.size
  mean_classes, mean_tv = [], []
  for alpha in (0.1, 1.0, 10.0, 1000.0):
    part = partition(labels, 20, 'dirichlet_balanced', seed=0, alpha=alpha)
    mean_classes.append(np.mean([_classes_for_90pct(labels, i) for i in part.client_indices]))
    mean_tv.append(np.mean([_tv(_hist(labels, i), glob) for i in part.client_indices]))
  # alpha 0.1: a handful of classes per client; alpha 1000: essentially IID (9 of 10).
  assert mean_classes[0] < 4
  assert mean_classes[-1] >= 8.5
  assert mean_classes[0] < mean_classes[-1] / 2
  assert all(a > b for a, b in zip(mean_tv, mean_tv[1:])), mean_tv
  assert mean_tv[-1] < 0.1


def test_dirichlet_balanced_uses_every_example_once_when_divisible(labels):
  part = partition(labels, 20, 'dirichlet_balanced', seed=3, alpha=0.05)
  flat = np.concatenate(part.client_indices)
  np.testing.assert_array_equal(np.sort(flat), np.arange(labels.size))


def test_dirichlet_sizes_uneven_at_small_alpha(labels):
  def cv(alpha):
    part = partition(labels, 50, 'dirichlet', seed=0, alpha=alpha)
    sizes = np.array([len(i) for i in part.client_indices] + [0] * part.dropped_clients)
    return sizes.std() / sizes.mean()
  # A client's size is 600 * sum_c q_ck over 10 classes with q_c ~ Dir(alpha 1_50): its
  # coefficient of variation is about sqrt(50 / (50 alpha + 1) / 10), 0.91 at alpha 0.1 and
  # 0.03 at alpha 100.
  assert cv(0.1) > 0.5
  assert cv(100.0) < 0.1


def test_dirichlet_drops_empty_clients(labels):
  part = partition(labels, 300, 'dirichlet', seed=0, alpha=0.01)
  assert part.dropped_clients > 0
  assert len(part.client_indices) + part.dropped_clients == 300
  assert all(len(i) > 0 for i in part.client_indices)
  assert sum(len(i) for i in part.client_indices) == labels.size


@pytest.mark.parametrize('c', [1, 2, 3, 10])
def test_classes_exactly_c_labels(labels, c):
  num_clients = 25
  part = partition(labels, num_clients, 'classes', seed=0, classes_per_client=c)
  assert len(part.client_indices) == num_clients
  held = [np.unique(labels[idx]) for idx in part.client_indices]
  assert all(h.size == c for h in held)
  # Classes are dealt evenly: each is held by floor or ceil of C * c / K clients.
  holders = np.bincount(np.concatenate(held), minlength=NUM_CLASSES)
  assert holders.max() - holders.min() <= 1
  assert holders.sum() == num_clients * c


def test_classes_too_many_holders_fails():
  labels = np.repeat(np.arange(3), [50, 50, 2])
  with pytest.raises(ValueError, match='class 2 has 2 examples'):
    partition(labels, 30, 'classes', seed=0, classes_per_client=1)


@pytest.mark.parametrize('bad', [0, 11, -1, 2.5])
def test_classes_per_client_range(labels, bad):
  with pytest.raises(ValueError, match=r'\[1, 10\]'):
    partition(labels, 5, 'classes', seed=0, classes_per_client=bad)


@pytest.mark.parametrize('s', [1, 2, 3])
def test_shards_equal_sizes_few_labels(labels, s):
  num_clients = 40
  part = partition(labels, num_clients, 'shards', seed=0, shards_per_client=s)
  shard = labels.size // (num_clients * s)
  assert {len(idx) for idx in part.client_indices} == {shard * s}
  # A shard (150/100/50 examples) is smaller than any class (>= 582), so it spans at most
  # two labels.
  assert max(np.unique(labels[idx]).size for idx in part.client_indices) <= 2 * s
  if s == 1:
    # Most single shards lie inside one class.
    assert np.mean([np.unique(labels[i]).size == 1 for i in part.client_indices]) > 0.7


def test_shards_fewer_examples_than_shards():
  with pytest.raises(ValueError, match='fewer examples than shards'):
    partition(np.zeros(10, np.int64), 6, 'shards', seed=0, shards_per_client=2)


@pytest.mark.parametrize('method', PARTITIONERS)
def test_determinism(labels, method):
  a = partition(labels, 12, method, seed=7, alpha=0.3)
  b = partition(labels, 12, method, seed=7, alpha=0.3)
  c = partition(labels, 12, method, seed=8, alpha=0.3)
  assert a.dropped_clients == b.dropped_clients
  assert len(a.client_indices) == len(b.client_indices)
  for x, y in zip(a.client_indices, b.client_indices):
    np.testing.assert_array_equal(x, y)
  same = len(a.client_indices) == len(c.client_indices) and all(
      np.array_equal(x, y) for x, y in zip(a.client_indices, c.client_indices))
  assert not same


def test_non_contiguous_labels():
  labels = np.repeat(np.array([3, 7]), 50)
  part = partition(labels, 10, 'classes', seed=0, classes_per_client=1)
  assert all(np.unique(labels[i]).size == 1 for i in part.client_indices)
  part = partition(labels, 10, 'dirichlet_balanced', seed=0, alpha=1.0)
  assert {len(i) for i in part.client_indices} == {10}


def test_unknown_method_lists_choices(labels):
  with pytest.raises(ValueError) as err:
    partition(labels, 5, 'pathological', seed=0)
  for name in PARTITIONERS:
    assert name in str(err.value)


@pytest.mark.parametrize('method', PARTITIONERS)
def test_fewer_examples_than_clients(method):
  with pytest.raises(ValueError, match='fewer examples than clients'):
    partition(np.arange(5) % 2, 6, method, seed=0)


@pytest.mark.parametrize('num_clients', [0, -3, 2.0, True])
def test_bad_num_clients(labels, num_clients):
  with pytest.raises(ValueError, match='num_clients'):
    partition(labels, num_clients, 'iid', seed=0)


@pytest.mark.parametrize('method', ['dirichlet', 'dirichlet_balanced'])
@pytest.mark.parametrize('alpha', [0.0, -1.0, float('nan'), float('inf')])
def test_bad_alpha(labels, method, alpha):
  with pytest.raises(ValueError, match='alpha'):
    partition(labels, 5, method, seed=0, alpha=alpha)


def test_bad_labels():
  with pytest.raises(ValueError, match='1-D integer'):
    partition(np.zeros((4, 2), np.int64), 2, 'iid', seed=0)
  with pytest.raises(ValueError, match='1-D integer'):
    partition(np.zeros(4, np.float32), 2, 'iid', seed=0)
  with pytest.raises(ValueError, match='non-negative'):
    partition(np.array([0, -1, 2]), 2, 'iid', seed=0)


def test_large_population_costs_little():
  # 10^5 clients over 3 * 10^5 examples: the vectorised partitioners stay well under a second.
  labels = np.random.default_rng(0).integers(0, 10, 300_000)
  for method in ('iid', 'dirichlet', 'classes', 'shards'):
    part = partition(labels, 100_000, method, seed=0)
    assert len(part.client_indices) + part.dropped_clients == 100_000
