"""Per-epoch metrics through DVCLive, DVC's own logger: `dvc exp show`, `dvc plots` and
the VS Code DVC extension read them while a run goes on (one TSV per metric under
``<reports>/live/plots/metrics/``, the latest values in ``<reports>/live/metrics.json``).

The stage's history (in its checkpoint, and history.csv at the end) stays the record:
a resumed run starts the live folder again from it, so the live files never hold an
epoch twice. dvc.yaml declares the folder; DVCLive is told not to write a dvc.yaml of
its own nor to save experiments (`dvc exp run` does that).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

LIVE_DIR = "live"  # under a stage's reports_dir


def live_dir(reports_dir: str | Path) -> Path:
    return Path(reports_dir) / LIVE_DIR


class EpochLog:
    """One ``log(record)`` per epoch; ``record['epoch']`` is the step."""

    def __init__(self, reports_dir: str | Path, past: list[dict[str, Any]] = ()) -> None:
        self._live = _files_only()(str(live_dir(reports_dir)), dvcyaml=False, save_dvc_exp=False, report=None)
        for record in past:  # what a resumed run did before: the live files match the history
            self.log(record)

    def log(self, record: dict[str, Any]) -> None:
        self._live.step = int(record["epoch"])
        for key, value in record.items():
            if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                self._live.log_metric(key, value)
        self._live.next_step()

    def close(self) -> None:
        self._live.end()


@functools.cache
def _files_only() -> type:
    """DVCLive's ``Live`` writing its files and nothing else. Its own repository set-up is
    left out: DVC runs the stage (`dvc repro`, `dvc exp run`) and versions the files dvc.yaml
    declares, while that set-up runs `dvc init` in a git repository without DVC and fails
    in one without commits."""
    from dvclive import Live

    class FilesOnly(Live):
        def _init_dvc(self) -> None:
            self._save_dvc_exp = False
            self._dvc_file = "dvc.yaml"

    return FilesOnly
