"""MAE pre-training throughput: images/s, achieved TFLOP/s, MFU, peak memory,
and the encoder speed-up from dropping masked tokens.

    python benchmarks/pretrain_throughput.py --preset mae_vit_base_patch16 --batch-size 256 --device cuda

Synthetic images (speed does not depend on pixel values); the training step
is the pre-training stage's (same model, optimizer, autocast). Prints one JSON
object and writes it under reports/benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mae_ops.atomic import write_json
from mae_ops.models.mae import create_mae
from mae_ops.models.presets import preset_config
from mae_ops.runtime import resolve_amp, resolve_device
from mae_ops.stages.pretrain import build_optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mae_vit_tiny_patch4")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=None, help="default: 224 (paper presets) or 28")
    ap.add_argument("--in-chans", type=int, default=None, help="default: 3 (paper presets) or 1")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--fused", default="auto", choices=["auto", "on", "off"], help="fused AdamW (auto: CUDA)")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None, help="chip peak, for MFU (H100/H200 bf16: ~790)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    paper = preset_config(args.preset)["patch_size"] >= 14
    img_size = args.img_size or (224 if paper else 28)
    in_chans = args.in_chans or (3 if paper else 1)
    device = resolve_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    torch.manual_seed(0)
    model = create_mae(args.preset, img_size, in_chans, norm_pix_loss=True).to(device)
    fused = args.fused == "on" or (args.fused == "auto" and device.type == "cuda")
    opt = build_optimizer(model, 1e-4, 0.05, fused=fused)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step_model = torch.compile(model) if use_compile else model
    x = torch.randn(args.batch_size, in_chans, img_size, img_size, device=device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else torch.autocast(device.type, enabled=False)

    def train_step() -> None:
        with autocast:
            loss, _, _ = step_model(x, args.mask_ratio)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:  # eager count of one forward + backward
        with autocast:
            loss, _, _ = model(x, args.mask_ratio)
        loss.backward()
    opt.zero_grad(set_to_none=True)
    flops_per_step = counter.get_total_flops()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peak of the training step, not of the flop count
    sec_per_step = _time(train_step, device, args.steps, args.warmup)
    images_per_s = args.batch_size / sec_per_step
    tflops = flops_per_step / sec_per_step / 1e12

    # encoder alone, forward + backward: visible tokens only vs every token
    def encoder_step(ratio: float):
        def fn() -> None:
            with autocast:
                latent, _, _ = model.forward_encoder(x, ratio)
            latent.float().mean().backward()

        return fn

    enc_masked = _time(encoder_step(args.mask_ratio), device, max(3, args.steps // 2), 2)
    enc_full = _time(encoder_step(0.0), device, max(3, args.steps // 2), 2)
    model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30
        device_name = torch.cuda.get_device_name(device)
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    result = {
        "preset": args.preset,
        "img_size": img_size,
        "in_chans": in_chans,
        "batch_size": args.batch_size,
        "mask_ratio": args.mask_ratio,
        "device": str(device),
        "device_name": device_name,
        "precision": str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32",
        "compile": use_compile,
        "fused_adamw": fused,
        "torch": torch.__version__,
        "images_per_s": round(images_per_s, 1),
        "step_ms": round(sec_per_step * 1e3, 2),
        "gflop_per_image": round(flops_per_step / args.batch_size / 1e9, 3),
        "achieved_tflops": round(tflops, 3),
        "mfu": round(tflops / args.peak_tflops, 4) if args.peak_tflops else None,
        "peak_memory_gib": round(peak_mem, 3),
        "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process max RSS",
        "encoder_ms_masked": round(enc_masked * 1e3, 2),
        "encoder_ms_all_tokens": round(enc_full * 1e3, 2),
        "encoder_speedup_from_masking": round(enc_full / enc_masked, 2),
    }
    out = args.out or Path("reports/benchmarks") / f"pretrain_throughput-{args.preset}-{device.type}.json"
    if args.out is None and not (use_compile or fused):
        out = out.with_name(out.stem + "-plain.json")
    write_json(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
