"""`speckv tune` end to end on a tiny pair: it profiles, measures, trains and compares from
scratch, resumes without redoing a stage, and writes a controller that `generate` uses."""

from __future__ import annotations

import json

import pytest

from speckv.cli import main
from speckv.pipeline import tune as tune_module


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"id": f"mine-{i}", "prompt": " ".join(f"w{(i * 7 + j) % 50 + 3}" for j in range(6))}
        for i in range(40)
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def test_tune_fits_a_controller_that_generate_uses(
    tiny_model_dirs, prompt_file, tmp_path, capsys, monkeypatch
):
    target, draft = str(tiny_model_dirs["target"]), str(tiny_model_dirs["draft"])
    out = tmp_path / "tuned"
    argv = ["tune", "--target", target, "--draft", draft, "--out", str(out), "--prompts", str(prompt_file)]
    argv += ["--compression", "fp32", "--fit-per-task", "6", "--test-per-task", "2", "--max-new-tokens", "12"]
    argv += ["--gamma-max", "4", "--fixed", "1,3", "--repeats", "1", "--threads", "1"]
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert (
        "SpecKV / best fixed =" in summary and "| fixed γ=3 |" in summary and "| SpecKV (tuned) |" in summary
    )
    assert "equal the target-only output in every row" in summary
    assert (out / "summary.md").read_text().strip() == summary.strip()
    comparison = json.loads((out / "comparison.json").read_text())
    assert [row["method"] for row in comparison["rows"]] == [
        "target only",
        "fixed γ=1",
        "fixed γ=3",
        "SpecKV (tuned)",
    ]
    assert len(comparison["prompts"]) == 2  # the test split's own prompts, never fitted on
    assert not set(comparison["prompts"]) & {
        p["id"] for p in json.loads((out / "profile/profile.json").read_text())["prompts"]
    }

    # generate plans with the tuned controller; greedy output stays the target's own
    controller = out / "controller.json"
    base = [
        "generate",
        "--target",
        target,
        "--compression",
        "fp32",
        "--prompt",
        "w5 w6 w7",
        "--raw",
        "--json",
    ]
    assert (
        main([*base, "--draft", draft, "--controller", f"speckv:{controller}", "--max-new-tokens", "10"]) == 0
    )
    tuned = json.loads(capsys.readouterr().out)
    assert tuned["config"]["controller"] == "speckv" and tuned["config"]["costs"].startswith("cached")
    assert main([*base, "--no-draft", "--max-new-tokens", "10"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == tuned["token_ids"]

    # a rerun resumes: nothing is profiled, trained or compared again
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(tune_module, "train_controller", must_not_run)
    monkeypatch.setattr(tune_module, "compare", must_not_run)
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == summary.strip()
    # other settings in the same folder are refused, naming what changed
    assert main([*argv, "--repeats", "2"]) == 2  # the last --repeats wins
    assert "tuned with other settings (repeats)" in capsys.readouterr().err


def test_tune_says_what_is_missing(tmp_path, capsys):
    assert main(["tune", "--out", str(tmp_path / "x")]) == 2
    assert "--target SRC --draft SRC, or --demo" in capsys.readouterr().err
    assert main(["tune", "--target", "t", "--out", str(tmp_path / "x")]) == 2
    assert "needs --draft SRC" in capsys.readouterr().err
    assert main(["tune", "--demo", "--fixed", "2,2", "--out", str(tmp_path / "x")]) == 2
    assert "distinct" in capsys.readouterr().err
