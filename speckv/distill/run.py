"""Train a small draft for a target by knowledge distillation on the target's own outputs.

Three resumable stages under a work directory (default ~/.cache/speckv/distill/<target>-<key>):

1. generate: for each train prompt of the prompt set (plus the offline-built extra prompts of
   `speckv.distill.prompts`, unless `--extra none`), the target's greedy continuation and a few
   sampled ones (temperature `--temperature`), with the target's top-k logits at every response
   position (taken during generation, so no second forward is needed). One shard per batch on
   disk; an interrupted run skips the shards already written. The held-out reference (the
   target's greedy continuation of a few held-out prompts per task) is made the same way.
2. train: a k-layer Llama with the target's hidden size, its layers initialised from chosen
   target layers, its input embedding and output head the target's frozen embedding (the head
   restricted to the most frequent tokens of the target's outputs). Only the layers and the
   final norm are trained; loss on response positions only. Checkpoint after every epoch (and
   every few minutes), so an interrupted run continues where it stopped.
3. save: the draft directory `speckv.decoding.draft_files.load_draft` reads (see docs/draft.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from speckv.distill.prompts import EXTRA_SETS, extra_set_names
from speckv.errors import SpecKVError
from speckv.util.paths import cache_dir

# --- settings ----------------------------------------------------------------------------------

DEFAULT_SAMPLES = {"code": 6, "math": 6, "chat": 12, "summarization": 2, "other": 4}
# Train prompts used per task (file order); summarization has many long prompts, so fewer are used.
DEFAULT_MAX_PROMPTS = {"summarization": 192}
# Extra prompts (more distinct prompts, fewer samples each): the draft overfits the benchmark's few.
DEFAULT_EXTRA_LIMITS = {"stdlib-code": 600, "template-chat": 800, "summarization-rest": 555}
DEFAULT_EXTRA_SAMPLES = {"code": 2, "chat": 2, "summarization": 1}


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
    extra: str = ",".join(EXTRA_SETS)  # extra train prompt sets (speckv.distill.prompts), comma-separated
    extra_limits: dict = field(default_factory=lambda: dict(DEFAULT_EXTRA_LIMITS))  # prompts per set
    extra_samples: dict = field(default_factory=lambda: dict(DEFAULT_EXTRA_SAMPLES))  # per task

    def key(self) -> str:
        fields = asdict(self)
        if not self.extra:  # a run without extra prompts keeps the key it had before they existed
            for name in ("extra", "extra_limits", "extra_samples"):
                fields.pop(name)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class TrainConfig:
    layers: str = "0,1"  # target layers that initialise the draft's layers (their count = depth)
    vocab: int = 8192  # draft output vocabulary (most frequent tokens); 0 = the full vocabulary
    epochs: int = 4
    batch_tokens: int = 1024  # response tokens per optimiser step (about)
    lr: float = 3e-3
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
    from speckv.decoding.models import encode_prompt

    if split == "heldout":
        items = load_prompts(gen.prompts, split="heldout", per_task=gen.heldout_per_task)
    else:
        items = load_prompts(gen.prompts, split="train")
    if not items:
        raise SpecKVError(f"prompt set '{gen.prompts}' has no {split} prompts")
    by_task: dict[str, list] = {}
    if split != "heldout":
        taken: Counter = Counter()
        kept = []
        for item in items:
            taken[item.task] += 1
            if taken[item.task] <= gen.max_prompts.get(item.task, len(items)):
                kept.append(item)
        items = kept
    groups = [(item, item.task) for item in items]
    if split != "heldout" and gen.extra:
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
        samples = 1 if split == "heldout" else max(1, int(per_task.get(task.removeprefix("extra-"), 1)))
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
        cache=cache,
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
            cache=cache,
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


# --- stage 2: the draft ------------------------------------------------------------------------


def parse_layers(text: str, num_target_layers: int) -> list[int]:
    """'0,29' -> [0, 29]; negative indices count from the end; each must exist in the target."""
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SpecKVError(f"--layers must be comma-separated target layer indices, got '{text}'") from None
    if not layers:
        raise SpecKVError("--layers names no layer")
    resolved = [layer + num_target_layers if layer < 0 else layer for layer in layers]
    bad = [layer for layer in layers if not -num_target_layers <= layer < num_target_layers]
    if bad:
        raise SpecKVError(f"--layers {bad}: the target has layers 0..{num_target_layers - 1}")
    return resolved


def build_vocab_map(
    records: list[dict], size: int, vocab_size: int, always: list[int]
) -> torch.Tensor | None:
    """The `size` tokens the target predicts (top-1) most often on its outputs, plus `always` (EOS);
    sorted ids. None when `size` is 0 or covers the whole vocabulary."""
    if size <= 0 or size >= vocab_size:
        return None
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for record in records:
        counts += torch.bincount(record["top_idx"][:, 0].long(), minlength=vocab_size)
        counts += torch.bincount(record["response"].long(), minlength=vocab_size)
    for token in always:
        counts[token] = counts.max() + 1
    chosen = counts.topk(size).indices
    return chosen.sort().values


def make_draft(target_model, layers: list[int], vocab_map: torch.Tensor | None):
    """A Llama with `len(layers)` layers copied from the target, sharing its (frozen) embedding."""
    from transformers import AutoModelForCausalLM

    config = type(target_model.config).from_dict(target_model.config.to_dict())
    config.num_hidden_layers = len(layers)
    config.tie_word_embeddings = False
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    target_layers = target_model.model.layers
    for slot, index in enumerate(layers):
        draft.model.layers[slot].load_state_dict(target_layers[index].state_dict())
    draft.model.norm.load_state_dict(target_model.model.norm.state_dict())
    embedding = target_model.get_input_embeddings().weight.detach().float()
    draft.model.embed_tokens.weight = torch.nn.Parameter(embedding, requires_grad=False)
    draft.lm_head.weight = torch.nn.Parameter(embedding, requires_grad=False)
    draft.train()
    return draft


def trainable_state(draft) -> dict[str, torch.Tensor]:
    """The draft's own weights: everything but the borrowed embedding and head."""
    skip = ("model.embed_tokens.weight", "lm_head.weight")
    return {name: tensor for name, tensor in draft.state_dict().items() if name not in skip}


@dataclass
class Example:
    ids: torch.Tensor  # prompt + response, long
    start: int  # index of the position predicting the first response token
    targets: torch.Tensor  # (T, k) draft-vocabulary indices of the target's top-k, -1 if absent
    values: torch.Tensor  # (T, k) target logits
    task: str


def make_examples(records: list[dict], lookup: torch.Tensor | None) -> list[Example]:
    examples = []
    for record in records:
        response = record["response"].long()
        if len(response) == 0:
            continue
        # The last response token is never an input: the positions predict response[0..T-1].
        ids = torch.cat([record["prompt"].long(), response[:-1]])
        top = record["top_idx"].long()
        targets = top if lookup is None else lookup[top]
        examples.append(
            Example(ids, len(record["prompt"]) - 1, targets, record["top_val"].float(), record["task"])
        )
    return examples


def batches(examples: list[Example], batch_tokens: int, seed: int) -> list[list[int]]:
    """Shuffled batches of about `batch_tokens` response positions, of similar total length."""
    rng = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=rng).tolist()
    # Sort within windows of 64 examples by length, so a batch pads little.
    chunks = []
    for begin in range(0, len(order), 64):
        window = sorted(order[begin : begin + 64], key=lambda i: len(examples[i].ids))
        current, count = [], 0
        for index in window:
            current.append(index)
            count += len(examples[index].targets)
            if count >= batch_tokens:
                chunks.append(current)
                current, count = [], 0
        if current:
            chunks.append(current)
    perm = torch.randperm(len(chunks), generator=rng).tolist()
    return [chunks[i] for i in perm]


def draft_logits(draft, head: torch.Tensor, batch: list[Example]) -> tuple[torch.Tensor, list[int]]:
    """Draft logits (N, V') at the response positions of every example, concatenated."""
    width = max(len(example.ids) for example in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):  # right padding: causal attention never sees it
        ids[row, : len(example.ids)] = example.ids
    hidden = draft.model(input_ids=ids, use_cache=False).last_hidden_state
    picked = [hidden[row, ex.start : ex.start + len(ex.targets)] for row, ex in enumerate(batch)]
    return torch.cat(picked) @ head.T, [len(example.targets) for example in batch]


def distill_loss(logits: torch.Tensor, targets: torch.Tensor, values: torch.Tensor, ce_weight: float):
    """ce_weight * CE(target argmax) + (1 - ce_weight) * CE(target top-k distribution, renormalised
    over the draft's vocabulary). Positions whose argmax the draft cannot propose skip the hard term."""
    log_q = torch.log_softmax(logits, dim=-1)
    present = targets >= 0
    gathered = log_q.gather(1, targets.clamp(min=0))
    p = torch.softmax(values.masked_fill(~present, float("-inf")), dim=-1)
    p = torch.nan_to_num(p)
    soft = -(p * gathered).sum(-1)
    hard_mask = present[:, 0]
    hard = -gathered[:, 0]
    soft_loss = soft[present.any(-1)].mean() if present.any() else logits.sum() * 0
    hard_loss = hard[hard_mask].mean() if hard_mask.any() else logits.sum() * 0
    return ce_weight * hard_loss + (1 - ce_weight) * soft_loss


@torch.no_grad()
def agreement(draft, head: torch.Tensor, examples: list[Example], vocab_map: torch.Tensor | None) -> dict:
    """Per task: share of positions where the draft's argmax is the target's argmax (teacher-forced)."""
    was_training = draft.training
    draft.eval()
    hits: Counter = Counter()
    totals: Counter = Counter()
    for example in examples:
        logits, _ = draft_logits(draft, head, [example])
        hits[example.task] += int((logits.argmax(-1) == example.targets[:, 0]).sum())
        totals[example.task] += len(example.targets)
    draft.train(was_training)
    result = {task: hits[task] / totals[task] for task in sorted(totals)}
    result["overall"] = sum(result[t] for t in totals) / len(totals)  # mean over tasks
    return result


def train_draft(
    target_model,
    train_records: list[dict],
    heldout_records: list[dict],
    cfg: TrainConfig,
    run_dir: Path,
    eos_ids: list[int],
    progress: bool = True,
    checkpoint_s: float = 300.0,
    log=print,
    stop_after: int | None = None,
):
    """Train (or continue training) a draft; returns (draft, vocab_map, history).

    A checkpoint in `run_dir` (written every `checkpoint_s` seconds and after each epoch) is
    resumed: batch order, learning-rate schedule and optimiser state continue exactly."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = target_model.config.vocab_size
    layers = parse_layers(cfg.layers, target_model.config.num_hidden_layers)
    vocab_map = build_vocab_map(train_records, cfg.vocab, vocab_size, eos_ids)
    lookup = None
    if vocab_map is not None:
        lookup = torch.full((vocab_size,), -1, dtype=torch.long)
        lookup[vocab_map] = torch.arange(len(vocab_map))
    draft = make_draft(target_model, layers, vocab_map)
    embedding = draft.model.embed_tokens.weight
    head = embedding if vocab_map is None else embedding[vocab_map]
    train = make_examples(train_records, lookup)
    heldout = make_examples(heldout_records, lookup)
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    steps_per_epoch = len(batches(train, cfg.batch_tokens, cfg.seed))
    total_steps = steps_per_epoch * cfg.epochs

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        progress_ = (step - cfg.warmup) / max(1, total_steps - cfg.warmup)
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_))))

    state = {"epoch": 0, "batch": 0, "step": 0, "history": [], "loss_sum": 0.0, "loss_n": 0}
    checkpoint = run_dir / "checkpoint.pt"
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        draft.load_state_dict(saved["draft"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        log(f"resuming from {checkpoint}: epoch {state['epoch'] + 1}, batch {state['batch']}")
    elif vocab_map is not None:
        covered = {}
        for example in heldout:
            covered.setdefault(example.task, []).append(example.targets[:, 0] >= 0)
        coverage = {task: float(torch.cat(v).float().mean()) for task, v in covered.items()}
        log(f"draft vocabulary {len(vocab_map)}: held-out target-argmax coverage {_fmt(coverage)}")
        before = agreement(draft, head, heldout, vocab_map)
        log(f"before training: held-out agreement {_fmt(before)}")
        state["history"].append({"epoch": 0, "agreement": before})

    def save_checkpoint():
        tmp = checkpoint.with_suffix(".tmp")
        torch.save(
            {"draft": trainable_state(draft), "optimizer": optimizer.state_dict(), "state": state}, tmp
        )
        os.replace(tmp, checkpoint)

    last_save = time.time()
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        plan = batches(train, cfg.batch_tokens, cfg.seed + epoch)
        bar = tqdm(
            total=len(plan),
            initial=state["batch"],
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
            disable=not progress,
            file=sys.stderr,
        )
        started = time.time()
        for index in range(state["batch"], len(plan)):
            batch = [train[i] for i in plan[index]]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state["step"])
            logits, _ = draft_logits(draft, head, batch)
            targets = torch.cat([example.targets for example in batch])
            values = torch.cat([example.values for example in batch])
            loss = distill_loss(logits, targets, values, cfg.ce_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            state["step"] += 1
            state["batch"] = index + 1
            state["loss_sum"] += float(loss.detach())
            state["loss_n"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{state['loss_sum'] / state['loss_n']:.3f}")
            if time.time() - last_save > checkpoint_s:
                save_checkpoint()
                last_save = time.time()
            if stop_after is not None and state["step"] >= stop_after:  # tests: an interruption
                save_checkpoint()
                bar.close()
                raise KeyboardInterrupt
        bar.close()
        result = agreement(draft, head, heldout, vocab_map)
        entry = {
            "epoch": epoch + 1,
            "loss": state["loss_sum"] / max(1, state["loss_n"]),
            "agreement": result,
            "epoch_s": round(time.time() - started, 1),
        }
        state["history"].append(entry)
        log(f"epoch {epoch + 1}: loss {entry['loss']:.4f}, held-out agreement {_fmt(result)}")
        with (run_dir / "log.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")
        state.update(epoch=epoch + 1, batch=0, loss_sum=0.0, loss_n=0)
        save_checkpoint()
        last_save = time.time()
    draft.eval()
    return draft, vocab_map, state["history"]


def _fmt(values: dict) -> str:
    return ", ".join(f"{key} {value:.3f}" for key, value in values.items())


# --- stage 3: the draft directory --------------------------------------------------------------


def save_draft(draft, vocab_map: torch.Tensor | None, tokenizer, out: Path, manifest: dict) -> None:
    """Write the directory `speckv.decoding.draft_files.load_draft` reads: config, tokenizer, own weights (bf16)."""
    from safetensors.torch import save_file

    from speckv.decoding.draft_files import DRAFT_MANIFEST

    out.mkdir(parents=True, exist_ok=True)
    draft.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    weights = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in trainable_state(draft).items()}
    save_file(weights, out / "draft.safetensors")
    if vocab_map is not None:
        save_file({"vocab_map": vocab_map.to(torch.int32).contiguous()}, out / "vocab_map.safetensors")
    elif (out / "vocab_map.safetensors").exists():
        (out / "vocab_map.safetensors").unlink()
    manifest = {
        **manifest,
        "weights": "draft.safetensors",
        "vocab_map": "vocab_map.safetensors" if vocab_map is not None else None,
    }
    (out / DRAFT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


@torch.no_grad()
def loaded_agreement(draft, target, heldout_records: list[dict]) -> dict:
    """Held-out agreement of a draft as `load_draft` returns it (bf16 weights, restricted head)."""
    hits: Counter = Counter()
    totals: Counter = Counter()
    vocab_map = draft.vocab_map
    for record in heldout_records:
        response = record["response"].long()
        ids = torch.cat([record["prompt"].long(), response[:-1]])[None].to(draft.device)
        logits = draft.model(input_ids=ids).logits[0, len(record["prompt"]) - 1 :]
        guess = logits.argmax(-1).cpu()
        if vocab_map is not None:
            guess = vocab_map.cpu()[guess]
        hits[record["task"]] += int((guess == record["top_idx"][:, 0].long()).sum())
        totals[record["task"]] += len(response)
    result = {task: hits[task] / totals[task] for task in sorted(totals)}
    result["overall"] = sum(result[t] for t in totals) / len(totals)
    return result


@torch.no_grad()
def decode_cost(loaded, prompt_ids: list[int], tokens: int = 32) -> float:
    """Seconds per decoded token at batch 1 with a KV cache (greedy, after the prompt)."""
    from transformers import DynamicCache

    model = loaded.model
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt_ids], device=loaded.device)
    logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
    start = time.perf_counter()
    for _ in range(tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        logits = model(input_ids=token, cache=cache, use_cache=True).logits
    return (time.perf_counter() - start) / tokens


def cost_ratio(draft, target, prompt_ids: list[int], rounds: int = 5) -> tuple[float, float, float]:
    """(target s/token, draft s/token, ratio): alternating runs, the fastest of each, so a busy
    machine slows both alike as far as possible."""
    target_costs, draft_costs = [], []
    for _ in range(rounds):
        target_costs.append(decode_cost(target, prompt_ids))
        draft_costs.append(decode_cost(draft, prompt_ids))
    target_cost, draft_cost = min(target_costs), min(draft_costs)
    return target_cost, draft_cost, draft_cost / target_cost


# --- the whole run -----------------------------------------------------------------------------


def parse_samples(text: str | None) -> dict:
    """'code=8,chat=12' over the defaults."""
    samples = dict(DEFAULT_SAMPLES)
    for part in (text or "").split(","):
        if not part.strip():
            continue
        task, _, count = part.partition("=")
        try:
            samples[task.strip()] = int(count)
        except ValueError:
            raise SpecKVError(f"--samples takes task=count pairs, got '{part}'") from None
    return samples


def _given(args, **names) -> dict:
    """The options the user set (not None), so unset ones take the dataclass defaults."""
    return {
        field_: getattr(args, attr) for field_, attr in names.items() if getattr(args, attr, None) is not None
    }


def run(args) -> int:
    """`speckv distill`: generate (resumable), train (resumable), save, measure."""
    from speckv.decoding.draft_files import load_draft
    from speckv.decoding.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_model(args.target, "fp32", device="cpu")
    gen = GenConfig(
        **_given(args, prompts="prompts", new_tokens="new_tokens", temperature="temperature", extra="extra")
    )
    gen.samples = parse_samples(args.samples)
    # Checked here (a typo fails before the held-out data is generated) and spelled one way, since
    # the string is part of the data key.
    gen.extra = ",".join(extra_set_names(gen.extra))
    cfg = TrainConfig(
        **_given(
            args,
            layers="layers",
            vocab="vocab",
            epochs="epochs",
            batch_tokens="batch_tokens",
            lr="lr",
            ce_weight="ce_weight",
        )
    )
    if not 0 <= cfg.ce_weight <= 1:
        raise SpecKVError(f"--ce-weight must lie in 0..1, got {cfg.ce_weight}")
    if cfg.epochs < 1 or cfg.batch_tokens < 1 or gen.new_tokens < 1:
        raise SpecKVError("--epochs, --batch-tokens and --new-tokens must be positive")
    parse_layers(cfg.layers, target.model.config.num_hidden_layers)
    work = Path(args.work_dir).expanduser() if args.work_dir else default_work_dir(target.name, gen)
    work.mkdir(parents=True, exist_ok=True)
    (work / "gen_config.json").write_text(json.dumps(asdict(gen), indent=2) + "\n")
    out = Path(args.out).expanduser()
    print(f"speckv distill: work directory {work}", file=sys.stderr)

    started = time.time()
    heldout = generate_data(target, gen, work, "heldout")
    train = generate_data(target, gen, work, "train")
    gen_s = time.time() - started
    n_tokens = sum(len(r["response"]) for r in train)
    print(
        f"data: {len(train)} target continuations of {len({r['id'] for r in train})} train prompts, "
        f"{n_tokens} response tokens; held-out {len(heldout)} prompts",
        file=sys.stderr,
    )
    # The epoch count is not part of the key: rerunning with another --epochs continues the same
    # run (the cosine schedule is stretched or shortened from the current step on).
    settings = {key: value for key, value in asdict(cfg).items() if key != "epochs"}
    run_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    run_dir = work / f"train-{run_key}"
    (run_dir).mkdir(parents=True, exist_ok=True)
    (run_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    def log(message: str) -> None:
        print(message, file=sys.stderr)
        with (run_dir / "log.txt").open("a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    started = time.time()
    draft, vocab_map, history = train_draft(
        target.model, train, heldout, cfg, run_dir, target.eos_token_ids, log=log
    )
    train_s = time.time() - started
    manifest = {
        "name": args.name or f"{target.name}-draft",
        "target": target.name,
        "layers_from_target": parse_layers(cfg.layers, target.model.config.num_hidden_layers),
        "draft_vocab": len(vocab_map) if vocab_map is not None else target.model.config.vocab_size,
        "data": {
            "prompts": f"{gen.prompts} (train split)",
            "continuations": len(train),
            "response_tokens": n_tokens,
            **{key: value for key, value in asdict(gen).items() if key != "prompts"},
        },
        "training": {**asdict(cfg), "history": history},
        "command": "speckv distill " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else None,
    }
    save_draft(draft, vocab_map, target.tokenizer, out, manifest)
    loaded = load_draft(str(out), target)
    result = loaded_agreement(loaded, target, heldout)
    prompt = heldout[0]["prompt"].tolist()
    target_cost, draft_cost, _ = cost_ratio(loaded, target, prompt)
    manifest["heldout_agreement"] = {key: round(value, 4) for key, value in result.items()}
    manifest["cost_ratio"] = round(draft_cost / target_cost, 4)
    manifest["time_s"] = {"data_run": round(gen_s), "train_run": round(train_s)}
    save_draft(draft, vocab_map, target.tokenizer, out, manifest)
    log(f"saved {out}: held-out agreement {_fmt(result)}")
    log(
        f"decode cost per token (batch 1, fp32): target {target_cost * 1000:.1f} ms, "
        f"draft {draft_cost * 1000:.1f} ms (ratio {draft_cost / target_cost:.3f})"
    )
    return 0
