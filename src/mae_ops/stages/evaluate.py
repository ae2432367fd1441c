"""Stage `evaluate`: the held-out test split, read for the first time.

Outputs:
  reports/metrics.json          {"finetune": {"top1", ...}, "scratch": ..., "linprobe": ..., "logreg_pixels": ...,
                                 "knn_pixels": ..., "knn_mae": ...} (DVC metrics)
  reports/eval/summary.md       the models side by side: what MAE pre-training bought over the strongest baseline
  reports/eval/per_class.csv    precision / recall / F1 / support of the fine-tuned model
  reports/eval/predictions.csv  every test image: label and each model's prediction
  reports/eval/confusion_matrix.png
  reports/eval/deployed.json    the model to ship, chosen on the validation split (export and the registry read it)
  reports/data/near_duplicates.csv  pairs of images in different splits the pre-trained encoder sees as one picture
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import ConfusionMatrixDisplay, precision_recall_fscore_support, top_k_accuracy_score

from mae_ops import classical
from mae_ops.atomic import write_json, write_text
from mae_ops.config import Config, InputError
from mae_ops.data import PreparedData
from mae_ops.finetuning import features, frozen_encoder_spec, predict_proba
from mae_ops.models.classifier import feature_extractor, load_classifier
from mae_ops.plots import save_figure
from mae_ops.reporting import file_sha256
from mae_ops.runtime import resolve_device
from mae_ops.similarity import near_duplicates, unit_rows
from mae_ops.store import SPLITS

log = logging.getLogger(__name__)


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Top-1 (top-5 with more than 5 classes) and macro scores, accuracies as fractions."""
    n_classes = probs.shape[1]
    pred = probs.argmax(1)
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, pred, labels=np.arange(n_classes), average="macro", zero_division=0
    )
    out = {"top1": round(float((pred == labels).mean()), 5)}
    if n_classes > 5:
        out["top5"] = round(float(top_k_accuracy_score(labels, probs, k=5, labels=np.arange(n_classes))), 5)
    out.update(macro_precision=round(float(precision), 5), macro_recall=round(float(recall), 5),
               macro_f1=round(float(f1), 5), num_test=len(labels))  # fmt: skip
    return out


def per_class_table(labels: np.ndarray, pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, pred, labels=np.arange(len(classes)), zero_division=0
    )
    return pd.DataFrame({"class": classes, "precision": precision.round(5), "recall": recall.round(5),
                         "f1": f1.round(5), "support": support})  # fmt: skip


def model_paths(cfg: Config) -> dict[str, Path]:
    paths = {"finetune": cfg.outputs().finetune_model}
    if cfg.evaluate.baseline == "scratch":
        paths["scratch"] = Path(cfg.evaluate.baselines_dir) / "scratch.pth"
    if cfg.evaluate.linprobe:
        paths["linprobe"] = Path(cfg.evaluate.baselines_dir) / "linprobe.pth"
    for name, path in paths.items():
        if not path.exists():
            stage = "finetune" if name == "finetune" else "baselines"
            raise InputError(f"{path} not found: run `mae-ops {stage}` first")
    return paths


def _summary(results: dict[str, dict], infos: dict[str, dict], manifest: dict, near: dict | None,
             deployed: dict) -> str:  # fmt: skip
    names = {"finetune": "MAE pre-trained, fine-tuned", "scratch": "same ViT from scratch, same budget",
             "linprobe": "MAE encoder frozen, linear probe", **classical.NAMES}  # fmt: skip
    has_top5 = any("top5" in r for r in results.values())
    head = "| model | test top-1 |" + (" test top-5 |" if has_top5 else "") + " macro F1 | val top-1 | epochs |"
    lines = [
        "# Evaluation on the held-out test split",
        "",
        f"{results['finetune']['num_test']} test images, {manifest['counts']['labelled']} training labels "
        f"({len(manifest['classes'])} classes), data {manifest['content_hash'][:12]}.",
        "",
        head,
        "|" + " --- |" * (head.count("|") - 1),
    ]
    for name, r in results.items():
        info = infos[name]
        top5 = f" {r['top5']:.2%} |" if has_top5 else ""
        if "mode" in info:
            epochs = info["finetune"]["linprobe_epochs"] if info["mode"] == "linprobe" else info["finetune"]["epochs"]
        else:  # a classical baseline: what was tuned instead of epochs
            epochs = ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("val_top1", "metric"))
        lines.append(f"| {names.get(name, name)} | {r['top1']:.2%} |{top5} {r['macro_f1']:.3f} | "
                     f"{info.get('val_top1', float('nan')):.2%} | {epochs} |")  # fmt: skip
    baselines = {k: v["top1"] for k, v in results.items() if k != "finetune"}
    if baselines:
        strongest = max(baselines, key=lambda k: baselines[k])
        gain = results["finetune"]["top1"] - baselines[strongest]
        lines += ["", f"MAE fine-tuning beats the **strongest** baseline ({names.get(strongest, strongest)}, "
                  f"{baselines[strongest]:.2%}) by **{gain * 100:+.1f} points** of test top-1."]  # fmt: skip
    if "scratch" in results:
        gain = results["finetune"]["top1"] - results["scratch"]["top1"]
        search = infos["scratch"].get("search") or {}
        how = (f"tuned by its own search of {search['trials']} trials" if search.get("tuned")
               else "with the MAE model's params (no search)")  # fmt: skip
        lines += ["", f"Over the same ViT trained from scratch ({how}): {gain * 100:+.1f} points."]
    lines += [
        "",
        f"**Deployed** (exported and registered): {names.get(deployed['model'], deployed['model'])}, "
        f"chosen on the validation split ({deployed['why']}); its test top-1 {deployed['test_top1']:.2%}.",
    ]
    if near is not None:
        found = ", ".join(f"{n} {pair.replace('-', '–')}" for pair, n in near["pairs"].items()) or "none"
        lines += ["", "## Data check", "",
                  f"Near-duplicate pairs across splits among {near['images']} images (cosine ≥ {near['threshold']:g} "
                  f"on the pre-trained encoder's features): {found}. Each is listed in "
                  "`reports/data/near_duplicates.csv`; exact copies are one sample already."]  # fmt: skip
    return "\n".join(lines) + "\n"


NEAR_DUPLICATE_COLUMNS = ["split_a", "file_a", "split_b", "file_b", "cosine"]


def near_duplicate_report(
    cfg: Config, data: PreparedData, files: np.ndarray, device: torch.device
) -> tuple[pd.DataFrame, dict]:  # fmt: skip
    """Pairs of images in different splits that the pre-trained encoder sees as (nearly)
    the same picture, cosine >= evaluate.near_duplicates: a test image with a twin in
    training flatters the test score. Returns the pairs, most similar first (for
    reports/data/near_duplicates.csv), and their counts per pair of splits."""
    threshold = cfg.evaluate.near_duplicates
    encoder = feature_extractor(cfg.model.preset, data.img_size, data.channels,
                                cfg.outputs().encoder).to(device)  # fmt: skip
    names = {code: name for name, code in SPLITS.items()}
    ids = np.arange(len(data.split))  # every sample, whatever its split
    with torch.inference_mode():
        emb = unit_rows(features(encoder, data, ids, device).float().cpu().numpy())
    rows = []
    for i, j, sim in near_duplicates(emb, threshold):
        a, b = ids[i], ids[j]
        if data.split[a] != data.split[b]:
            pair = sorted([(names[int(data.split[a])], files[a]), (names[int(data.split[b])], files[b])])
            rows.append({"split_a": pair[0][0], "file_a": pair[0][1], "split_b": pair[1][0], "file_b": pair[1][1],
                         "cosine": round(sim, 5)})  # fmt: skip
    table = pd.DataFrame(rows, columns=NEAR_DUPLICATE_COLUMNS)
    table = table.sort_values("cosine", ascending=False, kind="stable")
    counts = {f"{a}-{b}": int(n) for (a, b), n in table.groupby(["split_a", "split_b"]).size().items()}
    log.info("near-duplicates across splits (cosine >= %g): %s", threshold, counts or "none")
    return table, {"threshold": threshold, "images": len(ids), "pairs": counts}


DEPLOYABLE = ("finetune", "linprobe")  # the ViT classifiers the pipeline trains; both export to ONNX


def choose_deployed(paths: dict[str, Path], infos: dict[str, dict]) -> dict:
    """The model to ship: the deployable candidate with the best *validation* top-1 (the
    fine-tuned one on a tie); the test split plays no part in the choice."""
    val = {name: float(infos[name]["val_top1"]) for name in DEPLOYABLE if name in paths}
    chosen = max(val, key=lambda n: (val[n], n == "finetune"))
    others = ", ".join(f"{n} {v:.2%}" for n, v in val.items() if n != chosen)
    why = f"best validation top-1: {chosen} {val[chosen]:.2%}" + (f" (vs {others})" if others else "")
    return {"model": chosen, "checkpoint": str(paths[chosen]), "checkpoint_sha256": file_sha256(paths[chosen]),
            "val_top1": val, "why": why}  # fmt: skip


def run(cfg: Config) -> dict:
    ev = cfg.evaluate
    device = resolve_device(ev.device)
    data = PreparedData(cfg.data.out_dir)
    test_ids = data.indices("test")
    if len(test_ids) == 0:
        raise InputError("the test split is empty: set data.test_fraction > 0 or add a test/ folder")
    labels = data.labels[test_ids]
    outs = cfg.outputs()
    report_path = outs.baselines_metrics  # how each baseline was tuned
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    results, infos, preds = {}, {}, {}
    paths = model_paths(cfg)
    for name, path in paths.items():
        model, args = load_classifier(path)
        if args.get("data_hash") != data.manifest["content_hash"]:
            raise InputError(f"{path} was trained on other data than {cfg.data.out_dir}: re-run the pipeline")
        probs = predict_proba(model.to(device), data, test_ids, device, ev.batch_size)
        results[name], infos[name], preds[name] = classification_metrics(labels, probs), args, probs
        log.info("%s: test top-1 %.4f", name, results[name]["top1"])
    if cfg.evaluate.classical:
        path = Path(cfg.evaluate.baselines_dir) / "classical.npz"
        if not path.exists():
            raise InputError(f"{path} not found: run `mae-ops baselines` first")
        stored = classical.load(path)
        if str(stored["data_hash"]) != data.manifest["content_hash"]:
            raise InputError(f"{path} was fitted on other data than {cfg.data.out_dir}: re-run the pipeline")
        enc = frozen_encoder_spec(cfg)
        for name, probs in classical.predict_all(cfg, enc, stored, data, test_ids, device).items():
            results[name], infos[name], preds[name] = classification_metrics(labels, probs), report[name], probs
            log.info("%s: test top-1 %.4f", name, results[name]["top1"])
    if "scratch" in infos:  # how the scratch baseline was tuned
        infos["scratch"] = {**infos["scratch"], "search": report.get("scratch", {}).get("search")}
    out = Path(ev.reports_dir)
    write_json(ev.metrics_file, results)
    main_pred = preds["finetune"].argmax(1)
    write_text(out / "per_class.csv", per_class_table(labels, main_pred, data.classes).to_csv(index=False))
    files = pd.read_csv(data.root / "index.csv", usecols=["file"], keep_default_na=False)["file"].to_numpy()
    table = pd.DataFrame({"index": test_ids, "file": files[test_ids],
                          "label": [data.classes[i] for i in labels]})  # fmt: skip
    for name, probs in preds.items():
        table[f"{name}_pred"] = [data.classes[i] for i in probs.argmax(1)]
        table[f"{name}_prob"] = probs.max(1).round(5)
    write_text(out / "predictions.csv", table.to_csv(index=False))
    display = ConfusionMatrixDisplay.from_predictions(
        labels, main_pred, labels=np.arange(len(data.classes)), display_labels=data.classes,
        colorbar=False, xticks_rotation="vertical" if len(data.classes) > 10 else "horizontal",
    )  # fmt: skip
    display.ax_.set_title(f"fine-tuned model, test top-1 {results['finetune']['top1']:.2%}")
    save_figure(display.figure_, outs.confusion_png)
    near, pairs = None, pd.DataFrame(columns=NEAR_DUPLICATE_COLUMNS)  # off: the header alone (DVC's output)
    if ev.near_duplicates is not None:
        pairs, near = near_duplicate_report(cfg, data, files, device)
    write_text(Path(ev.data_reports_dir) / "near_duplicates.csv", pairs.to_csv(index=False))
    deployed = choose_deployed(paths, infos)
    deployed["test_top1"] = results[deployed["model"]]["top1"]  # reported, not chosen on
    write_json(outs.deployed, deployed)
    log.info("deployed model: %s (%s)", deployed["model"], deployed["why"])
    write_text(out / "summary.md", _summary(results, infos, data.manifest, near, deployed))
    return results
