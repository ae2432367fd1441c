"""Is pre-training working on my data? The encoder scored while it trains.

The loss alone misleads (on the digits it sits on a plateau for a dozen epochs while
nothing is learned), and k-NN accuracy is known to understate MAE features, so both
a k-NN and a linear probe are reported: each fitted on the labelled training images'
features (the encoder on whole images, no masking) and scored on the validation split,
with fixed settings (k = 20 cosine; logistic regression, C = 1, standardised
features), so nothing is chosen on the split it is scored on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from mae_ops.data import PreparedData, normalize
from mae_ops.models.mae import MaskedAutoencoderViT
from mae_ops.similarity import unit_rows

MAX_IMAGES = 10_000  # per split: the monitor's cost stays bounded on large data sets
KNN_K = 20


def monitor_ids(data: PreparedData) -> tuple[np.ndarray, np.ndarray] | None:
    """(labelled training ids, validation ids) the monitor uses, or None without both."""
    train, val = data.indices("train", labelled_only=True)[:MAX_IMAGES], data.indices("val")[:MAX_IMAGES]
    if len(train) == 0 or len(val) == 0 or len(np.unique(data.labels[train])) < 2:
        return None
    return train, val


@torch.inference_mode()
def encoder_features(
    model: MaskedAutoencoderViT, data: PreparedData, ids: np.ndarray, mean: torch.Tensor, std: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext, batch: int = 256,
) -> np.ndarray:  # fmt: skip
    """(len(ids), D) float32: the encoder on the stored evaluation images, in batches."""
    device = mean.device
    out = []
    for start in range(0, len(ids), batch):
        x = normalize(torch.from_numpy(data.eval_images[ids[start : start + batch]]).to(device), mean, std)
        with autocast():
            out.append(model.forward_features(x).float().cpu().numpy())
    return np.concatenate(out)


def scores(
    model: MaskedAutoencoderViT, data: PreparedData, ids: tuple[np.ndarray, np.ndarray], mean: torch.Tensor,
    std: torch.Tensor, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:  # fmt: skip
    """Validation top-1 of a k-NN and of a linear probe on the encoder's features now."""
    return predict(model, data, ids, mean, std, autocast)[0]


def predict(
    model: MaskedAutoencoderViT, data: PreparedData, ids: tuple[np.ndarray, np.ndarray], mean: torch.Tensor,
    std: torch.Tensor, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:  # fmt: skip
    """The scores, and each validation image's class under each ("knn", "probe"): the study
    pairs two settings image by image."""
    train, val = ids
    was_training = model.training
    model.eval()
    x, xv = (encoder_features(model, data, i, mean, std, autocast) for i in (train, val))
    model.train(was_training)
    y, yv = data.labels[train], data.labels[val]
    knn = KNeighborsClassifier(min(KNN_K, len(x)), metric="cosine").fit(unit_rows(x), y)
    scaler = StandardScaler().fit(x)
    probe = LogisticRegression(C=1.0, max_iter=1000).fit(scaler.transform(x), y)
    pred = {"knn": knn.predict(unit_rows(xv)), "probe": probe.predict(scaler.transform(xv))}
    return {f"{name}_val_top1": round(float((p == yv).mean()), 5) for name, p in pred.items()}, pred
