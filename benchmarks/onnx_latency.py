"""Serving latency: torch eager vs onnxruntime fp32 vs int8 on the CPU.

    python benchmarks/onnx_latency.py --threads 2

p50/p95 latency at batch 1 and throughput at batch 32 on real test images;
prints one JSON object and writes reports/export/benchmark.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mae_ops.atomic import write_json
from mae_ops.models.classifier import load_classifier
from mae_ops.serving import open_session
from mae_ops.stages.export import Deployable


def _latency_ms(fn: Callable[[], object], runs: int, warmup: int = 10) -> np.ndarray:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return np.array(times)


def _measure(batch1: Callable[[], object], batch32: Callable[[], object], runs: int) -> dict:
    one = _latency_ms(batch1, runs)
    many = _latency_ms(batch32, max(10, runs // 10))
    return {
        "batch1_p50_ms": round(float(np.percentile(one, 50)), 3),
        "batch1_p95_ms": round(float(np.percentile(one, 95)), 3),
        "batch32_images_per_s": round(32 / (float(np.median(many)) / 1e3), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/finetune/model.pth"))
    ap.add_argument("--export-dir", type=Path, default=Path("models/export"))
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("reports/export/benchmark.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    images = np.load(args.data / "images.npy", mmap_mode="r")
    split = np.load(args.data / "split.npy")
    pixels = np.asarray(images[np.flatnonzero(split == 2)[:32]], dtype=np.float32) / 255.0
    model, meta = load_classifier(args.model)
    eager = Deployable(model, meta["mean"], meta["std"]).eval()
    x1, x32 = torch.from_numpy(pixels[:1]), torch.from_numpy(pixels)

    def torch_run(x: torch.Tensor) -> Callable[[], object]:
        def fn() -> object:
            with torch.inference_mode():
                return eager(x)

        return fn

    results = {"torch_eager": _measure(torch_run(x1), torch_run(x32), args.runs)}
    for name, file in (("onnxruntime_fp32", "model.onnx"), ("onnxruntime_int8", "model.int8.onnx")):
        path = args.export_dir / file
        if not path.exists():
            continue
        sess = open_session(path, "cpu", args.threads)
        results[name] = _measure(lambda s=sess: s.run(["logits"], {"pixels": pixels[:1]}),
                                 lambda s=sess: s.run(["logits"], {"pixels": pixels}), args.runs)  # fmt: skip
    base = results["torch_eager"]["batch1_p50_ms"]
    for r in results.values():
        r["batch1_speedup_vs_torch"] = round(base / r["batch1_p50_ms"], 2)
    report = {
        "model": meta["preset"],
        "model_sha256": hashlib.sha256(args.model.read_bytes()).hexdigest(),  # the run summary shows only its own
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "input": [int(s) for s in pixels.shape[1:]],
        "threads": {"torch_intra_op": torch.get_num_threads(), "onnxruntime_intra_op": args.threads},
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "runs_batch1": args.runs,
        "results": results,
    }
    write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
