"""integration_error: coreset averages against the full average, checked directly."""

import numpy as np
import pytest

from distillkit.thinning import Gaussian, iid, integration_error, kt


def _data(n, d=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d))


def test_values_and_callable_match_direct_averages():
    X = _data(200, 3)
    idx = np.array([3, 17, 17, 150])
    v = X[:, 0] ** 2 + X[:, 1]
    want = abs(v[idx].mean() - v.mean())
    assert integration_error(X, v, idx) == pytest.approx(want, rel=1e-12)
    w = np.array([1.0, 2.0, 3.0, 4.0])
    F = np.stack([X[:, 0], np.sin(X[:, 2])], axis=1)
    got = integration_error(X, lambda P: np.stack([P[:, 0], np.sin(P[:, 2])], 1), idx, w)
    want = np.abs((w / w.sum()) @ F[idx] - F.mean(0))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert integration_error(X, v, idx, target=1.0) == pytest.approx(abs(v[idx].mean() - 1.0))


def test_kt_integrates_a_smooth_function_better_than_iid():
    def g(P):
        return np.exp(-((P - [0.5, -0.3]) ** 2).sum(1) / 2.0)

    e_kt, e_iid = [], []
    for s in range(6):
        X = _data(1024, seed=50 + s)
        e_kt.append(integration_error(X, g, kt(X, Gaussian(2.0), seed=s)))
        e_iid.append(integration_error(X, g, iid(X, 32, seed=s)))
    assert np.mean(e_kt) < 0.5 * np.mean(e_iid)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"f": np.zeros(5)}, "rows"),
        ({"indices": np.array([0, 99])}, "indices"),
        ({"target": np.zeros(3)}, "target"),
        ({"f": lambda P: np.full(len(P), np.nan)}, "finite"),
    ],
)
def test_bad_input(kwargs, match):
    X = _data(20)
    args = {"f": X[:, 0], "indices": np.array([1, 2]), **kwargs}
    with pytest.raises(ValueError, match=match):
        integration_error(X, args.pop("f"), args.pop("indices"), **args)
