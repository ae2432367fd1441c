"""`mae-ops predict` throughput on a folder of image files.

    python benchmarks/predict_throughput.py --images 10000 --model models/export/model.int8.onnx

Writes N PNG files at the model's size (the prepared test images, repeated) to a
temporary folder, then predicts them as `mae-ops predict` does (decoding in
worker processes, batches through one onnxruntime session, records streamed)
and prints one JSON object: images/s end to end, and for the decoding alone.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mae_ops.deploy import machine
from mae_ops.serving import ModelInfo, _decoded, expand_paths, open_session, predict_files
from mae_ops.store import open_eval_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/export/model.int8.onnx"))
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()

    images = open_eval_images(args.data, json.loads((args.data / "manifest.json").read_text()))
    test = np.flatnonzero(np.load(args.data / "split.npy") == 2)
    session = open_session(args.model, "cpu", args.threads)
    info = ModelInfo.from_session(session)
    with tempfile.TemporaryDirectory(prefix="predict-bench-") as tmp:
        for i in range(args.images):
            img = np.asarray(images[test[i % len(test)]])
            Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(f"{tmp}/{i:06d}.png")
        files = expand_paths([tmp])
        t0 = time.perf_counter()
        decoded = sum(1 for _ in _decoded(files, info, args.workers))
        decode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        records = sum(1 for r in predict_files(session, files, 3, args.batch_size, args.workers) if "top" in r)
        total_s = time.perf_counter() - t0
    report = {
        "model": str(args.model), "images": len(files), "predicted": records, "decoded": decoded,
        "workers": args.workers, "onnxruntime_threads": args.threads, "batch_size": args.batch_size,
        "images_per_s": round(len(files) / total_s, 1), "decode_only_images_per_s": round(decoded / decode_s, 1),
        "seconds": round(total_s, 2), **machine(),
    }  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
