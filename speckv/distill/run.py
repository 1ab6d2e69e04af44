"""`speckv distill` as a whole: train a small draft for a target on the target's own outputs.

Three resumable stages under a work directory (default ~/.cache/speckv/distill/<target>-<key>):

1. generate (`speckv.distill.data`): the target's greedy and sampled continuations of the train
   prompts, with its top-k logits, and the held-out reference; one shard per batch.
2. train (`speckv.distill.training`): a k-layer draft built from target layers
   (`speckv.distill.draft_model`), checkpointed in `train-<key>/` (the key of the training
   settings but the epoch count), so an interrupted run continues where it stopped.
3. save (`speckv.distill.saving`): the draft directory `speckv.decoding.draft_files.load_draft`
   reads (see docs/draft.md), then re-loaded and measured (`speckv.distill.measure`): held-out
   agreement and decode cost, recorded in its manifest.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from speckv.distill.data import GenConfig, default_work_dir, generate_data
from speckv.distill.draft_model import parse_layers
from speckv.distill.measure import cost_ratio, loaded_agreement
from speckv.distill.saving import save_draft
from speckv.distill.training import TrainConfig, format_scores, train_draft


@dataclass
class DistillConfig:
    """One `speckv distill` run."""

    target: str  # model source, as `load_model` takes it
    out: Path  # the draft directory to write
    name: str | None = None  # the draft's name in its manifest (default <target name>-draft)
    work_dir: Path | None = None  # data shards and checkpoints (default: `default_work_dir`)
    gen: GenConfig = field(default_factory=GenConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    command: str | None = None  # the command line, recorded in the manifest


def run_distill(config: DistillConfig) -> int:
    """Generate (resumable), train (resumable), save, measure; 0 on success."""
    from speckv.decoding.draft_files import load_draft
    from speckv.decoding.models import load_model

    gen, cfg, out = config.gen, config.train, config.out
    target = load_model(config.target, "fp32", device="cpu")
    layers = parse_layers(cfg.layers, target.model.config.num_hidden_layers)  # fails before data generation
    work = config.work_dir or default_work_dir(target.name, gen)
    work.mkdir(parents=True, exist_ok=True)
    (work / "gen_config.json").write_text(json.dumps(asdict(gen), indent=2) + "\n")
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
    # The epoch count is not part of the key: rerunning with another epoch count continues the
    # same run (the cosine schedule is stretched or shortened from the current step on).
    settings = {key: value for key, value in asdict(cfg).items() if key != "epochs"}
    run_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    run_dir = work / f"train-{run_key}"
    run_dir.mkdir(parents=True, exist_ok=True)
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
        "name": config.name or f"{target.name}-draft",
        "target": target.name,
        "layers_from_target": layers,
        "draft_vocab": len(vocab_map) if vocab_map is not None else target.model.config.vocab_size,
        "data": {
            "prompts": f"{gen.prompts} (train split)",
            "continuations": len(train),
            "response_tokens": n_tokens,
            **{key: value for key, value in asdict(gen).items() if key != "prompts"},
        },
        "training": {**asdict(cfg), "history": history},
        "command": config.command,
    }
    save_draft(draft, vocab_map, target.tokenizer, out, manifest)
    # Measured on the draft as saved (bf16, restricted head), then recorded in its manifest.
    loaded = load_draft(str(out), target)
    result = loaded_agreement(loaded, heldout)
    prompt = heldout[0]["prompt"].tolist()
    target_cost, draft_cost, _ = cost_ratio(loaded, target, prompt)
    manifest["heldout_agreement"] = {key: round(value, 4) for key, value in result.items()}
    manifest["cost_ratio"] = round(draft_cost / target_cost, 4)
    manifest["time_s"] = {"data_run": round(gen_s), "train_run": round(train_s)}
    save_draft(draft, vocab_map, target.tokenizer, out, manifest)
    log(f"saved {out}: held-out agreement {format_scores(result)}")
    log(
        f"decode cost per token (batch 1, fp32): target {target_cost * 1000:.1f} ms, "
        f"draft {draft_cost * 1000:.1f} ms (ratio {draft_cost / target_cost:.3f})"
    )
    return 0
