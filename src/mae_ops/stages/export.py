"""Stage `export`: the fine-tuned classifier -> models/export/ as ONNX, gated on parity.

The graph is fused by onnxruntime's transformer optimizer (attention, LayerNorm,
GELU: see mae_ops/deploy.py); int8 comes two ways, dynamic and static with
calibration on training images, and the faster one that loses at most
``export.max_int8_drop`` of validation top-1 *and* gives every image one answer
(the same probabilities alone and in batches of 7 and 256, within
``export.max_abs_diff``: dynamic int8 takes its activation scales from the whole
batch, so it does not) is published; every other published model passes the same
check. The stage then times every variant against PyTorch on this machine, and, when the
openvino package is installed, against OpenVINO's default on the unfused fp32 graph (the
peer, ``openvino_default``) and with OpenVINO as the runtime of the published files. The
published variant (a file and a runtime) is the one whose slower side against the peer,
batch 1 or batch 32, is fastest; its runtime is written into the file's metadata, so
``mae-ops predict --runtime auto`` serves it the way it was measured fastest.

Outputs:
  models/export/model.onnx       fp32 classifier (fused), dynamic batch, one file, metadata inside
  models/export/model.int8.onnx  the chosen int8 model (``export.quantize``)
  models/export/model.fp16.onnx  optional fp16 variant for GPU serving (``export.fp16``)
  models/export/encoder.onnx     the pre-trained encoder as a feature extractor, [batch, embed_dim]
  reports/export/parity.json     onnxruntime vs PyTorch on the whole test split, fused operators,
                                 every int8 variant's validation top-1 and speed
  reports/export/benchmark.json  latency (batch 1) and throughput (batch 32) of torch, every ONNX model
                                 with each runtime, the peer, and which variant was published
Every file is written under a temporary name and renamed only after its gate
passes, so a failed export leaves the previous models untouched.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

from mae_ops import __version__
from mae_ops.atomic import write_json
from mae_ops.config import Config, ExportConfig, InputError
from mae_ops.data import PreparedData
from mae_ops.deploy import (
    Deployable,
    Features,
    choose_published,
    data_file,
    export_view,
    fuse,
    machine,
    measure_all,
    metadata_of,
    move_model,
    quantize_int8,
    quantize_static_int8,
    save_model,
    set_metadata,
    to_onnx,
    weights_bytes,
)
from mae_ops.errors import UserError
from mae_ops.models.classifier import feature_extractor, load_classifier
from mae_ops.models.presets import preset_config
from mae_ops.reporting import file_sha256
from mae_ops.serving import OpenVINOSession, batch_spread, open_session, openvino_installed, run_logits, top1_accuracy

log = logging.getLogger(__name__)


class ParityError(UserError, RuntimeError):
    """The exported model does not compute what the PyTorch model computes."""


def _batches(data: PreparedData, ids: np.ndarray, size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(pixels in [0, 1], labels) of ``ids`` in batches: never the whole split in memory."""
    for start in range(0, len(ids), size):
        rows = ids[start : start + size]
        yield np.asarray(data.eval_images[rows], dtype=np.float32) / 255.0, data.labels[rows]


def _top1(session: ort.InferenceSession, data: PreparedData, ids: np.ndarray) -> float:
    return top1_accuracy(session, data.eval_images, data.labels, ids)


def _parity(deployable: nn.Module, session: ort.InferenceSession, data: PreparedData, ids: np.ndarray,
            tolerance: float) -> dict[str, Any]:  # fmt: skip
    """onnxruntime vs PyTorch on every image of ``ids``, batch by batch."""
    max_diff, agree, torch_ok, onnx_ok = 0.0, 0, 0, 0
    for x, y in _batches(data, ids):
        with torch.no_grad():
            ref = deployable(torch.from_numpy(x))[0].numpy()
        got = run_logits(session, x)
        max_diff = max(max_diff, float(np.abs(got - ref).max()))
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
        torch_ok += int((ref.argmax(1) == y).sum())
        onnx_ok += int((got.argmax(1) == y).sum())
    n = len(ids)
    parity = {"num_images": n, "max_abs_diff": max_diff, "top1_agreement": agree / n, "tolerance": tolerance,
              "torch_top1": torch_ok / n, "onnx_top1": onnx_ok / n}  # fmt: skip
    parity["passed"] = parity["max_abs_diff"] <= tolerance and agree == n
    return parity


def _calibration(data: PreparedData, count: int, seed: int) -> Iterator[np.ndarray]:
    """A seeded sample of training images (never validation or test) for static int8's ranges."""
    train = data.indices("train", "unlabeled")
    pick = np.sort(np.random.default_rng(seed).choice(train, size=min(count, len(train)), replace=False))
    return (x for x, _ in _batches(data, pick, 64))


@dataclass(frozen=True)
class Gate:
    """What every candidate for serving is held to: the split it is scored on (validation;
    the test split when there is none), fp32's top-1 there, and the images whose answers
    must not move with the other images of their batch."""

    ex: ExportConfig
    data: PreparedData
    ids: np.ndarray
    split: str
    fp32_top1: float
    spread_images: np.ndarray

    @classmethod
    def measure(cls, ex: ExportConfig, data: PreparedData, fp32: Path) -> Gate:
        """The gate for fp32 model `fp32`: the validation split (the test split stays the
        final, untouched score) or the test split when there is none."""
        val_ids = data.indices("val")
        ids, split = (val_ids, "val") if len(val_ids) else (data.indices("test"), "test")
        spread_images = np.asarray(data.eval_images[np.resize(ids, 256)], dtype=np.float32) / 255.0
        return cls(ex, data, ids, split, _top1(open_session(fp32, "cpu", ex.threads), data, ids), spread_images)

    def spread(self, path: Path, output: str = "probabilities", runtime: str = "onnxruntime") -> float:
        """How far a model's answer for an image moves with the other images of its batch."""
        return batch_spread(open_session(path, "cpu", self.ex.threads, runtime), self.spread_images, output)


def _int8_variants(fp32: Path, tmp: Path, gate: Gate) -> dict[str, dict[str, Any]]:
    """Dynamic and calibrated static int8, each scored on the gate split (validation) and
    checked for one answer per image (the same probabilities alone and in any batch)."""
    ex, made = gate.ex, {}
    quantize_int8(fp32, tmp / "int8-dynamic.onnx", ex.per_channel)
    made["dynamic"] = tmp / "int8-dynamic.onnx"
    if ex.calibration_images > 0:
        quantize_static_int8(fp32, tmp / "int8-static.onnx", _calibration(gate.data, ex.calibration_images, ex.seed))
        made["static"] = tmp / "int8-static.onnx"
    return {name: _gated(path, "onnxruntime", gate) for name, path in made.items()}


def _gated(path: Path, runtime: str, gate: Gate) -> dict[str, Any]:
    """A candidate for serving (a file and a runtime) held to the gates: at most
    ``export.max_int8_drop`` of fp32 validation top-1 lost, one answer per image in any batch."""
    top1 = _top1(open_session(path, "cpu", gate.ex.threads, runtime), gate.data, gate.ids)
    drop, spread = gate.fp32_top1 - top1, gate.spread(path, runtime=runtime)
    return {"path": path, "gate_top1": top1, "drop": drop, "batch_max_prob_diff": spread,
            "passed": drop <= gate.ex.max_int8_drop and spread <= gate.ex.max_abs_diff}  # fmt: skip


def _settle_int8(variants: dict[str, dict[str, Any]], timings: dict[str, dict], gate: Gate) -> dict[str, Any]:
    """The int8 record of parity.json: every variant with its gates and speed, and the one
    published (``chosen``: the fastest passing one at batch 1; without timings, dynamic, which
    needs no calibration data to reproduce), or why none is."""
    for name, v in variants.items():
        v.update(timings.get(f"onnxruntime_int8_{name}", {}))
    passing = [n for n, v in variants.items() if v["passed"]]
    chosen = min(passing, key=lambda n: (variants[n].get("batch1_p50_ms", 0.0), n)) if passing else None
    report = {n: {k: x for k, x in v.items() if k != "path"} for n, v in variants.items()}
    record = {"gate_split": gate.split, "fp32_gate_top1": gate.fp32_top1, "chosen": chosen, "variants": report}
    if chosen is None:  # fp32 alone is published; int8 is a speed-up, never a reason to fail
        found = {n: f"drop {v['drop']:.4f}, batch diff {v['batch_max_prob_diff']:.0e}" for n, v in variants.items()}
        record["why_none"] = (f"no int8 model loses at most {gate.ex.max_int8_drop:.2%} {gate.split} top-1 and "
                              f"scores an image alike in any batch ({found})")  # fmt: skip
        log.warning("%s: publishing fp32 only (raise export.calibration_images, or set export.quantize=false "
                    "to skip int8)", record["why_none"])  # fmt: skip
    return record


def _fp16(fp32: Path, dest: Path, gate: Gate, external: bool) -> float:
    """The fp16 variant for GPU serving (inputs and outputs stay float32), held to one answer
    per image in any batch; returns its spread."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    save_model(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), dest, external)
    spread = gate.spread(dest)
    if spread > gate.ex.max_abs_diff:
        raise ParityError(f"{dest.name} scores an image differently in another batch (probabilities differ by "
                          f"{spread:.1e})")  # fmt: skip
    return spread


def _serving_candidates(
    parity: dict[str, Any], published: dict[str, Path], ov_variants: dict[str, dict[str, Any]], timings: dict
) -> dict[str, tuple[str, str]]:
    """Each way to serve that passed its gates, by its timing name: (published file, runtime).
    OpenVINO serves model.int8.onnx only when that file is the static int8 it was gated on."""
    serving = {"onnxruntime_fp32": ("model.onnx", "onnxruntime")}
    if "model.int8.onnx" in published:
        serving[f"onnxruntime_int8_{parity['int8_method']}"] = ("model.int8.onnx", "onnxruntime")
    for name, v in ov_variants.items():
        v.update(timings.get(name, {}))
        file = "model.int8.onnx" if "int8" in name else "model.onnx"
        if v["passed"] and (file == "model.onnx" or parity.get("int8_method") == "static"):
            serving[name] = (file, "openvino")
    return serving


def _encoder_onnx(cfg: Config, args: dict, example: torch.Tensor, dest: Path, gate: Gate, metadata: dict[str, str],
                  external: bool) -> tuple[float, float]:  # fmt: skip
    """The pre-trained encoder as a feature extractor ([batch, embed_dim]), held to parity with
    PyTorch and to one answer per image in any batch; returns (max |diff|, batch spread)."""
    data, ex = gate.data, gate.ex
    encoder = feature_extractor(cfg.model.preset, data.img_size, data.channels, cfg.outputs().encoder)
    extractor = Features(encoder, args["mean"], args["std"]).eval()
    to_onnx(extractor, example, dest, ["features"], ex.opset,
            {**metadata, "output": "features: float32 [batch, embed_dim]"}, external)  # fmt: skip
    with torch.no_grad():
        ref = extractor(example).numpy()
    got = open_session(dest, "cpu", ex.threads).run(["features"], {"pixels": example.numpy()})[0]
    diff = float(np.abs(got - ref).max())
    if diff > ex.max_abs_diff:
        raise ParityError(f"encoder ONNX parity failed: {diff:.2e}")
    spread = gate.spread(dest, "features")
    if spread > ex.max_abs_diff:
        raise ParityError(f"encoder.onnx gives an image other features in another batch (they differ by {spread:.1e})")
    return diff, spread


def _publish(published: dict[str, Path], tmp: Path, out: Path) -> None:
    """Every gate passed: each file (and its external data) renamed into ``out``; the optional
    files this run did not make are removed, so none is left from an earlier model."""
    for name, src in published.items():
        if src.name != name and data_file(src).exists():  # an int8 variant with external data
            save_model(onnx.load(str(src)), tmp / name, external=True)
            src = tmp / name
        move_model(src, out / name)
    for stale in ("model.int8.onnx", "model.fp16.onnx", "encoder.onnx"):
        if stale not in published:
            (out / stale).unlink(missing_ok=True)
            data_file(out / stale).unlink(missing_ok=True)


def _metadata(cfg: Config, args: dict, data: PreparedData, model_path: Path, chosen: str) -> dict[str, str]:
    """What a served file says about itself: classes, input and serving transform, provenance."""
    return {
        "classes": json.dumps(args["classes"]), "img_size": str(args["img_size"]), "channels": str(args["in_chans"]),
        "mean": json.dumps(args["mean"]), "std": json.dumps(args["std"]), "input": "pixels: float32 NCHW in [0, 1]",
        "model_sha256": file_sha256(model_path), "params_hash": cfg.section_hash("model", "finetune", "hpo"),
        "data_hash": args.get("data_hash", ""), "mae_ops_version": __version__, "preset": args["preset"],
        "crop_pct": str(data.crop_pct),  # serving's transform: resize to img_size / crop_pct, centre crop
        "bit_depth": str(data.bit_depth),  # serving's decoder: 16/32-bit integer files' 0..2**bits - 1 -> 0..255
        "deployed": chosen,  # which of the pipeline's classifiers this is (finetune | linprobe)
    }  # fmt: skip


def deployed_checkpoint(cfg: Config) -> tuple[Path, str]:
    """(checkpoint, name) of the model `evaluate` chose on the validation split
    (reports/eval/deployed.json); the fine-tuned model, with a warning, before any evaluation."""
    record = cfg.outputs().deployed
    if not record.exists():
        path = cfg.outputs().finetune_model
        if not path.exists():
            raise InputError(f"{path} not found: run `mae-ops finetune` first")
        log.warning("%s not found: exporting the fine-tuned model (run `mae-ops evaluate` first to ship the best "
                    "model on the validation split)", record)  # fmt: skip
        return path, "finetune"
    deployed = json.loads(record.read_text())
    path = Path(deployed["checkpoint"])
    if not path.exists() or file_sha256(path) != deployed["checkpoint_sha256"]:
        raise InputError(f"{record} names {path} as it was when evaluated, and it has changed or gone since: "
                         "run `mae-ops evaluate` again")  # fmt: skip
    log.info("exporting %s: %s", deployed["model"], deployed["why"])
    return path, deployed["model"]


def _onnx_runner(path: Path, threads: int, runtime: str = "onnxruntime") -> Callable[[np.ndarray], object]:
    session = open_session(path, "cpu", threads, runtime)
    return lambda x: session.run(["logits"], {"pixels": x})


def run(cfg: Config) -> dict:
    ex = cfg.export
    torch.set_num_threads(ex.threads)
    model_path, chosen = deployed_checkpoint(cfg)
    model, args = load_classifier(model_path)
    data = PreparedData(cfg.data.out_dir)
    test_ids = data.indices("test")
    if len(test_ids) == 0:
        raise InputError("the test split is empty: parity needs test images")
    deployable = Deployable(model, args["mean"], args["std"]).eval()
    arch = preset_config(args["preset"])
    metadata = _metadata(cfg, args, data, model_path, chosen)
    one = np.asarray(data.eval_images[test_ids[:1]], dtype=np.float32) / 255.0
    batch = np.asarray(data.eval_images[np.resize(test_ids, 32)], dtype=np.float32) / 255.0

    out, outs = Path(ex.out_dir), cfg.outputs()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out) as tmp_dir:
        tmp = Path(tmp_dir)
        example = torch.from_numpy(batch[:2])
        view = Deployable(export_view(model), args["mean"], args["std"]).eval()  # same math, fusible attention
        # past export.external_data_mb of weights, tensors go to a .data file beside each .onnx
        external = weights_bytes(view) > ex.external_data_mb * 2**20
        if external:
            log.info("%.0f MiB of weights: each model's tensors go to <name>.onnx.data beside it",
                     weights_bytes(view) / 2**20)  # fmt: skip
        raw = tmp / ("model.raw.onnx" if ex.fuse else "model.onnx")
        to_onnx(view, example, raw, ["logits", "probabilities"], ex.opset, metadata, external)
        fused: dict[str, int] = {}
        if ex.fuse:
            fused = fuse(raw, tmp / "model.onnx", int(arch["num_heads"]), int(arch["embed_dim"]))

        # --- parity gate: the whole test split, onnxruntime vs PyTorch, in batches --------
        parity = _parity(deployable, open_session(tmp / "model.onnx", "cpu", ex.threads), data, test_ids,
                         ex.max_abs_diff)  # fmt: skip
        parity["fused_operators"] = fused
        parity["deployed"] = chosen
        write_json(outs.parity, parity)
        if not parity["passed"]:
            raise ParityError(
                f"ONNX parity failed: max |logit diff| {parity['max_abs_diff']:.2e} (allowed {ex.max_abs_diff:.0e}), "
                f"top-1 agreement {parity['top1_agreement']:.4f}; {out} left as it was"
            )
        # --- one answer per image: the same probabilities alone and in batches of 7 and 256 -----
        gate = Gate.measure(ex, data, tmp / "model.onnx")
        parity["batch_max_prob_diff"] = {"model.onnx": gate.spread(tmp / "model.onnx")}
        if parity["batch_max_prob_diff"]["model.onnx"] > ex.max_abs_diff:
            write_json(outs.parity, parity)
            spread = parity["batch_max_prob_diff"]["model.onnx"]
            raise ParityError(f"model.onnx scores an image differently in another batch (probabilities differ by "
                              f"{spread:.1e} > export.max_abs_diff)")  # fmt: skip
        published = {"model.onnx": tmp / "model.onnx"}
        runners = {"torch_eager": lambda x: _torch_logits(deployable, x),
                   "onnxruntime_fp32": _onnx_runner(tmp / "model.onnx", ex.threads)}  # fmt: skip

        # --- int8: both kinds scored on the validation split, the faster passing one kept ------
        variants: dict[str, dict[str, Any]] = {}
        use_openvino = ex.openvino and ex.benchmark_runs > 0 and openvino_installed()
        if ex.quantize:
            variants = _int8_variants(tmp / "model.onnx", tmp, gate)
            runners.update({f"onnxruntime_int8_{n}": _onnx_runner(v["path"], ex.threads) for n, v in variants.items()})
        # --- OpenVINO: the peer on the unfused graph with its defaults, and as a runtime ------
        ov_variants: dict[str, dict[str, Any]] = {}
        if use_openvino:
            runners["openvino_default"] = _openvino_default(raw, ex.threads)
            ov_files = {"openvino_fp32": tmp / "model.onnx"}
            if variants.get("static", {}).get("passed"):
                ov_files["openvino_int8_static"] = variants["static"]["path"]
            ov_variants = {n: _gated(path, "openvino", gate) for n, path in ov_files.items()}
            runners.update({n: _onnx_runner(v["path"], ex.threads, "openvino") for n, v in ov_variants.items()})
        # every model timed in one interleaved run on this machine
        timings = measure_all(runners, one, batch, ex.benchmark_runs) if ex.benchmark_runs else {}
        if ex.quantize:
            parity["int8"] = _settle_int8(variants, timings, gate)
            write_json(outs.parity, parity)
            method = parity["int8"]["chosen"]
            if method is not None:
                parity["batch_max_prob_diff"]["model.int8.onnx"] = variants[method]["batch_max_prob_diff"]
                parity["int8_top1"] = _top1(open_session(variants[method]["path"], "cpu", ex.threads), data, test_ids)
                parity.update(int8_drop=parity["onnx_top1"] - parity["int8_top1"], int8_max_drop=ex.max_int8_drop,
                              int8_method=method)  # fmt: skip
                published["model.int8.onnx"] = variants[method]["path"]

        if ex.fp16:
            parity["batch_max_prob_diff"]["model.fp16.onnx"] = _fp16(tmp / "model.onnx", tmp / "model.fp16.onnx",
                                                                     gate, external)  # fmt: skip
            published["model.fp16.onnx"] = tmp / "model.fp16.onnx"

        # --- which file, with which runtime, serves: the fastest against the peer ---------------
        serving = _serving_candidates(parity, published, ov_variants, timings)
        if ov_variants:
            parity["openvino"] = {"gate_split": gate.split, "fp32_gate_top1": gate.fp32_top1,
                                  "variants": {n: {k: x for k, x in v.items() if k != "path"}
                                               for n, v in ov_variants.items()}}  # fmt: skip
        peer = "openvino_default" if "openvino_default" in timings else "onnxruntime_fp32"
        pick = choose_published(timings, list(serving), peer)
        file, runtime = serving[pick["variant"]]
        if runtime == "onnxruntime":  # scored on the test split above
            test_top1 = parity["int8_top1"] if file == "model.int8.onnx" else parity["onnx_top1"]
        else:
            test_top1 = _top1(open_session(published[file], "cpu", ex.threads, runtime), data, test_ids)
        speed = {k: x for k, x in timings.get(pick["variant"], {}).items() if k != "batch1_p95_ms"}
        parity["published"] = {**pick, "file": file, "runtime": runtime, "test_top1": test_top1, **speed}
        for name, path in published.items():  # the runtime each classifier file was measured fastest with
            if name.startswith("model.") and name != "model.fp16.onnx":
                fastest = choose_published(timings, [v for v, (f, _) in serving.items() if f == name], peer)
                set_metadata(path, {**metadata_of(path), "runtime": serving[fastest["variant"]][1]})

        # --- the pre-trained encoder as a feature extractor -----------------------
        if ex.encoder:
            parity["encoder_max_abs_diff"], parity["batch_max_prob_diff"]["encoder.onnx"] = _encoder_onnx(
                cfg, args, example, tmp / "encoder.onnx", gate, metadata, external
            )
            published["encoder.onnx"] = tmp / "encoder.onnx"
        _publish(published, tmp, out)  # every gate passed
    parity["files"] = {
        path.name: path.stat().st_size for name in published for path in (out / name, data_file(out / name))
        if path.exists()
    }  # fmt: skip
    write_json(outs.parity, parity)
    if ex.benchmark_runs:
        bench = _benchmark_report(timings, args, model_path, ex)
        write_json(outs.benchmark, bench | {"peer": parity["published"]["peer"],
                                                        "published": parity["published"]["variant"]})  # fmt: skip
    log.info("exported %s: max |diff| %.2e, top-1 agreement %.4f; fused %s", ", ".join(published),
             parity["max_abs_diff"], parity["top1_agreement"], fused or "nothing")  # fmt: skip
    return parity


def _openvino_default(path: Path, threads: int) -> Callable[[np.ndarray], object]:
    """The peer: OpenVINO on the unfused fp32 graph as a user would first run it, its default
    settings (dynamic batch; bf16 where the CPU has it), with the stage's thread count."""
    session = OpenVINOSession(path, threads, tuned=False)
    return lambda x: session.run(["logits"], {"pixels": x})


def _torch_logits(deployable: nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return deployable(torch.from_numpy(x))[0]


def _benchmark_report(timings: dict[str, dict], args: dict, model_path: Path, ex: ExportConfig) -> dict:
    """The speed of this export's models, measured by the stage on this machine."""
    base = timings["torch_eager"]
    for t in timings.values():
        if t:
            t["batch1_speedup_vs_torch"] = round(base["batch1_p50_ms"] / t["batch1_p50_ms"], 2)
            t["batch32_speedup_vs_torch"] = round(t["batch32_images_per_s"] / base["batch32_images_per_s"], 2)
    return {"model": args["preset"], "model_sha256": file_sha256(model_path), "measured_by": "mae-ops export",
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S"), **machine(),
            "threads": {"torch_intra_op": torch.get_num_threads(), "onnxruntime_intra_op": ex.threads},
            "input": [int(args["in_chans"]), int(args["img_size"]), int(args["img_size"])],
            "runs_batch1": ex.benchmark_runs, "results": timings}  # fmt: skip
