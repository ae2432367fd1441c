"""Where a pre-training step spends its time: torch.profiler over a few steps of
one benchmark mode, the top operators by device (or CPU) time as a table and JSON.

    python benchmarks/profile_step.py --preset mae_vit_base_patch16 --mode fast --out reports/benchmarks
    python benchmarks/profile_step.py --preset mae_vit_base_patch16 --mode official_compiled --official-repo ../mae

Uses the benchmark's own step (benchmarks/pretrain_throughput.py), so the
profile is of exactly what the throughput numbers measure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import import_official
from pretrain_throughput import MODES, StepBench

from mae_ops.atomic import write_json, write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mae_vit_tiny_patch4")
    ap.add_argument("--mode", default="fast", choices=list(MODES))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--official-repo", type=Path, default=None, help="a clone of facebookresearch/mae")
    ap.add_argument("--out", type=Path, default=Path("reports/benchmarks"))
    args = ap.parse_args()

    official = import_official(args.official_repo) if args.official_repo else None
    bench = StepBench.create(args.preset, args.mode, args.batch_size, args.device, args.compile_mode, official)
    for _ in range(5):  # compile and warm up outside the profile
        bench.train_step(*bench.ready)
    bench.sync()
    cuda = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            bench.train_step(*bench.ready)
        bench.sync()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1
    rows = [
        {
            "op": e.key,
            "calls_per_step": round(e.count / args.steps, 1),
            "ms_per_step": round(getattr(e, attr) / 1e3 / args.steps, 3),
            "share": round(getattr(e, attr) / total, 4),
        }
        for e in events[: args.top]
    ]
    stem = f"profile-{args.preset}-{args.mode}-{bench.device.type}"
    table = prof.key_averages().table(sort_by=attr, row_limit=args.top)
    write_text(args.out / f"{stem}.txt", table)
    write_json(args.out / f"{stem}.json", {"preset": args.preset, "mode": args.mode, "batch_size": args.batch_size,
                                           "device": str(bench.device), "steps": args.steps, "top": rows})  # fmt: skip
    print(table)


if __name__ == "__main__":
    main()
