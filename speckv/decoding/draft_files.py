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

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEMO_DRAFT_DIR = DATA_DIR / "demo-draft"  # the distilled 2-layer draft model
# Names of the shipped drafters of the demo target; `demo` is the default one. (A feature head
# would ship beside it as `demo-head` once it measures faster: docs/draft.md.)
DEMO_DRAFTS = {"demo": DEMO_DRAFT_DIR, "demo-model": DEMO_DRAFT_DIR}
# What `--demo` drafts with: the draft model, and the n-gram continuation instead of its chain
# where the text's suffix repeats (with tree controllers, as one more branch of its tree); it was
# the fastest on the test split at bf16 and fp32 (benchmarks/speckv_live.py).
DEMO_DRAFTER = "demo+ngram"
DRAFT_MANIFEST = "speckv_draft.json"


def draft_directory(source: str) -> Path:
    """The directory of a draft spec: a shipped name (`demo`, `demo-model`) or a path."""
    if source in DEMO_DRAFTS:
        directory = DEMO_DRAFTS[source]
        if not (directory / DRAFT_MANIFEST).exists():
            raise SpecKVError(f"this installation ships no '{source}' draft; train one with `speckv distill`")
        return directory
    return Path(source)


def draft_kind(source: str) -> str:
    """`feature` for a feature head's directory, `model` for anything else (a draft model)."""
    if not draft_directory(source).is_dir():
        return "model"
    return "feature" if _read_manifest(draft_directory(source)).get("kind") == "feature" else "model"


def load_draft(source: str, target: LoadedModel) -> LoadedModel:
    """Load a draft model for `target`: a full model, or a SpecKV draft that borrows the target's
    embedding. (A feature head is not a model: `load_feature_drafter`.)"""
    directory = draft_directory(source)
    source = str(directory)
    manifest = _read_manifest(directory)
    if manifest.get("kind") == "feature":
        raise SpecKVError(
            f"'{directory}' is a feature head, not a draft model: it runs only in SpecKV's own decoder "
            "(use a draft model, e.g. demo-model, here)"
        )
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


def target_output_rows(target_model) -> torch.Tensor:
    """The target's output embedding as a plain fp32 matrix (its input embedding when tied)."""
    if getattr(target_model.config, "tie_word_embeddings", False):
        return target_model.get_input_embeddings().weight.detach().float()
    weight = target_model.get_output_embeddings().weight
    weight = weight.dequantize() if hasattr(weight, "dequantize") else weight
    return weight.detach().float()


def load_feature_drafter(source: str, target: LoadedModel):
    """A `FeatureDrafter` from a feature head's directory: its own weights and the target's
    embedding and output rows."""
    from safetensors.torch import load_file

    from speckv.decoding.drafters.feature import FeatureDrafter
    from speckv.decoding.feature_head import FeatureHead, FeatureHeadConfig

    directory = draft_directory(source)
    manifest = _read_manifest(directory)
    try:
        cfg = FeatureHeadConfig(**manifest["head"])
    except (KeyError, TypeError) as error:
        raise SpecKVError(
            f"feature head '{directory}': manifest has no usable 'head' settings ({_reason(error)})"
        ) from None
    config = target.model.config
    if cfg.hidden != config.hidden_size or max(cfg.features) > config.num_hidden_layers:
        raise SpecKVError(
            f"feature head '{directory}' was made for another target (hidden {cfg.hidden}, features "
            f"{cfg.features}; {target.name} has hidden {config.hidden_size}, {config.num_hidden_layers} layers)"
        )
    vocab_map = _load_vocab_map(directory, manifest) if manifest.get("vocab_map") else None
    embed = target.model.get_input_embeddings().weight.detach().float()
    rows = target_output_rows(target.model)
    head = FeatureHead(cfg, embed, rows if vocab_map is None else rows[vocab_map])
    weights = directory / manifest.get("weights", "head.safetensors")
    try:
        state = load_file(weights)
        head.load_state_dict({name: tensor.float() for name, tensor in state.items()})
    except Exception as error:  # missing, damaged or of other shapes
        raise SpecKVError(f"feature head weights {weights} cannot be loaded ({_reason(error)})") from None
    # On a GPU in the target's half precision; on a CPU in fp32, measured faster than bf16 for a
    # head this small at batch 1 (4.1 vs 4.9 ms a token, two threads).
    half = target.model.dtype in (torch.bfloat16, torch.float16) and target.device.type == "cuda"
    dtype = target.model.dtype if half else torch.float32
    head = head.to(device=target.device, dtype=dtype).eval()
    vocab_map = vocab_map.to(target.device) if vocab_map is not None else None
    return FeatureDrafter(head, vocab_map, config.vocab_size, manifest.get("name", directory.name))
