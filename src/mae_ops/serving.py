"""Serving an exported model with onnxruntime alone (no torch import here, so a
deployment image can leave torch out).

The .onnx file is self-contained: its input ``pixels`` is (batch, C, S, S)
float32 in [0, 1] (normalisation is inside the graph) and its metadata_props
carry the class names, input size and channels, mean/std and the hashes of
the model and params it came from.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, InvalidProtobuf, NoSuchFile

from mae_ops.errors import UserError
from mae_ops.images import ImageReadError, is_image_file, load_image

log = logging.getLogger(__name__)


class ModelError(UserError, ValueError):
    """The file is not a model `mae-ops predict` can serve; the message says why."""


def _gpu_present() -> bool:
    """onnxruntime-gpu lists CUDA as available even on a CPU box (and prints
    errors when asked for it): require a visible NVIDIA device as well."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def open_session(path: str | Path, device: str = "auto", threads: int | None = None) -> ort.InferenceSession:
    """The one place an onnxruntime session is made: providers that really work,
    explicit thread counts, full graph optimisation; logs the provider in use."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    want_gpu = device == "cuda" or (device == "auto" and _gpu_present())
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_gpu else ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf, NoSuchFile) as exc:
        # onnxruntime's own exception types are not ValueError/OSError; give callers one they can catch
        raise ModelError(f"cannot load {path} as an ONNX model: {str(exc).splitlines()[0]}") from None
    log.info("onnxruntime %s on %s, %d threads", Path(path).name, session.get_providers()[0],
             opts.intra_op_num_threads)  # fmt: skip
    return session


@dataclass(frozen=True)
class ModelInfo:
    classes: list[str]
    img_size: int
    channels: int
    metadata: dict[str, str]

    @classmethod
    def from_session(cls, session: ort.InferenceSession) -> ModelInfo:
        meta = dict(session.get_modelmeta().custom_metadata_map)
        try:
            info = cls(json.loads(meta["classes"]), int(meta["img_size"]), int(meta["channels"]), meta)
        except KeyError as exc:
            raise ModelError(f"not an mae-ops model: metadata {exc} is missing") from None
        except ValueError as exc:
            raise ModelError(f"not an mae-ops model: unreadable metadata ({exc})") from None
        info.check_graph(session)
        return info

    def check_graph(self, session: ort.InferenceSession) -> None:
        """The graph must take what the metadata promises: pixels (batch, C, S, S) -> logits (batch, classes)."""
        inputs = {i.name: i.shape for i in session.get_inputs()}
        outputs = {o.name: o.shape for o in session.get_outputs()}
        want_in = [self.channels, self.img_size, self.img_size]
        shape = inputs.get("pixels")
        logits = outputs.get("logits")
        problem = None
        fixed = [s if isinstance(s, int) else w for s, w in zip((shape or [None] * 4)[1:], want_in, strict=False)]
        if shape is None or len(shape) != 4 or fixed != want_in:
            problem = f"input 'pixels' of shape (batch, {', '.join(map(str, want_in))}), the graph takes {inputs}"
        elif not logits or (isinstance(logits[-1], int) and logits[-1] != len(self.classes)):
            problem = f"output 'logits' with {len(self.classes)} classes, the graph gives {outputs}"
        if problem:
            raise ModelError(f"the graph does not match its mae-ops metadata: expected {problem}")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def run_logits(session: ort.InferenceSession, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, C, S, S) float32 in [0, 1] -> (N, classes) logits."""
    name = session.get_inputs()[0].name
    try:
        out = [session.run(["logits"], {name: pixels[i : i + batch_size]})[0]
               for i in range(0, len(pixels), batch_size)]  # fmt: skip
    except (Fail, InvalidArgument) as exc:
        raise ModelError(f"the model cannot run on these inputs: {str(exc).splitlines()[0][:200]}") from None
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given, folders walked for image files (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f) and not f.name.startswith("."))
        else:
            files.append(p)
    return files


def predict_files(session: ort.InferenceSession, files: list[Path], top_k: int = 3) -> list[dict]:
    """One record per file: top-k labels with probabilities, or the error that kept it out."""
    info = ModelInfo.from_session(session)
    records: list[dict] = []
    arrays, ok = [], []
    for f in files:
        try:
            arrays.append(load_image(f, info.img_size, info.channels))
            ok.append(len(records))
            records.append({"file": str(f)})
        except ImageReadError as exc:
            records.append({"file": str(f), "error": str(exc)})
        except OSError as exc:  # missing or unreadable path
            records.append({"file": str(f), "error": f"cannot read: {exc.strerror or exc}"})
    if arrays:
        probs = softmax(run_logits(session, np.stack(arrays).astype(np.float32) / 255.0))
        k = min(top_k, probs.shape[1])
        for row, idx in zip(probs, ok, strict=True):
            best = np.argsort(-row)[:k]
            records[idx]["top"] = [{"label": info.classes[c], "prob": round(float(row[c]), 5)} for c in best]
    return records
