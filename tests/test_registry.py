"""Champion/challenger registry and the retraining flow's no-op."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from mae_ops import registry
from mae_ops.stages import evaluate
from tests.conftest import BIN, REPO, export_config, git_dvc_repo, load_flow_module, subprocess_env, tiny_project


def _degrade(model: Path) -> None:
    """A much worse model: the head always answers class 0 (10% on balanced digits)."""
    proto = onnx.load(str(model))
    for t in proto.graph.initializer:
        if t.name.endswith("head.weight") or t.name.endswith("head.bias"):
            arr = np.zeros(onnx.numpy_helper.to_array(t).shape, dtype=np.float32)
            if t.name.endswith("bias"):
                arr[0] = 10.0
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    onnx.save(proto, str(model))


@pytest.fixture
def project(tmp_path: Path, exported: Path) -> Path:
    for sub in ("data/prepared", "models/finetune", "models/export", "reports/export"):
        shutil.copytree(exported / sub, tmp_path / sub)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    evaluate.run(export_config(tmp_path, "evaluate.baseline=none", "evaluate.linprobe=false",
                               "evaluate.classical=false", "evaluate.near_duplicates=null",
                               f"evaluate.metrics_file={tmp_path}/reports/metrics.json"))  # fmt: skip
    return tmp_path


def test_promotes_better_keeps_champion_against_worse_and_rolls_back(project: Path) -> None:
    reg, data = project / "registry", project / "data/prepared"
    good = (project / "models/export/model.onnx").read_bytes()

    _degrade(project / "models/export/model.onnx")
    info = registry.register(project, reg)
    weak = info["version"]
    parity = json.loads((project / "reports/export/parity.json").read_text())
    assert info["published"]["file"] in parity["files"]  # what export published, with its test top-1
    assert info["published"]["test_top1"] == parity["published"]["test_top1"]  # what that runtime scored
    assert info["published"]["runtime"] in ("onnxruntime", "openvino")
    first = registry.challenge(reg, weak, data)
    assert first["promoted"] and registry.production(reg)["version"] == weak

    (project / "models/export/model.onnx").write_bytes(good)
    strong = registry.register(project, reg)["version"]
    better = registry.challenge(reg, strong, data)
    assert better["promoted"] and better["challenger_top1"] > better["champion_top1"]
    assert registry.production(reg)["version"] == strong

    _degrade(project / "models/export/model.onnx")
    worse = registry.register(project, reg)["version"]
    kept = registry.challenge(reg, worse, data)
    assert not kept["promoted"] and registry.production(reg)["version"] == strong
    assert kept["champion_top1"] == pytest.approx(better["challenger_top1"])  # re-measured on the same split

    assert [v["version"] for v in registry.list_versions(reg)] == [weak, strong, worse]
    assert {"model.onnx", "metrics.json", "params.yaml", "info.json"} <= {
        p.name for p in (reg / "versions" / strong).iterdir()
    }
    assert registry.rollback(reg)["version"] == weak
    with pytest.raises(registry.RegistryError, match="nothing to roll back"):
        registry.rollback(reg)
    events = [e["event"] for e in registry.history(reg)]
    assert events.count("promoted") == 3 and "kept champion" in events
    assert not list(reg.glob("*.tmp")) and not list(reg.glob(".production*"))


def test_refuses_to_compare_models_prepared_under_other_split_definitions(project: Path) -> None:
    """data.seed (or a split fraction) changed between champion and challenger: the test
    split of one holds training images of the other, so no comparison is made."""
    reg, data = project / "registry", project / "data/prepared"
    champion = registry.register(project, reg)["version"]
    assert registry.challenge(reg, champion, data)["promoted"]
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["split_definition"]["seed"] += 1  # what a re-prepare with another data.seed records
    (data / "manifest.json").write_text(json.dumps(manifest))
    challenger = registry.register(project, reg)["version"]
    with pytest.raises(registry.RegistryError, match=r"other split definitions .*seed 0 vs 1") as refused:
        registry.challenge(reg, challenger, data)
    assert "\n" not in str(refused.value) and champion in str(refused.value)
    assert registry.production(reg)["version"] == champion  # nothing changed
    assert [e["event"] for e in registry.history(reg)].count("promoted") == 1


def test_retrain_asks_dvc_whether_the_image_folder_changed(tmp_path: Path) -> None:
    """The image folder is a DVC dep of `prepare` (listed by the flow): retraining does
    nothing while DVC says it is unchanged, and re-prepares (decoding only the new files)
    and trains a challenger once images are added. No hashing of our own."""
    import subprocess

    import yaml
    from PIL import Image
    from prefect.testing.utilities import prefect_test_harness

    from mae_ops.orchestration import stage_status

    rng = np.random.default_rng(0)
    images = tmp_path / "project" / "images"

    def add(i: int) -> None:
        (images / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = np.clip(rng.normal(60 + 120 * (i % 2), 30, (20, 20)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"c{i % 2}" / f"{i}.png")

    for i in range(160):
        add(i)
    repo = tiny_project(tmp_path / "project", data={"source": "images", "img_size": 16},  # stored at 18 px
                        finetune={"crop_scale": [0.08, 1.0], "hflip": True},
                        retrain={"dvc_remote": "", "commit_lock": True})  # fmt: skip
    # a folder named in params.yaml by hand but not in dvc.yaml: `dvc repro` refuses, naming the fix
    proc = subprocess.run([str(BIN / "dvc"), "repro", "prepare"], cwd=repo, capture_output=True, text=True,
                          env=subprocess_env())  # fmt: skip
    assert proc.returncode != 0 and "not among the deps of the prepare stage" in proc.stdout + proc.stderr

    retrain = load_flow_module("retrain").retrain
    with prefect_test_harness(server_startup_timeout=120):
        first = retrain(repo=str(repo))
        assert first["action"] == "promoted"
        assert "images" in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["prepare"]["deps"]
        # the lock was committed with the dvc.yaml that names the folder it records
        committed = subprocess.run(["git", "show", "HEAD:dvc.yaml"], cwd=repo, capture_output=True, text=True).stdout
        assert "images" in yaml.safe_load(committed)["stages"]["prepare"]["deps"]
        status = subprocess.run(["git", "status", "--porcelain", "dvc.yaml", "dvc.lock"], cwd=repo,
                                capture_output=True, text=True)  # fmt: skip
        assert status.returncode == 0 and status.stdout == ""
        assert retrain(repo=str(repo))["action"] == "skipped"

        for i in range(160, 163):
            add(i)
        assert stage_status(repo, "prepare")  # DVC sees the folder change
        again = retrain(repo=str(repo))
    assert again["action"] in ("promoted", "kept champion")
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    last_run = json.loads((repo / "data/.prepared.last-run.json").read_text())
    assert manifest["num_images"] == 163 and last_run["reused"]["decoded"] == 3
    assert len(registry.list_versions(repo / "registry")) == 2
    assert not stage_status(repo, "prepare")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scheduled_deployment_on_a_real_local_server(project: Path, tmp_path_factory) -> None:
    """`prefect server start` on 127.0.0.1, `mae-ops serve` registers the cron
    deployment, and a run triggered through the server completes."""
    import os
    import subprocess
    import time
    import urllib.request

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    for item in ("flows", "src", "dvc.yaml"):
        (shutil.copytree if (REPO / item).is_dir() else shutil.copy)(REPO / item, project / item)
    # DVC records the prepared data as they are (no stage runs): the retraining flow then finds them unchanged
    git_dvc_repo(project)
    subprocess.run([str(BIN / "dvc"), "commit", "-f", "-q", "prepare"], cwd=project, env=subprocess_env(), check=True)
    reg = project / "registry"
    registry.promote(reg, registry.register(project, reg)["version"], "test")  # data unchanged: runs are no-ops

    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**subprocess_env(), "PREFECT_HOME": str(home), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}  # fmt: skip
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    serve = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError("the Prefect server did not come up")
        cmd = [str(BIN / "mae-ops"), "serve", "--set", "retrain.schedule=30 2 * * *"]
        serve = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            deployment = None
            while time.time() < deadline + 60 and deployment is None:
                try:
                    with get_client(sync_client=True) as client:
                        deployment = client.read_deployment_by_name("mae-ops-retrain/mae-ops-retrain")
                except Exception:
                    time.sleep(1)
            assert deployment is not None, "mae-ops serve did not register the deployment"
            assert [s.schedule.cron for s in deployment.schedules] == ["30 2 * * *"]
            run = run_deployment("mae-ops-retrain/mae-ops-retrain", timeout=180)
            assert run.state is not None and run.state.is_completed(), run.state
    finally:
        for proc in (serve, server):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    assert os.path.exists(reg / "production.json")


def test_the_published_variant_is_named_with_its_accuracy_and_latency(tmp_path: Path) -> None:
    """The run summary and the registry name the model file export published for serving."""
    from mae_ops.atomic import write_json
    from mae_ops.orchestration import run_summary

    static = {"batch1_p50_ms": 1.5, "batch32_images_per_s": 900.0}
    int8 = {"chosen": "static", "variants": {"static": static, "dynamic": {"batch1_p50_ms": 1.1}}}
    parity = {"files": ["model.onnx", "model.int8.onnx"], "onnx_top1": 0.95, "int8_top1": 0.94,
              "max_abs_diff": 1e-6, "top1_agreement": 1.0, "int8": int8}  # fmt: skip
    assert registry.published_variant(parity) == {
        "variant": "onnxruntime_int8_static", "file": "model.int8.onnx", "test_top1": 0.94, **static}  # fmt: skip
    timed = registry.published_variant(parity, {"onnxruntime_int8_static": {"batch1_p50_ms": 1.2,
                                                                           "batch32_images_per_s": 950.0}})  # fmt: skip
    assert (timed["batch1_p50_ms"], timed["batch32_images_per_s"]) == (1.2, 950.0)  # this model's benchmark wins
    fp32 = {**parity, "files": ["model.onnx"], "int8": {"chosen": None, "why_none": "no int8 passed"}}
    assert registry.published_variant(fp32) == {"variant": "onnxruntime_fp32", "file": "model.onnx", "test_top1": 0.95}

    write_json(tmp_path / "reports/export/parity.json", parity)
    summary = run_summary(tmp_path, [], [])
    assert "**Published for serving**: `model.int8.onnx` (onnxruntime_int8_static): test top-1 94.00%, " \
           "batch-1 p50 1.50 ms, batch 32 900 img/s." in summary  # fmt: skip

    # the export stage's own choice, against OpenVINO's default: file, runtime, accuracy, speed and margin
    chosen = {"variant": "openvino_fp32", "peer": "openvino_default", "vs_peer": {"batch1": 1.08, "batch32": 1.1},
              "file": "model.onnx", "runtime": "openvino", "test_top1": 0.95, "batch1_p50_ms": 1.4,
              "batch32_images_per_s": 990.0}  # fmt: skip
    assert registry.published_variant({**parity, "published": chosen}) == {
        "variant": "openvino_fp32", "file": "model.onnx", "runtime": "openvino", "test_top1": 0.95,
        "peer": "openvino_default", "vs_peer": {"batch1": 1.08, "batch32": 1.1},
        "batch1_p50_ms": 1.4, "batch32_images_per_s": 990.0}  # fmt: skip
    write_json(tmp_path / "reports/export/parity.json", {**parity, "published": chosen})
    assert "**Published for serving**: `model.onnx` with openvino (openvino_fp32): test top-1 95.00%, batch-1 p50 " \
           "1.40 ms, batch 32 990 img/s; against openvino_default: ×1.08 at batch 1, ×1.10 at batch 32." \
           in run_summary(tmp_path, [], [])  # fmt: skip
