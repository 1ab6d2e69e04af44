"""speckv.distill on a tiny random Llama: data generation, training, save/load, resume."""

from __future__ import annotations

import json

import pytest
import torch

from speckv.cli.distill import parse_samples
from speckv.decoding.draft_files import load_draft
from speckv.decoding.models import LoadedModel
from speckv.distill.data import GenConfig, generate_data
from speckv.distill.draft_model import parse_layers, trainable_state
from speckv.distill.measure import cost_ratio, loaded_agreement
from speckv.distill.saving import save_draft
from speckv.distill.training import TrainConfig, train_draft
from speckv.errors import SpecKVError

VOCAB = 128
WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


@pytest.fixture(scope="module")
def target():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a peaked, learnable teacher: bigger weights than the random init
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(8)
        model.model.embed_tokens.weight.mul_(20)
    return LoadedModel(model, _tokenizer(), "tiny", "fp32", torch.device("cpu"))


@pytest.fixture(scope="module")
def data(target, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    prompts = work / "prompts.jsonl"
    rng = torch.Generator().manual_seed(1)
    lines = []
    for i in range(24):
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (6,), generator=rng)]
        lines.append(json.dumps({"id": f"p{i}", "task": ("code", "chat")[i % 2], "prompt": " ".join(words)}))
    prompts.write_text("\n".join(lines) + "\n")
    gen = GenConfig(
        prompts=str(prompts),
        new_tokens=12,
        top_k=8,
        samples={"code": 2, "chat": 2},
        heldout_per_task=2,
        extra="",
    )
    train = generate_data(target, gen, work, "train", batch_rows=8, progress=False)
    heldout = generate_data(target, gen, work, "heldout", batch_rows=8, progress=False)
    return gen, work, train, heldout


def test_generation_records_target_logits_and_resumes(target, data):
    gen, work, train, heldout = data
    assert train and heldout
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in heldout})
    greedy = [r for r in train if r["greedy"]]
    assert len(greedy) == len(train) // 2
    for record in greedy[:3] + [r for r in train if not r["greedy"]][:3]:
        ids = torch.cat([record["prompt"], record["response"]]).long()[None]
        with torch.no_grad():
            logits = target.model(ids).logits[0, len(record["prompt"]) - 1 : -1]
        assert torch.equal(logits.argmax(-1), record["top_idx"][:, 0].long())
        assert torch.allclose(logits.topk(8).values, record["top_val"].float(), atol=0.05)
        if record["greedy"]:
            assert torch.equal(record["response"], record["top_idx"][:, 0])
    shards = sorted((work / "train").glob("*.pt"))
    stamps = [shard.stat().st_mtime_ns for shard in shards]
    again = generate_data(target, gen, work, "train", batch_rows=8, progress=False)
    assert [shard.stat().st_mtime_ns for shard in shards] == stamps  # nothing regenerated
    assert len(again) == len(train)


def _cfg(**overrides):
    settings = dict(layers="0,-1", vocab=64, epochs=3, batch_tokens=48, lr=3e-3, warmup=2, ce_weight=0.5)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_training_reduces_loss_and_save_load_roundtrip(target, data, tmp_path):
    _, _, train, heldout = data
    draft, vocab_map, history = train_draft(
        target.model, train, heldout, _cfg(), tmp_path / "run", [2], progress=False, note=lambda _: None
    )
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert len(vocab_map) == 64 and 2 in vocab_map.tolist()

    out = tmp_path / "draft"
    save_draft(draft, vocab_map, target.tokenizer, out, {"name": "tiny-draft"})
    loaded = load_draft(str(out), target)
    assert loaded.name == "tiny-draft" and torch.equal(loaded.vocab_map, vocab_map)
    # The saved weights are bf16: compare with the trained draft rounded the same way.
    with torch.no_grad():
        for tensor in trainable_state(draft).values():
            tensor.copy_(tensor.to(torch.bfloat16).float())
        ids = torch.cat([heldout[0]["prompt"], heldout[0]["response"]]).long()[None]
        expected = draft.model(input_ids=ids).last_hidden_state @ draft.model.embed_tokens.weight[vocab_map].T
        got = loaded.model(input_ids=ids).logits
    assert got.shape[-1] == 64
    assert torch.allclose(got, expected, atol=1e-5)
    agreement = loaded_agreement(loaded, heldout)
    assert set(agreement) == {"chat", "code", "overall"}
    target_s, draft_s, ratio = cost_ratio(loaded, target, heldout[0]["prompt"].tolist(), rounds=1)
    assert target_s > 0 and draft_s > 0 and ratio == pytest.approx(draft_s / target_s)


def test_interrupted_training_resumes_to_the_same_weights(target, data, tmp_path):
    _, _, train, heldout = data
    quiet = dict(progress=False, note=lambda _: None)
    full, _, _ = train_draft(target.model, train, heldout, _cfg(epochs=2), tmp_path / "a", [2], **quiet)
    with pytest.raises(KeyboardInterrupt):
        train_draft(target.model, train, heldout, _cfg(epochs=2), tmp_path / "b", [2], stop_after=5, **quiet)
    assert (tmp_path / "b" / "checkpoint.pt").exists()
    messages = []
    resumed, _, history = train_draft(
        target.model,
        train,
        heldout,
        _cfg(epochs=2),
        tmp_path / "b",
        [2],
        progress=False,
        note=messages.append,
    )
    assert any(message.startswith("resuming") for message in messages)
    assert [entry["epoch"] for entry in history] == [0, 1, 2]
    for name, tensor in trainable_state(full).items():
        assert torch.allclose(tensor, trainable_state(resumed)[name], atol=1e-6), name


def test_layers_and_samples_parsing():
    assert parse_layers("0,-1", 30) == [0, 29]
    with pytest.raises(SpecKVError):
        parse_layers("0,30", 30)
    assert parse_samples("code=3")["code"] == 3
    with pytest.raises(SpecKVError):
        parse_samples("code=x")
