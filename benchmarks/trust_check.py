"""Does the same set of images always give the same data? A new user's checks, on a real folder.

    python benchmarks/trust_check.py /data/cifar10-subset/train --img-size 32 > trust.json

Copies the folder (ImageFolder layout, one folder per class), prepares it with the real
`mae-ops prepare` command, then does what users do to image folders and prepares again
after each step, checking that no sample moved between splits or in or out of the
labelled subset and that every stored image is its file's pixels:

  rename_class_folder   a class folder renamed (`cat` -> `cat_renamed`)
  relabel               files moved to another class folder (a label fixed)
  rename_files          files renamed in place
  duplicates            files copied under new names, in their class and in another class
  same_size_replacement files overwritten by other bytes of the same size, mtime restored (`cp -p`,
                        rsync -a): pairs of files swapped, and JPEGs given other pixels in as many bytes
  decoder_change        another Pillow / decoding code (simulated in-process): every row decoded again
  fresh_vs_incremental  a fresh prepare of the final folder: the same samples, splits, pixels, content_hash
  user_dependency       dvc.yaml with a dependency of the user's: kept when the image folders are listed

Prints one JSON object (each check: ok and its numbers) and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mae_ops import images, preparing
from mae_ops.config import load_params
from mae_ops.data import PreparedData

REPO = Path(__file__).resolve().parents[1]


def _prepare(work: Path, source: Path, img_size: int, out: str = "prepared") -> tuple[dict, float]:
    cmd = [str(Path(sys.executable).parent / "mae-ops"), "prepare", "--set", f"data.source={source}",
           "--set", f"data.img_size={img_size}", "--set", "data.crop_pct=1", "--set", f"data.out_dir={work / out}",
           "--set", "data.label_fraction=0.2"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed:\n{proc.stdout}\n{proc.stderr}")
    manifest = json.loads((work / out / "manifest.json").read_text())
    manifest["reused"] = json.loads(preparing.last_run_path(work / out).read_text())["reused"]
    return manifest, time.perf_counter() - t0


def _index(root: Path) -> dict[str, dict[str, str]]:
    with open(root / "index.csv", newline="") as fh:
        return {r["sample_id"]: r for r in csv.DictReader(fh)}


def _moved(before: dict, after: dict, conflicts: set[str]) -> list[str]:
    """Samples in both whose split or labelled status changed (a sample that became a label
    conflict leaves the labelled splits by design: reported, not counted)."""
    return [k for k in before if k in after and k not in conflicts and (before[k]["split"], before[k]["labelled"])
            != (after[k]["split"], after[k]["labelled"])]  # fmt: skip


def _pixels_are_the_files(root: Path, source: Path, size: int) -> int:
    """How many stored images differ from a fresh decode of the file index.csv names."""
    data = PreparedData(root)
    rows = list(_index(root).values())
    wrong = 0
    for start in range(0, len(rows), 1024):
        block = data.images[start : start + 1024]
        for i, r in enumerate(rows[start : start + 1024]):
            fresh = images.load_image(source / r["file"], size, data.channels, data.bit_depth)
            wrong += not np.array_equal(block[i], fresh)
    return wrong


def _requantize(path: Path) -> bool:
    """Other pixels in the same number of bytes: one entry of a JPEG's quantization table
    changed (a valid file that decodes differently), the file's mtime put back. False for
    a file that is not a JPEG with an 8-bit table."""
    data = bytearray(path.read_bytes())
    at = data.find(b"\xff\xdb")
    if at < 0 or data[at + 4] >> 4 != 0:
        return False
    entry = at + 5 + 10  # a mid-frequency coefficient of the first table
    data[entry] = data[entry] + 7 if data[entry] < 200 else data[entry] - 7
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--files", type=int, default=50, help="files touched by each step")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trust-check-"))
    src = work / "photos"
    shutil.copytree(args.folder, src)
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    report: dict = {"folder": str(args.folder), "classes": len(classes), "checks": {}}
    first, seconds = _prepare(work, src, args.img_size)
    base = _index(work / "prepared")
    report.update(
        images=first["num_images"],
        prepare_s=round(seconds, 1),
        duplicates_found=first["duplicates"]["extra_files"],
        label_conflicts_found=len(first["label_conflicts"]),
    )

    def step(name: str, **extra) -> None:
        manifest, secs = _prepare(work, src, args.img_size)
        after = _index(work / "prepared")
        conflicts = {c["sample_id"] for c in manifest["label_conflicts"]}
        moved = _moved(base, after, conflicts)
        wrong = _pixels_are_the_files(work / "prepared", src, manifest["store_size"])
        ok = not moved and not wrong and all(v for k, v in extra.items() if k.startswith("ok_"))
        reused = manifest["reused"]
        report["checks"][name] = {"ok": ok, "moved_between_splits": len(moved), "label_conflicts": len(conflicts),
                                  "pixels_not_the_files": wrong,
                                  "decoded": reused["decoded"], "hashed": reused["files_hashed"],
                                  "seconds": round(secs, 1), **extra}  # fmt: skip
        print(json.dumps({name: report["checks"][name]}), file=sys.stderr, flush=True)

    def files(cls: str) -> list[Path]:
        return sorted((src / cls).iterdir())

    renamed = f"{classes[0]}_renamed"
    (src / classes[0]).rename(src / renamed)
    step("rename_class_folder", ok_labels=True)
    index = {r["file"]: r for r in _index(work / "prepared").values()}
    report["checks"]["rename_class_folder"]["ok"] &= all(r["label"] == renamed for f, r in index.items()
                                                         if f.startswith(renamed + "/") and r["label"])  # fmt: skip

    moved_files = files(classes[1])[: args.files]
    for f in moved_files:
        f.rename(src / classes[2] / f"from_{classes[1]}_{f.name}")
    step("relabel")
    index = {r["file"]: r for r in _index(work / "prepared").values()}
    relabelled = [index.get(f"{classes[2]}/from_{classes[1]}_{f.name}") for f in moved_files]
    report["checks"]["relabel"]["ok"] &= all(r is None or r["label"] in (classes[2], "") for r in relabelled)

    for f in files(classes[3])[: args.files]:
        f.rename(f.with_name(f"renamed_{f.name}"))
    step("rename_files")

    copies = files(classes[4])[: args.files]
    for f in copies:
        shutil.copy2(f, f.with_name(f"copy_of_{f.name}"))
    conflicted = copies[:5]
    for f in conflicted:
        shutil.copy2(f, src / classes[5] / f"also_{f.name}")  # the same picture under another label
    before = _index(work / "prepared")
    step("duplicates")
    manifest = json.loads((work / "prepared" / "manifest.json").read_text())
    report["checks"]["duplicates"].update(samples_added=manifest["num_images"] - len(before),
                                          duplicate_files=manifest["duplicates"]["extra_files"])  # fmt: skip
    conflicts_found = len(manifest["label_conflicts"])
    report["checks"]["duplicates"]["ok"] &= manifest["num_images"] == len(before) and conflicts_found == len(conflicted)

    by_size: dict[int, list[Path]] = {}
    for f in files(classes[6]):
        by_size.setdefault(f.stat().st_size, []).append(f)
    pairs = [g[i : i + 2] for g in by_size.values() for i in range(0, len(g) - 1, 2)][: args.files // 2]
    for a, b in pairs:  # swap the bytes of two files of one size, keeping each file's mtime (cp -p)
        sa, sb, da, db = a.stat(), b.stat(), a.read_bytes(), b.read_bytes()
        a.write_bytes(db)
        b.write_bytes(da)
        os.utime(a, ns=(sa.st_atime_ns, sa.st_mtime_ns))
        os.utime(b, ns=(sb.st_atime_ns, sb.st_mtime_ns))
    edited = [f for f in files(classes[7])[: args.files] if _requantize(f)]  # new pixels, same size and mtime
    step("same_size_replacement", files_swapped=2 * len(pairs), files_with_new_pixels=len(edited),
         ok_some=bool(pairs) or bool(edited))  # fmt: skip
    report["checks"]["same_size_replacement"]["ok"] &= report["checks"]["same_size_replacement"]["decoded"] == len(
        edited
    )

    cfg = load_params(REPO / "params.yaml", [f"data.source={src}", f"data.img_size={args.img_size}",
                                             "data.crop_pct=1", f"data.out_dir={work / 'prepared'}",
                                             "data.label_fraction=0.2"])  # fmt: skip
    import PIL

    from mae_ops.stages import prepare

    real_version, real_fit = PIL.__version__, images.fit_square
    PIL.__version__ = real_version + "+another-build"
    images.fit_square = lambda img, size: img.resize((size, size), PIL.Image.Resampling.NEAREST)
    try:
        changed = prepare.run(cfg)
    finally:
        PIL.__version__, images.fit_square = real_version, real_fit
    redecoded = changed["reused"]["decoded"]
    report["checks"]["decoder_change"] = {"ok": redecoded == changed["num_images"], "decoded": redecoded,
                                         "images": changed["num_images"]}  # fmt: skip
    grown, _ = _prepare(work, src, args.img_size)  # and back: the real decoder again
    fresh, _ = _prepare(work, src, args.img_size, out="fresh")
    a, b = PreparedData(work / "prepared"), PreparedData(work / "fresh")
    same = {"content_hash": grown["content_hash"] == fresh["content_hash"],
            "index": list(_index(a.root).values()) == list(_index(b.root).values()),
            "mean_std": (grown["mean"], grown["std"]) == (fresh["mean"], fresh["std"]),
            "labels_splits": all(np.array_equal(getattr(a, n), getattr(b, n)) for n in ("labels", "split", "labelled")),
            "pixels": bool(np.array_equal(a.images[:], b.images[:]))}  # fmt: skip
    report["checks"]["fresh_vs_incremental"] = {"ok": all(same.values()), **same,
                                                "incremental_shards": len(grown["shards"]),
                                                "fresh_shards": len(fresh["shards"])}  # fmt: skip

    from mae_ops.orchestration import SOURCE_DEP_MARK, sync_source_deps

    repo = work / "project"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    text = (REPO / "dvc.yaml").read_text().replace(
        "      - src/mae_ops/atomic.py\n", "      - labels/fixes.csv   # the review team's fixes\n"
        "      - src/mae_ops/atomic.py\n", 1)  # fmt: skip
    (repo / "dvc.yaml").write_text(text)
    for folder in (src, work / "more"):
        sync_source_deps(repo, cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": str(folder)})}))
    after = (repo / "dvc.yaml").read_text()
    report["checks"]["user_dependency"] = {
        "ok": "- labels/fixes.csv   # the review team's fixes" in after and after.count(SOURCE_DEP_MARK) == 1
        and str(work / "more") in after and str(src) + "\n" not in after}  # fmt: skip
    report["ok"] = all(c["ok"] for c in report["checks"].values())
    report["state_cache_bytes"] = preparing.state_path(work / "prepared").stat().st_size
    print(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
