"""`speckv generate` end to end on tiny saved models, and its one-line errors."""

from __future__ import annotations

import json

import pytest
from conftest import perturbed_copy, tiny_model, tiny_tokenizer

from speckv.cli import main
from speckv.decoding import models


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_json_and_losslessness(capsys, tiny_model_dirs):
    common = ["generate", "--target", str(tiny_model_dirs["target"]), "--prompt", "w5 w6 w7", "--json"]
    code, out, _ = run(
        capsys, *common, "--draft", str(tiny_model_dirs["draft"]), "--gamma", "3", "--max-new-tokens", "12"
    )
    assert code == 0
    speculative = json.loads(out)
    assert set(speculative) >= {"text", "prompt_ids", "token_ids", "summary", "steps"}
    assert speculative["prompt_ids"] and all(isinstance(t, int) for t in speculative["prompt_ids"])
    summary = speculative["summary"]
    assert set(summary) >= {
        "new_tokens",
        "steps",
        "mean_accepted",
        "acceptance_rate",
        "tokens_per_s",
        "time_to_first_token_s",
        "decode_tokens_per_s",
    }
    # Decode speed excludes the first step (prefill): its tokens and its time.
    assert 0 < summary["time_to_first_token_s"] < summary["time_s"]
    later = summary["new_tokens"] - speculative["steps"][0]["tokens_produced"]
    decode_s = summary["time_s"] - summary["time_to_first_token_s"]
    assert summary["decode_tokens_per_s"] == pytest.approx(later / decode_s)
    assert all({"gamma", "accepted"} <= set(s) for s in speculative["steps"])
    code, out, _ = run(capsys, *common, "--no-draft", "--max-new-tokens", "12")
    assert code == 0
    assert json.loads(out)["token_ids"] == speculative["token_ids"]


def test_top_k_and_min_p_reach_the_sampler(capsys, tiny_model_dirs):
    """Sampling among the top 1 token, or the tokens at least as likely as the top one, is greedy
    decoding: the options took effect (plain sampling at temperature 2 strays from it)."""
    common = ["generate", "--target", str(tiny_model_dirs["target"]), "--prompt", "w5 w6 w7", "--json"]
    common += ["--draft", str(tiny_model_dirs["draft"]), "--gamma", "3", "--max-new-tokens", "12"]

    def tokens(*options: str) -> list[int]:
        code, out, _ = run(capsys, *common, *options)
        assert code == 0
        return json.loads(out)["token_ids"]

    greedy = tokens()
    assert tokens("--temperature", "2", "--seed", "1") != greedy
    assert tokens("--temperature", "2", "--seed", "1", "--top-k", "1") == greedy
    assert tokens("--temperature", "2", "--seed", "1", "--min-p", "1") == greedy


def test_generate_prints_text_and_summary(capsys, tiny_model_dirs):
    code, out, err = run(
        capsys,
        "generate",
        "--target",
        str(tiny_model_dirs["target"]),
        "--draft",
        str(tiny_model_dirs["draft"]),
        "--controller",
        "heuristic",
        "--prompt",
        "w9",
        "--max-new-tokens",
        "8",
    )
    assert code == 0
    assert out.strip()
    assert "tokens/s" in err and "mean accepted" in err and "acceptance" in err and "first token" in err


def test_a_users_prompt_file_runs_every_row_unless_split_is_given(capsys, tiny_model_dirs, tmp_path):
    from speckv.datasets import in_split

    prompts = tmp_path / "mine.jsonl"
    ids = [f"row-{i}" for i in range(12)]
    prompts.write_text(
        "".join(json.dumps({"id": i, "prompt": f"w{n + 3} w4"}) + "\n" for n, i in enumerate(ids))
    )
    common = ["generate", "--target", str(tiny_model_dirs["target"]), "--no-draft", "--prompts", str(prompts)]
    code, out, _ = run(capsys, *common, "--max-new-tokens", "2", "--json")
    assert code == 0
    assert [json.loads(line)["id"] for line in out.splitlines()] == ids
    code, out, _ = run(capsys, *common, "--max-new-tokens", "2", "--json", "--split", "heldout")
    held_out = [json.loads(line)["id"] for line in out.splitlines()]
    assert code == 0 and held_out == [i for i in ids if in_split(i, "heldout")] and len(held_out) < len(ids)


def test_demo_defaults_to_the_shipped_learned_controller_where_it_fits():
    from speckv.controllers import default_controller
    from speckv.controllers.speckv import shipped_levels

    levels = shipped_levels()
    assert levels, "the package ships a trained controller"
    assert all(default_controller(True, level) == "speckv" for level in levels)
    assert default_controller(True, "a-level-it-never-saw") == "fixed:4"
    assert default_controller(False, levels[0]) == "fixed:4"  # no trained controller fits other pairs


def bad_input_cases(dirs):
    target, draft = str(dirs["target"]), str(dirs["draft"])
    base = ["generate", "--prompt", "w5", "--max-new-tokens", "4"]
    return [
        (base + ["--target", "/no/such/model", "--no-draft"], "does not exist"),
        (base + ["--target", target, "--draft", str(dirs["other-vocab"])], "vocabularies differ"),
        (
            base + ["--target", target, "--draft", draft, "--gamma", "0"],
            "gamma must be an integer from 1 to 64",
        ),
        (
            base + ["--target", target, "--draft", draft, "--gamma", "65"],
            "gamma must be an integer from 1 to 64",
        ),
        (["generate", "--target", target, "--no-draft", "--prompt", "  "], "the prompt is empty"),
        (
            base + ["--target", target, "--no-draft", "--compression", "int3"],
            "unknown compression level 'int3'",
        ),
        (base + ["--target", target, "--no-draft", "--device", "cuda"], "not available here (no CUDA)"),
        (base + ["--target", target], "choose a draft"),
        (
            base + ["--target", target, "--draft", draft, "--controller", "magic"],
            "unknown controller 'magic'",
        ),
        (
            base + ["--target", target, "--no-draft", "--max-new-tokens", "0"],
            "max-new-tokens must be at least 1",
        ),
        (base + ["--target", target, "--no-draft", "--top-k", "-1"], "top_k must be an integer ≥ 0"),
        (base + ["--target", target, "--no-draft", "--min-p", "1.5"], "min_p must be in [0, 1]"),
        (
            base + ["--target", target, "--no-draft", "--seed", "-1"],
            "seed must be an integer in [0, 2^64 - 1]",
        ),
    ]


def test_bad_input_gives_one_line_errors(capsys, tiny_model_dirs):
    for argv, message in bad_input_cases(tiny_model_dirs):
        code, _, err = run(capsys, *argv)
        assert code == 2, argv
        assert message in err, (argv, err)
        assert "Traceback" not in err
        assert err.strip().count("\n") == 0, err


def test_unavailable_quantisation_is_explained(capsys, monkeypatch, tiny_model_dirs):
    monkeypatch.setattr(models, "_missing_module", lambda name: f"{name} cannot be imported (test)")
    code, _, err = run(
        capsys,
        "generate",
        "--target",
        str(tiny_model_dirs["target"]),
        "--no-draft",
        "--prompt",
        "w5",
        "--compression",
        "nf4",
    )
    assert code == 2
    assert "compression 'nf4' is not available on cpu: bitsandbytes cannot be imported" in err
    assert "available here: fp32, bf16, fp16" in err


@pytest.fixture(scope="module")
def quantisable_dirs(tmp_path_factory):
    """bitsandbytes' 4-bit CPU kernels need layer widths of at least 128."""
    root = tmp_path_factory.mktemp("quantisable")
    target = tiny_model(seed=20, hidden=128, head_scale=20.0)
    for name, model in (("target", target), ("draft", perturbed_copy(target, seed=21, noise=0.01))):
        model.save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    return root


@pytest.mark.parametrize("compression", ["bf16", "fp16", "int8", "nf4"])
def test_compressed_targets_stay_lossless(capsys, quantisable_dirs, compression):
    """Speculative output equals the same compressed target decoding alone."""
    common = ["generate", "--target", str(quantisable_dirs / "target"), "--prompt", "w3 w4", "--json"]
    common += ["--compression", compression, "--max-new-tokens", "10"]
    code, out, err = run(capsys, *common, "--draft", str(quantisable_dirs / "draft"), "--gamma", "4")
    assert code == 0, err
    code, alone, err = run(capsys, *common, "--no-draft")
    assert code == 0, err
    assert json.loads(out)["token_ids"] == json.loads(alone)["token_ids"]
