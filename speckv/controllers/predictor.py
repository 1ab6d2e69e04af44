"""Acceptance predictors: per-step draft-token acceptance rate from step features.

One class serves the offline evaluations and the live controller. It wraps a scikit-learn
regressor for fitting; for the kinds the controller uses per step ("mlp16", "linear") the fitted
weights are exported to plain numpy arrays, so `predict_fast` decides in microseconds without
sklearn's per-call overhead, and `save`/`load` store them as JSON (no pickle). scikit-learn is
imported only to fit (the pipeline extra): a controller file loads and decides with numpy alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from speckv.errors import SpecKVError

KINDS = ("mlp16", "linear", "rf100", "gbm")
FAST_KINDS = ("mlp16", "linear")
_FILE_FORMAT = "speckv-acceptance-predictor"
_FILE_VERSION = 1


def make_estimator(kind: str):
    """A fresh, unfitted scikit-learn regressor for `kind` (seeded, so fits are repeatable)."""
    from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
    from sklearn.linear_model import LinearRegression
    from sklearn.neural_network import MLPRegressor

    if kind == "mlp16":
        # The SpecKV paper's predictor, exactly as released.
        return MLPRegressor(hidden_layer_sizes=(16,), max_iter=500, random_state=42)
    if kind == "linear":
        return LinearRegression()
    if kind == "rf100":
        return RandomForestRegressor(n_estimators=100, random_state=42)
    if kind == "gbm":
        return HistGradientBoostingRegressor(random_state=42)
    raise SpecKVError(f"unknown predictor kind {kind!r}; choose one of {', '.join(KINDS)}")


class AcceptancePredictor:
    """Predicts a step's acceptance rate from the features named in `feature_names`, in order."""

    def __init__(self, kind: str, feature_names: list[str] | tuple[str, ...]):
        if kind not in KINDS:
            raise SpecKVError(f"unknown predictor kind {kind!r}; choose one of {', '.join(KINDS)}")
        self.kind = kind
        self.feature_names = tuple(feature_names)
        self._estimator = None  # made by `fit`; a loaded predictor has only its weights
        self.sklearn_version: str | None = None  # the version that fitted the weights
        self._weights: list[tuple[np.ndarray, np.ndarray]] = []

    def fit(self, X, y) -> AcceptancePredictor:
        """Fit on features X (rows × feature_names) and acceptance rates y; returns self."""
        import sklearn

        self._estimator = make_estimator(self.kind)
        self._estimator.fit(self._matrix(X), np.asarray(y, dtype=float))
        self.sklearn_version = sklearn.__version__
        self._weights = _export_weights(self.kind, self._estimator)
        return self

    def predict(self, X, clip: bool = False) -> np.ndarray:
        """Predicted acceptance rates for many rows; `clip` bounds them to [0, 1]."""
        matrix = self._matrix(X)
        if self._estimator is not None:
            predictions = self._estimator.predict(matrix)
        elif self._weights:
            predictions = _forward(self._weights, matrix)
        else:
            raise SpecKVError("the acceptance predictor is not fitted")
        return np.clip(predictions, 0.0, 1.0) if clip else predictions

    def predict_fast(self, x: np.ndarray) -> np.ndarray:
        """Numpy-only prediction for one row (1-D) or a few rows (2-D), for per-step decisions.

        Features must already be floats in `feature_names` order; no validation is done here
        because this sits on the decoding hot path.
        """
        if not self._weights:
            raise SpecKVError(f"predictor kind {self.kind!r} has no fast path (fitted mlp16 or linear)")
        return _forward(self._weights, np.atleast_2d(x))

    def save(self, path: str | Path) -> None:
        """Write kind, feature names, sklearn version and the exported weights as JSON."""
        Path(path).write_text(json.dumps(self.to_dict()))

    def to_dict(self) -> dict:
        """The fitted fast-path model as a JSON-ready document (what `save` writes)."""
        if not self._weights:
            raise SpecKVError(f"only fitted {' or '.join(FAST_KINDS)} predictors can be saved")
        return {
            "format": _FILE_FORMAT,
            "version": _FILE_VERSION,
            "kind": self.kind,
            "feature_names": list(self.feature_names),
            "sklearn_version": self.sklearn_version,
            "layers": [{"weights": w.tolist(), "bias": b.tolist()} for w, b in self._weights],
        }

    @classmethod
    def load(cls, path: str | Path) -> AcceptancePredictor:
        """Read a predictor written by `save`; it predicts through the numpy path."""
        try:
            document = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise SpecKVError(f"cannot read predictor file {path}: {error}") from error
        return cls.from_dict(document, str(path))

    @classmethod
    def from_dict(cls, document: dict, where: str = "predictor") -> AcceptancePredictor:
        """A predictor from a `to_dict` document; it predicts through the numpy path."""
        if document.get("format") != _FILE_FORMAT or document.get("version") != _FILE_VERSION:
            raise SpecKVError(f"{where} is not a version-{_FILE_VERSION} SpecKV predictor file")
        predictor = cls(document["kind"], document["feature_names"])
        predictor.sklearn_version = document.get("sklearn_version")
        predictor._weights = [
            (np.asarray(layer["weights"], dtype=float), np.asarray(layer["bias"], dtype=float))
            for layer in document["layers"]
        ]
        return predictor

    def _matrix(self, X) -> np.ndarray:
        """X as a float matrix in feature order; DataFrames are selected by column name."""
        if hasattr(X, "columns"):
            missing = [name for name in self.feature_names if name not in X.columns]
            if missing:
                raise SpecKVError(f"missing predictor features: {', '.join(missing)}")
            X = X[list(self.feature_names)]
        matrix = np.asarray(X, dtype=float)
        if matrix.ndim != 2 or matrix.shape[1] != len(self.feature_names):
            raise SpecKVError(
                f"expected {len(self.feature_names)} features per row, got shape {matrix.shape}"
            )
        return matrix


def _export_weights(kind: str, estimator) -> list[tuple[np.ndarray, np.ndarray]]:
    """The fitted model as (weights, bias) layers, ReLU between them; empty if not exportable."""
    if kind == "mlp16":
        # MLPRegressor's defaults: ReLU hidden layers, identity output.
        return [(w.copy(), b.copy()) for w, b in zip(estimator.coefs_, estimator.intercepts_, strict=True)]
    if kind == "linear":
        return [(estimator.coef_.reshape(-1, 1).copy(), np.atleast_1d(estimator.intercept_).astype(float))]
    return []


def _forward(layers: list[tuple[np.ndarray, np.ndarray]], matrix: np.ndarray) -> np.ndarray:
    """Dense layers with ReLU between them and a linear, single-output last layer."""
    activations = matrix
    for weights, bias in layers[:-1]:
        activations = np.maximum(activations @ weights + bias, 0.0)
    weights, bias = layers[-1]
    return (activations @ weights + bias)[:, 0]
