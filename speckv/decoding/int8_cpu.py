"""INT8 weight-only linears on a CPU with native bf16: torch's fused kernel on bf16 activations.

torchao quantizes the weights (one scale per output row, symmetric). Its CPU matmul then converts
each whole weight matrix to the activations' dtype on every call and multiplies that: every pass
writes and reads the weights at full width again. On the demo target (2-core AMD EPYC with
AVX512-BF16) that made int8 passes slower than fp32 ones and let them swing from 41 to 111 ms on
an idle machine. torch's `aten._weight_int8pack_mm` reads the int8 weights as they are: on bf16
activations one demo-sized linear (576 → 1536, one token) took 37 µs against 101 µs in fp32 and
~900 µs through torchao's path; on fp32 activations it is slower than fp32 itself (512 µs), so
`load_model` packs only targets whose body runs in bf16 (where the CPU has native bf16).

The kernel needs the input width to be a multiple of 16 (on torch 2.13 other widths give wrong
numbers or crash the process: widths 8–1536 tried); other linears keep torchao's path.
"""

from __future__ import annotations

import torch

KERNEL_WIDTH_MULTIPLE = 16


class PackedInt8Linear(torch.nn.Module):
    """y = x · (W_int8 · scale)ᵀ + bias, W_int8 one int8 row per output, read as int8."""

    def __init__(
        self, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ):
        super().__init__()
        self.in_features, self.out_features = qdata.shape[1], qdata.shape[0]
        self.register_buffer("qdata", qdata.contiguous())
        self.register_buffer("scale", scale.reshape(-1).to(dtype))
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.qdata, self.scale)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def packable(weight: torch.Tensor) -> bool:
    """A torchao INT8 weight-only tensor the kernel can compute: per-row scales, no zero point,
    no activation quantization, an input width the kernel supports."""
    from torchao.quantization import Int8Tensor

    return (
        isinstance(weight, Int8Tensor)
        and weight.act_quant_kwargs is None
        and weight.act_pre_scale is None
        and list(weight.block_size) == [1, weight.qdata.shape[1]]
        and weight.qdata.shape[1] % KERNEL_WIDTH_MULTIPLE == 0
        and (weight.zero_point is None or not bool(weight.zero_point.any()))
    )


def pack_int8_linears(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace, in place, every linear of `model` holding a `packable` torchao INT8 weight by a
    `PackedInt8Linear` computing in `dtype`; returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and packable(child.weight):
                weight = child.weight
                setattr(parent, name, PackedInt8Linear(weight.qdata, weight.scale, child.bias, dtype))
                replaced += 1
    return replaced
