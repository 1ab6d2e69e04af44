"""One header for every section of benchmarks/RESULTS.md: machine, threads, torch, level, date, command.

Every benchmark script writes its section through `write_section`, which puts the same header
line under the section's title and hands the text to `write_results_section`. The header is a
pure function of a dict (`format_header`); `run_info` collects that dict on this machine.
"""

from __future__ import annotations

import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

from speckv.costs import CPU_FLAGS, parse_cpuinfo
from speckv.pipeline.compare import write_results_section

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
# Sections below this line are written by hand; new generated sections go above it.
HAND_WRITTEN = "<!-- hand-written: no script writes the sections below -->"


def default_command(argv: list[str] | None = None) -> str:
    """`python <script relative to the repository> <arguments>`, shell-quoted."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    shown = script.relative_to(REPO).as_posix() if script.is_relative_to(REPO) else argv[0]
    return "python " + shlex.join([shown, *argv[1:]])


def run_info(
    *, level: str | None = None, threads: int | str | None = None, command: str | None = None
) -> dict:
    """The header's fields on this machine, now (threads default: torch's current setting)."""
    import torch

    try:
        model, flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        model, flags = None, []
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "flags": flags,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads() if threads is None else threads,
        "torch": torch.__version__,
        "level": level,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": command or default_command(),
    }


def format_header(info: dict) -> str:
    """The header line: the same fields, in the same order, for every section."""
    flags = " ".join(info["flags"]) or "none of " + "/".join(CPU_FLAGS)
    return (
        f"> Run {info['date']} (UTC) · CPU {info['cpu']} ({flags}) · GPU {info['gpu'] or 'none'} · "
        f"threads {info['threads']} · torch {info['torch']} · level {info['level'] or 'n/a'} · "
        f"`{info['command']}`"
    )


def with_header(body: str, header: str) -> str:
    """`body` with `header` as its own paragraph under its first line when that is a heading."""
    body = body.strip()
    title, _, rest = body.partition("\n")
    parts = [title, header, rest.strip()] if title.startswith("#") else [header, body]
    return "\n\n".join(part for part in parts if part) + "\n"


def write_section(
    name: str,
    body: str,
    *,
    level: str | None = None,
    threads: int | str | None = None,
    command: str | None = None,
    path: Path = RESULTS,
    write: bool = True,
) -> str:
    """Section `name` of RESULTS.md = `body` with the run header; returns the text (written if `write`).

    A new section goes above the hand-written part, so that stays last.
    """
    text = with_header(body, format_header(run_info(level=level, threads=threads, command=command)))
    if write:
        current = path.read_text() if path.exists() else ""
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start not in current and HAND_WRITTEN in current:
            at = current.index(HAND_WRITTEN)
            path.write_text(f"{current[:at]}{start}\n{end}\n\n{current[at:]}")
        write_results_section(path, name, text)
    return text
