"""The draft before training: a k-layer Llama built from the target's own weights.

Its layers are initialised from chosen target layers and the target's final norm; its input
embedding and output head are the target's frozen embedding (the head restricted at training time
to the tokens of `build_vocab_map`). Only the layers and the final norm are the draft's own
weights (`trainable_state`): they are what is trained, checkpointed and saved.
"""

from __future__ import annotations

import torch

from speckv.errors import SpecKVError


def parse_layers(text: str, num_target_layers: int) -> list[int]:
    """'0,29' -> [0, 29]; negative indices count from the end; each must exist in the target."""
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SpecKVError(f"--layers must be comma-separated target layer indices, got '{text}'") from None
    if not layers:
        raise SpecKVError("--layers names no layer")
    resolved = [layer + num_target_layers if layer < 0 else layer for layer in layers]
    bad = [layer for layer in layers if not -num_target_layers <= layer < num_target_layers]
    if bad:
        raise SpecKVError(f"--layers {bad}: the target has layers 0..{num_target_layers - 1}")
    return resolved


def build_vocab_map(
    records: list[dict], size: int, vocab_size: int, always: list[int]
) -> torch.Tensor | None:
    """The `size` tokens the target predicts (top-1) most often on its outputs, plus `always` (EOS);
    sorted ids. None when `size` is 0 or covers the whole vocabulary."""
    if size <= 0 or size >= vocab_size:
        return None
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for record in records:
        counts += torch.bincount(record["top_idx"][:, 0].long(), minlength=vocab_size)
        counts += torch.bincount(record["response"].long(), minlength=vocab_size)
    for token in always:
        counts[token] = counts.max() + 1
    chosen = counts.topk(size).indices
    return chosen.sort().values


def vocab_lookup(vocab_map: torch.Tensor | None, vocab_size: int) -> torch.Tensor | None:
    """Target token id -> its index in the reduced vocabulary (-1 if outside); None: no reduction."""
    if vocab_map is None:
        return None
    lookup = torch.full((vocab_size,), -1, dtype=torch.long)
    lookup[vocab_map.cpu()] = torch.arange(len(vocab_map))
    return lookup


def make_draft(target_model, layers: list[int]):
    """A Llama with `len(layers)` layers copied from the target, sharing its (frozen) embedding."""
    from transformers import AutoModelForCausalLM

    config = type(target_model.config).from_dict(target_model.config.to_dict())
    config.num_hidden_layers = len(layers)
    config.tie_word_embeddings = False
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    target_layers = target_model.model.layers
    for slot, index in enumerate(layers):
        draft.model.layers[slot].load_state_dict(target_layers[index].state_dict())
    draft.model.norm.load_state_dict(target_model.model.norm.state_dict())
    embedding = target_model.get_input_embeddings().weight.detach().float()
    draft.model.embed_tokens.weight = torch.nn.Parameter(embedding, requires_grad=False)
    draft.lm_head.weight = torch.nn.Parameter(embedding, requires_grad=False)
    draft.train()
    return draft


def trainable_state(draft) -> dict[str, torch.Tensor]:
    """The draft's own weights: everything but the borrowed embedding and head."""
    skip = ("model.embed_tokens.weight", "lm_head.weight")
    return {name: tensor for name, tensor in draft.state_dict().items() if name not in skip}
