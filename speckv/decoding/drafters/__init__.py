"""Drafters behind one interface (`base.Drafter`): the small-model draft and the feature head
(each chains or trees), n-gram candidates (from the sequence, or also from earlier sequences),
and a draft model's tree with an n-gram branch."""

from __future__ import annotations

from speckv.controllers.base import Drafts
from speckv.decoding.drafters.base import Drafter, Proposal, Verdict
from speckv.decoding.drafters.feature import FeatureDrafter, FeatureTreeDrafter
from speckv.decoding.drafters.hybrid import HybridTreeDrafter, SwitchingChainDrafter
from speckv.decoding.drafters.model import ModelDrafter
from speckv.decoding.drafters.ngram import NGramDrafter
from speckv.decoding.drafters.suffix import EarlierSequences, SuffixDrafter
from speckv.decoding.drafters.tree import ModelTreeDrafter, TreeDrafter
from speckv.decoding.models import LoadedModel
from speckv.errors import SpecKVError

# Model-free drafters by spec name: copies from the sequence itself, or also from earlier ones.
COPYING = {"ngram": NGramDrafter, "suffix": SuffixDrafter}


def make_drafter(source: str, target: LoadedModel, drafts: Drafts = Drafts.CHAINS) -> Drafter:
    """A drafter from its spec, for a controller whose budget counts `drafts`: `ngram[:MIN-MAX]`
    (model-free chains copied from the sequence itself, default 1-4); `suffix[:MIN-MAX]` (the same,
    also matching the earlier sequences of every drafter `fresh()` makes from this one); a feature
    head's directory (chains, its token trees for TREES); a draft model loaded for `target` (a
    token tree unless the controller plans chains); or `DRAFT+ngram[:MIN-MAX]` (or `+suffix`): for
    trees the model's tree with n-gram candidates as an extra branch, for chains the n-gram
    continuation instead of the model's chain at steps where the sequence's suffix has a long
    earlier match. The shipped name: `demo` (or `demo-model`), the demo target's draft model."""
    vocab_size = target.model.config.vocab_size
    base, plus, ngram = source.partition("+")
    if base.partition(":")[0] in COPYING and not plus:
        return _ngram(base, vocab_size)
    from speckv.decoding.draft_files import draft_kind, load_draft, load_feature_drafter

    if draft_kind(base) == "feature":
        if plus:
            raise SpecKVError(f"'{source}': n-gram branches join a draft model's tree, not a feature head's")
        chain = load_feature_drafter(base, target)
        # SpecKV's tree model is fitted on a draft model's signals: with a head it plans chains.
        return FeatureTreeDrafter(chain) if drafts is Drafts.TREES else chain
    drafter = model_drafter(load_draft(base, target), target, drafts)
    if not plus:
        return drafter
    if ngram.partition(":")[0] not in COPYING:
        raise SpecKVError(
            f"'{source}': only n-gram candidates join a draft model: DRAFT+ngram[:MIN-MAX] or DRAFT+suffix[:MIN-MAX]"
        )
    if drafter.branches:
        return HybridTreeDrafter(drafter, _ngram(ngram, vocab_size))
    return SwitchingChainDrafter(drafter, _ngram(ngram, vocab_size))


def _ngram(spec: str, vocab_size: int) -> NGramDrafter:
    name, _, arg = spec.partition(":")
    low, _, high = arg.partition("-")
    try:
        lengths = [int(x) for x in (low, high or low) if arg]
    except ValueError:
        raise SpecKVError(
            f"bad n-gram drafter '{spec}': use {name} or {name}:MIN-MAX, e.g. {name}:2-4"
        ) from None
    return COPYING[name](vocab_size, *lengths)


def model_drafter(draft: LoadedModel, target: LoadedModel, drafts: Drafts = Drafts.CHAINS) -> Drafter:
    """The drafter that runs a loaded draft model: token trees unless the controller plans chains."""
    if drafts is Drafts.CHAINS:
        return ModelDrafter(draft, target.model.config.vocab_size)
    return ModelTreeDrafter(draft)


__all__ = [
    "Drafter",
    "EarlierSequences",
    "FeatureDrafter",
    "FeatureTreeDrafter",
    "HybridTreeDrafter",
    "ModelDrafter",
    "ModelTreeDrafter",
    "TreeDrafter",
    "NGramDrafter",
    "SuffixDrafter",
    "SwitchingChainDrafter",
    "Proposal",
    "Verdict",
    "make_drafter",
    "model_drafter",
]
