"""What the Prefect flows in flows/ need and that is not Prefect: running one DVC
stage with its output streamed, a lock against overlapping runs, writing
overrides into params.yaml, and the run summary."""

from __future__ import annotations

import importlib.util
import io
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
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from mae_ops.atomic import file_lock, free_bytes, write_json, write_text
from mae_ops.config import Config, apply_overrides, project_outputs, redact, validate
from mae_ops.errors import ERROR_FILE_ENV, UserError
from mae_ops.preparing import FORCE_ENV, last_run_path
from mae_ops.registry import published_variant
from mae_ops.reporting import file_sha256
from mae_ops.sources import check_sources, dep_path, dvc_stages, rooted_data, source_folders

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
    sys.modules[name] = module  # registered first, as an import would (dataclasses look their module up)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


class StageFailed(UserError, RuntimeError):
    """A DVC stage exited non-zero; the message names the stage and ends with its
    output, or is the stage's own one-line error (``user_error``: not worth a retry)."""

    def __init__(self, message: str, user_error: bool = False) -> None:
        super().__init__(message)
        self.user_error = user_error


@dataclass
class StageResult:
    stage: str
    ran: bool  # False when DVC found it up to date
    seconds: float


def dvc_paths(entries: list | None) -> set[str]:
    """The paths of a dvc.yaml list (deps, outs, metrics, plots), where an entry is a path
    or ``{path: options}``; without a trailing slash."""
    return {str(next(iter(e)) if isinstance(e, dict) else e).rstrip("/") for e in entries or []}


def stage_outputs(stage: dict[str, Any]) -> set[str]:
    """What a dvc.yaml stage produces: its outs, metrics and plots."""
    return dvc_paths(stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []))


def with_upstream(repo: Path, stages: list[str] | None) -> list[str]:
    """The named stages and every stage upstream of them, in pipeline order (all when none
    are named), as `dvc repro STAGE` brings them up to date: a stage is upstream when one
    of its outputs is a dependency of a named stage or of another upstream one. dvc.yaml
    is the one place that says which stage needs which. An unknown name is the user's error."""
    unknown = sorted(set(stages or []) - set(STAGES))
    if unknown:
        raise UserError(f"unknown stages {unknown}; stages are {list(STAGES)}")
    if not stages:
        return list(STAGES)
    defined = dvc_stages(repo)
    outs = {name: stage_outputs(st) for name, st in defined.items()}
    needed, todo = set(stages), list(stages)
    while todo:
        deps = dvc_paths(defined.get(todo.pop(), {}).get("deps", []))
        for name, produced in outs.items():
            if name not in needed and any(d == o or d.startswith(o + "/") for d in deps for o in produced):
                needed.add(name)
                todo.append(name)
    return [s for s in STAGES if s in needed]


def tool_env(error_file: Path | None = None, force: bool = False) -> dict[str, str]:
    """Environment in which `dvc` finds this environment's `mae-ops`, without progress
    bars; a stage command that stops on a user error writes its one line to ``error_file``;
    ``force``: `prepare` re-decodes everything (DVC runs the stage's fixed command)."""
    bin_dir = str(Path(sys.executable).parent)
    # the stages log one line per epoch; progress bars only garble a captured log
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "TQDM_DISABLE": "1"}
    if error_file is not None:
        env[ERROR_FILE_ENV] = str(error_file)
    if force:
        env[FORCE_ENV] = "1"
    return env


def dvc_executable() -> str:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def stages_status(repo: Path, stages: list[str]) -> dict[str, list]:
    """What DVC says is out of date in each of ``stages`` (its own deps, params and outs;
    a stage that is up to date is absent), asked at once through DVC's API."""
    from dvc.repo import Repo

    dvc_file = (repo / "dvc.yaml").resolve()  # DVC resolves a bare stage name against the cwd, not the repo
    with Repo(str(repo.resolve())) as dvc_repo:
        status = dvc_repo.status(targets=[f"{dvc_file}:{stage}" for stage in stages])
    return {name.rpartition(":")[2]: changes for name, changes in status.items() if changes}


def stage_status(repo: Path, stage: str) -> list:
    """What DVC says is out of date in one stage; an empty list when it is up to date."""
    return [change for changes in stages_status(repo, [stage]).values() for change in changes]


def stream(cmd: list[str], repo: Path, log: Callable[[str], None], env: dict[str, str]) -> tuple[int, list[str]]:
    """Run ``cmd`` in ``repo``, each line of its output (secrets redacted) into ``log`` as it
    comes; its exit code and its last 40 lines."""
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)  # fmt: skip
    tail: list[str] = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = redact(raw.rstrip())
        if line:
            log(line)
            tail = [*tail[-39:], line]
    return proc.wait(), tail


def run_dvc_stage(stage: str, repo: Path, log: Callable[[str], None], force: bool = False) -> StageResult:
    """`dvc repro --single-item STAGE`: DVC decides whether it is up to date (asked
    before), and afterwards must find the stage up to date (outputs in its cache),
    or the run failed even if DVC exited 0 (e.g. a full disk during the cache copy)."""
    cmd = [dvc_executable(), "repro", "--single-item", stage, *(["--force"] if force else [])]
    t0 = time.perf_counter()
    ran = force or bool(stage_status(repo, stage))
    error_file = repo / ".dvc" / "tmp" / f"mae-ops-{stage}-{os.getpid()}.error"
    error_file.parent.mkdir(parents=True, exist_ok=True)
    error_file.unlink(missing_ok=True)
    code, tail = stream(cmd, repo, log, tool_env(error_file, force))
    user_error = error_file.read_text().strip() if error_file.exists() else ""
    error_file.unlink(missing_ok=True)
    if code != 0:
        if user_error:  # the stage said what is wrong in one line: that is the message
            raise StageFailed(f"stage '{stage}': {user_error}", user_error=True)
        raise StageFailed(f"stage '{stage}' failed (dvc exit code {code}):\n" + "\n".join(tail[-15:]))
    left = stage_status(repo, stage)
    if left:
        raise StageFailed(
            f"stage '{stage}' ran but DVC could not record it ({redact(str(left))[:300]}); "
            f"{'the disk is full: ' if free_bytes(repo / '.dvc') < (1 << 20) else ''}"
            "free some space and run the pipeline again"
        )
    return StageResult(stage, ran, time.perf_counter() - t0)


@contextmanager
def pipeline_lock(repo: Path, wait_s: float = 0.0) -> Iterator[None]:
    """One pipeline run per repository at a time: a second waits up to ``wait_s``,
    then fails with a clear message instead of racing on the same outputs.
    Re-entrant in one process (the CLI takes it before the flow starts)."""
    with file_lock(repo / LOCK_FILE, "another pipeline run of this project", wait_s):
        yield


def plan_overrides(repo: Path, overrides: list[str]) -> tuple[Config, list[str]]:
    """The params a run would use (params.yaml + ``overrides``), validated, and the
    changes as ``key: old -> new`` lines; nothing is written."""
    path = repo / "params.yaml"
    raw = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    updated = apply_overrides(raw, overrides)
    cfg = validate(updated)  # raises ParamsError naming the bad key
    changes = []
    for item in overrides:
        key = item.partition("=")[0].strip()
        old, new = _lookup(raw, key), _lookup(updated, key)
        if old != new:
            changes.append(f"{key}: {old!r} -> {new!r}")
    return cfg, changes


def _lookup(tree: dict, key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def preflight(repo: Path, cfg: Config, stages: list[str], overrides: list[str], force: bool) -> None:
    """Check what can be checked before DVC removes or rewrites anything: the data
    sources, when `prepare` is going to run."""
    if "prepare" not in stages:
        return
    touches_data = any(item.strip().startswith("data.") for item in overrides)
    if force or touches_data or stage_status(repo, "prepare"):
        check_sources(rooted_data(repo, cfg.data))


SOURCE_DEP_MARK = "mae-ops: an image folder of data.source / data.unlabeled_dirs"
INIT_DEP_MARK = "mae-ops: the checkpoint of pretrain.init"


def _ours(deps: CommentedSeq, i: int, mark: str) -> bool:
    """Whether entry ``i`` of a deps list is one this tool added (its end-of-line comment)."""
    token = (deps.ca.items.get(i) or [None])[0]
    return token is not None and mark in token.value


def _replace_marked(deps: CommentedSeq, wanted: list[str], mark: str) -> list[str] | None:
    """Make the entries marked ``mark`` the ``wanted`` paths; the old ones if they changed."""
    ours = [i for i in range(len(deps)) if _ours(deps, i, mark)]
    old = [str(deps[i]) for i in ours]
    if old == wanted:
        return None
    for i in reversed(ours):
        del deps[i]
    for path in wanted:
        if path not in deps:  # the user listed it already: theirs
            deps.append(path)
            deps.yaml_add_eol_comment(mark, len(deps) - 1)
    return old


def sync_source_deps(repo: Path, cfg: Config, log: Callable[[str], None] | None = None) -> list[str]:
    """List the image folders of ``cfg.data`` (source and unlabeled_dirs) as deps of
    `prepare` in dvc.yaml, and the checkpoint of ``pretrain.init`` as a dep of
    `pretrain`, so that DVC hashes them and sees them change; returns the folders now
    listed. Only the entries this tool added (marked with ``SOURCE_DEP_MARK`` or
    ``INIT_DEP_MARK``) are replaced: every other entry and comment of the user's stays.
    DVC's templating cannot turn a param into deps, hence this step."""
    path = repo / "dvc.yaml"
    rt = YAML()
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)
    doc = rt.load(path.read_text())
    folders = [dep_path(repo, f) for f in source_folders(cfg.data)]
    init = [dep_path(repo, Path(cfg.pretrain.init))] if cfg.pretrain.init else []
    changed = False
    for stage, wanted, mark in (("prepare", folders, SOURCE_DEP_MARK), ("pretrain", init, INIT_DEP_MARK)):
        deps = doc["stages"].get(stage, {}).get("deps")
        old = None if deps is None else _replace_marked(deps, wanted, mark)
        if old is not None:
            changed = True
            if log is not None:
                log(f"dvc.yaml: the {stage} stage now depends on {wanted or 'no file of mae-ops'} "
                    f"(was {old or 'none'})")  # fmt: skip
    if changed:
        buf = io.StringIO()
        rt.dump(doc, buf)
        write_text(path, buf.getvalue())
    return folders


def write_overrides(repo: Path, overrides: list[str], log: Callable[[str], None] | None = None) -> list[str]:
    """Write validated ``section.key=value`` overrides into params.yaml, keeping its
    comments and layout (round-trip YAML), so DVC sees them and dvc.lock records the
    exact params of the run; returns (and logs) the keys that changed."""
    if not overrides:
        return []
    _, changes = plan_overrides(repo, overrides)
    path = repo / "params.yaml"
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = (rt.load(path.read_text()) if path.exists() else None) or CommentedMap()
    updated = apply_overrides(json.loads(json.dumps(doc)), overrides)
    for item in overrides:
        parts = item.partition("=")[0].strip().split(".")
        node = doc
        for part in parts[:-1]:
            if part not in node:
                node[part] = CommentedMap()
            node = node[part]
        value = _lookup(updated, ".".join(parts))
        if isinstance(value, list):
            value = CommentedSeq(value)
            value.fa.set_flow_style()
        node[parts[-1]] = value
    buf = io.StringIO()
    rt.dump(doc, buf)
    write_text(path, buf.getvalue())
    if log is not None and changes:
        log("params.yaml now has " + "; ".join(changes) + " (kept for later runs; dvc.lock records them)")
    return changes


RUN_RECORD = "reports/pipeline/run.json"


def write_run_record(repo: Path, results: list[StageResult], out_of_date: list[str] | None) -> dict:
    """What the last pipeline run did, stage by stage (the README's demo timing is read from
    the committed one): which stages ran, their seconds, on how many cores, and the stages it
    left out that DVC finds out of date (``stale_stages``; null: not known). The flow writes it
    under the pipeline lock; its summary and the command's last line read this one answer."""
    stages = [{"stage": r.stage, "ran": r.ran, "seconds": round(r.seconds, 1)} for r in results]
    record = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "cores": os.cpu_count(), "stages": stages,
              "out_of_date": out_of_date}  # fmt: skip
    write_json(repo / RUN_RECORD, record)
    return record


def run_record(repo: Path) -> dict:
    """The last pipeline run's record (``write_run_record``); empty before the first run."""
    return _read_json(repo / RUN_RECORD)


def run_line(record: dict) -> str:
    """`mae-ops pipeline`'s last line, from the run's record: what ran, what was up to date,
    and what the run left out of date."""
    ran = [s["stage"] for s in record["stages"] if s["ran"]]
    skipped = len(record["stages"]) - len(ran)
    line = f"pipeline done: {len(ran)} stage(s) ran ({', '.join(ran) or 'none'}), {skipped} up to date"
    stale = record["out_of_date"]
    if stale is None:
        return line + "; out of date: not known (another DVC process held the repository's lock)"
    return line + (f"; out of date: {', '.join(stale)} (`mae-ops pipeline` updates them)" if stale else "")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def stale_stages(repo: Path, results: list[StageResult]) -> list[str] | None:
    """The stages of dvc.yaml that this run left out and whose deps, params or code changed
    since they last ran (DVC's status, in pipeline order): their reports on disk describe an
    earlier run, e.g. the old data's scores after ``mae-ops pipeline prepare`` on new images.
    Nothing without a run or outside a DVC repository; None when another DVC process holds
    the repository's lock (ask under ``pipeline_lock``, and no mae-ops run is that process)."""
    from dvc.lock import LockError

    if not results or not (repo / ".dvc").is_dir():
        return []
    defined = dvc_stages(repo)
    left_out = [s for s in STAGES if s in defined and s not in {r.stage for r in results}]
    try:
        changed = stages_status(repo, left_out) if left_out else {}
    except LockError:  # e.g. a `dvc repro` in the user's shell: unknown, and the run itself succeeded
        return None
    return [s for s in left_out if s in changed]


def _prepared_this_run(prepared: Path, results: list[StageResult]) -> list[str]:
    """What this run's prepare decoded, reused and wrote from the embedded data set, and the files
    whose values it clipped (its last-run record, which manifest.json leaves out so that the
    store's bytes do not depend on what a run happened to decode); nothing when prepare did not run."""
    last = _read_json(last_run_path(prepared)) if any(r.stage == "prepare" and r.ran for r in results) else {}
    if not last:
        return []
    reused, clipped = last["reused"], last.get("clipped", {})
    embedded = reused.get("embedded", 0)  # the package's arrays, written anew each run
    lines = [f"This run's prepare decoded {reused['decoded']} files and reused {reused['images']} stored images"
             + (f"; {embedded} came from the embedded data set." if embedded > 0 else ".")]  # fmt: skip
    if clipped.get("files"):
        lo, hi = clipped["integer_range"]
        lines += [f"**Clipped**: {clipped['files']} of the files decoded hold values outside {lo}..{hi} "
                  f"(0..1 for float files) and were stored clipped, e.g. `{clipped['examples'][0]}`: "
                  "check `data.bit_depth` against the camera's bits."]  # fmt: skip
    return lines


def run_summary(repo: Path, results: list[StageResult], stale: list[str] | None) -> str:
    """Markdown summary of a run from the reports the stages wrote; ``stale`` is
    ``stale_stages`` of the run (its reports are marked as an earlier run's)."""
    outs = project_outputs(repo)
    older = {name for stage in stale or [] for name in outs.of_stage(stage)}

    def mark(*reports: str) -> str:  # a line read from a stale stage's report says so
        return "*(earlier run)* " if older.intersection(reports) else ""

    manifest = _read_json(outs.manifest)
    pre = _read_json(outs.pretrain_metrics)
    hpo = _read_json(outs.hpo_best)
    metrics = _read_json(outs.metrics)
    parity = _read_json(outs.parity)
    bench_report = _read_json(outs.benchmark)
    bench = bench_report.get("results", {})
    lines = ["# mae-ops pipeline run", "", "| stage | ran | seconds |", "| --- | --- | --- |"]
    lines += [f"| {r.stage} | {'yes' if r.ran else 'skipped (up to date)'} | {r.seconds:.1f} |" for r in results]
    if stale:
        lines += ["", f"**Out of date**: {', '.join(f'`{s}`' for s in stale)} did not run this time and DVC finds "
                  "them out of date (their inputs changed since they last ran, or they never ran): lines marked "
                  "*(earlier run)* describe older data, params or code. Run the pipeline without naming stages "
                  "to bring them up to date."]  # fmt: skip
    elif stale is None:
        lines += ["", "**Out of date**: not known, another DVC process held the repository's lock: the reports "
                  "below may be older than this run's data."]  # fmt: skip
    if manifest:
        c = manifest["counts"]
        lines += ["", f"**Data**: {manifest['num_images']} images ({c['train']} train, {c['val']} val, "
                  f"{c['test']} test, {c['unlabeled']} unlabeled; {c['labelled']} labels used), "
                  f"{manifest['num_skipped']} skipped."]  # fmt: skip
    lines += _prepared_this_run(outs.prepared, results)
    if pre:
        seen = (f"; the encoder on the validation split: k-NN {pre['knn_val_top1']:.2%}, linear probe "
                f"{pre['probe_val_top1']:.2%}" if "probe_val_top1" in pre else "")  # fmt: skip
        procs = pre.get("world_size", 1)
        lines += [f"{mark('pretrain_metrics')}**Pre-training**: loss {pre['first_loss']:.4f} -> "
                  f"{pre['final_loss']:.4f} over {pre['epochs']} epochs, "
                  f"{pre['images_per_s']:.0f} img/s ({procs} process{'es' * (procs > 1)}){seen}."]  # fmt: skip
    if hpo:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hpo["params"].items())
        lines += [f"{mark('hpo_best')}**Search**: best trial {hpo['trial']} (val top-1 {hpo['value']:.2%}): "
                  f"{params}; trials " + ", ".join(f"{n} {k}" for k, n in hpo["counts"].items() if n)]  # fmt: skip
    if metrics:
        lines += ["", f"| model | {mark('metrics')}test top-1 |", "| --- | --- |"]
        lines += [f"| {name} | {m['top1']:.2%} |" for name, m in metrics.items()]
    deployed = _read_json(outs.deployed)
    if deployed:
        lines += ["", f"{mark('deployed')}**Deployed**: {deployed['model']} ({deployed['why']}; "
                  f"test top-1 {deployed['test_top1']:.2%})."]  # fmt: skip
    if parity:
        lines += ["", f"{mark('parity')}**Export**: parity max |diff| {parity['max_abs_diff']:.1e}, top-1 agreement "
                  f"{parity['top1_agreement']:.2%}" + (f", int8 top-1 {parity['int8_top1']:.2%}"
                                                       if "int8_top1" in parity else "") + "."]  # fmt: skip
    model = repo / deployed["checkpoint"] if deployed.get("checkpoint") else outs.finetune_model  # export shipped it
    this_model = file_sha256(model) if model.exists() else None
    mine = bench if bench and this_model and bench_report.get("model_sha256") == this_model else None
    if parity:
        pub = published_variant(parity, mine)
        timing = (f", batch-1 p50 {pub['batch1_p50_ms']:.2f} ms, batch 32 {pub['batch32_images_per_s']:,.0f} img/s"
                  if "batch1_p50_ms" in pub else "")  # fmt: skip
        top1 = f"test top-1 {pub['test_top1']:.2%}" if pub.get("test_top1") is not None else "test top-1 ?"
        versus = (f"; against {pub['peer']}: ×{pub['vs_peer']['batch1']:.2f} at batch 1, "
                  f"×{pub['vs_peer']['batch32']:.2f} at batch 32" if "vs_peer" in pub else "")  # fmt: skip
        runtime = f" with {pub['runtime']}" if "runtime" in pub else ""
        lines += [f"{mark('parity', 'deployed')}**Published for serving**: `{pub['file']}`{runtime} "
                  f"({pub['variant']}): {top1}{timing}{versus}."]  # fmt: skip
    if mine:
        lines += [f"{mark('benchmark')}**Latency (batch 1, p50, {bench_report.get('cpu', '?')}, measured "
                  f"{bench_report.get('measured', '?')})**: "
                  + ", ".join(f"{k} {v['batch1_p50_ms']:.2f} ms" for k, v in bench.items())]  # fmt: skip
    elif bench:
        lines += [f"**Latency**: not measured for this run's model ({os.path.relpath(outs.benchmark, repo)} belongs to "
                  "another model); run `python benchmarks/onnx_latency.py` to measure it."]  # fmt: skip
    existing = [p for p in outs.pictures if p.exists()]
    if existing:
        old = {getattr(outs, name) for name in older}
        links = (f"[{p.stem}]({p.resolve().as_uri()})" + " *(earlier run)*" * (p in old) for p in existing)
        lines += ["", "Pictures: " + ", ".join(links)]
    return "\n".join(lines) + "\n"
