"""The README quotes results only through blocks that benchmarks/figures.py writes from the committed JSON."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from mae_ops.orchestration import load_module_file
from tests.conftest import REPO

figures = load_module_file(REPO / "benchmarks" / "figures.py", "mae_ops_figures")


QUOTED = ("reports", "benchmarks/results", "README.md")  # the results README is in benchmarks/results


def _copy(tmp: Path) -> Path:
    """The README and the results it quotes, as committed: running the pipeline in this
    checkout (README command 1, then the tests) rewrites reports/ with its own timings."""
    (tmp / "benchmarks").mkdir(exist_ok=True)
    archive = subprocess.run(["git", "archive", "HEAD", *QUOTED], cwd=REPO, capture_output=True)
    if archive.returncode == 0:
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
    else:  # not a git checkout: the files as they are
        for rel in QUOTED:
            (shutil.copytree if (REPO / rel).is_dir() else shutil.copy)(REPO / rel, tmp / rel)
    return tmp


def test_every_generated_block_agrees_with_its_results(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    assert figures.check(root) == [], "run `python benchmarks/figures.py` and commit the result"
    used = {m.group("name") for doc in figures.DOCS for m in figures.BLOCK.finditer((root / doc).read_text())}
    assert used == set(figures.BLOCKS)  # every block is quoted, every quote has a block


def test_a_number_edited_by_hand_or_a_changed_result_is_caught(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    readme = (root / "README.md").read_text()
    demo = re.search(r"<!-- figures:demo -->\n(.*?)<!-- /figures:demo -->", readme, re.S)
    edited = demo.group(1).replace("**", "** 1", 1)  # a digit slipped into the quoted accuracy
    (root / "README.md").write_text(readme.replace(demo.group(1), edited))
    assert figures.check(root) == ["README.md: demo"]
    (root / "README.md").write_text(readme)
    assert figures.check(root) == []
    metrics = json.loads((root / "reports/metrics.json").read_text())
    metrics["finetune"]["top1"] = 0.5  # a new run's result, the README not regenerated
    (root / "reports/metrics.json").write_text(json.dumps(metrics))
    assert figures.check(root) == ["README.md: demo"]
