"""Tiny randomly initialised Llama models and a word-level tokenizer, built here so tests need no download."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from speckv.controllers.base import Controller
from speckv.decoding.models import LoadedModel
from speckv.decoding.verify import SamplingConfig, warp_probs

VOCAB = 64
EOS_ID = 1

# Tiny models gain nothing from threads, and spinning threads crawl when the CPU is shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def measured_costs_cache(tmp_path_factory):
    """Cost curves measured by the tests go to a folder of their own, not the user's cache. A tiny
    model's sub-millisecond passes vary a lot between rounds: every measurement counts as steady
    (tests/test_local_costs.py checks the steadiness rule with made-up measurements)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("speckv.decoding.local_costs.cache_dir", lambda: folder)
        patch.setattr("speckv.decoding.local_costs.UNSTEADY", float("inf"))
        yield folder


def tiny_config(vocab: int = VOCAB, layers: int = 2, hidden: int = 32, eos: int = EOS_ID) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2 if hidden < 128 else 4,
        max_position_embeddings=512,
        eos_token_id=eos,
        bos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def tiny_model(
    seed: int,
    vocab: int = VOCAB,
    layers: int = 2,
    head_scale: float = 1.0,
    eos: int = EOS_ID,
    hidden: int = 32,
):
    """A random Llama; `head_scale` sharpens its next-token distributions (random init is near-uniform)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab, layers, hidden, eos)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


def perturbed_copy(model: LlamaForCausalLM, seed: int, noise: float) -> LlamaForCausalLM:
    """A copy of `model` with Gaussian noise on every weight: a draft that often agrees."""
    copy = LlamaForCausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in copy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
    return copy


def tiny_tokenizer(vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    words = {"<s>": 0, "</s>": 1} | {f"w{i}": i for i in range(2, vocab)}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="w2"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="w2"
    )


def loaded(model, name: str = "tiny", tokenizer=None) -> LoadedModel:
    return LoadedModel(
        model=model,
        tokenizer=tokenizer or tiny_tokenizer(model.config.vocab_size),
        name=name,
        compression="fp32",
        device=torch.device("cpu"),
    )


@pytest.fixture(scope="session")
def tiny_target() -> LoadedModel:
    return loaded(tiny_model(seed=0, head_scale=20.0), "target")


@pytest.fixture(scope="session")
def tiny_drafts(tiny_target) -> dict[str, LoadedModel]:
    """Drafts that agree always, often, and rarely with the target."""
    target = tiny_target.model
    return {
        "identical": loaded(perturbed_copy(target, seed=1, noise=0.0), "identical"),
        "close": loaded(perturbed_copy(target, seed=2, noise=0.02), "close"),
        "unrelated": loaded(tiny_model(seed=3, head_scale=20.0), "unrelated"),
    }


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_target, tiny_drafts) -> dict:
    """The tiny target and its close draft saved as Hugging Face directories, for CLI tests."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, item in (("target", tiny_target), ("draft", tiny_drafts["close"])):
        item.model.save_pretrained(root / name)
        item.tokenizer.save_pretrained(root / name)
        dirs[name] = root / name
    other = root / "other-vocab"
    tiny_model(seed=5, vocab=VOCAB + 8).save_pretrained(other)
    tiny_tokenizer(VOCAB + 8).save_pretrained(other)
    dirs["other-vocab"] = other
    return dirs


class PrefixController(Controller):
    """Drafts `budget` tokens a step and has the target verify only the leading ones whose
    confidence is at least `threshold` (0 verifies all; above 1, none)."""

    name = "prefix"

    def __init__(self, budget: int, threshold: float):
        self.budget, self.threshold, self.asked = budget, threshold, 0

    def begin_step(self) -> int:
        return self.budget

    def verify_count(self, record) -> int:
        self.asked += 1
        confident = [c >= self.threshold for c in record.draft_confidence]
        return confident.index(False) if False in confident else len(confident)


def assert_cache_is_fresh(cached_model, tokens: list[int]) -> None:
    """A `CachedModel` after a rollback: a prefix of `tokens` whose cache gives the next logits of
    a fresh pass over all of `tokens`."""
    model, cache, length = cached_model.loaded.model, cached_model.cache, cached_model.length
    assert cache.get_seq_length() == length <= len(tokens) - 1
    with torch.no_grad():
        cached = model(torch.tensor([tokens[length:]]), cache=copy.deepcopy(cache)).logits[0, -1]
        fresh = model(torch.tensor([tokens])).logits[0, -1]
    torch.testing.assert_close(cached, fresh, rtol=1e-4, atol=1e-4)


# --- sampling checks -------------------------------------------------------------------------------

SMALL_VOCAB = 5


def exact_first_two(model, prompt: list[int], config: SamplingConfig) -> np.ndarray:
    """P(t1, t2) under the warped target distribution, by enumeration."""
    with torch.no_grad():
        first = warp_probs(model(torch.tensor([prompt])).logits[0, -1], config)
        joint = np.zeros((SMALL_VOCAB, SMALL_VOCAB))
        for t1 in range(SMALL_VOCAB):
            second = warp_probs(model(torch.tensor([prompt + [t1]])).logits[0, -1], config)
            joint[t1] = (first[t1] * second).numpy()
    return joint


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square p-value, pooling cells expected below 5 into one; 0 if an impossible cell occurs."""
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs.ravel() * counts.sum()
    small = expected < 5
    observed = np.append(counts.ravel()[~small], counts.ravel()[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    return float(chisquare(observed[keep], expected[keep] * observed.sum() / expected[keep].sum()).pvalue)
