"""Optuna search over the fine-tuning knobs declared in ``hpo.space``.

A seeded TPE study in a real storage (SQLite file by default, any SQLAlchemy
URL such as PostgreSQL for workers on many machines). Each trial fine-tunes for
``hpo.epochs`` epochs and reports validation top-1 every epoch, so the pruner
(median or Hyperband) stops hopeless trials early. A failed trial (NaN loss,
out of memory) is recorded as failed and the study goes on; a killed study
resumes with its earlier trials (trials left running by a dead worker are
failed, by the storage heartbeat or at the next start, and queued again).

Outputs in ``hpo.reports_dir``: best_params.json, trials.csv (Optuna's trials
dataframe) and PNG plots of the optimization history, parameter importances and
intermediate values.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from mae_ops import runtime
from mae_ops.atomic import write_json, write_text
from mae_ops.config import (
    STORAGE_PASSWORD_ENV,
    Config,
    HpoConfig,
    InputError,
    SearchDim,
    redact,
    semantic_params,
    validate,
)
from mae_ops.data import PreparedData
from mae_ops.finetuning import TrainResult, encoder_spec, save_result, train_finetune
from mae_ops.models.classifier import load_classifier
from mae_ops.plots import save_figure
from mae_ops.reporting import setup_logging
from mae_ops.training import fingerprint

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# errors a trial may die of without stopping the study (OutOfMemoryError is a RuntimeError)
TRIAL_ERRORS = (FloatingPointError, RuntimeError, ValueError)
# a trial whose heartbeat stops this long is failed by the storage; a trial no worker
# signs this long is failed at the next start (a live worker signs within milliseconds)
GRACE_S = 30


def storage(hc: HpoConfig, attempts: int = 5) -> RDBStorage:
    """The study's RDB storage. Passwords need not sit in params.yaml: PostgreSQL
    URLs without one use PGPASSWORD or ~/.pgpass, as every libpq client does."""
    url = hc.storage
    password = os.environ.get(STORAGE_PASSWORD_ENV)
    if password and not url.startswith("sqlite"):  # kept out of params.yaml: the environment supplies it
        from sqlalchemy.engine import make_url

        url = make_url(url).set(password=password).render_as_string(hide_password=False)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}  # workers wait for the file lock
    else:
        engine_kwargs = {"pool_pre_ping": True}
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():  # the heartbeat API is marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=10, grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                )  # fmt: skip
        except SQLAlchemyError as exc:
            # workers starting together on an empty database race to create its tables
            if attempt == attempts:
                raise InputError(redact(f"cannot open the Optuna storage {url}: {exc}")) from exc
            log.info("storage not ready (%s), retrying", type(exc).__name__)
            time.sleep(attempt)
    raise AssertionError("unreachable")


def pruner(hc: HpoConfig) -> optuna.pruners.BasePruner:
    if hc.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=hc.startup_trials, n_warmup_steps=hc.warmup_epochs)
    if hc.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, hc.warmup_epochs), max_resource=hc.epochs)
    return optuna.pruners.NopPruner()


def study_name(cfg: Config, data_hash: str) -> str:
    """The name carries a fingerprint of everything a trial's score depends on,
    so a crashed search resumes, and a changed one starts afresh in the same storage."""
    semantic = semantic_params(cfg.finetune, "epochs")
    hpo = {k: v for k, v in cfg.hpo.model_dump(mode="json").items()
           if k in {"epochs", "space", "seed", "pruner", "startup_trials", "warmup_epochs"}}  # fmt: skip
    key = fingerprint({"model": cfg.model.preset, "finetune": semantic, "hpo": hpo, "data": data_hash})
    return f"{cfg.hpo.study_name}-{key}"


def create_study(cfg: Config, data_hash: str, worker: int = 0) -> optuna.Study:
    """Create (or load) the study. Each worker seeds its sampler differently, or
    workers would propose the same random start-up trials; so does a resumed
    search (by the number of trials already there), or it would replay trial 0's params."""
    hc = cfg.hpo
    study = optuna.create_study(
        storage=storage(hc), study_name=study_name(cfg, data_hash), direction="maximize", load_if_exists=True,
        pruner=pruner(hc),
    )  # fmt: skip
    done = len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=hc.seed + worker + 7919 * done,
                                               n_startup_trials=max(2, hc.startup_trials))  # fmt: skip
    return study


def _pinned() -> str:
    """' (CUDA_VISIBLE_DEVICES=N)' when this worker was started with one GPU visible."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f" (CUDA_VISIBLE_DEVICES={visible})" if visible else ""


def _this_host_pid() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _dead(t: optuna.trial.FrozenTrial, host: str) -> bool:
    """Signed by a worker on this machine that is gone (killed before its first heartbeat,
    or within the heartbeat's grace). Workers on other machines are left to the heartbeat."""
    worker_host, _, pid = str(t.user_attrs["worker"]).rpartition(":")
    return worker_host == host and pid.isdigit() and not _alive(int(pid))


def fail_dead_trials(study: optuna.Study, grace_s: float = GRACE_S) -> list[int]:
    """Fail the RUNNING trials no live worker holds, and queue their params once more:
    those a dead worker of this machine signed, and those no worker signs within
    ``grace_s`` (a worker killed between Optuna's ask and its objective's first line
    leaves a trial that has no signature and no heartbeat, which Optuna's heartbeat
    check never fails). Unsigned trials are timed from when this call first sees them,
    not by their start time, so a worker whose clock differs is not misjudged.
    Returns the numbers of the trials failed."""
    host, failed, first_seen, waited = socket.gethostname(), [], {}, False
    while True:
        now, unsigned = time.monotonic(), []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if "worker" in t.user_attrs:
                dead = _dead(t, host)
            else:
                dead = now - first_seen.setdefault(t.number, now) >= grace_s
                unsigned += [] if dead else [t.number]
            if dead:
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                if t.params and "retry_of" not in t.user_attrs:
                    study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
                failed.append(t.number)
        if not unsigned:
            break
        if not waited:
            log.info("trials %s run unsigned: waiting up to %.0f s for their workers to sign them",
                     unsigned, grace_s)  # fmt: skip
        waited = True
        time.sleep(min(1.0, grace_s))
    if failed:
        log.info("trials %s were left running by a worker that died: failed and queued again", failed)
    return failed


def first_pruning_epoch(hc: HpoConfig) -> int:
    """The first epoch whose score the pruner can act on: trials validate from there on
    (a validation pass costs a third of a training epoch at 350 labels). The median
    pruner ignores steps before ``n_warmup_steps`` and compares a trial with the others
    at the same step; hyperband's first rung is ``min_resource``; with no pruner only
    the final score counts. So the searches decide exactly as when every epoch was scored."""
    if hc.pruner == "none":
        return hc.epochs
    return max(1, hc.warmup_epochs)


def suggest(trial: optuna.Trial, space: dict[str, SearchDim]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, dim in space.items():
        if dim.choices is not None:
            params[name] = trial.suggest_categorical(name, dim.choices)
        else:
            params[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
    return params


def _trial_model_path(cfg: Config, study: str, number: int) -> Path:
    """Where a trial keeps its model with ``hpo.retrain: false``: ``hpo.trial_dir``
    (a disk every worker and the main machine see, when workers run elsewhere)."""
    return Path(cfg.hpo.trial_dir) / study / f"trial-{number}.pth"


def objective_for(cfg: Config, data: PreparedData, rt: runtime.Runtime):
    enc = encoder_spec(cfg, cfg.finetune.init)  # the search does not tune init: one encoder for every trial

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", _this_host_pid())  # first: a dead worker's trial is recognised by it
        trial.set_user_attr("device", str(rt.device) + _pinned())
        params = suggest(trial, cfg.hpo.space)
        ft = cfg.finetune.with_params(params)

        def report(epoch: int, val_top1: float) -> None:
            trial.report(val_top1, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val top-1 {val_top1:.3f} at epoch {epoch}")

        result = train_finetune(enc, ft, data, rt, epochs=cfg.hpo.epochs, eval_every=1,
                                eval_from=first_pruning_epoch(cfg.hpo), report=report,
                                desc=f"trial {trial.number}")  # fmt: skip
        if not cfg.hpo.retrain:
            path = _trial_model_path(cfg, trial.study.study_name, trial.number)
            save_result(result, path)
            trial.set_user_attr("model_path", str(path.resolve()))
        trial.set_user_attr("train_time_s", round(result.train_time_s, 2))
        return result.val_top1

    return objective


def optimize(cfg: Config, data: PreparedData, rt: runtime.Runtime, study: optuna.Study) -> list[int]:
    """Run trials until the study holds ``hpo.n_trials`` finished ones (across all
    workers); returns the numbers of the trials this process ran."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mine: list[int] = []
    if len(study.get_trials(deepcopy=False, states=FINISHED)) >= cfg.hpo.n_trials:
        return mine  # full already (MaxTrialsCallback only stops after one more trial)
    study.optimize(
        objective_for(cfg, data, rt), n_trials=None, timeout=cfg.hpo.timeout_s, catch=TRIAL_ERRORS,
        callbacks=[MaxTrialsCallback(cfg.hpo.n_trials, states=FINISHED), _log_trial,
                   lambda _study, trial: mine.append(trial.number)],
    )  # fmt: skip
    return mine


def _log_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    value = f"{trial.value:.4f}" if trial.value is not None else "-"
    log.info("trial %d %s (val top-1 %s) %s [%d finished]", trial.number, trial.state.name.lower(), value,
             {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in trial.params.items()}, done)  # fmt: skip


def work(cfg: Config, worker: int | None = None) -> list[int]:
    """One worker of a study, on this machine: join the study the params name
    (created if missing) and run trials until it holds ``hpo.n_trials`` finished
    ones. Every machine needs the same data/prepared (the study name carries its
    hash) and, for ``finetune.init: pretrain``, the same models/pretrain.
    Returns the numbers of the trials this worker ran."""
    if not cfg.hpo.enabled or cfg.finetune.mode != "finetune":
        raise InputError("nothing to search: the study runs with hpo.enabled: true and finetune.mode: finetune")
    if worker is None:  # distinct sampler seeds on distinct machines and processes
        worker = zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) % 100_000
    with runtime.session(cfg.finetune.device, cfg.finetune.amp) as rt:
        data = PreparedData(cfg.data.out_dir, hide_test=True)
        study = create_study(cfg, data.manifest["content_hash"], worker)
        log.info("worker %s joins study %r (%d finished trials) in %s", worker, study.study_name,
                 len(study.get_trials(deepcopy=False, states=FINISHED)), redact(cfg.hpo.storage))  # fmt: skip
        return optimize(cfg, data, rt, study)


def worker_gpus(cfg: Config) -> list[str | None]:
    """The GPU each local worker is pinned to (as CUDA_VISIBLE_DEVICES names it), or None
    for unpinned ones: ``hpo.workers: auto`` is one worker per visible GPU; a number of
    workers takes the GPUs in turn; on a CPU, or with finetune.device naming one GPU, none pins."""
    device = cfg.finetune.device
    gpus = runtime.visible_gpus(device) if ":" not in device else []
    count = cfg.hpo.workers if cfg.hpo.workers != "auto" else max(1, len(gpus))
    return [gpus[w % len(gpus)] if gpus else None for w in range(count)]


def _local_worker(cfg_json: dict, rank: int, workers: int) -> None:
    """A local worker process: its share of the CPU threads (and of the GPUs, through the
    CUDA_VISIBLE_DEVICES it was started with)."""
    setup_logging(f"%(asctime)s worker{rank} %(message)s")
    cfg = validate(cfg_json)
    torch.set_num_threads(max(1, torch.get_num_threads() // workers))
    work(cfg, worker=rank)


def _start_pinned(ctx: Any, cfg_json: dict, rank: int, gpus: list[str | None]) -> Any:
    """Start worker ``rank`` with only its GPU visible (the child reads the environment it is started with)."""
    proc = ctx.Process(target=_local_worker, args=(cfg_json, rank, len(gpus)))
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpus[rank] is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[rank]
    try:
        proc.start()
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before
    return proc


def run_study(cfg: Config, data: PreparedData, rt: runtime.Runtime) -> optuna.Study:
    study = create_study(cfg, data.manifest["content_hash"])
    fail_dead_trials(study)
    before = len(study.get_trials(deepcopy=False, states=FINISHED))
    if before:
        log.info("study %r resumes with %d finished trials", study.study_name, before)
    gpus = worker_gpus(cfg)
    if len(gpus) > 1:
        log.info("%d local workers%s", len(gpus),
                 f", on GPUs {gpus}" if gpus[0] is not None else "")  # fmt: skip
        ctx = mp.get_context("spawn")
        cfg_json = cfg.model_dump(mode="json")
        procs = [_start_pinned(ctx, cfg_json, r, gpus) for r in range(len(gpus))]
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"an HPO worker failed (exit codes {[p.exitcode for p in procs]})")
    else:
        optimize(cfg, data, rt, study)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise InputError("no HPO trial completed: see the log for why they failed or were pruned")
    return study


def best_trial_model(cfg: Config, study: optuna.Study) -> TrainResult | None:
    """The best trial's own model (``hpo.retrain: false``), or None when this machine
    cannot read it (a worker elsewhere kept it on its own disk): then the caller retrains."""
    best = study.best_trial
    path = Path(best.user_attrs.get("model_path") or _trial_model_path(cfg, study.study_name, best.number))
    if not path.exists():
        log.warning("best trial %d's model %s (worker %s) is not readable here: retraining with its params; "
                    "put hpo.trial_dir on a disk every worker shares to keep trial models",
                    best.number, path, best.user_attrs.get("worker", "?"))  # fmt: skip
        return None
    model, args = load_classifier(path)
    return TrainResult(model, args, [{"epoch": cfg.hpo.epochs, "val_top1": study.best_value}], study.best_value)


def write_disabled_report(hc: HpoConfig, why: str) -> None:
    """reports/hpo when no search ran: a note (the folder is a DVC output), and no
    stale plots of an earlier search."""
    out = Path(hc.reports_dir)
    if out.exists():
        for old in out.iterdir():
            if old.is_file():
                old.unlink()
    write_text(out / "README.md", f"# No hyper-parameter search in this run\n\n{why}; the fine-tuning "
               "params were used as given in params.yaml.\n")  # fmt: skip


def write_reports(study: optuna.Study, best_file: Path, history_png: Path) -> dict[str, Any]:
    """The best trial in ``best_file``; the trials and Optuna's plots beside it (the
    optimization history in ``history_png``)."""
    out = best_file.parent
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in (*FINISHED, TrialState.RUNNING)}
    best = {"study": study.study_name, "value": study.best_value, "trial": study.best_trial.number,
            "params": study.best_params, "counts": counts}  # fmt: skip
    write_json(best_file, best)
    write_text(out / "trials.csv", study.trials_dataframe().to_csv(index=False))

    from optuna.visualization import matplotlib as ovm

    plots = {
        history_png: ovm.plot_optimization_history,
        out / "intermediate_values.png": ovm.plot_intermediate_values,
        out / "param_importances.png": ovm.plot_param_importances,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
        for path, plot in plots.items():
            try:
                ax = plot(study)
            except (ValueError, RuntimeError) as exc:  # e.g. importances need >= 2 completed trials
                log.info("skipping %s: %s", path.name, exc)
                continue
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            save_figure(fig, path)
    return best
