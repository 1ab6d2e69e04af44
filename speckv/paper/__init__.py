"""Reproduce and audit the SpecKV paper's offline evaluation from its released CSVs.

`reproduce` follows the protocol of the paper's released notebooks exactly, flaws included
(see the data's README): a step-level random split, predictors refit on every row before the
policy evaluation, and every policy scored by the predictor's own prediction.

`audit` evaluates the same data honestly: policies scored with observed outcomes, predictors
restricted to signals that exist before γ is chosen, a split by prompt, and a wall-clock cost
model, because tokens per step ignores what the drafted tokens cost.

Modules: `data` (the CSVs and their checks), `protocol` (the paper's protocol), `reproduce`,
and for the audit `prompts` (prompt recovery, cross-fitting by prompt), `replay`, `scoring`,
`leakage`, `cost`, `claims` and `audit`; `results` holds what both commands' reports share.
"""

from __future__ import annotations

from speckv.paper.audit import audit
from speckv.paper.reproduce import reproduce

__all__ = ["audit", "reproduce"]
