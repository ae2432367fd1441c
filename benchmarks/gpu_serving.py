"""Serving speed of the exported classifier on this machine's GPU: the numbers a
deployment team asks for, next to the CPU ones.

    python benchmarks/gpu_serving.py                      # the pipeline's model
    python benchmarks/gpu_serving.py --preset mae_vit_base_patch16 --img-size 224

Timed, interleaved in rounds (``deploy.measure_all``): p50/p95 latency at batch 1
and images/s at ``--batch`` for torch eager (fp32 and fp16 autocast), torch
compiled (fp32 and fp16), onnxruntime with the CUDA execution provider (fp32 and
the fp16 model) and TensorRT where the installed onnxruntime has them, and
onnxruntime on the CPU. Each GPU call includes the host-to-device copy of the
pixels and the copy of the logits back, as a server pays them.

Parity gates, checked here (exit 1 when one fails): every runner's logits
against torch fp32 on the same images (fp32 at most ``--max-abs-diff``, fp16 at
most ``--max-abs-diff-fp16``, top-1 agreement at least ``--min-agreement``).
Writes one JSON (default reports/export/benchmark-gpu.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from mae_ops.atomic import write_json
from mae_ops.deploy import Deployable, export_view, machine, measure_all, to_onnx
from mae_ops.models.classifier import build_classifier, load_classifier
from mae_ops.serving import open_session


def torch_runner(module: torch.nn.Module, device: torch.device, fp16: bool) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
            logits = module(torch.from_numpy(x).to(device, non_blocking=True))[0]
        return logits.float().cpu().numpy()  # the copy back waits for the GPU

    return run


def onnx_runner(path: Path, providers: list) -> Callable[[np.ndarray], np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    if session.get_providers()[0] != (providers[0] if isinstance(providers[0], str) else providers[0][0]):
        raise RuntimeError(f"{providers[0]} did not load (got {session.get_providers()})")
    return lambda x: session.run(["logits"], {"pixels": x})[0]


def the_model(args) -> tuple[torch.nn.Module, dict]:
    if args.preset:  # random weights: the speed of a model of that size
        model = build_classifier(args.preset, args.img_size, 3, args.num_classes)
        return model, {"preset": args.preset, "img_size": args.img_size, "in_chans": 3, "mean": [0.5] * 3,
                       "std": [0.25] * 3, "weights": "random"}  # fmt: skip
    model, meta = load_classifier(args.model)
    return model, {**meta, "weights": str(args.model)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/finetune/model.pth"))
    ap.add_argument("--onnx-dir", type=Path, default=Path("models/export"),
                    help="model.onnx / model.fp16.onnx from `mae-ops export` (made here with --preset)")  # fmt: skip
    ap.add_argument("--preset", default=None, help="time a randomly initialised classifier of this preset instead")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=200, help="batch-1 calls per runner")
    ap.add_argument("--cpu-threads", type=int, default=4)
    ap.add_argument("--no-cpu", action="store_true",
                    help="skip onnxruntime on the CPU (a ViT-B/16 at batch 64 takes seconds a call there)")  # fmt: skip
    ap.add_argument("--max-abs-diff", type=float, default=1e-3)
    ap.add_argument("--max-abs-diff-fp16", type=float, default=5e-2)
    ap.add_argument("--min-agreement", type=float, default=0.99)
    ap.add_argument("--out", type=Path, default=Path("reports/export/benchmark-gpu.json"))
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = the_model(args)
    deployable = Deployable(model, meta["mean"], meta["std"]).eval()
    size, chans = int(meta["img_size"]), int(meta["in_chans"])
    rng = np.random.default_rng(0)
    one = rng.random((1, chans, size, size), dtype=np.float32)
    batch = rng.random((args.batch, chans, size, size), dtype=np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = args.onnx_dir
        if args.preset:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            onnx_dir = Path(tmp)
            view = Deployable(export_view(model), meta["mean"], meta["std"]).eval()
            to_onnx(view, torch.from_numpy(batch[:2]), onnx_dir / "model.onnx", ["logits", "probabilities"], 17, {})
            proto = convert_float_to_float16(onnx.load(str(onnx_dir / "model.onnx")), keep_io_types=True)
            onnx.save(proto, str(onnx_dir / "model.fp16.onnx"))

        runners: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        skipped: dict[str, str] = {}
        on_gpu = deployable.to(device)
        runners["torch_eager_fp32"] = torch_runner(on_gpu, device, fp16=False)
        if device.type == "cuda":
            runners["torch_eager_fp16"] = torch_runner(on_gpu, device, fp16=True)
            compiled = torch.compile(on_gpu, dynamic=False)
            runners["torch_compiled_fp32"] = torch_runner(compiled, device, fp16=False)
            runners["torch_compiled_fp16"] = torch_runner(compiled, device, fp16=True)
        available = ort.get_available_providers()
        for name, provider, file in [
            ("onnxruntime_cuda_fp32", "CUDAExecutionProvider", "model.onnx"),
            ("onnxruntime_cuda_fp16", "CUDAExecutionProvider", "model.fp16.onnx"),
            ("onnxruntime_tensorrt_fp16", ("TensorrtExecutionProvider", {"trt_fp16_enable": True}), "model.onnx"),
        ]:  # fmt: skip
            pname = provider if isinstance(provider, str) else provider[0]
            if device.type != "cuda":
                skipped[name] = "no CUDA device"
                continue
            if pname not in available:
                skipped[name] = f"the installed onnxruntime {ort.__version__} offers only {available}"
                continue
            if not (onnx_dir / file).exists():
                skipped[name] = f"{onnx_dir / file} not found (export.fp16: true makes it)"
                continue
            try:
                runners[name] = onnx_runner(onnx_dir / file, [provider])
            except Exception as exc:  # a provider that fails to load is reported, not fatal
                skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if not args.no_cpu:
            cpu = open_session(onnx_dir / "model.onnx", "cpu", args.cpu_threads)
            runners["onnxruntime_cpu_fp32"] = lambda x: cpu.run(["logits"], {"pixels": x})[0]

        # --- parity against torch fp32, on the benchmark batch
        reference = runners["torch_eager_fp32"](batch)
        parity, failed = {}, []
        for name, fn in runners.items():
            got = fn(batch)
            diff = float(np.abs(got - reference).max())
            agree = float((got.argmax(1) == reference.argmax(1)).mean())
            limit = args.max_abs_diff_fp16 if "fp16" in name else args.max_abs_diff
            ok = diff <= limit and agree >= args.min_agreement
            parity[name] = {"max_abs_diff": diff, "top1_agreement": agree, "max_allowed": limit, "passed": ok}
            failed += [] if ok else [name]
        timings = measure_all(runners, one, batch, args.runs)

    report = {
        "model": meta["preset"], "weights": meta["weights"], "input": [chans, size, size],
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "onnxruntime": ort.__version__, "onnxruntime_providers": available, **machine(),
        "runs_batch1": args.runs, "results": timings, "parity_vs_torch_fp32": parity, "not_measured": skipped,
        "passed": not failed,
    }  # fmt: skip
    write_json(args.out, report)
    print(json.dumps(report, indent=2))
    if failed:
        print(f"parity failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
