"""What `prepare` does with the files it finds (the stage calls these; no torch).

A sample is its content. Its identity (``sample_id``) is the MD5 of the file's
bytes, the hash DVC records for the same file, kept in ``index.csv``. So:

- the split and labelled status are pure functions of the identity and
  ``data.seed``: renaming a file or a class folder, moving a file to another class
  or adding and removing others never moves a sample between train, val and test;
- a file saved twice under two names is one sample (every name is listed in the
  manifest's ``duplicates``); one content under two labels is a *label conflict*
  (listed, never trained or scored on a label: kept for pre-training as an
  unlabeled image, or left out when a copy sits in a val/ or test/ folder);
- samples are stored in the order of their identities, so the same images give the
  same samples, splits, labels, mean/std and ``content_hash``, whatever the folder's
  history.

A previous store's row is reused only when it is provably the same: the same
content (its identity) decoded by the same decoder (``decoder_fingerprint``: store
version and side, channels, the decoding code, Pillow and its codec libraries). The
identity of an unchanged file comes from a state cache beside the store (inode,
size and mtime, as DVC's state keys it, and ctime, which `cp -p` or rsync cannot set
back); any other file is hashed again, and its hash has the final word.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, features
from tqdm.auto import tqdm

from mae_ops import images, store
from mae_ops.atomic import save_with
from mae_ops.config import EMBEDDED_SOURCES, DataConfig
from mae_ops.reporting import file_sha256
from mae_ops.sources import class_dirs, split_dirs
from mae_ops.store import SPLITS

log = logging.getLogger(__name__)
FORCE_ENV = "MAE_OPS_PREPARE_FORCE"  # set by `mae-ops pipeline --force`: DVC runs the stage's fixed command
DECODE_CHUNK = 256  # files per worker job
HASH_CHUNK = 1 << 20  # bytes read at a time while hashing
MAX_DEAD_SHARE = 0.5  # a previous shard is re-decoded rather than linked when most of its rows are gone
STATE_DTYPE = np.dtype(
    [("dev", "u8"), ("ino", "u8"), ("size", "i8"), ("mtime_ns", "i8"), ("ctime_ns", "i8"), ("md5", "u1", (16,))]
)  # fmt: skip; bytes, not "S16": numpy strips trailing zeros
INDEX_FIELDS = ["sample_id", "file", "copies", "split", "label", "labelled", "gray"]
SPLIT_NAMES = {code: name for name, code in SPLITS.items()}
CODECS = ("jpg", "zlib", "libtiff", "webp", "jpg_2000")


@dataclass(slots=True)
class Candidate:
    """One file found in the sources, or one embedded image."""

    path: str  # where it is read from
    name: str  # as index.csv and the manifest show it: its path inside its source folder
    label: int  # class number; -1 in data.unlabeled_dirs
    fixed_split: int  # split code of its train/ val/ test/ folder, or of an unlabeled folder; -1: none
    stat: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)  # device, inode, size, mtime_ns, ctime_ns
    sample_id: str = ""  # MD5 of its bytes, once known
    from_package: bool = False  # an embedded image, not a file


@dataclass(slots=True)
class Sample:
    """One distinct content: every file that holds it, and what prepare made of it."""

    sample_id: str
    files: list[Candidate]
    label: int = -1
    fixed_split: int = -1
    gray: bool | None = None
    loc: tuple[int, int] | None = None  # (shard, row) in the new store
    sums: np.ndarray | None = None  # (C, 2) channel sums and sums of squares
    clipped: bool = False  # decoded this run with values beyond data.bit_depth's range (see images)

    @property
    def name(self) -> str:
        return self.files[0].name

    @property
    def path(self) -> str:
        return self.files[0].path


@dataclass
class Found:
    """What discovery found: the candidate files and the files skipped, with why."""

    files: list[Candidate] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


# ------------------------------------------------------------------ discovery
def _walk_files(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _collect(root: Path, name_root: Path, prefix: str, label: int, split: int, out: Found) -> None:
    for path in _walk_files(root):
        if path.name.startswith("."):
            out.skipped.append({"path": str(path), "reason": "hidden file"})
        elif not images.is_image_file(path):
            out.skipped.append({"path": str(path), "reason": "not an image file extension"})
        else:
            try:
                st = path.stat()
            except OSError as exc:
                out.skipped.append({"path": str(path), "reason": f"unreadable or truncated: {exc}"})
                continue
            stat = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            out.files.append(Candidate(str(path), prefix + path.relative_to(name_root).as_posix(), label, split, stat))


def discover(d: DataConfig, classes: list[str]) -> Found:
    """Every image file of the labelled folder (ImageFolder layout, optionally under
    train/ [val/] test/) and of the unlabeled folders (``check_sources`` has validated them)."""
    out = Found()
    source = Path(d.source)
    labelled_roots = {} if d.source in EMBEDDED_SOURCES else (split_dirs(source) or {source: None})
    for root, split_name in labelled_roots.items():
        for path in sorted(p for p in root.iterdir() if p.is_file()):
            out.skipped.append({"path": str(path), "reason": "file outside a class folder"})
        for class_dir in class_dirs(root):
            split = SPLITS[split_name] if split_name else -1
            _collect(class_dir, source, "", classes.index(class_dir.name), split, out)
    for extra in d.unlabeled_dirs:
        _collect(Path(extra), Path(extra), f"unlabeled:{Path(extra).name}/", -1, SPLITS["unlabeled"], out)
    return out


def embedded_candidates(name: str, images_: np.ndarray, labels: np.ndarray) -> list[Candidate]:
    """The embedded images as candidates, each identified by the MD5 of its pixels."""
    return [Candidate(f"{name}/{i}", f"{name}/{i}", int(label), -1, sample_id=_md5(img.tobytes()), from_package=True)
            for i, (img, label) in enumerate(zip(images_, labels, strict=True))]  # fmt: skip


# ------------------------------------------------------------------ identity
def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def file_md5(path: str) -> str:
    """The MD5 of a file's bytes (DVC's file hash), read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def state_path(out_dir: str | Path) -> Path:
    """The state cache of the store ``out_dir``: beside it, not in it (it describes this
    machine's files, not the data), so the store's own bytes do not depend on it."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.state.npy"


def last_run_path(out_dir: str | Path) -> Path:
    """What the last prepare of ``out_dir`` did (decoded, reused, hashed): beside the store,
    not in it, so that preparing unchanged images again leaves the store byte for byte as
    it was (and DVC's hash of it, and the stages after it, unchanged)."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.last-run.json"


def read_state(path: Path) -> dict[tuple[int, int], tuple[int, int, int, str]]:
    """(device, inode) -> (size, mtime_ns, ctime_ns, md5) from the last prepare; empty if unreadable."""
    try:
        table = np.load(path, allow_pickle=False)
        if table.dtype != STATE_DTYPE:
            return {}
    except (OSError, ValueError):
        return {}
    keys = zip(table["dev"].tolist(), table["ino"].tolist(), strict=True)
    values = zip(table["size"].tolist(), table["mtime_ns"].tolist(), table["ctime_ns"].tolist(),
                 (m.tobytes().hex() for m in table["md5"]), strict=True)  # fmt: skip
    return dict(zip(keys, values, strict=True))


def write_state(path: Path, files: list[Candidate]) -> None:
    table = np.zeros(len(files), dtype=STATE_DTYPE)
    for i, f in enumerate(files):
        table[i] = (*f.stat, np.frombuffer(bytes.fromhex(f.sample_id), np.uint8))
    save_with(path, lambda tmp: _save_npy(tmp, table))


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a handle: np.save would add ".npy" to a temporary name
        np.save(fh, arr, allow_pickle=False)


def identify(found: Found, state: dict[tuple[int, int], tuple[int, int, int, str]]) -> int:
    """Give every file its identity: from ``state`` when its inode, size, mtime and ctime
    are the ones recorded there (a file rewritten in place, even to the same size and
    mtime, has a new ctime), else by hashing its bytes (threads: reads and hashlib
    release the GIL). Unreadable files move to the skipped list; returns the files hashed."""
    todo = []
    for f in found.files:
        known = state.get(f.stat[:2])
        if f.sample_id:  # an embedded image, identified by its pixels
            continue
        if known is not None and known[:3] == f.stat[2:]:
            f.sample_id = known[3]
        else:
            todo.append(f)

    def one(f: Candidate) -> str | None:
        try:
            f.sample_id = file_md5(f.path)
            return None
        except OSError as exc:
            return f"unreadable or truncated: {exc}"

    with ThreadPoolExecutor(min(8, (os.cpu_count() or 1) + 2)) as pool:
        errors = list(tqdm(pool.map(one, todo), total=len(todo), desc="hash", unit="file", disable=not todo))
    for f, err in zip(todo, errors, strict=True):
        if err is not None:
            found.skipped.append({"path": f.path, "reason": err})
    found.files = [f for f in found.files if f.sample_id]
    return len(todo)


# ------------------------------------------------------------------- samples
@dataclass
class Grouped:
    """The distinct samples (sorted by identity) and what grouping the files found."""

    samples: list[Sample]
    duplicates: list[dict]  # one content, several files
    label_conflicts: list[dict]  # one content, several labels
    split_conflicts: list[dict]  # one content in several split folders


def group(files: list[Candidate], classes: list[str]) -> Grouped:
    """One sample per identity, in the order of the identities. A labelled copy wins over
    an unlabeled one; copies in several split folders take the strictest (test, then
    val); copies under several labels are a conflict, kept for pre-training only
    (label -1, unlabeled) unless a copy is in a val/ or test/ folder (then left out:
    the held-out splits stay as the folders define them, and get no second label)."""
    by_id: dict[str, list[Candidate]] = {}
    for f in files:
        by_id.setdefault(f.sample_id, []).append(f)
    out = Grouped([], [], [], [])
    for sample_id in sorted(by_id):
        copies = sorted(by_id[sample_id], key=lambda c: c.name)
        labelled = [c for c in copies if c.label >= 0]
        sample = Sample(sample_id, copies, fixed_split=SPLITS["unlabeled"])
        if len(copies) > 1:
            out.duplicates.append({"sample_id": sample_id, "files": [c.name for c in copies]})
        if labelled:
            splits = {c.fixed_split for c in labelled}
            sample.fixed_split = max(splits)  # -1 none < train < val < test
            if len(splits) > 1:
                out.split_conflicts.append({"sample_id": sample_id, "files": [c.name for c in labelled],
                                            "split": SPLIT_NAMES[sample.fixed_split]})  # fmt: skip
            labels = sorted({c.label for c in labelled})
            if len(labels) == 1:
                sample.label = labels[0]
            else:
                held_out = sample.fixed_split in (SPLITS["val"], SPLITS["test"])
                out.label_conflicts.append({
                    "sample_id": sample_id, "files": [c.name for c in labelled],
                    "labels": [classes[c] for c in labels],
                    "kept_as": "left out (a copy is in a held-out split folder)" if held_out else "unlabeled",
                })  # fmt: skip
                if held_out:
                    continue
                sample.fixed_split = SPLITS["unlabeled"]
        out.samples.append(sample)
    return out


# ----------------------------------------------------------- the decoder
def decoder_fingerprint(store_size: int, bit_depth: int) -> dict:
    """Everything that decides a stored row's pixels besides the file's bytes (and the
    channels): rows decoded under another fingerprint are never reused. Export copies its
    ``bit_depth`` into the model, so that predict decodes files as prepare did."""
    return {
        "store_version": store.STORE_VERSION,
        "store_size": store_size,
        "bit_depth": bit_depth,
        "decoding_code_sha256": file_sha256(Path(images.__file__))[:16],
        "pillow": PIL.__version__,
        "codecs": {name: features.version(name) for name in CODECS},
        "libjpeg_turbo": features.version_feature("libjpeg_turbo"),
    }


@dataclass
class Previous:
    """What the last prepare stored, by identity: reusable under the same decoder and channels."""

    root: Path
    channels: int = 0
    shards: list[str] = field(default_factory=list)
    shard_hashes: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # sample id -> its position
    gray: dict[str, bool] = field(default_factory=dict)
    where: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    sums: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 2), dtype=np.int64))


def read_previous(root: Path, fingerprint: dict) -> Previous:
    """The previous store in ``root`` if it was decoded under ``fingerprint`` (else empty)."""
    prev = Previous(root)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        if manifest.get("decoder") != fingerprint:
            return prev
        with open(root / "index.csv", newline="") as fh:
            reader = csv.reader(fh)
            if next(reader) != INDEX_FIELDS:
                return prev
            ids, gray = [], []  # two columns only: a few dozen bytes per sample
            for row in reader:
                ids.append(row[0])
                gray.append(row[6])
        where, sums = np.load(root / "where.npy"), np.load(root / "pixel_sums.npy")
    except (OSError, ValueError, KeyError, StopIteration, IndexError):  # none, or one this version cannot read
        return prev
    if not len(ids) == len(where) == len(sums):
        return prev
    prev.channels, prev.shards, prev.shard_hashes = manifest["channels"], manifest["shards"], manifest["shard_hashes"]
    prev.rows = {sample_id: i for i, sample_id in enumerate(ids)}
    prev.gray = {sample_id: g == "1" for sample_id, g in zip(ids, gray, strict=True) if g in ("0", "1")}
    prev.where, prev.sums = where, sums
    return prev


def resolve_channels(setting: int | str, samples: list[Sample], prev: Previous) -> int:
    """1 or 3; ``auto``: 1 when every image is grayscale (read from the header, or known
    from the previous store)."""
    if setting != "auto":
        return int(setting)
    for s in samples:
        if s.gray is None and s.files[0].from_package:
            s.gray = True  # the embedded digits
        if s.gray is None:
            s.gray = prev.gray.get(s.sample_id)
            if s.gray is None:
                s.gray = images.peek_is_gray(Path(s.path)) is not False
        if not s.gray:
            return 3
    return 1


def reuse(samples: list[Sample], prev: Previous, writer: store.StoreWriter) -> int:
    """Point every sample the previous store holds at its row there, linking the shards
    worth keeping (most of their rows still wanted); returns the shards linked."""
    found = [(s, prev.rows[s.sample_id]) for s in samples if s.sample_id in prev.rows]
    used = Counter(int(prev.where[i, 0]) for _, i in found)
    sizes = Counter(prev.where[:, 0].tolist())
    kept = sorted(shard for shard, n in used.items() if n / sizes[shard] > MAX_DEAD_SHARE)
    new_index = {shard: writer.link(prev.root / store.SHARD_DIR / prev.shards[shard], prev.shard_hashes[shard])
                 for shard in kept}  # fmt: skip
    for s, i in found:
        shard, row = (int(v) for v in prev.where[i])
        if shard in new_index:
            s.loc, s.sums = (new_index[shard], row), prev.sums[i]
    return len(kept)


# -------------------------------------------------------------------- decode
def write_embedded(writer: store.StoreWriter, samples: list[Sample], pixels: np.ndarray, size: int,
                   channels: int) -> None:  # fmt: skip
    """The embedded images (``pixels``, (n, 1, H, W) in the samples' order) into one new shard."""
    shard, path = writer.new(len(samples))
    out = np.load(path, mmap_mode="r+")
    for i, img in enumerate(pixels):
        if size != img.shape[-1]:
            img = np.asarray(Image.fromarray(img[0]).resize((size, size), Image.Resampling.BICUBIC))[None]
        out[i] = np.repeat(img, channels, axis=0) if channels == 3 else img
    sums = images.pixel_sums(np.asarray(out))
    out.flush()
    del out
    writer.seal(shard)
    for row, s in enumerate(samples):
        s.loc, s.sums = (shard, row), sums[row]


def decode(
    writer: store.StoreWriter, samples: list[Sample], size: int, channels: int, bit_depth: int
) -> list[tuple[Sample, str]]:
    """Decode the samples (one file each: the copies hold the same bytes) into new shards,
    in their order, marking those whose values were clipped; returns those that failed
    (``loc`` None) with why. Large folders are decoded by one process per core (PIL holds
    the GIL for much of a decode), each writing its rows through the memory map."""
    if not samples:
        return []
    per_shard = store.rows_per_shard((channels, size, size))
    paths = [s.path for s in samples]
    jobs, made = [], []
    for s0 in range(0, len(paths), per_shard):
        shard, shard_path = writer.new(min(per_shard, len(paths) - s0))
        made.append(shard)
        for c0 in range(s0, min(s0 + per_shard, len(paths)), DECODE_CHUNK):
            c1 = min(c0 + DECODE_CHUNK, s0 + per_shard, len(paths))
            jobs.append((str(shard_path), list(range(c0 - s0, c1 - s0)), paths[c0:c1]))
    decode_chunk = functools.partial(images.decode_into, size=size, channels=channels, bit_depth=bit_depth)
    errors: list[str | None] = []
    sums, clipped = [], []
    bar = tqdm(total=len(paths), desc="decode", unit="img")
    workers = min(os.cpu_count() or 1, 8)
    with contextlib.ExitStack() as stack:
        mapper = map
        if workers > 1 and len(jobs) > 1:
            ctx = multiprocessing.get_context("forkserver")
            mapper = stack.enter_context(ProcessPoolExecutor(workers, mp_context=ctx)).map
        for err, s, c in mapper(decode_chunk, *zip(*jobs, strict=True)):
            errors += err
            sums.append(s)
            clipped.append(c)
            bar.update(len(err))
    bar.close()
    all_sums, all_clipped = np.concatenate(sums), np.concatenate(clipped)
    ok = np.array([e is None for e in errors], dtype=bool)
    failed = []
    for s0 in range(0, len(paths), per_shard):  # the shards in the order they were made
        keep = ok[s0 : s0 + per_shard]
        shard = made[s0 // per_shard]
        writer.seal(shard, keep)
        rows = np.cumsum(keep) - 1
        for i in range(s0, s0 + len(keep)):
            if ok[i]:
                samples[i].loc, samples[i].sums = (shard, int(rows[i - s0])), all_sums[i]
                samples[i].clipped = bool(all_clipped[i])
            else:
                samples[i].loc = None
                failed.append((samples[i], errors[i]))
    return failed


# --------------------------------------------------------------------- split
def uniform_hash(keys: list[str], seed: int, purpose: str) -> np.ndarray:
    """A number in [0, 1) per key that depends on the key, the seed and the purpose only."""
    out = np.empty(len(keys))
    for i, key in enumerate(keys):
        digest = hashlib.blake2b(f"{seed}|{purpose}|{key}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2.0**64
    return out


def assign_splits(
    labels: np.ndarray, fixed: np.ndarray, keys: list[str], cfg: DataConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Split by each sample's identity (split folders win): test if its hash < test_fraction,
    val if within the next val_fraction, else train; so a sample's split never depends
    on the other files, their names or their labels. The labelled subset of train: a
    second hash < label_fraction (equally a pure function of the sample; a class can end
    up with none, which the manifest reports), or the labels_per_class samples of lowest
    hash in each class (which depends on the class's other samples by design)."""
    u = uniform_hash(keys, cfg.seed, "split")
    split = np.where(fixed >= 0, fixed, SPLITS["train"]).astype(np.int8)
    pool = (split == SPLITS["train"]) & (labels >= 0)
    has_test_dir = bool((fixed == SPLITS["test"]).any())
    test_cut = 0.0 if has_test_dir else cfg.test_fraction
    if test_cut > 0:
        split[pool & (u < test_cut)] = SPLITS["test"]
    if not (fixed == SPLITS["val"]).any() and cfg.val_fraction > 0:
        split[pool & (u >= test_cut) & (u < test_cut + cfg.val_fraction)] = SPLITS["val"]

    v = uniform_hash(keys, cfg.seed, "labelled")
    train = (split == SPLITS["train"]) & (labels >= 0)
    labelled = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels[train]):
        members = np.flatnonzero(train & (labels == c))
        order = members[np.argsort(v[members], kind="stable")]
        if cfg.labels_per_class is not None:
            labelled[order[: cfg.labels_per_class]] = True
        else:
            labelled[members[v[members] < cfg.label_fraction]] = True
    return split, labelled


def split_definition(cfg: DataConfig, has_split_folders: bool) -> dict:
    """What decides which sample lands in which split: two stores with the same definition
    put every shared image in the same split (the registry compares models only then)."""
    return {"rule": "md5-of-content/blake2b-v1", "seed": cfg.seed, "test_fraction": cfg.test_fraction,
            "val_fraction": cfg.val_fraction, "split_folders": has_split_folders}  # fmt: skip


# ---------------------------------------------------------------- the record
def content_hash(fingerprint: dict, channels: int, header: dict, ids: list[str], labels: np.ndarray,
                 split: np.ndarray, labelled: np.ndarray) -> str:  # fmt: skip
    """The identity of a store's content, independent of how it was built: the decoder,
    the samples' identities in order, and their labels, splits and labelled flags (the
    pixels are a function of the first two). Fresh and incremental prepares of the same
    images give the same hash."""
    digest = hashlib.sha256(json.dumps({"decoder": fingerprint, "channels": channels, **header},
                                       sort_keys=True).encode())  # fmt: skip
    digest.update("\n".join(ids).encode())
    for arr, dtype in ((labels, np.int64), (split, np.int8), (labelled, np.bool_)):
        digest.update(np.ascontiguousarray(arr, dtype=dtype).tobytes())
    return digest.hexdigest()


def write_index(dest: Path, samples: list[Sample], split: np.ndarray, labelled: np.ndarray,
                classes: list[str]) -> None:  # fmt: skip
    """index.csv: one row per sample, in store order (no machine-specific field)."""
    with open(dest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(INDEX_FIELDS)
        for s, sp, lab in zip(samples, split, labelled, strict=True):
            label = classes[s.label] if s.label >= 0 else ""
            gray = "" if s.gray is None else int(s.gray)  # unknown when the channels were set, not detected
            writer.writerow([s.sample_id, s.name, len(s.files), SPLIT_NAMES[int(sp)], label, int(lab), gray])


def read_index(root: str | Path) -> list[dict[str, str]]:
    with open(Path(root) / "index.csv", newline="") as fh:
        return list(csv.DictReader(fh))
