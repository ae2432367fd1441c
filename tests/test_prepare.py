"""`prepare`: the embedded digits, user folders, and every kind of bad image."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mae_ops import preparing
from mae_ops.config import ParamsError, load_params
from mae_ops.data import SPLITS, PreparedData
from mae_ops.orchestration import StageResult, run_summary
from mae_ops.stages import prepare
from mae_ops.stages.prepare import DataSourceError
from tests.conftest import REPO, tiny_config


def _load(root: Path) -> dict:
    out = {name: np.load(root / f"{name}.npy") for name in ("labels", "split", "labelled")}
    out["images"] = PreparedData(root).images
    out["manifest"] = json.loads((root / "manifest.json").read_text())
    return out


def test_embedded_mnist(prepared_mnist: Path) -> None:
    d = _load(prepared_mnist)
    m = d["manifest"]
    assert d["images"].shape == (5000, 1, 28, 28) and d["images"].dtype == np.uint8
    c = m["counts"]
    assert c["train"] + c["val"] + c["test"] == 5000 and c["unlabeled"] == 0
    # each digit's split is drawn from its identity: the fractions hold to sampling noise (3 sigma)
    assert abs(c["test"] - 1000) < 3 * (5000 * 0.2 * 0.8) ** 0.5 and abs(c["val"] - 500) < 3 * (5000 * 0.09) ** 0.5
    assert abs(c["labelled"] - 0.1 * c["train"]) < 3 * (c["train"] * 0.09) ** 0.5
    assert m["classes"] == [str(i) for i in range(10)]
    assert all(60 <= n <= 140 for n in m["counts_per_class"]["test"].values())  # every class in every split
    assert all(n >= 1 for n in m["counts_per_class"]["labelled"].values())
    # labelled subset is inside train only
    assert np.all(d["split"][d["labelled"]] == SPLITS["train"])
    # mean/std are those of the training split
    train = d["images"][d["split"] == SPLITS["train"]].astype(np.float64) / 255
    assert m["mean"][0] == pytest.approx(train.mean(), abs=1e-5)
    assert m["std"][0] == pytest.approx(train.std(), abs=1e-5)
    assert len(m["content_hash"]) == 64


def test_split_is_deterministic_and_seeded(tmp_path: Path, prepared_mnist: Path) -> None:
    first = _load(prepared_mnist)["manifest"]["content_hash"]
    prepare.run(tiny_config(tmp_path / "again"))
    assert _load(tmp_path / "again" / "data" / "prepared")["manifest"]["content_hash"] == first
    prepare.run(tiny_config(tmp_path / "other", "data.seed=1"))
    other = _load(tmp_path / "other" / "data" / "prepared")
    assert other["manifest"]["content_hash"] != first
    assert abs(other["manifest"]["counts"]["test"] - 1000) < 90


def test_labels_per_class_and_resize(tmp_path: Path) -> None:
    prepare.run(tiny_config(tmp_path, "data.labels_per_class=5", "data.img_size=32", "data.channels=3"))
    d = _load(tmp_path / "data" / "prepared")
    assert d["images"].shape == (5000, 3, 32, 32)
    assert d["manifest"]["counts"]["labelled"] == 50
    assert np.array_equal(d["images"][:, 0], d["images"][:, 2])  # gray replicated to RGB


def _save(img: Image.Image, path: Path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


def _colour(seed: int, size=(20, 20)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """An ImageFolder with every kind of file users really have."""
    root = tmp_path / "photos"
    for cls in ("cat", "dog"):
        for i in range(6):
            _save(_colour(i + (100 if cls == "dog" else 0)), root / cls / f"ok_{i}.png")
    # converted: CMYK JPEG, palette PNG, RGBA PNG, 16-bit gray PNG, odd size, 1-bit, nested folder
    _save(_colour(50).convert("CMYK"), root / "cat" / "cmyk.jpg")
    _save(_colour(51).convert("P", palette=Image.Palette.ADAPTIVE), root / "cat" / "palette.png")
    rgba = _colour(52).convert("RGBA")
    rgba.putalpha(0)  # fully transparent -> white
    _save(rgba, root / "dog" / "rgba.png")
    _save(Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)), root / "dog" / "sixteen.png")
    _save(_colour(53, size=(7, 45)), root / "dog" / "odd_size.jpg")
    _save(_colour(54).convert("1"), root / "dog" / "nested" / "bilevel.bmp")
    # skipped: empty, truncated, not an image, wrong extension, hidden, stray file
    (root / "cat" / "empty.jpg").write_bytes(b"")
    good = root / "cat" / "ok_0.png"
    _save(_colour(55, size=(64, 64)), root / "cat" / "full.jpg", quality=95)
    data = (root / "cat" / "full.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "cat" / "full.jpg").unlink()
    (root / "dog" / "notes.jpg").write_text("this is not a picture")
    (root / "dog" / "readme.txt").write_text("hello")
    (root / "dog" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "stray.png").write_bytes(good.read_bytes())
    return root


def test_messy_folder_converts_or_skips_and_never_crashes(tmp_path: Path, messy_folder: Path) -> None:
    cfg = tiny_config(tmp_path / "run", f"data.source={messy_folder}", "data.img_size=16",
                      "data.test_fraction=0.25", "data.val_fraction=0.25")  # fmt: skip
    manifest = prepare.run(cfg)
    d = _load(tmp_path / "run" / "data" / "prepared")
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"empty.jpg", "truncated.jpg", "notes.jpg", "readme.txt", ".DS_Store", "stray.png"}
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["truncated.jpg"].startswith("unreadable or truncated")
    assert reasons["notes.jpg"] == "not a recognised image format"
    assert reasons["readme.txt"] == "not an image file extension"
    assert manifest["num_skipped"] == 6
    # 12 good + 6 converted images, all RGB, stored at 18 px (16 / crop_pct 0.875), seen at 16 px
    assert manifest["channels"] == 3 and manifest["store_size"] == 18 and manifest["crop_pct"] == 0.875
    assert d["images"].shape == (18, 3, 18, 18)
    assert PreparedData(tmp_path / "run" / "data" / "prepared").eval_images.shape == (18, 3, 16, 16)
    assert manifest["classes"] == ["cat", "dog"]
    by_name = {Path(r["file"]).name: i for i, r in enumerate(_rows(tmp_path / "run" / "data" / "prepared"))}
    assert np.all(d["images"][by_name["rgba.png"]] == 255)  # transparent -> white
    assert np.all(d["images"][by_name["sixteen.png"]] == 255)  # 16-bit scaled, not clipped to garbage
    assert d["labels"][by_name["bilevel.bmp"]] == 1  # nested file keeps its class
    assert sum(manifest["counts"][s] for s in ("train", "val", "test")) == 18


def _stored_16px(tmp_path: Path, root: Path, *extra: str) -> tuple[dict[str, np.ndarray], int]:
    """Prepare ``root``'s 16-px gray files as they are (no crop, every file in train); the first
    channel of each stored row, by file, and how many files this prepare decoded (not reused)."""
    as_is = ["data.img_size=16", "data.crop_pct=1", "data.test_fraction=0", "data.val_fraction=0"]
    manifest = prepare.run(tiny_config(tmp_path / "run", f"data.source={root}", *as_is, *extra))
    data = PreparedData(tmp_path / "run" / "data" / "prepared")
    return {r["file"]: data.images[i][0] for i, r in enumerate(_rows(data.root))}, manifest["reused"]["decoded"]


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    root = tmp_path / "src"
    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 256).astype(np.uint16)
    _save(Image.fromarray(ramp), root / "a" / "ramp.png")
    _save(Image.fromarray(ramp[::-1].copy()), root / "b" / "ramp.png")
    img = _stored_16px(tmp_path, root)[0]["a/ramp.png"]
    assert img.dtype == np.uint8 and img.shape == (16, 16)
    np.testing.assert_allclose(img.astype(float), ramp / 257.0, atol=1.0)


def test_high_depth_files_map_one_value_to_one_pixel_however_dark(tmp_path: Path) -> None:
    """16-bit and float files are scaled by their type's range, not by their brightest pixel: a
    dark 16-bit frame (all under 256) and a frame with one bright pixel store 200 as the same
    pixel; float frames are read on 0..1, with or without a value beyond it."""
    root = tmp_path / "src"
    dark = np.full((16, 16), 200, dtype=np.uint16)
    bright = dark.copy()
    bright[0, 0] = 60000
    low = np.full((16, 16), 0.5, dtype=np.float32)
    high = low.copy()
    high[0, 0] = 1.5
    for name, arr in (("a/dark.png", dark), ("a/bright.png", bright), ("b/low.tif", low), ("b/high.tif", high)):
        _save(Image.fromarray(arr), root / name)
    img, _ = _stored_16px(tmp_path, root)
    assert np.all(img["a/dark.png"] == round(200 / 65535 * 255)) and img["a/bright.png"][0, 0] == 233
    assert np.array_equal(img["a/dark.png"][1:], img["a/bright.png"][1:])
    assert np.all(img["b/low.tif"] == 128) and img["b/high.tif"][0, 0] == 255
    assert np.array_equal(img["b/low.tif"][1:], img["b/high.tif"][1:])


def test_bit_depth_reads_twelve_bit_frames_on_their_range_and_decodes_again_when_changed(tmp_path: Path) -> None:
    """data.bit_depth=12: a 12-bit sensor's frames saved as 16-bit files fill 0..255 (by default,
    0..65535, they use 0..15) and values past 4095 clip; 8-bit and float files beside them are
    read as before. A prepare under another bit depth decodes every file again (no row read on
    the other range is reused); the same bit depth again reuses them all."""
    root = tmp_path / "src"
    ramp = np.arange(256, dtype=np.uint16).reshape(16, 16) * 16  # 0..4080
    over = np.full((16, 16), 4095, dtype=np.uint16)
    over[0, 0] = 9000
    eight = np.arange(256, dtype=np.uint8).reshape(16, 16)[::-1].copy()
    for name, arr in (("a/ramp.png", ramp), ("a/over.png", over), ("b/eight.png", eight),
                      ("b/float.tif", np.full((16, 16), 0.5, dtype=np.float32))):  # fmt: skip
        _save(Image.fromarray(arr), root / name)
    sixteen, decoded = _stored_16px(tmp_path, root)
    assert decoded == 4 and sixteen["a/ramp.png"].max() == round(4080 / 65535 * 255) == 16
    twelve, decoded = _stored_16px(tmp_path, root, "data.bit_depth=12")
    assert decoded == 4
    assert np.array_equal(twelve["a/ramp.png"], np.floor(ramp / 4095 * 255 + 0.5).astype(np.uint8))
    assert np.all(twelve["a/over.png"] == 255)
    for name in ("b/eight.png", "b/float.tif"):
        assert np.array_equal(twelve[name], sixteen[name])
    assert np.array_equal(twelve["b/eight.png"], eight)
    again, decoded = _stored_16px(tmp_path, root, "data.bit_depth=12")
    assert decoded == 0 and all(np.array_equal(again[n], twelve[n]) for n in twelve)
    manifest = json.loads((tmp_path / "run" / "data" / "prepared" / "manifest.json").read_text())
    assert manifest["decoder"]["bit_depth"] == 12
    with pytest.raises(ParamsError, match=r"data\.bit_depth"):
        tiny_config(tmp_path / "run", "data.bit_depth=20")


def test_values_beyond_the_bit_depth_are_counted_and_named_when_clipped(tmp_path: Path, caplog) -> None:
    """Values the decoder clips lose detail silently unless reported: a camera that stores its
    12 bits high in the 16-bit word, prepared with data.bit_depth=12, and a float frame over 1.0
    are counted, named in a warning and in the last run's record; in-range 16-bit, 8-bit and
    float files never are; a prepare that reuses every row decodes nothing and reports nothing."""
    root = tmp_path / "src"
    low = np.arange(256, dtype=np.uint16).reshape(16, 16) * 16  # 12 bits: 0..4080
    hdr = np.full((16, 16), 0.5, dtype=np.float32)
    hdr[3, 3] = 1.5
    for name, arr in (("a/low.png", low), ("a/high.png", low << 4), ("b/eight.png", low.astype(np.uint8)),
                      ("b/hdr.tif", hdr), ("b/float.tif", np.full((16, 16), 0.5, dtype=np.float32))):  # fmt: skip
        _save(Image.fromarray(arr), root / name)
    as_is = ["data.img_size=16", "data.crop_pct=1", "data.test_fraction=0", "data.val_fraction=0"]
    out = tmp_path / "run" / "data" / "prepared"

    def clipped(*extra: str) -> dict:
        caplog.clear()
        manifest = prepare.run(tiny_config(tmp_path / "run", f"data.source={root}", *as_is, *extra))
        assert json.loads(preparing.last_run_path(out).read_text())["clipped"] == manifest["clipped"]
        return manifest["clipped"]

    at16 = clipped()
    assert at16["files"] == 1 and at16["examples"] == [str(root / "b" / "hdr.tif")]
    assert at16["integer_range"] == [0, 65535]
    at12 = clipped("data.bit_depth=12")
    assert at12["files"] == 2 and at12["integer_range"] == [0, 4095]
    assert at12["examples"] == sorted([str(root / "a" / "high.png"), str(root / "b" / "hdr.tif")])
    warned = [m for r in caplog.records if r.levelname == "WARNING" and "outside 0..4095" in (m := r.getMessage())]
    assert len(warned) == 1 and "2 of 5 decoded files" in warned[0] and "data.bit_depth 12" in warned[0]
    ran, skipped = [StageResult("prepare", True, 1.0)], [StageResult("prepare", False, 0.1)]
    summary = run_summary(tmp_path / "run", ran, [])  # the Prefect run's summary says it too
    assert "This run's prepare decoded 5 files and reused 0 stored images." in summary
    assert f"**Clipped**: 2 of the files decoded hold values outside 0..4095 (0..1 for float files) and were " \
           f"stored clipped, e.g. `{root / 'a' / 'high.png'}`" in summary  # fmt: skip
    assert "Clipped" not in run_summary(tmp_path / "run", skipped, [])  # an older run's record is not this run's
    again = clipped("data.bit_depth=12")
    assert again["files"] == 0 and "outside 0.." not in caplog.text
    summary = run_summary(tmp_path / "run", ran, [])
    assert "This run's prepare decoded 0 files and reused 5 stored images." in summary and "Clipped" not in summary


def test_split_folders_and_unlabeled_pool(tmp_path: Path) -> None:
    root, extra = tmp_path / "labelled", tmp_path / "unlabeled"
    rng = np.random.default_rng(7)
    for split, n in (("train", 8), ("test", 3)):
        for cls in ("x", "y"):
            for i in range(n):
                _save(Image.fromarray(rng.integers(0, 255, (10, 10), np.uint8)), root / split / cls / f"{i}.png")
    for i in range(5):
        _save(Image.fromarray(rng.integers(0, 255, (12, 12), np.uint8)), extra / "deep" / f"u{i}.png")
    manifest = prepare.run(tiny_config(tmp_path / "run", f"data.source={root}", f"data.unlabeled_dirs=[{extra}]",
                                       "data.img_size=8", "data.val_fraction=0.25"))  # fmt: skip
    d = _load(tmp_path / "run" / "data" / "prepared")
    assert manifest["channels"] == 1
    assert manifest["counts"]["test"] == 6  # the test/ folder, untouched by the random split
    assert manifest["counts"]["unlabeled"] == 5
    # val: about 25% of the labelled images, taken from train/ by each file's identity
    assert 1 <= manifest["counts"]["val"] <= 8 and manifest["counts"]["val"] + manifest["counts"]["train"] == 16
    assert np.all(d["labels"][d["split"] == SPLITS["unlabeled"]] == -1)
    files = [r["file"] for r in _rows(tmp_path / "run" / "data" / "prepared")]
    assert all(files[i].startswith("test/") for i in np.flatnonzero(d["split"] == SPLITS["test"]))


def test_bad_sources_fail_clearly_and_keep_the_old_output(tmp_path: Path, prepared_mnist: Path) -> None:
    import shutil

    out = tmp_path / "run" / "data" / "prepared"
    shutil.copytree(prepared_mnist, out)
    before = (out / "manifest.json").read_text()
    with pytest.raises(DataSourceError, match="folder not found"):
        prepare.run(tiny_config(tmp_path / "run", f"data.source={tmp_path / 'missing'}"))
    flat = tmp_path / "flat"
    _save(_colour(1), flat / "a.png")
    with pytest.raises(DataSourceError, match="no class sub-folders"):
        prepare.run(tiny_config(tmp_path / "run", f"data.source={flat}"))
    one_class = tmp_path / "one_class"
    _save(_colour(1), one_class / "cat" / "a.png")
    _save(_colour(2), one_class / "cat" / "b.png")
    with pytest.raises(DataSourceError, match="has one class"):  # would score 100% on everything
        prepare.run(tiny_config(tmp_path / "run", f"data.source={one_class}"))
    junk = tmp_path / "junk"
    for c in ("c", "d"):
        (junk / c).mkdir(parents=True)
        (junk / c / "bad.png").write_text("nope")
    with pytest.raises(DataSourceError, match="no readable images"):
        prepare.run(tiny_config(tmp_path / "run", f"data.source={junk}"))
    assert (out / "manifest.json").read_text() == before
    leftovers = sorted(p.name for p in out.parent.iterdir() if not p.name.endswith((".lock", ".state.npy")))
    assert leftovers == ["prepared"]  # no temps


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "index.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _index(root: Path) -> dict[str, dict[str, str]]:
    """index.csv by sample identity."""
    return {r["sample_id"]: r for r in _rows(root)}


def _placement(root: Path) -> dict[str, tuple[str, str]]:
    """sample identity -> (split, labelled)."""
    return {k: (r["split"], r["labelled"]) for k, r in _index(root).items()}


def _noise(rng: np.random.Generator, shape=(12, 12, 3)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))


def _micro(root: Path, src: Path, *extra: str):
    return tiny_config(root, f"data.source={src}", "data.img_size=8", "model.preset=mae_vit_micro_patch4", *extra)


def test_splits_do_not_move_when_the_folder_grows_or_is_reordered(tmp_path: Path) -> None:
    """Adding 1% more files moves no existing image between splits, nor in or out of the labelled set."""
    rng = np.random.default_rng(0)
    src = tmp_path / "photos"
    for i in range(600):
        _save(_noise(rng), src / f"c{i % 3}" / f"{i}.png")
    cfg = ["data.label_fraction=0.3"]
    prepare.run(_micro(tmp_path / "a", src, *cfg))
    before = _placement(tmp_path / "a" / "data" / "prepared")
    assert len(before) == 600 and {s for s, _ in before.values()} == {"train", "val", "test"}
    for i in range(600, 606):  # 1% more, in every class
        _save(_noise(rng), src / f"c{i % 3}" / f"{i}.png")
    prepare.run(_micro(tmp_path / "b", src, *cfg))
    after = _placement(tmp_path / "b" / "data" / "prepared")
    assert len(after) == 606 and all(after[k] == v for k, v in before.items())


def test_renames_moves_and_relabels_never_move_a_sample(tmp_path: Path) -> None:
    """A sample is its content: renaming a class folder, renaming a file or moving it to
    another class (a fixed label) keeps its split and labelled status, fresh or incremental."""
    rng = np.random.default_rng(2)
    src = tmp_path / "photos"
    for i in range(150):
        _save(_noise(rng), src / f"c{i % 3}" / f"{i}.png")
    out = tmp_path / "run" / "data" / "prepared"
    prepare.run(_micro(tmp_path / "run", src, "data.label_fraction=0.3"))
    before = _index(out)
    (src / "c0").rename(src / "cat")  # a class folder renamed: 50 files get other paths
    (src / "c1" / "1.png").rename(src / "c2" / "1.png")  # a label fixed: moved to another class
    (src / "c2" / "2.png").rename(src / "c2" / "renamed.png")
    again = prepare.run(_micro(tmp_path / "run", src, "data.label_fraction=0.3"))
    fresh = prepare.run(_micro(tmp_path / "fresh", src, "data.label_fraction=0.3"))
    assert again["reused"]["decoded"] == 0 and again["reused"]["images"] == 150  # pixels known by content
    for root in (out, tmp_path / "fresh" / "data" / "prepared"):
        after = _index(root)
        assert after.keys() == before.keys()
        moved = [k for k in before if (after[k]["split"], after[k]["labelled"]) != (before[k]["split"],
                                                                                   before[k]["labelled"])]  # fmt: skip
        assert not moved, [after[k]["file"] for k in moved]
        by_file = {r["file"]: r for r in after.values()}
        assert by_file["c2/1.png"]["label"] == "c2" and by_file["cat/0.png"]["label"] == "cat"
    assert again["content_hash"] == fresh["content_hash"]


def test_exact_duplicates_are_one_sample_and_label_conflicts_are_reported(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    src = tmp_path / "photos"
    for i in range(20):
        for split in ("train", "test"):
            _save(_noise(rng), src / split / f"c{i % 2}" / f"{i}.png")
    same = (src / "train" / "c0" / "0.png").read_bytes()
    (src / "train" / "c0" / "copy of 0.png").write_bytes(same)  # a duplicate, same label
    (src / "test" / "c0" / "leaked.png").write_bytes(same)  # the same photo in the test folder
    twin = (src / "train" / "c1" / "1.png").read_bytes()
    (src / "train" / "c0" / "mislabelled.png").write_bytes(twin)  # the same photo under two labels
    held = (src / "test" / "c1" / "3.png").read_bytes()
    (src / "train" / "c0" / "held.png").write_bytes(held)  # two labels, one copy in test/
    extra = tmp_path / "unlabeled"
    extra.mkdir()
    (extra / "u.png").write_bytes((src / "train" / "c0" / "2.png").read_bytes())  # also in a class folder
    manifest = prepare.run(_micro(tmp_path / "run", src, f"data.unlabeled_dirs=[{extra}]"))
    index = {r["file"]: r for r in _index(tmp_path / "run" / "data" / "prepared").values()}
    assert manifest["num_images"] == 40 - 1  # 45 image files, 40 contents; 1 content left out
    groups = {tuple(g["files"]) for g in manifest["duplicates"]["groups"]}
    assert ("test/c0/leaked.png", "train/c0/0.png", "train/c0/copy of 0.png") in groups
    assert index["test/c0/leaked.png"]["split"] == "test" and index["test/c0/leaked.png"]["copies"] == "3"
    assert [(c["files"], c["split"]) for c in manifest["split_conflicts"]] == [
        (["test/c0/leaked.png", "train/c0/0.png", "train/c0/copy of 0.png"], "test"),
        (["test/c1/3.png", "train/c0/held.png"], "test")] or len(manifest["split_conflicts"]) == 2  # fmt: skip
    conflicts = {tuple(c["files"]): c for c in manifest["label_conflicts"]}
    mislabelled = conflicts[("train/c0/mislabelled.png", "train/c1/1.png")]
    assert mislabelled["labels"] == ["c0", "c1"] and mislabelled["kept_as"] == "unlabeled"
    assert (
        index["train/c0/mislabelled.png"]["split"] == "unlabeled" and index["train/c0/mislabelled.png"]["label"] == ""
    )
    assert conflicts[("test/c1/3.png", "train/c0/held.png")]["kept_as"].startswith("left out")
    assert "test/c1/3.png" not in index and "train/c0/held.png" not in index
    assert index["train/c0/2.png"]["label"] == "c0" and index["train/c0/2.png"]["copies"] == "2"  # label wins
    assert manifest["duplicates"]["extra_files"] == 5


def test_a_file_replaced_with_the_same_size_and_mtime_is_decoded_again(tmp_path: Path) -> None:
    """`cp -p`, `rsync -a`, tar: other bytes, the same size and modification time. The
    state cache also keys on ctime, so the file is hashed again; --force re-decodes all."""
    rng = np.random.default_rng(5)
    src = tmp_path / "photos"
    for i in range(30):
        _save(_noise(rng), src / f"c{i % 2}" / f"{i}.bmp")  # BMP: a fixed size for a fixed shape
    cfg = _micro(tmp_path / "run", src, "data.crop_pct=1")
    prepare.run(cfg)
    target = src / "c0" / "0.bmp"
    st = target.stat()
    _save(Image.fromarray(np.full((12, 12, 3), 77, np.uint8)), target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    again = prepare.run(cfg)
    assert again["reused"]["decoded"] == 1 and again["reused"]["files_hashed"] == 1
    data = PreparedData(cfg.data.out_dir)
    row = [r["file"] for r in _rows(data.root)].index("c0/0.bmp")
    assert np.array_equal(data.images[row], np.full((3, 8, 8), 77, np.uint8))
    forced = prepare.run(cfg, force=True)
    assert forced["reused"]["decoded"] == 30 and forced["reused"]["files_hashed"] == 30 and forced["reused"]["forced"]
    assert forced["content_hash"] == again["content_hash"]
    os.environ[preparing.FORCE_ENV] = "1"  # what `mae-ops pipeline --force` sets for DVC's run of the stage
    try:
        assert prepare.run(cfg)["reused"]["decoded"] == 30
    finally:
        del os.environ[preparing.FORCE_ENV]


def test_a_decoder_change_re_decodes_every_stored_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows decoded by another Pillow (or other decoding code) are never mixed with new ones."""
    import PIL

    from mae_ops import images

    rng = np.random.default_rng(6)
    src = tmp_path / "photos"
    for i in range(20):
        _save(_noise(rng, (20, 30, 3)), src / f"c{i % 2}" / f"{i}.png")
    cfg = _micro(tmp_path / "run", src)
    first = prepare.run(cfg)
    assert prepare.run(cfg)["reused"]["decoded"] == 0
    monkeypatch.setattr(PIL, "__version__", "0.0-another")  # another Pillow, another resampling
    monkeypatch.setattr(images, "fit_square", lambda img, size: img.resize((size, size), Image.Resampling.NEAREST))
    again = prepare.run(cfg)
    assert again["reused"]["decoded"] == 20 and again["content_hash"] != first["content_hash"]
    data = PreparedData(cfg.data.out_dir)
    for i, row in enumerate(_rows(data.root)):
        with Image.open(src / row["file"]) as img:
            expected = np.asarray(img.convert("RGB").resize((9, 9), Image.Resampling.NEAREST)).transpose(2, 0, 1)
        assert np.array_equal(data.images[i], expected), row["file"]


def _store_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_fresh_and_incremental_prepares_give_the_same_data_and_the_same_model(tmp_path: Path) -> None:
    """The same images, however the folder got there, give the same samples in the same
    order, splits, labels, pixels, mean/std and content_hash, and pre-training on either
    gives bit-identical weights. Two fresh prepares of copies of the folder elsewhere
    give byte-identical stores (so the same DVC hash)."""
    import shutil

    import torch

    from mae_ops.stages import pretrain

    rng = np.random.default_rng(8)
    history = tmp_path / "history" / "photos"
    for i in range(90):
        _save(_noise(rng), history / f"c{i % 3}" / f"{i}.png")
    grown = _micro(tmp_path / "history", history)
    prepare.run(grown)
    (history / "c0" / "0.png").unlink()
    (history / "c1").rename(history / "one")
    for i in range(90, 120):
        _save(_noise(rng), history / f"c{i % 3 if i % 3 != 1 else 2}" / f"{i}.png")
    incremental = prepare.run(grown)
    assert incremental["reused"]["images"] > 0 and incremental["reused"]["shards_linked"] == 1

    stores = []
    for name in ("fresh_a", "fresh_b"):  # copies of the final folder, prepared from their own folders
        shutil.copytree(history, tmp_path / name / "photos")
        os.chdir(tmp_path / name)
        relative = ["data.source=photos", "data.out_dir=data/prepared", "data.img_size=8",
                    "model.preset=mae_vit_micro_patch4"]  # fmt: skip
        prepare.run(load_params(REPO / "params.yaml", relative))
        stores.append(tmp_path / name / "data" / "prepared")
    os.chdir(tmp_path)
    assert _store_files(stores[0]) == _store_files(stores[1])  # byte for byte: one DVC hash

    a, b = PreparedData(grown.data.out_dir), PreparedData(stores[0])
    assert a.manifest["content_hash"] == b.manifest["content_hash"]
    assert a.manifest["mean"] == b.manifest["mean"] and a.manifest["std"] == b.manifest["std"]
    assert [(r["sample_id"], r["split"], r["label"], r["labelled"]) for r in _rows(a.root)] == [
        (r["sample_id"], r["split"], r["label"], r["labelled"]) for r in _rows(b.root)]  # fmt: skip
    for name in ("labels", "split", "labelled"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert np.array_equal(a.images[:], b.images[:])
    assert a.manifest["shards"] != b.manifest["shards"]  # the grown store kept its old shard: another layout

    weights = []
    for root, data_dir in ((tmp_path / "train_a", a.root), (tmp_path / "train_b", b.root)):
        pretrain.run(tiny_config(root, f"data.out_dir={data_dir}", "data.img_size=8", "pretrain.epochs=1",
                                 "pretrain.batch_size=32", "pretrain.device=cpu"))  # fmt: skip
        weights.append(torch.load(root / "models/pretrain/mae.pth", weights_only=True)["model"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_index_csv_and_the_store_agree(tmp_path: Path, messy_folder: Path) -> None:
    from mae_ops.images import load_image

    cfg = tiny_config(tmp_path / "run", f"data.source={messy_folder}", "data.img_size=16",
                      "data.test_fraction=0.25", "data.val_fraction=0.25")  # fmt: skip
    prepare.run(cfg)
    root = tmp_path / "run" / "data" / "prepared"
    d = _load(root)
    rows = _rows(root)
    assert len(rows) == len(d["images"]) == 18  # skipped files compacted out of the shard
    assert [r["sample_id"] for r in rows] == sorted(r["sample_id"] for r in rows)  # stored in identity order
    for i, r in enumerate(rows):  # every row is its own file's pixels (rows moved up past the skipped ones)
        path = messy_folder / r["file"]
        assert r["sample_id"] == hashlib.md5(path.read_bytes()).hexdigest()
        assert np.array_equal(d["images"][i], load_image(path, 18, 3)), r["file"]
        assert r["split"] == {v: k for k, v in SPLITS.items()}[int(d["split"][i])]
        assert r["label"] == d["manifest"]["classes"][d["labels"][i]] and r["labelled"] == str(int(d["labelled"][i]))


def test_re_prepare_decodes_only_new_and_changed_files(tmp_path: Path) -> None:
    """Preparing again after adding 1% of files decodes those alone (the rest keep their
    shards, hard-linked), moves nothing between splits, and gives the same pixels as a
    fresh prepare; a changed file is decoded again, a removed one leaves the store."""
    rng = np.random.default_rng(1)
    src = tmp_path / "photos"

    def add(i: int) -> None:
        _save(Image.fromarray(rng.integers(0, 255, (14, 10, 3), dtype=np.uint8)), src / f"c{i % 2}" / f"{i}.png")

    for i in range(400):
        add(i)
    cfg = _micro(tmp_path / "run", src)
    first = prepare.run(cfg)
    assert first["reused"] == {"images": 0, "decoded": 400, "embedded": 0, "files_hashed": 400, "shards_linked": 0,
                               "unused_rows": 0, "forced": False}  # fmt: skip
    root = tmp_path / "run" / "data" / "prepared"
    before = _placement(root)
    inode = (root / "shards" / first["shards"][0]).stat().st_ino

    for i in range(400, 404):  # 1% more
        add(i)
    (src / "c1" / "1.png").unlink()
    changed = src / "c0" / "0.png"
    _save(Image.fromarray(np.full((14, 10, 3), 200, np.uint8)), changed)
    again = prepare.run(cfg)
    assert again["reused"]["decoded"] == 5 and again["reused"]["images"] == 398  # 4 new + 1 changed
    assert again["reused"]["files_hashed"] == 5  # the other 398 files known by their inode, size, mtime, ctime
    assert again["reused"]["shards_linked"] == 1 and again["reused"]["unused_rows"] == 2  # removed + changed
    assert (root / "shards" / first["shards"][0]).stat().st_ino == inode  # linked, not copied
    after = _placement(root)
    assert all(after[k] == v for k, v in before.items() if k in after)  # nothing moved between splits
    assert len(after) == 403

    fresh = prepare.run(_micro(tmp_path / "fresh", src))
    a, b = PreparedData(root), PreparedData(tmp_path / "fresh" / "data" / "prepared")
    assert _rows(a.root) == _rows(b.root)
    assert np.array_equal(a.images[:], b.images[:])  # the same pixels, decoded or reused
    row = [r["file"] for r in _rows(a.root)].index("c0/0.png")
    assert np.array_equal(a.images[row], np.full((3, 9, 9), 200, np.uint8))  # 8 / 0.875
    assert again["mean"] == fresh["mean"] and again["std"] == fresh["std"]
    assert again["content_hash"] == fresh["content_hash"]
    for name in ("labels", "split", "labelled"):
        assert np.array_equal(np.load(root / f"{name}.npy"), np.load(b.root / f"{name}.npy"))

    stored = _store_files(root)
    unchanged = prepare.run(cfg)  # nothing changed: nothing decoded, nothing read, not a byte of the store
    assert unchanged["reused"]["decoded"] == 0 and unchanged["reused"]["files_hashed"] == 0
    assert _store_files(root) == stored  # so DVC's hash, and every stage after prepare, stay as they were
    assert unchanged["content_hash"] == again["content_hash"]
    other_size = prepare.run(_micro(tmp_path / "run", src, "data.img_size=12"))
    assert other_size["reused"]["decoded"] == 403  # other pixels: nothing to reuse


def test_store_keeps_more_pixels_and_evaluation_follows_timm(tmp_path: Path) -> None:
    """Photos are stored at img_size / crop_pct (here 73 px for 64): pre-training crops sample
    from that; evaluation, export and `predict` see timm's eval transform of the original file
    (resize the short side to 73, centre crop 64), the same pixels in each."""
    import timm.data

    from mae_ops.serving import ModelInfo, _decode_chunk

    rng = np.random.default_rng(3)
    src = tmp_path / "photos"
    y, x = np.mgrid[0:200, 0:300]
    for i in range(12):
        img = np.stack([128 + 100 * np.sin(x / (20 + i) + c) * np.cos(y / 25 - c) for c in range(3)], -1)
        _save(Image.fromarray((img + rng.integers(0, 4, img.shape)).clip(0, 255).astype(np.uint8)),
              src / f"c{i % 2}" / f"{i}.png")  # fmt: skip
    manifest = prepare.run(tiny_config(tmp_path / "run", f"data.source={src}", "data.img_size=64",
                                       "model.preset=mae_vit_micro_patch4"))  # fmt: skip
    assert (manifest["img_size"], manifest["store_size"], manifest["crop_pct"]) == (64, 73, 0.875)
    data = PreparedData(tmp_path / "run" / "data" / "prepared")
    assert data.images.shape[1:] == (3, 73, 73) and data.eval_images.shape[1:] == (3, 64, 64)
    files = [str(src / r["file"]) for r in _rows(data.root)]
    info = ModelInfo(data.classes, 64, 3, {"crop_pct": "0.875"})  # what export writes for this store

    def timm_eval(img: Image.Image, crop_pct: float) -> np.ndarray:
        transform = timm.data.create_transform(64, crop_pct=crop_pct, interpolation="bicubic", mean=(0,) * 3,
                                               std=(1,) * 3)  # fmt: skip
        return (transform(img.convert("RGB")).numpy() * 255).round()

    for i, f in enumerate(files):
        ours = data.eval_images[i].astype(float)
        with Image.open(f) as img:
            gap = {pct: np.abs(ours - timm_eval(img, pct)).mean() for pct in (0.75, 0.875, 1.0)}
        # the same region as timm's (up to the sub-pixel rounding of resize-then-crop), not another one
        assert gap[0.875] < 1.5 and gap[0.875] < 0.1 * min(gap[0.75], gap[1.0]), (f, gap)
        assert np.array_equal(_decode_chunk([f], info)[0].pixels, data.eval_images[i])  # predict == evaluate

    digits = prepare.run(tiny_config(tmp_path / "digits"))  # the embedded 28 px digits: whole images
    assert (digits["img_size"], digits["store_size"], digits["crop_pct"]) == (28, 28, 1.0)
