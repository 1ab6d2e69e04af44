"""Token trees: masks, positions and acceptance worked out by hand; tree passes equal plain passes."""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import (
    SMALL_VOCAB,
    PrefixController,
    assert_cache_is_fresh,
    chi_square_p,
    exact_first_two,
    loaded,
    tiny_model,
)
from scipy.stats import chisquare
from test_engine import reference_greedy

from speckv.controllers import Drafts, make_controller
from speckv.decoding.cache import CachedModel
from speckv.decoding.drafters import (
    HybridTreeDrafter,
    ModelDrafter,
    ModelTreeDrafter,
    NGramDrafter,
    SwitchingChainDrafter,
)
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.tree import (
    chain_parents,
    check_parents,
    depths,
    greedy_tree_accept,
    is_chain,
    row_depths,
    sampling_tree_accept,
    tree_attention,
    tree_positions,
)
from speckv.decoding.verify import SamplingConfig
from speckv.errors import SpecKVError

#        root
#       /    \
#     n0(10)  n1(11)
#     |   \
#   n2(12) n3(13)
#     |
#   n4(14)
PARENTS = [-1, -1, 0, 0, 2]
TOKENS = [10, 11, 12, 13, 14]


def test_shape_helpers_by_hand():
    assert depths(PARENTS) == [0, 0, 1, 1, 2]
    assert tree_positions(PARENTS, start=7) == [7, 7, 8, 8, 9]
    assert tree_positions(PARENTS, start=7, unseen=2) == [7, 8, 9, 9, 10, 10, 11]
    assert chain_parents(3) == [-1, 0, 1] and is_chain([-1, 0, 1]) and not is_chain(PARENTS)
    # Row 0 scores the token after the root; row i + 1 the token after node i, depth(i) + 1 in.
    assert row_depths(PARENTS) == [0, 1, 1, 2, 2, 3]
    assert row_depths(chain_parents(3)) == [0, 1, 2, 3] and row_depths([]) == [0]
    with pytest.raises(SpecKVError, match="parent must come before"):
        check_parents([-1, 2, 0])


def test_tree_attention_by_hand():
    # 2 cached positions, 1 unseen sequence token (u), then the 5 nodes.
    mask = tree_attention(PARENTS, prefix_len=2, unseen=1).int().tolist()
    #            c c u n0 n1 n2 n3 n4
    assert mask == [
        [1, 1, 1, 0, 0, 0, 0, 0],  # u
        [1, 1, 1, 1, 0, 0, 0, 0],  # n0: u + itself
        [1, 1, 1, 0, 1, 0, 0, 0],  # n1: not its sibling n0
        [1, 1, 1, 1, 0, 1, 0, 0],  # n2: n0 + itself
        [1, 1, 1, 1, 0, 0, 1, 0],  # n3: n0 + itself, not its sibling n2
        [1, 1, 1, 1, 0, 1, 0, 1],  # n4: n0, n2 + itself
    ]


def test_greedy_tree_accept_by_hand():
    # Target's choice after: root, n0, n1, n2, n3, n4.
    assert greedy_tree_accept(TOKENS, PARENTS, [10, 12, 0, 14, 0, 5]) == ([0, 2, 4], 5)
    assert greedy_tree_accept(TOKENS, PARENTS, [11, 0, 7, 0, 0, 0]) == ([1], 7)  # the second branch
    assert greedy_tree_accept(TOKENS, PARENTS, [10, 13, 0, 0, 8, 0]) == ([0, 3], 8)  # n0's 2nd child
    assert greedy_tree_accept(TOKENS, PARENTS, [3, 0, 0, 0, 0, 0]) == ([], 3)
    # A chain is the special case: draft [2, 0, 3] against target choices 2, 0, 3, 1.
    chain = chain_parents(3)
    assert greedy_tree_accept([2, 0, 3], chain, [2, 0, 3, 1]) == ([0, 1, 2], 1)  # all, bonus 1
    assert greedy_tree_accept([2, 1, 3], chain, [2, 0, 3, 1]) == ([0], 0)  # rejected at the 2nd
    assert greedy_tree_accept([], [], [4]) == ([], 4)


def test_sampling_tree_accept_follows_the_target_distribution():
    """The first emitted token must follow row 0 whatever the candidates; after an accepted n0 the
    second follows n0's row. 20,000 draws, χ² at p > 0.001 (seeded: deterministic)."""
    probs = torch.tensor(
        [
            [0.1, 0.2, 0.3, 0.4],  # after the root
            [0.7, 0.1, 0.1, 0.1],  # after n0 (token 1)
            [0.25, 0.25, 0.25, 0.25],  # after n1 (token 3)
            [0.5, 0.5, 0.0, 0.0],  # after n2 (token 0, child of n0)
        ],
        dtype=torch.float64,
    )
    tokens, parents = [1, 3, 0], [-1, -1, 0]
    generator = torch.Generator().manual_seed(0)
    first = np.zeros(4)
    second_after_1 = np.zeros(4)
    for _ in range(20000):
        path, token = sampling_tree_accept(tokens, parents, probs, generator)
        emitted = [tokens[i] for i in path] + [token]
        first[emitted[0]] += 1
        if emitted[0] == 1:
            second_after_1[emitted[1]] += 1
    assert chisquare(first, probs[0].numpy() * first.sum()).pvalue > 1e-3
    assert chisquare(second_after_1, probs[1].numpy() * second_after_1.sum()).pvalue > 1e-3
    # Power: the same counts are far from what the draft would give without the residual step.
    assert chisquare(first, np.array([0.05, 0.45, 0.05, 0.45]) * first.sum()).pvalue < 1e-3


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_tree_pass_and_a_gather_equal_plain_passes(attention):
    # Eager attention adds the mask to the scores: a boolean mask would mask nothing there.
    model = tiny_model(seed=1)
    model.config._attn_implementation = attention
    tiny_target = loaded(model, f"tiny-{attention}")
    prefix = [5, 6, 7, 8]
    cached = CachedModel(tiny_target)
    cached.feed(prefix[:2])
    # Two unseen sequence tokens, then the tree, in one pass.
    logits = cached.feed(prefix[2:] + TOKENS, keep=len(TOKENS) + 1, parents=PARENTS).logits[0]
    paths = {0: [10], 1: [11], 2: [10, 12], 3: [10, 13], 4: [10, 12, 14]}
    with torch.no_grad():
        torch.testing.assert_close(
            logits[0], model(torch.tensor([prefix])).logits[0, -1], rtol=1e-4, atol=1e-5
        )
        for node, path in paths.items():
            fresh = model(torch.tensor([prefix + path])).logits[0, -1]
            torch.testing.assert_close(logits[node + 1], fresh, rtol=1e-4, atol=1e-5)
    # Keep the sequence plus the path n0 → n2 → n4: the cache equals a fresh pass over it.
    cached.keep_positions([0, 1, 2, 3, 4, 6, 8])
    following = cached.feed([3], keep=1).logits[0, -1]
    with torch.no_grad():
        fresh = model(torch.tensor([prefix + [10, 12, 14, 3]])).logits[0, -1]
    torch.testing.assert_close(following, fresh, rtol=1e-4, atol=1e-5)


# --- decoding with trees -----------------------------------------------------------------------

TREE_SPECS = ["tree:1", "tree:2", "tree:4", "tree:8", "tree:16", "heuristic", "confidence:0.5"]


@pytest.mark.parametrize("spec", TREE_SPECS)
@pytest.mark.parametrize("draft_name", ["close", "unrelated"])
def test_greedy_tree_decoding_equals_target_greedy(tiny_target, tiny_drafts, spec, draft_name):
    drafter = ModelTreeDrafter(tiny_drafts[draft_name])
    decoder = SpeculativeDecoder(tiny_target, drafter, make_controller(spec), eos_token_ids=())
    for prompt in ([5], [7, 3, 9, 11, 2], list(range(2, 32))):
        result = decoder.generate(prompt, 23)
        assert result.token_ids == reference_greedy(tiny_target.model, prompt, 23)
        for step in result.steps:
            assert 0 <= step.accepted <= step.depth <= step.gamma


def test_tree_caches_equal_a_fresh_pass_after_every_step(tiny_target, tiny_drafts):
    drafter = ModelTreeDrafter(tiny_drafts["close"], top_k=3)
    decoder = SpeculativeDecoder(tiny_target, drafter, make_controller("tree:8"), eos_token_ids=())
    prompt = [2, 3, 5, 7]
    tokens = list(prompt)
    branched = off_prefix = 0
    for record, new_tokens in decoder.stream(prompt, max_new_tokens=30):
        tokens.extend(new_tokens)
        branched += record.depth < record.gamma
        path = decoder.verifier._path
        off_prefix += path != list(range(len(path)))  # a side branch won: the caches were gathered
        for cached_model in (decoder.verifier.model, drafter.model):
            assert_cache_is_fresh(cached_model, tokens)
    assert branched >= 3 and off_prefix >= 2  # the trees branched, and side branches were kept


@pytest.mark.parametrize("config", [SamplingConfig(1.0), SamplingConfig(1.0, top_k=3, min_p=0.3)])
def test_sampling_with_trees_follows_the_target_distribution(config):
    target = loaded(tiny_model(seed=10, vocab=SMALL_VOCAB, head_scale=6.0, eos=0), "small-target")
    draft = loaded(tiny_model(seed=11, vocab=SMALL_VOCAB, head_scale=6.0, eos=0), "small-draft")
    exact = exact_first_two(target.model, [3, 1], config)
    counts = np.zeros((SMALL_VOCAB, SMALL_VOCAB))
    drafter = ModelTreeDrafter(draft, top_k=2)
    for seed in range(1200):
        decoder = SpeculativeDecoder(
            target, drafter, make_controller("tree:4"), replace(config, seed=seed), ()
        )
        result = decoder.generate([3, 1], 3)
        counts[result.token_ids[0], result.token_ids[1]] += 1
    assert chi_square_p(counts, exact) > 1e-3


def test_a_tree_yields_more_tokens_per_step_than_a_chain_of_its_size(tiny_target, tiny_drafts):
    """Same drafter, same budget: the best-first tree accepts at least as much as the chain."""
    draft = tiny_drafts["close"]
    per_step = {}
    for name, drafter, spec in (
        ("chain", ModelDrafter(draft, tiny_target.model.config.vocab_size), "fixed:6"),
        ("tree", ModelTreeDrafter(draft), "tree:6"),
    ):
        decoder = SpeculativeDecoder(tiny_target, drafter, make_controller(spec), eos_token_ids=())
        results = [decoder.generate(p, 40) for p in ([5], [7, 3, 9, 11, 2], list(range(2, 32)))]
        per_step[name] = sum(len(r.token_ids) for r in results) / sum(len(r.steps) for r in results)
    assert per_step["tree"] >= per_step["chain"]


def _path_scores(draft, context, top_k, depth):
    """Every path of the full top-k tree up to `depth`, with its log-probability, by plain passes."""
    scores, frontier = {}, [((), 0.0)]
    for _ in range(depth):
        grown = []
        for path, score in frontier:
            with torch.no_grad():
                logits = draft.model(torch.tensor([context + list(path)])).logits[0, -1]
            values, indices = torch.log_softmax(logits.float(), -1).topk(top_k)
            for logp, token in zip(values.tolist(), indices.tolist(), strict=True):
                scores[(*path, token)] = score + logp
                grown.append(((*path, token), score + logp))
        frontier = grown
    return scores


@pytest.mark.parametrize("budget", [1, 3, 5, 9])
def test_the_tree_is_the_budget_best_paths_of_the_draft(tiny_drafts, budget):
    """With every candidate expandable per round, the proposals are exactly the `budget` paths of
    highest draft probability, best first, though the tree grows one batched forward per round."""
    draft = tiny_drafts["unrelated"]
    context = [7, 3, 9, 11, 2]
    drafter = ModelTreeDrafter(draft, top_k=2, width=64)
    drafter.begin()
    proposals = list(drafter.draft(context, budget, SamplingConfig(), None))
    paths = []
    for proposal in proposals:
        paths.append((*(() if proposal.parent < 0 else paths[proposal.parent]), proposal.token))
    scores = _path_scores(draft, context, 2, budget)
    best = sorted(scores, key=lambda path: -scores[path])[:budget]
    assert set(paths) == set(best)
    got = [scores[path] for path in paths]
    assert got == sorted(got, reverse=True)
    assert drafter.forwards <= max(depths([p.parent for p in proposals]), default=0) + 1


def test_a_tree_costs_one_draft_forward_per_round_not_per_node(tiny_target, tiny_drafts):
    drafter = ModelTreeDrafter(tiny_drafts["close"], top_k=4, width=4)
    decoder = SpeculativeDecoder(tiny_target, drafter, make_controller("tree:16"), eos_token_ids=())
    rounds = nodes = 0
    for record, _ in decoder.stream([7, 3, 9, 11, 2], max_new_tokens=40):
        rounds, nodes = rounds + drafter.forwards, nodes + record.gamma
    assert rounds * 2 < nodes  # 16 nodes cost a handful of draft passes, not 16
    # proposals are lazy: a loop that stops pulling after two nodes paid at most two rounds
    drafter.begin()
    first_two = list(itertools.islice(drafter.draft([7, 3, 9, 11, 2], 16, SamplingConfig(), None), 2))
    assert len(first_two) == 2 and drafter.forwards <= 2


def test_generate_with_a_tree_controller(capsys, tiny_model_dirs):
    from speckv.cli import main

    common = ["generate", "--target", str(tiny_model_dirs["target"]), "--prompt", "w5 w6 w7"]
    common += ["--max-new-tokens", "12", "--json", "--compression", "fp32"]
    assert main([*common, "--draft", str(tiny_model_dirs["draft"]), "--controller", "tree:8"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["config"]["controller"] == "tree:8" and all("depth" in s for s in record["steps"])
    assert main([*common, "--no-draft"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == record["token_ids"]


# --- n-gram branches in a model tree -----------------------------------------------------------


@pytest.mark.parametrize("spec", ["tree:2", "tree:6", "tree:16"])
def test_greedy_with_ngram_branches_equals_target_greedy(tiny_target, tiny_drafts, spec):
    base = [7, 3, 9, 11, 2]
    prompt = base + reference_greedy(tiny_target.model, base, 12) + [5] + base  # copying pays here
    expected = reference_greedy(tiny_target.model, prompt, 30)
    model_tree = ModelTreeDrafter(tiny_drafts["unrelated"])
    drafter = HybridTreeDrafter(model_tree, NGramDrafter(tiny_target.model.config.vocab_size))
    decoder = SpeculativeDecoder(tiny_target, drafter, make_controller(spec), eos_token_ids=())
    tokens = list(prompt)
    for _, new_tokens in decoder.stream(prompt, 30):
        tokens.extend(new_tokens)
        cached = model_tree.model  # the draft's cache stays a valid prefix of the sequence
        with torch.no_grad():
            expected_logits = cached.loaded.model(torch.tensor([tokens[: cached.length + 1]])).logits[0, -1]
            got = cached.loaded.model(
                torch.tensor([tokens[cached.length : cached.length + 1]]), cache=copy.deepcopy(cached.cache)
            ).logits[0, -1]
        torch.testing.assert_close(got, expected_logits, rtol=1e-4, atol=1e-4)
    result = decoder.generate(prompt, 30)
    assert result.token_ids == expected
    assert sum(s.accepted for s in result.steps) >= 5  # the n-gram branch was accepted


def test_sampling_with_ngram_branches_follows_the_target_distribution():
    target = loaded(tiny_model(seed=10, vocab=SMALL_VOCAB, head_scale=6.0, eos=0), "small-target")
    draft = loaded(tiny_model(seed=11, vocab=SMALL_VOCAB, head_scale=6.0, eos=0), "small-draft")
    prompt = [3, 1, 2, 3, 1, 4, 3, 1]
    exact = exact_first_two(target.model, prompt, SamplingConfig(1.0))
    counts = np.zeros((SMALL_VOCAB, SMALL_VOCAB))
    drafter = HybridTreeDrafter(ModelTreeDrafter(draft, top_k=2), NGramDrafter(SMALL_VOCAB), ngram_tokens=2)
    for seed in range(1200):
        decoder = SpeculativeDecoder(
            target, drafter, make_controller("tree:4"), SamplingConfig(1.0, seed=seed), ()
        )
        result = decoder.generate(prompt, 3)
        counts[result.token_ids[0], result.token_ids[1]] += 1
    assert chi_square_p(counts, exact) > 1e-3


def test_hybrid_drafter_specs(tiny_model_dirs, tiny_target):
    from speckv.decoding.drafters import make_drafter

    draft_dir = str(tiny_model_dirs["draft"])
    assert isinstance(make_drafter(f"{draft_dir}+ngram:2-3", tiny_target, Drafts.TREES), HybridTreeDrafter)
    chain = make_drafter(f"{draft_dir}+ngram:2-3", tiny_target, Drafts.CHAINS)
    assert isinstance(chain, SwitchingChainDrafter) and chain.ngram.name == "ngram:2-3"
    with pytest.raises(SpecKVError, match="only n-gram candidates join a draft model"):
        make_drafter(f"{draft_dir}+other", tiny_target, Drafts.TREES)


def test_eos_inside_a_tree(tiny_target, tiny_drafts):
    prompt = [4, 6, 8]
    free_run = reference_greedy(tiny_target.model, prompt, 40)
    eos = next(t for i, t in enumerate(free_run) if i >= 3 and t not in free_run[:i])
    expected = free_run[: free_run.index(eos) + 1]
    for spec in ("tree:3", "tree:8", "tree:16"):
        drafter = ModelTreeDrafter(tiny_drafts["identical"])
        result = SpeculativeDecoder(
            tiny_target, drafter, make_controller(spec), eos_token_ids=[eos]
        ).generate(prompt, 40)
        assert result.token_ids == expected and result.stop_reason == "eos"
        assert result.steps[-1].accepted >= 1  # the EOS came from the tree, not the bonus token


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5])
def test_verifying_a_prefix_of_a_tree_stays_lossless(tiny_target, tiny_drafts, threshold):
    controller = PrefixController(budget=8, threshold=threshold)
    controller.drafts = Drafts.TREES
    drafter = ModelTreeDrafter(tiny_drafts["close"])
    decoder = SpeculativeDecoder(tiny_target, drafter, controller, eos_token_ids=())
    for prompt in ([5], [7, 3, 9, 11, 2]):
        result = decoder.generate(prompt, 23)
        assert result.token_ids == reference_greedy(tiny_target.model, prompt, 23)
    assert controller.asked > 0


def test_sliding_window_caches_refuse_a_rollback():
    """Their layers forget old positions and count positions their own way: a clear error, not a
    silently wrong cache."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
    )
    torch.manual_seed(0)
    cached = CachedModel(loaded(MistralForCausalLM(config).eval(), "tiny-mistral"))
    cached.feed([1, 2, 3, 4, 5, 6])
    with pytest.raises(SpecKVError, match="sliding-window"):
        cached.crop(3)
    with pytest.raises(SpecKVError, match="sliding-window"):
        cached.keep_positions([0, 1, 2, 5])
