"""Drafters behind one interface (`base.Drafter`): the small-model draft (chains or trees) and
n-gram candidates."""

from __future__ import annotations

from speckv.decoding.drafters.base import Drafter, Proposal, Verdict
from speckv.decoding.drafters.model import ModelDrafter
from speckv.decoding.drafters.ngram import NGramDrafter
from speckv.decoding.drafters.tree import ModelTreeDrafter
from speckv.decoding.models import LoadedModel
from speckv.errors import SpecKVError

DRAFTER_HELP = "a draft model (directory, .gguf, HF id; `demo` = the shipped one) or ngram[:MIN-MAX]"


def make_drafter(source: str, target: LoadedModel, tree: bool = False) -> Drafter:
    """`ngram[:MIN-MAX]` (model-free, default 1-4) or a draft model loaded for `target`; with
    `tree` a draft model grows token trees (for tree controllers)."""
    vocab_size = target.model.config.vocab_size
    name, _, arg = source.partition(":")
    if name == "ngram":
        low, _, high = arg.partition("-")
        try:
            return NGramDrafter(vocab_size, *(int(x) for x in (low, high or low) if arg))
        except ValueError:
            raise SpecKVError(
                f"bad n-gram drafter '{source}': use ngram or ngram:MIN-MAX, e.g. ngram:2-4"
            ) from None
    from speckv.decoding.draft_files import load_draft

    return model_drafter(load_draft(source, target), target, tree)


def model_drafter(draft: LoadedModel, target: LoadedModel, tree: bool = False) -> Drafter:
    """The drafter that runs a loaded draft model: token trees or chains."""
    return ModelTreeDrafter(draft) if tree else ModelDrafter(draft, target.model.config.vocab_size)


__all__ = [
    "DRAFTER_HELP",
    "Drafter",
    "ModelDrafter",
    "ModelTreeDrafter",
    "NGramDrafter",
    "Proposal",
    "Verdict",
    "make_drafter",
]
