"""`mae-ops embed` and `mae-ops similar`: deterministic embeddings with onnxruntime alone,
streamed to Parquet, and exact cosine search over them."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mae_ops.serving import open_session
from mae_ops.similarity import near_duplicates, nearest, read_embeddings
from tests.conftest import BIN, subprocess_env
from tests.test_export import _test_arrays


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mae-ops"), *args], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def folder(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 test digits as PNGs, one saved twice under another name, one unreadable file."""
    root = tmp_path_factory.mktemp("embed")
    images, _ = _test_arrays(exported)
    for i in range(60):
        Image.fromarray(images[i, 0]).save(root / f"d{i:03d}.png")
    Image.fromarray(images[7, 0]).save(root / "copy_of_d007.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def test_embed_is_deterministic_streams_parquet_and_needs_no_torch(exported: Path, folder: Path,
                                                                  tmp_path: Path) -> None:  # fmt: skip
    encoder = exported / "models/export/encoder.onnx"
    code = (
        "import sys\nfrom mae_ops.cli import main\n"
        f"sys.argv = ['mae-ops', 'embed', {str(encoder)!r}, {str(folder)!r}, '--out', "
        f"{str(tmp_path / 'a.parquet')!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    print('EXIT', e.code)\n"
        "print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)  # fmt: skip
    assert proc.stdout.split()[-3:] == ["EXIT", "1", "NO_TORCH"], proc.stdout + proc.stderr  # one unreadable file
    assert "skipped" in proc.stderr and "broken.png" in proc.stderr
    assert "embedded 61 images (1 unreadable, skipped)" in proc.stderr

    again = _cli("embed", str(encoder), str(folder), "--out", str(tmp_path / "b.parquet"), "--batch-size", "7",
                 "--workers", "0")  # fmt: skip
    assert again.returncode == 1, again.stderr
    table = pq.read_table(tmp_path / "a.parquet")
    assert table.column_names == ["file", "embedding"] and table.num_rows == 61
    assert table.schema.field("embedding").type.list_size == 32  # micro preset: embed_dim 32
    assert (table.schema.metadata or {})[b"model_sha256"]
    a = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    b = np.stack(pq.read_table(tmp_path / "b.parquet").column("embedding").to_numpy(zero_copy_only=False))
    assert table.column("file").to_pylist() == pq.read_table(tmp_path / "b.parquet").column("file").to_pylist()
    np.testing.assert_array_equal(a, b)  # the same images, another batching: the same vectors, bit for bit

    # the encoder itself on the stored pixels: what embed wrote for that file
    images, _ = _test_arrays(exported)
    direct = open_session(encoder, "cpu").run(["features"], {"pixels": images[3:4].astype(np.float32) / 255})[0]
    row = table.column("file").to_pylist().index(str(folder / "d003.png"))
    np.testing.assert_allclose(a[row], direct[0], atol=1e-5)


def test_similar_finds_the_copy_and_the_near_duplicate_pairs(exported: Path, folder: Path, tmp_path: Path) -> None:
    encoder = exported / "models/export/encoder.onnx"
    index = tmp_path / "index.parquet"
    assert _cli("embed", str(encoder), str(folder), "--out", str(index)).returncode == 1  # the broken file
    proc = _cli("similar", str(index), "-k", "3")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert len(rows) == 61 * 3
    first = {r["query"]: r for r in rows if r["rank"] == "1"}
    assert first[str(folder / "d007.png")]["neighbour"] == str(folder / "copy_of_d007.png")
    assert float(first[str(folder / "d007.png")]["cosine"]) == pytest.approx(1.0, abs=1e-5)
    assert all(r["query"] != r["neighbour"] for r in rows)  # an image is not its own neighbour

    pairs_csv = tmp_path / "pairs.csv"
    proc = _cli("similar", str(index), "--duplicates", "0.9999", "--out", str(pairs_csv))
    assert proc.returncode == 0, proc.stderr
    pairs = list(csv.DictReader(pairs_csv.open()))
    assert {(p["file_a"], p["file_b"]) for p in pairs} >= {(str(folder / "copy_of_d007.png"), str(folder / "d007.png"))}

    wrong = _cli("similar", str(folder / "d000.png"))
    assert wrong.returncode == 2 and "not an embeddings file" in wrong.stderr and "Traceback" not in wrong.stderr


def test_exact_search_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 16)).astype(np.float32)
    emb[17] = emb[250] + 1e-3  # a near-duplicate
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    full = emb @ emb.T
    np.fill_diagonal(full, -np.inf)
    ids, sims = nearest(emb, emb, 4, block=64, exclude_self=True)
    np.testing.assert_array_equal(ids, np.argsort(-full, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(sims, np.take_along_axis(full, ids, 1), rtol=1e-6)
    threshold = 0.5
    want = {(i, j) for i in range(300) for j in range(i + 1, 300) if full[i, j] >= threshold}
    got = {(i, j) for i, j, _ in near_duplicates(emb, threshold, block=64)}
    assert got == want and (17, 250) in got


def test_a_file_that_is_not_embeddings_is_refused(tmp_path: Path) -> None:
    from mae_ops.similarity import EmbeddingsError

    (tmp_path / "x.parquet").write_bytes(b"PAR1 nonsense")
    with pytest.raises(EmbeddingsError, match="not an embeddings file"):
        read_embeddings(tmp_path / "x.parquet")


def test_evaluate_reports_a_near_duplicate_across_splits(tmp_path: Path, prepared_mnist: Path) -> None:
    """A test image that is a training image with one pixel changed (not an exact copy, so
    prepare keeps both) is reported as a near-duplicate pair across the splits."""
    from mae_ops.data import PreparedData
    from mae_ops.stages import evaluate, prepare, pretrain
    from tests.conftest import ft_config

    store = PreparedData(prepared_mnist)
    digits = store.images
    folder = tmp_path / "photos"
    for split, count in (("train", 30), ("test", 8)):
        for c in range(4):
            (folder / split / f"c{c}").mkdir(parents=True)
            ids = np.flatnonzero(store.labels == c)[: 30 + 8]
            for k, i in enumerate(ids[:count] if split == "train" else ids[30:]):
                Image.fromarray(digits[i, 0]).save(folder / split / f"c{c}" / f"{k}.png")
    twin = np.array(Image.open(folder / "train/c2/5.png"))
    twin[0, 0] = twin[0, 0] ^ 1
    Image.fromarray(twin).save(folder / "test/c2/twin.png")
    cfg = ft_config(tmp_path, f"data.source={folder}", "data.val_fraction=0.1", "pretrain.epochs=3",
                    "evaluate.near_duplicates=0.999")  # fmt: skip
    prepare.run(cfg)
    pretrain.run(cfg)
    data = PreparedData(tmp_path / "data/prepared")
    files = pd.read_csv(data.root / "index.csv", keep_default_na=False)["file"].to_numpy()
    near, report = evaluate.near_duplicate_report(cfg, data, files, evaluate.resolve_device("cpu"))
    assert report["images"] == 4 * 38 + 1 and sum(report["pairs"].values()) == len(near) >= 1
    top = near.iloc[0]
    assert {Path(top["file_a"]).name, Path(top["file_b"]).name} == {"5.png", "twin.png"}
    assert "test" in {top["split_a"], top["split_b"]} and top["cosine"] >= 0.999  # the twin's copy: train or val
    assert (near["split_a"] != near["split_b"]).all()
