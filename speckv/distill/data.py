"""Distillation data: the target's own continuations of the train prompts, with its top-k logits.

For each train prompt of the prompt set (plus the offline-built extra prompts of
`speckv.distill.prompts`, unless `GenConfig.extra` is empty), the target's greedy continuation and
a few sampled ones, with the target's top-k logits at every response position (taken during
generation, so no second forward is needed). The held-out reference (the target's greedy
continuation of a few held-out prompts per task) is made the same way. One shard per batch on
disk, under a work directory named by the settings' hash; an interrupted run skips the shards
already written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from speckv.decoding.cache import cached_forward
from speckv.distill.prompts import EXTRA_SETS
from speckv.errors import SpecKVError
from speckv.util.paths import cache_dir
from speckv.util.progress import progress_bar

DEFAULT_SAMPLES = {"code": 6, "math": 6, "chat": 12, "summarization": 2, "other": 4}
# Train prompts used per task (file order); summarization has many long prompts, so fewer are used.
DEFAULT_MAX_PROMPTS = {"summarization": 192}
# Extra prompts (more distinct prompts, fewer samples each): the draft overfits the benchmark's few.
DEFAULT_EXTRA_LIMITS = {
    "stdlib-code": 1010,
    "template-chat": 2400,
    "template-math": 1200,
    "summarization-rest": 555,
}
DEFAULT_EXTRA_SAMPLES = {"code": 2, "chat": 2, "math": 3, "summarization": 1}
# Target hidden states stored for a feature drafter (indices into HF's `hidden_states`: 0 is the
# embedding output, i the output of layer i, the last one after the final norm). `auto`: a low, a
# middle and the top one, as EAGLE-3 fuses them (3, 16, 30 on a 30-layer target).
DEFAULT_FEATURES = "auto"
# Reference prompts in styles the benchmark sets lack (the SpecKV paper's 20 prompts: open-ended
# chat, coding questions, word problems, explanations), never trained on: the "unfamiliar" split.
UNFAMILIAR = "unfamiliar"


@dataclass
class GenConfig:
    """What data is generated; its hash names the work directory, so changing it starts afresh."""

    prompts: str = "mixed"
    new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 16  # stored target logits per position
    samples: dict = field(default_factory=lambda: dict(DEFAULT_SAMPLES))  # per task; sample 0 is greedy
    max_prompts: dict = field(default_factory=lambda: dict(DEFAULT_MAX_PROMPTS))  # per task
    heldout_per_task: int = 4
    max_prompt_tokens: int = 768
    seed: int = 0
    # Extra train prompt sets (speckv.distill.prompts), comma-separated, spelled as
    # `extra_set_names` returns them: the string is part of the key.
    extra: str = ",".join(EXTRA_SETS)
    extra_limits: dict = field(default_factory=lambda: dict(DEFAULT_EXTRA_LIMITS))  # prompts per set
    extra_samples: dict = field(default_factory=lambda: dict(DEFAULT_EXTRA_SAMPLES))  # per task
    precision: str = "bf16"  # the target's compression level while generating
    features: str = DEFAULT_FEATURES  # hidden-state indices stored per position ("" = none)

    def key(self) -> str:
        fields = asdict(self)
        if not self.extra:  # a run without extra prompts keeps the key it had before they existed
            for name in ("extra", "extra_limits", "extra_samples"):
                fields.pop(name)
        # Data generated in fp32 without features keeps the key it had before either option.
        if self.precision == "fp32" and not self.features:
            fields.pop("precision")
            fields.pop("features")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def feature_indices(spec: str, num_layers: int) -> list[int]:
    """The hidden-state indices of `spec` ("auto", "" or comma-separated, negative from the end)."""
    if spec == "auto":
        return [min(3, num_layers), num_layers // 2 + 1, num_layers]
    try:
        indices = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise SpecKVError(f"features must be 'auto' or comma-separated layer indices, got '{spec}'") from None
    resolved = [i + num_layers + 1 if i < 0 else i for i in indices]
    if any(not 0 <= i <= num_layers for i in resolved):
        raise SpecKVError(f"features {spec}: the target has hidden states 0..{num_layers}")
    return resolved


@dataclass
class Job:
    """One batch of generation: prompts, each continued `samples` times (sample 0 greedy)."""

    name: str
    items: list  # [(id, task, prompt_ids)]
    samples: int
    greedy_only: bool = False


def plan_jobs(tokenizer, gen: GenConfig, split: str, batch_rows: int) -> list[Job]:
    """Deterministic batches: prompts of one task sorted by length, `batch_rows` rows per batch."""
    from speckv.datasets import load_prompts
    from speckv.decoding.models import encode_prompt

    if split == "heldout":
        items = load_prompts(gen.prompts, split="heldout", per_task=gen.heldout_per_task)
    elif split == UNFAMILIAR:
        items = load_prompts("paper")
    else:
        items = load_prompts(gen.prompts, split="train")
    if not items:
        raise SpecKVError(f"prompt set '{gen.prompts}' has no {split} prompts")
    by_task: dict[str, list] = {}
    reference = split in ("heldout", UNFAMILIAR)  # greedy continuations to measure agreement on
    if not reference:
        taken: Counter = Counter()
        kept = []
        for item in items:
            taken[item.task] += 1
            if taken[item.task] <= gen.max_prompts.get(item.task, len(items)):
                kept.append(item)
        items = kept
    groups = [(item, item.task) for item in items]
    if not reference and gen.extra:
        from speckv.distill.prompts import extra_prompts

        used = gen.max_prompts.get("summarization", len(items))
        # Their own job names ("extra-<task>"), so the benchmark prompts' batches stay as they were.
        groups += [(item, f"extra-{item.task}") for item in extra_prompts(gen.extra, gen.extra_limits, used)]
    for item, group in groups:
        ids = encode_prompt(tokenizer, item.text)
        if len(ids) > gen.max_prompt_tokens:  # keep the chat template's tail: cut the middle
            half = gen.max_prompt_tokens // 2
            ids = ids[:half] + ids[-half:]
        by_task.setdefault(group, []).append((item.id, item.task, ids))
    jobs = []
    for task, rows in sorted(by_task.items()):
        per_task = gen.extra_samples if task.startswith("extra-") else gen.samples
        samples = 1 if reference else max(1, int(per_task.get(task.removeprefix("extra-"), 1)))
        rows.sort(key=lambda row: (len(row[2]), row[0]))
        per_batch = max(1, batch_rows // samples)
        for start in range(0, len(rows), per_batch):
            chunk = rows[start : start + per_batch]
            jobs.append(Job(f"{split}-{task}-{start:05d}", chunk, samples, greedy_only=reference))
    return jobs


def generate_batch(model, job: Job, gen: GenConfig, eos_ids: list[int], pad_id: int) -> list[dict]:
    """Continue every prompt of `job` `job.samples` times; record the target's top-k logits and,
    if `gen.features` names any, its hidden states at every position (from the same passes)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    layers = feature_indices(gen.features, model.config.num_hidden_layers) if gen.features else []
    prompts = [row[2] for row in job.items]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):  # left padding
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        mask[i, width - len(ids) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    # A batch of sequences of different lengths: its own cache and masks, not `CachedModel`'s.
    cache = DynamicCache(config=model.config)
    out = cached_forward(
        model,
        cache,
        input_ids.to(device),
        keep=1,
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        hidden_states=bool(layers),
    )
    logits = out.logits[:, -1].float()
    # Stored in bf16: a feature drafter reads them as inputs, and they are most of the data's size.
    prompt_feats = (
        [
            torch.stack([out.hidden_states[i][row, width - len(ids) :] for i in layers], 1).bfloat16()
            for row, ids in enumerate(prompts)
        ]
        if layers
        else None
    )
    samples = job.samples
    if samples > 1:  # the samples of a prompt share its prefill
        cache.batch_repeat_interleave(samples)
        logits = logits.repeat_interleave(samples, 0)
        mask = mask.repeat_interleave(samples, 0)
    rows = logits.shape[0]
    greedy = torch.tensor([job.greedy_only or r % samples == 0 for r in range(rows)])
    # Seeded by the job's name, so a resumed run regenerates a missing shard exactly.
    seed = int(hashlib.sha256(f"{gen.seed}:{job.name}".encode()).hexdigest()[:8], 16)
    generator = torch.Generator().manual_seed(seed)
    next_pos = torch.tensor([len(prompts[r // samples]) for r in range(rows)])
    tokens: list[list[int]] = [[] for _ in range(rows)]
    top_idx: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    top_val: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    feats: list[list[torch.Tensor]] = [[] for _ in range(rows)]  # of the response tokens fed back
    active = torch.arange(rows)  # original row of each row still in the batch
    eos = torch.tensor(eos_ids)
    for _step in range(gen.new_tokens):
        # Sampling is top-64 sampling at `temperature` (all but identical, much cheaper on a CPU).
        values, indices = logits.topk(max(64, gen.top_k), dim=-1)
        probs = torch.softmax(values / gen.temperature, dim=-1)
        drawn = indices.gather(1, torch.multinomial(probs, 1, generator=generator)).squeeze(1)
        chosen = torch.where(greedy[active], indices[:, 0], drawn)
        values, indices = values[:, : gen.top_k], indices[:, : gen.top_k]
        keep = []
        for j, row in enumerate(active.tolist()):
            tokens[row].append(int(chosen[j]))
            top_idx[row].append(indices[j].to(torch.int32))
            top_val[row].append(values[j].to(torch.float16))
            if not bool((eos == chosen[j]).any()) and len(tokens[row]) < gen.new_tokens:
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(active):  # finished rows leave the batch, so they cost nothing more
            index = torch.tensor(keep)
            cache.batch_select_indices(index.to(device))
            mask = mask[index]
            active, chosen = active[index], chosen[index]
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long)], dim=1)
        pos = next_pos[active] + torch.tensor([len(tokens[r]) - 1 for r in active.tolist()])
        out = cached_forward(
            model,
            cache,
            chosen.view(-1, 1).to(device),
            keep=1,
            attention_mask=mask.to(device),
            position_ids=pos.view(-1, 1).to(device),
            hidden_states=bool(layers),
        )
        logits = out.logits[:, -1].float()
        if layers:
            step = torch.stack([out.hidden_states[i][:, -1] for i in layers], 1).bfloat16()
            for j, row in enumerate(active.tolist()):
                feats[row].append(step[j])
    records = []
    for row in range(rows):
        item_id, task, prompt = job.items[row // samples]
        records.append(
            {
                "id": item_id,
                "task": task,
                "sample": row % samples,
                "greedy": bool(greedy[row]),
                "prompt": torch.tensor(prompt, dtype=torch.int32),
                "response": torch.tensor(tokens[row], dtype=torch.int32),
                "top_idx": torch.stack(top_idx[row]),
                "top_val": torch.stack(top_val[row]),
            }
        )
        if layers:
            # (P, L, hidden) and (T-1, L, hidden): the last response token is never fed. The
            # samples of a prompt share one prompt tensor, which `torch.save` writes once.
            records[-1]["prompt_feats"] = prompt_feats[row // samples]
            width_f = prompt_feats[0].shape[1:]
            records[-1]["response_feats"] = (
                torch.stack(feats[row]) if feats[row] else torch.zeros((0, *width_f), dtype=torch.bfloat16)
            )
    return records


def generate_data(
    target,
    gen: GenConfig,
    work: Path,
    split: str,
    batch_rows: int = 96,
    progress: bool = True,
    max_batches: int = 0,
) -> list[dict]:
    """All records of `split` (train, heldout or unfamiliar), generating the missing shards first.
    `max_batches` > 0 keeps the first batches of the plan's fixed shuffled order only: a sample of
    every task, the same shards a full run starts with (data of a run cut short)."""
    shard_dir = work / split
    shard_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(target.tokenizer, gen, split, batch_rows)
    # A fixed shuffled order: the shards of an unfinished run are a sample of all tasks (training
    # can start on them); the shards' names and contents do not depend on it.
    random.Random(0).shuffle(jobs)
    if max_batches > 0:
        jobs = jobs[:max_batches]
    missing = [job for job in jobs if not (shard_dir / f"{job.name}.pt").exists()]
    pad_id = target.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else target.eos_token_ids[0]
    if missing:
        bar = progress_bar(missing, desc=f"target outputs ({split})", unit="batch", show=progress)
        tokens = 0
        start = time.time()
        for job in bar:
            records = generate_batch(target.model, job, gen, target.eos_token_ids, pad_id)
            # Written under another name and renamed: a killed run never leaves a partial shard.
            tmp = shard_dir / f"{job.name}.pt.tmp"
            torch.save(records, tmp)
            os.replace(tmp, shard_dir / f"{job.name}.pt")
            tokens += sum(len(r["response"]) for r in records)
            bar.set_postfix(tok=tokens, tok_s=f"{tokens / (time.time() - start):.0f}")
    records = []
    for job in jobs:
        # Memory-mapped: the stored hidden states are most of the data and need not all be in RAM.
        records.extend(torch.load(shard_dir / f"{job.name}.pt", mmap=True))
    return records


def default_work_dir(target_name: str, gen: GenConfig) -> Path:
    """~/.cache/speckv/distill/<target>-<data key>: other data settings get another directory."""
    return cache_dir() / "distill" / f"{target_name}-{gen.key()}"
