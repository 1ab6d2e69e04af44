"""The feature head: stored target features, training-time-test unrolling against decoding, the
drafter in the engine (greedy exactness, sampling), training, saving and loading."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from speckv.controllers import Drafts
from speckv.controllers.fixed import FixedController, TreeController
from speckv.decoding.drafters.feature import FeatureDrafter, FeatureTreeDrafter
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.feature_head import FeatureHead, FeatureHeadConfig
from speckv.decoding.models import LoadedModel
from speckv.decoding.verify import SamplingConfig
from speckv.distill.data import GenConfig, feature_indices, generate_data
from speckv.distill.feature_training import make_feature_examples, unrolled_outputs
from tests.test_distill import VOCAB, WORDS, _tokenizer

REFERENCE = "q"  # ids of the prompts kept out of training, whose sampled continuations measure agreement


@pytest.fixture(scope="module")
def target():
    """A tiny teacher whose continuations vary (the distill tests' sharper one mostly repeats)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(4)
        model.model.embed_tokens.weight.mul_(4)
    return LoadedModel(model, _tokenizer(), "tiny", "fp32", torch.device("cpu"))


@pytest.fixture(scope="module")
def feature_data(target, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    prompts = work / "prompts.jsonl"
    rng = torch.Generator().manual_seed(1)
    lines = []
    for i in range(28):
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (5 + i % 4,), generator=rng)]
        name = f"{REFERENCE if i >= 20 else 'p'}{i}"
        lines.append(json.dumps({"id": name, "task": ("code", "chat")[i % 2], "prompt": " ".join(words)}))
    prompts.write_text("\n".join(lines) + "\n")
    gen = GenConfig(
        prompts=str(prompts), new_tokens=10, top_k=8, samples={"code": 4, "chat": 4}, temperature=1.0,
        heldout_per_task=2, extra="", precision="fp32", features="1,2,-1",
    )  # fmt: skip
    train = generate_data(target, gen, work, "train", batch_rows=8, progress=False)
    heldout = generate_data(target, gen, work, "heldout", batch_rows=8, progress=False)
    return gen, train, heldout


def make_head(target, features, layers=(3,), seed=0) -> FeatureHead:
    torch.manual_seed(seed)
    config = target.model.config
    cfg = FeatureHeadConfig.for_target(config, features, list(layers), config.vocab_size)
    embed = target.model.get_input_embeddings().weight.detach().float()
    head = FeatureHead(cfg, embed, embed)
    head.reset_inputs()
    for slot, index in enumerate(layers):
        head.layers[slot].load_state_dict(target.model.model.layers[index].state_dict())
    with torch.no_grad():  # away from the identity init, so the fused layers all matter
        for parameter in (head.fuse.weight, head.inp.weight):
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return head.eval()


def test_feature_indices():
    assert feature_indices("auto", 30) == [3, 16, 30]
    assert feature_indices("1,-1", 4) == [1, 4]
    with pytest.raises(Exception, match="hidden states 0..4"):
        feature_indices("5", 4)


def test_stored_features_are_the_targets_hidden_states(target, feature_data):
    gen, train, _ = feature_data
    layers = feature_indices(gen.features, target.model.config.num_hidden_layers)
    for record in train[:4] + train[-2:]:
        ids = torch.cat([record["prompt"], record["response"][:-1]]).long()[None]
        with torch.no_grad():
            hidden = target.model(ids, output_hidden_states=True).hidden_states
        fresh = torch.stack([hidden[i][0] for i in layers], 1)
        stored = torch.cat([record["prompt_feats"], record["response_feats"]]).float()
        assert stored.shape == fresh.shape
        torch.testing.assert_close(stored, fresh, atol=0.05 * float(fresh.abs().max()), rtol=0.02)


def test_unrolled_steps_match_incremental_drafting(target, feature_data):
    """Unroll step k at row r = feeding the true rows up to r, then the head's own k outputs."""
    gen, train, _ = feature_data
    layers = feature_indices(gen.features, target.model.config.num_hidden_layers)
    head = make_head(target, layers, layers=(2, 3))
    examples = make_feature_examples(train[:3], None)
    outs = unrolled_outputs(head, examples, 3, top_feature=False)
    low = min(example.start for example in examples)  # the outputs start at this row
    for b, example in enumerate(examples):
        for row in (example.start, example.start + 2):
            with torch.no_grad():
                out, past = head(
                    example.tokens[None, : row + 1],
                    head.fused(torch.cat(example.features)[None, : row + 1]),
                    torch.arange(1, row + 2)[None],
                )
                last = out[:, -1:]
                for step in range(3):
                    unrolled = head.logits(outs[step][0][b, row - low])
                    torch.testing.assert_close(unrolled, head.logits(last)[0, -1], atol=1e-4, rtol=1e-4)
                    token = example.tokens[None, row + step + 1 : row + step + 2]
                    out, kvs = head(token, last, torch.tensor([[row + step + 2]]), past=past)
                    past = [
                        (torch.cat([k0, k], 2), torch.cat([v0, v], 2))
                        for (k0, v0), (k, v) in zip(past, kvs, strict=True)
                    ]
                    last = out


def _drafter(target, head):
    return FeatureDrafter(head, None, target.model.config.vocab_size, "tiny-head")


def _prompts():
    rng = torch.Generator().manual_seed(7)
    return [torch.randint(3, VOCAB, (n,), generator=rng).tolist() for n in (3, 6, 11)]


@pytest.mark.parametrize("gamma", [1, 2, 3, 5, 8])
def test_greedy_output_equals_the_target_alone(target, gamma):
    layers = feature_indices("1,2,-1", target.model.config.num_hidden_layers)
    head = make_head(target, layers)
    alone = SpeculativeDecoder(target, None)
    decoder = SpeculativeDecoder(target, _drafter(target, head), FixedController(gamma))
    accepted = 0
    for prompt in _prompts():
        expected = alone.generate(prompt, 24).token_ids
        result = decoder.generate(prompt, 24)
        assert result.token_ids == expected
        accepted += sum(step.accepted for step in result.steps)
    if gamma == 1:
        assert accepted > 0  # the head is initialised from the target's layers: it agrees sometimes


@pytest.mark.parametrize("nodes", [1, 4, 8])
def test_greedy_head_trees_equal_the_target_alone(target, nodes):
    layers = feature_indices("1,2,-1", target.model.config.num_hidden_layers)
    drafter = FeatureTreeDrafter(_drafter(target, make_head(target, layers)), top_k=3)
    alone = SpeculativeDecoder(target, None)
    decoder = SpeculativeDecoder(target, drafter, TreeController(nodes))
    branched = 0
    for prompt in _prompts():
        result = decoder.generate(prompt, 24)
        assert result.token_ids == alone.generate(prompt, 24).token_ids
        branched += sum(step.depth < step.gamma for step in result.steps)
    assert branched > 0 or nodes == 1


@pytest.mark.parametrize("tree", [False, True])
def test_head_cache_and_features_follow_the_kept_sequence(target, tree):
    layers = feature_indices("1,2,-1", target.model.config.num_hidden_layers)
    head = make_head(target, layers)
    chain = _drafter(target, head)
    drafter = FeatureTreeDrafter(chain) if tree else chain
    decoder = SpeculativeDecoder(target, drafter, TreeController(6) if tree else FixedController(4))
    drafter = chain  # a tree drafter keeps features and the cache in the chain drafter it wraps
    prompt = _prompts()[1]
    tokens = list(prompt)
    for _record, new in decoder.stream(prompt, 20):
        tokens.extend(new)
        # features of every position but the newest token, equal to a fresh target pass
        with torch.no_grad():
            hidden = target.model(torch.tensor([tokens[:-1]]), output_hidden_states=True).hidden_states
        fresh = torch.stack([hidden[i][0] for i in layers], 1)
        torch.testing.assert_close(drafter.features, fresh, atol=1e-4, rtol=1e-4)
        assert drafter.cache.length <= len(tokens) - 2
        # the cached keys are those of true-feature inputs: recomputing them fresh gives the same
        n = drafter.cache.length
        if n:
            with torch.no_grad():
                _, kvs = head(
                    torch.tensor([tokens[1 : n + 1]]),
                    head.fused(fresh[None, :n]),
                    torch.arange(1, n + 1)[None],
                )
            for (k, v), (k0, v0) in zip(kvs, drafter.cache.kv, strict=True):
                torch.testing.assert_close(k0, k, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(v0, v, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tree", [False, True])
def test_sampling_follows_the_target_distribution(tree):
    """The head drafts from the second token on (the first comes from the target's prefill): given
    the first token, the next two follow the target's distribution (χ², 2400 seeded runs), with
    chains and with trees."""
    from tests.conftest import SMALL_VOCAB, chi_square_p, exact_first_two, loaded, tiny_model

    small = loaded(tiny_model(seed=10, vocab=SMALL_VOCAB, head_scale=6.0, eos=0), "small-target")
    head = make_head(small, [1, 2, 2], layers=(1,))
    prompt = [3, 1]
    counts: dict[int, np.ndarray] = {}
    drafted = 0
    for seed in range(2400):
        drafter, controller = _drafter(small, head), FixedController(3)
        if tree:
            drafter, controller = FeatureTreeDrafter(drafter, top_k=2), TreeController(4)
        decoder = SpeculativeDecoder(small, drafter, controller, SamplingConfig(1.0, seed=seed), ())
        result = decoder.generate(prompt, 3)
        first, second, third = result.token_ids
        counts.setdefault(first, np.zeros((SMALL_VOCAB, SMALL_VOCAB)))[second, third] += 1
        drafted += sum(step.drafted for step in result.steps)
    assert drafted > 0
    most = max(counts, key=lambda token: counts[token].sum())
    exact = exact_first_two(small.model, prompt + [most], SamplingConfig(1.0))
    assert chi_square_p(counts[most], exact) > 1e-3


@pytest.fixture(scope="module")
def trained(target, feature_data, tmp_path_factory):
    """A head trained on the tiny teacher's outputs, and the run's directory."""
    from speckv.distill.feature_training import FeatureTrainConfig, train_feature_head

    gen, train, _heldout = feature_data
    layers = feature_indices(gen.features, target.model.config.num_hidden_layers)
    run = tmp_path_factory.mktemp("run")
    cfg = FeatureTrainConfig(layers="3", vocab=0, epochs=8, batch_tokens=64, lr=3e-3, warmup=5, unroll=2)
    reference = [r for r in train if r["id"].startswith(REFERENCE)]
    fitted = [r for r in train if not r["id"].startswith(REFERENCE)]
    head, vocab_map, history = train_feature_head(
        target.model,
        fitted,
        {"reference": reference},
        cfg,
        layers,
        run,
        [2],
        progress=False,
        note=lambda m: None,
    )
    return head, history, run, cfg, layers


def test_training_raises_agreement_and_the_second_token_learns_too(trained):
    _head, history, *_ = trained
    first, last = history[0]["reference"]["overall"], history[-1]["reference"]["overall"]
    assert last["gamma1"] > first["gamma1"] + 0.15
    assert last["gamma2"] > first["gamma2"] + 0.05
    assert last["top4"] >= last["gamma1"]


@pytest.mark.parametrize("spec", ["fixed:1", "fixed:3", "fixed:8", "heuristic", "confidence:0.5"])
def test_replay_of_a_feature_trace_equals_the_live_engine(target, trained, spec):
    """A feature head's chain depends on where the step starts: the trace stores each start's
    chain, and replay (after the storage round trip) follows the live engine step by step."""
    from speckv.controllers import make_controller
    from speckv.pipeline.profiling import record_trace
    from speckv.pipeline.replay import replay, trace_to_frame, traces_from_frame

    drafter = _drafter(target, trained[0])
    prompts = _prompts()
    traces = [record_trace(target, drafter, p, 30, 8, eos_token_ids=()) for p in prompts]
    for index, trace in enumerate(traces):
        trace.prompt_id = f"p{index}"
    traces = traces_from_frame(pd.concat([trace_to_frame(t) for t in traces]))
    assert sum(int(t.run_length.sum()) for t in traces) > 10  # the head does get tokens right
    live_controller, replay_controller = (
        make_controller(spec, gamma_max=8),
        make_controller(spec, gamma_max=8),
    )
    decoder = SpeculativeDecoder(target, drafter, live_controller, eos_token_ids=())
    for prompt, trace in zip(prompts, traces, strict=True):
        live = decoder.generate(prompt, 30)
        replayed = replay(trace, replay_controller, keep_records=True)
        assert [(s.gamma_budget, s.gamma, s.accepted) for s in live.steps] == [
            (s.gamma_budget, s.gamma, s.accepted) for s in replayed.records
        ]
        for a, b in zip(live.steps, replayed.records, strict=True):
            assert a.draft_entropy == pytest.approx(b.draft_entropy, abs=1e-4)


def test_distill_cli_trains_saves_and_reloads_a_feature_head(tiny_model_dirs, tiny_target, tmp_path):
    """`speckv distill --kind feature` end to end on a tiny target: data with features, training,
    the saved directory, re-loading by path, and the clear errors around it."""
    from speckv.cli.main import main
    from speckv.decoding.draft_files import draft_kind, load_draft
    from speckv.decoding.drafters import make_drafter
    from speckv.errors import SpecKVError
    from tests.conftest import loaded, tiny_model

    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"id": f"p{i}", "task": "chat", "prompt": " ".join(f"w{(i * 7 + j) % 60 + 2}" for j in range(6))}
        for i in range(12)
    ]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "head"
    code = main(
        [
            "distill", "--kind", "feature", "--target", str(tiny_model_dirs["target"]), "--out", str(out), "--work-dir", str(tmp_path / "work"),
            "--prompts", str(prompts), "--extra", "none", "--samples", "chat=2", "--new-tokens", "8",
            "--features", "1,2,-1", "--compression", "fp32", "--layers", "1", "--vocab", "0", "--epochs", "1",
            "--batch-tokens", "32", "--unroll", "2", "--threads", "1",
        ]
    )  # fmt: skip
    assert code == 0
    manifest = json.loads((out / "speckv_draft.json").read_text())
    assert manifest["kind"] == "feature" and manifest["head"]["features"] == [1, 2, 2]
    assert set(manifest["unfamiliar_agreement"]) >= {"overall"} and manifest["cost_ratio"] > 0
    assert draft_kind(str(out)) == "feature"
    target = tiny_target  # what tiny_model_dirs["target"] holds
    drafter = make_drafter(str(out), target)
    assert drafter.target_hidden_layers == (1, 2, 2)
    prompt = [5, 6, 7]
    alone = SpeculativeDecoder(target, None).generate(prompt, 16).token_ids
    assert SpeculativeDecoder(target, drafter, FixedController(3)).generate(prompt, 16).token_ids == alone
    with pytest.raises(SpecKVError, match="feature head, not a draft model"):
        load_draft(str(out), target)
    assert make_drafter(str(out), target, Drafts.TREES).branches  # tree:N: the head's token trees
    # a controller that plans trees or chains (speckv with a tree model) gets the head's chains:
    # its tree model was fitted on a draft model's signals
    assert not make_drafter(str(out), target, Drafts.EITHER).branches
    with pytest.raises(SpecKVError, match="n-gram branches join a draft model's tree"):
        make_drafter(f"{out}+ngram", target, Drafts.TREES)
    with pytest.raises(SpecKVError, match="made for another target"):
        make_drafter(str(out), loaded(tiny_model(seed=0, hidden=64), "wider"))


def test_side_by_side_runs_a_feature_head_and_hf_with_a_draft_model(target):
    """`compare` takes a drafter as the pair's draft; HF assisted rows run a draft model beside it
    (HF cannot run a feature head), and without one they are a clear error."""
    from speckv.errors import SpecKVError
    from speckv.pipeline.compare import Method, compare, hf_assisted_methods
    from tests.conftest import loaded, tiny_model

    head = make_head(target, feature_indices("1,2,-1", 4))
    methods = [Method("target"), Method("fixed:3", controller="fixed:3"), *hf_assisted_methods((2,))[:1]]
    assistant = loaded(tiny_model(seed=4, vocab=VOCAB), "assistant")
    results = compare(
        target,
        _drafter(target, head),
        _prompts(),
        methods,
        12,
        repeats=1,
        progress=False,
        assistant=assistant,
    )
    assert all(result.outputs == results[0].outputs for result in results)
    assert results[1].drafted > 0
    with pytest.raises(SpecKVError, match="needs a draft model"):
        compare(target, _drafter(target, head), _prompts(), methods, 12, repeats=1, progress=False)


def test_a_head_layer_loaded_from_the_target_computes_the_targets_layer(target):
    """Same weights, same inputs: our decoder layer (attention with rotary positions at the
    target's base, MLP, norms) gives the target's own layer output."""
    from speckv.decoding.feature_head import Layer

    cfg = make_head(target, [1, 2, 4]).cfg
    ids = torch.tensor([_prompts()[2]])
    with torch.no_grad():
        hidden = target.model(ids, output_hidden_states=True).hidden_states
        for index in (0, 2):
            layer = Layer(cfg)
            layer.load_state_dict(target.model.model.layers[index].state_dict())
            causal = torch.ones((ids.shape[1], ids.shape[1]), dtype=torch.bool).tril()[None, None]
            out, _ = layer(hidden[index], torch.arange(ids.shape[1])[None], None, causal)
            torch.testing.assert_close(out, hidden[index + 1], atol=1e-4, rtol=1e-4)
