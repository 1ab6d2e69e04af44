"""The losslessness checker: no divergence in fp32, only near-ties in bf16/fp16, and a lossy
verifier is caught (library and `speckv check-lossless`)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import loaded, perturbed_copy, tiny_model

from speckv.cli import main
from speckv.decoding import engine
from speckv.decoding.builder import DecoderSpec
from speckv.decoding.drafters.base import Verdict
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.target import TargetVerifier
from speckv.pipeline.lossless import (
    PromptCheck,
    check_prompt,
    failures,
    near_tie_tolerance,
    replay_divergences,
    summary,
)

PROMPTS = [[5], [7, 3, 9, 11, 2], list(range(2, 20))]


@pytest.fixture(scope="module")
def flat_pair():
    """A target with flat next-token distributions (many near-ties) and a draft close to it."""
    base = tiny_model(seed=0, head_scale=1.0, hidden=64)
    draft = loaded(perturbed_copy(base, seed=2, noise=0.02), "draft")
    return base, draft


def at(model, dtype: torch.dtype, level: str):
    target = loaded(copy.deepcopy(model).to(dtype), f"target-{level}")
    target.compression = level
    return target


def test_fp32_speculative_output_has_no_divergence(tiny_target, tiny_drafts):
    for prompt in PROMPTS:
        for spec in ("fixed:3", "heuristic"):
            check = check_prompt(DecoderSpec(tiny_target, tiny_drafts["close"], spec).build(), prompt, 24)
            assert check.divergences == [] and check.first_difference is None
            assert check.target_only == check.speculative and check.lossless


@pytest.mark.parametrize(("dtype", "level"), [(torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_reduced_precision_diverges_only_at_near_ties(flat_pair, dtype, level):
    base, draft = flat_pair
    target = at(base, dtype, level)
    checks = [
        check_prompt(DecoderSpec(target, draft, "fixed:4").build(), p, 32, f"p{i}")
        for i, p in enumerate(PROMPTS)
    ]
    assert all(c.dtype == str(dtype).removeprefix("torch.") for c in checks)
    for check in checks:
        assert check.lossless, failures([check])
        assert check.reproducible
    assert "lossless within rounding" in summary(checks, level)


class AcceptEverything(TargetVerifier):
    """A broken verifier: every drafted token is accepted whatever the target says."""

    def verify(self, context, drafted, *rest) -> Verdict:
        verdict = copy.copy(super().verify(context, drafted, *rest))
        if verdict.accepted < len(drafted):
            verdict.accepted_tokens = list(drafted)
            if hasattr(verdict, "path"):
                verdict.path = list(range(len(drafted)))
        return verdict


def swap_near_ties(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Logits (as float) with the top two swapped in every row where they are a near-tie."""
    logits = logits.float().clone()
    rows = logits.view(-1, logits.shape[-1])
    for row in rows:
        values, indices = row.topk(2)
        if float(values[0] - values[1]) <= near_tie_tolerance(dtype, float(values[0])):
            row[indices[0]], row[indices[1]] = values[1], values[0]
    return logits


class RunnerUpAtNearTies(TargetVerifier):
    """A verify pass that rounds differently, on purpose: where the target's two best tokens are
    within the near-tie tolerance it prefers the runner-up (target-only steps are left alone)."""

    def verify(self, context, drafted, *rest) -> Verdict:
        if not drafted:
            return super().verify(context, drafted, *rest)
        feed, dtype = self.model.feed, self.model.loaded.compute_dtype

        def swapped(*args, **kwargs):
            out = feed(*args, **kwargs)
            out.logits = swap_near_ties(out.logits, dtype)
            return out

        self.model.feed = swapped
        try:
            return super().verify(context, drafted, *rest)
        finally:
            del self.model.feed


def test_a_lossy_verifier_is_caught(monkeypatch, tiny_target, tiny_drafts):
    monkeypatch.setattr(engine, "TargetVerifier", AcceptEverything)
    checks = [
        check_prompt(DecoderSpec(tiny_target, tiny_drafts["unrelated"], "fixed:3").build(), p, 16, f"p{i}")
        for i, p in enumerate(PROMPTS)
    ]
    bad = [c for c in checks if not c.lossless]
    assert bad, "accepting wrong tokens must show"
    first = bad[0].divergences[0]
    assert not first.near_tie and first.margin > first.tolerance
    assert first.position == bad[0].first_difference
    lines = failures(checks)
    assert lines[0].startswith(f"{bad[0].prompt_id} token {first.position}:")
    assert "NOT lossless" in summary(checks, "fp32")


def test_near_tie_flips_pass_and_wider_ones_fail(monkeypatch, flat_pair):
    base, draft = flat_pair
    target = at(base, torch.bfloat16, "bf16")
    monkeypatch.setattr(engine, "TargetVerifier", RunnerUpAtNearTies)
    checks = [
        check_prompt(DecoderSpec(target, draft, "fixed:3").build(), p, 32, f"p{i}")
        for i, p in enumerate(PROMPTS)
    ]
    divergences = [d for c in checks for d in c.divergences]
    assert divergences, "a flat bf16 target has near-ties along 96 tokens"
    assert all(d.near_tie and d.margin <= d.tolerance for d in divergences)
    assert all(c.lossless for c in checks)


def test_replay_reports_a_replaced_token_with_its_margin(tiny_target):
    prompt = [7, 3, 9]
    own = SpeculativeDecoder(tiny_target).generate(prompt, 12).token_ids
    assert replay_divergences(tiny_target, prompt, own) == []
    wrong = own[:5] + [(own[5] + 1) % 64] + own[6:]
    [divergence] = replay_divergences(tiny_target, prompt, wrong)[:1]
    with torch.no_grad():
        logits = tiny_target.model(torch.tensor([prompt + own[:5]])).logits[0, -1]
    assert (divergence.position, divergence.expected, divergence.emitted) == (5, own[5], wrong[5])
    assert divergence.margin == pytest.approx(float(logits[own[5]] - logits[wrong[5]]), abs=1e-4)
    assert divergence.tolerance == near_tie_tolerance(torch.float32, divergence.magnitude)


def test_an_unreproducible_target_is_not_called_lossless():
    check = PromptCheck("p", target_only=[1, 2, 3], speculative=[1, 2, 4], divergences=[])
    assert check.first_difference == 2 and not check.reproducible and not check.lossless
    assert "not reproducible" in failures([check])[0]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_check_lossless_command(capsys, monkeypatch, tiny_model_dirs):
    common = [
        "check-lossless",
        "--target",
        str(tiny_model_dirs["target"]),
        "--draft",
        str(tiny_model_dirs["draft"]),
    ]
    common += ["--prompt", "w5 w6 w7", "--max-new-tokens", "16", "--gamma", "3"]
    code, out, err = run(capsys, *common, "--compression", "fp32")
    assert code == 0, err
    assert "identical to target-only" in out and "lossless within rounding" in out
    code, out, _ = run(capsys, *common, "--compression", "bf16", "--json")
    assert code == 0
    assert '"lossless": true' in out.splitlines()[-1]
    # a tree controller checks token trees (the drafter generate would build), not chains
    from speckv.decoding.drafters import ModelTreeDrafter

    grown = []
    original = ModelTreeDrafter.draft
    monkeypatch.setattr(ModelTreeDrafter, "draft", lambda self, *a: grown.append(1) or original(self, *a))
    trees = [*common[:-2], "--controller", "tree:6", "--compression", "fp32"]  # no --gamma
    code, out, err = run(capsys, *trees)
    assert code == 0 and "identical to target-only" in out and grown, err
    monkeypatch.setattr(engine, "TargetVerifier", AcceptEverything)
    code, out, err = run(capsys, *common, "--compression", "fp32", "--max-new-tokens", "40")
    assert code == 1
    assert "NOT lossless" in out
    assert err.startswith("speckv: check-lossless: prompt token ")
    code, _, err = run(capsys, "check-lossless", "--prompt", "w5")
    assert code == 2 and err.count("\n") == 1


class AcceptEverythingJudged(TargetVerifier):
    """The same broken verifier where a batch reaches it: in judging the pass's rows."""

    def judge(self, out, context, drafted, *rest) -> Verdict:
        verdict = copy.copy(super().judge(out, context, drafted, *rest))
        if verdict.accepted < len(drafted):
            verdict.accepted_tokens, verdict.path = list(drafted), list(range(len(drafted)))
        return verdict


def test_check_lossless_decodes_in_a_batch_as_the_server_does(capsys, monkeypatch, tiny_model_dirs, tmp_path):
    from speckv.decoding import batch

    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"id": f"p{i}", "prompt": " ".join(f"w{(5 * i + j) % 40 + 3}" for j in range(3 + i))}
        for i in range(5)
    ]
    prompts.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    argv = [
        "check-lossless",
        "--target",
        str(tiny_model_dirs["target"]),
        "--draft",
        str(tiny_model_dirs["draft"]),
    ]
    argv += ["--prompts", str(prompts), "--max-new-tokens", "16", "--gamma", "3", "--compression", "fp32"]
    widths = []
    step_together = batch.step_together
    monkeypatch.setattr(
        batch, "step_together", lambda runs, *a: widths.append(len(runs)) or step_together(runs, *a)
    )
    code, out, err = run(capsys, *argv, "--batch", "3")
    assert code == 0, err
    assert out.count("identical to target-only") == 5 and "3 at a time in one pass" in out
    assert max(widths) == 3  # three sequences shared each pass, the others joined as they finished
    monkeypatch.setattr(engine, "TargetVerifier", AcceptEverythingJudged)
    code, out, err = run(capsys, *argv, "--batch", "3")
    assert code == 1 and "NOT lossless" in out
    code, _, err = run(capsys, *argv, "--batch", "0")
    assert code == 2 and "--batch must be at least 1" in err
