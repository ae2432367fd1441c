"""Making the deployable ONNX model fast with onnxruntime's own tools, and
measuring it: the export view of the classifier, the transformer fusions,
calibrated static int8, and latency/throughput of every variant.

onnxruntime's transformer optimizer recognises attention written as three
projections (query, key, value), as Hugging Face's ViT has it; timm packs them
into one ``qkv`` matrix, which the optimizer does not fuse. ``export_view``
gives the exporter the same weights as three projections (same math), so the
attention, LayerNorm and GELU of every block fuse into onnxruntime's kernels.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn

log = logging.getLogger(__name__)


class Deployable(nn.Module):
    """pixels in [0, 1] -> (logits, probabilities); normalisation lives in the graph."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model((pixels - self.mean) / self.std)
        return logits, logits.softmax(dim=-1)


class Features(Deployable):
    """pixels in [0, 1] -> pooled encoder features (batch, embed_dim)."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.model((pixels - self.mean) / self.std)


class SplitQKVAttention(nn.Module):
    """timm's attention with its packed ``qkv`` as three projections: the pattern
    onnxruntime fuses into one Attention kernel. Same weights, same result."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        dim = attn.qkv.in_features
        self.num_heads = attn.num_heads
        self.head_dim = dim // attn.num_heads
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        for i, proj in enumerate((self.query, self.key, self.value)):
            proj.weight.data.copy_(attn.qkv.weight.data[i * dim : (i + 1) * dim])
            proj.bias.data.copy_(attn.qkv.bias.data[i * dim : (i + 1) * dim])
        self.proj = attn.proj

    def forward(self, x: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        b, n, c = x.shape  # (B, N, C)
        q = self.query(x).view(b, n, self.num_heads, self.head_dim).permute(0, 2, 1, 3)  # (B, H, N, D)
        k = self.key(x).view(b, n, self.num_heads, self.head_dim).permute(0, 2, 3, 1)  # (B, H, D, N)
        v = self.value(x).view(b, n, self.num_heads, self.head_dim).permute(0, 2, 1, 3)  # (B, H, N, D)
        attn = (torch.matmul(q, k) / self.head_dim**0.5).softmax(dim=-1)  # (B, H, N, N)
        out = torch.matmul(attn, v).permute(0, 2, 1, 3).reshape(b, n, c)  # (B, N, C)
        return self.proj(out)


def export_view(model: nn.Module) -> nn.Module:
    """A copy of a timm ViT whose attention the ONNX optimizer can fuse."""
    view = copy.deepcopy(model).eval()
    for block in getattr(view, "blocks", []):
        if hasattr(block.attn, "qkv") and block.attn.qkv.bias is not None:
            block.attn = SplitQKVAttention(block.attn)
    return view


# --------------------------------------------------------- large models
def data_file(path: Path) -> Path:
    """Where a model's tensors live when they are kept outside its .onnx file."""
    return path.with_name(path.name + ".data")


def weights_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def is_external(path: Path) -> bool:
    """Whether the model's tensors are in a data file beside it."""
    proto = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def save_model(proto: onnx.ModelProto, dest: Path, external: bool) -> None:
    """One self-contained .onnx, or (``external``) the graph in ``dest`` and every tensor in
    ``dest.data`` beside it: protobuf cannot hold a file over 2 GiB (ViT-H's fp32 weights
    are 2.5 GB). onnxruntime loads either from the .onnx's path."""
    data_file(dest).unlink(missing_ok=True)  # onnx appends to an existing data file
    if external:
        onnx.save_model(proto, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file(dest).name, size_threshold=1024)  # fmt: skip
    else:
        onnx.save_model(proto, str(dest))


def move_model(src: Path, dest: Path) -> None:
    """Rename a model and its data file (the .onnx names the data file: same stem kept)."""
    if data_file(src).exists():
        assert src.name == dest.name, "a model with external data keeps its file name"
        data_file(src).replace(data_file(dest))
    else:
        data_file(dest).unlink(missing_ok=True)
    src.replace(dest)


STACK_TRACE = "pkg.torch.onnx.stack_trace"  # node metadata torch's exporter writes


def to_onnx(module: nn.Module, example: torch.Tensor, dest: Path, outputs: list[str], opset: int,
            metadata: dict[str, str], external: bool = False) -> None:  # fmt: skip
    """torch's dynamo exporter with a dynamic batch axis, checked; ``external`` keeps the
    tensors in a data file beside the .onnx (see ``save_model``)."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        module, (example,), None, input_names=["pixels"], output_names=outputs, opset_version=opset,
        dynamo=True, dynamic_shapes={"pixels": {0: batch}}, optimize=True, verbose=False,
    )  # fmt: skip
    proto = program.model_proto
    _drop_stack_traces(proto.graph)
    for function in proto.functions:
        _drop_stack_traces(function)
    onnx.helper.set_model_props(proto, metadata)
    save_model(proto, dest, external)
    onnx.checker.check_model(str(dest), full_check=True)  # from the path: works past 2 GiB too


def _drop_stack_traces(graph: onnx.GraphProto | onnx.FunctionProto) -> None:
    """The exporter records each node's Python stack trace, with the absolute paths of the
    exporting machine (its home and virtual environment): a published file names nothing of
    that machine, and one model exports to the same bytes from any folder."""
    for node in graph.node:
        keep = [p for p in node.metadata_props if p.key != STACK_TRACE]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
        for attr in node.attribute:  # the branches of If and the bodies of Loop
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                _drop_stack_traces(sub)


def set_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Write the metadata into a model, keeping its tensors where they are."""
    external = is_external(path)
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, metadata)
    save_model(proto, path, external)


def metadata_of(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def fuse(src: Path, dest: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """onnxruntime's transformer optimizer (model type ``vit``): Attention, SkipLayerNorm,
    LayerNorm and BiasGelu fusions. Returns the counts of fused operators."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(src), model_type="vit", num_heads=num_heads, hidden_size=hidden_size)
    # shapes recorded for the unfused graph no longer hold: let later tools (the quantizer) infer them again
    del optimized.model.graph.value_info[:]
    optimized.save_model_to_file(str(dest), use_external_data_format=is_external(src))  # data: dest + ".data"
    set_metadata(dest, metadata_of(src))
    return {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}


class _Calibration:
    """onnxruntime's CalibrationDataReader over a few hundred training images, in batches."""

    def __init__(self, batches: Iterator[np.ndarray]) -> None:
        self._batches = batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"pixels": batch}


def _with_shapes(src: Path) -> Path:
    """onnxruntime's symbolic shape inference (it knows the fused com.microsoft operators,
    which ONNX's own inference does not): the quantizers need every tensor's type."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dest = src.with_name(src.stem + ".shaped.onnx")
    if not dest.exists():
        external = is_external(src)
        quant_pre_process(str(src), str(dest), skip_optimization=True, skip_onnx_shape=True,
                          save_as_external_data=external, all_tensors_to_one_file=True,
                          external_data_location=data_file(dest).name if external else None)  # fmt: skip
    return dest


_QUANT_OPTIONS = {"DefaultTensorType": onnx.TensorProto.FLOAT}
# int8 weights within -64..64 (onnxruntime's reduce_range): x86 CPUs without VNNI multiply
# uint8 activations by int8 weights in pairs summed into int16, which saturates past 32,767
# (255 * 127 * 2 does; 255 * 64 * 2 does not). With full-range weights the demo's static int8
# model scored 92.48 % test top-1 on an AVX2 host (fp32 94.48 %), 94.38-94.48 % on AVX-512 VNNI
# hosts; within 7 bits, 94.68 % on the AVX2 host. No int16 sum can saturate, so AVX2 and VNNI
# kernels add up the same integers: an int8 file answers alike on the export host and the server.
_SATURATION_FREE = True


def quantize_int8(src: Path, dest: Path, per_channel: bool) -> None:
    """Dynamic int8 (weights int8 in 7 bits, see ``_SATURATION_FREE``; activations quantized on the fly)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(_with_shapes(src)), str(dest), weight_type=QuantType.QInt8, per_channel=per_channel,
                     reduce_range=_SATURATION_FREE, extra_options=_QUANT_OPTIONS,
                     use_external_data_format=is_external(src))  # fmt: skip
    set_metadata(dest, metadata_of(src))


def _output_nodes(path: Path) -> list[str]:
    """The nodes that make or read a graph output (the head and its softmax)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    outputs = {o.name for o in graph.output}
    return [n.name for n in graph.node if outputs & {*n.output, *n.input}]


def quantize_static_int8(src: Path, dest: Path, calibration: Iterator[np.ndarray]) -> None:
    """Static int8 in QDQ format: per-channel int8 weights in 7 bits (``_SATURATION_FREE``),
    activation ranges calibrated (MinMax) on training images, fixed afterwards, so an image's
    answer does not depend on its batch. The head and the softmax stay fp32: logits and
    probabilities keep their resolution (a quantized softmax would sum to 1 only within 1/255
    per class)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    shaped = _with_shapes(src)
    quantize_static(
        str(shaped), str(dest), _Calibration(calibration), quant_format=QuantFormat.QDQ,
        nodes_to_exclude=_output_nodes(shaped),
        per_channel=True, reduce_range=_SATURATION_FREE, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=is_external(src),
        extra_options={**_QUANT_OPTIONS, "ActivationSymmetric": False, "WeightSymmetric": True},
    )  # fmt: skip
    set_metadata(dest, metadata_of(src))


# ----------------------------------------------------------------- latency
def measure_all(runners: dict[str, Callable[[np.ndarray], object]], one: np.ndarray, batch: np.ndarray,
                runs: int, rounds: int = 10) -> dict[str, dict[str, float]]:  # fmt: skip
    """p50/p95 latency at batch 1 (``runs`` calls each) and images/s at ``len(batch)`` for
    every runner, interleaved in ``rounds`` (each round in a rotated order), so that a burst
    of load on a shared machine falls on every variant alike instead of on one of them.
    A pause before each runner's turn lets the previous one's threads (onnxruntime and
    OpenMP spin after their work) go idle, as they would be in a server running one model."""
    names = list(runners)
    for fn in runners.values():  # warm-up: first calls allocate and pick kernels
        for _ in range(5):
            fn(one)
        fn(batch)
    t1: dict[str, list[float]] = {n: [] for n in names}
    tb: dict[str, list[float]] = {n: [] for n in names}
    per_round = max(1, runs // rounds)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = runners[name]
            time.sleep(0.05)  # the previous runner's thread pool stops spin-waiting before this one is timed
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn(one)
                t1[name].append(time.perf_counter() - t0)
            for _ in range(max(1, per_round // 10)):
                t0 = time.perf_counter()
                fn(batch)
                tb[name].append(time.perf_counter() - t0)
    return {n: {"batch1_p50_ms": round(float(np.percentile(t1[n], 50)) * 1e3, 3),
                "batch1_p95_ms": round(float(np.percentile(t1[n], 95)) * 1e3, 3),
                f"batch{len(batch)}_images_per_s": round(len(batch) / float(np.median(tb[n])), 1)}
            for n in names}  # fmt: skip


def choose_published(timings: dict[str, dict[str, float]], candidates: list[str], peer: str) -> dict[str, Any]:
    """The serving variant among ``candidates`` (names in ``timings``) whose slower side against
    ``peer`` is the fastest: the smaller of its batch-1 p50 speed-up and its batch-32
    images/s ratio. Without timings, an int8 candidate (gated, and smaller), else the first."""
    if not all(c in timings for c in [*candidates, peer]):
        return {"variant": next((c for c in candidates if "int8" in c), candidates[0]), "peer": peer}

    def vs_peer(name: str) -> dict[str, float]:
        t, ref = timings[name], timings[peer]
        return {"batch1": round(ref["batch1_p50_ms"] / t["batch1_p50_ms"], 3),
                "batch32": round(t["batch32_images_per_s"] / ref["batch32_images_per_s"], 3)}  # fmt: skip

    best = max(sorted(candidates), key=lambda c: min(vs_peer(c).values()))
    return {"variant": best, "peer": peer, "vs_peer": vs_peer(best)}


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}  # fmt: skip
