"""A small model registry folder with champion/challenger promotion.

registry/
  versions/v0001/     model.onnx (+ int8, encoder), metrics.json, params.yaml, dvc.lock, info.json
  production.json     the pointer to the production version, replaced atomically (temp file + rename)
  history.jsonl       every registration, promotion, refusal and rollback, appended
  .lock               held while a version is numbered and written or the pointer moves,
                      so two retraining runs never take the same version number
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mae_ops.atomic import file_lock, write_json
from mae_ops.config import project_outputs
from mae_ops.errors import UserError
from mae_ops.reporting import git_revision
from mae_ops.serving import open_session, top1_accuracy
from mae_ops.store import open_eval_images

log = logging.getLogger(__name__)


def artifacts(repo: Path) -> list[Path]:
    """What a version keeps of the run in ``repo``: the exported models, the metrics, the
    choice of model, the parity report, the params and the lock that made them."""
    outs = project_outputs(repo)
    return [outs.model_onnx, outs.int8_onnx, outs.encoder_onnx, outs.metrics, outs.deployed, outs.parity,
            repo / "params.yaml", repo / "dvc.lock"]  # fmt: skip


class RegistryError(UserError, RuntimeError):
    """The registry cannot do what was asked; the message names the file or version."""


def _versions_dir(registry: Path) -> Path:
    return registry / "versions"


def _lock(registry: Path):
    return file_lock(registry / ".lock", f"the model registry {registry}", wait_s=600.0)


def _read(path: Path, repair: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path} is corrupt ({exc}): {repair}") from None


def list_versions(registry: Path) -> list[dict[str, Any]]:
    root = _versions_dir(registry)
    if not root.exists():
        return []
    return [
        _read(d / "info.json", "restore it or remove that version folder")
        for d in sorted(root.iterdir())
        if not d.name.startswith(".") and (d / "info.json").exists()
    ]  # fmt: skip; .vNNNN.new-*: being written


def get_version(registry: Path, version: str) -> dict[str, Any]:
    info = _versions_dir(registry) / version / "info.json"
    if not info.exists():
        have = [v["version"] for v in list_versions(registry)]
        raise RegistryError(f"no version {version!r} in {registry}; have {have}")
    return _read(info, "restore it or remove that version folder")


def production(registry: Path) -> dict[str, Any] | None:
    pointer = registry / "production.json"
    if not pointer.exists():
        return None
    record = _read(pointer, "repair it with `mae-ops registry promote VERSION` (see `mae-ops registry list`)")
    if not isinstance(record, dict) or "version" not in record:
        raise RegistryError(f"{pointer} is corrupt (no version): repair it with `mae-ops registry promote VERSION`")
    return record


def _log(registry: Path, event: dict[str, Any]) -> None:
    registry.mkdir(parents=True, exist_ok=True)
    with open(registry / "history.jsonl", "a") as fh:
        fh.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **event}) + "\n")


def history(registry: Path) -> list[dict[str, Any]]:
    path = registry / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def register(repo: Path, registry: Path) -> dict[str, Any]:
    """Copy the current run's exported models, metrics and params into a new version
    (numbered under the registry's lock: concurrent runs get distinct versions)."""
    model = project_outputs(repo).model_onnx
    if not model.exists():
        raise RegistryError(f"{model} not found: run the pipeline first")
    with _lock(registry):
        return _register(repo, registry)


def published_variant(parity: dict[str, Any], timings: dict[str, dict] | None = None) -> dict[str, Any]:
    """The model file export published for serving, read from its parity report: the file
    and runtime it chose against the peer (with the margins), or, in reports of older
    exports, the int8 model it chose, else the fp32 one; with its test top-1 and, when known, its
    latency (``timings``: benchmark.json's results for this very model; the int8 gate's
    own timing otherwise)."""
    if "published" in parity:  # the export stage chose a file and a runtime against the peer
        pub = parity["published"]
        out = {k: pub[k] for k in ("variant", "file", "runtime", "test_top1", "peer", "vs_peer") if k in pub}
        timing = (timings or {}).get(out["variant"]) or pub
        return out | {k: timing[k] for k in ("batch1_p50_ms", "batch32_images_per_s") if k in timing}
    int8 = parity.get("int8") or {}
    chosen = int8.get("chosen")
    if chosen and "model.int8.onnx" in parity.get("files", []):
        out = {"variant": f"onnxruntime_int8_{chosen}", "file": "model.int8.onnx", "test_top1": parity.get("int8_top1")}
    else:
        out = {"variant": "onnxruntime_fp32", "file": "model.onnx", "test_top1": parity.get("onnx_top1")}
    timing = (timings or {}).get(out["variant"]) or int8.get("variants", {}).get(chosen or "", {})
    return out | {k: timing[k] for k in ("batch1_p50_ms", "batch32_images_per_s") if k in timing}


def _register(repo: Path, registry: Path) -> dict[str, Any]:
    taken = [int(d.name[1:]) for d in _versions_dir(registry).glob("v*") if d.name[1:].isdigit()]
    version = f"v{max(taken, default=0) + 1:04d}"  # never reuse a name, even of a removed version
    if (_versions_dir(registry) / version).exists():
        raise RegistryError(f"{_versions_dir(registry) / version} exists already; nothing was overwritten")
    outs = project_outputs(repo)
    manifest = json.loads(outs.manifest.read_text())
    metrics = json.loads(outs.metrics.read_text())
    chosen = outs.deployed  # the model evaluate chose on validation, and export shipped
    deployed = json.loads(chosen.read_text())["model"] if chosen.exists() else "finetune"
    parity = outs.parity
    info = {
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "deployed": deployed,
        "test_top1": metrics[deployed]["top1"],
        "published": published_variant(json.loads(parity.read_text()) if parity.exists() else {}),
        "data_dvc_hash": prepared_data_hash(repo, outs.prepared),  # DVC's hash of the prepared data, from dvc.lock
        "data_content_hash": manifest["content_hash"],
        "split_definition": manifest.get("split_definition"),  # which image lands in which split
        "git_revision": git_revision(repo) or "unknown",
        "files": [],
    }
    _versions_dir(registry).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.new-", dir=_versions_dir(registry)))
    try:
        for src in artifacts(repo):
            for path in (src, src.with_name(src.name + ".data")):  # a large model's tensors beside it
                if path.exists():
                    shutil.copy2(path, tmp / path.name)
                    info["files"].append(path.name)
        write_json(tmp / "info.json", info)
        os.rename(tmp, _versions_dir(registry) / version)  # a new name: nothing is replaced
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(registry, {"event": "registered", "version": version, "test_top1": info["test_top1"]})
    return info


def prepared_data_hash(repo: Path, prepared: Path) -> str | None:
    """DVC's hash of the prepared data (``prepared``) as dvc.lock records it (None outside a DVC project)."""
    lock = repo / "dvc.lock"
    if not lock.exists():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for entry in stages.get("prepare", {}).get("outs", []):
        if repo / entry.get("path", "") == prepared:
            return entry.get("md5") or entry.get("hash")
    return None


def prepared_content_hash(data_dir: Path) -> str | None:
    """The identity of the prepared data's content (None before any prepare)."""
    try:
        return json.loads((data_dir / "manifest.json").read_text()).get("content_hash")
    except (OSError, ValueError):
        return None


def accuracy_on_test_split(model: Path, data_dir: Path) -> float:
    """Top-1 of an ONNX model on the current prepared test split."""
    images = open_eval_images(data_dir, json.loads((data_dir / "manifest.json").read_text()))
    split, labels = np.load(data_dir / "split.npy"), np.load(data_dir / "labels.npy")
    ids = np.flatnonzero(split == 2)
    return top1_accuracy(open_session(model, "cpu"), images, labels, ids)


def promote(registry: Path, version: str, reason: str, previous: str | None = "current") -> dict[str, Any]:
    """Point production at ``version``; ``previous`` is what a rollback returns to
    (by default the version in production until now). Repairs a corrupt pointer."""
    with _lock(registry):
        return _promote(registry, version, reason, previous)


def _promote(registry: Path, version: str, reason: str, previous: str | None) -> dict[str, Any]:
    info = get_version(registry, version)
    if previous == "current":
        try:
            current = production(registry)
        except RegistryError as exc:  # promoting is how a corrupt pointer gets repaired
            log.warning("replacing a corrupt production pointer: %s", exc)
            current = None
        previous = current["version"] if current else None
    pointer = {"version": version, "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "reason": reason,
               "previous": previous, "info": info}  # fmt: skip
    write_json(registry / "production.json", pointer)  # atomic: temp file + rename
    _log(registry, {"event": "promoted", "version": version, "previous": pointer["previous"], "reason": reason})
    return pointer


def challenge(registry: Path, challenger: str, data_dir: Path, tolerance: float = 0.0) -> dict[str, Any]:
    """Promote ``challenger`` if its test top-1 is at least the champion's minus
    ``tolerance``, both measured now on the same current test split."""
    with _lock(registry):  # the champion cannot change between measuring it and deciding
        return _challenge(registry, challenger, data_dir, tolerance)


def _same_splits(champion: dict[str, Any], challenger: dict[str, Any], data_dir: Path) -> None:
    """Refuse to compare two models unless both were prepared under the split definition
    of the current data: otherwise the test split may hold images one of them trained on."""
    current = json.loads((data_dir / "manifest.json").read_text()).get("split_definition")
    for who, info in (("champion", champion), ("challenger", challenger)):
        theirs = info.get("split_definition")
        if theirs != current:
            diff = ", ".join(f"{k} {theirs.get(k)!r} vs {v!r}" for k, v in (current or {}).items()
                             if (theirs or {}).get(k) != v) if theirs else "none recorded"  # fmt: skip
            raise RegistryError(
                f"cannot compare challenger {challenger['version']} with champion {champion['version']}: the "
                f"{who} {info['version']} was prepared under other split definitions than {data_dir} ({diff}), so "
                "the test split may hold images it trained on; decide by hand with `mae-ops registry promote VERSION`"
            )


def _challenge(registry: Path, challenger: str, data_dir: Path, tolerance: float) -> dict[str, Any]:
    champion = production(registry)
    if champion is not None:
        _same_splits(get_version(registry, champion["version"]), get_version(registry, challenger), data_dir)
    chal_acc = accuracy_on_test_split(_versions_dir(registry) / challenger / "model.onnx", data_dir)
    if champion is None:
        _promote(registry, challenger, f"first production model (test top-1 {chal_acc:.4f})", None)
        return {"promoted": True, "challenger": challenger, "challenger_top1": chal_acc, "champion": None}
    champ_acc = accuracy_on_test_split(_versions_dir(registry) / champion["version"] / "model.onnx", data_dir)
    decision = {"challenger": challenger, "challenger_top1": chal_acc, "champion": champion["version"],
                "champion_top1": champ_acc, "tolerance": tolerance,
                "promoted": chal_acc >= champ_acc - tolerance}  # fmt: skip
    if decision["promoted"]:
        _promote(registry, challenger, f"test top-1 {chal_acc:.4f} vs champion {champ_acc:.4f}", "current")
    else:
        _log(registry, {"event": "kept champion", **decision})
    return decision


def rollback(registry: Path) -> dict[str, Any]:
    """Back to the production version before the current one."""
    with _lock(registry):
        return _rollback(registry)


def _rollback(registry: Path) -> dict[str, Any]:
    current = production(registry)
    if current is None or not current.get("previous"):
        raise RegistryError("nothing to roll back to: no earlier production version")
    target = current["previous"]
    # the target's own predecessor, so that repeated rollbacks walk back in time
    earlier = [e for e in history(registry) if e["event"] == "promoted" and e["version"] == target]
    before_target = earlier[-1]["previous"] if earlier else None
    return _promote(registry, target, f"rollback from {current['version']}", before_target)
