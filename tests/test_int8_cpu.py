"""INT8 linears through torch's int8 kernel on bf16 activations: numbers by hand, the same outputs
as torchao's own path, and which targets `load_model` packs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from speckv.decoding import models
from speckv.decoding.int8_cpu import PackedInt8Linear, pack_int8_linears

torchao = pytest.importorskip("torchao")


def test_packed_linear_by_hand():
    # Row 0: sixteen 1s at scale 0.5, bias 1 → 0.5·16 + 1 = 9 on an all-ones input; row 1: eight
    # −2s and eight 0s at scale 0.25 → 0.25·(−16) = −4; twice the input, twice the products.
    qdata = torch.tensor([[1] * 16, [-2] * 8 + [0] * 8], dtype=torch.int8)
    linear = PackedInt8Linear(qdata, torch.tensor([[0.5], [0.25]]), torch.tensor([1.0, 0.0]), torch.bfloat16)
    x = torch.ones(2, 1, 16, dtype=torch.bfloat16)  # batch × tokens × width
    x[1] *= 2
    y = linear(x)
    assert y.shape == (2, 1, 2) and y.dtype == torch.bfloat16
    assert y.float().tolist() == [[[9.0, -4.0]], [[17.0, -8.0]]]


def test_packing_keeps_torchaos_outputs_and_leaves_widths_the_kernel_cannot_read():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    # Inputs 32 and 48 wide are packed; 24 (not a multiple of 16) keeps torchao's path.
    net = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 24), torch.nn.Linear(24, 8))
    net = net.to(torch.bfloat16)
    quantize_(net, Int8WeightOnlyConfig())
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = net(x).float()
        assert pack_int8_linears(net) == 2
        assert [type(layer).__name__ for layer in net] == ["PackedInt8Linear", "PackedInt8Linear", "Linear"]
        got = net(x).float()
    # Both round to bf16, in different orders: agreement to bf16's precision, not bit for bit.
    assert torch.allclose(got, expected, rtol=0.02, atol=0.02 * float(expected.abs().max()))


@pytest.mark.parametrize("native_bf16", [True, False])
def test_load_model_packs_int8_only_on_a_bf16_body(tmp_path, monkeypatch, native_bf16):
    tiny_model(seed=3, hidden=64).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    monkeypatch.setattr(
        models, "cpu_bf16_features", lambda: frozenset({"avx512_bf16"} if native_bf16 else ())
    )
    target = models.load_model(str(tmp_path), "int8", "cpu")
    packed = [m for m in target.model.modules() if isinstance(m, PackedInt8Linear)]
    assert target.compression == "int8"
    assert target.compute_dtype == (torch.bfloat16 if native_bf16 else torch.float32)
    # Every attention and MLP projection of both layers: 2 × (4 + 3); the head is not quantized.
    assert len(packed) == (14 if native_bf16 else 0)
    assert models.model_level(target.model) == "int8"
