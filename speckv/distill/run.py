"""`speckv distill` as a whole: train a small draft for a target on the target's own outputs.

Three resumable stages under a work directory (default ~/.cache/speckv/distill/<target>-<key>):

1. generate (`speckv.distill.data`): the target's greedy and sampled continuations of the train
   prompts, with its top-k logits and hidden states, and two reference sets (held-out prompts of
   the benchmark tasks, and the unfamiliar prompts); one shard per batch.
2. train: a k-layer draft model (`speckv.distill.training`, the default) or a feature head
   (`speckv.distill.feature_training`), both initialised from target layers, checkpointed in
   `train-<key>/` (the key of the kind and training settings but the epoch count), so an
   interrupted run continues where it stopped.
3. save (`speckv.distill.saving`): the directory `speckv.decoding.draft_files` loads (see
   docs/draft.md), then re-loaded and measured (`speckv.distill.measure`): agreement on both
   reference sets and decode cost, recorded in its manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from speckv.distill.data import UNFAMILIAR, GenConfig, default_work_dir, feature_indices, generate_data
from speckv.distill.draft_model import parse_layers
from speckv.distill.feature_training import FeatureTrainConfig, train_feature_head
from speckv.distill.measure import cost_ratio, loaded_agreement, loaded_head_agreement
from speckv.distill.saving import save_draft, save_feature_head
from speckv.distill.training import TrainConfig, format_scores, train_draft
from speckv.errors import SpecKVError

log = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """One `speckv distill` run."""

    target: str  # model source, as `load_model` takes it
    out: Path  # the draft directory to write
    name: str | None = None  # the draft's name in its manifest (default <target name>-draft)
    work_dir: Path | None = None  # data shards and checkpoints (default: `default_work_dir`)
    gen: GenConfig = field(default_factory=GenConfig)
    train: TrainConfig | FeatureTrainConfig = field(default_factory=TrainConfig)
    command: str | None = None  # the command line, recorded in the manifest
    max_batches: int = 0  # > 0: train on the first batches of the data plan only (`generate_data`)
    exclude: str = ""  # train prompts whose id starts with this are left out (a held-out source)


def run_distill(config: DistillConfig) -> int:
    """Generate (resumable), train (resumable), save, measure; 0 on success."""
    from speckv.decoding.models import load_model

    gen, cfg, out = config.gen, config.train, config.out
    feature = isinstance(cfg, FeatureTrainConfig)
    target = load_model(config.target, gen.precision, device="cpu")
    layers = parse_layers(cfg.layers, target.model.config.num_hidden_layers)  # fails before data generation
    if feature and not gen.features:
        raise SpecKVError("a feature head needs the target's features in the data: drop --features none")
    features = feature_indices(gen.features, target.model.config.num_hidden_layers) if gen.features else []
    work = config.work_dir or default_work_dir(target.name, gen)
    work.mkdir(parents=True, exist_ok=True)
    (work / "gen_config.json").write_text(json.dumps(asdict(gen), indent=2) + "\n")
    log.info("distill work directory: %s", work)

    started = time.time()
    references = {split: generate_data(target, gen, work, split) for split in ("heldout", UNFAMILIAR)}
    train = generate_data(target, gen, work, "train", max_batches=config.max_batches)
    if config.exclude:
        train = [r for r in train if not r["id"].startswith(config.exclude)]
    gen_s = time.time() - started
    n_tokens = sum(len(r["response"]) for r in train)
    log.info(
        "data: %d target continuations of %d train prompts, %d response tokens; reference prompts: %s",
        len(train),
        len({r["id"] for r in train}),
        n_tokens,
        ", ".join(f"{split} {len(records)}" for split, records in references.items()),
    )
    # The epoch count is not part of the key: rerunning with another epoch count continues the
    # same run (the cosine schedule is stretched or shortened from the current step on).
    settings = {key: value for key, value in asdict(cfg).items() if key != "epochs"}
    settings.update(
        kind="feature" if feature else "model", batches=config.max_batches, exclude=config.exclude
    )
    run_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    run_dir = work / f"train-{run_key}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_config.json").write_text(json.dumps(settings | {"epochs": cfg.epochs}, indent=2) + "\n")

    def note(message: str) -> None:
        """A line for the user and for the run's log.txt."""
        log.info(message)
        with (run_dir / "log.txt").open("a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    started = time.time()
    if feature:
        draft, vocab_map, history = train_feature_head(
            target.model, train, references, cfg, features, run_dir, target.eos_token_ids, note=note
        )
    else:
        draft, vocab_map, history = train_draft(
            target.model, train, references["heldout"], cfg, run_dir, target.eos_token_ids, note=note
        )
    train_s = time.time() - started
    manifest = {
        "name": config.name or f"{target.name}-{'head' if feature else 'draft'}",
        "target": target.name,
        "layers_from_target": layers,
        "draft_vocab": len(vocab_map) if vocab_map is not None else target.model.config.vocab_size,
        "data": {
            "prompts": f"{gen.prompts} (train split)",
            "continuations": len(train),
            "batches": config.max_batches or "all",
            "excluded": config.exclude or None,
            "response_tokens": n_tokens,
            **{key: value for key, value in asdict(gen).items() if key != "prompts"},
        },
        "training": {**asdict(cfg), "history": history},
        "command": config.command,
    }

    def save() -> None:
        if feature:
            save_feature_head(draft, vocab_map, out, manifest)
        else:
            save_draft(draft, vocab_map, target.tokenizer, out, manifest)

    save()
    # Measured on the draft as saved (bf16, restricted head), then recorded in its manifest.
    loaded = _reload(out, target, feature)
    measure = loaded_head_agreement if feature else loaded_agreement
    for split, records in references.items():
        result = measure(loaded, records)
        manifest[f"{split}_agreement"] = _rounded(result)
        note(f"saved {out}: {split} agreement {format_scores(result['overall'] if feature else result)}")
    prompt = references["heldout"][0]["prompt"].tolist()
    target_cost, draft_cost, _ = cost_ratio(loaded, target, prompt)
    manifest["cost_ratio"] = round(draft_cost / target_cost, 4)
    manifest["time_s"] = {"data_run": round(gen_s), "train_run": round(train_s)}
    save()
    note(
        f"decode cost per token (batch 1, {target.precision}): target {target_cost * 1000:.1f} ms, "
        f"draft {draft_cost * 1000:.1f} ms (ratio {draft_cost / target_cost:.3f})"
    )
    return 0


def _reload(out: Path, target, feature: bool):
    from speckv.decoding.draft_files import load_draft, load_feature_drafter

    return load_feature_drafter(str(out), target) if feature else load_draft(str(out), target)


def _rounded(values):
    if isinstance(values, dict):
        return {key: _rounded(value) for key, value in values.items()}
    return round(values, 4)
