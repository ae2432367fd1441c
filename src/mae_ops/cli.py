"""`mae-ops` command line: one sub-command per pipeline stage.

Every command takes ``--params PATH`` and repeated ``--set section.key=value``;
invalid params exit with code 2 before anything is written. The user's mistakes
(a ``UserError``: bad params, a missing folder, a busy output, a full disk) are
one line on stderr and exit code 2; anything else is a bug and keeps its
traceback (exit code 1). ``mae-ops --debug ...`` shows the traceback of both.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
import yaml

from mae_ops.config import Config, InputError, load_params, redact
from mae_ops.errors import ERROR_FILE_ENV, UserError
from mae_ops.reporting import setup_logging

T = TypeVar("T")

app = typer.Typer(
    name="mae-ops",
    help="MAE pre-training, fine-tuning and ONNX export for your own images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file")]
RUNTIME_HELP = (
    "auto | onnxruntime | openvino; auto: on a CPU, the runtime `mae-ops export` measured fastest for the "
    "file (if installed), else onnxruntime"
)
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override a param: section.key=value (repeatable)")
]


_DEBUG = {"on": False}


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="show the traceback of every error")] = False,
) -> None:
    _DEBUG["on"] = debug or os.environ.get("MAE_OPS_DEBUG", "") not in ("", "0")


def _fail(message: str) -> None:
    raise InputError(message)


def _config(params: Path, overrides: list[str] | None) -> Config:
    return load_params(params, overrides or [])


def _run_stage(params: Path, overrides: list[str] | None, stage: Callable[[Config], T]) -> tuple[Config, T]:
    """Validate params, run one stage (a UserError becomes one line and exit code 2 in main)."""
    cfg = _config(params, overrides)
    setup_logging()
    return cfg, stage(cfg)


@app.command()
def prepare(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option(help="hash and decode every file again (reuse nothing)")] = False,
) -> None:
    """Ingest the data source into data/prepared/ (fixed size, splits, manifest)."""
    from mae_ops.stages import prepare as stage

    cfg, manifest = _run_stage(params, set_, lambda c: stage.run(c, force=force))
    typer.echo(
        f"prepared {manifest['num_images']} images {manifest['counts']} "
        f"({manifest['duplicates']['extra_files']} duplicate files, {len(manifest['label_conflicts'])} label "
        f"conflicts, {manifest['num_skipped']} skipped, {manifest['clipped']['files']} clipped) -> {cfg.data.out_dir}"
    )


@app.command()
def pretrain(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="continue from the last checkpoint (error if none matches)")] = False,
) -> None:
    """MAE pre-training on the prepared images -> models/pretrain/."""
    from mae_ops.stages import pretrain as stage

    _, metrics = _run_stage(params, set_, lambda cfg: stage.run(cfg, resume=resume))
    if metrics:
        typer.echo(f"pre-training loss {metrics['first_loss']:.4f} -> {metrics['final_loss']:.4f}")


@app.command()
def finetune(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="continue from the last checkpoint (error if none matches)")] = False,
) -> None:
    """Fine-tune (or linear-probe) the pre-trained encoder on the labelled subset, with Optuna
    when hpo.enabled -> models/finetune/."""
    from mae_ops.stages import finetune as stage

    _, metrics = _run_stage(params, set_, lambda cfg: stage.run(cfg, resume=resume))
    typer.echo(f"{metrics['mode']} ({metrics['init']}): validation top-1 {metrics['val_top1']:.2%}")


@app.command("hpo-worker")
def hpo_worker(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    worker: Annotated[int | None, typer.Option(help="sampler seed offset (default: from host and pid)")] = None,
) -> None:
    """Run trials of the fine-tuning study in hpo.storage until it holds hpo.n_trials finished
    ones: start one per machine (or GPU) beside `mae-ops finetune`, all with the same params."""
    from mae_ops import hpo

    _, mine = _run_stage(params, set_, lambda cfg: hpo.work(cfg, worker))
    typer.echo(f"this worker ran {len(mine)} trial(s): {mine}")


@app.command()
def baselines(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Train the comparisons: the same ViT from scratch, and a linear probe -> models/baselines/."""
    from mae_ops.stages import baselines as stage

    _, metrics = _run_stage(params, set_, stage.run)
    for name, m in metrics.items():
        typer.echo(f"{name}: validation top-1 {m['val_top1']:.2%}")


@app.command()
def evaluate(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Score every model on the held-out test split -> reports/metrics.json, reports/eval/."""
    from mae_ops.stages import evaluate as stage

    cfg, results = _run_stage(params, set_, stage.run)
    for name, m in results.items():
        typer.echo(f"{name:9s} test top-1 {m['top1']:.2%}")
    typer.echo(f"summary: {cfg.evaluate.reports_dir}/summary.md")


@app.command()
def export(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Export the fine-tuned model to ONNX, gated on parity with PyTorch -> models/export/."""
    from mae_ops.stages import export as stage

    cfg, parity = _run_stage(params, set_, stage.run)
    line = f"parity: max |diff| {parity['max_abs_diff']:.2e}, top-1 agreement {parity['top1_agreement']:.2%}"
    if "int8_top1" in parity:
        line += f"; int8 top-1 {parity['int8_top1']:.2%} (fp32 {parity['onnx_top1']:.2%})"
    typer.echo(line + f" -> {cfg.export.out_dir}")


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="an .onnx file made by `mae-ops export`")],
    paths: Annotated[list[Path], typer.Argument(help="image files or folders")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1)] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="print CSV")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    runtime: Annotated[str, typer.Option(help=RUNTIME_HELP)] = "auto",
    threads: Annotated[int | None, typer.Option(min=1)] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="images per inference call")] = 256,
    workers: Annotated[int | None, typer.Option(min=0, help="decoding processes (default: up to 4)")] = None,
) -> None:
    """Top-k labels for images with onnxruntime or OpenVINO (no torch needed), streamed as each
    batch is done. Exit 1 if any image failed."""
    import time

    from mae_ops.serving import ModelInfo, expand_paths, open_session, predict_files

    if not model.exists():
        _fail(f"model not found: {model}")
    session = open_session(model, device, threads, runtime)
    files = expand_paths(list(paths))
    if not files:
        _fail("no image files found")
    t0, failed, clipped = time.perf_counter(), 0, 0
    records = predict_files(session, files, top_k, batch_size, workers)
    if as_json or as_csv:
        import csv

        writer = csv.writer(sys.stdout)
        if as_csv:
            writer.writerow(["file", "label", "prob", "error"])
        for r in records:
            failed, clipped = failed + ("error" in r), clipped + ("clipped" in r)
            if as_json:
                typer.echo(json.dumps(r))
            else:
                best = r.get("top", [{}])[0]
                writer.writerow([r["file"], best.get("label", ""), best.get("prob", ""), r.get("error", "")])
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("file", *(f"#{i + 1}" for i in range(top_k)))
        for r in records:
            failed, clipped = failed + ("error" in r), clipped + ("clipped" in r)
            cells = [f"{t['label']} ({t['prob']:.1%})" for t in r.get("top", [])] or [f"[red]error: {r['error']}"]
            table.add_row(r["file"], *cells)
        Console().print(table)
    seconds = time.perf_counter() - t0
    typer.echo(f"{len(files)} images ({failed} failed) in {seconds:.2f}s: {len(files) / seconds:.0f} images/s",
               err=True)  # fmt: skip
    _warn_clipped(clipped, ModelInfo.from_session(session).bit_depth)
    if failed:
        raise typer.Exit(code=1)


def _warn_clipped(count: int, bits: int) -> None:
    """On stderr: how many images held values beyond the range the model's decoder reads
    (``bits``: its data.bit_depth), clipped as prepare clips them."""
    if count:
        message = (f"warning: {count} images hold values outside 0..{2**bits - 1} (the model's bit depth, {bits}; "
                   "0..1 for float files) and were clipped: unlike its training data")  # fmt: skip
        typer.echo(message, err=True)


@app.command()
def embed(
    model: Annotated[Path, typer.Argument(help="the encoder.onnx made by `mae-ops export`")],
    paths: Annotated[list[Path], typer.Argument(help="image files or folders")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the Parquet file to write")],
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    runtime: Annotated[str, typer.Option(help=RUNTIME_HELP)] = "auto",
    threads: Annotated[int | None, typer.Option(min=1)] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="images per inference call")] = 256,
    workers: Annotated[int | None, typer.Option(min=0, help="decoding processes (default: up to 4)")] = None,
) -> None:
    """Embeddings of images for search, clustering and clean-up: the pre-trained encoder on
    the whole image (no masking: the same image gives the same vector), pooled as
    fine-tuning pools, with onnxruntime or OpenVINO. One Parquet row per image (file, embedding),
    streamed; unreadable images are skipped and named on stderr (exit 1)."""
    import time

    from tqdm.auto import tqdm

    from mae_ops.reporting import file_sha256
    from mae_ops.serving import ModelInfo, expand_paths, open_session, run_files
    from mae_ops.similarity import write_embeddings

    if not model.exists():
        _fail(f"model not found: {model}")
    session = open_session(model, device, threads, runtime)
    info = ModelInfo.from_session(session, "features")
    files = expand_paths(list(paths))
    if not files:
        _fail("no image files found")
    t0, failed = time.perf_counter(), []

    clipped = 0

    def rows():
        nonlocal clipped
        for f, row, was_clipped in tqdm(run_files(session, files, "features", batch_size, workers),
                                        total=len(files), desc="embed", unit="img"):  # fmt: skip
            if isinstance(row, str):
                failed.append(f)
                typer.echo(f"skipped {f}: {row}", err=True)
            else:
                clipped += was_clipped
                yield f, row

    meta = {"model": str(model), "model_sha256": file_sha256(model), "preset": info.metadata.get("preset", ""),
            "img_size": str(info.img_size), "channels": str(info.channels)}  # fmt: skip
    count = write_embeddings(rows(), out, meta)
    seconds = time.perf_counter() - t0
    typer.echo(f"embedded {count} images ({len(failed)} unreadable, skipped) in {seconds:.2f}s -> {out}", err=True)
    _warn_clipped(clipped, info.bit_depth)
    if failed:
        raise typer.Exit(code=1)


@app.command()
def similar(
    index: Annotated[Path, typer.Argument(help="embeddings written by `mae-ops embed`")],
    query: Annotated[Path | None, typer.Option(help="embeddings of the queries; default: each image of INDEX")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1)] = 5,
    duplicates: Annotated[
        float | None, typer.Option(min=-1.0, max=1.0, help="instead: every pair of INDEX with cosine >= this")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write the CSV here (default: stdout)")] = None,
) -> None:
    """Nearest neighbours by cosine similarity (exact search), or with --duplicates the
    near-duplicate pairs of a set, as CSV."""
    import contextlib
    import csv

    from mae_ops.atomic import atomic_path
    from mae_ops.similarity import near_duplicates, nearest, read_embeddings

    files, emb, _ = read_embeddings(index)
    q_files, q_emb = (files, emb) if query is None else read_embeddings(query)[:2]
    if q_emb.shape[1] != emb.shape[1]:
        _fail(f"{query} has {q_emb.shape[1]}-d embeddings, {index} {emb.shape[1]}-d: embed both with one encoder")
    with contextlib.ExitStack() as stack:
        fh = open(stack.enter_context(atomic_path(out)), "w", newline="") if out else sys.stdout  # noqa: SIM115
        if out:
            stack.callback(fh.close)
        writer = csv.writer(fh)
        if duplicates is not None:
            writer.writerow(["file_a", "file_b", "cosine"])
            pairs = 0
            for i, j, sim in near_duplicates(emb, duplicates):
                writer.writerow([files[i], files[j], f"{sim:.5f}"])
                pairs += 1
            summary = f"{pairs} pairs with cosine >= {duplicates} among {len(files)} images"
        else:
            ids, sims = nearest(emb, q_emb, top_k, exclude_self=query is None)
            writer.writerow(["query", "rank", "neighbour", "cosine"])
            for qf, row_ids, row_sims in zip(q_files, ids, sims, strict=True):
                for rank, (n, sim) in enumerate(zip(row_ids, row_sims, strict=True), 1):
                    writer.writerow([qf, rank, files[n], f"{sim:.5f}"])
            summary = f"{len(q_files)} queries x {ids.shape[1]} neighbours among {len(files)} images"
    typer.echo(summary + (f" -> {out}" if out else ""), err=True)


def _load_flow(name: str, attr: str):
    """Import flows/<name>.py as module ``flows.<name>`` from the project folder;
    an importable name lets Prefect's runner re-import the flow in its worker processes."""
    import importlib

    path = Path("flows") / f"{name}.py"
    if not path.exists() or not Path("dvc.yaml").exists():
        _fail(f"run this from the project folder ({path} and dvc.yaml are not here)")
    root = str(Path.cwd())
    if root not in sys.path:
        sys.path.insert(0, root)
    return getattr(importlib.import_module(f"flows.{name}"), attr)


PIPELINE_PARAMS_HELP = (
    "run with this params file: it replaces params.yaml (kept for later runs; dvc.lock records it), then --set applies"
)


@app.command()
def pipeline(
    stages: Annotated[
        list[str] | None,
        typer.Argument(help="stages to bring up to date, with the stages upstream of them (default: all)"),
    ] = None,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option(help="re-run the stages even if nothing changed")] = False,
    lock_wait: Annotated[float, typer.Option(help="seconds to wait for another run to finish")] = 0.0,
    params: Annotated[Path | None, typer.Option("--params", "-p", help=PIPELINE_PARAMS_HELP)] = None,
) -> None:
    """Run the pipeline as a Prefect flow over the DVC stages: only what changed runs.
    --set overrides are written into params.yaml, comments kept (and so recorded in dvc.lock)."""
    from mae_ops.atomic import write_text
    from mae_ops.orchestration import (
        configure_prefect,
        pipeline_lock,
        plan_overrides,
        preflight,
        run_line,
        run_record,
        with_upstream,
    )

    root = Path.cwd()
    own = root / "params.yaml"
    replace = params is not None and not (own.exists() and params.resolve() == own.resolve())
    # a bad file or override stops here, naming the key, before params.yaml or any flow is touched
    if replace:  # DVC's stages read params.yaml: the file becomes it (the same params, once written)
        cfg = _config(params, set_)
    else:
        cfg, _ = plan_overrides(root, set_ or [])
    wanted = with_upstream(root, stages)  # an unknown stage stops here
    configure_prefect()
    flow = _load_flow("pipeline", "pipeline")
    setup_logging()
    # the lock and the checks come before Prefect starts: a refused run is one line, not a flow traceback
    with pipeline_lock(root, lock_wait):
        if replace:
            write_text(own, params.read_text())
            typer.echo(f"params.yaml now holds {params} (kept for later runs; dvc.lock records it)")
        preflight(root, cfg, wanted, set_ or [], force)
        flow(repo=".", stages=stages, overrides=set_, force=force, lock_wait_s=lock_wait)
        record = run_record(root)  # this run's, written by the flow: what ran, what DVC finds out of date
    typer.echo(run_line(record))


@app.command()
def probe(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    encoder: Annotated[Path | None, typer.Option(help="encoder checkpoint (default: the pretrain stage's)")] = None,
    out: Annotated[Path, typer.Option(help="scores (JSON)")] = Path("reports/probe.json"),
) -> None:
    """Score a pre-trained encoder on the validation split: k-NN, linear probe, short fine-tune."""
    from mae_ops.stages import probe as stage

    _, scores = _run_stage(params, set_, lambda cfg: stage.run(cfg, encoder or cfg.outputs().encoder, out))
    typer.echo(json.dumps({k: v for k, v in scores.items() if k.endswith("_top1")}))


SWEEP_HELP = "key=v1,v2,... (repeatable) in place of study.sweeps, e.g. pretrain.mask_ratio=0.5,0.75"


@app.command()
def study(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    sweep: Annotated[list[str] | None, typer.Option(help=SWEEP_HELP)] = None,
) -> None:
    """Sweep pre-training settings (study.sweeps, one key at a time), each a DVC experiment of the
    pipeline run by DVC's queue (`dvc exp show`, `dvc exp apply`), scored without the full
    fine-tuning: table, checks against the paper and PNG plots in study.reports_dir."""
    from mae_ops.orchestration import configure_prefect, plan_overrides

    overrides = list(set_ or [])
    if sweep:
        sweeps = {}
        for item in sweep:
            key, sep, values = item.partition("=")
            if not sep or not values:
                _fail(f"--sweep {item!r}: expected key=v1,v2,...")
            sweeps[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
        overrides.append(f"study.sweeps={json.dumps(sweeps)}")
    repo = params.resolve().parent
    if params.name != "params.yaml" or not (repo / "dvc.yaml").exists() or not (repo / ".git").exists():
        _fail(f"the study runs DVC experiments of a project's pipeline: give the params.yaml beside dvc.yaml in "
              f"a git repository ({params} is not)")  # fmt: skip
    cfg, _ = plan_overrides(repo, overrides)
    configure_prefect()
    flow = _load_flow("study", "study")
    setup_logging()
    result = flow(str(repo), overrides)
    typer.echo("\n".join(result["directions"]) or "no direction to check")
    typer.echo(f"table and plots: {cfg.study.reports_dir}/summary.md")


@app.command()
def retrain(
    params: ParamsOpt = Path("params.yaml"),
    force: Annotated[bool, typer.Option(help="retrain even if the data did not change")] = False,
) -> None:
    """One retraining run now: pipeline if the data changed, then champion/challenger promotion."""
    from mae_ops import registry as reg
    from mae_ops.orchestration import configure_prefect

    cfg = _config(params, None)
    reg.production(Path(cfg.retrain.registry_dir))  # a corrupt pointer is one line here, not a flow traceback
    configure_prefect()
    result = _load_flow("retrain", "retrain")(repo=".", force=force)
    typer.echo(json.dumps(result, default=str))


@app.command()
def serve(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Serve the retraining flow as a deployment on retrain.schedule (cron) against the
    Prefect server in PREFECT_API_URL (start one with `prefect server start`)."""
    from mae_ops.orchestration import configure_prefect

    cfg = _config(params, set_)
    configure_prefect()
    _require_prefect_server()
    flow = _load_flow("retrain", "retrain")
    flow.serve(name=cfg.retrain.deployment, cron=cfg.retrain.schedule,
               parameters={"repo": str(Path.cwd())}, description="scheduled MAE retraining")  # fmt: skip


def _require_prefect_server() -> None:
    """A schedule fires only through a Prefect server: without one, `serve` would
    wait for ever on a temporary API that schedules nothing."""
    import urllib.request

    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        _fail("mae-ops serve needs a Prefect server to fire its schedule: start one with `prefect server "
              "start --host 127.0.0.1` and export PREFECT_API_URL=http://127.0.0.1:4200/api")  # fmt: skip
    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10).close()
    except OSError as exc:
        _fail(f"the Prefect server at PREFECT_API_URL={redact(url)} does not answer ({exc}); start it with "
              "`prefect server start --host 127.0.0.1`")  # fmt: skip


registry_app = typer.Typer(help="The model registry: versions, production pointer, history.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")


def _registry_dir(params: Path) -> Path:
    return Path(_config(params, None).retrain.registry_dir)


@registry_app.command("list")
def registry_list(params: ParamsOpt = Path("params.yaml")) -> None:
    """Every registered version; * marks production."""
    from mae_ops import registry as reg

    root = _registry_dir(params)
    versions = reg.list_versions(root)
    if not versions:
        typer.echo(f"no model versions registered in {root} (`mae-ops retrain` registers them)", err=True)
        return
    prod = (reg.production(root) or {}).get("version")
    for v in versions:
        mark = "*" if v["version"] == prod else " "
        typer.echo(
            f"{mark} {v['version']}  test top-1 {v['test_top1']:.2%}  {v['created']}  git {v['git_revision'][:8]}"
        )


@registry_app.command("show")
def registry_show(
    version: Annotated[str, typer.Argument()] = "production", params: ParamsOpt = Path("params.yaml")
) -> None:
    """One version's record (default: the production pointer)."""
    from mae_ops import registry as reg

    root = _registry_dir(params)
    record = reg.production(root) if version == "production" else reg.get_version(root, version)
    if record is None:
        raise reg.RegistryError(f"no production model in {root}: `mae-ops retrain` or `mae-ops registry promote`")
    typer.echo(json.dumps(record, indent=2))


@registry_app.command("promote")
def registry_promote(version: str, params: ParamsOpt = Path("params.yaml")) -> None:
    """Put a version in production by hand."""
    from mae_ops import registry as reg

    pointer = reg.promote(_registry_dir(params), version, "promoted by hand")
    typer.echo(f"production: {pointer['version']} (was {pointer['previous']})")


@registry_app.command("rollback")
def registry_rollback(params: ParamsOpt = Path("params.yaml")) -> None:
    """Back to the previous production version."""
    from mae_ops import registry as reg

    pointer = reg.rollback(_registry_dir(params))
    typer.echo(f"production: {pointer['version']}")


@app.command("check-params")
def check_params(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Validate params and print the resolved configuration as YAML."""
    import yaml

    cfg = _config(params, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def main() -> None:
    try:
        app(prog_name="mae-ops")
    except UserError as exc:
        if _DEBUG["on"]:
            raise
        message = redact(str(exc))
        error_file = os.environ.get(ERROR_FILE_ENV)
        if error_file:  # the pipeline shows this line as the stage's failure
            Path(error_file).write_text(message + "\n")
        typer.echo(f"error: {message}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
