"""MAE pre-training throughput against the official code: images/s, achieved TFLOP/s,
MFU, peak memory, loss curves, the input pipeline against the training step, and the
encoder speed-up from masking.

    python benchmarks/pretrain_throughput.py --official-repo ../mae \
        --preset mae_vit_base_patch16 --preset mae_vit_large_patch16 --peak-tflops 989 \
        --modes official@64,official@256,official_compiled@256,hf_compiled@256,fast@256

Ways to run the same MAE step, per preset (``--modes``, each ``name`` or
``name@batch``; the official recipe's per-GPU batch is 64). The peers run their own
code (benchmarks/peers.py says exactly what each does):

  official           facebookresearch/mae's models_mae.py, imported from the clone
                     ``--official-repo`` names, with its engine's per-step work: fp16 AMP
                     + GradScaler, AdamW (0.9, 0.95), the loss read back, a sync per step
  official_compiled  the same model with bf16, torch.compile, fused AdamW, no sync per step
  hf_compiled        transformers' ViTMAEForPreTraining (SDPA), bf16, compiled, fused AdamW

Ours, on the stage's own code (mae_ops/pretraining.py: ``train_step``, the step
``train_one_epoch`` repeats, with ``augment``, ``build_optimizer``, ``compile_model``,
``DeviceBatches`` / ``batch_loader``):

  plain      the pre-training stage with ``pretrain.fast: off``: bf16, eager,
             unfused AdamW, SDPA attention, no per-step sync
  fast       the stage's default on CUDA (``pretrain.fast: auto``): plus
             torch.compile (``--compile-mode``), fused AdamW, data on the device
  fast_fp8   fast plus ``pretrain.fp8`` (torchao float8 matmuls, sm89+ only)
  fast_cudagraphs, fast_autotune
             fast compiled with ``reduce-overhead`` (CUDA graphs) or
             ``max-autotune-no-cudagraphs`` in place of ``--compile-mode``
  reference  2021's timm stand-in: our model with explicit (non-SDPA) attention, fp16
             autocast with a GradScaler, eager, unfused AdamW, a host sync per step (the
             official step on the timm 0.3.2 the official code pinned; not today's official)

Before timing, each mode trains ``--curve-steps`` steps from the same initial weights
(ours; each peer loads them) on the same batches and the same masks (structured
synthetic images, so the loss has something to learn); the JSON holds every curve and
each mode's largest relative gap to the ``official`` curve of the same batch size (the
``reference`` one when the official code did not run), smoothed over 10 steps. A
speed-up counts only with a matching curve. The summary gives our best mode's ratio over
each peer at that peer's best batch, and issue 25's goals (>= 2.2x official,
>= 1.5x official_compiled, MFU >= 40 %).

Measured per mode: ``step`` (forward + backward + update on a ready batch), ``input``
(loader + on-device crop/flip/normalise alone) and ``end_to_end`` (both). On a CPU
every mode runs in fp32. Images are synthetic uint8 (speed does not depend on pixel
values, but the loss curve does) unless ``--data`` names a prepared folder.
Prints and writes one JSON (default reports/benchmarks/pretrain_throughput-<device>.json).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers

from mae_ops.atomic import write_json
from mae_ops.config import PretrainConfig
from mae_ops.data import DeviceBatches, PreparedData, set_epoch
from mae_ops.models.mae import MaskedAutoencoderViT, create_mae
from mae_ops.models.presets import preset_config
from mae_ops.pretraining import Trainer, augment, build_optimizer, compile_model, make_loader, train_step, use_fp8
from mae_ops.reporting import git_revision
from mae_ops.runtime import resolve_device, use_fast_cuda_kernels
from mae_ops.store import StoreWriter, write_table

MODES = {
    "reference": {"amp": torch.float16, "fast": False, "sdpa": False, "sync_per_step": True},
    "plain": {"amp": torch.bfloat16, "fast": False, "sdpa": True, "sync_per_step": False},
    "fast": {"amp": torch.bfloat16, "fast": True, "sdpa": True, "sync_per_step": False},
    "fast_fp8": {"amp": torch.bfloat16, "fast": True, "sdpa": True, "sync_per_step": False, "fp8": True},
}
# fast with another torch.compile mode: CUDA graphs (no launch gaps), or Inductor's autotuned
# matmul / attention kernels (minutes of compilation at ViT-L)
MODES["fast_cudagraphs"] = {**MODES["fast"], "compile_mode": "reduce-overhead"}
MODES["fast_autotune"] = {**MODES["fast"], "compile_mode": "max-autotune-no-cudagraphs"}
# the peers, each run by its own code (benchmarks/peers.py); their batches come from the device
# as fast's do, so end_to_end compares steps, not loaders
PEERS = {
    "official": {"amp": torch.float16, "fast": True, "sdpa": True, "sync_per_step": True, "peer": "official"},
    "official_compiled": {"amp": torch.bfloat16, "fast": True, "sdpa": True, "sync_per_step": False,
                          "peer": "official", "compiled": True},
    "hf_compiled": {"amp": torch.bfloat16, "fast": True, "sdpa": True, "sync_per_step": False, "peer": "hf",
                    "compiled": True},
}  # fmt: skip
MODES.update(PEERS)
CURVE_SMOOTHING = 10  # steps: a curve is compared by its moving mean


def run_device() -> str:
    """The device a stage-level benchmark's seconds are measured on, as its JSON names it:
    the GPU's name, or the CPU's architecture (a subprocess of this one sees the same)."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU"


def code_version(script: str | Path = __file__) -> dict:
    """Which code produced the numbers: the git commit where there is one, and always
    a hash of the package's sources and the benchmark ``script`` (a copied tree has no .git)."""
    root = Path(__file__).resolve().parent.parent
    sources = [*sorted((root / "src" / "mae_ops").rglob("*.py")), Path(script).resolve()]
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    commit, dirty = git_revision(root), None
    if commit:
        status = subprocess.run(["git", "status", "--porcelain", "--", "src", "benchmarks"], cwd=root,
                                capture_output=True, text=True, timeout=10)  # fmt: skip
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return {"git_commit": commit, "git_dirty": dirty, "sources_sha256": digest.hexdigest()[:16]}


def _sig(x: float, digits: int = 4) -> float:
    """Rounded to significant digits: a micro model on a CPU and ViT-L on a GPU differ by 10^5."""
    return float(f"{x:.{digits}g}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def structured_images(rng: np.random.Generator, n: int, channels: int, size: int, waves: int = 6) -> np.ndarray:
    """(n, channels, size, size) uint8: sums of random plane waves plus noise, images a
    masked autoencoder can learn to fill in (unlike uniform noise), made in a blink."""
    grid = np.linspace(0.0, 1.0, size, dtype=np.float32)
    freq = rng.uniform(-12.0, 12.0, (n, waves, 2)).astype(np.float32)  # cycles per image: structure in every patch
    phase = rng.uniform(0, 2 * np.pi, (n, waves, 1, 1)).astype(np.float32)
    amp = rng.normal(0, 1, (n, waves, channels)).astype(np.float32)
    fields = np.cos(2 * np.pi * (freq[..., 0, None, None] * grid[:, None] + freq[..., 1, None, None] * grid) + phase)
    x = np.einsum("nwhv,nwc->nchv", fields, amp) / np.sqrt(waves)  # (n, C, H, W)
    x += rng.normal(0, 0.02, x.shape).astype(np.float32)
    return np.clip(x * 50 + 128, 0, 255).astype(np.uint8)


def synthetic_prepared(root: Path, n: int, channels: int, size: int) -> PreparedData:
    """A prepared-data folder of structured synthetic uint8 images (the layout `mae-ops prepare` writes)."""
    rng = np.random.default_rng(0)
    writer = StoreWriter(root, (channels, size, size))
    shard, path = writer.new(n)
    images = np.load(path, mmap_mode="r+")
    for start in range(0, n, 32):
        images[start : start + 32] = structured_images(rng, min(32, n - start), channels, size)
    images.flush()
    del images
    writer.seal(shard)
    write_table(root, np.stack([np.full(n, shard), np.arange(n)], 1), np.zeros((n, channels, 2), dtype=np.int64))
    np.save(root / "labels.npy", np.zeros(n, dtype=np.int64))
    np.save(root / "split.npy", np.zeros(n, dtype=np.int8))
    np.save(root / "labelled.npy", np.zeros(n, dtype=bool))
    stats = {"mean": [0.5] * channels, "std": [0.25] * channels}
    write_json(root / "manifest.json", {"classes": ["x"], "content_hash": "synthetic", "shards": writer.names, **stats})
    return PreparedData(root)


def preset_image(preset: str) -> tuple[int, int]:
    """(side, channels) a preset usually sees: the paper's 224 px RGB, or the CPU presets' 28 px digits."""
    return (224, 3) if preset_config(preset)["patch_size"] >= 14 else (28, 1)


def _batches(loader, device: torch.device) -> Iterator[torch.Tensor]:
    """uint8 batches on the device, cycling over epochs."""
    epoch = 0
    while True:
        set_epoch(loader, epoch)
        for imgs, _ in loader:
            yield imgs.to(device, non_blocking=True)
        epoch += 1


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, process max RSS


def set_fused_attention(model: MaskedAutoencoderViT, on: bool) -> None:
    """SDPA (on) or explicit softmax(q k^T) v (off) in every timm attention block."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = on


CURVE_SEED = 1000  # step i of every curve masks with the noise of seed CURVE_SEED + i


class StepBench:
    """One mode's model, optimizer, batches and training step, built from the stage's own
    pieces (a peer's from its own code, starting from our model's weights)."""

    def __init__(self, data: PreparedData, preset: str, mode: str, batch_size: int, device: torch.device,
                 compile_mode: str = "default", num_workers: int = 0, mask_ratio: float = 0.75,
                 official: peers.Official | None = None) -> None:  # fmt: skip
        self.spec, self.device, self.mask_ratio, self.data = MODES[mode], device, mask_ratio, data
        self.amp = self.spec["amp"] if device.type == "cuda" else None
        self.p = PretrainConfig(batch_size=batch_size, mask_ratio=mask_ratio, crop_scale=(0.2, 1.0), hflip=True)
        torch.manual_seed(0)  # every mode starts from the same weights
        self.model = create_mae(preset, data.img_size, data.channels, norm_pix_loss=True).to(device)
        self.num_patches = self.model.patch_embed.num_patches
        set_fused_attention(self.model, self.spec["sdpa"])
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.mask_gen = torch.Generator(device=device)
        loader = make_loader(data, data.indices("train"), batch_size, device, self.spec["fast"], num_workers,
                             shuffle=True, seed=0, drop_last=True)  # fmt: skip
        self.on_device = isinstance(loader, DeviceBatches)
        self.batches = _batches(loader, device)
        self.mean, self.std = (torch.tensor(v, device=device) for v in (data.mean, data.std))
        self.ready = self.next_input()  # one augmented batch, for the step alone
        self.flops = self._count_flops()  # before FP8: every mode is charged the same FLOPs
        self.compile_mode = self.spec.get("compile_mode", compile_mode) if self.spec["fast"] else None
        self.peer: peers.PeerStep | None = None
        if "peer" in self.spec:
            self._build_peer(preset, official)
            return
        self.fp8_layers = use_fp8(self.model, device) if self.spec.get("fp8") else 0
        self.optimizer = build_optimizer(self.model, peers.LR, peers.WEIGHT_DECAY, fused=self.spec["fast"])
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.step_model = compile_model(self.model, self.compile_mode) if self.compile_mode else self.model
        self.trainer = Trainer(self.step_model, self.optimizer, self.scaler, self.autocast, mask_ratio)

    def _build_peer(self, preset: str, official: peers.Official | None) -> None:
        """The peer's model from our initial weights; ours is freed (its memory is not the peer's)."""
        cfg, state = preset_config(preset), {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model = None
        if self.spec["peer"] == "official":
            if official is None:
                raise SystemExit("the official modes need --official-repo (a clone of facebookresearch/mae)")
            model = peers.official_model(official, cfg, self.data.img_size, self.data.channels, state)
        else:
            model = peers.hf_model(cfg, self.data.img_size, self.data.channels, state)
        del state
        compiled = bool(self.spec.get("compiled"))
        self.compile_mode = "default" if compiled else None
        self.fp8_layers = 0
        self.peer = peers.PeerStep(model.to(self.device), self.device, self.mask_ratio, compiled=compiled,
                                   official=official if self.spec["peer"] == "official" else None,
                                   hf=self.spec["peer"] == "hf")  # fmt: skip

    @classmethod
    def create(cls, preset: str, mode: str, batch_size: int, device: str = "auto", compile_mode: str = "default",
               official: peers.Official | None = None):  # fmt: skip
        """On synthetic images of the preset's usual size (RGB for the official model; kept alive with the bench)."""
        img_size, in_chans = preset_image(preset)
        in_chans = 3 if MODES[mode].get("peer") == "official" else in_chans
        tmp = tempfile.TemporaryDirectory()
        data = synthetic_prepared(Path(tmp.name), 4 * batch_size, in_chans, img_size)
        bench = cls(data, preset, mode, batch_size, resolve_device(device), compile_mode, official=official)
        bench._tmp = tmp
        return bench

    def _count_flops(self) -> int:
        """Forward + backward FLOPs of one step, counted on the eager model with explicit
        attention (every matmul visible to the counter), so every mode is charged the same."""
        set_fused_attention(self.model, False)
        with FlopCounterMode(display=False) as counter:
            loss, _, _ = self.model(self.ready[0], self.mask_ratio)
            loss.backward()
        self.model.zero_grad(set_to_none=True)
        set_fused_attention(self.model, self.spec["sdpa"])
        return counter.get_total_flops()

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    def sync(self) -> None:
        _sync(self.device)

    def next_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch, cropped, flipped and normalised on the device, with its masking noise."""
        return augment(next(self.batches), self.p, self.data.img_size, self.mean, self.std, self.num_patches,
                       self.gen)  # fmt: skip

    def train_step(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.peer is not None:
            return self.peer(x, noise)  # the official step reads its loss back itself
        loss = train_step(self.trainer, x, noise)  # the stage's step
        if self.spec["sync_per_step"]:
            loss.item()  # the reference logs the loss of every step
        return loss.detach()

    def curve_step(self, i: int) -> torch.Tensor:
        """Step ``i`` of the loss curve: the next batch, masked by the noise of seed
        CURVE_SEED + i in every mode. The official model draws its noise from the global
        RNG (torch.rand(N, L) in random_masking), seeded here to give the same numbers."""
        x, _ = self.next_input()
        if self.peer is not None and self.spec["peer"] == "official":
            torch.manual_seed(CURVE_SEED + i)
            return self.train_step(x, None)
        self.mask_gen.manual_seed(CURVE_SEED + i)
        noise = torch.rand(x.shape[0], self.num_patches, device=self.device, generator=self.mask_gen)
        return self.train_step(x, noise)

    def end_to_end(self) -> None:
        self.train_step(*self.next_input())


def same_masking_noise(device: torch.device, num_patches: int) -> bool:
    """Does the global RNG seeded with s draw what a fresh generator seeded with s draws
    (what lets the official model, which masks with torch.rand, see our masks)?"""
    torch.manual_seed(CURVE_SEED)
    drawn = torch.rand(4, num_patches, device=device)
    ours = torch.rand(4, num_patches, device=device, generator=torch.Generator(device=device).manual_seed(CURVE_SEED))
    return bool(torch.equal(drawn, ours))


def parse_mode(text: str, default_batch: int) -> tuple[str, int]:
    """'fast' or 'reference@64' -> (mode, batch size)."""
    name, _, batch = text.strip().partition("@")
    if name not in MODES:
        raise SystemExit(f"unknown mode {name!r}: one of {', '.join(MODES)}")
    return name, int(batch) if batch else default_batch


def smoothed(curve: list[float], window: int = CURVE_SMOOTHING) -> np.ndarray:
    return np.convolve(np.asarray(curve, dtype=np.float64), np.ones(window) / window, mode="valid")


def curve_gap(curve: list[float], reference: list[float]) -> float:
    """Largest relative gap between two loss curves' moving means."""
    a, b = smoothed(curve), smoothed(reference)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def bench_mode(args, preset: str, mode: str, batch_size: int, data: PreparedData, device: torch.device,
               official: peers.Official | None = None) -> dict:  # fmt: skip
    bench = StepBench(data, preset, mode, batch_size, device, args.compile_mode, args.num_workers,
                      args.mask_ratio, official)  # fmt: skip
    amp, spec = bench.amp, bench.spec
    precision = str(amp).removeprefix("torch.") if amp else "fp32"
    fused = spec["fast"] if bench.peer is None else bench.peer.compiled and device.type == "cuda"
    result: dict = {"mode": mode, "batch_size": batch_size, "precision": precision,
                    "code": {"official": "facebookresearch/mae", "hf": "transformers"}.get(spec.get("peer"), "mae-ops"),
                    "fp8_linear_layers": bench.fp8_layers,
                    "compile": bench.compile_mode or False, "fused_adamw": fused,
                    "attention": "sdpa" if spec["sdpa"] else "explicit", "data_on_device": bench.on_device}  # fmt: skip
    flops = bench.flops
    t0 = time.perf_counter()  # the curve: the same batches and masks in every mode (compiles on step 1)
    curve = torch.stack([bench.curve_step(i) for i in range(args.curve_steps)])
    curve_list = [_sig(v, 5) for v in curve.float().cpu().tolist()]
    result["curve_and_compile_s"] = round(time.perf_counter() - t0, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = _time(lambda: bench.train_step(*bench.ready), device, args.steps, args.warmup)
    input_s = _time(bench.next_input, device, args.steps, 2)
    with warnings.catch_warnings(record=True) as caught:
        if device.type == "cuda":  # count the host-device syncs the stage's loop makes
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        e2e_s = _time(bench.end_to_end, device, args.steps, 2)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    result.update({
        "images_per_s": round(batch_size / step_s, 1),
        "step_ms": round(step_s * 1e3, 2),
        "gflop_per_image": _sig(flops / batch_size / 1e9),
        "achieved_tflops": _sig(flops / step_s / 1e12),
        "mfu": _sig(flops / step_s / 1e12 / args.peak_tflops) if args.peak_tflops else None,
        "mfu_vs_fp8_peak": _sig(flops / step_s / 1e12 / args.fp8_peak_tflops)
        if args.fp8_peak_tflops and bench.fp8_layers else None,
        "input_images_per_s": round(batch_size / input_s, 1),
        "input_over_step": round(step_s / input_s, 2),  # > 1: the input pipeline outruns the step
        "end_to_end_images_per_s": round(batch_size / e2e_s, 1),
        "host_syncs_per_step": round(syncs / (args.steps + 2), 2) if device.type == "cuda" else None,
        "peak_memory_gib": round(_peak_memory_gib(device), 3),
        "loss_curve": curve_list,
    })  # fmt: skip
    if mode == "plain":  # encoder alone, forward + backward: visible tokens only vs every token

        def encoder_step(ratio: float) -> Callable[[], None]:
            def fn() -> None:
                with bench.autocast():
                    latent, _, _ = bench.model.forward_encoder(bench.ready[0], ratio)
                latent.float().mean().backward()

            return fn

        masked = _time(encoder_step(args.mask_ratio), device, max(3, args.steps // 2), 2)
        full = _time(encoder_step(0.0), device, max(3, args.steps // 2), 2)
        result["encoder_speedup_from_masking"] = round(full / masked, 2)
    return result


def release(device: torch.device) -> None:
    """Free the last mode's model, optimizer and compiled graphs before the next."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", help="repeatable (default: mae_vit_tiny_patch4)")
    ap.add_argument("--modes", default="reference,plain,fast")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=None, help="default: 224 (paper presets) or 28")
    ap.add_argument("--in-chans", type=int, default=None, help="default: 3 (paper presets) or 1")
    ap.add_argument("--data", type=Path, default=None, help="a prepared folder (default: synthetic images)")
    ap.add_argument("--num-images", type=int, default=None, help="synthetic images (default: 8 batches)")
    ap.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                    help="DataLoader workers when the data is not on the device")  # fmt: skip
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the chip's dense bf16 peak, for MFU (H100 SXM / H200: 989)")  # fmt: skip
    ap.add_argument("--fp8-peak-tflops", type=float, default=None, help="dense FP8 peak (H100 SXM / H200: 1979)")
    ap.add_argument("--curve-steps", type=int, default=30, help="steps of the loss curve each mode trains first")
    ap.add_argument("--curve-tolerance", type=float, default=0.02,
                    help="largest relative gap to the reference curve (moving mean) for a speed-up to count",
                    )  # fmt: skip
    ap.add_argument("--recipe-batch", type=int, default=64, help="the official recipe's per-GPU batch")
    ap.add_argument("--official-repo", type=Path, default=os.environ.get("MAE_OFFICIAL_REPO"),
                    help="a clone of facebookresearch/mae (default: $MAE_OFFICIAL_REPO)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    device = resolve_device(args.device)
    args.device_used = str(device)
    if device.type == "cuda":
        use_fast_cuda_kernels()  # as the stage's runtime.setup does
    modes = [parse_mode(m, args.batch_size) for m in args.modes.split(",")]
    official = None
    if any(MODES[m].get("peer") == "official" for m, _ in modes):
        if args.official_repo is None:
            raise SystemExit("the official modes need --official-repo (a clone of facebookresearch/mae)")
        official = peers.import_official(args.official_repo)
    if any(m == "official_compiled" for m, _ in modes):
        # the compiled official model draws its masks with torch.rand inside the graph: aten's
        # generator (not Inductor's own) keeps them the masks every other mode sees
        torch._inductor.config.fallback_random = True
    args.official = official
    out = args.out or Path("reports/benchmarks") / f"pretrain_throughput-{device.type}.json"
    runs: list[dict] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        made: dict[tuple[int, int], PreparedData] = {}
        for preset in args.preset or ["mae_vit_tiny_patch4"]:
            usual_size, usual_chans = preset_image(preset)
            shape = (args.img_size or usual_size, args.in_chans or usual_chans)
            if args.data:
                data = PreparedData(args.data)
            elif shape not in made:
                folder = Path(tmp) / f"{shape[0]}-{shape[1]}"
                folder.mkdir()
                n = args.num_images or 8 * max(b for _, b in modes)
                made[shape] = synthetic_prepared(folder, n, shape[1], shape[0])
            data = data if args.data else made[shape]
            results: list[dict] = []
            for mode, batch in modes:
                try:
                    results.append(bench_mode(args, preset, mode, batch, data, device, official))
                except Exception as exc:  # one mode failing (FP8 kernels, memory) leaves the others measured
                    failed.append(f"{preset} {mode}@{batch}")
                    first_line = (str(exc).strip() or "-").splitlines()[0][:300]
                    error = f"{type(exc).__name__}: {first_line}"
                    print(f"{preset} {mode}@{batch} failed: {error}", file=sys.stderr, flush=True)
                    traceback.print_exc()
                    results.append({"mode": mode, "batch_size": batch, "error": error, "images_per_s": None,
                                    "loss_curve": None})  # fmt: skip
                release(device)
                print(json.dumps({"preset": preset, **{k: v for k, v in results[-1].items() if k != "loss_curve"}}),
                      flush=True)  # fmt: skip
                run = {"preset": preset, "img_size": data.img_size, "in_chans": data.channels, "results": results,
                       **summarise(results, args)}  # fmt: skip
                report = make_report(args, device, [*runs, run])
                write_json(out, report)  # after each mode: a run cut short keeps what it measured
            runs.append(run)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"} | {
        "summary": [{k: v for k, v in run.items() if k != "results"} for run in runs]}, indent=2))  # fmt: skip
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


def make_report(args, device: torch.device, runs: list[dict]) -> dict:
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {
        "device": str(device), "device_name": device_name, "torch": torch.__version__, "code": code_version(),
        "mask_ratio": args.mask_ratio, "compile_mode": args.compile_mode, "steps": args.steps,
        "curve_steps": args.curve_steps, "curve_tolerance": args.curve_tolerance,
        "peak_tflops": args.peak_tflops, "fp8_peak_tflops": args.fp8_peak_tflops, "peers": peer_versions(args),
        "runs": runs,
    }  # fmt: skip


def peer_versions(args) -> dict:
    """Which peer code ran: the official clone's commit and the shims around it, transformers' version."""
    out: dict = {}
    if args.official is not None:
        out["official"] = {"repo": "facebookresearch/mae", "commit": args.official.commit,
                           "compat": args.official.compat}  # fmt: skip
    if any(m == "hf_compiled" for m in (parse_mode(t, 0)[0] for t in args.modes.split(","))):
        import transformers

        out["hf"] = {"transformers": transformers.__version__}
    out["same_masking_noise"] = same_masking_noise(torch.device(args.device_used), 196)
    return out


GOALS = {"official": 2.2, "official_compiled": 1.5}  # issue 25: ours over each peer, each at its best batch
MFU_GOAL = 0.40


def summarise(results: list[dict], args) -> dict:
    """Each mode's curve gap to the baseline of its batch size: the official code's step
    when it ran (``official``), else the 2021-timm stand-in (``reference``). Then the
    speed-ups that count: our fastest mode whose curve matches, over each peer at that
    peer's best batch (and, against the stand-in, at the same batch and at the recipe's)."""
    results = [r for r in results if "error" not in r]
    if not results:
        return {"best": None}
    base_mode = "official" if any(r["mode"] == "official" for r in results) else "reference"
    baseline = {r["batch_size"]: r for r in results if r["mode"] == base_mode}
    gap_key = f"curve_gap_to_{base_mode}"
    curves: dict[str, float | None] = {}
    for r in results:
        ref = baseline.get(r["batch_size"])
        gap = curve_gap(r["loss_curve"], ref["loss_curve"]) if ref is not None and ref is not r else None
        r[gap_key] = None if gap is None else round(gap, 5)
        r["curve_matches"] = None if gap is None else gap <= args.curve_tolerance
        curves[f"{r['mode']}@{r['batch_size']}"] = r[gap_key]
    by_name = {f"{r['mode']}@{r['batch_size']}": r for r in results}
    for r in by_name.values():  # the stage's own claim: fast changes speed, not math
        plain = by_name.get(f"plain@{r['batch_size']}")
        if r["mode"] == "fast" and plain is not None:
            r["curve_gap_to_plain"] = round(curve_gap(r["loss_curve"], plain["loss_curve"]), 5)
    # a mode of ours counts where its curve matched: at a batch without a baseline, where the
    # same mode matched at another batch (the same code; only the batch differs)
    matched = {r["mode"] for r in results if r["curve_matches"]}
    ours = [r for r in results if r["mode"] not in PEERS and r["mode"] != "reference"
            and (r["curve_matches"] or (r["curve_matches"] is None and r["mode"] in matched))]  # fmt: skip
    best = max(ours, key=lambda r: r["images_per_s"], default=None)
    summary: dict = {"baseline": base_mode, "curve_gaps": curves, "best": None}
    if best is not None:
        summary["best"] = f"{best['mode']}@{best['batch_size']}"
        summary["best_mfu"] = best.get("mfu")
        summary["vs"] = {}
        for peer in [*PEERS, "reference"]:
            runs = [r for r in results if r["mode"] == peer]
            if runs:
                top = max(runs, key=lambda r: r["images_per_s"])
                summary["vs"][peer] = {"peer": f"{peer}@{top['batch_size']}", "peer_images_per_s": top["images_per_s"],
                                       "ratio": round(best["images_per_s"] / top["images_per_s"], 3)}  # fmt: skip
        same, recipe = (next((r for r in results if r["mode"] == "reference" and r["batch_size"] == b), None)
                        for b in (best["batch_size"], args.recipe_batch))  # fmt: skip
        for key, ref in (("same_batch", same), ("recipe_batch", recipe)):
            ratio = round(best["images_per_s"] / ref["images_per_s"], 3) if ref else None
            summary[f"speedup_over_reference_{key}"] = ratio
        summary["goals"] = {f"{summary['best']} >= {goal}x {peer}": summary["vs"][peer]["ratio"] >= goal
                            for peer, goal in GOALS.items() if peer in summary["vs"]}  # fmt: skip
        if best.get("mfu") is not None:
            summary["goals"][f"{summary['best']} MFU >= {MFU_GOAL:.0%}"] = best["mfu"] >= MFU_GOAL
    first = smoothed(results[0]["loss_curve"])  # did the curves have anything to show?
    summary["curve_informative"] = bool(len(first) > 1 and first[-1] < 0.95 * first[0])
    return summary


if __name__ == "__main__":
    main()
