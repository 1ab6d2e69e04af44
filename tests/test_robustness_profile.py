"""Fault injection for `speckv profile`: a run stopped at a random write (an exception, a file
half written, a file damaged after it was written, a SIGKILL), then resumed, holds exactly the
records of an uninterrupted run: none lost, none duplicated, no temporary file left."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import loaded, perturbed_copy

import speckv.pipeline.profiling as profiling
from speckv.pipeline.profiling import ProfilePrompt, ProfileSettings, load_steps, load_traces, run_profile
from speckv.pipeline.replay import trace_to_frame

PROMPTS = [(7, 3, 9, 11, 2), (5,), (4, 8, 15, 16, 23, 42), (30, 31)]
LEVELS = ("fp32", "bf16")  # the same tiny model under two labels: two levels of files
SETTINGS = ProfileSettings("tiny", "mixed", LEVELS, 10, 3, ("fixed:2", "heuristic"))
WRITES = 1 + 2 * len(PROMPTS) * len(LEVELS)  # profile.json, then a replay and a steps file per unit


class Injected(BaseException):
    """Stands for a kill: nothing in the code under test catches it."""


@pytest.fixture(scope="module")
def pair(tiny_target):
    draft = loaded(perturbed_copy(tiny_target.model, seed=2, noise=0.004), "mixed")
    return {level: (dataclasses.replace(tiny_target, compression=level), draft) for level in LEVELS}


@pytest.fixture(scope="module")
def prompts():
    return [ProfilePrompt(f"chat/{i}", "chat", p) for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pair, prompts):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert run_profile(out, SETTINGS, prompts, pair.__getitem__, progress=False)["recorded"] == 8
    return records(out)


def records(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every replay row and every step record, wall-clock timings left out (they differ per run)."""
    replay = pd.concat([trace_to_frame(t) for t in load_traces(out)], ignore_index=True)
    steps = load_steps(out)
    timing = [c for c in steps.columns if "time" in c]
    steps = steps.drop(columns=timing).sort_values(["compression", "prompt_id", "controller", "step"])
    return replay, steps.reset_index(drop=True)


def assert_same_records(out: Path, reference) -> None:
    replay, steps = records(out)
    pd.testing.assert_frame_equal(replay, reference[0])
    pd.testing.assert_frame_equal(steps, reference[1])
    assert not steps.duplicated(["compression", "prompt_id", "controller", "step"]).any()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def failing_writer(real, k: int, mode: str, calls: list):
    """`real` (atomic_write), but the k-th call is stopped: before writing, with the temporary
    file half written and left behind (as SIGKILL leaves it), or after its file was renamed in
    place and then damaged."""

    def write(path, fill):
        calls.append(path)
        if len(calls) != k:
            return real(path, fill)
        path = Path(path)
        if mode == "half-written":
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.99999-dead.tmp")
            fill(tmp)
            tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
        elif mode == "damaged":
            real(path, fill)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        raise Injected(f"stopped at write {k} of {path.name}")

    return write


@pytest.mark.parametrize("seed", range(6))
def test_profile_stopped_at_a_random_write_resumes_to_the_same_records(
    tmp_path, monkeypatch, pair, prompts, reference, seed
):
    k = random.Random(seed).randint(1, WRITES)
    mode = ("before", "half-written", "damaged")[seed % 3]
    with monkeypatch.context() as patch:
        patch_writes(patch, k, mode, [])
        with pytest.raises(Injected):
            run_profile(tmp_path, SETTINGS, prompts, pair.__getitem__, progress=False)
    writes = []
    with monkeypatch.context() as patch:
        patch_writes(patch, 0, mode, writes)
        counts = run_profile(tmp_path, SETTINGS, prompts, pair.__getitem__, progress=False)
    # Units whose two files were written before the stop are kept; from the stopped write on
    # everything is written again (profile.json too), and nothing before it.
    done = (k - 2) // 2 if k > 1 else 0
    assert counts == {"recorded": len(PROMPTS) * len(LEVELS) - done, "skipped": done}
    assert len(writes) == (WRITES if k == 1 else WRITES - k + 2)
    assert_same_records(tmp_path, reference)
    assert run_profile(tmp_path, SETTINGS, prompts, pair.__getitem__, progress=False) == {
        "recorded": 0,
        "skipped": len(PROMPTS) * len(LEVELS),
    }


def patch_writes(patch, k: int, mode: str, calls: list) -> None:
    """Route every file write of the profile (profile.json included) through `failing_writer`."""
    writer = failing_writer(profiling.atomic_write, k, mode, calls)
    patch.setattr(profiling, "atomic_write", writer)
    patch.setattr(profiling, "atomic_write_text", lambda p, text: writer(p, lambda t: t.write_text(text)))


@pytest.mark.parametrize("seed", range(3))
def test_a_file_truncated_between_runs_is_recorded_again(tmp_path, pair, prompts, reference, seed):
    run_profile(tmp_path, SETTINGS, prompts, pair.__getitem__, progress=False)
    files = sorted(tmp_path.glob("replay/*/*.parquet")) + sorted(tmp_path.glob("steps/*/*.parquet"))
    victim = random.Random(seed).choice(files)
    victim.write_bytes(victim.read_bytes()[: random.Random(seed).randint(0, victim.stat().st_size - 1)])
    assert run_profile(tmp_path, SETTINGS, prompts, pair.__getitem__, progress=False) == {
        "recorded": 1,
        "skipped": len(PROMPTS) * len(LEVELS) - 1,
    }
    assert_same_records(tmp_path, reference)


KILLED_RUN = """
import sys
sys.path.insert(0, sys.argv[2])
import dataclasses, torch
from conftest import loaded, perturbed_copy, tiny_model
from test_robustness_profile import LEVELS, PROMPTS, SETTINGS
from speckv.pipeline.profiling import ProfilePrompt, run_profile
torch.set_num_threads(1)
target = loaded(tiny_model(seed=0, head_scale=20.0), "target")
draft = loaded(perturbed_copy(target.model, seed=2, noise=0.004), "mixed")
pair = {level: (dataclasses.replace(target, compression=level), draft) for level in LEVELS}
prompts = [ProfilePrompt(f"chat/{i}", "chat", p) for i, p in enumerate(PROMPTS)]
run_profile(sys.argv[1], SETTINGS, prompts, pair.__getitem__, progress=False)
print("done", flush=True)
"""


def test_profile_killed_by_sigkill_resumes_to_the_same_records(tmp_path, pair, prompts, reference):
    """Real SIGKILLs at random moments of two runs (the models of conftest, built the same way in
    the child), then a resume: each kill lands after a random number of files were written."""
    out = tmp_path / "profile"
    rng = random.Random(7)
    total = 2 * len(PROMPTS) * len(LEVELS)
    for files in sorted(rng.sample(range(1, total), 2)):
        process = subprocess.Popen(
            [sys.executable, "-c", KILLED_RUN, str(out), str(Path(__file__).parent)],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while len(list(out.glob("*/*/*.parquet"))) < files and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.03))  # sometimes within the next unit's write
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    counts = run_profile(out, SETTINGS, prompts, pair.__getitem__, progress=False)
    assert counts["recorded"] > 0 and counts["recorded"] + counts["skipped"] == total // 2
    assert_same_records(out, reference)


def test_one_profile_process_per_directory(tmp_path, pair, prompts):
    from filelock import FileLock

    from speckv.errors import SpecKVError

    with (
        FileLock(tmp_path / profiling.LOCK_FILE),
        pytest.raises(SpecKVError, match="another `speckv profile`"),
    ):
        run_profile(tmp_path, SETTINGS, prompts, pair.__getitem__, progress=False)
    assert not (tmp_path / "profile.json").exists()
    twice = [*prompts, prompts[0]]
    with pytest.raises(SpecKVError, match="prompts lists chat/0 twice"):
        run_profile(tmp_path, SETTINGS, twice, pair.__getitem__, progress=False)
