"""The output of `speckv evaluate`: its files, written as a set and read back whole.

An evaluation directory holds (names defined here only, for the writer and every reader):

- `replay.parquet`: one row per (compression, prompt, policy) of the replay (speckv.pipeline.scoring);
- `consistency.csv`: the profile's live step records replayed (only when the profile ran a sweep);
- `live.csv`: the live runs (only with `--live`; speckv.pipeline.live);
- `evaluate.json`: the settings, and every file above with its size and SHA-256, written last.

`EvaluationWriter` stages the files in a hidden folder inside the directory and moves them in
place only when the evaluation has finished, then writes evaluate.json: a run that fails or is
killed leaves the previous complete evaluation (or none), never a mix. `read_evaluation` accepts
only a directory whose evaluate.json lists files that are all there, unchanged, and readable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from speckv.errors import SpecKVError
from speckv.util.files import atomic_write_text, check_output_path, read_json

REPLAY_FILE = "replay.parquet"
CONSISTENCY_FILE = "consistency.csv"
LIVE_FILE = "live.csv"
META_FILE = "evaluate.json"
DATA_FILES = (REPLAY_FILE, CONSISTENCY_FILE, LIVE_FILE)
REPORT_DIR = "report"  # `speckv report`'s default folder inside an evaluation
FILE_FORMAT = "speckv-evaluation"
FILE_VERSION = 1
_STAGING = ".evaluate-"


@dataclass
class Evaluation:
    """A complete evaluation as read back: settings and tables (None where not made)."""

    directory: Path
    meta: dict
    replay: pd.DataFrame
    consistency: pd.DataFrame | None
    live: pd.DataFrame | None


class EvaluationWriter:
    """Collects one evaluation's files; `commit(meta)` publishes them as a set.

    Use as a context manager: leaving it with an exception (or without commit) discards the
    staged files and leaves the directory as it was.
    """

    def __init__(self, out: str | Path):
        self.out = check_output_path(out, "--out", directory=True)
        self.out.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(self.out)
        self._staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{os.getpid()}-", dir=self.out))
        self._files: dict[str, dict] = {}

    def __enter__(self) -> EvaluationWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def write(self, name: str, frame: pd.DataFrame) -> None:
        if name not in DATA_FILES:
            raise ValueError(f"not an evaluation file: {name}")
        path = self._staging / name
        if name.endswith(".parquet"):
            frame.to_parquet(path, index=False)
        else:
            frame.to_csv(path, index=False)
        self._files[name] = _fingerprint(path)

    def commit(self, meta: dict) -> Path:
        """Move the staged files in place (dropping those of an earlier run not made now), then
        write evaluate.json listing them; returns the directory."""
        if REPLAY_FILE not in self._files:
            raise ValueError(f"an evaluation needs {REPLAY_FILE}")
        (self.out / META_FILE).unlink(missing_ok=True)  # incomplete from here to the last line
        for name in DATA_FILES:
            if name in self._files:
                os.replace(self._staging / name, self.out / name)
            else:
                (self.out / name).unlink(missing_ok=True)
        document = {"format": FILE_FORMAT, "version": FILE_VERSION, **meta, "files": self._files}
        atomic_write_text(self.out / META_FILE, json.dumps(document, indent=1))
        self.discard()
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)


def read_evaluation(eval_dir: str | Path) -> Evaluation:
    """A complete evaluation, or one line saying what is missing, incomplete or damaged."""
    directory = Path(eval_dir)
    rerun = f"run `speckv evaluate --out {directory}`"
    if not directory.is_dir():
        raise SpecKVError(f"{directory} is not an evaluation folder; {rerun} first")
    meta_path = directory / META_FILE
    if not meta_path.exists():
        if any((directory / name).exists() for name in DATA_FILES):
            raise SpecKVError(
                f"{directory} holds an incomplete evaluation (no {META_FILE}: `speckv evaluate` did not finish); "
                f"{rerun} again"
            )
        raise SpecKVError(f"{directory} has no evaluation ({META_FILE}, {REPLAY_FILE}); {rerun} first")
    meta = read_json(meta_path, "evaluation settings")
    if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT or meta.get("version") != FILE_VERSION:
        raise SpecKVError(
            f"{meta_path} is not a version-{FILE_VERSION} evaluation record (an older speckv, or damaged); "
            f"{rerun} again"
        )
    files = meta.get("files")
    if not isinstance(files, dict) or REPLAY_FILE not in files or not set(files) <= set(DATA_FILES):
        raise SpecKVError(f"{meta_path} does not list the evaluation's files; {rerun} again")
    for name, expected in files.items():
        path = directory / name
        if not path.is_file() or _fingerprint(path) != expected:
            raise SpecKVError(
                f"{path} is missing or differs from what `speckv evaluate` wrote (incomplete or changed); "
                f"{rerun} again"
            )
    tables = {name: _read_table(directory / name) if name in files else None for name in DATA_FILES}
    return Evaluation(
        directory=directory,
        meta=meta,
        replay=tables[REPLAY_FILE],
        consistency=tables[CONSISTENCY_FILE],
        live=tables[LIVE_FILE],
    )


def _read_table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as error:  # pyarrow and pandas raise several types for a damaged file
        text = str(error).strip()
        raise SpecKVError(
            f"{path} cannot be read ({text.splitlines()[0] if text else type(error).__name__})"
        ) from None


def _fingerprint(path: Path) -> dict:
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def _remove_stale_staging(out: Path) -> None:
    """Staging folders of evaluate runs that were killed (their process is gone)."""
    for folder in out.glob(f"{_STAGING}*"):
        pid = folder.name[len(_STAGING) :].partition("-")[0]
        if folder.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
