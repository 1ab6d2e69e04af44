"""Writing a trained draft as the directory `speckv.decoding.draft_files.load_draft` reads.

Only the draft's own weights are stored (bf16); the embedding and head come from the target when
the draft is loaded, restricted to the saved vocabulary map. See docs/draft.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from speckv.decoding.draft_files import DRAFT_MANIFEST
from speckv.distill.draft_model import trainable_state


def save_draft(draft, vocab_map: torch.Tensor | None, tokenizer, out: Path, manifest: dict) -> None:
    """Write the directory `load_draft` reads: config, tokenizer, own weights (bf16), vocabulary map
    and the manifest (`manifest` plus the names of the weight files)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    draft.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    weights = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in trainable_state(draft).items()}
    save_file(weights, out / "draft.safetensors")
    if vocab_map is not None:
        save_file({"vocab_map": vocab_map.to(torch.int32).contiguous()}, out / "vocab_map.safetensors")
    elif (out / "vocab_map.safetensors").exists():  # an earlier save's: it would contradict the manifest
        (out / "vocab_map.safetensors").unlink()
    manifest = {
        **manifest,
        "weights": "draft.safetensors",
        "vocab_map": "vocab_map.safetensors" if vocab_map is not None else None,
    }
    (out / DRAFT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def save_feature_head(head, vocab_map: torch.Tensor | None, out: Path, manifest: dict) -> None:
    """Write a feature head's directory (`load_feature_drafter` reads it): its own weights (bf16),
    the vocabulary map and the manifest (kind `feature`, the head's shape). The embedding and the
    output rows are the target's, and so is the tokenizer: none is stored."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    weights = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in head.state_dict().items()}
    save_file(weights, out / "head.safetensors")
    if vocab_map is not None:
        save_file({"vocab_map": vocab_map.to(torch.int32).contiguous()}, out / "vocab_map.safetensors")
    elif (out / "vocab_map.safetensors").exists():
        (out / "vocab_map.safetensors").unlink()
    manifest = {
        **manifest,
        "kind": "feature",
        "head": head.cfg.to_dict(),
        "weights": "head.safetensors",
        "vocab_map": "vocab_map.safetensors" if vocab_map is not None else None,
    }
    (out / DRAFT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
