"""The Python API (`speckv.load`): the README's examples run, output is the target's own, and the
keyword names mean what Hugging Face's do."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import EOS_ID, loaded, tiny_model
from test_engine import reference_greedy

import speckv
from speckv.api import sampling_config
from speckv.decoding.verify import SamplingConfig
from speckv.errors import SpecKVError

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of one README section."""
    text = README.read_text()
    body = text[text.index(f"## {section}\n") :]
    body = body[: body.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_the_readme_python_examples_run(tiny_model_dirs, capsys):
    first, second = python_blocks("From Python")
    target, draft = str(tiny_model_dirs["target"]), str(tiny_model_dirs["draft"])
    # The same lines with the tiny pair in place of the demo pair and of the hub ids.
    assert 'speckv.load("demo")' in first
    exec(first.replace('speckv.load("demo")', f"speckv.load({target!r}, {draft!r})"), {})
    text, accepted, speed = capsys.readouterr().out.rsplit(" ", 2)
    assert float(accepted) >= 0 and float(speed) > 0
    exec(second.replace('"my/target"', repr(target)).replace('"my/draft"', repr(draft)), {"speckv": speckv})
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("controller", ["fixed:3", "heuristic:5", "tree:6", None])
def test_greedy_output_is_the_targets_own(tiny_target, tiny_drafts, controller):
    pair = speckv.load(tiny_target, tiny_drafts["close"], controller=controller)
    prompt = [5, 9, 12, 5, 9]
    result = pair.generate(prompt, max_new_tokens=20)
    expected = reference_greedy(tiny_target.model, prompt, 20, eos=EOS_ID)
    assert result.token_ids == expected
    assert result.summary["controller"] == (controller or "fixed:4")
    assert result.summary["steps"] == len(result.steps) < len(expected)  # it speculated


def test_model_objects_equal_hugging_face_generate(tiny_model_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["target"])
    draft = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["draft"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["target"])
    pair = speckv.load(target, draft, tokenizer=tokenizer, controller="fixed:4")
    assert pair.config["compression"] == "fp32" and pair.config["draft"] == "draft"
    result = pair.generate("w5 w6 w7", max_new_tokens=16, raw=True)
    ids = torch.tensor([tokenizer("w5 w6 w7")["input_ids"]])
    with torch.inference_mode():
        own = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert result.token_ids == own[0, ids.shape[1] :].tolist()


def test_stream_gives_the_text_of_generate_and_stops_at_a_stop_string(tiny_target, tiny_drafts):
    pair = speckv.load(tiny_target, tiny_drafts["close"], controller="fixed:3")
    whole = pair.generate("w5 w6 w7", max_new_tokens=24, raw=True)
    pieces = list(pair.stream("w5 w6 w7", max_new_tokens=24, raw=True))
    assert len(pieces) > 1 and "".join(pieces) == whole.text
    words = whole.text.split()
    stop = " ".join(words[3:5])
    cut = pair.generate("w5 w6 w7", max_new_tokens=24, raw=True, stop=stop)
    assert cut.finish_reason == "stop" and cut.text == whole.text[: whole.text.index(stop)]
    assert len(cut.token_ids) < len(whole.token_ids)


def test_prompts_as_text_messages_or_ids(tiny_target):
    pair = speckv.load(tiny_target, None)
    assert pair.config["draft"] is None and "target only" in repr(pair)
    ids = pair.encode("w5 w6", raw=True)
    assert pair.encode(ids) == ids
    assert pair.encode([{"role": "user", "content": "w5 w6"}]) == ids  # no template: the contents
    assert pair.generate(ids, max_new_tokens=4).prompt_ids == ids
    for bad in ([], [1.5], [{"role": "user", "content": "w5"}, 3]):
        with pytest.raises(SpecKVError, match="a prompt is text"):
            pair.encode(bad)
    with pytest.raises(SpecKVError, match="the prompt is empty"):
        pair.generate("   ")


def test_min_new_tokens_holds_the_stop_token_back(tiny_target, tiny_drafts):
    prompt = [5, 9, 12, 5, 9]
    free = reference_greedy(tiny_target.model, prompt, 30)
    first = next(i for i, t in enumerate(free) if i >= 3 and t not in free[:i])
    # The same weights with that token as EOS: the free run ends there.
    target = loaded(tiny_model(seed=0, head_scale=20.0, eos=free[first]), "target")
    pair = speckv.load(target, tiny_drafts["close"], controller="fixed:3")
    ended = pair.generate(prompt, max_new_tokens=30)
    assert ended.finish_reason == "stop" and ended.token_ids == free[: first + 1]
    held = pair.generate(prompt, max_new_tokens=30, min_new_tokens=first + 4)
    assert free[first] not in held.token_ids[: first + 4] and len(held.token_ids) > first + 4
    assert held.token_ids[:first] == free[:first]


def test_calls_reuse_one_decoder_per_sampling_setting(tiny_target, tiny_drafts):
    pair = speckv.load(tiny_target, tiny_drafts["close"], controller="heuristic")
    pair.generate([5, 9], max_new_tokens=8)
    decoder = pair._idle[SamplingConfig()]
    pair.generate([5, 9], max_new_tokens=8)
    assert pair._idle[SamplingConfig()] is decoder  # the controller's adaptation carries over
    pair.generate([5, 9], max_new_tokens=8, do_sample=True, seed=3)
    assert len(pair._idle) == 2


def test_sampling_follows_hugging_faces_names():
    assert sampling_config(None, None) == SamplingConfig(0.0, 1.0)  # greedy by default
    assert sampling_config(None, 0.7, 0.9, seed=5) == SamplingConfig(0.7, 0.9, 5)  # a temperature samples
    assert sampling_config(True, None) == SamplingConfig(1.0, 1.0)  # HF's default temperature
    assert sampling_config(False, 0.7, 0.9, 4, 0.1) == SamplingConfig(0.0, 1.0)  # do_sample=False wins
    assert sampling_config(True, 0.5, 1.0, 4, 0.1) == SamplingConfig(0.5, 1.0, None, 4, 0.1)
    for args, message in (
        ((True, 0.0), "needs a temperature"),
        ((None, -1.0), "temperature"),
        ((None, float("nan")), "temperature"),
        ((None, 0.5, 0.0), "top_p"),
        ((False, None, 1.0, -1), "top_k"),
        ((True, None, 1.0, 0, 2.0), "min_p"),
        ((True, None, 1.0, 0, 0.0, 2**64), "seed"),
    ):
        with pytest.raises(SpecKVError, match=message):
            sampling_config(*args)


def test_bad_loads_say_what_is_wrong(tiny_target, tiny_model_dirs):
    with pytest.raises(SpecKVError, match="tokenizer= goes with a model object"):
        speckv.load(str(tiny_model_dirs["target"]), None, tokenizer=tiny_target.tokenizer)
    with pytest.raises(SpecKVError, match="needs its tokenizer"):
        speckv.load(tiny_target.model, None)
    with pytest.raises(SpecKVError, match="a controller needs a drafter"):
        speckv.load(tiny_target, None, controller="fixed:2")
    with pytest.raises(SpecKVError, match="budgets tree nodes, and ngram"):
        speckv.load(tiny_target, "ngram", controller="tree:4")
