"""The cost curve of the machine SpecKV runs on: measured once per (pair, level, device, threads),
cached, reused; `--costs auto|shipped|FILE` everywhere a SpecKV controller plans."""

from __future__ import annotations

import copy
import json

import pytest
from test_speckv_controller import hand_models

from speckv.controllers import make_controller
from speckv.controllers.speckv import SpecKVController
from speckv.costs import CostModel, cpu_description, save_costs
from speckv.decoding import local_costs
from speckv.decoding.local_costs import cache_key, cache_path, give_costs, measure_costs
from speckv.errors import SpecKVError


def test_measure_costs_times_every_width(tiny_target, tiny_drafts):
    measured = measure_costs(tiny_target, tiny_drafts["close"], gamma_max=4, repeats=2, progress=False)
    cost = measured.cost
    assert cost.compression == "fp32" and cost.gamma_max == 4
    assert all(t > 0 for t in cost.t_verify_s) and cost.t_draft_s > 0
    assert cost.target_prefill_s_per_token > 0 and cost.draft_prefill_s_per_token > 0
    assert measured.unsteadiness >= 0.0


def test_unsteadiness_by_hand():
    # Medians 10 and 20; absolute deviations (1, 0, 1) and (0, 0, 10): 0.1 and 0; parts' median 0.05.
    assert local_costs.unsteadiness([[9.0, 10.0, 11.0], [20.0, 20.0, 30.0]]) == pytest.approx(0.05)


def test_a_curve_measured_on_a_busy_machine_is_measured_again_and_cached_only_when_steady(
    tiny_target, tiny_drafts, monkeypatch, tmp_path
):
    monkeypatch.setattr(local_costs, "UNSTEADY", 0.1)
    monkeypatch.setattr(local_costs, "cache_dir", lambda: tmp_path)  # made-up curves: not the tests' cache
    draft = tiny_drafts["unrelated"]

    def curve(ms):
        return CostModel("fp32", 0.001, [ms / 1e3] * 4)

    tries = []

    def measuring(results):
        def measure(*args, **kwargs):
            tries.append(1)
            return results.pop(0)

        return measure

    # Busy (±40 %), busier, then steady: the third is kept and cached.
    made = [local_costs.MeasuredCosts(curve(ms), s) for ms, s in ((160, 0.4), (170, 0.5), (40, 0.03))]
    monkeypatch.setattr(local_costs, "measure_costs", measuring(made))
    chosen = local_costs.local_costs("auto", tiny_target, draft, gamma_max=3, remeasure=True, progress=False)
    assert len(tries) == 3 and chosen.cost == curve(40) and "cached in" in chosen.source
    # Busy every time: the steadiest of the tries plans this run, and nothing is cached over it.
    tries.clear()
    made = [local_costs.MeasuredCosts(curve(ms), s) for ms, s in ((160, 0.4), (150, 0.2), (170, 0.5))]
    monkeypatch.setattr(local_costs, "measure_costs", measuring(made))
    busy = local_costs.local_costs(
        "auto", tiny_target, draft, gamma_max=3, remeasure=True, progress=False, batch_rows=(2,)
    )
    assert len(tries) == 3 and busy.cost.t_verify_s == curve(150).t_verify_s
    assert len(busy.cost.t_pass_s[2]) == 4  # a server's batch passes are measured all the same
    assert busy.source.startswith("measured now, busy machine (±20%") and "not cached" in busy.source
    again = local_costs.local_costs("auto", tiny_target, draft, gamma_max=3, progress=False)
    assert again.source.startswith("cached") and again.cost == curve(40)


def test_auto_measures_once_then_reuses_the_cache(tiny_target, tiny_drafts, monkeypatch):
    draft = tiny_drafts["identical"]
    first = local_costs.local_costs("auto", tiny_target, draft, gamma_max=3, progress=False)
    assert first.source.startswith("measured now") and first.cost.gamma_max == 3

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(local_costs, "measure_costs", no_measuring)
    again = local_costs.local_costs("auto", tiny_target, draft, gamma_max=3, progress=False)
    assert again.source.startswith("cached") and again.cost == first.cost
    with pytest.raises(AssertionError, match="measured again"):  # a wider plan needs more widths
        local_costs.local_costs("auto", tiny_target, draft, gamma_max=6, progress=False)
    with pytest.raises(AssertionError, match="measured again"):
        local_costs.local_costs("auto", tiny_target, draft, gamma_max=3, remeasure=True, progress=False)


def test_the_cache_key_names_the_machine_and_threads(tiny_target, tiny_drafts):
    key = cache_key(tiny_target, tiny_drafts["close"], "cpu", 1)
    assert key["device"] == cpu_description() and key["precision"] == "fp32"
    other_threads = cache_path({**key, "threads": 2})
    other_cpu = cache_path({**key, "device": "another CPU (avx2)"})
    assert len({cache_path(key), other_threads, other_cpu}) == 3
    assert cache_key(tiny_target, tiny_drafts["unrelated"], "cpu", 1)["draft"] != key["draft"]
    moved = copy.deepcopy(tiny_drafts["close"])
    moved.model.config._name_or_path = "/another/checkout/demo-draft"  # same model, other place
    assert cache_key(tiny_target, moved, "cpu", 1) == key
    # Another transformers release shows in the key's own field, not as a changed model.
    moved.model.config.transformers_version = "0.0.1"
    assert cache_key(tiny_target, moved, "cpu", 1) == key
    assert cache_path({**key, "transformers": "0.0.1"}) != cache_path(key)


def test_shipped_and_file_choices(tiny_target, tiny_drafts, tmp_path):
    draft = tiny_drafts["close"]
    assert local_costs.local_costs("shipped", tiny_target, draft).cost is None
    path = tmp_path / "cost.json"
    mine = CostModel("fp32", 0.001, [0.01, 0.02, 0.03])
    save_costs({"fp32": mine}, path)
    chosen = local_costs.local_costs(str(path), tiny_target, draft)
    assert chosen.cost == mine and chosen.source == f"file {path}"
    save_costs({"int8": mine}, path)
    with pytest.raises(SpecKVError, match="has no fp32 level"):
        local_costs.local_costs(str(path), tiny_target, draft)
    with pytest.raises(SpecKVError, match="cannot read cost model"):
        local_costs.local_costs(str(tmp_path / "missing.json"), tiny_target, draft)


def test_give_costs_reaches_speckv_controllers_only(tiny_target, tiny_drafts, tmp_path):
    from speckv.decoding.drafters import model_drafter

    drafter = model_drafter(tiny_drafts["close"], tiny_target)
    assert give_costs(make_controller("fixed:3"), "auto", tiny_target, drafter) is None
    path = hand_models().save(tmp_path / "ctrl.json")
    controller = make_controller(f"speckv:{path}", compression="fp32")
    assert isinstance(controller, SpecKVController)
    source = give_costs(controller, "auto", tiny_target, drafter, progress=False)
    assert source.startswith(("measured now", "cached")) and controller.cost_source == source
    measured = controller.costs.prior
    assert measured.gamma_max == 8 and measured.t_verify_s != hand_models().costs["fp32"].t_verify_s
    shipped = make_controller(f"speckv:{path}", compression="fp32")
    assert give_costs(shipped, "shipped", tiny_target, drafter).startswith("shipped")
    assert shipped.costs.prior == hand_models().costs["fp32"]


def test_a_drafter_that_only_copies_plans_with_the_targets_measured_passes(
    tiny_target, tiny_drafts, tmp_path
):
    from speckv.decoding.drafters.ngram import NGramDrafter

    measured = measure_costs(tiny_target, None, gamma_max=3, repeats=2, progress=False).cost
    assert measured.t_draft_s == 0.0 and measured.draft_prefill_s_per_token == 0.0
    assert len(measured.t_verify_s) == 4 and all(t > 0 for t in measured.t_verify_s)
    key = cache_key(tiny_target, None, "cpu", 1)
    assert key["draft"] != cache_key(tiny_target, tiny_drafts["close"], "cpu", 1)["draft"]
    path = hand_models().save(tmp_path / "ctrl.json")
    controller = make_controller(f"speckv:{path}", compression="fp32")
    source = give_costs(
        controller, "auto", tiny_target, NGramDrafter(tiny_target.model.config.vocab_size), progress=False
    )
    # This machine's passes, not the controller file's fallback (measured on another machine).
    assert source.startswith(("measured now", "cached")) and controller.costs.prior.t_draft_s == 0.0
    assert controller.costs.prior.t_verify_s != hand_models().costs["fp32"].t_verify_s


def test_generate_says_which_curve_it_planned_with(capsys, tiny_model_dirs, tmp_path):
    from speckv.cli import main

    path = hand_models().save(tmp_path / "ctrl.json")
    argv = ["generate", "--target", str(tiny_model_dirs["target"]), "--draft", str(tiny_model_dirs["draft"])]
    argv += [
        "--prompt",
        "w5 w6",
        "--raw",
        "--json",
        "--compression",
        "fp32",
        "--controller",
        f"speckv:{path}",
    ]
    assert main([*argv, "--costs", "shipped"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["config"]["costs"].startswith("shipped")
    assert "cost curve shipped" in captured.err
    assert main(argv) == 0  # auto: measured on this machine (or cached by an earlier test)
    assert json.loads(capsys.readouterr().out)["config"]["costs"].startswith(("measured now", "cached"))
    assert main([*argv, "--costs", str(tmp_path / "nope.json")]) == 2
    assert "speckv: error: cannot read cost model" in capsys.readouterr().err


def test_calibrate_quick_measures_again_and_caches(capsys, tiny_model_dirs):
    from speckv.cli import main

    pair = ["--target", str(tiny_model_dirs["target"]), "--draft", str(tiny_model_dirs["draft"])]
    argv = ["calibrate", "--quick", *pair, "--compression", "fp32", "--threads", "1", "--gamma-max", "3"]
    for _ in range(2):  # by hand it measures every time, even when a curve is cached
        assert main(argv) == 0
        line = capsys.readouterr().out
        assert line.startswith("fp32, 1 thread(s): t_draft") and "t_verify(1..4)" in line
        assert "measured now" in line
    copying = [
        "calibrate",
        "--quick",
        *pair[:2],
        "--draft",
        "ngram",
        "--compression",
        "fp32",
        "--threads",
        "1",
    ]
    assert main(copying) == 0  # n-gram candidates: the target's passes alone, their drafting free
    line = capsys.readouterr().out
    assert line.startswith("fp32, 1 thread(s): t_draft 0.00 ms") and "measured now" in line
    assert main([*argv, "--batch-rows", "2,3"]) == 0  # and a server's batch passes, if asked
    out = capsys.readouterr().out
    assert "batch of 2: t_pass(1..4)" in out and "batch of 3: t_pass(1..4)" in out
    assert main([*argv, "--batch-rows", "1"]) == 2
    assert "--batch-rows are numbers of sequences" in capsys.readouterr().err
    assert main(["calibrate", "--quick", "--compression", "fp32"]) == 2
    assert "needs --demo, --target SRC --draft SRC, or --profile DIR" in capsys.readouterr().err
    assert main(["calibrate"]) == 2
    assert "calibrate needs --profile DIR" in capsys.readouterr().err


def test_a_server_measures_its_batch_passes_once(tiny_target, tiny_drafts, monkeypatch):
    draft = tiny_drafts["unrelated"]
    plain = local_costs.local_costs("auto", tiny_target, draft, gamma_max=2, progress=False)
    assert plain.cost.t_pass_s == {}
    served = local_costs.local_costs(
        "auto", tiny_target, draft, gamma_max=2, progress=False, batch_rows=(2, 4)
    )
    assert "batch passes over 2, 4 sequences measured now" in served.source
    assert sorted(served.cost.t_pass_s) == [2, 4] and all(len(t) == 3 for t in served.cost.t_pass_s.values())
    assert served.cost.t_verify_s == plain.cost.t_verify_s  # the curve itself is the cached one

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(local_costs, "measure_pass_costs", no_measuring)
    again = local_costs.local_costs("auto", tiny_target, draft, gamma_max=2, progress=False, batch_rows=(2,))
    assert again.source.startswith("cached") and again.cost.t_pass_s == served.cost.t_pass_s
    with pytest.raises(AssertionError, match="measured again"):  # a batch size not measured yet
        local_costs.local_costs("auto", tiny_target, draft, gamma_max=2, progress=False, batch_rows=(8,))


def test_cost_files_carry_batch_passes(tmp_path):
    cost = CostModel("fp32", 0.001, [0.01, 0.02], t_pass_s={2: [0.012, 0.03], 4: [0.02, 0.05]})
    save_costs({"fp32": cost}, tmp_path / "c.json")
    assert local_costs.load_costs(tmp_path / "c.json")["fp32"] == cost  # keys back to numbers
    for bad in ({0: [0.1]}, {2: []}, {"x": [0.1]}, {2: [-1.0]}):
        with pytest.raises(SpecKVError, match="t_pass_s"):
            CostModel("fp32", 0.001, [0.01], t_pass_s=bad)
