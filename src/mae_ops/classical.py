"""Baselines without deep training, each tuned on the validation split with the same
labels: logistic regression and k-NN on raw pixels (scikit-learn), and k-NN on the
frozen MAE encoder's features. If pre-training only matches these, it bought nothing.

Fitted baselines are kept as plain arrays (.npz, never pickles): the logistic
regression's weights, and for k-NN the labelled training points themselves.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from mae_ops.atomic import save_with
from mae_ops.config import Config, FinetuneConfig
from mae_ops.data import PreparedData
from mae_ops.finetuning import EncoderSpec, features, make_classifier

log = logging.getLogger(__name__)

PIXEL_SIDE = 32  # raw-pixel baselines see images of at most 32 x 32: bounded memory for any image size
LOGREG_C = (0.01, 0.1, 1.0, 10.0)
KNN_K = (1, 3, 5, 10, 20)
NAMES = {"logreg_pixels": "logistic regression on raw pixels", "knn_pixels": "k-NN on raw pixels",
         "knn_mae": "k-NN on the frozen MAE encoder's features"}  # fmt: skip


def pixel_features(data: PreparedData, ids: np.ndarray, batch: int = 512) -> np.ndarray:
    """(len(ids), C * s * s) float32 in [0, 1], s = min(image side, 32), read in batches."""
    side = min(data.img_size, PIXEL_SIDE)
    out = np.empty((len(ids), data.channels * side * side), dtype=np.float32)
    for start in range(0, len(ids), batch):
        block = data.eval_images[ids[start : start + batch]]
        if side != data.img_size:
            block = np.stack([np.stack([np.asarray(Image.fromarray(ch).resize((side, side), Image.Resampling.BOX))
                                        for ch in img]) for img in block])  # fmt: skip
        out[start : start + len(block)] = block.reshape(len(block), -1) / 255.0
    return out


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean()) if len(labels) else float("nan")


def fit_logreg(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, n_classes: int,
               seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:  # fmt: skip
    """Multinomial logistic regression, its C picked on the validation split."""
    best: tuple[float, LogisticRegression, float] | None = None
    for c in LOGREG_C:
        model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x, y)
        acc = _accuracy(_logreg_proba(_weights(model, n_classes), xv), yv)
        if best is None or acc > best[0]:
            best = (acc, model, c)
    assert best is not None
    return _weights(best[1], n_classes), {"C": best[2], "val_top1": round(best[0], 5)}


def _weights(model: LogisticRegression, n_classes: int) -> dict[str, np.ndarray]:
    """Weights for every class (a class absent from the labels gets none)."""
    coef = np.full((n_classes, model.coef_.shape[1]), 0.0, dtype=np.float32)
    bias = np.full(n_classes, -1e9, dtype=np.float32)
    rows = model.coef_ if len(model.classes_) > 2 else np.vstack([-model.coef_[0], model.coef_[0]]) / 2
    icpt = model.intercept_ if len(model.classes_) > 2 else np.array([-model.intercept_[0], model.intercept_[0]]) / 2
    coef[model.classes_], bias[model.classes_] = rows, icpt
    return {"coef": coef, "bias": bias}


def _logreg_proba(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    z = x @ w["coef"].T + w["bias"]
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_knn(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, metric: str) -> dict[str, Any]:
    """k picked on the validation split (distance-weighted votes)."""
    scores = {}
    for k in (k for k in KNN_K if k <= len(x)):
        knn = KNeighborsClassifier(k, weights="distance", metric=metric).fit(x, y)
        scores[k] = float((knn.predict(xv) == yv).mean()) if len(yv) else 0.0
    k = max(scores, key=lambda k: (scores[k], -k))
    return {"k": k, "metric": metric, "val_top1": round(scores[k], 5)}


def knn_proba(x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray, k: int, metric: str,
              n_classes: int) -> np.ndarray:  # fmt: skip
    knn = KNeighborsClassifier(k, weights="distance", metric=metric).fit(x_train, y_train)
    probs = np.zeros((len(x), n_classes), dtype=np.float32)
    probs[:, knn.classes_] = knn.predict_proba(x)
    return probs


def mae_features(enc: EncoderSpec, ft: FinetuneConfig, data: PreparedData, ids: np.ndarray,
                 device: torch.device) -> np.ndarray:  # fmt: skip
    """The frozen encoder's pooled features (as the linear probe with ``ft``'s pooling sees them)."""
    model, _ = make_classifier(enc, ft, data, linprobe=True)
    return features(model.to(device), data, ids, device).float().cpu().numpy()


def fit_all(
    cfg: Config, enc: EncoderSpec, data: PreparedData, device: torch.device
) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Every classical baseline on the labelled training images, tuned on the validation split
    (k-NN on the features of the frozen encoder ``enc``)."""
    train, val = data.indices("train", labelled_only=True), data.indices("val")
    y, yv, n = data.labels[train], data.labels[val], len(data.classes)
    stored: dict[str, np.ndarray] = {"data_hash": np.array(data.manifest["content_hash"])}
    report: dict[str, dict] = {}
    x, xv = pixel_features(data, train), pixel_features(data, val)
    weights, report["logreg_pixels"] = fit_logreg(x, y, xv, yv, n, cfg.data.seed)
    stored.update({"logreg_pixels.coef": weights["coef"], "logreg_pixels.bias": weights["bias"]})
    for name, (xs, xvs, metric) in {"knn_pixels": (x, xv, "euclidean"),
                                    "knn_mae": (mae_features(enc, cfg.finetune, data, train, device),
                                                mae_features(enc, cfg.finetune, data, val, device),
                                                "cosine")}.items():  # fmt: skip
        report[name] = fit_knn(xs, y, xvs, yv, metric)
        stored.update({f"{name}.x": xs, f"{name}.y": y, f"{name}.k": np.array(report[name]["k"]),
                       f"{name}.metric": np.array(metric)})  # fmt: skip
    for name, r in report.items():
        log.info("%s: validation top-1 %.4f (%s)", name, r["val_top1"], {k: v for k, v in r.items() if k != "val_top1"})
    return stored, report


def predict_all(cfg: Config, enc: EncoderSpec, stored: dict[str, np.ndarray], data: PreparedData, ids: np.ndarray,
                device: torch.device) -> dict[str, np.ndarray]:  # fmt: skip
    """Class probabilities of every stored baseline on rows ``ids``."""
    n = len(data.classes)
    pixels = pixel_features(data, ids)
    out = {"logreg_pixels": _logreg_proba({"coef": stored["logreg_pixels.coef"], "bias": stored["logreg_pixels.bias"]},
                                          pixels)}  # fmt: skip
    inputs = {"knn_pixels": pixels, "knn_mae": mae_features(enc, cfg.finetune, data, ids, device)}
    for name, x in inputs.items():
        out[name] = knn_proba(stored[f"{name}.x"], stored[f"{name}.y"], x, int(stored[f"{name}.k"]),
                              str(stored[f"{name}.metric"]), n)  # fmt: skip
    return out


def save(dest: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would add .npz to a path
            np.savez(fh, **arrays)

    save_with(dest, write)


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}
