"""The numbers the README quotes, written from the committed result files.

    python benchmarks/figures.py           # rewrite every generated block
    python benchmarks/figures.py --check   # exit 1 naming each block that differs from its results

README.md and benchmarks/results/README.md hold blocks between
``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->``; each is the output of the
function NAME below, which reads only committed JSON (reports/, benchmarks/results/).
A result quoted outside such a block is a bug: `tests/test_figures.py` fails when a
block and its results disagree.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mae_ops.study import label

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "benchmarks/results/README.md")
BLOCK = re.compile(r"(<!-- figures:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /figures:(?P=name) -->)", re.S)
RESULTS = "benchmarks/results"
BLOCKS: dict[str, Callable[[Path], str]] = {}


def block(fn: Callable[[Path], str]) -> Callable[[Path], str]:
    BLOCKS[fn.__name__.replace("_", "-")] = fn
    return fn


def _json(root: Path, rel: str) -> Any:
    return json.loads((root / rel).read_text())


def _pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f} %"


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table's lines."""
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + ["| " + " | ".join(map(str, r)) + " |"
                                                                          for r in rows]  # fmt: skip


def _count(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60)}:{round(seconds % 60):02d}"


# --------------------------------------------------------------------- the demo
@block
def demo(root: Path) -> str:
    """README command 1: the pipeline on the embedded digits, as the committed reports have it."""
    m, ft = _json(root, "reports/metrics.json"), _json(root, "reports/finetune/metrics.json")
    base, run = _json(root, "reports/baselines/metrics.json"), _json(root, "reports/pipeline/run.json")
    stages = {s["stage"]: s for s in run["stages"]}
    timed = ("prepare", "pretrain", "finetune", "baselines", "evaluate", "export")
    assert all(stages[s]["ran"] for s in timed), "reports/pipeline/run.json is not a run of every stage"
    total = sum(stages[s]["seconds"] for s in timed)
    others = {k: v["top1"] for k, v in m.items() if k != "finetune"}
    strongest = max(others, key=others.get)
    names = {
        "linprobe": "the linear probe on the frozen encoder (tuned on the validation split)",
        "scratch": "the same ViT from scratch",
        "logreg_pixels": "logistic regression on raw pixels",
        "knn_pixels": "k-NN on raw pixels",
        "knn_mae": "k-NN on the MAE features",
    }
    trials = sum(ft["hpo"]["counts"].values())
    per_stage = ", ".join(f"{name} {stages[name]['seconds']:.0f} s" for name in timed)
    lines = [
        f"On {run['cores']} CPU cores the six stages took {_mmss(total)} in the run that wrote `dvc.lock` "
        f"({per_stage}; the pre-training monitor on). A small ViT (6 blocks, 128 wide, patch 4) is pre-trained on the "
        f"digits, tuned ({trials} trials) and fine-tuned on {ft['num_labelled']} labels and reaches "
        f"**{_pct(m['finetune']['top1'])}** test top-1. The strongest baseline with the same labels and test "
        f"split is {names.get(strongest, strongest)}: {_pct(others[strongest])} "
        f"({100 * (m['finetune']['top1'] - others[strongest]):+.1f} points for MAE fine-tuning);",
        "; ".join(f"{names.get(k, k)} {_pct(v)}" for k, v in others.items() if k != strongest)
        + f" (the scratch ViT tuned by its own {base['scratch']['search']['trials']}-trial search).",
    ]
    return "\n".join(lines) + "\n"


@block
def pretrain_monitor(root: Path) -> str:
    """The encoder scored during the demo's pre-training (reports/pretrain/history.csv)."""
    import csv

    with open(root / "reports/pretrain/history.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("probe_val_top1")]
    pre = _json(root, "reports/pretrain/metrics.json")
    cells = ", ".join(f"{r['epoch']}: {_pct(float(r['knn_val_top1']), 1)} / {_pct(float(r['probe_val_top1']), 1)}"
                      for r in rows)  # fmt: skip
    spent = sum(float(r["monitor_s"]) for r in rows)
    return (
        f"In the demo (`reports/pretrain/history.csv`), epoch: k-NN / linear probe validation top-1 — {cells}; "
        f"the {len(rows)} scorings took {spent:.1f} s of the {pre['train_time_s']:.0f} s of pre-training "
        f"({100 * spent / pre['train_time_s']:.1f} %).\n"
    )


# ----------------------------------------------------------------------- export
@block
def export_table(root: Path) -> str:
    bench = _json(root, "reports/export/benchmark.json")
    names = {
        "torch_eager": "PyTorch eager",
        "onnxruntime_fp32": "ONNX fp32, fused",
        "onnxruntime_int8_dynamic": "ONNX int8 dynamic, fused (answers depend on the batch: never published)",
        "onnxruntime_int8_static": "ONNX int8 static (QDQ), fused",
        "openvino_default": "OpenVINO's default, unfused fp32 graph (the peer)",
        "openvino_fp32": "OpenVINO, fp32 fused, static shapes",
        "openvino_int8_static": "OpenVINO, int8 static (QDQ), static shapes",
    }
    chosen = _json(root, "reports/export/parity.json").get("int8", {}).get("chosen")
    published = bench.get("published") or (f"onnxruntime_int8_{chosen}" if chosen else "onnxruntime_fp32")
    peer = bench.get("peer", "torch_eager")
    lines = [
        f"On the demo model, {bench['cores']} CPU cores ({bench['cpu']}), {bench['threads']['onnxruntime_intra_op']} "
        f"threads each, measured by the export stage on {bench['measured'][:10]} (`reports/export/benchmark.json`):",
        "",
    ]
    ref = bench["results"][peer]
    rows = [[names.get(key, key) + (" (**published**)" if key == published else ""), f"{r['batch1_p50_ms']:.2f} ms",
             f"{ref['batch1_p50_ms'] / r['batch1_p50_ms']:.2f}×", f"{_n(r['batch32_images_per_s'])} img/s",
             f"{r['batch32_images_per_s'] / ref['batch32_images_per_s']:.2f}×", f"{r['batch1_speedup_vs_torch']:.2f}×"]
            for key, r in bench["results"].items()]  # fmt: skip
    short = "OpenVINO" if peer == "openvino_default" else names.get(peer, peer)
    lines += _table(["model", "batch 1 p50", f"vs {short}", "batch 32", f"vs {short}", "batch 1 vs torch"], rows)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ prepare
@block
def prepare_scale(root: Path) -> str:
    r = _json(root, f"{RESULTS}/cpu-prepare_scale-224px.json")
    head = ["images (distinct JPEGs)", "prepare", "images/s", "peak RSS (stage + workers)", "store",
            "+1 % re-prepare", "ratio", "files hashed / decoded", "moved between splits"]  # fmt: skip
    rows = []
    for n, run in r["runs"].items():
        g = run["re_prepare_1pct"]
        rows.append([f"{int(n):,}", f"{run['seconds']:.1f} s", f"{run['images_per_s']:.0f}",
                     f"{run['peak_rss_tree_mb']:,} MB", f"{run['store_mb'] / 1024:.1f} GB", f"{g['seconds']:.1f} s",
                     f"{100 * g['ratio_to_full']:.1f} %", f"{g['hashed']:,} / {g['decoded']:,}",
                     g["moved_between_splits"]])  # fmt: skip
    lines = _table(head, rows)
    cold = all(run.get("page_cache_dropped") for run in r["runs"].values())
    lines += [
        "",
        f"({r['cores']} cores, {r['img_size']} px stored at 256; every picture distinct; "
        + (
            "the page cache dropped before each timed run, so files came from disk)"
            if cold
            else "files possibly in the page cache)"
        ),
    ]
    return "\n".join(lines) + "\n"


@block
def store_size(root: Path) -> str:
    r = _json(root, f"{RESULTS}/cpu-store_size-224px.json")["by_store_size"]
    sides = list(r)
    psnr = ", ".join(f"{r[s]['crop_psnr_db']:.2f} dB at {s}" for s in sides)
    disk = " / ".join(f"{r[s]['store_gb_per_100k']:.1f}" for s in sides)
    return (
        f"a pre-training crop cut from the store is {psnr} (PSNR against the same crop cut from the original), "
        f"for {disk} GB per 100,000 images.\n"
    )


@block
def trust_check(root: Path) -> str:
    r = _json(root, f"{RESULTS}/cpu-trust_check-cifar10.json")
    lines = [
        f"`benchmarks/trust_check.py` on {r['images']:,} CIFAR-10 JPEGs ({r['classes']} class folders), "
        f"`benchmarks/results/cpu-trust_check-cifar10.json`: " + ("every check passed" if r["ok"] else "**FAILED**"),
        "",
    ]
    rows = [[name.replace("_", " "), "yes" if c["ok"] else "NO", c.get("moved_between_splits", "–"),
             c.get("pixels_not_the_files", "–"), _count(c.get("hashed")), _count(c.get("decoded"))]
            for name, c in r["checks"].items()]  # fmt: skip
    lines += _table(["check", "passed", "moved between splits", "stored pixels not the file's", "files hashed",
                     "decoded"], rows)  # fmt: skip
    return "\n".join(lines) + "\n"


@block
def large_export(root: Path) -> str:
    r = _json(root, f"{RESULTS}/cpu-large_export-vit_h14.json")
    return (
        f"`benchmarks/large_export.py` runs a real ViT-H/14 (random weights) through export, fusion and "
        f"onnxruntime on a CPU: {r['files']['model.onnx.data'] / 1e9:.2f} GB in `model.onnx.data`, a "
        f"{r['files']['model.onnx'] / 1e3:.0f} KB `model.onnx`, max |diff| {r['max_abs_diff']:.1e} (export "
        f"{r['export_s']:.0f} s, fusion {r['fuse_s']:.0f} s, loading {r['load_s']:.0f} s); it needs about 8x the "
        f"weights in RAM while it runs ({r['peak_rss_gib']:.0f} GiB for ViT-H).\n"
    )


@block
def predict_throughput(root: Path) -> str:
    r = _json(root, f"{RESULTS}/cpu-predict_throughput.json")
    return (
        f"`benchmarks/predict_throughput.py` measures it: {r['images']:,} PNG digits at "
        f"{_n(r['images_per_s'])} images/s end to end with `{Path(r['model']).name}` on {r['cores']} cores "
        f"(decoding alone {_n(r['decode_only_images_per_s'])} images/s).\n"
    )


# ------------------------------------------------------------------- the study
def _study_table(r: dict, scores: tuple[str, ...]) -> list[str]:
    groups: dict[str, dict[Any, list[dict]]] = {}
    for row in r["rows"]:
        groups.setdefault(row["key"], {}).setdefault(row["value"], []).append(row)
    head = {"knn_top1": "k-NN", "linprobe_top1": "linear probe", "finetune_top1": "fine-tune"}
    rows = []
    for key, by in groups.items():
        values = list(by)
        cells = [" / ".join(f"{100 * sum(x[s] for x in by[v]) / len(by[v]):.1f}" for v in values) + " %"
                 for s in scores]  # fmt: skip
        loss = " / ".join(f"{sum(x['final_loss'] for x in by[v]) / len(by[v]):.3f}" for v in values)
        rows.append([f"{key} {' / '.join(label(key, v) for v in values)}", *cells, loss])
    lines = _table(["setting (mean over seeds)", *(head[s] for s in scores), "final loss"], rows)
    return lines


def _study(
    root: Path, name: str, checks: str = "The planned checks (the paper's directions, Holm-adjusted over the family):"
) -> str:
    r = _json(root, f"{RESULTS}/{name}/results.json")
    seeds = sorted({row["seed"] for row in r["rows"]})
    n_val = r["rows"][0]["num_val"]
    lines = [
        f"{len({row['run'] for row in r['rows']})} pre-training runs, seeds {seeds}, {n_val:,} validation images "
        f"(`{RESULTS}/{name}/results.json`):",
        "",
        *_study_table(r, ("knn_top1", "linprobe_top1", "finetune_top1")),
        "",
        checks,
        "",
    ]
    lines += [f"- {d}" for d in r["directions"]]
    return "\n".join(lines) + "\n"


@block
def study_cifar10(root: Path) -> str:
    return _study(root, "study-cifar10")


@block
def study_digits(root: Path) -> str:
    return _study(root, "study-digits")


@block
def continue_cifar10(root: Path) -> str:
    return _study(root, "continue-cifar10", "The planned checks (continued against scratch, Holm-adjusted):")


# ------------------------------------------------------------------------- GPU
def _runs(root: Path) -> dict[str, dict]:
    return {run["preset"]: run for run in _json(root, f"{RESULTS}/h200-pretrain_throughput.json")["runs"]}


@block
def gpu_throughput(root: Path) -> str:
    data = _json(root, f"{RESULTS}/h200-pretrain_throughput.json")
    names = {
        "reference": "2021's timm stand-in (explicit attention, fp16 + GradScaler, eager)",
        "plain": "plain (`pretrain.fast: off`)",
        "fast": "**fast**",
        "fast_fp8": "fast + FP8",
    }
    lines = []
    for preset, run in _runs(root).items():
        head = [f"{preset} on an {data['device_name']} ({data['torch']})", "batch", "images/s",
                f"MFU ({data['peak_tflops']:.0f})", "peak GiB"]  # fmt: skip
        rows = [[names.get(r["mode"], r["mode"]), r["batch_size"], _n(r["images_per_s"]), f"{100 * r['mfu']:.1f} %",
                 f"{r['peak_memory_gib']:.1f}"] for r in run["results"]]  # fmt: skip
        lines += [*_table(head, rows), ""]
    return "\n".join(lines)


@block
def gpu_honest(root: Path) -> str:
    """fast against the official code as people run it today (issue 25's H200 measurements)."""
    peers = _json(root, f"{RESULTS}/h200-official-peers-issue25.json")
    fast = next(r for r in _runs(root)["mae_vit_base_patch16"]["results"] if r["mode"] == "fast")
    official, compiled = peers["official_fp16_amp"]["images_per_s"], peers["official_compiled_bf16"]["images_per_s"]
    return (
        f"ViT-B/16 on an H200: fast {_n(fast['images_per_s'])} img/s is **{fast['images_per_s'] / official:.2f}x** "
        f"the official `models_mae.py` on current timm with the recipe's fp16 AMP ({_n(official)} img/s) and "
        f"**{fast['images_per_s'] / compiled:.2f}x** of the official model with bf16, `torch.compile` and fused "
        f"AdamW ({_n(compiled)} img/s): so far the fast path is what PyTorch gives anyone. (Peers measured as "
        f"reported in issue 25, `{RESULTS}/h200-official-peers-issue25.json`; ours from "
        f"`{RESULTS}/h200-pretrain_throughput.json`. The comparison in one run of our benchmark is still to do.)\n"
    )


@block
def peer_rehearsal(root: Path) -> str:
    """The peers and ours on the same weights, batches and masks (a CPU run of the benchmark)."""
    data = _json(root, f"{RESULTS}/cpu-pretrain-peers.json")
    (run,) = data["runs"]
    gaps = {k: v for k, v in run["curve_gaps"].items() if v is not None}
    worst = max(gaps.values())
    official = data["peers"]["official"]
    return (
        f"Rehearsed on this project's 2-core CPU (fp32, `{run['preset']}` at {run['img_size']} px RGB, "
        f"`{RESULTS}/cpu-pretrain-peers.json`): {len(gaps)} ways to run the step ({', '.join(sorted(gaps))}) "
        f"trained {len(run['results'][0]['loss_curve'])} steps from the same weights on the same batches and "
        f"masks, and every curve's largest gap to the official code's (facebookresearch/mae at "
        f"`{official['commit'][:7]}`) is {worst:.2g}: the peers run the same function as ours, so their speeds "
        f"compare like for like. (A CPU says nothing of GPU speed.)\n"
    )


@block
def loader_throughput(root: Path) -> str:
    """The host loader against the GPU's step rate (benchmarks/loader_throughput.py)."""
    r = _json(root, f"{RESULTS}/cpu-loader-throughput.json")
    feed, store = r["to_feed_the_gpu"], r["store"]
    seq, rnd = (d["mb_per_s"] for d in r["disk"])
    rows = []
    for name, row in feed.items():
        if isinstance(row, dict):
            rows.append([name, _n(row["best_images_per_s"]), row["with_workers"], _n(row["images_per_s_per_core"]),
                         row["cores_to_feed_gpu"]])  # fmt: skip
    lines = [
        f"A store of {_n(store['images'])} images at {store['side_px']} px ({store['gib']} GiB, this machine has "
        f"{r['ram_gib']} GiB of RAM; the page cache dropped first), batches of {r['batch_size']}, {r['cpu_count']} "
        f"cores; the disk reads {_n(seq)} MB/s in sequence and {_n(rnd)} MB/s in random rows. Feeding "
        f"{_n(feed['gpu_images_per_s'])} img/s (ViT-B/16 on an H200) takes {_n(feed['disk_mb_per_s'])} MB/s of "
        f"{store['side_px']}-px rows.",
        "",
        *_table(
            ["the host path, reading", "best img/s", "loader processes", "img/s per core", "cores for the GPU"], rows
        ),
        "",
        f"Crop, flip and normalise run on the GPU; on a CPU run they cost "
        f"{_n(feed['cpu_augment_images_per_s_per_core'])} img/s per core at {r['crop_px']} px.",
    ]
    ra = _json(root, f"{RESULTS}/cpu-loader-randaug.json")
    aug, by = ra["randaug"], ra["randaug"]["images_per_s_by_workers"]
    lines += [
        "",
        f"Fine-tuning's RandAugment (`{aug['spec']}`, PIL, per image) runs in the loader processes "
        f"(`finetune.num_workers`): on {ra['store']['side_px']}-px images "
        + ", ".join(f"{_n(v)} img/s with {k}" for k, v in by.items())
        + f" ({aug['best_over_main_process']}x the main process alone; `cpu-loader-randaug.json`), "
        f"{_n(aug['images_per_s_per_core'])} img/s per core.",
    ]
    return "\n".join(lines) + "\n"


def _seeds(n: int) -> str:
    return "" if n == 1 else f", mean of {n} seeds"


def _speedrun_recipe(root: Path, name: str) -> str:
    """One wall-clock budget spent several ways on the CIFAR-10 subset (benchmarks/speedrun_recipe.py)."""
    r = _json(root, f"{RESULTS}/{name}.json")
    s = r["summary"]
    rows = [[f"`{v['name']}`", "scratch" if v["pretrain_share"] == 0 else f"{v['pretrain_share']:.2f}",
             " ".join(f"`{x}`" for x in v["sets"]) or "–", f"{v['epochs']['pretrain']} + {v['epochs']['finetune']}",
             f"{v['predicted_wall_s']:.0f} / {v['measured_wall_s']:.0f}", _pct(v["test_top1"])]
            for v in r["variants"]]  # fmt: skip
    noise = (
        "one seed per variant"
        if s["seed_spread"] is None
        else f"two seeds of one setting differ by {100 * s['seed_spread']:.2f} points, the noise any margin here "
        "has to clear"
    )
    head = ["variant", "pre-training share", "overrides", "epochs (pre-train + fine-tune)",
            "seconds predicted / measured", "test top-1"]  # fmt: skip
    lines = [
        f"Each variant: {r['budget_s']:.0f} s of pre-training + fine-tuning on the CIFAR-10 subset "
        f"(`{r['data']}`, 32 px; {' '.join(f'`{x}`' for x in r['sets'])}; device: {r['device']}), scored on the "
        f"{r['variants'][0]['num_test']:,} test photos, each setting by the mean of its seeds. Best with "
        f"pre-training: `{s['best']}` ({_pct(s['best_test_top1'])}{_seeds(s['best_seeds'])}); the ViT from random "
        f"weights at the same budget: {_pct(s['scratch_test_top1'])}{_seeds(s['scratch_seeds'])} (margin "
        f"{100 * s['margin_over_scratch']:+.2f} points); {noise} "
        f"(`benchmarks/results/{name}.json`).",
        "",
        *_table(head, rows),
        "",
        f"![speedrun recipe, {r['budget_s']:.0f} s](benchmarks/results/{name}.png)",
    ]
    return "\n".join(lines) + "\n"


@block
def speedrun_recipe(root: Path) -> str:
    """The speedrun recipe study at 300 s a variant."""
    return _speedrun_recipe(root, "cpu-cifar10-speedrun-recipe")


@block
def speedrun_recipe_long(root: Path) -> str:
    """The same study's deciding variants at four times the budget."""
    return _speedrun_recipe(root, "cpu-cifar10-speedrun-recipe-1200s")


@block
def recipe_search(root: Path) -> str:
    """What the fine-tuning search chose between the recipes (benchmarks/recipe_search.py)."""
    r = _json(root, f"{RESULTS}/cpu-cifar-recipe-search.json")
    best, chosen = r["best_val_top1_by_recipe"], r["chosen"]
    rows = [[t["trial"], f"`{t['recipe']}`", t["base_lr"], t["layer_decay"], t["state"].lower(),
             "–" if t["val_top1"] is None else _pct(t["val_top1"], 1)] for t in r["trials"]]  # fmt: skip
    lines = [
        f"On the CIFAR-10 subset ({_n(r['counts']['train'])} training photos, {r['num_labelled']} of them labelled, "
        f"{r['img_size']} px; {r['pretrain_epochs']} pre-training epochs, {len(r['trials'])} trials of "
        f"{r['trial_epochs']} epochs, params.yaml's recipe left at the schema's `reference`), the search chose "
        f"**`{chosen['recipe']}`** (best validation top-1 by recipe: `small-data` {_pct(best['small-data'], 1)}, "
        f"`reference` {_pct(best['reference'], 1)}); the final model, {r['finetune_epochs']} epochs with the chosen "
        f"params, scored {_pct(r['final']['val_top1'], 1)} on validation "
        f"(`benchmarks/results/cpu-cifar-recipe-search.json`).",
        "",
        *_table(["trial", "recipe", "base lr", "layer decay", "state", "val top-1"], rows),
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------ the results index
def _h100(root: Path, preset: str) -> str:
    plain, fast = (_json(root, f"{RESULTS}/h100-{preset}-{m}.json")["images_per_s"] for m in ("plain", "fast"))
    return f"{preset}: plain {_n(plain)} → fast {_n(fast)} img/s ({fast / plain:.2f}×)"


def _h200(root: Path) -> str:
    out = []
    for preset, run in _runs(root).items():
        by = {f"{r['mode']}@{r['batch_size']}": r["images_per_s"] for r in run["results"]}
        out.append(
            f"{preset}: fast@256 {_n(by['fast@256'])} img/s, {by['fast@256'] / by['reference@256']:.2f}× the "
            f"2021-timm stand-in at batch 256"
        )
    return "; ".join(out)


def _prepare_line(root: Path) -> str:
    r = _json(root, f"{RESULTS}/cpu-prepare_scale-224px.json")
    n = max(r["runs"], key=int)
    run = r["runs"][n]
    return (
        f"{int(n):,} distinct JPEGs in {run['seconds']:.0f} s, peak {run['peak_rss_tree_mb']:,} MB; +1 % in "
        f"{100 * run['re_prepare_1pct']['ratio_to_full']:.1f} % of that"
    )


def _study_line(root: Path, name: str) -> str:
    r = _json(root, f"{RESULTS}/{name}/results.json")
    significant = sum(1 for t in r["tests"] if t.get("p_holm") is not None and t["p_holm"] < 0.05)
    runs = len({row["run"] for row in r["rows"]})
    return f"{runs} pre-training runs, {len(r['tests'])} planned checks, {significant} significant after Holm"


def _speedrun_recipe_line(root: Path, name: str) -> str:
    s = _json(root, f"{RESULTS}/{name}.json")["summary"]
    return (
        f"the speedrun's budget spent several ways on the CIFAR-10 subset (a micro model): best with pre-training "
        f"{s['best']}, {100 * s['margin_over_scratch']:+.2f} points over the ViT from random weights (its own recipe)"
    )


@block
def bit_depth(root: Path) -> str:
    r = _json(root, f"{RESULTS}/cpu-bit_depth-cifar10.json")
    f, default, twelve = r["frames"], r["prepared"]["16"]["grey_levels"], r["prepared"]["12"]["grey_levels"]
    text = (
        f"`benchmarks/bit_depth.py` on {f['files']:,} CIFAR-10 photos made into {f['sensor_bits']}-bit grey frames "
        f"(16-bit PNGs, exposure {f['exposure'][0]:g} to {f['exposure'][1]:g} of full scale), "
        f"`benchmarks/results/cpu-bit_depth-cifar10.json`: read on 0..65535 (the default) a stored image keeps a "
        f"median of {default['median']:.0f} grey levels (its brightest pixel {default['brightest_median']:.0f}); "
        f"with `data.bit_depth=12`, {twelve['median']:.0f} (brightest {twelve['brightest_median']:.0f})."
    )
    if "prepared_high_word" in r:
        wrong, right = r["prepared_high_word"]["12"], r["prepared_high_word"]["16"]
        text += (
            f" The same frames saved by a camera that keeps its 12 bits in the word's high bits: at "
            f"`data.bit_depth=12` prepare reported {wrong['clipped']:,} of {r['high_word_frames']['files']:,} "
            f"files clipped (a stored image's median brightest pixel {wrong['grey_levels']['brightest_median']:.0f}); "
            f"at the default, {right['clipped']:,} clipped and a median of "
            f"{right['grey_levels']['median']:.0f} grey levels. The correct readings clipped "
            f"{r['prepared']['16']['clipped']:,} and {r['prepared']['12']['clipped']:,} files."
        )
    if "speedrun" in r:
        sr = r["speedrun"]
        text += (
            f" The CIFAR-10 speedrun on each ({sr['budget_s']:.0f} s on this CPU, a micro ViT, the same "
            f"{sr['16']['epochs']['pretrain']} + {sr['16']['epochs']['finetune']} epochs): test top-1 "
            f"{_pct(sr['16']['test_top1'])} read on 0..65535, {_pct(sr['12']['test_top1'])} with "
            f"`data.bit_depth=12` (validation {_pct(sr['16']['val_top1'])}, {_pct(sr['12']['val_top1'])})."
        )
    return text + "\n"


@block
def results_index(root: Path) -> str:
    large = _json(root, f"{RESULTS}/cpu-large_export-vit_h14.json")
    predict = _json(root, f"{RESULTS}/cpu-predict_throughput.json")
    rows = [
        (
            "`h100-mae_vit_{base,large}_patch16-{plain,fast}.json`",
            "H100 80GB HBM3, torch 2.11",
            "commit `abc798a`, before the session-2 fast-path work",
            "batch 256, 224 px; `plain` stood in for the reference. "
            + "; ".join(_h100(root, p) for p in ("mae_vit_base_patch16", "mae_vit_large_patch16")),
        ),
        (
            "`h100-pretrain-stage-mnist-8ep.json`",
            "same",
            "same",
            f"the pretrain stage on the demo digits on CUDA: "
            f"{_n(_json(root, f'{RESULTS}/h100-pretrain-stage-mnist-8ep.json')['images_per_s'])} img/s",
        ),
        (
            "`h200-pretrain_throughput.json`",
            "H200 (141 GB), torch 2.11+cu130, torchao 0.17",
            "sources `be85b8a4bee7a4e7`",
            "`gpu_check.sh` run 1: 224 px, each mode with a 40-step loss curve; `reference` is 2021's timm "
            "(explicit attention), not the official code on current timm. " + _h200(root),
        ),
        (
            "`h200-official-peers-issue25.json`",
            "H200",
            "the official MAE code (not ours)",
            "the official `models_mae.py` on current timm, as reported in issue 25: "
            + ", ".join(
                f"{k} {_n(v['images_per_s'])} img/s"
                for k, v in _json(root, f"{RESULTS}/h200-official-peers-issue25.json").items()
                if isinstance(v, dict)
            ),
        ),
        (
            "`h200-gpu_check-run1-summary.json`",
            "same",
            "same",
            "the verdict of run 1: the throughput steps passed; the pipeline step failed at once (a wheel missing)",
        ),
        (
            "`h200-gpu_check-run2-e2e-partial.json`, `h200-e2e-pretrain-reconstruction.png`",
            "same",
            "same",
            "run 2: `mae-ops pipeline` on CUDA ran prepare, pretrain and the search and was stopped by the time limit "
            "in the final fine-tune; baselines, evaluate and export have not run on CUDA",
        ),
        (
            "`cpu-large_export-vit_h14.json`",
            "2-core CPU, 24 GiB, torch 2.14",
            "its commit",
            f"ViT-H/14 with external data: max abs diff {large['max_abs_diff']:.1e}",
        ),
        ("`cpu-store_size-224px.json`", "same", "its commit", "PSNR of pre-training crops per stored side"),
        ("`cpu-prepare_scale-224px.json`", "same", "see its `code`", _prepare_line(root)),
        (
            "`cpu-trust_check-cifar10.json`",
            "same",
            "see its `code`",
            "renames, relabels, duplicates, same-size replacement, a decoder change, fresh vs incremental, a user "
            "dependency: "
            + ("all passed" if _json(root, f"{RESULTS}/cpu-trust_check-cifar10.json")["ok"] else "FAILED"),
        ),
        (
            "`cpu-predict_throughput.json`",
            "same",
            "see its `code`",
            f"`mae-ops predict` end to end: {_n(predict['images_per_s'])} img/s",
        ),
        (
            "`cpu-loader-throughput.json`",
            "same",
            "see its `commit`",
            "the host loader from a store larger than RAM: "
            + ", ".join(
                f"{k} {_n(v['best_images_per_s'])} img/s"
                for k, v in _json(root, f"{RESULTS}/cpu-loader-throughput.json")["to_feed_the_gpu"].items()
                if isinstance(v, dict)
            ),
        ),
        (
            "`cpu-loader-randaug.json`",
            "same",
            "see its `commit`",
            "the same benchmark on a 3.7 GiB store: RandAugment in 0, 1, 2 loader processes: "
            + ", ".join(
                f"{_n(v)} img/s"
                for v in _json(root, f"{RESULTS}/cpu-loader-randaug.json")["randaug"][
                    "images_per_s_by_workers"
                ].values()
            ),
        ),
        (
            "`cpu-pretrain-peers.json`",
            "same",
            "see its `code`",
            "the throughput benchmark's peers rehearsed: the official code, its compiled variant and Hugging Face's "
            "ViTMAE train the same loss curve as ours from the same weights, batches and masks",
        ),
        (
            "`cpu-cifar-recipe-search.json`",
            "same",
            "see its `commit`",
            "the fine-tuning search choosing the recipe on the CIFAR-10 subset: "
            + _json(root, f"{RESULTS}/cpu-cifar-recipe-search.json")["chosen"]["recipe"],
        ),
        (
            "`cpu-cifar10-speedrun-recipe.json`, `.png`",
            "same",
            "see its `code` (and the `scratch-own-recipe` row's)",
            _speedrun_recipe_line(root, "cpu-cifar10-speedrun-recipe"),
        ),
        (
            "`cpu-cifar10-speedrun-recipe-1200s.json`, `.png`",
            "same",
            "see its `code`",
            _speedrun_recipe_line(root, "cpu-cifar10-speedrun-recipe-1200s") + ", at 4x the budget",
        ),
        (
            "`cpu-bit_depth-cifar10.json`",
            "same",
            "see its `code`",
            "12-bit frames read at data.bit_depth 16 and 12: grey levels kept, files clipped (also as a "
            "high-word camera saves them), and the speedrun on each",
        ),
        ("`study-cifar10/`", "same", "see `results.json`", _study_line(root, "study-cifar10")),
        ("`study-digits/`", "same", "see `results.json`", _study_line(root, "study-digits")),
        (
            "`continue-cifar10/`",
            "same",
            "see `results.json`",
            "continued pre-training vs scratch: " + _study_line(root, "continue-cifar10"),
        ),
    ]
    lines = _table(["file", "card, torch", "code", "what"], [list(r) for r in rows])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ machinery
def render(text: str, root: Path) -> tuple[str, list[str]]:
    """``text`` with every block rewritten from the results, and the names of those that changed."""
    changed: list[str] = []

    def one(m: re.Match) -> str:
        name = m.group("name")
        if name not in BLOCKS:
            raise SystemExit(f"unknown figures block {name!r}; known: {sorted(BLOCKS)}")
        body = BLOCKS[name](root)
        if body != m.group("body"):
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(one, text), changed


def check(root: Path = ROOT) -> list[str]:
    """``doc: block`` for every generated block that disagrees with its results."""
    out = []
    for doc in DOCS:
        out += [f"{doc}: {name}" for name in render((root / doc).read_text(), root)[1]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only say which blocks differ (exit 1 if any)")
    args = ap.parse_args()
    if args.check:
        stale = check(ROOT)
        print("\n".join(stale) or "every block agrees with its results")
        sys.exit(1 if stale else 0)
    for doc in DOCS:
        text, changed = render((ROOT / doc).read_text(), ROOT)
        (ROOT / doc).write_text(text)
        print(f"{doc}: {', '.join(changed) or 'unchanged'}")


if __name__ == "__main__":
    main()
