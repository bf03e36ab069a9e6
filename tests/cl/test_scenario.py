import numpy as np
import pytest

from hdqt.cl.scenario import ClassIncrementalScenario, check_split


def labelled_data(num_classes=6, per_class=5):
    """x[:, 0] holds the ORIGINAL label, so remapping can be checked sample by sample."""
    y = np.repeat(np.arange(num_classes), per_class)
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(y))
    y = y[perm]
    x = np.stack([y.astype(np.float32), rng.normal(size=len(y)).astype(np.float32)], axis=1)
    return x, y, x[: num_classes * 2], y[: num_classes * 2]


def test_tasks_cover_classes_in_shuffled_order():
    x, y, xt, yt = labelled_data()
    sc = ClassIncrementalScenario(x, y, xt, yt, init_classes=2, increment=2, seed=0)
    assert sc.num_tasks == 3 and len(sc.tasks) == 3
    assert sorted(sc.class_order.tolist()) == list(range(6))
    seen = []
    for t, task in enumerate(sc):
        assert task.index == t
        assert task.classes.tolist() == list(range(2 * t, 2 * t + 2))
        assert task.seen_classes.tolist() == list(range(2 * t + 2))
        assert set(task.y_train.tolist()) == set(task.classes.tolist())
        assert len(task.y_train) == 2 * 5
        # class_order[new label] is the original label stored in feature 0
        np.testing.assert_array_equal(sc.class_order[task.y_train], task.x_train[:, 0])
        np.testing.assert_array_equal(sc.class_order[task.y_test], task.x_test[:, 0])
        # test data covers exactly the classes seen so far, all of their samples
        assert set(task.y_test.tolist()) <= set(task.seen_classes.tolist())
        expected = np.isin(yt, sc.class_order[task.seen_classes]).sum()
        assert len(task.y_test) == expected
        seen += task.classes.tolist()
    assert seen == list(range(6))


def test_uneven_first_task_and_task_of_class():
    x, y, xt, yt = labelled_data(num_classes=7)
    sc = ClassIncrementalScenario(x, y, xt, yt, init_classes=3, increment=2, seed=4)
    assert sc.num_tasks == 3
    assert [len(t.classes) for t in sc] == [3, 2, 2]
    assert sc.task_of_class(2) == 0 and sc.task_of_class(3) == 1 and sc.task_of_class(6) == 2
    np.testing.assert_array_equal(sc.task_of_class(np.arange(7)), [0, 0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="0..6"):
        sc.task_of_class(7)


def test_single_task_when_init_takes_all():
    x, y, xt, yt = labelled_data()
    sc = ClassIncrementalScenario(x, y, xt, yt, init_classes=6, increment=3, seed=0)
    assert sc.num_tasks == 1 and len(sc.tasks[0].y_train) == len(y)


def test_order_depends_on_seed_only():
    x, y, xt, yt = labelled_data(num_classes=10)
    a = ClassIncrementalScenario(x, y, xt, yt, 2, 2, seed=7).class_order
    b = ClassIncrementalScenario(x, y, xt, yt, 2, 2, seed=7).class_order
    c = ClassIncrementalScenario(x, y, xt, yt, 2, 2, seed=8).class_order
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("init, inc, message", [
    (2, 3, r"valid increments are \[1, 2, 4\]"),
    (7, 1, "more than the 6 classes"),
    (0, 2, "init_classes must be a positive integer"),
    (2, 0, "increment must be a positive integer"),
    (2, -1, "increment must be a positive integer"),
    (2.0, 2, "init_classes must be a positive integer"),
])
def test_impossible_splits_explain_what_is_valid(init, inc, message):
    x, y, xt, yt = labelled_data()
    with pytest.raises(ValueError, match=message):
        ClassIncrementalScenario(x, y, xt, yt, init, inc, seed=0)


def test_check_split_returns_task_count():
    assert check_split(100, 20, 20) == 5
    assert check_split(19, 3, 2) == 9
    with pytest.raises(ValueError, match="increment"):
        check_split(19, 2, 2)


def test_bad_data_is_rejected():
    x, y, xt, yt = labelled_data()
    with pytest.raises(ValueError, match="classes \\[2\\] have none"):
        ClassIncrementalScenario(x[y != 2], y[y != 2], xt, yt, 1, 1, seed=0)
    with pytest.raises(ValueError, match="one row per label"):
        ClassIncrementalScenario(x[:-1], y, xt, yt, 2, 2, seed=0)
    with pytest.raises(ValueError, match="integer labels"):
        ClassIncrementalScenario(x, y.astype(float), xt, yt, 2, 2, seed=0)
