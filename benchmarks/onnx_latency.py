"""Serving latency, measured again: torch eager vs the exported ONNX models on the CPU.

    python benchmarks/onnx_latency.py --threads 2

`mae-ops export` already measures every variant it made (fp32 fused, dynamic and
static int8, with onnxruntime and OpenVINO) into reports/export/benchmark.json; this
script re-measures the published files with both runtimes (e.g. on the serving
machine) with the same code: p50/p95
latency at batch 1 and throughput at batch 32 on real test images; it prints
one JSON object and writes --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mae_ops.atomic import write_json
from mae_ops.deploy import Deployable, machine, measure_all
from mae_ops.models.classifier import load_classifier
from mae_ops.reporting import file_sha256
from mae_ops.serving import open_session, openvino_installed
from mae_ops.store import open_eval_images


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
    images = open_eval_images(args.data, json.loads((args.data / "manifest.json").read_text()))
    test = np.flatnonzero(np.load(args.data / "split.npy") == 2)
    batch = np.asarray(images[np.resize(test, 32)], dtype=np.float32) / 255.0
    model, meta = load_classifier(args.model)
    eager = Deployable(model, meta["mean"], meta["std"]).eval()

    def torch_run(x: np.ndarray) -> object:
        with torch.inference_mode():
            return eager(torch.from_numpy(x))

    runners = {"torch_eager": torch_run}
    runtimes = ["onnxruntime", *(["openvino"] if openvino_installed() else [])]
    for runtime in runtimes:
        for kind, file in (("fp32", "model.onnx"), ("int8_static", "model.int8.onnx")):
            path = args.export_dir / file
            if path.exists():
                sess = open_session(path, "cpu", args.threads, runtime)
                runners[f"{runtime}_{kind}"] = lambda x, s=sess: s.run(["logits"], {"pixels": x})
    results = measure_all(runners, batch[:1], batch, args.runs)
    base = results["torch_eager"]
    for r in results.values():
        r["batch1_speedup_vs_torch"] = round(base["batch1_p50_ms"] / r["batch1_p50_ms"], 2)
        r["batch32_speedup_vs_torch"] = round(r["batch32_images_per_s"] / base["batch32_images_per_s"], 2)
    report = {
        "model": meta["preset"],
        "model_sha256": file_sha256(args.model),  # the run summary shows only its own model's figures
        "measured_by": "benchmarks/onnx_latency.py",
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **machine(),
        "input": [int(s) for s in batch.shape[1:]],
        "threads": {"torch_intra_op": torch.get_num_threads(), "onnxruntime_intra_op": args.threads},
        "runs_batch1": args.runs,
        "results": results,
    }
    write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
