import itertools

import numpy as np
import pytest

from hdqt.cl.memory import ExemplarMemory, herding_order, l2_normalize


def identity(x):
    return np.asarray(x, dtype=np.float64)


def class_data(labels, per_class=12, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.asarray(labels), per_class)
    x = rng.normal(size=(len(y), dim)) + y[:, None]
    return x, y


def brute_force_herding(features, count):
    """Greedy herding spelled out: at each step try every unused sample."""
    feats = l2_normalize(features)
    mu = feats.mean(axis=0)
    chosen = []
    for _ in range(count):
        best, best_err = None, np.inf
        for i in range(len(feats)):
            if i in chosen:
                continue
            err = np.linalg.norm(mu - feats[chosen + [i]].mean(axis=0))
            if err < best_err:
                best, best_err = i, err
        chosen.append(best)
    return chosen


def subset_error(features, subset):
    feats = l2_normalize(features)
    return np.linalg.norm(feats.mean(axis=0) - feats[list(subset)].mean(axis=0))


def test_herding_matches_brute_force_greedy():
    feats = np.random.default_rng(3).normal(size=(9, 4))
    assert herding_order(feats, 6).tolist() == brute_force_herding(feats, 6)


@pytest.mark.parametrize("seed", range(4))
def test_herding_first_pick_is_optimal_and_subsets_beat_random_ones(seed):
    feats = np.random.default_rng(seed).normal(size=(10, 3)) + 0.5
    order = herding_order(feats, 4)
    singles = [subset_error(feats, [i]) for i in range(10)]
    assert order[0] == int(np.argmin(singles))  # one exemplar: greedy is the optimum
    for k in (2, 3, 4):
        errors = np.array([subset_error(feats, s)
                           for s in itertools.combinations(range(10), k)])
        herd = subset_error(feats, order[:k])
        # Greedy is not always optimal, but it approximates the mean better than at
        # least two thirds of all k-subsets (a random pick is at the median).
        assert np.mean(errors < herd) < 1 / 3


def test_herding_takes_all_when_class_is_small_and_never_repeats():
    feats = np.random.default_rng(0).normal(size=(4, 3))
    order = herding_order(feats, 10)
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    assert subset_error(feats, order) == pytest.approx(0.0, abs=1e-12)


def test_budget_is_shared_and_shrinks_keeping_the_first_exemplars():
    mem = ExemplarMemory(20, "herding")
    x, y = class_data([0, 1])
    mem.update(x, y, identity, seed=0)
    assert len(mem) == 20 and [len(mem.exemplars(c)) for c in (0, 1)] == [10, 10]
    first = {c: mem.exemplars(c).copy() for c in (0, 1)}
    x2, y2 = class_data([2, 3], seed=1)
    mem.update(x2, y2, identity, seed=1)
    assert mem.classes == [0, 1, 2, 3]
    assert [len(mem.exemplars(c)) for c in range(4)] == [5, 5, 5, 5]
    for c in (0, 1):  # iCaRL's ReduceExemplarSet: the herding prefix survives
        np.testing.assert_array_equal(mem.exemplars(c), first[c][:5])
    x_all, y_all = mem.data()
    assert len(x_all) == 20 and np.bincount(y_all).tolist() == [5, 5, 5, 5]


def test_herding_memory_holds_the_herding_choice():
    x, y = class_data([0], per_class=15)
    mem = ExemplarMemory(4, "herding")
    mem.update(x, y, identity, seed=0)
    np.testing.assert_array_equal(mem.exemplars(0), x[herding_order(x, 4)])


def test_random_selection_is_seeded():
    x, y = class_data([0, 1])
    picks = []
    for seed in (0, 0, 1):
        mem = ExemplarMemory(8, "random")
        mem.update(x, y, identity, seed=seed)
        picks.append(mem.exemplars(0))
    np.testing.assert_array_equal(picks[0], picks[1])
    assert not np.array_equal(picks[0], picks[2])


def test_nme_uses_unit_norm_exemplar_means():
    x = np.array([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 3.0]])
    y = np.array([0, 0, 1, 1])
    mem = ExemplarMemory(4)
    mem.update(x, y, identity, seed=0)
    labels, means = mem.class_means()
    assert labels.tolist() == [0, 1]
    np.testing.assert_allclose(np.linalg.norm(means, axis=1), 1.0)
    expected0 = l2_normalize(x[:2]).mean(axis=0)
    np.testing.assert_allclose(means[0], expected0 / np.linalg.norm(expected0))
    queries = np.array([[5.0, 0.5], [0.2, 4.0], [3.0, 2.0]])
    assert mem.nme_predict(queries).tolist() == [0, 1, 0]


def test_errors_and_state_round_trip():
    with pytest.raises(ValueError, match="selection must be one of"):
        ExemplarMemory(10, "kmeans")
    with pytest.raises(ValueError, match="budget"):
        ExemplarMemory(-1)
    mem = ExemplarMemory(3)
    x, y = class_data([0, 1, 2, 3])
    with pytest.raises(ValueError, match="at least 4"):
        mem.update(x, y, identity, seed=0)
    mem = ExemplarMemory(6)
    mem.update(x[y < 2], y[y < 2], identity, seed=0)
    with pytest.raises(ValueError, match="already in memory"):
        mem.update(x[y < 2], y[y < 2], identity, seed=0)
    other = ExemplarMemory(6)
    other.load_state_dict(mem.state_dict())
    np.testing.assert_array_equal(other.data()[0], mem.data()[0])
    np.testing.assert_array_equal(other.nme_predict(x), mem.nme_predict(x))
    with pytest.raises(ValueError, match="budget=6"):
        ExemplarMemory(7).load_state_dict(mem.state_dict())
