"""Why INT8 is slow on this CPU: one linear layer of the demo target's shape, per kernel and k.

    python benchmarks/int8_kernels.py [--threads 1] [--ks 1,4,16]

Times (µs, median) a 576→1536 projection (the demo target's MLP up-projection) on k rows with:
plain fp32 and bf16, torchao's `Int8WeightOnlyConfig` (what `--compression int8` uses on CPU)
and `Int8DynamicActivationInt8WeightConfig`, and PyTorch's fused weight-only kernel
`torch._weight_int8pack_mm` with fp32 and with bf16 activations; plus torch.profiler's top ops
of the torchao weight-only call, which show where its time goes. Prints a markdown table
(docs/compression.md quotes it).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from speckv.cli.options import split_list
from speckv.util.threads import configure_threads


def micros(call, repeats: int = 50) -> float:
    with torch.inference_mode():
        for _ in range(5):  # first calls pick kernels and allocate
            call()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def torchao_linear(linear: torch.nn.Linear, config) -> torch.nn.Module:
    from torchao.quantization import quantize_

    model = torch.nn.Sequential(copy.deepcopy(linear))
    quantize_(model, config)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: speckv's rule)")
    parser.add_argument("--ks", default="1,4,16")
    parser.add_argument("--in-features", type=int, default=576)
    parser.add_argument("--out-features", type=int, default=1536)
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    torch.manual_seed(0)
    linear = torch.nn.Linear(args.in_features, args.out_features, bias=False).eval()
    weight = linear.weight.detach()
    scales = weight.abs().amax(dim=1) / 127  # symmetric per output channel, as torchao does
    packed = torch.round(weight / scales[:, None]).to(torch.int8)
    bf16 = copy.deepcopy(linear).to(torch.bfloat16)
    weight_only = torchao_linear(linear, Int8WeightOnlyConfig())
    dynamic = torchao_linear(linear, Int8DynamicActivationInt8WeightConfig())
    ks = [int(k) for k in split_list(args.ks)]
    rows = {
        name: []
        for name in (
            "fp32",
            "bf16",
            "torchao int8 weight-only",
            "torchao int8 dynamic",
            "_weight_int8pack_mm, fp32 activations",
            "_weight_int8pack_mm, bf16 activations",
        )
    }
    for k in ks:
        x = torch.randn(k, args.in_features)
        xb, scales_b = x.bfloat16(), scales.bfloat16()
        rows["fp32"].append(micros(lambda x=x: linear(x)))
        rows["bf16"].append(micros(lambda xb=xb: bf16(xb)))
        rows["torchao int8 weight-only"].append(micros(lambda x=x: weight_only(x)))
        rows["torchao int8 dynamic"].append(micros(lambda x=x: dynamic(x)))
        rows["_weight_int8pack_mm, fp32 activations"].append(
            micros(lambda x=x: torch._weight_int8pack_mm(x, packed, scales))
        )
        rows["_weight_int8pack_mm, bf16 activations"].append(
            micros(lambda xb=xb, s=scales_b: torch._weight_int8pack_mm(xb, packed, s))
        )
    print(
        f"{args.in_features}→{args.out_features} linear, {threads} torch thread(s), µs (median of 50)\n\n"
        "| kernel | " + " | ".join(f"k={k}" for k in ks) + " |\n|---|" + "---:|" * len(ks)
    )
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.0f}" for v in values) + " |")
    from torch.profiler import profile

    with profile() as prof, torch.inference_mode():
        for _ in range(10):
            weight_only(torch.randn(1, args.in_features))
    print("\ntorchao weight-only, k=1, 10 calls:\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6))


if __name__ == "__main__":
    main()
