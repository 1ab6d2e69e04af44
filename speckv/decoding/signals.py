"""Per-token draft signals: what the draft's own distribution says about the token it proposed."""

from __future__ import annotations

import math

import torch

_LN2 = math.log(2.0)


def signal_tensor(log_probs: torch.Tensor, token_index: int) -> torch.Tensor:
    """(entropy in bits, confidence, token probability) as one tensor: one device sync to read."""
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum() / _LN2
    return torch.stack((entropy, probs.max(), probs[token_index]))


def logit_signals(logits: torch.Tensor, token_index: int) -> list[float]:
    """[entropy in bits, confidence, token probability] of one next-token distribution given as
    logits, the token at `token_index` of them."""
    return signal_tensor(torch.log_softmax(logits.float(), -1), token_index).tolist()
