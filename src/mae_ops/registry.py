"""A small model registry folder with champion/challenger promotion.

registry/
  versions/v0001/     model.onnx (+ int8, encoder), metrics.json, params.yaml, dvc.lock, info.json
  production.json     the pointer to the production version, replaced atomically (temp file + rename)
  history.jsonl       every registration, promotion, refusal and rollback, appended
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from mae_ops.atomic import atomic_dir, write_json
from mae_ops.reporting import git_revision
from mae_ops.serving import open_session, run_logits

ARTIFACTS = ("models/export/model.onnx", "models/export/model.int8.onnx", "models/export/encoder.onnx",
             "reports/metrics.json", "reports/export/parity.json", "params.yaml", "dvc.lock")  # fmt: skip


class RegistryError(RuntimeError):
    pass


def _versions_dir(registry: Path) -> Path:
    return registry / "versions"


def list_versions(registry: Path) -> list[dict[str, Any]]:
    root = _versions_dir(registry)
    if not root.exists():
        return []
    return [json.loads((d / "info.json").read_text()) for d in sorted(root.iterdir()) if (d / "info.json").exists()]


def get_version(registry: Path, version: str) -> dict[str, Any]:
    info = _versions_dir(registry) / version / "info.json"
    if not info.exists():
        have = [v["version"] for v in list_versions(registry)]
        raise RegistryError(f"no version {version!r} in {registry}; have {have}")
    return json.loads(info.read_text())


def production(registry: Path) -> dict[str, Any] | None:
    pointer = registry / "production.json"
    return json.loads(pointer.read_text()) if pointer.exists() else None


def _log(registry: Path, event: dict[str, Any]) -> None:
    registry.mkdir(parents=True, exist_ok=True)
    with open(registry / "history.jsonl", "a") as fh:
        fh.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **event}) + "\n")


def history(registry: Path) -> list[dict[str, Any]]:
    path = registry / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def register(repo: Path, registry: Path) -> dict[str, Any]:
    """Copy the current run's exported models, metrics and params into a new version."""
    if not (repo / "models/export/model.onnx").exists():
        raise RegistryError(f"{repo}/models/export/model.onnx not found: run the pipeline first")
    existing = [v["version"] for v in list_versions(registry)]
    version = f"v{len(existing) + 1:04d}"
    while version in existing:  # never reuse a name
        version = f"v{int(version[1:]) + 1:04d}"
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    info = {
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "test_top1": metrics["finetune"]["top1"],
        "data_source_hash": manifest["source_hash"],
        "data_content_hash": manifest["content_hash"],
        "git_revision": git_revision(repo) or "unknown",
        "files": [],
    }
    with atomic_dir(_versions_dir(registry) / version) as tmp:
        for rel in ARTIFACTS:
            src = repo / rel
            if src.exists():
                shutil.copy2(src, tmp / src.name)
                info["files"].append(src.name)
        write_json(tmp / "info.json", info)
    _log(registry, {"event": "registered", "version": version, "test_top1": info["test_top1"]})
    return info


def accuracy_on_test_split(model: Path, data_dir: Path) -> float:
    """Top-1 of an ONNX model on the current prepared test split."""
    images = np.load(data_dir / "images.npy", mmap_mode="r")
    split, labels = np.load(data_dir / "split.npy"), np.load(data_dir / "labels.npy")
    ids = np.flatnonzero(split == 2)
    pixels = np.asarray(images[ids], dtype=np.float32) / 255.0
    logits = run_logits(open_session(model, "cpu"), pixels)
    return float((logits.argmax(1) == labels[ids]).mean())


def promote(registry: Path, version: str, reason: str, previous: str | None = "current") -> dict[str, Any]:
    """Point production at ``version``; ``previous`` is what a rollback returns to
    (by default the version in production until now)."""
    info = get_version(registry, version)
    if previous == "current":
        current = production(registry)
        previous = current["version"] if current else None
    pointer = {"version": version, "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "reason": reason,
               "previous": previous, "info": info}  # fmt: skip
    write_json(registry / "production.json", pointer)  # atomic: temp file + rename
    _log(registry, {"event": "promoted", "version": version, "previous": pointer["previous"], "reason": reason})
    return pointer


def challenge(registry: Path, challenger: str, data_dir: Path, tolerance: float = 0.0) -> dict[str, Any]:
    """Promote ``challenger`` if its test top-1 is at least the champion's minus
    ``tolerance``, both measured now on the same current test split."""
    champion = production(registry)
    chal_acc = accuracy_on_test_split(_versions_dir(registry) / challenger / "model.onnx", data_dir)
    if champion is None:
        promote(registry, challenger, f"first production model (test top-1 {chal_acc:.4f})")
        return {"promoted": True, "challenger": challenger, "challenger_top1": chal_acc, "champion": None}
    champ_acc = accuracy_on_test_split(_versions_dir(registry) / champion["version"] / "model.onnx", data_dir)
    decision = {"challenger": challenger, "challenger_top1": chal_acc, "champion": champion["version"],
                "champion_top1": champ_acc, "tolerance": tolerance,
                "promoted": chal_acc >= champ_acc - tolerance}  # fmt: skip
    if decision["promoted"]:
        promote(registry, challenger, f"test top-1 {chal_acc:.4f} vs champion {champ_acc:.4f}")
    else:
        _log(registry, {"event": "kept champion", **decision})
    return decision


def rollback(registry: Path) -> dict[str, Any]:
    """Back to the production version before the current one."""
    current = production(registry)
    if current is None or not current.get("previous"):
        raise RegistryError("nothing to roll back to: no earlier production version")
    target = current["previous"]
    # the target's own predecessor, so that repeated rollbacks walk back in time
    earlier = [e for e in history(registry) if e["event"] == "promoted" and e["version"] == target]
    before_target = earlier[-1]["previous"] if earlier else None
    return promote(registry, target, f"rollback from {current['version']}", previous=before_target)
