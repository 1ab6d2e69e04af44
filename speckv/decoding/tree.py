"""Token trees: the attention mask and positions of one verify pass, and lossless acceptance.

A draft is a list of nodes in proposal order; `parents[i]` is the index of node i's parent, -1
for a child of the root (the last token of the sequence), and always < i, so every prefix of the
list is itself a tree. A chain is the tree whose node i has parent i − 1.

Pure functions of small tensors and lists, tested with hand-built trees. Target rows: row 0
scores the token after the root, row i + 1 the token after node i.
"""

from __future__ import annotations

import torch

from speckv.errors import SpecKVError


def chain_parents(length: int) -> list[int]:
    return list(range(-1, length - 1))


def check_parents(parents: list[int]) -> None:
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise SpecKVError(f"tree node {i} has parent {parent}: a parent must come before its child")


def depths(parents: list[int]) -> list[int]:
    """Depth of each node below the root (children of the root have depth 0)."""
    out: list[int] = []
    for parent in parents:
        out.append(0 if parent < 0 else out[parent] + 1)
    return out


def row_depths(parents: list[int]) -> list[int]:
    """For each target row of a verify pass, how many drafted tokens come before the token it
    scores: 0 for row 0 (after the root), depth + 1 for row i + 1 (after node i)."""
    return [0] + [depth + 1 for depth in depths(parents)]


def is_chain(parents: list[int]) -> bool:
    return all(parent == i - 1 for i, parent in enumerate(parents))


def tree_attention(parents: list[int], prefix_len: int, unseen: int = 0) -> torch.Tensor:
    """Boolean mask (unseen + n, prefix_len + unseen + n): who may attend to whom in one pass that
    feeds `unseen` sequence tokens (causal among themselves) and then the n tree nodes (each sees
    the whole sequence, its ancestors and itself)."""
    n = len(parents)
    rows = unseen + n
    mask = torch.zeros(rows, prefix_len + rows, dtype=torch.bool)
    mask[:, :prefix_len] = True
    mask[:, prefix_len : prefix_len + unseen] = torch.ones(rows, unseen, dtype=torch.bool).tril()
    for i, parent in enumerate(parents):
        row = unseen + i
        mask[row, prefix_len + row] = True
        if parent >= 0:
            mask[row, prefix_len : prefix_len + unseen + i] |= mask[
                unseen + parent, prefix_len : prefix_len + unseen + i
            ]
    return mask


def tree_positions(parents: list[int], start: int, unseen: int = 0) -> list[int]:
    """Position ids of the unseen sequence tokens (start, start + 1, …) then of the nodes (by depth)."""
    return [start + i for i in range(unseen)] + [start + unseen + d for d in depths(parents)]


def children_of(parents: list[int]) -> dict[int, list[int]]:
    """Node indices by parent (-1 = the root), in proposal order."""
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        children.setdefault(parent, []).append(i)
    return children


def greedy_tree_accept(
    tokens: list[int], parents: list[int], target_choice: list[int]
) -> tuple[list[int], int]:
    """The longest root path whose every token equals the target's argmax after its parent.

    `target_choice[0]` is the target's choice after the root, `target_choice[i + 1]` after node i.
    Returns (accepted node indices along the path, the target's token after the path)."""
    children = children_of(parents)
    path: list[int] = []
    row = 0
    while True:
        wanted = target_choice[row]
        match = next((c for c in children.get(path[-1] if path else -1, []) if tokens[c] == wanted), None)
        if match is None:
            return path, wanted
        path.append(match)
        row = match + 1


def sampling_tree_accept(
    tokens: list[int],
    parents: list[int],
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[list[int], int]:
    """Lossless multi-candidate rejection sampling for candidates fixed by the context.

    At each node the children are tried in order against the residual distribution r (the target's
    to begin with): child x is accepted with probability r(x); if rejected, r(x) is set to 0 and r
    renormalised, so the next sibling competes only for the remaining mass. Whatever the
    candidates, the token emitted after a node is distributed exactly as r started: accepting x
    has probability r(x), and the residual after rejecting x is r conditioned on "not x". When no
    child is accepted the token is drawn from the last residual. Rows of `target_probs`: 0 = after
    the root, i + 1 = after node i (already warped by temperature / top-p)."""
    children = children_of(parents)
    path: list[int] = []
    row = 0
    while True:
        residual = target_probs[row].clone()
        accepted = None
        for child in children.get(path[-1] if path else -1, []):
            token = tokens[child]
            mass = float(residual[token])
            if mass > 0 and float(torch.rand((), generator=generator)) * residual.sum() < mass:
                accepted = child
                break
            residual[token] = 0.0
        if accepted is None:
            total = residual.sum()
            # All mass rejected can happen only when the candidates cover the whole support.
            dist = residual / total if total > 0 else target_probs[row]
            return path, int(torch.multinomial(dist, 1, generator=generator))
        path.append(accepted)
        row = accepted + 1
