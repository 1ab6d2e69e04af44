"""Training the feature head (`speckv.decoding.feature_head`) on the target's outputs and features.

One example per data record: the sequence prompt + response, the target's hidden states at every
position but the last (stored by `speckv.distill.data`), and its top-k logits at the response
positions. Row r of an example feeds token x_{r+1} with the fused features F_r and predicts
x_{r+2}. Unroll step k (training-time test) feeds x_{r+1+k} with the head's own output of step
k-1 and predicts x_{r+2+k}, attending to the true rows up to r and to its own earlier steps, as
when it drafts a (k+1)-th token. The loss is the distillation loss of the model draft
(`training.distill_loss`) at every unroll step, plus a small regression of the normalised output
onto the target's top feature (which is what the target's head reads).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from speckv.decoding.feature_head import FeatureHead, FeatureHeadConfig
from speckv.distill.draft_model import build_vocab_map, parse_layers, vocab_lookup
from speckv.distill.training import batches, distill_loss, format_scores
from speckv.util.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class FeatureTrainConfig:
    layers: str = "0,1"  # target layers that initialise the head's layers (their count = depth)
    vocab: int = 16384  # output vocabulary (most frequent target tokens); 0 = full
    epochs: int = 1
    batch_tokens: int = 1024  # response tokens per optimiser step (about)
    lr: float = 2e-3
    warmup: int = 50
    ce_weight: float = 0.5
    unroll: int = 3  # training-time-test steps (1 = teacher forcing only)
    feature_weight: float = 0.1  # weight of the feature regression
    bf16: bool = True  # matmuls in bf16 (autocast; weights and optimiser stay fp32)
    seed: int = 0


@dataclass
class FeatureExample:
    tokens: torch.Tensor  # (R,) x_{r+1} for rows r = 0..R-1 (R = prompt + response - 2)
    # F_0..F_R (bf16) as (prompt part, response part): shared with the data records, not copied
    features: tuple[torch.Tensor, torch.Tensor]
    targets: (
        torch.Tensor
    )  # (R + 1, k) head-vocabulary top-k of x_{r+2} (-1 absent); rows before the response: -1
    values: torch.Tensor  # (R + 1, k) target logits (zero before the response)
    start: int  # first row with a target (predicting response[0])
    count: int  # rows with a target (response tokens)
    task: str
    id: str

    @property
    def ids(self) -> torch.Tensor:  # what `training.batches` sorts by
        return self.tokens


def make_feature_examples(records: list[dict], lookup: torch.Tensor | None) -> list[FeatureExample]:
    examples = []
    for record in records:
        response = record["response"].long()
        prompt = record["prompt"].long()
        if len(response) < 2 or len(prompt) < 2:
            continue
        ids = torch.cat([prompt, response])
        features = (record["prompt_feats"], record["response_feats"])  # F_0..F_{N-2}
        rows = len(ids) - 2
        top = record["top_idx"].long()
        top = top if lookup is None else lookup[top]
        start = len(prompt) - 2  # row predicting response[0]
        targets = torch.full((rows + 1, top.shape[1]), -1, dtype=torch.long)
        values = torch.zeros((rows + 1, top.shape[1]))
        targets[start : start + len(response)] = top
        values[start : start + len(response)] = record["top_val"].float()
        examples.append(
            FeatureExample(
                ids[1 : rows + 1],
                features,
                targets,
                values,
                start,
                len(response),
                record["task"],
                record["id"],
            )
        )
    return examples


def _pad(tensors: list[torch.Tensor], width: int, fill) -> torch.Tensor:
    out = torch.full((len(tensors), width, *tensors[0].shape[1:]), fill, dtype=tensors[0].dtype)
    for row, tensor in enumerate(tensors):
        out[row, : min(width, len(tensor))] = tensor[:width]
    return out


def unrolled_outputs(head: FeatureHead, batch: list[FeatureExample], steps: int, top_feature: bool = True):
    """Per unroll step k: (outputs (B, T, h), targets, values, feature targets, row mask) for the
    rows from the batch's first response row on: earlier rows carry no loss, and step 0 runs them
    only for their keys. Row j of step k is row `first + j` (first: the batch's first response
    row), predicting target row `first + j + k`. Logits are left to the caller: the output head
    is the largest layer, so it runs only on the rows a loss or a score reads."""
    width = max(len(ex.tokens) for ex in batch)
    tokens = _pad([ex.tokens for ex in batch], width + steps, 0)
    features = torch.zeros((len(batch), width + steps, *batch[0].features[0].shape[1:]), dtype=torch.bfloat16)
    for row, ex in enumerate(batch):
        prompt, response = ex.features
        features[row, : len(prompt)] = prompt
        features[row, len(prompt) : len(prompt) + len(response)] = response
    targets = _pad([ex.targets for ex in batch], width + steps, -1)
    values = _pad([ex.values for ex in batch], width + steps, 0.0)
    lengths = torch.tensor([len(ex.tokens) for ex in batch])
    rows = torch.arange(width)
    positions = (rows + 1)[None].expand(len(batch), -1)
    states = head.fused(features[:, :width])
    out, kvs = head(tokens[:, :width], states, positions)
    low = min(ex.start for ex in batch)
    results = [(out[:, low:], low, width)]
    query_rows = rows[low:]
    # Step k at query row r: the true keys 0..r of step 0, its own key, and (as `extra`) its own
    # keys of the steps between.
    causal = rows[None, :] <= query_rows[:, None]
    mask = torch.cat([causal, torch.eye(len(query_rows), dtype=torch.bool)], 1)[None, None]
    extra: list[list] = [[] for _ in head.layers]
    previous = out[:, low:]
    for step in range(1, steps):
        step_out, step_kvs = head(
            tokens[:, low + step : width + step],
            previous,
            (query_rows + 1 + step)[None].expand(len(batch), -1),
            past=kvs,
            mask=mask,
            extra=extra if step > 1 else None,
        )
        for index, kv in enumerate(step_kvs):
            extra[index].append(kv)
        results.append((step_out, low + step, width + step))
        previous = step_out
    outputs = []
    for out, begin, end in results:
        valid = (rows[None, : end - begin] + begin) < lengths[:, None]  # r + k < R: x_{r+1+k} exists
        outputs.append(
            (
                out,
                targets[:, begin:end],
                values[:, begin:end],
                features[:, begin + 1 : end + 1, -1] if top_feature else None,
                valid,
            )
        )
    return outputs


def feature_loss(head: FeatureHead, batch: list[FeatureExample], cfg: FeatureTrainConfig) -> torch.Tensor:
    total = 0.0
    for out, targets, values, feats, valid in unrolled_outputs(head, batch, cfg.unroll):
        rows = valid & (targets >= 0).any(-1)
        if not rows.any():
            continue
        total = total + distill_loss(head.logits(out[rows]), targets[rows], values[rows], cfg.ce_weight)
        if cfg.feature_weight:
            has = valid & (feats.abs().sum(-1) > 0)
            predicted = head.norm(out[has].float())
            total = total + cfg.feature_weight * torch.nn.functional.smooth_l1_loss(
                predicted, feats[has].float()
            )
    return total


@torch.no_grad()
def head_agreement(head: FeatureHead, examples: list[FeatureExample], steps: int = 2, top: int = 4) -> dict:
    """Teacher-forced, per task: the share of response positions where the head's argmax is the
    target's (`gamma1`), the same for the second drafted token, fed the head's own state
    (`gamma2`), and where the target's argmax is among the head's `top` best (`top4`); a target
    token outside the head's vocabulary is a miss. "overall" is the mean over tasks."""
    was = head.training
    head.eval()
    hits: dict[str, Counter] = {}
    for example in examples:
        counter = hits.setdefault(example.task, Counter())
        for step, (out, targets, _values, _feats, valid) in enumerate(
            unrolled_outputs(head, [example], steps, top_feature=False)
        ):
            index = torch.arange(out.shape[1]) + example.start + step  # target row of each output row
            use = valid[0] & (index >= example.start + step) & (index < example.start + example.count)
            target = targets[0, use, 0]
            logits = head.logits(out[0, use])
            counter[f"gamma{step + 1}"] += int(((logits.argmax(-1) == target) & (target >= 0)).sum())
            counter[f"n{step + 1}"] += int(use.sum())
            if step == 0:
                best = logits.topk(top, -1).indices
                counter["top"] += int(((best == target[:, None]).any(-1) & (target >= 0)).sum())
    head.train(was)
    result: dict = {}
    for task, counter in sorted(hits.items()):
        result[task] = {
            "gamma1": counter["gamma1"] / max(1, counter["n1"]),
            f"top{top}": counter["top"] / max(1, counter["n1"]),
        }
        for step in range(2, steps + 1):
            result[task][f"gamma{step}"] = counter[f"gamma{step}"] / max(1, counter[f"n{step}"])
    keys = next(iter(result.values())).keys()
    result["overall"] = {key: sum(r[key] for r in result.values()) / len(result) for key in keys}
    return result


def build_head(
    target_model, features: list[int], init_layers: list[int], vocab_map: torch.Tensor | None
) -> FeatureHead:
    """A feature head for `target_model`: layers and final norm copied from the target, its
    embedding and output head (restricted to `vocab_map`) borrowed frozen, fp32."""
    config = target_model.config
    vocab = len(vocab_map) if vocab_map is not None else config.vocab_size
    cfg = FeatureHeadConfig.for_target(config, features, init_layers, vocab)
    embed = target_model.get_input_embeddings().weight.detach().float()
    out = target_model.get_output_embeddings().weight.detach().float()
    head = FeatureHead(cfg, embed, out if vocab_map is None else out[vocab_map])
    head.reset_inputs()
    for slot, index in enumerate(init_layers):
        head.layers[slot].load_state_dict(target_model.model.layers[index].state_dict())
    head.norm.load_state_dict(target_model.model.norm.state_dict())
    return head.float()


def train_feature_head(
    target_model,
    train_records: list[dict],
    references: dict[str, list[dict]],
    cfg: FeatureTrainConfig,
    features: list[int],
    run_dir: Path,
    eos_ids: list[int],
    progress: bool = True,
    checkpoint_s: float = 300.0,
    evals_per_epoch: int = 4,
    note: Callable[[str], None] = log.info,
    stop_after: int | None = None,
):
    """Train (or continue) a feature head; returns (head, vocab_map, history).

    `references` are named reference sets (held-out, unfamiliar) whose agreement is measured
    `evals_per_epoch` times an epoch (a learning curve against the response tokens seen). A
    checkpoint in `run_dir` (every `checkpoint_s` seconds and at each evaluation) is resumed
    exactly: batch order, schedule and optimiser state."""
    from speckv.distill.training import cosine_lr, save_atomic

    torch.manual_seed(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = target_model.config.vocab_size
    init_layers = parse_layers(cfg.layers, target_model.config.num_hidden_layers)
    vocab_map = build_vocab_map(train_records, cfg.vocab, vocab_size, eos_ids)
    lookup = vocab_lookup(vocab_map, vocab_size)
    head = build_head(target_model, features, init_layers, vocab_map)
    train = make_feature_examples(train_records, lookup)
    refs = {name: make_feature_examples(records, lookup) for name, records in references.items()}
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    plan_of = lambda epoch: batches(train, cfg.batch_tokens, cfg.seed + epoch, size=lambda e: e.count)  # noqa: E731
    steps_per_epoch = len(plan_of(0))
    total_steps = steps_per_epoch * cfg.epochs
    eval_at = {round(steps_per_epoch * (i + 1) / evals_per_epoch) for i in range(evals_per_epoch)}

    def evaluate(entry: dict) -> None:
        for name, examples in refs.items():
            entry[name] = head_agreement(head, examples)
        state["history"].append(entry)
        with (run_dir / "log.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")
        note(
            f"{entry['tokens']} tokens: "
            + "; ".join(f"{name} {format_scores(entry[name]['overall'])}" for name in refs)
        )

    state = {"epoch": 0, "batch": 0, "step": 0, "tokens": 0, "history": [], "loss_sum": 0.0, "loss_n": 0}
    checkpoint = run_dir / "checkpoint.pt"
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        note(f"resuming from {checkpoint}: epoch {state['epoch'] + 1}, batch {state['batch']}")
    else:
        note(
            f"{len(train)} examples, {sum(e.count for e in train)} response tokens, {steps_per_epoch} steps an epoch"
        )
        evaluate({"epoch": 0, "step": 0, "tokens": 0})

    def save_checkpoint():
        save_atomic(
            {"head": head.state_dict(), "optimizer": optimizer.state_dict(), "state": state}, checkpoint
        )

    last_save = time.time()
    head.train()
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        plan = plan_of(epoch)
        bar = progress_bar(
            total=len(plan), initial=state["batch"], desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
            show=progress,
        )  # fmt: skip
        for index in range(state["batch"], len(plan)):
            batch = [train[i] for i in plan[index]]
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(state["step"], cfg.lr, cfg.warmup, total_steps)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = feature_loss(head, batch, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            state.update(
                step=state["step"] + 1, batch=index + 1, tokens=state["tokens"] + sum(e.count for e in batch)
            )
            state["loss_sum"] += float(loss.detach())
            state["loss_n"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{state['loss_sum'] / state['loss_n']:.3f}")
            if index + 1 in eval_at:
                loss_avg = state["loss_sum"] / max(1, state["loss_n"])
                evaluate(
                    {
                        "epoch": epoch + (index + 1) / len(plan),
                        "step": state["step"],
                        "tokens": state["tokens"],
                        "loss": loss_avg,
                    }
                )
                state.update(loss_sum=0.0, loss_n=0)
                head.train()
                save_checkpoint()
                last_save = time.time()
            elif time.time() - last_save > checkpoint_s:
                save_checkpoint()
                last_save = time.time()
            if stop_after is not None and state["step"] >= stop_after:  # tests: an interruption
                save_checkpoint()
                bar.close()
                raise KeyboardInterrupt
        bar.close()
        state.update(epoch=epoch + 1, batch=0)
        save_checkpoint()
        last_save = time.time()
    head.eval()
    return head, vocab_map, state["history"]
