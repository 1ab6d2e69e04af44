"""Extra distillation prompts: offline, deterministic, train-only, and kept apart from the benchmark's."""

from __future__ import annotations

import json

import pytest

from speckv.datasets import split_of
from speckv.distill.data import GenConfig, plan_jobs
from speckv.distill.prompts import (
    extra_prompts,
    extra_set_names,
    stdlib_code_prompts,
    template_chat_prompts,
)
from speckv.errors import SpecKVError


def test_stdlib_code_prompts_are_humaneval_style_and_deterministic():
    items = stdlib_code_prompts(40)
    assert len(items) == 40 and items == stdlib_code_prompts(40)
    assert len({item.id for item in items}) == 40
    for item in items:
        assert item.task == "code" and item.id.startswith("extra/code/")
        assert item.text.startswith("def ") and item.text.count('"""') == 2
        compile(item.text + "    pass\n", item.id, "exec")  # a valid function header + docstring
        assert split_of(item.id) == "train"


def test_template_chat_prompts_are_distinct_requests():
    items = template_chat_prompts(50)
    assert len({item.text for item in items}) == 50
    assert all(item.task == "chat" and "{" not in item.text for item in items)
    assert all(split_of(item.id) == "train" for item in items)
    with pytest.raises(SpecKVError, match="unknown extra prompt set"):
        extra_prompts("template-chat,poetry", {}, 0)


def test_data_keys_of_earlier_drafts_are_stable():
    # The data of the demo draft model (fp32, no features, three extra sets) and of the first
    # draft (no extra set) live under these keys; adding options must not orphan them.
    shipped_model = GenConfig(
        extra="stdlib-code,template-chat,summarization-rest",
        extra_limits={"stdlib-code": 600, "template-chat": 800, "summarization-rest": 555},
        extra_samples={"code": 2, "chat": 2, "summarization": 1},
        precision="fp32",
        features="",
    )
    assert shipped_model.key() == "cc325b632d"
    assert GenConfig(extra="", precision="fp32", features="").key() == "801dc542c4"
    assert GenConfig().key() not in ("cc325b632d", "801dc542c4")  # bf16, with features, more prompts
    assert GenConfig(extra="template-chat").key() != GenConfig().key()
    assert extra_set_names("none") == [] and extra_set_names(" template-chat, ") == ["template-chat"]


def test_extra_prompts_get_their_own_jobs(tmp_path):
    from tests.test_distill import _tokenizer

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"id": f"p{i}", "task": "chat", "prompt": f"w{i} w{i + 1}"}) for i in range(6))
    )
    plain = GenConfig(prompts=str(prompts), samples={"chat": 2}, extra="")
    extra = GenConfig(
        prompts=str(prompts),
        samples={"chat": 2},
        extra="template-chat",
        extra_limits={"template-chat": 5},
        extra_samples={"chat": 3},
    )
    tokenizer = _tokenizer()
    base_jobs = plan_jobs(tokenizer, plain, "train", batch_rows=8)
    jobs = plan_jobs(tokenizer, extra, "train", batch_rows=8)
    assert [(j.name, j.items) for j in jobs if j in base_jobs] == [(j.name, j.items) for j in base_jobs]
    added = [j for j in jobs if j.name.startswith("train-extra-chat-")]
    assert sum(len(j.items) for j in added) == 5 and {j.samples for j in added} == {3}
    assert len(jobs) == len(base_jobs) + len(added)
