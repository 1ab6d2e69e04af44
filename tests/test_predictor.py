"""AcceptancePredictor: sklearn fitting, the numpy fast path, save/load without pickle."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from speckv.controllers.predictor import KINDS, AcceptancePredictor
from speckv.errors import SpecKVError

FEATURES = ["entropy", "confidence", "gamma"]


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, np.ndarray]:
    """Acceptance falling with entropy and γ, rising with confidence, plus noise."""
    rng = np.random.default_rng(0)
    n = 400
    frame = pd.DataFrame(
        {
            "entropy": rng.uniform(0, 3, n),
            "confidence": rng.uniform(0.2, 1, n),
            "gamma": rng.choice([2, 4, 6, 8], n).astype(float),
        }
    )
    rate = 0.9 - 0.15 * frame["entropy"] + 0.2 * frame["confidence"] - 0.03 * frame["gamma"]
    return frame, np.clip(rate + rng.normal(0, 0.05, n), 0, 1).to_numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_fits_and_predicts(kind, data):
    frame, target = data
    predictor = AcceptancePredictor(kind, FEATURES).fit(frame, target)
    predicted = predictor.predict(frame)
    assert predicted.shape == (len(frame),)
    assert np.corrcoef(predicted, target)[0, 1] > 0.8
    clipped = predictor.predict(frame, clip=True)
    assert clipped.min() >= 0 and clipped.max() <= 1


@pytest.mark.parametrize("kind", ["mlp16", "linear"])
def test_numpy_path_equals_sklearn(kind, data):
    frame, target = data
    predictor = AcceptancePredictor(kind, FEATURES).fit(frame, target)
    matrix = frame[FEATURES].to_numpy()
    assert np.allclose(predictor.predict_fast(matrix), predictor.predict(frame), rtol=0, atol=1e-9)
    # One decision's row as a 1-D vector gives a length-1 result.
    assert predictor.predict_fast(matrix[0]) == pytest.approx(predictor.predict(frame.iloc[:1])[0], abs=1e-9)


def test_columns_are_selected_by_name_not_position(data):
    frame, target = data
    predictor = AcceptancePredictor("linear", FEATURES).fit(frame, target)
    shuffled = frame[["gamma", "entropy", "confidence"]].assign(extra=1.0)
    assert np.allclose(predictor.predict(shuffled), predictor.predict(frame))


@pytest.mark.parametrize("kind", ["mlp16", "linear"])
def test_save_and_load_round_trip(kind, data, tmp_path):
    frame, target = data
    predictor = AcceptancePredictor(kind, FEATURES).fit(frame, target)
    path = tmp_path / "predictor.json"
    predictor.save(path)
    document = json.loads(path.read_text())
    assert document["kind"] == kind and document["feature_names"] == FEATURES
    assert "sklearn_version" in document
    loaded = AcceptancePredictor.load(path)
    assert loaded.feature_names == tuple(FEATURES)
    assert np.allclose(loaded.predict(frame), predictor.predict(frame), rtol=0, atol=1e-9)
    assert np.allclose(
        loaded.predict_fast(frame[FEATURES].to_numpy()), predictor.predict(frame), rtol=0, atol=1e-9
    )


def test_user_errors_are_one_line_spec_kv_errors(data, tmp_path):
    frame, target = data
    with pytest.raises(SpecKVError, match="unknown predictor kind"):
        AcceptancePredictor("svm", FEATURES)
    with pytest.raises(SpecKVError, match="not fitted"):
        AcceptancePredictor("linear", FEATURES).predict(frame)
    forest = AcceptancePredictor("rf100", FEATURES).fit(frame, target)
    with pytest.raises(SpecKVError, match="no fast path"):
        forest.predict_fast(frame[FEATURES].to_numpy())
    with pytest.raises(SpecKVError, match="can be saved"):
        forest.save(tmp_path / "forest.json")
    with pytest.raises(SpecKVError, match="missing predictor features: gamma"):
        AcceptancePredictor("linear", FEATURES).fit(frame.drop(columns="gamma"), target)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(SpecKVError, match="not a version-1"):
        AcceptancePredictor.load(tmp_path / "bad.json")
