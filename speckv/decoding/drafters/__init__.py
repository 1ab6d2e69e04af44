"""Drafters behind one interface (`base.Drafter`): the small-model draft today."""

from speckv.decoding.drafters.base import Drafter, Proposal, Verdict
from speckv.decoding.drafters.model import ModelDrafter

__all__ = ["Drafter", "ModelDrafter", "Proposal", "Verdict"]
