"""Precision: the `auto` level per device, near-tie tolerances worked out by hand, the fp32 head,
the thread rule, and what `speckv generate` says about the precision it used."""

from __future__ import annotations

import io
import json

import pytest
import torch
from conftest import tiny_model

from speckv.cli import main
from speckv.controllers import default_controller, make_controller
from speckv.decoding import models
from speckv.errors import SpecKVError
from speckv.pipeline.lossless import near_tie_tolerance, ulp
from speckv.util import threads


@pytest.mark.parametrize(
    ("features", "expected"),
    [(frozenset(), "fp32"), (frozenset({"avx512_bf16"}), "bf16"), (frozenset({"amx_bf16"}), "bf16")],
)
def test_auto_on_cpu_follows_native_bf16(monkeypatch, features, expected):
    monkeypatch.setattr(models, "cpu_bf16_features", lambda: features)
    assert models.default_precision("cpu") == expected
    assert models.resolve_compression("auto", torch.device("cpu")) == expected
    assert models.resolve_compression("fp16", torch.device("cpu")) == "fp16"  # an explicit level wins


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert models.default_precision(torch.device("cuda")) == expected


def test_cpu_features_come_from_torch_or_proc_cpuinfo(monkeypatch):
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    cpuinfo = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n"
    monkeypatch.setattr(models, "open", lambda *_: io.StringIO(cpuinfo), raising=False)
    assert models.cpu_bf16_features() == {"amx_bf16"}
    monkeypatch.setattr(models, "open", lambda *_: io.StringIO("flags\t: fpu avx2 avx512f\n"), raising=False)
    assert models.cpu_bf16_features() == frozenset()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert models.cpu_bf16_features() == {"avx512_bf16"}


def test_unknown_level_names_auto():
    with pytest.raises(SpecKVError, match="choose one of auto, fp32, bf16"):
        models.resolve_compression("fp8", torch.device("cpu"))


@pytest.mark.parametrize(
    ("dtype", "magnitude", "tolerance"),
    [
        # 8 ulp, ulp = 2^(floor(log2|x|) − mantissa bits): bf16 7, fp16 10, fp32 23.
        (torch.bfloat16, 20.0, 1.0),  # 2^4 ≤ 20 < 2^5: 8 · 2^(4−7) = 8 · 0.125
        (torch.bfloat16, -20.0, 1.0),  # the sign does not matter
        (torch.bfloat16, 31.9, 1.0),
        (torch.bfloat16, 32.0, 2.0),  # next binade: 8 · 2^(5−7)
        (torch.bfloat16, 1.0, 0.0625),  # 8 · 2^−7
        (torch.bfloat16, 0.75, 0.03125),  # 8 · 2^(−1−7)
        (torch.float16, 20.0, 0.125),  # 8 · 2^(4−10)
        (torch.float16, 1000.0, 4.0),  # 2^9 ≤ 1000: 8 · 2^(9−10)
        (torch.float32, 16.0, 2.0**-16),  # 8 · 2^(4−23)
    ],
)
def test_near_tie_tolerance_by_hand(dtype, magnitude, tolerance):
    assert near_tie_tolerance(dtype, magnitude) == tolerance


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("value", [0.3, 1.0, 5.5, 20.0, 27.3, 100.0])
def test_ulp_is_the_spacing_of_the_dtype(dtype, value):
    x = torch.tensor(value).to(dtype)
    step = ulp(dtype, float(x))
    assert float(x.float() + step) == float((x.float() + step).to(dtype))  # x + ulp is representable
    assert (x.float() + step / 4).to(dtype) == x  # a quarter ulp rounds back
    assert near_tie_tolerance(dtype, 0.0) > 0  # zero logits still get a (tiny) tolerance


def test_fp32_head_computes_logits_in_fp32():
    reference = tiny_model(seed=4, head_scale=5.0)
    model = tiny_model(seed=4, head_scale=5.0).to(torch.bfloat16)
    embedding = model.get_input_embeddings().weight
    assert models.upcast_head(model)
    assert not models.upcast_head(model)  # already fp32: nothing to change
    assert model.get_output_embeddings().weight.dtype == torch.float32
    assert embedding.dtype == torch.bfloat16 and model.get_input_embeddings().weight is embedding
    with torch.no_grad():
        logits = model(torch.tensor([[3, 4, 5]])).logits
        expected = reference(torch.tensor([[3, 4, 5]])).logits
    assert logits.dtype == torch.float32
    # bf16 body, fp32 head: close to the fp32 model, and not quantized to bf16's logit grid.
    torch.testing.assert_close(logits, expected, atol=0.2, rtol=0.05)
    assert not torch.equal(logits, logits.to(torch.bfloat16).float())
    assert not models.upcast_head(tiny_model(seed=4))  # an fp32 model is left alone


def test_load_model_resolves_auto_and_names_the_precision(monkeypatch, tiny_model_dirs):
    source = str(tiny_model_dirs["target"])
    monkeypatch.setattr(models, "cpu_bf16_features", lambda: frozenset({"amx_bf16"}))
    bf16 = models.load_model(source, "auto")
    assert (bf16.compression, bf16.fp32_head, bf16.precision) == ("bf16", False, "bf16")
    assert bf16.compute_dtype == torch.bfloat16
    head = models.load_model(source, "bf16", fp32_head=True)
    assert (head.fp32_head, head.precision) == (True, "bf16+fp32-head")
    assert head.model.get_output_embeddings().weight.dtype == torch.float32
    monkeypatch.setattr(models, "cpu_bf16_features", lambda: frozenset())
    fp32 = models.load_model(source, "auto")
    assert (fp32.compression, fp32.fp32_head, fp32.precision) == ("fp32", False, "fp32")


def test_generate_json_config_names_the_precision(capsys, monkeypatch, tiny_model_dirs):
    monkeypatch.setattr(models, "cpu_bf16_features", lambda: frozenset({"avx512_bf16"}))
    argv = ["generate", "--target", str(tiny_model_dirs["target"]), "--no-draft", "--prompt", "w5 w6"]
    assert main([*argv, "--max-new-tokens", "3", "--json", "--threads", "1"]) == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert config["compression"] == "bf16" and config["precision"] == "bf16"
    assert config["fp32_head"] is False and config["threads"] == 1
    assert main([*argv, "--max-new-tokens", "3", "--json", "--fp32-head"]) == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert (config["compression"], config["precision"], config["fp32_head"]) == (
        "bf16",
        "bf16+fp32-head",
        True,
    )
    assert main([*argv, "--max-new-tokens", "3", "--json", "--fp32-head", "--compression", "fp32"]) == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert (config["compression"], config["precision"], config["fp32_head"]) == ("fp32", "fp32", False)


def test_shipped_controller_at_an_unknown_level(capsys, tiny_model_dirs):
    # The shipped controller knows the levels this CPU runs (bf16, fp32, int8, nf4), not fp16.
    with pytest.raises(SpecKVError, match="knows compression levels .* not fp16"):
        make_controller("speckv", compression="fp16")
    assert default_controller(True, "fp16") == "fixed:4"  # --demo falls back
    assert default_controller(True, "bf16") == "speckv"
    argv = ["generate", "--target", str(tiny_model_dirs["target"]), "--draft", str(tiny_model_dirs["draft"])]
    code = main([*argv, "--controller", "speckv", "--compression", "fp16", "--prompt", "w5"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not fp16" in err


def test_thread_rule(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(threads, "physical_cores", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # torch's default: one per core
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.2)
    assert threads.configure_threads(None) == 4 and not caplog.records
    monkeypatch.setattr(threads, "busy_cores", lambda: 1.7)
    assert threads.configure_threads(None) == 2
    assert "using 2 torch thread(s)" in caplog.text
    monkeypatch.setattr(threads, "busy_cores", lambda: 9.0)
    assert threads.configure_threads(None, quiet=True) == 1
    assert threads.configure_threads(3) == 3  # --threads wins
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # set by the program: kept
    assert threads.configure_threads(None) == 1
    assert calls == [4, 2, 1, 3]
    with pytest.raises(SpecKVError, match="threads must be at least 1"):
        threads.configure_threads(0)


def test_machine_probes_are_sane():
    assert threads.physical_cores() >= 1
    assert threads.busy_cores(0.01) >= 0
