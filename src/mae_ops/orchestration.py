"""What the Prefect flows in flows/ need and that is not Prefect: running one DVC
stage with its output streamed, a lock against overlapping runs, writing
overrides into params.yaml, and the run summary."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import yaml

from mae_ops.atomic import write_text
from mae_ops.config import apply_overrides, validate

STAGES = ("prepare", "pretrain", "finetune", "baselines", "evaluate", "export")
LOCK_FILE = ".dvc/tmp/mae-ops-pipeline.lock"

# quiet, reliable Prefect on a fresh machine: its temporary local API, no telemetry
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    "PREFECT_UI_ENABLED": "false",
}


def configure_prefect() -> None:
    """Set Prefect defaults unless the user set them (call before importing prefect)."""
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def load_module_file(path: Path, name: str) -> ModuleType:
    """A module from its file: flows/ (and benchmarks/) are folders of scripts, not packages."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message names the stage and ends with its output."""


@dataclass
class StageResult:
    stage: str
    ran: bool  # False when DVC found it up to date
    seconds: float


def tool_env() -> dict[str, str]:
    """Environment in which `dvc` finds this environment's `mae-ops`, without progress bars."""
    bin_dir = str(Path(sys.executable).parent)
    # the stages log one line per epoch; progress bars only garble a captured log
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "TQDM_DISABLE": "1"}


def dvc_executable() -> str:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def run_dvc_stage(stage: str, repo: Path, log: Callable[[str], None], force: bool = False) -> StageResult:
    """`dvc repro --single-item STAGE`: DVC decides whether it is up to date."""
    cmd = [dvc_executable(), "repro", "--single-item", stage, *(["--force"] if force else [])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)  # fmt: skip
    tail: list[str] = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip()
        if line:
            log(line)
            tail = [*tail[-39:], line]
    code = proc.wait()
    if code != 0:
        raise StageFailed(f"stage '{stage}' failed (dvc exit code {code}):\n" + "\n".join(tail[-15:]))
    ran = not any("didn't change, skipping" in line for line in tail)
    return StageResult(stage, ran, time.perf_counter() - t0)


@contextmanager
def pipeline_lock(repo: Path, wait_s: float = 0.0) -> Iterator[None]:
    """One pipeline run per repository at a time: a second waits up to ``wait_s``,
    then fails with a clear message instead of racing on the same outputs."""
    path = repo / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.seek(0)
                    holder = fh.read().strip() or "another process"
                    raise RuntimeError(
                        f"another pipeline run holds {path} ({holder}); wait for it to finish "
                        "or pass a longer lock wait"
                    ) from None
                time.sleep(1.0)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_overrides(repo: Path, overrides: list[str]) -> None:
    """Validate ``section.key=value`` overrides and write them into params.yaml,
    so DVC sees them and dvc.lock records the exact params of the run."""
    if not overrides:
        return
    path = repo / "params.yaml"
    raw = yaml.safe_load(path.read_text()) or {} if path.exists() else {}
    updated = apply_overrides(raw, overrides)
    validate(updated)  # raises ParamsError naming the bad key
    write_text(path, yaml.safe_dump(updated, sort_keys=False))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_summary(repo: Path, results: list[StageResult]) -> str:
    """Markdown summary of a run from the reports the stages wrote."""
    manifest = _read_json(repo / "data/prepared/manifest.json")
    pre = _read_json(repo / "reports/pretrain/metrics.json")
    hpo = _read_json(repo / "reports/hpo/best_params.json")
    metrics = _read_json(repo / "reports/metrics.json")
    parity = _read_json(repo / "reports/export/parity.json")
    bench = _read_json(repo / "reports/export/benchmark.json").get("results", {})
    lines = ["# mae-ops pipeline run", "", "| stage | ran | seconds |", "| --- | --- | --- |"]
    lines += [f"| {r.stage} | {'yes' if r.ran else 'skipped (up to date)'} | {r.seconds:.1f} |" for r in results]
    if manifest:
        c = manifest["counts"]
        lines += ["", f"**Data**: {manifest['num_images']} images ({c['train']} train, {c['val']} val, "
                  f"{c['test']} test, {c['unlabeled']} unlabeled; {c['labelled']} labels used), "
                  f"{manifest['num_skipped']} skipped."]  # fmt: skip
    if pre:
        lines += [f"**Pre-training**: loss {pre['first_loss']:.4f} -> {pre['final_loss']:.4f} over {pre['epochs']} "
                  f"epochs, {pre['images_per_s']:.0f} img/s."]  # fmt: skip
    if hpo:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hpo["params"].items())
        lines += [f"**Search**: best trial {hpo['trial']} (val top-1 {hpo['value']:.2%}): {params}; trials "
                  + ", ".join(f"{n} {k}" for k, n in hpo["counts"].items() if n)]  # fmt: skip
    if metrics:
        lines += ["", "| model | test top-1 |", "| --- | --- |"]
        lines += [f"| {name} | {m['top1']:.2%} |" for name, m in metrics.items()]
    if parity:
        lines += ["", f"**Export**: parity max |diff| {parity['max_abs_diff']:.1e}, top-1 agreement "
                  f"{parity['top1_agreement']:.2%}" + (f", int8 top-1 {parity['int8_top1']:.2%}"
                                                       if "int8_top1" in parity else "") + "."]  # fmt: skip
    if bench:
        lines += [
            "**Latency (batch 1, p50)**: " + ", ".join(f"{k} {v['batch1_p50_ms']:.2f} ms" for k, v in bench.items())
        ]
    pictures = ["reports/pretrain/reconstruction.png", "reports/pretrain/loss.png",
                "reports/finetune/learning_curve.png", "reports/hpo/optimization_history.png",
                "reports/eval/confusion_matrix.png"]  # fmt: skip
    existing = [p for p in pictures if (repo / p).exists()]
    if existing:
        links = (f"[{Path(p).stem}]({(repo / p).resolve().as_uri()})" for p in existing)
        lines += ["", "Pictures: " + ", ".join(links)]
    return "\n".join(lines) + "\n"
