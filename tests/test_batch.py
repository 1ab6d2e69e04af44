"""Several sequences in one target pass (`speckv.decoding.batch`): each sequence's output is what
it is alone, whatever the others draft, however long their prompts, and when they join or end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine import reference_greedy

from speckv.controllers import make_controller
from speckv.controllers.batch_budget import BatchCosts, SharedVerifyBudget, share_verify
from speckv.controllers.speckv import SpecKVController
from speckv.costs import CostModel
from speckv.decoding.batch import BatchPace, step_together
from speckv.decoding.cache import CachedModel, Feed
from speckv.decoding.drafters import ModelDrafter, ModelTreeDrafter, NGramDrafter, SwitchingChainDrafter
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.slots import SOLO_TOKENS, SlotStore
from speckv.decoding.verify import SamplingConfig
from speckv.errors import SpecKVError

PROMPTS = [[5], [7, 3, 9, 11, 2], [12, 13, 14, 12, 13, 14, 12, 13], list(range(3, 40)), [9, 9]]


def decoders(target, drafts, sampling=None):
    """A mix: target alone, chains of two drafts, a tree, n-grams."""
    return [
        SpeculativeDecoder(target, None, None, sampling, eos_token_ids=()),
        SpeculativeDecoder(target, drafts["close"], make_controller("fixed:3"), sampling, eos_token_ids=()),
        SpeculativeDecoder(
            target, drafts["unrelated"], make_controller("heuristic"), sampling, eos_token_ids=()
        ),
        SpeculativeDecoder(
            target, ModelTreeDrafter(drafts["close"]), make_controller("tree:6"), sampling, eos_token_ids=()
        ),
        SpeculativeDecoder(target, NGramDrafter(64), make_controller("fixed:4"), sampling, eos_token_ids=()),
    ]


def draft_stores(decoders_):
    """One draft store per draft model the decoders' chains run."""
    stores = {}
    for decoder in decoders_:
        chain = decoder.drafter.chain_drafter() if decoder.drafter is not None else None
        if chain is not None:
            stores.setdefault(id(chain.loaded), SlotStore(chain.loaded))
    return lambda decoder: stores.get(
        id(getattr(decoder.drafter and decoder.drafter.chain_drafter(), "loaded", None))
    )


def run_batch(runs, prompt_budget=None, join_at=None):
    """Tick until every run is done; `join_at[i]` = the tick run i joins at."""
    outputs = {i: [] for i in range(len(runs))}
    tick = 0
    while not all(run.done for run in runs):
        live = [i for i, run in enumerate(runs) if not run.done and (join_at or {}).get(i, 0) <= tick]
        for i, result in zip(live, step_together([runs[i] for i in live], prompt_budget), strict=True):
            if result is not None:
                outputs[i].extend(result[1])
        tick += 1
    for run in runs:
        run.close()  # rows back to their stores
    return [outputs[i] for i in range(len(runs))]


@pytest.mark.parametrize(("prompt_budget", "batched_drafts"), [(None, False), (4, False), (None, True)])
def test_each_sequence_of_a_batch_decodes_as_alone(tiny_target, tiny_drafts, prompt_budget, batched_drafts):
    store = SlotStore(tiny_target)
    made = decoders(tiny_target, tiny_drafts)
    store_for = draft_stores(made) if batched_drafts else lambda _: None
    runs = [
        d.start(p, 20, cache=store.acquire(), draft_store=store_for(d))
        for d, p in zip(made, PROMPTS, strict=True)
    ]
    outputs = run_batch(runs, prompt_budget, join_at={3: 2, 4: 5})  # two join late
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output == reference_greedy(tiny_target.model, prompt, 20)


def test_the_batch_drafts_every_chain_in_one_pass_per_round(tiny_target, tiny_drafts, monkeypatch):
    draft = tiny_drafts["close"]
    vocab = tiny_target.model.config.vocab_size
    made = [
        SpeculativeDecoder(tiny_target, draft, make_controller("fixed:3"), eos_token_ids=()),
        SpeculativeDecoder(tiny_target, draft, make_controller("heuristic"), eos_token_ids=()),
        SpeculativeDecoder(  # the model's chain or the n-gram's, per step
            tiny_target,
            SwitchingChainDrafter(ModelDrafter(draft, vocab), NGramDrafter(vocab)),
            make_controller("fixed:4"),
            eos_token_ids=(),
        ),
    ]
    store, draft_store = SlotStore(tiny_target), SlotStore(draft)
    passes = []
    forward = SlotStore.forward
    monkeypatch.setattr(
        SlotStore, "forward", lambda self, feeds: passes.append((self, len(feeds))) or forward(self, feeds)
    )
    prompts = PROMPTS[1:4]
    runs = [
        d.start(p, 24, cache=store.acquire(), draft_store=draft_store)
        for d, p in zip(made, prompts, strict=True)
    ]
    outputs = run_batch(runs)
    assert outputs == [reference_greedy(tiny_target.model, p, 24) for p in prompts]
    shared = [rows for s, rows in passes if s is draft_store and rows > 1]
    alone = [rows for s, rows in passes if s is draft_store and rows == 1]
    assert shared and max(shared) == 3  # every chain's next token in one pass
    # Alone, every row fed would be a pass of its own.
    assert len(shared) + len(alone) < 0.7 * (sum(shared) + len(alone)), (shared, alone)
    assert not draft_store.lengths and not store.lengths  # every row went back
    # A store of another model's caches is refused.
    with pytest.raises(SpecKVError, match="draft store holds"):
        made[0].start([5], 4, draft_store=SlotStore(tiny_drafts["unrelated"]))


def test_a_batch_drafts_from_the_source_speckv_chose_each_step(tiny_target, tiny_drafts, monkeypatch):
    # SpecKV picks copies or the model per step; the batch must run the draft pass of the
    # sequences whose model drafts (chosen before the pass is prepared), and stay lossless.
    draft, vocab = tiny_drafts["close"], tiny_target.model.config.vocab_size
    chosen = []
    use_copies = SwitchingChainDrafter.use_copies
    monkeypatch.setattr(
        SwitchingChainDrafter, "use_copies", lambda self, c: chosen.append(c) or use_copies(self, c)
    )
    made = [
        SpeculativeDecoder(
            tiny_target,
            SwitchingChainDrafter(ModelDrafter(draft, vocab), NGramDrafter(vocab)),
            make_controller("speckv", compression="fp32"),
            eos_token_ids=(),
        )
        for _ in range(2)
    ]
    store, draft_store = SlotStore(tiny_target), SlotStore(draft)
    base = [7, 3, 9, 11, 2]
    prompts = [base + reference_greedy(tiny_target.model, base, 10) + base, PROMPTS[1]]
    runs = [
        d.start(p, 24, cache=store.acquire(), draft_store=draft_store)
        for d, p in zip(made, prompts, strict=True)
    ]
    assert run_batch(runs) == [reference_greedy(tiny_target.model, p, 24) for p in prompts]
    assert True in chosen and False in chosen  # both sources were chosen
    assert not draft_store.lengths and not store.lengths


def test_a_long_prompt_is_read_in_chunks_while_others_step(tiny_target, tiny_drafts):
    short, long = decoders(tiny_target, tiny_drafts)[1:3]
    store = SlotStore(tiny_target)
    runs = [
        short.start([5, 6], 12, cache=store.acquire()),
        long.start(list(range(3, 60)), 4, cache=store.acquire()),
    ]
    first = step_together(runs, prompt_budget=16)
    # The short one stepped (its pass read its last prompt token); the long one read 15 of 56.
    assert first[0] is not None and first[1] is None
    assert long.verifier.model.length == 15
    outputs = run_batch(runs, prompt_budget=16)
    assert outputs[1] == reference_greedy(tiny_target.model, list(range(3, 60)), 4)


def test_sampled_sequences_in_a_batch_reproduce_their_seeds(tiny_target, tiny_drafts):
    sampling = SamplingConfig(temperature=1.0, seed=7)
    alone = [
        d.generate(p, 16).token_ids
        for d, p in zip(decoders(tiny_target, tiny_drafts, sampling), PROMPTS, strict=True)
    ]
    store = SlotStore(tiny_target)
    made = decoders(tiny_target, tiny_drafts, sampling)
    store_for = draft_stores(made)
    runs = [
        d.start(p, 16, cache=store.acquire(), draft_store=store_for(d))
        for d, p in zip(made, PROMPTS, strict=True)
    ]
    assert run_batch(runs) == alone


def test_the_store_gives_each_row_its_own_logits_and_cache(tiny_target, monkeypatch):
    monkeypatch.setattr("speckv.decoding.slots.MIN_CAPACITY", 4)  # grow during the test
    store = SlotStore(tiny_target)
    rows = [store.acquire() for _ in range(3)]
    alone = [CachedModel(tiny_target) for _ in range(3)]
    for row, model, tokens in zip(rows[:2], alone[:2], ([5, 6, 7, 8], [9]), strict=True):
        row.feed(tokens)
        model.feed(tokens)
    feeds = [
        Feed([3, 4], keep=2),
        Feed([10, 11, 12], keep=1, parents=[-1, -1]),
        Feed([20, 21, 22, 23, 24], keep=0),
    ]
    outputs = store.forward({row.row: feed for row, feed in zip(rows, feeds, strict=True)})
    for row, model, feed in zip(rows, alone, feeds, strict=True):
        expected = model.feed(**vars(feed))
        mine = outputs[row.row]
        assert mine.logits.shape == expected.logits.shape  # keep 0: every row, as alone
        torch.testing.assert_close(mine.logits, expected.logits, rtol=1e-4, atol=1e-4)
        assert row.length == model.length
    # A row leaves: the last one moves into its place and keeps its cache.
    before = store.keys[0][2, :, : rows[2].length].clone()
    rows[0].release()
    assert rows[2].row == 0 and rows[1].row == 1 and store.lengths == [5, 4]
    torch.testing.assert_close(store.keys[0][0, :, : rows[2].length], before)
    next_alone = alone[2].feed([30], keep=1).logits
    torch.testing.assert_close(rows[2].feed([30]).logits, next_alone, rtol=1e-4, atol=1e-4)
    rows[1].release()
    rows[2].release()
    assert store.bytes == 0  # nobody left: the memory goes back
    with pytest.raises(SpecKVError, match="not held"):
        rows[2].release()
    again = store.acquire()
    with pytest.raises(SpecKVError, match="at least one token"):
        store.forward({again.row: Feed([])})


def test_the_batch_table_picks_gamma_by_batch_size():
    controller = make_controller("batch-table:1=3,2=2,4=1,8=0")
    assert controller.describe() == "batch-table:1=3,2=2,4=1,8=0"
    for sequences, gamma in ((1, 3), (2, 2), (3, 2), (4, 1), (7, 1), (8, 0), (30, 0)):
        controller.observe_batch(sequences)
        assert controller.begin_step() == gamma
    assert make_controller("batch-table").begin_step() == 3  # vLLM-like default, alone
    for bad in ("batch-table:2=3", "batch-table:1=-1", "batch-table:1=x"):
        with pytest.raises(SpecKVError):
            make_controller(bad)


def test_speckv_drafts_less_as_the_batch_grows():
    from speckv.controllers.speckv import shipped_levels

    level = shipped_levels()[0]
    budgets = []
    for sequences in (1, 2, 4, 8, 16):
        controller = make_controller("speckv-step", compression=level)
        controller.observe_batch(sequences)
        budgets.append(controller.begin_step())
    assert budgets[0] > 0 and budgets[-1] == 0  # speculation switches itself off in a large batch
    assert budgets == sorted(budgets, reverse=True)


def test_a_short_prompt_steps_at_once_beside_a_long_one(tiny_target, tiny_drafts):
    long, short = decoders(tiny_target, tiny_drafts)[1:3]
    store = SlotStore(tiny_target)
    # The long prompt came first, but the short one's whole prompt fits the budget: it steps now.
    runs = [
        long.start(list(range(3, 60)), 4, cache=store.acquire()),
        short.start([5, 6, 7, 8], 6, cache=store.acquire()),
    ]
    first = step_together(runs, prompt_budget=16)
    assert first[0] is None and first[1] is not None
    assert long.verifier.model.length == 13  # what the short one's 3 unread tokens left of 16


def test_share_verify_by_hand():
    reliable, unreliable = [0.9, 0.8, 0.7], [0.2, 0.05, 0.01]

    def steep(width):  # seconds of a pass whose widest row feeds `width` tokens
        return 0.1 + 0.08 * (width - 1)

    # λ = 10 tokens/s. E − λ·t by width 1..4: 2 − 1.0, 3.1 − 1.8, 3.95 − 2.6, 4.66 − 3.4
    # = 1.0, 1.3, 1.35, 1.26: width 3, so each verifies 2 of its 3.
    assert share_verify([reliable, unreliable], [3, 3], [1, 1], 1, steep, 10.0) == [2, 2]
    # An unreliable draft does not widen the pass: width 2 is the reliable one-token draft's.
    # E − λ·t: width 1: 2 − 1.0; width 2: 2.9 + 0.2 − 1.8 = 1.3; width 3: 3.15 − 2.6 = 0.55.
    assert share_verify([[0.9], unreliable], [1, 3], [1, 1], 1, steep, 10.0) == [1, 1]
    # A row verifying all it drafts (a tree, a probe) or a prompt chunk widens the pass anyway,
    # and within the width every token is free.
    assert share_verify([reliable, unreliable, None], [3, 3, 4], [1, 1, 1], 1, steep, 10.0) == [3, 3, 4]
    assert share_verify([reliable, unreliable], [3, 3], [1, 1], 16, steep, 10.0) == [3, 3]
    # A row still reading the rest of its prompt (base 3) keeps what the width leaves it.
    assert share_verify([reliable, reliable], [3, 3], [3, 1], 1, steep, 10.0) == [1, 3]
    # No rate measured yet: tokens per second of the tick (0.2 s sunk in drafting).
    # width 1..4: 2/0.3 = 6.67, 3.1/0.38 = 8.16, 3.95/0.46 = 8.59, 4.66/0.54 = 8.63 → width 4.
    assert share_verify([reliable, unreliable], [3, 3], [1, 1], 1, steep, None, sunk_s=0.2) == [3, 3]
    # Expensive passes (E − λ·t: 2 − 1.5, 3.1 − 3.0, …): nothing but the target's own token.
    assert share_verify([reliable, unreliable], [3, 3], [1, 1], 1, lambda w: 0.15 * w, 10.0) == [0, 0]


def test_batch_costs_start_from_the_curve_and_follow_measured_passes():
    costs = BatchCosts(CostModel("fp32", 0.01, [0.10, 0.11, 0.12, 0.13], target_prefill_s_per_token=0.02))
    assert costs.pass_time(1, 3) == pytest.approx(0.12)
    assert costs.pass_time(2, 2) == pytest.approx(0.13)  # 4 tokens in all
    assert costs.pass_time(4, 2) == pytest.approx(0.13 + 4 * 0.02)  # past the curve: prefill rate
    for _ in range(60):
        costs.observe(4, 2, 0.42)  # this shape is twice its prior here
        costs.observe(1, 1, 0.10)  # and the one-row pass is as measured
    assert costs.pass_time(4, 2) == pytest.approx(0.42, rel=0.1)
    assert costs.pass_time(1, 1) == pytest.approx(0.10, rel=0.1)
    np.testing.assert_allclose(costs.pass_times(1, 2), [costs.pass_time(1, 1), costs.pass_time(1, 2)])


@pytest.mark.parametrize("accept", [0.3, 0.95])
def test_speckv_sequences_sharing_a_pass_decode_as_alone(tiny_target, tiny_drafts, monkeypatch, accept):
    from test_speckv_controller import hand_models

    models = hand_models(accept=accept)
    costs = CostModel(
        "fp32", 0.002, [0.01 * (1 + 0.3 * k) for k in range(9)], target_prefill_s_per_token=0.004
    )
    made = []
    for name in ("close", "unrelated", "close"):
        controller = SpecKVController(models, "fp32", gamma_max=8, costs=costs, follow_costs=False)
        made.append(SpeculativeDecoder(tiny_target, tiny_drafts[name], controller, eos_token_ids=()))
    shared = made[0].controller.batch_budget()
    shares = []
    share = SharedVerifyBudget.share
    monkeypatch.setattr(
        SharedVerifyBudget,
        "share",
        lambda self, rows, reaches, drafted, *rest: (
            shares.append((reaches, drafted, kept := share(self, rows, reaches, drafted, *rest))) or kept
        ),
    )
    store, store_for = SlotStore(tiny_target), draft_stores(made)
    prompts = PROMPTS[1:4]
    runs = [
        d.start(p, 24, cache=store.acquire(), draft_store=store_for(d))
        for d, p in zip(made, prompts, strict=True)
    ]
    outputs = {i: [] for i in range(len(runs))}
    pace = BatchPace()
    while not all(run.done for run in runs):
        live = [i for i, run in enumerate(runs) if not run.done]
        for i, result in zip(live, step_together([runs[i] for i in live], None, pace, shared), strict=True):
            if result is not None:
                outputs[i].extend(result[1])
    assert [outputs[i] for i in range(3)] == [reference_greedy(tiny_target.model, p, 24) for p in prompts]
    drafting = [s for s in shares if any(s[1])]
    assert drafting and all(
        r is None or len(r) == d for s in drafting for r, d in zip(s[0], s[1], strict=True)
    )
    assert shared.costs.machine != 0.0  # the measured passes moved the estimate


def test_a_long_feed_runs_alone_and_does_not_widen_the_shared_pass(tiny_target):
    store = SlotStore(tiny_target)
    rows = [store.acquire() for _ in range(3)]
    alone = [CachedModel(tiny_target) for _ in range(3)]
    feeds = [Feed(list(range(3, 3 + SOLO_TOKENS + 8)), keep=1), Feed([5, 6], keep=2), Feed([7], keep=1)]
    outputs = store.forward({row.row: feed for row, feed in zip(rows, feeds, strict=True)})
    assert store.shared_pass[:2] == (3, 2)  # the prompt's 40 tokens ran in a pass of their own
    for row, model, feed in zip(rows, alone, feeds, strict=True):
        torch.testing.assert_close(
            outputs[row.row].logits, model.feed(**vars(feed)).logits, rtol=1e-4, atol=1e-4
        )
        assert row.length == model.length
    # The next shared pass sees every row's cache as if it had been fed alone.
    feeds = [Feed([9]), Feed([10]), Feed([11, 12], keep=2)]
    outputs = store.forward({row.row: feed for row, feed in zip(rows, feeds, strict=True)})
    for row, model, feed in zip(rows, alone, feeds, strict=True):
        torch.testing.assert_close(
            outputs[row.row].logits, model.feed(**vars(feed)).logits, rtol=1e-4, atol=1e-4
        )


def test_batch_costs_start_from_the_passes_measured_on_this_machine():
    curve = [0.10, 0.11, 0.12]
    costs = BatchCosts(
        CostModel("fp32", 0.01, curve, 0.0, 0.02, t_pass_s={2: [0.12, 0.15, 0.2], 4: [0.16, 0.25, 0.4]})
    )
    assert costs.pass_time(1, 2) == pytest.approx(0.11)  # one row: the one-sequence curve
    assert costs.pass_time(2, 3) == pytest.approx(0.2)
    assert costs.pass_time(3, 2) == pytest.approx((0.15 + 0.25) / 2)  # between the sizes measured
    assert costs.pass_time(8, 1) == pytest.approx(0.16 + (0.16 - 0.12) * 2)  # on past the largest
    assert costs.pass_time(4, 5) == pytest.approx(0.4 + 0.02 * 4 * 2)  # wider: prefill time per token


def test_rows_that_never_fed_can_leave(tiny_target):
    # A draft store whose sequences stopped drafting (a batch-table at 8 = 0) holds rows acquired
    # after its last pass: no tensors are allocated for them, and freeing any row must still work.
    store = SlotStore(tiny_target)
    first = store.acquire()
    first.feed([5, 6])
    later = [store.acquire() for _ in range(3)]
    first.release()  # the last row (never fed) moves into row 0
    assert later[-1].row == 0 and store.lengths == [0, 0, 0]
    for row in later:
        row.release()
    assert store.bytes == 0
    # Nor does a store that never ran a pass lose track of its rows.
    rows = [store.acquire() for _ in range(3)]
    rows[0].release()
    assert [r.row for r in rows] == [-1, 1, 0] and store.handles == [rows[2], rows[1]]
