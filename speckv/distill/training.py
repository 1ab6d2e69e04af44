"""Training the draft on the target's outputs: examples, batches, the loss, checkpoints, agreement.

Loss on response positions only (the prompt is context): a mix of cross-entropy on the target's
argmax and on its stored top-k distribution. Only the draft's layers and final norm are trained.
A checkpoint after every epoch (and every few minutes) lets an interrupted run continue exactly
where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from speckv.distill.draft_model import (
    build_vocab_map,
    make_draft,
    parse_layers,
    trainable_state,
    vocab_lookup,
)
from speckv.util.progress import progress_bar

log = logging.getLogger(__name__)


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


@dataclass
class Example:
    ids: torch.Tensor  # prompt + response, long
    start: int  # index of the position predicting the first response token
    targets: torch.Tensor  # (T, k) draft-vocabulary indices of the target's top-k, -1 if absent
    values: torch.Tensor  # (T, k) target logits
    task: str


def make_examples(records: list[dict], lookup: torch.Tensor | None) -> list[Example]:
    """Training examples of data records; `lookup` maps a target token to its draft-vocabulary index."""
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


def batches(
    examples: list, batch_tokens: int, seed: int, size=lambda example: len(example.targets)
) -> list[list[int]]:
    """Shuffled batches of about `batch_tokens` response positions (`size` of an example), of
    similar total length (`len(example.ids)`)."""
    rng = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=rng).tolist()
    # Sort within windows of 64 examples by length, so a batch pads little.
    chunks = []
    for begin in range(0, len(order), 64):
        window = sorted(order[begin : begin + 64], key=lambda i: len(examples[i].ids))
        current, count = [], 0
        for index in window:
            current.append(index)
            count += size(examples[index])
            if count >= batch_tokens:
                chunks.append(current)
                current, count = [], 0
        if current:
            chunks.append(current)
    perm = torch.randperm(len(chunks), generator=rng).tolist()
    return [chunks[i] for i in perm]


def cosine_lr(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to 5% of it at `total` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def save_atomic(obj, path: Path) -> None:
    """`torch.save` under another name, then renamed: a killed run never leaves a partial file."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
def agreement(draft, head: torch.Tensor, examples: list[Example]) -> dict:
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


def format_scores(values: dict) -> str:
    """'chat 0.381, code 0.703, ...' for a log line."""
    return ", ".join(f"{key} {value:.3f}" for key, value in values.items())


def train_draft(
    target_model,
    train_records: list[dict],
    heldout_records: list[dict],
    cfg: TrainConfig,
    run_dir: Path,
    eos_ids: list[int],
    progress: bool = True,
    checkpoint_s: float = 300.0,
    note: Callable[[str], None] = log.info,
    stop_after: int | None = None,
):
    """Train (or continue training) a draft; returns (draft, vocab_map, history).

    A checkpoint in `run_dir` (written every `checkpoint_s` seconds and after each epoch) is
    resumed: batch order, learning-rate schedule and optimiser state continue exactly."""
    torch.manual_seed(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = target_model.config.vocab_size
    layers = parse_layers(cfg.layers, target_model.config.num_hidden_layers)
    vocab_map = build_vocab_map(train_records, cfg.vocab, vocab_size, eos_ids)
    lookup = vocab_lookup(vocab_map, vocab_size)
    draft = make_draft(target_model, layers)
    embedding = draft.model.embed_tokens.weight
    head = embedding if vocab_map is None else embedding[vocab_map]
    train = make_examples(train_records, lookup)
    heldout = make_examples(heldout_records, lookup)
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    steps_per_epoch = len(batches(train, cfg.batch_tokens, cfg.seed))
    total_steps = steps_per_epoch * cfg.epochs

    state = {"epoch": 0, "batch": 0, "step": 0, "history": [], "loss_sum": 0.0, "loss_n": 0}
    checkpoint = run_dir / "checkpoint.pt"
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        draft.load_state_dict(saved["draft"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        note(f"resuming from {checkpoint}: epoch {state['epoch'] + 1}, batch {state['batch']}")
    elif vocab_map is not None:
        covered = {}
        for example in heldout:
            covered.setdefault(example.task, []).append(example.targets[:, 0] >= 0)
        coverage = {task: float(torch.cat(v).float().mean()) for task, v in covered.items()}
        note(f"draft vocabulary {len(vocab_map)}: held-out target-argmax coverage {format_scores(coverage)}")
        before = agreement(draft, head, heldout)
        note(f"before training: held-out agreement {format_scores(before)}")
        state["history"].append({"epoch": 0, "agreement": before})

    def save_checkpoint():
        save_atomic(
            {"draft": trainable_state(draft), "optimizer": optimizer.state_dict(), "state": state}, checkpoint
        )

    last_save = time.time()
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        plan = batches(train, cfg.batch_tokens, cfg.seed + epoch)
        bar = progress_bar(
            total=len(plan),
            initial=state["batch"],
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
            show=progress,
        )
        started = time.time()
        for index in range(state["batch"], len(plan)):
            batch = [train[i] for i in plan[index]]
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(state["step"], cfg.lr, cfg.warmup, total_steps)
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
        result = agreement(draft, head, heldout)
        entry = {
            "epoch": epoch + 1,
            "loss": state["loss_sum"] / max(1, state["loss_n"]),
            "agreement": result,
            "epoch_s": round(time.time() - started, 1),
        }
        state["history"].append(entry)
        note(f"epoch {epoch + 1}: loss {entry['loss']:.4f}, held-out agreement {format_scores(result)}")
        with (run_dir / "log.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")
        state.update(epoch=epoch + 1, batch=0, loss_sum=0.0, loss_n=0)
        save_checkpoint()
        last_save = time.time()
    draft.eval()
    return draft, vocab_map, state["history"]
