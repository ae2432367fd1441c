"""Shared fixtures: tiny configs that run on a CPU in seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mae_ops.config import Config, load_params
from mae_ops.orchestration import load_module_file
from mae_ops.stages import export, finetune, prepare, pretrain

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin, where the mae-ops and dvc scripts live

# keep tests quiet and single-machine
os.environ.setdefault("TQDM_DISABLE", "1")


def tiny_overrides(root: Path) -> list[str]:
    """A micro MAE on 28 px digits, every output under ``root``."""
    return [
        f"data.out_dir={root}/data/prepared",
        "model.preset=mae_vit_micro_patch4",
        "pretrain.epochs=2",
        "pretrain.batch_size=128",
        "pretrain.warmup_epochs=1",
        "pretrain.base_lr=0.003",
        f"pretrain.out_dir={root}/models/pretrain",
        f"pretrain.checkpoint_dir={root}/checkpoints/pretrain",
        f"pretrain.reports_dir={root}/reports/pretrain",
    ]


def tiny_config(root: Path, *extra: str) -> Config:
    return load_params(REPO / "params.yaml", [*tiny_overrides(root), *extra])


@pytest.fixture(scope="session")
def prepared_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded digits prepared once for the whole session (read-only for tests)."""
    root = tmp_path_factory.mktemp("mnist")
    prepare.run(tiny_config(root))
    return root / "data" / "prepared"


@pytest.fixture
def mnist_root(tmp_path: Path, prepared_mnist: Path) -> Path:
    """A fresh run folder whose data/prepared is a copy of the session's digits."""
    shutil.copytree(prepared_mnist, tmp_path / "data" / "prepared")
    return tmp_path


def write_params(cfg: Config, path: Path) -> Path:
    """``cfg`` as a params file, for commands run in a subprocess."""
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def git_dvc_repo(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, env=subprocess_env())
    return root


def tiny_project(root: Path, **sections: dict) -> Path:
    """A real pipeline project (git + DVC + dvc.yaml + flows + src) with a micro model;
    ``sections`` update params.yaml's sections."""
    git_dvc_repo(root)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    for folder in ("src", "flows"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["preset"] = "mae_vit_micro_patch4"
    params["pretrain"].update(epochs=1, batch_size=256, warmup_epochs=0)
    params["finetune"].update(epochs=1, batch_size=32, linprobe_epochs=2)
    params["hpo"].update(n_trials=2, epochs=1, startup_trials=1, warmup_epochs=0)
    params["export"].update(quantize=False, max_abs_diff=1e-3)
    for name, values in sections.items():
        params[name].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def load_flow_module(name: str):
    """flows/<name>.py of this repository, loaded from its file."""
    return load_module_file(REPO / "flows" / f"{name}.py", f"flows_{name}")


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


FT = [
    "finetune.epochs=2", "finetune.batch_size=32", "finetune.eval_every=1", "finetune.linprobe_epochs=5",
    "hpo.enabled=false", "hpo.epochs=2", "hpo.n_trials=3", "hpo.startup_trials=1", "hpo.warmup_epochs=1",
]  # fmt: skip


def ft_config(root: Path, *extra: str) -> Config:
    """Tiny fine-tuning settings (search off unless asked), every output under ``root``."""
    return tiny_config(
        root, *FT,
        f"finetune.out_dir={root}/models/finetune", f"finetune.checkpoint_dir={root}/checkpoints/finetune",
        f"finetune.reports_dir={root}/reports/finetune", f"hpo.storage=sqlite:///{root}/optuna/study.db",
        f"hpo.reports_dir={root}/reports/hpo",
        f"hpo.trial_dir={root}/checkpoints/finetune/hpo", f"evaluate.baselines_dir={root}/models/baselines",
        f"evaluate.baselines_reports_dir={root}/reports/baselines", f"evaluate.reports_dir={root}/reports/eval",
        f"evaluate.data_reports_dir={root}/reports/data", f"evaluate.metrics_file={root}/reports/metrics.json", *extra,
    )  # fmt: skip


@pytest.fixture(scope="session")
def pretrained_mnist(tmp_path_factory: pytest.TempPathFactory, prepared_mnist: Path) -> Path:
    """Prepared digits plus a (briefly) pre-trained micro MAE, made once."""
    root = tmp_path_factory.mktemp("pretrained")
    shutil.copytree(prepared_mnist, root / "data" / "prepared")
    pretrain.run(tiny_config(root, "pretrain.epochs=1"))
    return root


@pytest.fixture
def run_root(tmp_path: Path, pretrained_mnist: Path) -> Path:
    for sub in ("data/prepared", "models/pretrain"):
        shutil.copytree(pretrained_mnist / sub, tmp_path / sub)
    return tmp_path


def export_config(root: Path, *extra: str):
    return ft_config(root, f"export.out_dir={root}/models/export", f"export.reports_dir={root}/reports/export",
                     "export.max_int8_drop=1.0", *extra)  # fmt: skip


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, pretrained_mnist: Path) -> Path:
    root = tmp_path_factory.mktemp("export")
    for sub in ("data/prepared", "models/pretrain"):
        shutil.copytree(pretrained_mnist / sub, root / sub)
    finetune.run(ft_config(root, "finetune.epochs=3"))
    export.run(export_config(root))
    return root


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The test PostgreSQL server's URL (.ci/postgres.sh prints one)."""
    url = os.environ.get("MAE_OPS_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("MAE_OPS_REQUIRE_POSTGRES") == "1":
            pytest.fail("MAE_OPS_REQUIRE_POSTGRES=1 but MAE_OPS_TEST_POSTGRES_URL is not set")
        pytest.skip("no PostgreSQL: run .ci/postgres.sh and export MAE_OPS_TEST_POSTGRES_URL")
    return url


def password_free(url: str) -> tuple[str, str | None]:
    """``url`` without its password, and the password: as the README says, workers take it from
    PGPASSWORD, never from params.yaml (which refuses it)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    bare = parsed._replace(password=None).render_as_string(hide_password=False)
    return bare, (str(parsed.password) if parsed.password else None)
