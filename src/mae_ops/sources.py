"""Where the images come from: the embedded digits or the user's folders, and the
checks that can be made before anything is decoded, written or removed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mae_ops.config import EMBEDDED_SOURCES, DataConfig, InputError

SPLIT_DIR_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


class DataSourceError(InputError):
    """The configured data source cannot be used (missing folder, no classes, ...)."""


def class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_dirs(source: Path) -> dict[Path, str]:
    """train/ [val/] test/ folders of an ImageFolder source, by split name."""
    return {d: SPLIT_DIR_NAMES[d.name.lower()] for d in class_dirs(source) if d.name.lower() in SPLIT_DIR_NAMES}


def check_sources(d: DataConfig) -> list[str]:
    """The class names of ``data.source``, or a DataSourceError naming the key:
    folders that exist, split folders with a train/, at least two classes.
    Cheap (lists folders, reads no image), so it runs before anything is written."""
    for extra in d.unlabeled_dirs:
        if not Path(extra).is_dir():
            raise DataSourceError(f"data.unlabeled_dirs: folder not found: {extra}")
    if d.source in EMBEDDED_SOURCES:
        return [str(i) for i in range(10)]
    source = Path(d.source)
    if not source.is_dir():
        raise DataSourceError(f"data.source: folder not found: {source} (or use {EMBEDDED_SOURCES[0]!r})")
    splits = split_dirs(source)
    if splits and "train" not in splits.values():
        raise DataSourceError(f"data.source: {source} has split folders but no train/ folder")
    classes = sorted({c.name for root in (splits or [source]) for c in class_dirs(root)})
    if not classes:
        raise DataSourceError(
            f"data.source: {source} has no class sub-folders; expected <class>/<image> "
            "(unlabeled folders go in data.unlabeled_dirs)"
        )
    if len(classes) < 2:
        raise DataSourceError(
            f"data.source: {source} has one class ({classes[0]!r}): a classifier needs at least two class "
            "folders (images of a single kind can go in data.unlabeled_dirs for pre-training)"
        )
    return classes


def source_folders(d: DataConfig) -> list[Path]:
    """The folders the images come from (the embedded set, inside a pinned package, has none)."""
    return [Path(p) for p in ([] if d.source in EMBEDDED_SOURCES else [d.source]) + list(d.unlabeled_dirs)]


def rooted(repo: Path, folder: Path) -> Path:
    """A folder as DVC sees it: relative folders are relative to the project, where DVC runs."""
    return (repo / folder).resolve()  # an absolute folder stays itself


def rooted_data(repo: Path, d: DataConfig) -> DataConfig:
    """``d`` with its image folders rooted at the project (the embedded source stays a name)."""
    source = d.source if d.source in EMBEDDED_SOURCES else str(rooted(repo, Path(d.source)))
    extra = [str(rooted(repo, Path(u))) for u in d.unlabeled_dirs]
    return d.model_copy(update={"source": source, "unlabeled_dirs": extra})


def dep_path(repo: Path, folder: Path) -> str:
    """How dvc.yaml names a folder: relative inside the project, absolute outside it."""
    path = rooted(repo, folder)
    try:
        return path.relative_to(repo.resolve()).as_posix()
    except ValueError:
        return str(path)


def listed_source_deps(deps: list) -> list[str]:
    """The deps of `prepare` that are image folders (everything but the code under src/)."""
    return [d for d in deps if isinstance(d, str) and not d.startswith("src/")]


def dvc_stages(repo: Path) -> dict[str, Any]:
    """dvc.yaml's stages by name: the one place that says which stage needs which."""
    return (yaml.safe_load((repo / "dvc.yaml").read_text()) or {}).get("stages", {})


def missing_source_deps(repo: Path, d: DataConfig) -> list[str]:
    """Source folders of ``d`` that dvc.yaml does not list as deps of `prepare`."""
    deps = dvc_stages(repo).get("prepare", {}).get("deps", [])
    listed = {dep_path(repo, Path(p)) for p in listed_source_deps(deps)}
    return [p for p in (dep_path(repo, f) for f in source_folders(d)) if p not in listed]
