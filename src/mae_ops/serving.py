"""Serving an exported model with onnxruntime or OpenVINO (no torch import here, so a
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
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, InvalidProtobuf, NoSuchFile

from mae_ops.errors import UserError
from mae_ops.images import TYPE_BITS, Decoded, ImageReadError, is_image_file, load_eval_image

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


RUNTIMES = ("auto", "onnxruntime", "openvino")


def openvino_installed() -> bool:
    return find_spec("openvino") is not None


def _file_metadata(path: str | Path) -> dict[str, str]:
    """An .onnx file's metadata_props without its tensors; {} when it is not readable as one."""
    import onnx

    try:
        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # not a model: the runtime that opens it says so, in one line
        return {}


def wants_gpu(device: str) -> bool:
    """``cuda``, or ``auto`` where onnxruntime's CUDA provider really works."""
    return device == "cuda" or (device == "auto" and _gpu_present())


def resolve_runtime(runtime: str, device: str, path: str | Path | None = None) -> str:
    """``auto``: on the CPU, the runtime the export stage measured fastest for this file (its
    metadata ``runtime``: reports/export/benchmark.json has the numbers) when it is installed;
    onnxruntime otherwise, and always on a GPU."""
    if runtime not in RUNTIMES:
        raise ModelError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if runtime == "openvino" and device == "cuda":
        raise ModelError("OpenVINO serves on the CPU here; for --device cuda use --runtime onnxruntime "
                         "(onnxruntime-gpu)")  # fmt: skip
    if runtime == "openvino" and not openvino_installed():
        raise ModelError("--runtime openvino needs the openvino package: pip install 'mae-ops[openvino]'")
    if runtime == "auto":
        measured = _file_metadata(path).get("runtime") if path is not None else None
        cpu_openvino = measured == "openvino" and not wants_gpu(device) and openvino_installed()
        return "openvino" if cpu_openvino else "onnxruntime"
    return runtime


def open_session(path: str | Path, device: str = "auto", threads: int | None = None,
                 runtime: str = "onnxruntime") -> ort.InferenceSession | OpenVINOSession:  # fmt: skip
    """The one place a model is opened for inference: onnxruntime with providers that really
    work, explicit thread counts, full graph optimisation; or (``runtime``) OpenVINO on the
    CPU, answering the same calls. Logs the runtime and provider in use."""
    threads = threads or min(4, os.cpu_count() or 1)
    if resolve_runtime(runtime, device, path) == "openvino":
        return OpenVINOSession(path, threads)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if wants_gpu(device) else ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf, NoSuchFile) as exc:
        # onnxruntime's own exception types are not ValueError/OSError; give callers one they can catch
        raise ModelError(f"cannot load {path} as an ONNX model: {str(exc).splitlines()[0]}") from None
    log.info("onnxruntime %s on %s, %d threads", Path(path).name, session.get_providers()[0],
             opts.intra_op_num_threads)  # fmt: skip
    return session


class _Port(NamedTuple):
    name: str
    shape: list[int | str]


class _Meta(NamedTuple):
    custom_metadata_map: dict[str, str]


@cache
def _openvino_core() -> Any:
    """The process's one OpenVINO Core. Each Core loads its own CPU plugin, and each plugin
    swaps the main thread's signal stack (sigaltstack) for one of its own, putting back the
    one it found when it goes: two Cores gone in the order they came leave the thread's
    signal stack in freed memory, and the next signal a Python handler takes (a loader
    worker's SIGCHLD, Ctrl-C) kills the process with SIGSEGV (measured with OpenVINO 2026.4).
    One Core, kept until exit, swaps it once."""
    import openvino as ov

    return ov.Core()


class OpenVINOSession:
    """An exported .onnx compiled by OpenVINO for the CPU, answering the calls mae-ops makes
    of an onnxruntime session (``run``, ``get_inputs``, ``get_outputs``, ``get_modelmeta``),
    so predict, embed and the export stage's gates treat both runtimes alike.

    ``tuned`` (the default) serves as OpenVINO's own guides advise for a known workload: the
    graph is compiled for each batch size it meets (a static shape lets OpenVINO pick its
    kernels; a few are kept), a single image goes to a latency-compiled model using all
    ``threads``, and a batch is split across ``threads`` single-threaded streams that run at
    once (OpenVINO's throughput mode). Every image is computed alone of the others in
    either case: its answer does not depend on its batch. ``tuned=False`` is OpenVINO's
    default (one dynamic-batch model, default hints) with ``threads``: the export's peer."""

    def __init__(self, path: str | Path, threads: int | None = None, *, tuned: bool = True, keep: int = 8) -> None:
        self.path, self.tuned, self.keep = Path(path), tuned, keep
        # fp32 as the file says: on a CPU with bf16 (AVX-512 BF16, AMX) OpenVINO otherwise
        # runs an fp32 model in bf16, and its answers leave onnxruntime's by 4e-4 (measured)
        base = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        self._streams = threads if tuned and threads and threads > 1 else 1
        self._configs = {
            "default": base,
            "latency": {"PERFORMANCE_HINT": "LATENCY", **base},
            "streams": {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": self._streams, **base},
        }
        self._core = _openvino_core()
        try:
            self._model = self._core.read_model(str(path))
            self._default = self._core.compile_model(self._model, "CPU", self._configs["default"])
        except Exception as exc:  # OpenVINO raises plain RuntimeErrors and its own types
            raise ModelError(f"cannot load {path} with OpenVINO: {str(exc).strip().splitlines()[0][:200]}") from None
        self._metadata = _file_metadata(path)
        self._compiled: dict[tuple[str, int], Any] = {}  # (mode, batch) -> compiled model
        self._requests: dict[tuple[str, int], list[Any]] = {}
        log.info("OpenVINO %s on CPU, %s threads, %s", self.path.name, threads or "default",
                 f"static shapes, {self._streams} streams for batches" if tuned else "its defaults")  # fmt: skip

    def _request(self, mode: str, batch: int, index: int) -> Any:
        """The ``index``-th infer request of the model compiled for ``mode`` and ``batch``."""
        key = (mode, batch)
        if key not in self._compiled:
            if len(self._compiled) >= self.keep:  # e.g. the last, smaller batch of each folder
                old = next(iter(self._compiled))
                del self._compiled[old], self._requests[old]
            model = self._model.clone()
            model.reshape({model.inputs[0].get_any_name(): [batch, *self._model.inputs[0].get_partial_shape()[1:]]})
            self._compiled[key] = self._core.compile_model(model, "CPU", self._configs[mode])
            self._requests[key] = []
        requests = self._requests[key]
        while len(requests) <= index:
            requests.append(self._compiled[key].create_infer_request())
        return requests[index]

    def _infer(self, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
        if not self.tuned:
            result = self._default(x)
            return [np.asarray(result[self._default.output(n)]) for n in names]
        parts = np.array_split(x, min(self._streams, len(x)))  # sizes differ by one at most
        mode = "latency" if len(parts) == 1 else "streams"
        running = [self._request(mode, len(part), i) for i, part in enumerate(parts)]
        if len(parts) == 1:  # one image: a plain call, no asynchronous round trip
            running[0].infer({0: parts[0]})
            return [running[0].get_tensor(n).data.copy() for n in names]
        for request, part in zip(running, parts, strict=True):
            request.start_async({0: part})
        outputs: list[list[np.ndarray]] = []
        for request in running:
            request.wait()
            outputs.append([request.get_tensor(n).data.copy() for n in names])
        return [np.concatenate([o[i] for o in outputs]) for i in range(len(names))]

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        (x,) = feeds.values()
        names = output_names or [o.get_any_name() for o in self._model.outputs]
        try:
            return self._infer(np.ascontiguousarray(x, dtype=np.float32), names)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise ModelError(f"the model cannot run on these inputs: {first}") from None

    @staticmethod
    def _ports(ports: Any) -> list[_Port]:
        return [_Port(p.get_any_name(), [d.get_length() if d.is_static else "batch" for d in p.get_partial_shape()])
                for p in ports]  # fmt: skip

    def get_inputs(self) -> list[_Port]:
        return self._ports(self._model.inputs)

    def get_outputs(self) -> list[_Port]:
        return self._ports(self._model.outputs)

    def get_modelmeta(self) -> _Meta:
        return _Meta(self._metadata)

    def get_providers(self) -> list[str]:
        return ["OpenVINO CPU"]


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

    @property
    def bit_depth(self) -> int:
        """How the training data's 16/32-bit integer files were read: 0..2**bit_depth - 1 -> 0..255."""
        return int(self.metadata.get("bit_depth", TYPE_BITS))

    @classmethod
    def from_session(cls, session: ort.InferenceSession, output: str = "logits") -> ModelInfo:
        """The metadata of an exported classifier (``output`` logits) or encoder (features)."""
        meta = dict(session.get_modelmeta().custom_metadata_map)
        try:
            info = cls(json.loads(meta["classes"]), int(meta["img_size"]), int(meta["channels"]), meta)
            _ = info.crop_pct, info.bit_depth  # read once: a bad value fails here, not in a decoding worker
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


def _decode_chunk(files: list[str], info: ModelInfo) -> list[Decoded | str]:
    """A worker's share: each file as a (C, S, S) uint8 array (the training data's decoder and
    evaluation transform, from the model's metadata) and whether its values were clipped, or
    the error that kept it out."""
    out: list[Decoded | str] = []
    for f in files:
        try:
            out.append(load_eval_image(f, info.img_size, info.channels, info.crop_pct, info.bit_depth))
        except ImageReadError as exc:
            out.append(str(exc))
        except OSError as exc:  # missing or unreadable path
            out.append(f"cannot read: {exc.strerror or exc}")
    return out


def _decoded(files: list[Path], info: ModelInfo, workers: int, chunk: int = 64) -> Iterator[Decoded | str]:
    """Decode in ``workers`` processes (PIL holds the GIL for much of a small image), in
    file order, with a bounded number of chunks in flight: memory does not grow with the folder."""
    chunks = [[str(f) for f in files[i : i + chunk]] for i in range(0, len(files), chunk)]
    if workers <= 1 or len(chunks) <= 1:
        for c in chunks:
            yield from _decode_chunk(c, info)
        return
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        pending: deque = deque()
        for c in chunks:
            pending.append(pool.submit(_decode_chunk, c, info))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


class Served(NamedTuple):
    """One file's result: its row of the model's output, or the error that kept it out, and
    whether its values lay beyond the range the model's decoder reads (data.bit_depth; 0..1
    for floats) and were clipped: frames unlike the training data's."""

    file: str
    row: np.ndarray | str
    clipped: bool = False


def run_files(session: ort.InferenceSession, files: list[Path], output: str = "logits", batch_size: int = 256,
              workers: int | None = None) -> Iterator[Served]:  # fmt: skip
    """Each file's ``Served`` result, in order, as soon as its batch is done. Decoded in
    ``workers`` processes."""
    info = ModelInfo.from_session(session, output)
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    name = session.get_inputs()[0].name
    waiting: list[Served] = []  # each row: the file's pixels until its batch has run, or its error
    arrays: list[np.ndarray] = []

    def flush() -> Iterator[Served]:
        try:  # at most batch_size images wait: one call
            rows = iter(session.run([output], {name: np.stack(arrays).astype(np.float32) / 255.0})[0] if arrays else ())
        except (Fail, InvalidArgument) as exc:
            raise ModelError(f"the model cannot run on these inputs: {str(exc).splitlines()[0][:200]}") from None
        for s in waiting:
            yield s if isinstance(s.row, str) else s._replace(row=next(rows))
        waiting.clear()
        arrays.clear()

    for f, decoded in zip(files, _decoded(files, info, workers), strict=True):
        if isinstance(decoded, str):
            waiting.append(Served(str(f), decoded))
        else:
            waiting.append(Served(str(f), decoded.pixels, decoded.clipped))
            arrays.append(decoded.pixels)
            if len(arrays) >= batch_size:
                yield from flush()
    yield from flush()


def predict_files(session: ort.InferenceSession, files: list[Path], top_k: int = 3, batch_size: int = 256,
                  workers: int | None = None) -> Iterator[dict]:  # fmt: skip
    """One record per file, in order, as soon as its batch is done: top-k labels with
    probabilities (and ``"clipped": True`` for a file whose values the decoder clipped), or the
    error that kept it out."""
    classes = ModelInfo.from_session(session).classes
    for f, row, clipped in run_files(session, files, "logits", batch_size, workers):
        if isinstance(row, str):
            yield {"file": f, "error": row}
            continue
        probs = softmax(row[None])[0]
        record = {"file": f, "top": [{"label": classes[c], "prob": round(float(probs[c]), 5)}
                                     for c in np.argsort(-probs)[: min(top_k, len(probs))]]}  # fmt: skip
        yield record | {"clipped": True} if clipped else record
