"""The SpecKV draft file format: a directory with a manifest, loaded for a given target.

A draft directory holding only the draft's own weights carries the manifest; the input embedding
(and the output head, optionally restricted to a token subset) is taken from the target. A full
Hugging Face model directory also works as a draft.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from speckv.decoding.models import LoadedModel, check_pair, load_model
from speckv.errors import SpecKVError

DEMO_DRAFT_DIR = Path(__file__).resolve().parent.parent / "data" / "demo-draft"
DRAFT_MANIFEST = "speckv_draft.json"


def load_draft(source: str, target: LoadedModel) -> LoadedModel:
    """Load a draft for `target`: a full model, or a SpecKV draft that borrows the target's embedding."""
    if source == "demo":
        source = str(DEMO_DRAFT_DIR)
        if not (DEMO_DRAFT_DIR / DRAFT_MANIFEST).exists():
            raise SpecKVError("this installation ships no demo draft; train one with `speckv distill`")
    directory = Path(source)
    manifest = _read_manifest(directory)
    if manifest.get("weights"):
        draft = _load_compact_draft(directory, manifest, target)
    else:
        draft = load_model(source, compression="fp32", device=str(target.device))
        if manifest.get("vocab_map"):
            _restrict_head(draft, _load_vocab_map(directory, manifest))
    check_pair(draft, target)
    return draft


def _read_manifest(directory: Path) -> dict:
    path = directory / DRAFT_MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SpecKVError(f"{path} is not valid JSON: {error}") from error


def _load_vocab_map(directory: Path, manifest: dict) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(directory / manifest["vocab_map"])["vocab_map"].long()


def _restrict_head(draft: LoadedModel, vocab_map: torch.Tensor) -> None:
    """Keep only the head rows of the tokens the draft may propose: a much cheaper output layer."""
    model = draft.model
    full_head = model.get_output_embeddings().weight.detach()
    head = torch.nn.Linear(full_head.shape[1], len(vocab_map), bias=False, device=full_head.device)
    head.weight.data.copy_(full_head[vocab_map.to(full_head.device)])
    model.config.tie_word_embeddings = False
    model.set_output_embeddings(head)
    draft.vocab_map = vocab_map.to(draft.device)


def _load_compact_draft(directory: Path, manifest: dict, target: LoadedModel) -> LoadedModel:
    """Rebuild a draft saved with only its own layers: embedding and head come from the target."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    target_embedding = target.model.get_input_embeddings().weight.detach().float()
    if target_embedding.shape[1] != config.hidden_size:
        raise SpecKVError(
            f"draft '{directory}' expects hidden size {config.hidden_size}, target has {target_embedding.shape[1]}"
        )
    config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: tensor.float() for name, tensor in load_file(directory / manifest["weights"]).items()}
    state["model.embed_tokens.weight"] = target_embedding.cpu()
    state["lm_head.weight"] = target_embedding.cpu()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SpecKVError(
            f"draft '{directory}' does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    draft = LoadedModel(
        model=model.to(target.device).eval(),
        tokenizer=target.tokenizer,
        name=manifest.get("name", directory.name),
        compression="fp32",
        device=target.device,
    )
    if manifest.get("vocab_map"):
        _restrict_head(draft, _load_vocab_map(directory, manifest))
    return draft
