"""Fine-tuning, linear probing, Optuna search and evaluation on tiny configs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

from mae_ops import classical, finetuning, hpo, runtime
from mae_ops.config import Config, InputError
from mae_ops.data import DeviceBatches, PreparedData, set_epoch
from mae_ops.models.checkpoint import read_checkpoint
from mae_ops.models.classifier import build_classifier, load_classifier, load_encoder
from mae_ops.models.mae import create_mae
from mae_ops.reporting import read_predictions
from mae_ops.stages import baselines, evaluate, finetune
from tests.conftest import BIN, FT, REPO, ft_config, subprocess_env, tiny_overrides


def _cpu() -> runtime.Runtime:
    return runtime.setup("cpu", "off")


def test_our_encoder_lands_in_the_classifier(run_root: Path) -> None:
    cfg = ft_config(run_root)
    data = PreparedData(cfg.data.out_dir, hide_test=True)
    model, args = finetuning.make_classifier(finetuning.encoder_spec(cfg, "pretrain"), cfg.finetune, data)
    mae = torch.load(run_root / "models/pretrain/mae.pth", weights_only=True)["model"]
    state = model.state_dict()
    for key in (
        "patch_embed.proj.weight",
        "cls_token",
        "pos_embed",
        "blocks.1.attn.qkv.weight",
        "blocks.0.mlp.fc2.bias",
    ):
        assert torch.equal(state[key], mae[key]), key
    assert args["mode"] == "finetune" and args["classes"] == [str(i) for i in range(10)]
    # the head starts near zero, fc_norm replaces the final norm for average pooling
    assert model.head.weight.abs().max() < 1e-3 and model.global_pool == "avg"
    scratch, _ = finetuning.make_classifier(finetuning.encoder_spec(cfg, "scratch"), cfg.finetune, data)
    assert not torch.equal(scratch.state_dict()["blocks.1.attn.qkv.weight"], mae["blocks.1.attn.qkv.weight"])
    # the frozen baselines read the pre-trained encoder even when fine-tuning starts from scratch
    from_scratch = ft_config(run_root, "finetune.init=scratch")
    assert finetuning.frozen_encoder_spec(from_scratch) == finetuning.encoder_spec(cfg, "pretrain")
    assert finetuning.encoder_spec(cfg, "pretrain").path == cfg.outputs().encoder
    with pytest.raises(InputError, match=r"nowhere\.pth not found: init must be pretrain, scratch or a file"):
        finetuning.encoder_spec(cfg, str(run_root / "nowhere.pth"))


def test_official_checkpoint_at_another_resolution(tmp_path: Path) -> None:
    torch.manual_seed(1)
    mae = create_mae("mae_vit_micro_patch4", img_size=16, in_chans=3)  # 4x4 grid
    torch.save({"model": mae.state_dict()}, tmp_path / "mae_pretrain_official.pth")
    clf = build_classifier("mae_vit_micro_patch4", 32, 3, 5)  # 8x8 grid
    missing = load_encoder(clf, tmp_path / "mae_pretrain_official.pth")
    assert set(missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert clf.pos_embed.shape == (1, 65, 32)
    assert torch.equal(clf.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)
    assert torch.equal(clf.pos_embed[:, 0], mae.pos_embed[:, 0])  # cls position kept
    wrong = build_classifier("mae_vit_tiny_patch4", 32, 3, 5)
    with pytest.raises(ValueError, match="do not fit"):
        load_encoder(wrong, tmp_path / "mae_pretrain_official.pth")


def test_layer_decay_groups_get_the_right_lr_scales(run_root: Path) -> None:
    cfg = ft_config(run_root, "finetune.layer_decay=0.5")
    model = build_classifier("mae_vit_micro_patch4", 28, 1, 10)
    optimizer = finetuning.finetune_optimizer(model, cfg.finetune, lr=1e-3, fused=False)
    depth = len(model.blocks)
    scale_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            scale_of[p] = group["lr_scale"]
    assert scale_of[model.patch_embed.proj.weight] == pytest.approx(0.5 ** (depth + 1))
    assert scale_of[model.cls_token] == pytest.approx(0.5 ** (depth + 1))
    for i, block in enumerate(model.blocks):
        assert scale_of[block.attn.qkv.weight] == pytest.approx(0.5 ** (depth - i))
    assert scale_of[model.head.weight] == 1.0 and scale_of[model.fc_norm.weight] == 1.0
    # the schedule honours the scales
    from mae_ops.training import cosine_schedule

    sched = cosine_schedule(optimizer, epochs=10, updates_per_epoch=10, warmup_epochs=0, min_lr=0.0)
    sched.step_update(10)
    base = next(g["lr"] for g in optimizer.param_groups if g["lr_scale"] == 1.0)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(base * group["lr_scale"])
    no_decay = {p for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert model.pos_embed in no_decay and model.blocks[0].norm1.weight in no_decay
    assert model.blocks[0].attn.qkv.weight not in no_decay


def test_the_fast_fine_tune_trains_the_same_batches_and_math(run_root: Path) -> None:
    """finetune.fast: the labelled images resident on the device and the step compiled
    change where the batches come from and which kernels run, not what is learnt."""
    cfg = ft_config(run_root)
    data = PreparedData(cfg.data.out_dir, hide_test=True)
    ids = data.indices("train", labelled_only=True)
    resident = finetuning.train_loader(data, ids, 8, _cpu(), resident=True, seed=3)
    host = finetuning.train_loader(data, ids, 8, _cpu(), resident=False, seed=3)
    assert isinstance(resident, DeviceBatches) and not isinstance(host, DeviceBatches)
    for epoch in (0, 1):  # the same images and labels in the same order, every epoch
        set_epoch(resident, epoch)
        set_epoch(host, epoch)
        for (a, la), (b, lb) in zip(resident, host, strict=True):
            assert torch.equal(a, b) and torch.equal(la, lb)
    runs = {}
    for fast in ("off", "on"):
        ft = cfg.finetune.model_copy(update={"fast": fast, "epochs": 3, "eval_every": 1})
        runs[fast] = finetuning.train_finetune(finetuning.encoder_spec(cfg, "pretrain"), ft, data, _cpu(), epochs=3)
    plain, fast = (runs[k].history for k in ("off", "on"))
    assert [h["epoch"] for h in fast] == [1, 2, 3]
    for a, b in zip(plain, fast, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=2e-3)
        assert abs(b["val_top1"] - a["val_top1"]) <= 0.02
    assert plain[-1]["train_loss"] < plain[0]["train_loss"]  # it learnt something to compare


def test_linprobe_freezes_the_encoder(run_root: Path) -> None:
    cfg = ft_config(run_root)
    data = PreparedData(cfg.data.out_dir, hide_test=True)
    result = finetuning.train_linprobe(finetuning.encoder_spec(cfg, "pretrain"), cfg.finetune, data, _cpu())
    mae = torch.load(run_root / "models/pretrain/mae.pth", weights_only=True)["model"]
    assert torch.equal(result.model.blocks[0].attn.qkv.weight, mae["blocks.0.attn.qkv.weight"])
    bn = result.model.head[0]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.num_batches_tracked > 0
    finetuning._seed_everything(cfg.finetune.seed)  # the head as it was made, before training
    start, _ = finetuning.make_classifier(finetuning.encoder_spec(cfg, "pretrain"), cfg.finetune, data, linprobe=True)
    assert not torch.allclose(result.model.head[1].weight, start.head[1].weight, atol=1e-3)  # the head learned
    assert 0.1 < result.val_top1 <= 1.0
    # the reference's probe: [CLS] token after the pre-trained norm, LARS adapting the weight only
    assert result.model.global_pool == "token" and result.args["global_pool"] == "token"
    optimizer = finetuning.linprobe_optimizer(result.model.head, cfg.finetune, 0.1)
    assert [(g["always_adapt"], [p.ndim for p in g["params"]]) for g in optimizer.param_groups] == [
        (True, [2]),
        (False, [1]),
    ]
    assert optimizer.param_groups[0]["trust_coeff"] == 1.0 and optimizer.param_groups[0]["weight_decay"] == 0.0


def test_linear_probe_baseline_is_tuned_on_the_validation_split(run_root: Path) -> None:
    cfg = ft_config(run_root, "evaluate.baseline=none", "evaluate.classical=false")
    finetune.run(cfg)
    report = baselines.run(cfg)["linprobe"]
    assert {(t["pool"], t["lr"]) for t in report["tried"]} == {
        (p, float(f"{cfg.finetune.linprobe_lr * f:.3g}")) for p in ("token", "avg") for f in (1 / 3, 1, 3)
    }
    best = max(report["tried"], key=lambda t: t["val_top1"])
    assert (report["pool"], report["lr"], report["val_top1"]) == (best["pool"], best["lr"], best["val_top1"])
    saved = read_checkpoint(run_root / "models/baselines/linprobe.pth")["args"]
    assert saved["global_pool"] == report["pool"] and saved["finetune"]["linprobe_lr"] == report["lr"]


def test_test_split_is_never_read_while_training_and_tuning(run_root: Path, tmp_path_factory) -> None:
    other = tmp_path_factory.mktemp("poisoned")
    for sub in ("data/prepared", "models/pretrain"):
        shutil.copytree(run_root / sub, other / sub)
    # poison every test image and label in the second copy (same manifest, so same fingerprints)
    poisoned = PreparedData(other / "data/prepared")
    split, labels = np.load(other / "data/prepared/split.npy"), np.load(other / "data/prepared/labels.npy")
    test = np.flatnonzero(split == 2)
    rng = np.random.default_rng(0)
    for shard, row in poisoned.images.where[test]:
        path = other / "data/prepared/shards" / poisoned.manifest["shards"][shard]
        pixels = np.load(path, mmap_mode="r+")
        pixels[row] = rng.integers(0, 255, pixels.shape[1:], dtype=np.uint8)
        pixels.flush()
    labels[test] = (labels[test] + 3) % 10
    np.save(other / "data/prepared/labels.npy", labels)

    weights = []
    for root in (run_root, other):
        finetune.run(ft_config(root, "hpo.enabled=true", "hpo.n_trials=2"))
        weights.append(torch.load(root / "models/finetune/model.pth", weights_only=True)["model"])
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    with pytest.raises(PermissionError, match="held out"):
        PreparedData(run_root / "data/prepared", hide_test=True).indices("test")


def _study(cfg: Config) -> optuna.Study:
    data = PreparedData(cfg.data.out_dir)
    # hpo.storage, not the bare URL: it retries while a running search is still creating the
    # schema (opening a half-made SQLite file raced the stage's own schema set-up)
    name = hpo.study_name(cfg, data.manifest["content_hash"])
    return optuna.load_study(study_name=name, storage=hpo.storage(cfg.hpo))


def test_pruner_stops_trials_in_a_hopeless_region(run_root: Path) -> None:
    cfg = ft_config(run_root, "hpo.enabled=true", "hpo.n_trials=6", "hpo.epochs=3", "hpo.startup_trials=2",
                    "hpo.warmup_epochs=2", "hpo.space={base_lr: {choices: [0.01, 1.0e-9]}}")  # fmt: skip
    finetune.run(cfg)
    trials = _study(cfg).get_trials()
    states = [t.state for t in trials]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert any(t.params["base_lr"] == 1.0e-9 for t in pruned), [(t.params, t.state) for t in trials]
    assert all(len(t.intermediate_values) < 2 for t in pruned)  # stopped before the last epoch
    # validated only where the pruner can act: from hpo.warmup_epochs on
    assert all(min(t.intermediate_values) == 2 for t in trials if t.intermediate_values)
    assert sum(s in hpo.FINISHED for s in states) == 6


def test_the_search_chooses_the_recipe_and_the_final_model_trains_with_it(run_root: Path) -> None:
    """``recipe`` in hpo.space: each trial trains with its recipe's augmentation (the keys
    params.yaml sets explicitly kept), and so does the final model of the best trial."""
    space = "hpo.space={recipe: {choices: [reference, small-data]}, base_lr: {low: 1.0e-3, high: 0.01}}"
    cfg = ft_config(run_root, "finetune.recipe=small-data", "finetune.rotate=5.0", "hpo.enabled=true",
                    "hpo.n_trials=2", "hpo.epochs=1", "hpo.pruner=none", space)  # fmt: skip
    study = hpo.create_study(cfg, PreparedData(cfg.data.out_dir).manifest["content_hash"])
    study.enqueue_trial({"recipe": "reference", "base_lr": 0.01})  # both recipes tried, whatever the sampler draws
    study.enqueue_trial({"recipe": "small-data", "base_lr": 0.001})
    finetune.run(cfg)
    trials = {t.params["recipe"]: t for t in _study(cfg).get_trials() if t.state == TrialState.COMPLETE}
    assert set(trials) == {"reference", "small-data"}
    best = max(trials.values(), key=lambda t: t.value).params["recipe"]
    final = read_checkpoint(run_root / "models/finetune/model.pth")["args"]["finetune"]
    assert final["recipe"] == best and final["rotate"] == 5.0  # explicit key kept whichever recipe won
    want = {"reference": (0.8, [0.08, 1.0], True), "small-data": (0.0, None, False)}[best]
    assert (final["mixup"], list(final["crop_scale"]) if final["crop_scale"] else None, final["hflip"]) == want
    assert json.loads((run_root / "reports/hpo/best_params.json").read_text())["params"]["recipe"] == best


def test_a_failing_trial_does_not_stop_the_study(run_root: Path) -> None:
    cfg = ft_config(run_root, "hpo.enabled=true", "hpo.n_trials=4", "hpo.pruner=none",
                    "hpo.space={base_lr: {choices: [0.01, 1.0e+12]}}")  # fmt: skip
    finetune.run(cfg)
    trials = _study(cfg).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and all(t.params["base_lr"] == 1.0e12 for t in failed)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert complete and all(set(t.intermediate_values) == {cfg.hpo.epochs} for t in complete)  # no pruner: the end
    assert len(trials) == 4
    best = pd.read_csv(run_root / "reports/hpo/trials.csv")
    assert set(best["state"]) >= {"COMPLETE", "FAIL"}
    for png in ("optimization_history.png", "intermediate_values.png"):
        assert (run_root / "reports/hpo" / png).stat().st_size > 1000


def test_a_killed_study_resumes_with_its_earlier_trials(run_root: Path) -> None:
    extra = ["hpo.enabled=true", "hpo.n_trials=4", "hpo.epochs=4", "hpo.pruner=none"]
    cfg = ft_config(run_root, *extra)
    cmd = [str(BIN / "mae-ops"), "finetune", "--params", str(REPO / "params.yaml")]
    for item in [*tiny_overrides(run_root), *FT, *[f"{k}={v}" for k, v in _paths(run_root).items()], *extra]:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    done: list = []
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if not (run_root / "optuna/study.db").exists():
            continue
        try:
            done = _study(cfg).get_trials(states=(TrialState.COMPLETE,))
        except KeyError:  # study not created yet
            continue
        if done:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and done, "the search finished before it could be killed"
    before = {t.number: t.params for t in _study(cfg).get_trials(states=(TrialState.COMPLETE,))}

    finetune.run(cfg)
    after = _study(cfg).get_trials()
    finished = [t for t in after if t.state in hpo.FINISHED]
    assert len(finished) == 4
    for number, params in before.items():  # the earlier trials are kept, not redone
        assert after[number].params == params and after[number].state == TrialState.COMPLETE
    assert (run_root / "models/finetune/model.pth").exists()


def test_local_workers_share_one_study_one_gpu_each(run_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hpo.workers: auto is one worker per visible GPU, each started with only its own GPU
    visible (two GPUs faked here: the workers then find no CUDA and train on the CPU)."""
    cfg = ft_config(run_root, "hpo.enabled=true", "hpo.n_trials=4", "hpo.workers=auto", "hpo.pruner=none")
    assert hpo.worker_gpus(cfg) == [None]  # no GPU: one worker
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert hpo.worker_gpus(cfg) == ["0", "1"]
    assert hpo.worker_gpus(cfg.model_copy(update={"hpo": cfg.hpo.model_copy(update={"workers": 3})})) == ["0", "1", "0"]
    pinned = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"device": "cuda:1"})})
    assert hpo.worker_gpus(pinned) == [None]  # the device names its GPU: nothing to pin
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # the GPUs this process was given, by their names
    assert hpo.worker_gpus(cfg) == ["5", "7"]

    data = PreparedData(cfg.data.out_dir, hide_test=True)
    hpo.run_study(cfg, data, runtime.setup("cpu"))
    assert {"CUDA_VISIBLE_DEVICES": "5,7"}.items() <= dict(os.environ).items()  # restored here
    trials = _study(cfg).get_trials()
    assert len([t for t in trials if t.state in hpo.FINISHED]) >= 4
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    by_worker = {t.user_attrs["worker"]: set() for t in done}
    for t in done:
        by_worker[t.user_attrs["worker"]].add(t.user_attrs["device"])
    assert len(by_worker) == 2, by_worker  # two processes took trials
    assert sorted(d for devices in by_worker.values() for d in devices) == [
        "cpu (CUDA_VISIBLE_DEVICES=5)", "cpu (CUDA_VISIBLE_DEVICES=7)"]  # fmt: skip
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # no trial lost or duplicated


def test_the_final_fine_tune_and_the_scratch_baseline_run_in_two_processes(run_root: Path) -> None:
    """finetune.nproc_per_node=2: the final fine-tuning and the scratch baseline each run as
    two gloo ranks x batch 16 (effective batch 32, the lr scaled for it); rank 0 saves a model
    that scores on validation what it reported, and it learned."""
    cfg = ft_config(run_root, "finetune.nproc_per_node=2", "finetune.batch_size=16", "finetune.epochs=6")
    metrics = finetune.run(cfg)
    assert metrics["world_size"] == 2 and metrics["epochs"] == 6
    history = pd.read_csv(run_root / "reports/finetune/history.csv")
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    data = PreparedData(cfg.data.out_dir, hide_test=True)
    model, args = load_classifier(run_root / "models/finetune/model.pth")
    top1, pred = finetuning.validate_model(model, data, data.indices("val"), torch.device("cpu"))
    assert top1 == pytest.approx(metrics["val_top1"], abs=1e-4)
    assert args["finetune"]["nproc_per_node"] == 2
    # rank 0's per-image validation classes (the study pairs them) and its DVCLive log, epoch by epoch
    table = read_predictions((run_root / "reports/finetune/val_predictions.csv").read_text())
    assert np.array_equal(table["id"], data.indices("val")) and (table["pred"] == pred).mean() > 0.99
    live = pd.read_csv(run_root / "reports/finetune/live/plots/metrics/train_loss.tsv", sep="\t")
    assert live["step"].tolist() == list(range(1, 7))
    assert live["train_loss"].tolist() == pytest.approx(history["train_loss"].tolist())
    one = finetune.run(ft_config(run_root / "one", "finetune.batch_size=32", "finetune.epochs=6",
                                 f"data.out_dir={run_root}/data/prepared",
                                 f"pretrain.out_dir={run_root}/models/pretrain"))  # fmt: skip
    assert one["world_size"] == 1
    assert abs(metrics["val_top1"] - one["val_top1"]) < 0.1, (metrics["val_top1"], one["val_top1"])  # same batch

    cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"linprobe": False, "classical": False})})
    scratch = baselines.run(cfg)["scratch"]
    assert scratch["world_size"] == 2 and (run_root / "models/baselines/scratch.pth").exists()


def _paths(root: Path) -> dict[str, str]:
    return {
        "finetune.out_dir": f"{root}/models/finetune", "finetune.checkpoint_dir": f"{root}/checkpoints/finetune",
        "finetune.reports_dir": f"{root}/reports/finetune", "hpo.storage": f"sqlite:///{root}/optuna/study.db",
        "hpo.reports_dir": f"{root}/reports/hpo",
    }  # fmt: skip


def test_evaluate_matches_a_direct_computation(run_root: Path) -> None:
    cfg = ft_config(run_root)
    finetune.run(cfg)
    baselines.run(cfg)
    results = evaluate.run(cfg)
    assert set(results) == {"finetune", "scratch", "linprobe", "logreg_pixels", "knn_pixels", "knn_mae"}
    n_test = int((np.load(run_root / "data/prepared/split.npy") == 2).sum())
    for r in results.values():
        assert 0.0 <= r["top1"] <= 1.0 and 0.0 <= r["top5"] <= 1.0 and r["top5"] >= r["top1"]
        assert r["num_test"] == n_test
    table = pd.read_csv(run_root / "reports/eval/predictions.csv", dtype=str)
    assert len(table) == n_test
    for name, r in results.items():
        assert r["top1"] == pytest.approx((table[f"{name}_pred"] == table["label"]).mean(), abs=1e-5)
    per_class = pd.read_csv(run_root / "reports/eval/per_class.csv", dtype={"class": str})
    for _, row in per_class.iterrows():
        truth = table["label"] == row["class"]
        predicted = table["finetune_pred"] == row["class"]
        assert row["support"] == truth.sum()
        assert row["recall"] == pytest.approx((truth & predicted).sum() / truth.sum(), abs=1e-4)
        if predicted.sum():
            assert row["precision"] == pytest.approx((truth & predicted).sum() / predicted.sum(), abs=1e-4)
    summary = (run_root / "reports/eval/summary.md").read_text()
    assert "from scratch" in summary and "linear probe" in summary
    # the headline margin is over the strongest baseline, whichever it is
    strongest = max((k for k in results if k != "finetune"), key=lambda k: results[k]["top1"])
    gain = (results["finetune"]["top1"] - results[strongest]["top1"]) * 100
    assert f"({classical.NAMES.get(strongest, '') or ''}" in summary or strongest in ("scratch", "linprobe")
    assert f"by **{gain:+.1f} points**" in summary
    assert (run_root / "reports/eval/confusion_matrix.png").stat().st_size > 1000
    near = pd.read_csv(run_root / "reports/data/near_duplicates.csv")  # the data check ran, across splits only
    assert list(near.columns) == ["split_a", "file_a", "split_b", "file_b", "cosine"]
    assert (near["split_a"] != near["split_b"]).all() and (near["cosine"] >= 0.995).all()
    assert "## Data check" in summary and "near_duplicates.csv" in summary
    # the classical baselines were tuned on the validation split, and say with what
    tuned = json.loads((run_root / "reports/baselines/metrics.json").read_text())
    assert tuned["logreg_pixels"]["C"] in classical.LOGREG_C and tuned["knn_mae"]["k"] in classical.KNN_K
    assert tuned["knn_mae"]["metric"] == "cosine" and 0 < tuned["knn_pixels"]["val_top1"] <= 1


def test_resume_refuses_a_checkpoint_of_other_params(run_root: Path) -> None:
    from mae_ops.training import ResumeError

    finetune.run(ft_config(run_root, "finetune.save_every=1"))
    with pytest.raises(ResumeError, match="different run"):
        finetune.run(ft_config(run_root, "finetune.save_every=1", "finetune.drop_path=0.2"), resume=True)


def test_hpo_worker_refuses_a_disabled_search(tmp_path: Path) -> None:
    proc = subprocess.run([str(BIN / "mae-ops"), "hpo-worker", "--params", str(REPO / "params.yaml"),
                           "--set", "hpo.enabled=false"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "hpo.enabled: true" in proc.stderr
    assert not (tmp_path / "optuna").exists()


def test_scratch_baseline_is_tuned_by_its_own_study(run_root: Path) -> None:
    """With a search for the MAE model, the scratch ViT gets its own study (same trials and
    epochs per trial, no layer decay) and is trained for the final budget with its best params."""
    cfg = ft_config(run_root, "hpo.enabled=true", "hpo.n_trials=3", "hpo.epochs=2", "hpo.pruner=none",
                    "evaluate.linprobe=false", "evaluate.classical=false")  # fmt: skip
    finetune.run(cfg)
    metrics = baselines.run(cfg)
    scfg = baselines.scratch_config(cfg)
    study = _study(scfg)
    assert study.study_name != _study(cfg).study_name and study.study_name.startswith("mae-ops-finetune-scratch-")
    finished = [t for t in study.get_trials() if t.state in hpo.FINISHED]
    assert len(finished) == 3 == len([t for t in _study(cfg).get_trials() if t.state in hpo.FINISHED])
    assert all("layer_decay" not in t.params for t in finished)
    search = metrics["scratch"]["search"]
    assert search["tuned"] and search["trials"] == 3 and search["params"] == study.best_trial.params
    used = read_checkpoint(run_root / "models/baselines/scratch.pth")["args"]["finetune"]
    assert used["init"] == "scratch" and used["layer_decay"] == 1.0 and used["epochs"] == cfg.finetune.epochs
    assert all(used[k] == pytest.approx(v) for k, v in study.best_trial.params.items())
    evaluate.run(cfg)
    assert "tuned by its own search of 3 trials" in (run_root / "reports/eval/summary.md").read_text()


def test_the_reference_randaugment_survives_its_strongest_magnitude() -> None:
    """rand-m9-mstd0.5-inc1 reaches magnitude 10, where timm's increasing posterize keeps 0 bits:
    Pillow >= 11 refuses that and a whole fine-tuning run died; now it is a black image."""
    from PIL import Image

    transform = finetuning.randaugment("rand-m10-n4-inc1-mstd0", {"img_mean": (124, 116, 104)})
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    for _ in range(200):
        assert transform(img).size == (16, 16)
    post = next(op for op in transform.ops if op.name == "PosterizeIncreasing")
    assert np.asarray(post.aug_fn(img, 0)).max() == 0 and post.aug_fn(img, 8) is img


def test_randaugment_runs_in_loader_workers_with_the_same_draws_for_any_number_of_them(run_root: Path) -> None:
    """RandAugment (PIL, per image) runs in the loader's worker processes, so the host keeps a
    GPU fed; its draws are keyed by the seed, the epoch and the batch, so 0 or 2 workers give
    the same batches and the same fine-tuning, each epoch draws anew, and Mixup's draws in
    the training process are left alone. In the suite's own process, after the export tests
    have run OpenVINO there (its signal stack: test_export.py)."""
    import random

    from mae_ops.data import batch_loader

    cfg = ft_config(run_root)
    data = PreparedData(cfg.data.out_dir, hide_test=True)
    ids = data.indices("train", labelled_only=True)
    randaug = finetuning.HostRandAugment("rand-m9-mstd0.5-inc1", data.mean)
    plain, *augmented = (batch_loader(data, ids, 16, shuffle=False, transform=t, num_workers=w)
                         for t, w in ((None, 0), (randaug, 0), (randaug, 2)))  # fmt: skip
    seen = []
    for epoch in (0, 1):
        for loader in (plain, *augmented):
            set_epoch(loader, epoch)
        random.seed(5)
        np.random.seed(5)
        batches = list(zip(plain, *augmented, strict=True))
        assert (random.random(), np.random.random()) == (random.seed(5), np.random.seed(5), random.random(),
                                                         np.random.random())[2:]  # fmt: skip
        for (x, y), (a, ya), (b, yb) in batches:
            assert torch.equal(a, b) and torch.equal(ya, y) and torch.equal(yb, y)
            assert a.shape == x.shape and a.dtype == torch.uint8
        changed = np.mean([not torch.equal(x[i], a[i]) for (x, _), (a, _), _ in batches for i in range(len(x))])
        assert changed > 0.5, changed  # two ops per image, each applied at random
        seen.append(torch.cat([a for _, (a, _), _ in batches]))
    assert not torch.equal(seen[0], seen[1])  # the same images, other draws in another epoch

    runs = []
    for workers in (0, 2):
        ft = cfg.finetune.model_copy(update={"randaug": "rand-m9-mstd0.5-inc1", "num_workers": workers})
        runs.append(finetuning.train_finetune(finetuning.encoder_spec(cfg, "pretrain"), ft, data, _cpu(),
                                              epochs=2).history)  # fmt: skip
    assert [h["train_loss"] for h in runs[0]] == [h["train_loss"] for h in runs[1]]
    assert [h["val_top1"] for h in runs[0]] == [h["val_top1"] for h in runs[1]]


def test_the_model_shipped_is_the_best_on_validation_not_always_the_fine_tuned_one(run_root: Path) -> None:
    """A fine-tune starved of learning rate loses to the linear probe on validation: evaluate
    chooses the probe (deployed.json, summary), export ships it (its weights, its metadata),
    and the registry records its test score."""
    import hashlib

    from mae_ops import registry
    from mae_ops.serving import ModelInfo, open_session, run_logits
    from mae_ops.stages import export
    from tests.conftest import export_config

    cfg = export_config(run_root, "finetune.base_lr=1e-7", "finetune.epochs=1", "evaluate.baseline=none",
                        "evaluate.classical=false", "export.quantize=false", "export.benchmark_runs=0",
                        "evaluate.near_duplicates=null")  # fmt: skip
    finetune.run(cfg)
    baselines.run(cfg)
    results = evaluate.run(cfg)
    deployed = json.loads((run_root / "reports/eval/deployed.json").read_text())
    assert deployed["val_top1"]["linprobe"] > deployed["val_top1"]["finetune"] and deployed["model"] == "linprobe"
    probe = run_root / "models/baselines/linprobe.pth"
    assert deployed["checkpoint_sha256"] == hashlib.sha256(probe.read_bytes()).hexdigest()
    assert deployed["test_top1"] == results["linprobe"]["top1"]
    assert (
        "**Deployed** (exported and registered): MAE encoder frozen, linear probe"
        in (run_root / "reports/eval/summary.md").read_text()
    )

    parity = export.run(cfg)
    assert parity["deployed"] == "linprobe" and parity["passed"]
    session = open_session(run_root / "models/export/model.onnx", "cpu")
    info = ModelInfo.from_session(session)
    assert info.metadata["deployed"] == "linprobe"
    assert info.metadata["model_sha256"] == deployed["checkpoint_sha256"]
    data = PreparedData(run_root / "data/prepared")
    test_ids = data.indices("test")
    logits = run_logits(session, np.asarray(data.eval_images[test_ids], dtype=np.float32) / 255)
    assert float((logits.argmax(1) == data.labels[test_ids]).mean()) == pytest.approx(results["linprobe"]["top1"])

    for rel in ("params.yaml", "dvc.lock"):  # what a registered run carries besides its models
        (run_root / rel).write_text("{}\n")
    info = registry.register(run_root, run_root / "registry")
    assert info["deployed"] == "linprobe" and info["test_top1"] == results["linprobe"]["top1"]

    probe.write_bytes(probe.read_bytes() + b"\0")  # the chosen checkpoint changed after evaluation
    with pytest.raises(export.InputError, match="run `mae-ops evaluate` again"):
        export.run(cfg)


def test_a_tie_on_validation_ships_the_fine_tuned_model(tmp_path: Path) -> None:
    paths = {name: tmp_path / f"{name}.pth" for name in ("finetune", "scratch", "linprobe")}
    for p in paths.values():
        p.write_bytes(p.name.encode())
    infos = {"finetune": {"val_top1": 0.5}, "scratch": {"val_top1": 0.9}, "linprobe": {"val_top1": 0.5}}
    chosen = evaluate.choose_deployed(paths, infos)
    assert chosen["model"] == "finetune" and set(chosen["val_top1"]) == {"finetune", "linprobe"}  # scratch: a baseline
