"""ONNX export: parity gate, metadata, int8, dynamic batch, and `mae-ops predict`."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from mae_ops.data import PreparedData
from mae_ops.serving import ModelInfo, open_session, run_logits
from mae_ops.stages import export
from tests.conftest import BIN, export_config, subprocess_env, write_params


def _test_arrays(root: Path) -> tuple[np.ndarray, np.ndarray]:
    split = np.load(root / "data/prepared/split.npy")
    ids = np.flatnonzero(split == 2)
    images = PreparedData(root / "data/prepared").images[ids]
    return images, np.load(root / "data/prepared/labels.npy")[ids]


def test_parity_on_real_digits(exported: Path) -> None:
    parity = json.loads((exported / "reports/export/parity.json").read_text())
    assert parity["num_images"] == int((np.load(exported / "data/prepared/split.npy") == 2).sum()) > 900
    assert parity["passed"]
    assert parity["max_abs_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0
    # check it independently: onnxruntime on the test digits vs the PyTorch classifier
    import torch

    from mae_ops.models.classifier import load_classifier

    model, args = load_classifier(exported / "models/finetune/model.pth")
    images, _ = _test_arrays(exported)
    pixels = images.astype(np.float32) / 255.0
    mean, std = np.array(args["mean"]).reshape(1, -1, 1, 1), np.array(args["std"]).reshape(1, -1, 1, 1)
    with torch.no_grad():
        ref = model(torch.from_numpy(((pixels - mean) / std).astype(np.float32))).numpy()
    got = run_logits(open_session(exported / "models/export/model.onnx", "cpu"), pixels)
    assert np.abs(got - ref).max() <= 1e-4
    # one self-contained file, valid, opset >= 17
    files = sorted(p.name for p in (exported / "models/export").iterdir())
    assert files == ["encoder.onnx", "model.int8.onnx", "model.onnx"]
    proto = onnx.load(str(exported / "models/export/model.onnx"))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17


def test_metadata_round_trip(exported: Path) -> None:
    info = ModelInfo.from_session(open_session(exported / "models/export/model.onnx", "cpu"))
    manifest = json.loads((exported / "data/prepared/manifest.json").read_text())
    assert info.classes == manifest["classes"] and info.img_size == 28 and info.channels == 1
    assert json.loads(info.metadata["mean"]) == manifest["mean"] and json.loads(info.metadata["std"]) == manifest["std"]
    sha = hashlib.sha256((exported / "models/finetune/model.pth").read_bytes()).hexdigest()
    assert info.metadata["model_sha256"] == sha
    assert info.metadata["data_hash"] == manifest["content_hash"] and len(info.metadata["params_hash"]) == 16


@pytest.mark.parametrize("name", ["model.onnx", "model.int8.onnx", "encoder.onnx"])
def test_published_files_name_nothing_of_the_exporting_machine(exported: Path, name: str) -> None:
    path = exported / "models/export" / name
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    assert nodes and not any(p.key.endswith("stack_trace") for n in nodes for p in n.metadata_props)
    raw = path.read_bytes()
    for local in {sys.prefix, str(Path.home()), str(exported)}:  # the venv, the home, the project
        assert local.encode() not in raw, f"{name} holds the path {local}"
    assert b"name_scopes" in raw  # the machine-free node names stay, for reading the graph


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("name", ["model.onnx", "model.int8.onnx", "encoder.onnx"])
def test_every_published_model_gives_one_image_one_answer(exported: Path, name: str, runtime: str) -> None:
    """The same images alone, in batches of 7 and in one batch of 256: the same probabilities
    (features for the encoder) to 1e-4, with either runtime. Dynamic int8, which takes its
    activation scale from the whole batch, would answer differently; it is not published."""
    session = open_session(exported / "models/export" / name, "cpu", runtime=runtime)
    images, _ = _test_arrays(exported)
    pixels = np.resize(images, (256, *images.shape[1:])).astype(np.float32) / 255.0
    output = "features" if name == "encoder.onnx" else "probabilities"
    runs = {size: np.concatenate([session.run([output], {"pixels": pixels[i : i + size]})[0]
                                  for i in range(0, 256, size)]) for size in (1, 7, 256)}  # fmt: skip
    assert runs[7].shape[0] == 256
    for size in (7, 256):
        np.testing.assert_allclose(runs[size], runs[1], rtol=0, atol=1e-4, err_msg=f"batch {size} vs alone")
    if output == "probabilities":
        np.testing.assert_allclose(runs[256].sum(1), 1.0, atol=1e-5)
    parity = json.loads((exported / "reports/export/parity.json").read_text())
    assert parity["batch_max_prob_diff"][name] <= 1e-4  # the stage's own gate said so too
    if runtime == "openvino" and name != "encoder.onnx":
        variant = "openvino_int8_static" if "int8" in name else "openvino_fp32"
        assert parity["openvino"]["variants"][variant]["batch_max_prob_diff"] <= 1e-4


def test_int8_accuracy_is_measured_on_the_test_split(exported: Path) -> None:
    parity = json.loads((exported / "reports/export/parity.json").read_text())
    images, labels = _test_arrays(exported)
    q = run_logits(open_session(exported / "models/export/model.int8.onnx", "cpu"), images.astype(np.float32) / 255)
    assert parity["int8_top1"] == pytest.approx(float((q.argmax(1) == labels).mean()))
    assert parity["int8_drop"] == pytest.approx(parity["onnx_top1"] - parity["int8_top1"])
    assert (exported / "models/export/model.int8.onnx").stat().st_size < (
        exported / "models/export/model.onnx"
    ).stat().st_size


def test_int8_weights_leave_the_headroom_that_cpus_without_vnni_need(exported: Path) -> None:
    """Every int8 weight of the published int8 model lies in -64..64: AVX2 kernels sum uint8 x int8
    pairs into int16, which full-range weights saturate (255 * 127 * 2 > 32,767), so the same file
    would score lower on a CPU without VNNI (2.0 points of test top-1 on the demo, measured)."""
    from onnx import numpy_helper

    model = onnx.load(str(exported / "models/export/model.int8.onnx"))
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64


def test_encoder_feature_extractor(exported: Path) -> None:
    session = open_session(exported / "models/export/encoder.onnx", "cpu")
    images, _ = _test_arrays(exported)
    feats = session.run(["features"], {"pixels": images[:5].astype(np.float32) / 255})[0]
    assert feats.shape == (5, 32)  # micro preset: embed_dim 32


def test_gate_refuses_a_broken_model_and_keeps_the_old_file(exported: Path, monkeypatch) -> None:
    before = (exported / "models/export/model.onnx").read_bytes()
    real = export.to_onnx

    def broken_exporter(module, example, dest, outputs, opset, metadata, *rest):
        real(module, example, dest, outputs, opset, metadata, *rest)
        proto = onnx.load(str(dest))
        weight = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))  # perturb the largest weight
        arr = onnx.numpy_helper.to_array(weight).copy()
        arr += 0.05
        weight.CopyFrom(onnx.numpy_helper.from_array(arr, weight.name))
        onnx.save(proto, str(dest))

    monkeypatch.setattr(export, "to_onnx", broken_exporter)
    with pytest.raises(export.ParityError, match="parity failed"):
        export.run(export_config(exported))
    assert (exported / "models/export/model.onnx").read_bytes() == before
    assert not json.loads((exported / "reports/export/parity.json").read_text())["passed"]
    assert not list((exported / "models/export").glob(".export-*"))  # no temp files left
    monkeypatch.undo()
    export.run(export_config(exported))  # restore the passing report for other tests


def test_export_command_logs_stay_readable(exported: Path, tmp_path: Path) -> None:
    cfg = export_config(exported, f"export.out_dir={tmp_path}/export", f"export.reports_dir={tmp_path}/reports")
    params = write_params(cfg, tmp_path / "params.yaml")
    proc = subprocess.run([str(BIN / "mae-ops"), "export", "-p", str(params)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "parity: max |diff|" in proc.stdout and "int8 top-1" in proc.stdout
    assert "INFO mae_ops.stages.export: exported model.onnx" in proc.stderr
    # the exporter's optimiser and the quantiser log hundreds of INFO lines per export; only warnings pass
    chatty = [line for line in proc.stderr.splitlines() if " INFO " in line and " mae_ops." not in line]
    assert not chatty, chatty[:5]
    assert (tmp_path / "export/model.int8.onnx").exists()


def test_predict_on_a_folder_with_a_corrupt_file(exported: Path, tmp_path: Path) -> None:
    images, _ = _test_arrays(exported)
    folder = tmp_path / "incoming"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(images[i, 0]).save(folder / f"digit_{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    proc = subprocess.run(
        [str(BIN / "mae-ops"), "predict", str(exported / "models/export/model.onnx"), str(folder), "--json", "-k", "2"],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    records = {Path(r["file"]).name: r for r in map(json.loads, proc.stdout.splitlines())}
    assert "error" in records["broken.png"] and "top" not in records["broken.png"]
    expected = run_logits(open_session(exported / "models/export/model.onnx", "cpu"),
                          images[:6].astype(np.float32) / 255).argmax(1)  # fmt: skip
    for i in range(6):
        top = records[f"digit_{i}.png"]["top"]
        assert len(top) == 2 and top[0]["prob"] >= top[1]["prob"]
        assert top[0]["label"] == str(expected[i])


def test_predict_with_a_truncated_model_is_one_clear_error(exported: Path, tmp_path: Path) -> None:
    images, _ = _test_arrays(exported)
    Image.fromarray(images[0, 0]).save(tmp_path / "one.png")
    model = tmp_path / "half.onnx"
    whole = (exported / "models/export/model.onnx").read_bytes()
    model.write_bytes(whole[: len(whole) // 2])  # e.g. an interrupted copy to the serving host
    proc = subprocess.run([str(BIN / "mae-ops"), "predict", str(model), str(tmp_path)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"cannot load {model} as an ONNX model" in proc.stderr


def test_predict_path_does_not_import_torch(exported: Path, tmp_path: Path) -> None:
    images, _ = _test_arrays(exported)
    Image.fromarray(images[0, 0]).save(tmp_path / "one.png")
    model = str(exported / "models/export/model.onnx")
    code = (
        "import sys\nfrom mae_ops.cli import main\n"
        f"sys.argv = ['mae-ops', 'predict', {model!r}, {str(tmp_path)!r}, '--csv']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("NO_TORCH")
    assert "one.png" in proc.stdout


def test_export_fuses_attention_and_keeps_the_faster_int8(exported: Path) -> None:
    from collections import Counter

    parity = json.loads((exported / "reports/export/parity.json").read_text())
    fused = parity["fused_operators"]
    assert fused.get("Attention", 0) >= 1 and fused.get("SkipLayerNormalization", 0) >= 1, fused
    ops = Counter(n.op_type for n in onnx.load(str(exported / "models/export/model.onnx")).graph.node)
    assert ops["Attention"] == fused["Attention"]  # in the published graph, not only in the report
    int8 = parity["int8"]
    assert int8["gate_split"] == "val" and set(int8["variants"]) == {"dynamic", "static"}
    passing = {n: v for n, v in int8["variants"].items() if v["passed"]}
    assert int8["chosen"] == min(passing, key=lambda n: passing[n]["batch1_p50_ms"])
    dynamic = int8["variants"]["dynamic"]  # one image, several answers: never published
    assert dynamic["batch_max_prob_diff"] > 1e-4 and not dynamic["passed"] and int8["chosen"] == "static"
    ops8 = Counter(n.op_type for n in onnx.load(str(exported / "models/export/model.int8.onnx")).graph.node)
    marker = "QuantizeLinear" if int8["chosen"] == "static" else "DynamicQuantizeLinear"
    assert ops8[marker] > 0
    bench = json.loads((exported / "reports/export/benchmark.json").read_text())
    assert bench["model_sha256"] == hashlib.sha256((exported / "models/finetune/model.pth").read_bytes()).hexdigest()
    assert {"torch_eager", "onnxruntime_fp32", "onnxruntime_int8_dynamic", "onnxruntime_int8_static"} <= set(
        bench["results"]
    )
    assert all(r["batch1_p50_ms"] > 0 and r["batch32_images_per_s"] > 0 for r in bench["results"].values())


def test_predict_decodes_in_processes_and_keeps_the_order(exported: Path, tmp_path: Path) -> None:
    from mae_ops.serving import expand_paths, predict_files

    images, _ = _test_arrays(exported)
    for i in range(300):
        Image.fromarray(images[i % len(images), 0]).save(tmp_path / f"d{i:04d}.png")
    (tmp_path / "d0150.png").write_bytes(b"not a png")  # an error in the middle of a batch
    files = expand_paths([tmp_path])
    session = open_session(exported / "models/export/model.onnx", "cpu")
    serial = list(predict_files(session, files, batch_size=64, workers=0))
    parallel = list(predict_files(session, files, batch_size=64, workers=2))
    assert [r["file"] for r in parallel] == [str(f) for f in files]
    assert parallel == serial
    assert "error" in parallel[150] and all("top" in r for i, r in enumerate(parallel) if i != 150)


def test_a_twelve_bit_data_set_is_served_as_it_was_trained(exported: Path, tmp_path: Path) -> None:
    """data.bit_depth travels with the model: prepare reads 12-bit frames saved as 16-bit PNGs on
    0..4095, export writes the setting into the model's metadata, and predict decodes the same
    files to the pixels training and evaluation saw (the default, 0..65535, would see p / 16)."""
    import shutil

    from mae_ops.serving import _decoded, expand_paths, predict_files
    from mae_ops.stages import prepare

    images, labels = _test_arrays(exported)
    src = tmp_path / "frames"
    for i in range(80):  # each digit pixel p as the 12-bit value p * 4095 / 255
        frame = np.round(images[i, 0].astype(np.float64) * 4095 / 255).astype(np.uint16)
        (src / str(labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(src / str(labels[i]) / f"{i:03d}.png")
    shutil.copytree(exported / "models", tmp_path / "models")
    data = [f"data.source={src}", "data.bit_depth=12", "data.crop_pct=1"]
    prepare.run(export_config(tmp_path, *data))
    export.run(export_config(tmp_path, *data, "export.calibration_images=0", "export.benchmark_runs=0"))

    session = open_session(tmp_path / "models/export/model.onnx", "cpu")
    info = ModelInfo.from_session(session)
    assert info.metadata["bit_depth"] == "12" and info.bit_depth == 12
    files = expand_paths([src])
    seen = np.stack([d.pixels for d in _decoded(files, info, workers=0)])
    digits = {f"{labels[i]}/{i:03d}.png": images[i] for i in range(80)}
    assert all(np.array_equal(seen[k], digits[f.relative_to(src).as_posix()]) for k, f in enumerate(files))
    prepared = PreparedData(tmp_path / "data/prepared")
    with open(prepared.root / "index.csv", newline="") as fh:
        stored = {r["file"]: prepared.images[[i]][0] for i, r in enumerate(csv.DictReader(fh))}
    assert prepared.bit_depth == 12 and all(np.array_equal(stored[name], d) for name, d in digits.items())
    # the same session, told nothing of the bit depth, would see the frames 16x darker
    default = np.stack([d.pixels for d in _decoded(files, ModelInfo(info.classes, 28, 1, {}), workers=0)])
    assert default.max() <= 16 < seen.max()
    expected = run_logits(session, seen.astype(np.float32) / 255).argmax(1)
    predicted = [r["top"][0]["label"] for r in predict_files(session, files, batch_size=32, workers=0)]
    assert predicted == [info.classes[c] for c in expected]
    assert not any(d.clipped for d in _decoded(files, info, workers=0))
    # frames the model was not trained on: a camera storing its 12 bits high in the word, a float frame over 1.0
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    shutil.copy(files[0], incoming / "same.png")
    with Image.open(files[0]) as img:
        frame = np.asarray(img)
    Image.fromarray(frame << 4).save(incoming / "high_word.png")
    Image.fromarray(frame.astype(np.float32) / 2048).save(incoming / "bright.tif")  # values up to 2.0
    stdout = {}
    for command, model, out in (("predict", "model.onnx", ["--json"]),
                                ("embed", "encoder.onnx", ["-o", str(tmp_path / "e.parquet")])):  # fmt: skip
        proc = subprocess.run([str(BIN / "mae-ops"), command, str(tmp_path / "models/export" / model), str(incoming),
                               *out], capture_output=True, text=True, env=subprocess_env(), timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "warning: 2 images hold values outside 0..4095 (the model's bit depth, 12;" in proc.stderr, command
        stdout[command] = proc.stdout
    records = {Path(r["file"]).name: r for r in map(json.loads, stdout["predict"].splitlines())}
    assert records["high_word.png"]["clipped"] is records["bright.tif"]["clipped"] is True
    assert "clipped" not in records["same.png"] and records["same.png"]["top"][0]["label"] == predicted[0]


def test_large_models_keep_their_tensors_beside_the_onnx_file(exported: Path, tmp_path: Path) -> None:
    """Past export.external_data_mb (lowered to 0 here; ViT-H's 2.5 GB pass the default) every
    published model keeps its tensors in <name>.onnx.data: the .onnx stays far below protobuf's
    2 GiB limit, the metadata is intact, and the folder works wherever it is moved."""
    from mae_ops.deploy import data_file, is_external

    out = tmp_path / "export"
    export.run(export_config(exported, f"export.out_dir={out}", f"export.reports_dir={tmp_path}/reports",
                             "export.external_data_mb=0", "export.fp16=true"))  # fmt: skip
    names = ["model.onnx", "model.int8.onnx", "model.fp16.onnx", "encoder.onnx"]
    for name in names:
        assert is_external(out / name), name
        inline = onnx.load(str(out / name), load_external_data=False).graph.initializer
        assert max(len(t.raw_data) for t in inline) < 1024, name  # only small constants stay in the graph
        assert data_file(out / name).stat().st_size > 20_000, name  # the weights: int8 ones too
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, *(n + ".data" for n in names)])
    parity = json.loads((tmp_path / "reports/parity.json").read_text())
    assert parity["passed"] and "model.onnx.data" in parity["files"]

    moved = tmp_path / "elsewhere"
    out.rename(moved)
    images, _ = _test_arrays(exported)
    pixels = images[:16].astype(np.float32) / 255.0
    single = open_session(exported / "models/export/model.onnx", "cpu")
    split = open_session(moved / "model.onnx", "cpu")
    moved_meta, single_meta = ModelInfo.from_session(split).metadata, ModelInfo.from_session(single).metadata
    # all but `runtime`: the runtime each export measured fastest for the file, a timing of its own
    assert {moved_meta.pop("runtime"), single_meta.pop("runtime")} <= {"onnxruntime", "openvino"}
    assert moved_meta == single_meta
    np.testing.assert_allclose(run_logits(split, pixels), run_logits(single, pixels), atol=1e-4)


def test_no_passing_int8_publishes_fp32_alone(exported: Path, tmp_path: Path) -> None:
    """Dynamic int8 alone (no calibration) scores an image differently in another batch: the
    export still succeeds with fp32, removes the earlier int8 file and says why in parity.json."""
    import shutil

    for sub in ("data/prepared", "models"):
        shutil.copytree(exported / sub, tmp_path / sub)
    assert (tmp_path / "models/export/model.int8.onnx").exists()
    parity = export.run(export_config(tmp_path, "export.calibration_images=0", "export.benchmark_runs=0"))
    assert parity["passed"] and parity["int8"]["chosen"] is None
    assert set(parity["int8"]["variants"]) == {"dynamic"} and not parity["int8"]["variants"]["dynamic"]["passed"]
    assert "scores an image alike" in parity["int8"]["why_none"] and "int8_top1" not in parity
    assert sorted(p.name for p in (tmp_path / "models/export").iterdir()) == ["encoder.onnx", "model.onnx"]
    assert "model.int8.onnx" not in parity["batch_max_prob_diff"]


def test_openvino_is_the_peer_and_the_published_variant_is_fastest_against_it(exported: Path) -> None:
    """benchmark.json times OpenVINO's default on the unfused graph (the peer) with the
    published files under both runtimes; the published variant is the one whose slower side
    against the peer is fastest, its runtime is in the file, and its test top-1 is what that
    runtime scores."""
    from mae_ops.deploy import metadata_of
    from mae_ops.serving import resolve_runtime, top1_accuracy

    bench = json.loads((exported / "reports/export/benchmark.json").read_text())
    parity = json.loads((exported / "reports/export/parity.json").read_text())
    results, pub = bench["results"], parity["published"]
    assert {"openvino_default", "openvino_fp32", "openvino_int8_static"} <= set(results)
    assert bench["peer"] == pub["peer"] == "openvino_default" and bench["published"] == pub["variant"]
    ov = parity["openvino"]["variants"]
    assert all(v["drop"] <= 1.0 and v["passed"] for v in ov.values())  # max_int8_drop=1.0 in the tests
    candidates = ["onnxruntime_fp32", f"onnxruntime_int8_{parity['int8']['chosen']}", *ov]
    peer = results["openvino_default"]

    def worse_side(name: str) -> float:
        return min(peer["batch1_p50_ms"] / results[name]["batch1_p50_ms"],
                   results[name]["batch32_images_per_s"] / peer["batch32_images_per_s"])  # fmt: skip

    assert pub["variant"] in candidates
    assert worse_side(pub["variant"]) == pytest.approx(max(map(worse_side, candidates)), abs=1e-3)
    assert pub["vs_peer"]["batch1"] == pytest.approx(peer["batch1_p50_ms"] / pub["batch1_p50_ms"], abs=1e-3)
    path = exported / "models/export" / pub["file"]
    assert metadata_of(path)["runtime"] == pub["runtime"] == ("openvino" if "openvino" in pub["variant"] else
                                                              "onnxruntime")  # fmt: skip
    assert resolve_runtime("auto", "cpu", path) == pub["runtime"]  # predict serves it as it was measured
    assert resolve_runtime("auto", "cuda", path) == "onnxruntime"  # a GPU stays with onnxruntime-gpu
    images = PreparedData(exported / "data/prepared")
    test_ids = images.indices("test")
    session = open_session(path, "cpu", runtime=pub["runtime"])
    assert pub["test_top1"] == pytest.approx(top1_accuracy(session, images.eval_images, images.labels, test_ids))


def test_choose_published_takes_the_best_worse_side() -> None:
    from mae_ops.deploy import choose_published

    timings = {"peer": {"batch1_p50_ms": 1.0, "batch32_images_per_s": 1000.0},
               "fast_alone": {"batch1_p50_ms": 0.5, "batch32_images_per_s": 900.0},  # slower at batch 32
               "even": {"batch1_p50_ms": 0.9, "batch32_images_per_s": 1050.0}}  # fmt: skip
    pick = choose_published(timings, ["fast_alone", "even"], "peer")
    assert pick["variant"] == "even" and pick["vs_peer"] == {"batch1": 1.111, "batch32": 1.05}
    assert choose_published({}, ["onnxruntime_fp32", "onnxruntime_int8_static"], "peer")["variant"] == (
        "onnxruntime_int8_static"
    )


def test_predict_and_embed_with_openvino_match_onnxruntime(exported: Path, tmp_path: Path) -> None:
    images, _ = _test_arrays(exported)
    for i in range(20):
        Image.fromarray(images[i, 0]).save(tmp_path / f"digit_{i:02d}.png")
    model = str(exported / "models/export/model.onnx")
    runs = {}
    for runtime in ("onnxruntime", "openvino"):
        proc = subprocess.run([str(BIN / "mae-ops"), "predict", model, str(tmp_path), "--json", "-k", "3",
                               "--runtime", runtime, "--batch-size", "7"],
                              capture_output=True, text=True, env=subprocess_env(), timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        runs[runtime] = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["file"] for r in runs["openvino"]] == [r["file"] for r in runs["onnxruntime"]]
    for a, b in zip(runs["onnxruntime"], runs["openvino"], strict=True):
        assert a["top"][0]["label"] == b["top"][0]["label"]
        assert abs(a["top"][0]["prob"] - b["top"][0]["prob"]) <= 1e-4
    for runtime in ("onnxruntime", "openvino"):
        proc = subprocess.run([str(BIN / "mae-ops"), "embed", str(exported / "models/export/encoder.onnx"),
                               str(tmp_path), "--out", str(tmp_path / f"{runtime}.parquet"), "--runtime", runtime],
                              capture_output=True, text=True, env=subprocess_env(), timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    import pandas as pd

    a, b = (np.stack(pd.read_parquet(tmp_path / f"{r}.parquet")["embedding"]) for r in ("onnxruntime", "openvino"))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    cmd = [str(BIN / "mae-ops"), "predict", model, str(tmp_path), "--runtime", "openvino", "--device", "cuda"]
    wrong = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "OpenVINO serves on the CPU here; for --device cuda use --runtime onnxruntime" in wrong.stderr


def test_openvino_sessions_leave_the_signal_stack_of_python_handlers_alone(exported: Path) -> None:
    """Sessions dropped in the order they were opened, as the export stage's timings drop them,
    then a Python signal handler runs (as a loader worker's SIGCHLD or Ctrl-C would run one):
    with a Core per session, OpenVINO's CPU plugins left the main thread's signal stack in
    freed memory and the process died of SIGSEGV there. A fresh interpreter, so a crash is
    this test's failure, not the suite's."""
    code = f"""
import gc, os, signal
import numpy as np
from mae_ops.serving import OpenVINOSession
sessions = [OpenVINOSession({str(exported / "models/export/model.onnx")!r}, 1, tuned=t) for t in (False, True)]
[s.run(None, {{"pixels": np.zeros([2, *s.get_inputs()[0].shape[1:]], np.float32)}}) for s in sessions]
while sessions:  # nothing else holds them
    sessions.pop(0)
    gc.collect()
taken = []
signal.signal(signal.SIGUSR1, lambda *_: taken.append(1))
os.kill(os.getpid(), signal.SIGUSR1)
print("handled", len(taken))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.split() == ["handled", "1"], (proc.returncode, proc.stderr[-2000:])
