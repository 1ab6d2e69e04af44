"""Train a small draft for a target by knowledge distillation on the target's own outputs.

Three resumable stages under a work directory (default ~/.cache/speckv/distill/<target>-<key>):

1. generate: for each train prompt of the prompt set, the target's greedy continuation and a few
   sampled ones (temperature `--temperature`), with the target's top-k logits at every response
   position (taken during generation, so no second forward is needed). One shard per batch on
   disk; an interrupted run skips the shards already written. The held-out reference (the
   target's greedy continuation of a few held-out prompts per task) is made the same way.
2. train: a k-layer Llama with the target's hidden size, its layers initialised from chosen
   target layers, its input embedding and output head the target's frozen embedding (the head
   restricted to the most frequent tokens of the target's outputs). Only the layers and the
   final norm are trained; loss on response positions only. Checkpoint after every epoch (and
   every few minutes), so an interrupted run continues where it stopped.
3. save: the draft directory `speckv.models.load_draft` reads (see docs/draft.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from speckv.errors import SpecKVError
from speckv.paths import cache_dir

# --- settings ----------------------------------------------------------------------------------

DEFAULT_SAMPLES = {"code": 8, "math": 10, "chat": 12, "summarization": 2, "other": 4}


@dataclass
class GenConfig:
    """What data is generated; its hash names the work directory, so changing it starts afresh."""

    prompts: str = "mixed"
    new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 16  # stored target logits per position
    samples: dict = field(default_factory=lambda: dict(DEFAULT_SAMPLES))  # per task; sample 0 is greedy
    heldout_per_task: int = 4
    max_prompt_tokens: int = 768
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class TrainConfig:
    layers: str = "0,29"  # target layers that initialise the draft's layers (their count = depth)
    vocab: int = 8192  # draft output vocabulary (most frequent tokens); 0 = the full vocabulary
    epochs: int = 8
    batch_tokens: int = 2048  # response tokens per optimiser step (about)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 50
    ce_weight: float = 0.5  # loss = ce_weight * CE(target argmax) + (1 - ce_weight) * soft CE(top-k)
    seed: int = 0


# --- stage 1: target outputs -------------------------------------------------------------------


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
    from speckv.models import encode_prompt

    if split == "heldout":
        items = load_prompts(gen.prompts, split="heldout", per_task=gen.heldout_per_task)
    else:
        items = load_prompts(gen.prompts, split="train")
    if not items:
        raise SpecKVError(f"prompt set '{gen.prompts}' has no {split} prompts")
    by_task: dict[str, list] = {}
    for item in items:
        ids = encode_prompt(tokenizer, item.text)
        if len(ids) > gen.max_prompt_tokens:  # keep the chat template's tail: cut the middle
            half = gen.max_prompt_tokens // 2
            ids = ids[:half] + ids[-half:]
        by_task.setdefault(item.task, []).append((item.id, item.task, ids))
    jobs = []
    for task, rows in sorted(by_task.items()):
        samples = 1 if split == "heldout" else max(1, int(gen.samples.get(task, 1)))
        rows.sort(key=lambda row: (len(row[2]), row[0]))
        per_batch = max(1, batch_rows // samples)
        for start in range(0, len(rows), per_batch):
            chunk = rows[start : start + per_batch]
            jobs.append(Job(f"{split}-{task}-{start:05d}", chunk, samples, greedy_only=split == "heldout"))
    return jobs


@torch.no_grad()
def generate_batch(model, job: Job, gen: GenConfig, eos_ids: list[int], pad_id: int) -> list[dict]:
    """Continue every prompt of `job` `job.samples` times; record the target's top-k logits."""
    device = next(model.parameters()).device
    prompts = [row[2] for row in job.items]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):  # left padding
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        mask[i, width - len(ids) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    logits = out.logits[:, -1].float()
    samples = job.samples
    if samples > 1:
        cache.batch_repeat_interleave(samples)
        logits = logits.repeat_interleave(samples, 0)
        mask = mask.repeat_interleave(samples, 0)
    rows = logits.shape[0]
    greedy = torch.tensor([job.greedy_only or r % samples == 0 for r in range(rows)])
    seed = int(hashlib.sha256(f"{gen.seed}:{job.name}".encode()).hexdigest()[:8], 16)
    generator = torch.Generator().manual_seed(seed)
    next_pos = torch.tensor([len(prompts[r // samples]) for r in range(rows)])
    tokens: list[list[int]] = [[] for _ in range(rows)]
    top_idx: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    top_val: list[list[torch.Tensor]] = [[] for _ in range(rows)]
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
        if len(keep) < len(active):
            index = torch.tensor(keep)
            cache.batch_select_indices(index.to(device))
            mask = mask[index]
            active, chosen = active[index], chosen[index]
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long)], dim=1)
        pos = next_pos[active] + torch.tensor([len(tokens[r]) - 1 for r in active.tolist()])
        out = model(
            input_ids=chosen.view(-1, 1).to(device),
            attention_mask=mask.to(device),
            position_ids=pos.view(-1, 1).to(device),
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1].float()
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
    return records


def generate_data(
    target, gen: GenConfig, work: Path, split: str, batch_rows: int = 32, progress: bool = True
) -> list[dict]:
    """All records of `split` (train or heldout), generating the missing shards first."""
    from tqdm import tqdm

    shard_dir = work / split
    shard_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(target.tokenizer, gen, split, batch_rows)
    missing = [job for job in jobs if not (shard_dir / f"{job.name}.pt").exists()]
    pad_id = target.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else target.eos_token_ids[0]
    if missing:
        bar = tqdm(
            missing, desc=f"target outputs ({split})", unit="batch", disable=not progress, file=sys.stderr
        )
        tokens = 0
        start = time.time()
        for job in bar:
            records = generate_batch(target.model, job, gen, target.eos_token_ids, pad_id)
            tmp = shard_dir / f"{job.name}.pt.tmp"
            torch.save(records, tmp)
            os.replace(tmp, shard_dir / f"{job.name}.pt")
            tokens += sum(len(r["response"]) for r in records)
            bar.set_postfix(tok=tokens, tok_s=f"{tokens / (time.time() - start):.0f}")
    records = []
    for job in jobs:
        records.extend(torch.load(shard_dir / f"{job.name}.pt"))
    return records


def default_work_dir(target_name: str, gen: GenConfig) -> Path:
    return cache_dir() / "distill" / f"{target_name}-{gen.key()}"
