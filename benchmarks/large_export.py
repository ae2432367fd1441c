"""A model past protobuf's 2 GiB limit through the export path: ViT-H/14 (632M
parameters, 2.5 GB of fp32 weights, random init) exported with its tensors in a
data file beside the .onnx, fused by onnxruntime's optimizer, loaded from another
folder, and checked against PyTorch. Prints and writes one JSON.

    python benchmarks/large_export.py --preset mae_vit_huge_patch14 --out reports/benchmarks/large_export.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mae_ops.atomic import write_json
from mae_ops.deploy import Deployable, data_file, export_view, fuse, is_external, to_onnx, weights_bytes
from mae_ops.models.classifier import build_classifier
from mae_ops.models.presets import preset_config
from mae_ops.serving import open_session, run_logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mae_vit_huge_patch14")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--out", type=Path, default=Path("reports/benchmarks/large_export.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    model = build_classifier(args.preset, args.img_size, 3, 1000).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # a head that separates classes: top-1 is meaningful
    arch = preset_config(args.preset)
    view = Deployable(export_view(model), [0.5] * 3, [0.25] * 3).eval()
    report: dict = {"preset": args.preset, "parameters": sum(p.numel() for p in model.parameters()),
                    "weights_bytes": weights_bytes(view)}  # fmt: skip
    pixels = torch.rand(2, 3, args.img_size, args.img_size)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        t0 = time.perf_counter()
        to_onnx(view, pixels, tmp / "raw.onnx", ["logits", "probabilities"], 18, {"preset": args.preset}, True)
        report["export_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        fused = fuse(tmp / "raw.onnx", tmp / "model.onnx", int(arch["num_heads"]), int(arch["embed_dim"]))
        report["fuse_s"] = round(time.perf_counter() - t0, 1)
        report["fused_operators"] = fused
        moved = tmp / "served"
        moved.mkdir()
        for path in (tmp / "model.onnx", data_file(tmp / "model.onnx")):
            shutil.move(str(path), moved / path.name)
        report["files"] = {p.name: p.stat().st_size for p in moved.iterdir()}
        report["external"] = is_external(moved / "model.onnx")
        t0 = time.perf_counter()
        session = open_session(moved / "model.onnx", "cpu", 2)
        report["load_s"] = round(time.perf_counter() - t0, 1)
        x = pixels.numpy()
        got = run_logits(session, x)
        with torch.inference_mode():
            ref = view(pixels)[0].numpy()
        report["max_abs_diff"] = float(np.abs(got - ref).max())
        report["top1_agreement"] = float((got.argmax(1) == ref.argmax(1)).mean())
        report["metadata_preset"] = session.get_modelmeta().custom_metadata_map.get("preset")
    report["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    report["passed"] = bool(
        report["external"] and report["max_abs_diff"] < 1e-3 and report["top1_agreement"] == 1.0
        and report["files"]["model.onnx"] < 2**31 and report["metadata_preset"] == args.preset
    )  # fmt: skip
    write_json(args.out, report)
    print(json.dumps(report, indent=2))
    if not report["passed"]:
        raise SystemExit("large export check failed")


if __name__ == "__main__":
    main()
