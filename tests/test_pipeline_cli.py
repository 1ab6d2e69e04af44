"""profile → calibrate → train → evaluate (replay and live) → report through the CLI, on tiny models."""

from __future__ import annotations

import json

import pandas as pd

from speckv.cli import main
from speckv.datasets import in_split


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def prompt_file(tmp_path):
    # train fits on dev prompts and evaluate scores test prompts by default; train ones are unused.
    ids = [f"chat/{i}" for i in range(200)]
    chosen = (
        [i for i in ids if in_split(i, "dev")][:6]
        + [i for i in ids if in_split(i, "test")][:3]
        + [i for i in ids if in_split(i, "train")][:1]
    )
    lines = [
        json.dumps(
            {
                "id": item,
                "task": "chat",
                "prompt": " ".join(f"w{(7 * n + k) % 60 + 2}" for k in range(n % 4 + 2)),
            }
        )
        for n, item in enumerate(chosen)
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pipeline_end_to_end(capsys, tmp_path, tiny_model_dirs):
    prompts = prompt_file(tmp_path)
    profile = tmp_path / "profile"
    common = ["--target", tiny_model_dirs["target"], "--draft", tiny_model_dirs["draft"]]
    code, out, err = run(
        capsys,
        "profile",
        *common,
        "--prompts",
        prompts,
        "--raw",
        "--max-new-tokens",
        16,
        "--gamma-max",
        4,
        "--sweep",
        "fixed:2,heuristic,tree:4",
        "--out",
        profile,
    )
    assert code == 0, err
    assert "10 units recorded" in out and "| chat | fp32 | fixed:2 |" in out
    code, out, _ = run(
        capsys,
        "profile",
        *common,
        "--prompts",
        prompts,
        "--raw",
        "--max-new-tokens",
        16,
        "--gamma-max",
        4,
        "--sweep",
        "fixed:2,heuristic,tree:4",
        "--out",
        profile,
    )
    assert code == 0 and "0 units recorded, 10 already done" in out

    code, _, err = run(capsys, "train", "--profile", profile, "--out", tmp_path / "ctrl.json")
    assert code == 2 and "speckv calibrate" in err and err[-1] == "\n" and err.count("\n") == 1

    code, out, err = run(
        capsys,
        "calibrate",
        "--profile",
        profile,
        "--prompts",
        prompts,
        "--per-task",
        2,
        "--new-tokens",
        10,
        "--repeats",
        1,
    )
    assert code == 0, err
    assert "fp32: t_draft" in out and (profile / "cost.json").exists()
    # --merge adds the levels of another cost file (timed elsewhere) without timing anything.
    from speckv.costs import load_costs, save_costs

    costs = load_costs(profile / "cost.json")
    save_costs({"int8": costs["fp32"]}, tmp_path / "other.json")
    code, out, err = run(
        capsys,
        "calibrate",
        "--profile",
        profile,
        "--out",
        tmp_path / "merged.json",
        "--merge",
        tmp_path / "other.json",
    )
    assert code == 0 and set(load_costs(tmp_path / "merged.json")) == {"int8"}, err

    controller = tmp_path / "ctrl.json"
    code, out, err = run(
        capsys, "train", "--profile", profile, "--out", controller, "--compare", "linear", "--trees"
    )
    assert code == 0, err
    assert "| mlp16 |" in out and "| linear |" in out and controller.exists()
    assert "tree model:" in out and "tree_model" in json.loads(controller.read_text())

    evaluation = tmp_path / "eval"
    code, out, err = run(
        capsys,
        "evaluate",
        "--profile",
        profile,
        "--controller",
        controller,
        "--out",
        evaluation,
        "--live",
        "--live-per-task",
        2,
        "--live-fixed",
        "1,2",
        "--repeats",
        1,
        "--hf-gammas",
        2,
    )
    assert code == 0, err
    replayed = pd.read_parquet(evaluation / "replay.parquet")
    assert replayed["prompt_id"].nunique() == 3  # test prompts only
    assert {"SpecKV (ours)", "SpecKV (paper objective)", "oracle (tokens/s)", "target only"} <= set(
        replayed["policy"]
    )
    per_prompt = replayed.pivot_table(index="prompt_id", columns="policy", values="time_s")
    assert (
        (per_prompt.drop(columns="oracle (tokens/s)").ge(per_prompt["oracle (tokens/s)"] - 1e-12, axis=0))
        .all()
        .all()
    )
    consistency = pd.read_csv(evaluation / "consistency.csv")
    assert set(consistency["controller"]) == {"fixed:2", "heuristic"}  # tree:4 is not replayable
    from speckv.pipeline.profiling import load_steps

    trees = load_steps(profile).query("controller == 'tree:4'")  # the profile records tree steps
    assert (
        len(trees)
        and (trees["depth"] <= trees["gamma"]).all()
        and (trees["accepted"] <= trees["depth"]).all()
    )
    assert (trees["parents"].map(len) == trees["gamma"]).all()
    assert (consistency["replayed_exactly"] == consistency["live_runs"]).all()
    live = pd.read_csv(evaluation / "live.csv")
    assert live["same_output"].all()
    assert set(live.loc[live["method"].str.startswith("fixed"), "method"]) == {"fixed:1", "fixed:2"}
    assert (live["prompts"] == 2).all()  # 2 per task, one task
    ours = live[live["engine"] == "speckv"]
    assert ours["modelled_tokens_per_s"].notna().all()  # adaptive baselines too: capped at γ_max

    code, out, err = run(capsys, "report", "--eval", evaluation)
    assert code == 0, err
    report = (evaluation / "report" / "report.md").read_text()
    assert "## Replay: every policy per compression level" in report and "## Live runs" in report
    verdict = pd.read_csv(evaluation / "report" / "tables" / "live_verdict.csv")
    assert verdict["all_lossless"].all() and verdict["vs_best_hf"].notna().all()
    assert (evaluation / "report" / "figures" / "policy_tokens_per_s.png").exists()


def test_pipeline_errors_are_one_line(capsys, tmp_path):
    for argv, message in [
        (["train", "--profile", tmp_path, "--out", tmp_path / "c.json"], "not a profile directory"),
        (["report", "--eval", tmp_path], "has no evaluation"),
        (["evaluate", "--profile", tmp_path, "--out", tmp_path / "e"], "not a profile directory"),
    ]:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1
