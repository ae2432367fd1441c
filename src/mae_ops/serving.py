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
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, InvalidProtobuf, NoSuchFile

from mae_ops.errors import UserError
from mae_ops.images import ImageReadError, is_image_file, load_eval_image

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

    @property
    def crop_pct(self) -> float:
        """Evaluation transform of the training data: resize to img_size / crop_pct, centre crop."""
        return float(self.metadata.get("crop_pct", "1.0"))

    @classmethod
    def from_session(cls, session: ort.InferenceSession, output: str = "logits") -> ModelInfo:
        """The metadata of an exported classifier (``output`` logits) or encoder (features)."""
        meta = dict(session.get_modelmeta().custom_metadata_map)
        try:
            info = cls(json.loads(meta["classes"]), int(meta["img_size"]), int(meta["channels"]), meta)
        except KeyError as exc:
            raise ModelError(f"not an mae-ops model: metadata {exc} is missing") from None
        except ValueError as exc:
            raise ModelError(f"not an mae-ops model: unreadable metadata ({exc})") from None
        info.check_graph(session, output)
        return info

    def check_graph(self, session: ort.InferenceSession, output: str = "logits") -> None:
        """The graph must take what the metadata promises: pixels (batch, C, S, S) -> logits
        (batch, classes), or features (batch, D) for the encoder."""
        inputs = {i.name: i.shape for i in session.get_inputs()}
        outputs = {o.name: o.shape for o in session.get_outputs()}
        want_in = [self.channels, self.img_size, self.img_size]
        shape = inputs.get("pixels")
        out = outputs.get(output)
        problem = None
        fixed = [s if isinstance(s, int) else w for s, w in zip((shape or [None] * 4)[1:], want_in, strict=False)]
        if shape is None or len(shape) != 4 or fixed != want_in:
            problem = f"input 'pixels' of shape (batch, {', '.join(map(str, want_in))}), the graph takes {inputs}"
        elif output == "logits" and (not out or (isinstance(out[-1], int) and out[-1] != len(self.classes))):
            problem = f"output 'logits' with {len(self.classes)} classes, the graph gives {outputs}"
        elif not out or len(out) != 2:
            problem = f"output '{output}' of shape (batch, D) (an encoder.onnx), the graph gives {outputs}"
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


def batch_spread(session: ort.InferenceSession, pixels: np.ndarray, output: str = "probabilities",
                 batch_sizes: tuple[int, ...] = (1, 7, 256)) -> float:  # fmt: skip
    """The largest difference in ``output`` for the same images scored in batches of each
    size: 0 for a model whose answer for an image does not depend on the other images of
    its batch (dynamic int8, which takes its activation scale from the whole batch, fails)."""
    name = session.get_inputs()[0].name
    runs = [np.concatenate([session.run([output], {name: pixels[i : i + b]})[0] for i in range(0, len(pixels), b)])
            for b in batch_sizes]  # fmt: skip
    return max(float(np.abs(r - runs[0]).max()) for r in runs[1:])


def top1_accuracy(session: ort.InferenceSession, images: np.ndarray, labels: np.ndarray, ids: np.ndarray,
                  batch_size: int = 256) -> float:  # fmt: skip
    """Top-1 of the model on ``images[ids]`` (uint8, e.g. a memmap), read in batches:
    never the whole split in memory."""
    correct = 0
    for start in range(0, len(ids), batch_size):
        rows = ids[start : start + batch_size]
        logits = run_logits(session, np.asarray(images[rows], dtype=np.float32) / 255.0)
        correct += int((logits.argmax(1) == labels[rows]).sum())
    return correct / max(1, len(ids))


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given, folders walked for image files (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f) and not f.name.startswith("."))
        else:
            files.append(p)
    return files


def _decode_chunk(files: list[str], size: int, channels: int, crop_pct: float = 1.0) -> list[np.ndarray | str]:
    """A worker's share: each file as a (C, S, S) uint8 array (the evaluation transform of
    the training data), or the error that kept it out."""
    out: list[np.ndarray | str] = []
    for f in files:
        try:
            out.append(load_eval_image(f, size, channels, crop_pct))
        except ImageReadError as exc:
            out.append(str(exc))
        except OSError as exc:  # missing or unreadable path
            out.append(f"cannot read: {exc.strerror or exc}")
    return out


def _decoded(files: list[Path], info: ModelInfo, workers: int, chunk: int = 64) -> Iterator[np.ndarray | str]:
    """Decode in ``workers`` processes (PIL holds the GIL for much of a small image), in
    file order, with a bounded number of chunks in flight: memory does not grow with the folder."""
    chunks = [[str(f) for f in files[i : i + chunk]] for i in range(0, len(files), chunk)]
    if workers <= 1 or len(chunks) <= 1:
        for c in chunks:
            yield from _decode_chunk(c, info.img_size, info.channels, info.crop_pct)
        return
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        pending: deque = deque()
        for c in chunks:
            pending.append(pool.submit(_decode_chunk, c, info.img_size, info.channels, info.crop_pct))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def run_files(session: ort.InferenceSession, files: list[Path], output: str = "logits", batch_size: int = 256,
              workers: int | None = None) -> Iterator[tuple[str, np.ndarray | str]]:  # fmt: skip
    """(file, its row of ``output``) per file, in order, as soon as its batch is done; the
    error that kept it out in place of the row. Decoded in ``workers`` processes."""
    info = ModelInfo.from_session(session, output)
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    name = session.get_inputs()[0].name
    waiting: list[tuple[str, str | None]] = []
    arrays: list[np.ndarray] = []

    def flush() -> Iterator[tuple[str, np.ndarray | str]]:
        try:  # at most batch_size images wait: one call
            rows = iter(session.run([output], {name: np.stack(arrays).astype(np.float32) / 255.0})[0] if arrays else ())
        except (Fail, InvalidArgument) as exc:
            raise ModelError(f"the model cannot run on these inputs: {str(exc).splitlines()[0][:200]}") from None
        for f, error in waiting:
            yield (f, error) if error is not None else (f, next(rows))
        waiting.clear()
        arrays.clear()

    for f, decoded in zip(files, _decoded(files, info, workers), strict=True):
        if isinstance(decoded, str):
            waiting.append((str(f), decoded))
        else:
            waiting.append((str(f), None))
            arrays.append(decoded)
            if len(arrays) >= batch_size:
                yield from flush()
    yield from flush()


def predict_files(session: ort.InferenceSession, files: list[Path], top_k: int = 3, batch_size: int = 256,
                  workers: int | None = None) -> Iterator[dict]:  # fmt: skip
    """One record per file, in order, as soon as its batch is done: top-k labels with
    probabilities, or the error that kept it out."""
    classes = ModelInfo.from_session(session).classes
    for f, row in run_files(session, files, "logits", batch_size, workers):
        if isinstance(row, str):
            yield {"file": f, "error": row}
            continue
        probs = softmax(row[None])[0]
        yield {"file": f, "top": [{"label": classes[c], "prob": round(float(probs[c]), 5)}
                                  for c in np.argsort(-probs)[: min(top_k, len(probs))]]}  # fmt: skip
