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
from speckv.decoding.sources import first_line
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
        try:
            draft = load_model(source, compression="fp32", device=str(target.device))
        except SpecKVError:
            raise
        except Exception as error:  # a config transformers cannot build a model from
            raise SpecKVError(f"could not load draft '{source}': {_reason(error)}") from None
        if manifest.get("vocab_map"):
            _restrict_head(draft, _load_vocab_map(directory, manifest))
    check_pair(draft, target)
    return draft


def _reason(error: BaseException) -> str:
    """The error's type and first two lines as one (validation errors name the field on line 2)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {' '.join(lines[:2]) if lines else first_line(error)}"


def _read_manifest(directory: Path) -> dict:
    path = directory / DRAFT_MANIFEST
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SpecKVError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict):
        raise SpecKVError(f"{path} is not a SpecKV draft manifest (a JSON object)")
    for key in ("weights", "vocab_map", "name"):
        if manifest.get(key) is not None and not isinstance(manifest[key], str):
            raise SpecKVError(f"{path}: '{key}' must be a file name (a string)")
    return manifest


def _load_vocab_map(directory: Path, manifest: dict) -> torch.Tensor:
    from safetensors.torch import load_file

    path = directory / manifest["vocab_map"]
    try:
        vocab_map = load_file(path)["vocab_map"].long()
    except Exception as error:  # missing, damaged, or without the tensor
        raise SpecKVError(f"draft vocabulary map {path} cannot be read ({_reason(error)})") from None
    if vocab_map.ndim != 1 or not len(vocab_map):
        raise SpecKVError(f"draft vocabulary map {path} is not a list of token ids")
    return vocab_map


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

    try:
        config = AutoConfig.from_pretrained(directory)
        hidden_size = int(config.hidden_size)
    except Exception as error:  # missing, not JSON, unknown model type, no hidden size…
        raise SpecKVError(f"draft '{directory}' has no usable config.json ({_reason(error)})") from None
    target_embedding = target.model.get_input_embeddings().weight.detach().float()
    if target_embedding.shape[1] != hidden_size:
        raise SpecKVError(
            f"draft '{directory}' expects hidden size {hidden_size}, target has {target_embedding.shape[1]}"
        )
    config.tie_word_embeddings = False
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as error:  # values that build no model (heads not dividing the size, …)
        raise SpecKVError(
            f"draft '{directory}': no model can be built from its config.json ({_reason(error)})"
        ) from None
    weights = directory / manifest["weights"]
    try:
        state = {name: tensor.float() for name, tensor in load_file(weights).items()}
    except Exception as error:  # missing or damaged safetensors file
        raise SpecKVError(f"draft weights {weights} cannot be read ({_reason(error)})") from None
    state["model.embed_tokens.weight"] = target_embedding.cpu()
    state["lm_head.weight"] = target_embedding.cpu()
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that differ from the config's
        raise SpecKVError(f"draft '{directory}' does not match its config ({first_line(error)})") from None
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
