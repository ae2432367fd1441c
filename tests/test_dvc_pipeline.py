"""dvc.yaml really reproduces the stages in a git repo, then skips them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.conftest import BIN, REPO, subprocess_env


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=subprocess_env(), timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_dvc_repro_runs_then_skips(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["preset"] = "mae_vit_micro_patch4"
    params["pretrain"].update(epochs=2, batch_size=256, warmup_epochs=1)
    params["finetune"].update(epochs=2, batch_size=32, linprobe_epochs=3)
    params["hpo"].update(n_trials=2, epochs=1, startup_trials=1, warmup_epochs=0)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _run(["git", "init", "-q"], repo)
    _run([str(BIN / "dvc"), "init", "-q"], repo)

    first = _run([str(BIN / "dvc"), "repro"], repo)
    for stage in ("prepare", "pretrain", "finetune", "baselines", "evaluate"):
        assert f"Running stage '{stage}'" in first
    assert (repo / "models/pretrain/mae.pth").exists()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["pretrain"]["params"]["params.yaml"]["pretrain"]["epochs"] == 2
    mtime = (repo / "models/pretrain/mae.pth").stat().st_mtime_ns

    second = _run([str(BIN / "dvc"), "repro"], repo)
    assert "Running stage" not in second
    assert "didn't change, skipping" in second
    assert (repo / "models/pretrain/mae.pth").stat().st_mtime_ns == mtime

    metrics = json.loads(_run([str(BIN / "dvc"), "metrics", "show", "--json"], repo))
    top1 = next(iter(metrics.values()))["data"]["reports/metrics.json"]["data"]  # keyed by revision
    assert set(top1) == {"finetune", "scratch", "linprobe", "logreg_pixels", "knn_pixels", "knn_mae"}
    assert all(0.0 <= m["top1"] <= 1.0 for m in top1.values())

    # an evaluation param change re-runs only what depends on it
    params["evaluate"]["batch_size"] = 100
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    third = _run([str(BIN / "dvc"), "repro"], repo)
    assert "Running stage 'evaluate'" in third
    assert all(f"Running stage '{s}'" not in third for s in ("prepare", "pretrain", "finetune", "baselines"))

    # pre-training run again on the same data and params writes the same bytes (the weights are
    # seeded, the files deterministic), so DVC finds nothing after it changed
    models = lock["stages"]["pretrain"]["outs"][0]
    assert models["path"] == "models/pretrain"
    fourth = _run([str(BIN / "dvc"), "repro", "--force", "--single-item", "pretrain"], repo)
    assert "Running stage 'pretrain'" in fourth
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["pretrain"]["outs"][0] == models
    fifth = _run([str(BIN / "dvc"), "repro"], repo)
    assert "Running stage" not in fifth, fifth


def _imported_modules(module: str) -> set[str]:
    """The mae_ops source files a module imports, directly or through others (read with ast)."""
    import ast

    src = REPO / "src"

    def path_of(name: str) -> Path | None:
        for candidate in (src / (name.replace(".", "/") + ".py"), src / name.replace(".", "/") / "__init__.py"):
            if candidate.exists():
                return candidate
        return None

    seen: set[Path] = set()
    todo = [path_of(module)]
    while todo:
        path = todo.pop()
        if path is None or path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import module` needs the module; `from pkg import name` the package's own file
                names = [f"{node.module}.{a.name}" if path_of(f"{node.module}.{a.name}") else node.module
                         for a in node.names]  # fmt: skip
            todo += [path_of(n) for n in names if n.startswith("mae_ops")]
    return {str(p.relative_to(REPO)) for p in seen if p.stat().st_size > 0}  # empty __init__ files hold no code


def test_every_stage_lists_every_module_it_imports_as_a_dep() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        deps = {d for d in stage["deps"] if str(d).startswith("src/")}
        missing = _imported_modules(f"mae_ops.stages.{name}") - deps
        assert not missing, f"stage {name} imports {sorted(missing)} but dvc.yaml does not list them as deps"


def test_dvc_yaml_tracks_every_output_the_config_names_under_the_stage_that_writes_it() -> None:
    """Config.outputs is the one home of the paths stages hand each other (the pipeline's summary and
    the registry read them too): dvc.yaml must track each one, under its writer, or DVC would not
    version it, skip its stage when it is up to date, or rerun the readers when it changes."""
    from mae_ops.config import Config
    from mae_ops.orchestration import stage_outputs

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    produced = {stage: {Path(p) for p in stage_outputs(spec)} for stage, spec in stages.items()}
    outputs = Config().outputs()
    assert {stage for stage in stages if outputs.of_stage(stage)} == set(stages)  # every stage hands something on
    for stage in stages:
        for name, path in outputs.of_stage(stage).items():
            writers = [s for s, tracked in produced.items() if any(path == t or t in path.parents for t in tracked)]
            assert writers == [stage], f"{name} ({path}) is tracked under {writers}, not only under {stage}"


def test_listing_the_image_folders_keeps_the_users_own_deps_and_comments(tmp_path: Path) -> None:
    """`mae-ops pipeline` lists the configured folders as deps of `prepare` (marked as its
    own) and changes only those: a dependency the user added, and its comments, stay."""
    from mae_ops.config import load_params
    from mae_ops.orchestration import SOURCE_DEP_MARK, sync_source_deps
    from mae_ops.sources import missing_source_deps
    from tests.conftest import git_dvc_repo

    repo = git_dvc_repo(tmp_path / "repo")
    text = (REPO / "dvc.yaml").read_text()
    user = ("      # label fixes from the review team\n"
            "      - labels/overrides.csv   # one row per corrected image\n")  # fmt: skip
    text = text.replace("      - src/mae_ops/atomic.py\n", user + "      - src/mae_ops/atomic.py\n", 1)
    (repo / "dvc.yaml").write_text(text)
    for folder in ("labels", "photos_a/c0", "photos_a/c1", "photos_b/c0", "photos_b/c1", "extra"):
        (repo / folder).mkdir(parents=True)
    (repo / "labels/overrides.csv").write_text("file,label\n")

    def deps() -> list[str]:
        return yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["prepare"]["deps"]

    first = load_params(REPO / "params.yaml", ["data.source=photos_a", "data.unlabeled_dirs=[extra]"])
    assert sync_source_deps(repo, first) == ["photos_a", "extra"]
    assert deps()[-2:] == ["photos_a", "extra"] and "labels/overrides.csv" in deps()
    second = load_params(REPO / "params.yaml", ["data.source=photos_b"])
    assert sync_source_deps(repo, second) == ["photos_b"]
    after = (repo / "dvc.yaml").read_text()
    assert user in after  # the user's entry and both of its comments, where they were
    assert "photos_a" not in after and "extra" not in deps()
    marked = [line.split("#")[0].strip() for line in after.splitlines() if SOURCE_DEP_MARK in line]
    assert marked == ["- photos_b"]
    assert not missing_source_deps(repo, second.data)
    assert sync_source_deps(repo, second) == ["photos_b"] and (repo / "dvc.yaml").read_text() == after  # stable
    # DVC itself reads the edited file: the user's dep is still one of the stage's
    status = _run([str(BIN / "dvc"), "status", "prepare", "--json"], repo)
    assert "labels/overrides.csv" in status
    assert sync_source_deps(repo, load_params(REPO / "params.yaml", [])) == []  # the embedded digits
    assert (repo / "dvc.yaml").read_text() == text  # back to the user's file, to the byte


def test_the_checkpoint_of_pretrain_init_is_a_dep_of_pretrain(tmp_path: Path) -> None:
    """With pretrain.init set, DVC hashes the checkpoint (other weights under the same name
    re-run pre-training); unset, the marked entry goes and dvc.yaml is the user's again."""
    from mae_ops.config import load_params
    from mae_ops.orchestration import INIT_DEP_MARK, sync_source_deps
    from tests.conftest import git_dvc_repo

    repo = git_dvc_repo(tmp_path / "repo")
    text = (REPO / "dvc.yaml").read_text()
    (repo / "dvc.yaml").write_text(text)
    (repo / "weights").mkdir()
    (repo / "weights/mae_full.pth").write_bytes(b"weights")
    cfg = load_params(REPO / "params.yaml", ["pretrain.init=weights/mae_full.pth"])
    sync_source_deps(repo, cfg)
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert stages["pretrain"]["deps"][-1] == "weights/mae_full.pth"
    assert "weights/mae_full.pth" not in stages["prepare"]["deps"]
    marked = [line.split("#")[0].strip() for line in (repo / "dvc.yaml").read_text().splitlines()
              if INIT_DEP_MARK in line]  # fmt: skip
    assert marked == ["- weights/mae_full.pth"]
    status = _run([str(BIN / "dvc"), "status", "pretrain", "--json"], repo)
    assert "weights/mae_full.pth" in status
    sync_source_deps(repo, load_params(REPO / "params.yaml", []))
    assert (repo / "dvc.yaml").read_text() == text
