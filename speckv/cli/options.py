"""Arguments and helpers shared by several commands."""

from __future__ import annotations

from speckv.datasets import SPLITS

SPLIT_HELP = "train / heldout (by prompt id hash); dev / test halve heldout; all"


def split_list(text: str | None) -> list[str]:
    """Comma-separated values, blanks dropped."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def set_threads(threads: int | None) -> None:
    """torch's CPU thread count, when the user set one."""
    if threads:
        import torch

        torch.set_num_threads(threads)


__all__ = ["SPLITS", "SPLIT_HELP", "set_threads", "split_list"]
