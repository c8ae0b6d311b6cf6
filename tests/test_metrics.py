"""The numpy metrics the device computes agree with scikit-learn's definitions."""

from __future__ import annotations

import numpy as np
import pytest

from bmc.train.metrics import classification_metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_scikit_learn(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    labels = [f"c{i}" for i in range(6)]
    y = rng.choice(5, 300, p=[0.4, 0.3, 0.15, 0.1, 0.05])  # class 5 never in the data
    probs = rng.dirichlet(np.ones(6), 300)
    probs[np.arange(300), y] += rng.uniform(0, 0.6, 300)  # better than chance, some errors
    m = classification_metrics(y, probs, labels)
    pred = probs.argmax(1)
    present = sorted(set(y.tolist()))
    idx = sorted(set(present) | set(pred.tolist()))
    assert m.accuracy == pytest.approx(sk.accuracy_score(y, pred))
    assert m.balanced_accuracy == pytest.approx(sk.balanced_accuracy_score(y, pred))
    assert m.macro_f1 == pytest.approx(sk.f1_score(y, pred, labels=present, average="macro", zero_division=0))
    assert m.confusion_matrix == sk.confusion_matrix(y, pred, labels=idx).tolist()
    p, r, f, s = sk.precision_recall_fscore_support(y, pred, labels=idx, zero_division=0)
    for k, i in enumerate(idx):
        got = m.per_class[labels[i]]
        assert (got.precision, got.recall, got.f1, got.support) == pytest.approx((p[k], r[k], f[k], s[k]))
