"""The feature drafters: chains and token trees drafted with a feature head (`speckv.decoding.feature_head`) from the
target's own hidden states, which the verify pass returns (`target_hidden_layers`).

Positions whose target features are known (the prompt after the first pass, then every accepted
token) feed the head with those features; drafted positions feed it its own output. So the first
step of a sequence drafts nothing (the target has not seen the prompt yet), and after each
verification the head's cache is cut back to the positions fed with true features.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from speckv.decoding.drafters.base import Drafter, Proposal, Verdict, on_target_vocab
from speckv.decoding.drafters.tree import TreeDrafter
from speckv.decoding.feature_head import FeatureHead, HeadCache
from speckv.decoding.signals import signal_tensor
from speckv.decoding.verify import SamplingConfig, sample, warp_probs


class FeatureDrafter(Drafter):
    """Chains drafted by a feature head; `vocab_map` maps its reduced vocabulary to the target's."""

    def __init__(self, head: FeatureHead, vocab_map: torch.Tensor | None, target_vocab_size: int, name: str):
        self.head = head
        self.name = name
        self.vocab_map = vocab_map
        self.target_vocab_size = target_vocab_size
        self.target_hidden_layers = tuple(head.cfg.features)
        self.begin()

    def fresh(self) -> FeatureDrafter:
        """Another drafter on the same head (one per concurrent sequence; the weights are shared)."""
        return FeatureDrafter(self.head, self.vocab_map, self.target_vocab_size, self.name)

    def begin(self) -> None:
        self.cache = HeadCache()  # slot j-1 holds position j's keys: position 0 has no input
        self.features: torch.Tensor | None = None  # (positions known, layers, hidden)

    def draft(
        self,
        context: list[int],
        budget: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Iterator[Proposal]:
        n = len(context)
        last = self.catch_up(context) if budget >= 1 else None
        if last is None:
            return
        with torch.inference_mode():
            for position in range(n, n + budget):
                proposal = self._propose(last, sampling, generator)
                yield proposal
                last = self._feed([proposal.token], last[0, -1:], position)  # only if the loop asks for more

    def catch_up(self, context: list[int]) -> torch.Tensor | None:
        """Feed the context positions the head has not seen, with their true features; the
        outputs (the last one drafts the next token), or None when the target has not yet seen
        the context (the first step of a sequence)."""
        n = len(context)
        if self.features is None or len(self.features) < n - 1 or n < 2:
            return None
        start = self.cache.length + 1
        with torch.inference_mode():
            return self._feed(context[start:n], self.head.fused(self.features[start - 1 : n - 1]), start)

    def _propose(self, last: torch.Tensor, sampling: SamplingConfig, generator) -> Proposal:
        logits = self.head.logits(last)[0, -1].float()
        probs = None
        if sampling.greedy:
            index = int(logits.argmax())
        else:
            warped = warp_probs(logits, sampling).cpu()
            index = sample(warped, generator)
            probs = on_target_vocab(warped, self.vocab_map, self.target_vocab_size)
        token = index if self.vocab_map is None else int(self.vocab_map[index])
        entropy, confidence, token_prob = signal_tensor(torch.log_softmax(logits, -1), index).tolist()
        return Proposal(token, entropy, confidence, token_prob, probs)

    def chains_along(
        self, prompt_ids: list[int], tokens: list[int], features: torch.Tensor, length: int, eos: set[int]
    ) -> list[list[Proposal]]:
        """For every t, the greedy chain (up to `length` tokens, cut after EOS) a step starting
        after prompt + tokens[:t] drafts, given the target's features of prompt + tokens[:-1]
        (one row per position): what replay needs, from one pass over the true rows plus the
        chains' own tokens. t = 0 drafts nothing: the target has not seen the prompt then."""
        sequence = list(prompt_ids) + list(tokens)
        p, greedy = len(prompt_ids), SamplingConfig()
        if len(tokens) < 2:
            return [[] for _ in tokens]
        self.begin()
        with torch.inference_mode():
            features = features.to(self.head.fuse.weight.dtype)
            outs = self._feed(sequence[1:-1], self.head.fused(features[: len(sequence) - 2]), 1)
            full = self.cache.kv
            chains: list[list[Proposal]] = [[]]
            for t in range(1, len(tokens)):
                known = p + t  # context length of the step; rows for positions 1..known-1
                self.cache.kv = [(k[:, :, : known - 1], v[:, :, : known - 1]) for k, v in full]
                last, chain = outs[:, known - 2 : known - 1], []
                for position in range(known, known + length):
                    chain.append(self._propose(last, greedy, None))
                    if chain[-1].token in eos or len(chain) == length:
                        break
                    last = self._feed([chain[-1].token], last[0, -1:], position)
                chains.append(chain)
        self.begin()
        return chains

    def _feed(self, tokens: list[int], states: torch.Tensor, first_position: int) -> torch.Tensor:
        device = self.head.fuse.weight.device
        ids = torch.tensor([tokens], device=device)
        positions = torch.arange(first_position, first_position + len(tokens), device=device)[None]
        out, kvs = self.head(ids, states[None], positions, past=self.cache.kv)
        self.cache.append(kvs)
        return out

    def rollback(self, kept: int, verdict: Verdict) -> None:
        hidden = verdict.hidden_states
        if hidden is None:
            raise RuntimeError("the verifier returned no hidden states to a feature drafter")
        rows = torch.stack(hidden, 1).to(self.head.fuse.weight.dtype)  # (fed, layers, hidden)
        # Rows: the context positions the target had not seen, then one per drafted node.
        unseen = kept - verdict.accepted - (0 if self.features is None else len(self.features))
        new = torch.cat([rows[:unseen], rows[unseen + torch.tensor(verdict.path, dtype=torch.long)]])
        self.features = new if self.features is None else torch.cat([self.features, new])
        # Positions from the first drafted one on were fed the head's own states: recomputed.
        self.cache.crop(kept - verdict.accepted - 1)


class FeatureTreeDrafter(TreeDrafter):
    """A feature head's token trees (`tree:N`): a node is fed the head's own output at its parent
    as its state, as a chain's drafted tokens are. Features and the head's cache are kept by the
    chain drafter it wraps: after verification every tree row is dropped, and the accepted path
    is fed again with the target's true features next step."""

    def __init__(self, chain: FeatureDrafter, top_k: int = 4, width: int = 4):
        super().__init__(chain.vocab_map, top_k, width)
        self.chain = chain
        self.name = f"{chain.name} tree:top{top_k}"
        self.target_hidden_layers = chain.target_hidden_layers
        self._root_output: torch.Tensor | None = None

    def fresh(self) -> FeatureTreeDrafter:
        return FeatureTreeDrafter(self.chain.fresh(), self.top_k, self.width)

    def begin(self) -> None:
        self.chain.begin()
        self._nodes, self._proposed = [], []

    def _root(self, context: list[int]) -> torch.Tensor | None:
        last = self.chain.catch_up(context)
        if last is None:
            return None
        self._root_output = last[0, -1]
        with torch.inference_mode():
            return self.chain.head.logits(last)[0, -1]

    def _cache_length(self) -> int:
        return self.chain.cache.length

    def _forward(self, indices: list[int], attention: torch.Tensor, positions: list[int]) -> torch.Tensor:
        head, cache = self.chain.head, self.chain.cache
        device = head.fuse.weight.device
        nodes = [self._nodes[i] for i in indices]
        states = torch.stack(
            [self._root_output if n.parent < 0 else self._nodes[n.parent].output for n in nodes]
        )
        with torch.inference_mode():
            out, kvs = head(
                torch.tensor([[n.token for n in nodes]], device=device),
                states[None],
                torch.tensor([positions], device=device),
                past=cache.kv,
                mask=attention[None, None].to(device),
            )
            cache.append(kvs)
            for node, row in zip(nodes, out[0], strict=True):
                node.output = row
            return head.logits(out)[0]

    def _keep(self, kept: int, verdict: Verdict, fed: list[int] | None) -> None:
        self.chain.rollback(kept, verdict)
