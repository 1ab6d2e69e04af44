"""Issue #15 (robustness): repeated list values, broken or half-written files, the context length,
and inputs that used to end in a traceback; each gives one line `speckv: error: …` (exit 2)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import loaded, tiny_model

from speckv.cli import main
from speckv.costs import CostModel, save_costs
from speckv.datasets import in_split
from speckv.decoding.models import check_context, resolve_device
from speckv.errors import SpecKVError
from speckv.pipeline.evaluation import (
    LIVE_FILE,
    META_FILE,
    REPLAY_FILE,
    EvaluationWriter,
    read_evaluation,
)
from speckv.pipeline.profiling import ProfileSettings, load_traces, read_settings

ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit 2 and one line `speckv: error: …` last on stderr (after any progress bar), no traceback."""
    assert code == 2, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and lines[-1].startswith("speckv: error: "), err
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[-1], err


def write_prompts(path: Path, ids: list[str], words: int = 3) -> Path:
    lines = [
        json.dumps(
            {"id": item, "task": "chat", "prompt": " ".join(f"w{(5 * n + k) % 60 + 2}" for k in range(words))}
        )
        for n, item in enumerate(ids)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_model_dirs):
    """A small profile (2 dev + 2 test prompts, one sweep controller) with a hand-set cost model."""
    root = tmp_path_factory.mktemp("robust")
    ids = [f"chat/{i}" for i in range(100)]
    chosen = [i for i in ids if in_split(i, "dev")][:2] + [i for i in ids if in_split(i, "test")][:2]
    prompts = write_prompts(root / "prompts.jsonl", chosen)
    profile = root / "profile"
    argv = [
        "profile", "--target", tiny_model_dirs["target"], "--draft", tiny_model_dirs["draft"],
        "--prompts", prompts, "--raw", "--max-new-tokens", 10, "--gamma-max", 3,
        "--sweep", "fixed:2", "--out", profile,
    ]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    cost = CostModel("fp32", 0.001, [0.01 + 0.001 * k for k in range(4)], 0.0005)
    save_costs({"fp32": cost}, profile / "cost.json")
    return {"root": root, "profile": profile, "prompts": prompts, "argv": [str(a) for a in argv]}


def copy_profile(pipeline, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(pipeline["profile"], tmp_path / "profile"))


# --- 1. repeated values in list options -------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [("--compression", "fp32,fp32"), ("--sweep", "fixed:2,fixed:2"), ("--tasks", "chat,chat")],
)
def test_profile_rejects_a_repeated_list_value(capsys, tmp_path, tiny_model_dirs, option, value):
    args = ["profile", "--target", tiny_model_dirs["target"], "--draft", tiny_model_dirs["draft"]]
    args += ["--prompts", write_prompts(tmp_path / "p.jsonl", ["chat/0"]), "--raw", "--out", tmp_path / "p"]
    code, _, err = run(capsys, *args, option, value)
    one_line_error(code, err, f"{option} lists", "twice")
    assert not (tmp_path / "p" / "profile.json").exists()


def test_other_commands_reject_repeated_list_values(capsys, tmp_path, pipeline):
    profile = pipeline["profile"]
    for argv, option in [
        (["calibrate", "--profile", profile, "--compression", "fp32,fp32"], "--compression"),
        (["train", "--profile", profile, "--out", tmp_path / "c.json", "--compare", "linear,linear"], "--compare"),
        (["evaluate", "--profile", profile, "--out", tmp_path / "e", "--live-compression", "fp32,fp32"], "--live-compression"),
        (["evaluate", "--profile", profile, "--out", tmp_path / "e", "--live-fixed", "1,2,1"], "--live-fixed"),
        (["evaluate", "--profile", profile, "--out", tmp_path / "e", "--hf-gammas", "2,2"], "--hf-gammas"),
    ]:  # fmt: skip
        code, _, err = run(capsys, *argv)
        one_line_error(code, err, f"{option} lists", "twice")
    assert not (tmp_path / "e").exists()


def test_a_profile_json_with_repeats_is_a_clear_error(capsys, tmp_path, pipeline):
    profile = copy_profile(pipeline, tmp_path)
    document = json.loads((profile / "profile.json").read_text())
    document["settings"]["compressions"] = ["fp32", "fp32"]
    (profile / "profile.json").write_text(json.dumps(document))
    for argv in (
        ["train", "--profile", profile, "--out", tmp_path / "c.json"],
        ["evaluate", "--profile", profile, "--out", tmp_path / "e"],
        [*pipeline["argv"][:-1], profile],  # the profile rerun
    ):
        code, _, err = run(capsys, *argv)
        one_line_error(code, err, "profile.json is damaged", "compressions lists fp32 twice")
    document["settings"]["compressions"] = ["fp32"]
    document["prompts"].append(document["prompts"][0])
    (profile / "profile.json").write_text(json.dumps(document))
    with pytest.raises(SpecKVError, match="prompts lists chat/.* twice"):
        read_settings(profile)
    with pytest.raises(SpecKVError, match="compressions lists fp32 twice"):
        ProfileSettings("t", "d", ("fp32", "fp32"), 8, 4, ())


# --- 2. broken and half-written files ---------------------------------------------------------


def test_a_truncated_replay_file_is_named_then_recorded_again(capsys, tmp_path, pipeline):
    profile = copy_profile(pipeline, tmp_path)
    before = pd.concat([pd.read_parquet(f) for f in sorted((profile / "replay" / "fp32").glob("*.parquet"))])
    victim = sorted((profile / "replay" / "fp32").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    for argv in (
        ["train", "--profile", profile, "--out", tmp_path / "c.json"],
        ["evaluate", "--profile", profile, "--out", tmp_path / "e", "--split", "all"],
    ):
        code, _, err = run(capsys, *argv)
        one_line_error(code, err, str(victim), "rerun the same `speckv profile` command")
    code, out, err = run(capsys, *pipeline["argv"][:-1], profile)
    assert code == 0, err
    assert "1 units recorded, 3 already done" in out
    after = pd.concat([pd.read_parquet(f) for f in sorted((profile / "replay" / "fp32").glob("*.parquet"))])
    pd.testing.assert_frame_equal(before.reset_index(drop=True), after.reset_index(drop=True))
    assert len(load_traces(profile)) == 4


def test_a_broken_step_file_is_recorded_again(capsys, tmp_path, pipeline):
    profile = copy_profile(pipeline, tmp_path)
    victim = sorted((profile / "steps" / "fp32").glob("*.parquet"))[-1]
    victim.write_bytes(b"PAR1 not really")
    code, out, err = run(capsys, *pipeline["argv"][:-1], profile)
    assert code == 0 and "1 units recorded, 3 already done" in out, err
    assert len(pd.read_parquet(victim)) > 0


def test_broken_json_files_are_one_line_errors(capsys, tmp_path, pipeline):
    profile = copy_profile(pipeline, tmp_path)
    (profile / "profile.json").write_text('{"settings": {"target": ')
    code, _, err = run(capsys, "train", "--profile", profile, "--out", tmp_path / "c.json")
    one_line_error(code, err, "profile.json cannot be read")
    code, _, err = run(capsys, *pipeline["argv"][:-1], profile)
    one_line_error(code, err, "profile.json cannot be read")
    (profile / "profile.json").write_text("[1, 2, 3]")
    code, _, err = run(capsys, "train", "--profile", profile, "--out", tmp_path / "c.json")
    one_line_error(code, err, "profile.json is damaged")

    evaluation = tmp_path / "eval"
    with EvaluationWriter(evaluation) as writer:
        writer.write(REPLAY_FILE, pd.DataFrame({"prompt_id": ["a"]}))
        writer.commit({"pair": "x"})
    (evaluation / META_FILE).write_text("{not json")
    code, _, err = run(capsys, "report", "--eval", evaluation)
    one_line_error(code, err, "evaluate.json cannot be read")


def test_a_failed_evaluate_leaves_nothing_report_would_use(capsys, tmp_path, pipeline, monkeypatch):
    import speckv.pipeline.live as live

    def fail(*args, **kwargs):
        raise SpecKVError("the live run failed")

    monkeypatch.setattr(live, "live_evaluation", fail)
    evaluation = tmp_path / "eval"
    argv = ["evaluate", "--profile", pipeline["profile"], "--out", evaluation]
    code, _, err = run(capsys, *argv, "--live")
    one_line_error(code, err, "the live run failed")
    assert sorted(p.name for p in evaluation.iterdir()) == []  # nothing published, no staging left
    code, _, err = run(capsys, "report", "--eval", evaluation)
    one_line_error(code, err, "has no evaluation")

    # A complete evaluation, then a rerun that fails: the complete one is kept whole.
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    record = json.loads((evaluation / META_FILE).read_text())
    code, _, err = run(capsys, *argv, "--live")
    assert code == 2 and json.loads((evaluation / META_FILE).read_text()) == record
    code, _, err = run(capsys, "report", "--eval", evaluation)
    assert code == 0, err

    # Killed midway (an older evaluate, or a kill between the last two steps): no evaluate.json.
    (evaluation / META_FILE).unlink()
    code, _, err = run(capsys, "report", "--eval", evaluation)
    one_line_error(code, err, "incomplete evaluation", "did not finish")


def test_evaluation_files_are_read_back_only_whole(tmp_path):
    out = tmp_path / "eval"
    replay = pd.DataFrame({"prompt_id": ["a", "b"], "tokens": [3, 4]})
    with EvaluationWriter(out) as writer:
        writer.write(REPLAY_FILE, replay)
        writer.write(LIVE_FILE, pd.DataFrame({"method": ["fixed:1"]}))
        writer.commit({"pair": "p"})
    assert read_evaluation(out).live is not None
    with EvaluationWriter(out) as writer:  # a rerun without live runs drops the old live.csv
        writer.write(REPLAY_FILE, replay)
        writer.commit({"pair": "p"})
    evaluation = read_evaluation(out)
    assert evaluation.live is None and not (out / LIVE_FILE).exists()
    pd.testing.assert_frame_equal(evaluation.replay, replay)
    assert evaluation.meta["pair"] == "p"
    pd.DataFrame({"prompt_id": ["other"], "tokens": [1]}).to_parquet(out / REPLAY_FILE)
    with pytest.raises(SpecKVError, match="differs from what `speckv evaluate` wrote"):
        read_evaluation(out)
    (out / META_FILE).write_text(json.dumps({"pair": "p"}))  # written by an older speckv
    with pytest.raises(SpecKVError, match="not a version-1 evaluation record"):
        read_evaluation(out)
    stale = out / f".evaluate-{2**22 + 12345}-x"  # a staging folder of a process that is gone
    stale.mkdir()
    EvaluationWriter(out).discard()
    assert not stale.exists()


# --- 4. context length ------------------------------------------------------------------------


def test_check_context_names_the_numbers(tiny_target):
    check_context(tiny_target, None, 500, 12)  # 512 positions: fits exactly
    with pytest.raises(SpecKVError, match=r"500 tokens \+ 13 new tokens = 513 .* target's context of 512"):
        check_context(tiny_target, None, 500, 13)
    short = tiny_model(seed=9)
    short.config.max_position_embeddings = 64
    with pytest.raises(SpecKVError, match="draft's context of 64 tokens"):
        check_context(tiny_target, loaded(short, "short"), 60, 8)


def test_generate_checks_every_prompt_before_decoding(capsys, tmp_path, tiny_model_dirs):
    prompts = tmp_path / "p.jsonl"
    lines = [{"id": "chat/short", "task": "chat", "prompt": "w3 w4"}]
    lines.append({"id": "chat/long", "task": "chat", "prompt": " ".join(["w5"] * 505)})
    prompts.write_text("\n".join(json.dumps(line) for line in lines))
    models = ["--target", tiny_model_dirs["target"], "--draft", tiny_model_dirs["draft"]]
    code, out, err = run(
        capsys, "generate", *models, "--prompts", prompts, "--split", "all", "--raw", "--max-new-tokens", 16
    )
    one_line_error(code, err, "chat/long", "505 tokens + 16 new tokens = 521", "context of 512")
    assert out == ""  # not even the short prompt was decoded


def test_profile_checks_the_context_before_recording(capsys, tmp_path, tiny_model_dirs):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "chat/long", "task": "chat", "prompt": " ".join(["w5"] * 505)}))
    argv = ["profile", "--target", tiny_model_dirs["target"], "--draft", tiny_model_dirs["draft"]]
    argv += [
        "--prompts",
        prompts,
        "--raw",
        "--max-new-tokens",
        16,
        "--sweep",
        "none",
        "--out",
        tmp_path / "p",
    ]
    code, _, err = run(capsys, *argv)
    one_line_error(code, err, "= 521 tokens exceeds the target's context of 512")
    assert not (tmp_path / "p" / "replay").exists()


# --- 6. inputs that used to end in a traceback ------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_generate_rejects_a_non_finite_temperature(capsys, tiny_model_dirs, value):
    code, _, err = run(
        capsys,
        "generate",
        "--target",
        tiny_model_dirs["target"],
        "--no-draft",
        "--prompt",
        "w3",
        f"--temperature={value}",
    )
    one_line_error(code, err, "--temperature must be a finite number")


def test_bad_device_names(capsys, tiny_model_dirs):
    for device in ("cpu:abc", "cuda:x", "tpu", "cpu:"):
        with pytest.raises(SpecKVError):
            resolve_device(device)
    assert resolve_device("cpu:0") == torch.device("cpu:0")
    code, _, err = run(
        capsys,
        "generate",
        "--target",
        tiny_model_dirs["target"],
        "--no-draft",
        "--prompt",
        "w3",
        "--device",
        "cpu:abc",
    )
    one_line_error(code, err, "unknown device 'cpu:abc'")


@pytest.mark.parametrize(
    "document",
    [
        {"format": "speckv-controller", "version": 1},
        [1, 2, 3],
        "text",
        {
            "format": "speckv-controller",
            "version": 1,
            "compressions": ["fp32"],
            "gamma_max": 4,
            "token_model": 3,
        },
    ],
)
def test_a_controller_file_of_the_wrong_shape(capsys, tmp_path, tiny_model_dirs, document):
    path = tmp_path / "ctrl.json"
    path.write_text(json.dumps(document))
    code, _, err = run(
        capsys,
        "generate",
        "--target", tiny_model_dirs["target"], "--draft", tiny_model_dirs["draft"],
        "--prompt", "w3", "--controller", f"speckv:{path}",
    )  # fmt: skip
    one_line_error(code, err, str(path))


def test_a_shipped_controller_with_inconsistent_models(tmp_path):
    from speckv.controllers.speckv import SHIPPED, ControllerModels

    document = json.loads(SHIPPED.read_text())
    document["prior_model"] = document["token_model"]  # takes the token features, not the context ones
    path = tmp_path / "ctrl.json"
    path.write_text(json.dumps(document))
    with pytest.raises(SpecKVError, match="not a valid SpecKV controller file.*prior model"):
        ControllerModels.load(path)


@pytest.mark.parametrize(
    ("manifest", "config"),
    [
        ({"weights": "draft.safetensors"}, "not json"),
        ({"weights": "draft.safetensors"}, "{}"),
        ({"weights": "draft.safetensors"}, '{"model_type": "llama", "hidden_size": "wide"}'),
        (
            {"weights": "draft.safetensors"},
            '{"model_type": "llama", "hidden_size": 32, "num_attention_heads": 5}',
        ),
        ({"weights": "draft.safetensors"}, None),  # valid config, weights missing
        ([1, 2], None),
        ({}, '{"model_type": "llama", "hidden_size": 32, "num_attention_heads": 5}'),
    ],
)
def test_a_draft_with_an_invalid_config(capsys, tmp_path, tiny_model_dirs, manifest, config):
    import shutil

    draft = Path(shutil.copytree(tiny_model_dirs["draft"], tmp_path / "draft"))
    (draft / "speckv_draft.json").write_text(json.dumps(manifest))
    if config is not None:
        (draft / "config.json").write_text(config)
    code, _, err = run(
        capsys, "generate", "--target", tiny_model_dirs["target"], "--draft", draft, "--prompt", "w3"
    )
    one_line_error(code, err, "draft")


def test_out_under_an_existing_file(capsys, tmp_path, pipeline):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with EvaluationWriter(tmp_path / "eval") as writer:
        writer.write(REPLAY_FILE, pd.DataFrame({"prompt_id": ["a"]}))
        writer.commit({})
    for argv, needle in (
        (["evaluate", "--profile", pipeline["profile"], "--out", blocker / "eval"], f"{blocker} is a file"),
        (["evaluate", "--profile", pipeline["profile"], "--out", blocker], f"{blocker} is a file"),
        (["train", "--profile", pipeline["profile"], "--out", blocker / "ctrl.json"], f"{blocker} is a file"),
        (["train", "--profile", pipeline["profile"], "--out", tmp_path], f"{tmp_path} is a folder"),
        (["report", "--eval", tmp_path / "eval", "--out", blocker / "r"], f"{blocker} is a file"),
        (
            ["calibrate", "--profile", pipeline["profile"], "--out", blocker / "cost.json"],
            f"{blocker} is a file",
        ),
        ([*pipeline["argv"][:-1], blocker / "p"], f"{blocker} is a file"),
    ):
        code, _, err = run(capsys, *argv)
        one_line_error(code, err, needle)


class ClosedPipe(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_stdout_exits_quietly(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["datasets", "list"]) == 1
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("action", ["list", "show"])
def test_speckv_piped_into_a_reader_that_closes(tmp_path, action):
    """`speckv datasets … | head -1`: the reader is gone before speckv writes; no traceback."""
    prompts = write_prompts(tmp_path / "p.jsonl", [f"chat/{i}" for i in range(500)])
    argv = ["list"] if action == "list" else ["show", str(prompts), "--split", "all", "--limit", "500"]
    env = {**os.environ, "SPECKV_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [sys.executable, "-m", "speckv", "datasets", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    process.stdout.close()  # like `head -1` after its line, but before anything is written
    err = process.stderr.read().decode()
    process.stderr.close()
    assert process.wait(timeout=60) == 1
    assert err == ""


def test_dataclass_replace_keeps_validation():
    settings = ProfileSettings("t", "d", ("fp32",), 8, 4, ("fixed:2",))
    with pytest.raises(SpecKVError, match="sweep lists fixed:2 twice"):
        dataclasses.replace(settings, sweep=("fixed:2", "fixed:2"))
