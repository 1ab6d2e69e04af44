"""The cost model of one decoding step on this hardware, per target compression level, and its
file format.

A step that drafts γ tokens costs γ·t_draft + t_verify(γ + 1) + t_step: γ one-token draft
passes (with their signals), one target pass over the γ + 1 unseen tokens with verification and
cache cropping, and the loop's own bookkeeping. The prompt is paid once, per prompt token, by
the target and (when drafting) by the draft. `speckv.pipeline.calibrate` measures it.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from speckv.errors import SpecKVError
from speckv.util.files import atomic_write_text

_FILE_FORMAT = "speckv-cost-model"
_FILE_VERSION = 1


@dataclass
class CostModel:
    """Seconds per step for one compression level; `t_verify_s[k - 1]` is a k-token target pass."""

    compression: str
    t_draft_s: float
    t_verify_s: list[float]
    t_step_s: float = 0.0
    target_prefill_s_per_token: float = 0.0
    draft_prefill_s_per_token: float = 0.0
    # A batch's target pass (`speckv serve`): `t_pass_s[rows][k - 1]` is a pass over `rows`
    # sequences each feeding k tokens, for the batch sizes measured (none: not measured).
    t_pass_s: dict[int, list[float]] = field(default_factory=dict)

    def __post_init__(self):
        if len(self.t_verify_s) < 1 or min(self.t_verify_s) < 0 or self.t_draft_s < 0:
            raise SpecKVError(f"cost model for {self.compression}: times must be non-negative")
        try:  # JSON keys are strings
            self.t_pass_s = {int(rows): [float(t) for t in times] for rows, times in self.t_pass_s.items()}
        except (TypeError, ValueError, AttributeError) as error:
            raise SpecKVError(f"cost model for {self.compression}: bad t_pass_s ({error})") from None
        if any(rows < 1 or not times or min(times) < 0 for rows, times in self.t_pass_s.items()):
            raise SpecKVError(f"cost model for {self.compression}: t_pass_s needs rows ≥ 1 and times ≥ 0")

    @property
    def gamma_max(self) -> int:
        return len(self.t_verify_s) - 1

    def step_times(self) -> np.ndarray:
        """Seconds of a step drafting γ tokens, indexed by γ = 0..gamma_max."""
        gammas = np.arange(self.gamma_max + 1)
        return gammas * self.t_draft_s + np.asarray(self.t_verify_s) + self.t_step_s

    def read_time(self, tokens: int) -> float:
        """What the draft model's first pass of a step costs beyond `t_draft_s` when it reads
        `tokens` tokens (t_draft_s is a pass after one): the prompt at its first pass, the tokens
        of steps it sat out after them."""
        return max(tokens - 1, 0) * self.draft_prefill_s_per_token

    def prefill_time(self, prompt_len: int, speculative: bool) -> float:
        """The one-off cost of reading the prompt (the draft reads it too when it drafts)."""
        per_token = self.target_prefill_s_per_token + (self.draft_prefill_s_per_token if speculative else 0.0)
        return prompt_len * per_token


def save_costs(models: dict[str, CostModel], path: str | Path, meta: dict | None = None) -> None:
    document = costs_to_dict(models, {**environment(), **(meta or {})})
    atomic_write_text(path, json.dumps(document, indent=1))


def load_costs(path: str | Path) -> dict[str, CostModel]:
    """Cost models by compression level from a file written by `save_costs` (or `speckv calibrate`)."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise SpecKVError(f"cannot read cost model {path}: {error}") from error
    return costs_from_dict(document, str(path))


def costs_from_dict(document: dict, where: str) -> dict[str, CostModel]:
    if document.get("format") != _FILE_FORMAT or document.get("version") != _FILE_VERSION:
        raise SpecKVError(f"{where} is not a version-{_FILE_VERSION} SpecKV cost model")
    return {name: CostModel(**fields) for name, fields in document["levels"].items()}


def costs_to_dict(models: dict[str, CostModel], meta: dict | None = None) -> dict:
    return {
        "format": _FILE_FORMAT,
        "version": _FILE_VERSION,
        "meta": meta or {},
        "levels": {name: asdict(model) for name, model in models.items()},
    }


# The CPU features that decide which kernels a pass runs (and so its cost curve).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "neon")


def parse_cpuinfo(text: str) -> tuple[str | None, list[str]]:
    """(CPU model name, the `CPU_FLAGS` present, in that order) from the text of /proc/cpuinfo."""
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and model is None:
            model = " ".join(value.split())
        elif key in ("flags", "Features") and flags is None:
            flags = set(value.split())
    return model, [flag for flag in CPU_FLAGS if flag in (flags or ())]


def cpu_description() -> str:
    """The CPU model and its kernel-relevant flags, e.g. "AMD EPYC (avx2 avx512f avx512_bf16)"."""
    try:
        model, flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: the platform's processor name only
        model, flags = None, []
    model = model or platform.processor() or platform.machine()
    return f"{model} ({' '.join(flags)})" if flags else model


def device_description(device: str = "cpu") -> str:
    """What a cost curve was measured on: the GPU's name, or the CPU model and flags."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_description()


def environment(device: str = "cpu") -> dict:
    """Where the numbers were measured: they hold for this machine and thread count only."""
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "device": device_description(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
