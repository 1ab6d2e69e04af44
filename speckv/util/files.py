"""Writing files so that a reader (or a rerun after a kill) sees the old file or the new one, never
half; reading small JSON files and checking output paths with one-line errors."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from speckv.errors import SpecKVError

TMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a sibling temporary path, then rename it over `path`.

    The temporary name is unique (two writers never share one) and ends in `.tmp`, so readers
    that look for `*.parquet`, `*.json`… never see it; it is removed when `write` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: str | Path, what: str = "file") -> object:
    """A JSON document, or one line saying why it cannot be read (missing, damaged, not JSON)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecKVError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SpecKVError(f"{what} {path} cannot be read ({reason})") from None


def check_output_path(path: str | Path, option: str = "--out", directory: bool = False) -> Path:
    """Fail with one line when `path` cannot be written: a file where a folder is needed on the
    way, or (for a file output) an existing folder, or (for a folder output) an existing file."""
    path = Path(path).expanduser()
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SpecKVError(f"{option} {path}: {parent} is a file, not a folder")
            break
    if directory and path.exists() and not path.is_dir():
        raise SpecKVError(f"{option} {path} is a file; give a folder")
    if not directory and path.is_dir():
        raise SpecKVError(f"{option} {path} is a folder; give a file name")
    return path
