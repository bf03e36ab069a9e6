import math

import numpy as np
import pytest

from hdqt.cl import metrics

NAN = np.nan
# After task 0: 90 on task 0. After task 1: 95 / 80. After task 2: 60 / 70 / 85.
A = np.array([[90, NAN, NAN],
              [95, 80, NAN],
              [60, 70, 85]], dtype=float)


def test_forgetting_uses_best_earlier_accuracy():
    # task 0: max(90, 95) - 60 = 35; task 1: 80 - 70 = 10 -> mean 22.5
    assert metrics.forgetting(A) == pytest.approx(22.5)


def test_backward_transfer_uses_accuracy_right_after_learning():
    # (60 - 90 + 70 - 80) / 2 = -20
    assert metrics.backward_transfer(A) == pytest.approx(-20.0)


def test_incremental_and_last_accuracy():
    seen = [90.0, 85.0, 72.0]
    assert metrics.average_incremental_accuracy(seen) == pytest.approx(82.3333333)
    assert metrics.last_accuracy(seen) == 72.0
    s = metrics.summary(A, seen)
    assert s["forgetting"] == pytest.approx(22.5) and s["last_accuracy"] == 72.0


def test_single_task_has_no_forgetting_defined():
    assert math.isnan(metrics.forgetting([[80.0]]))
    assert math.isnan(metrics.backward_transfer([[80.0]]))


def test_accuracy_matrix_from_predictions():
    class_to_task = np.array([0, 0, 1, 1])
    # after task 0: labels 0,1 -> 1 of 2 right on task 0
    y0, p0 = np.array([0, 1]), np.array([0, 0])
    # after task 1: task 0 samples both right, task 1 samples: 1 of 4 right
    y1, p1 = np.array([0, 1, 2, 2, 3, 3]), np.array([0, 1, 2, 0, 0, 1])
    m = metrics.accuracy_matrix([y0, y1], [p0, p1], class_to_task)
    np.testing.assert_allclose(m, [[50.0, NAN], [100.0, 25.0]])
    assert metrics.accuracy(y1, p1) == pytest.approx(100 * 3 / 6)


def test_task_accuracies_nan_for_unseen_tasks():
    row = metrics.task_accuracies([0, 1], [0, 1], [0, 1, 2], num_tasks=3)
    np.testing.assert_allclose(row, [100.0, 100.0, NAN])


def test_shape_errors():
    with pytest.raises(ValueError, match="square"):
        metrics.forgetting(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="y_pred has 1"):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        metrics.average_incremental_accuracy([])
