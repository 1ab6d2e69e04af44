"""`speckv distill`: train a draft for a target by distillation.

The options left unset are None here, so the defaults are those of the library's dataclasses
(`GenConfig`, `TrainConfig`) and are written down only there.
"""

from __future__ import annotations

import sys
from pathlib import Path

from speckv.errors import SpecKVError
from speckv.util.threads import set_threads


def register(sub) -> None:
    parser = sub.add_parser(
        "distill", help="train a small draft for a target by distillation on the target's own outputs"
    )
    parser.add_argument(
        "--target", default="demo", help="target model: demo, a directory or .gguf (default demo)"
    )
    parser.add_argument(
        "--out", required=True, help="directory to write the draft to (load it with --draft DIR)"
    )
    parser.add_argument("--name", help="the draft's name in its manifest (default <target>-draft)")
    parser.add_argument(
        "--work-dir", help="where data shards and checkpoints go (default ~/.cache/speckv/distill/...)"
    )
    parser.add_argument("--prompts", help="prompt set whose train split is used (default mixed)")
    parser.add_argument(
        "--extra",
        help="extra train prompt sets, comma-separated, or none "
        "(default all: stdlib-code,template-chat,summarization-rest)",
    )
    parser.add_argument(
        "--samples", help="continuations per prompt by task, e.g. code=8,chat=12 (sample 0 greedy)"
    )
    parser.add_argument("--new-tokens", type=int, help="tokens per target continuation (default 128)")
    parser.add_argument(
        "--max-batches",
        type=int,
        default=0,
        help="use only the first N generation batches of the data plan (a fixed sample of every task)",
    )
    parser.add_argument(
        "--temperature", type=float, help="temperature of the sampled continuations (default 0.8)"
    )
    parser.add_argument(
        "--kind",
        choices=("feature", "model"),
        default="model",
        help="model: a small draft model (default; the kind that ships, docs/draft.md); feature: a "
        "head drafting from the target's hidden states (docs/feature-head.md)",
    )
    parser.add_argument("--layers", help="target layers that initialise the draft's layers (default 0,1)")
    parser.add_argument(
        "--vocab", type=int, help="output vocabulary size, 0 = full (default: feature 16384, model 8192)"
    )
    parser.add_argument("--epochs", type=int, help="training epochs (default: feature 1, model 4)")
    parser.add_argument(
        "--unroll", type=int, help="feature head: unrolled drafting steps in training (default 3)"
    )
    parser.add_argument(
        "--exclude",
        help="leave out train prompts whose id starts with this, e.g. chat/ (a held-out source)",
    )
    parser.add_argument(
        "--features",
        help="target hidden states stored with the data: auto (low, middle, top; default), indices, or none",
    )
    parser.add_argument(
        "--compression", help="the target's precision while generating the data (default bf16)"
    )
    parser.add_argument("--batch-tokens", type=int, help="response tokens per optimiser step")
    parser.add_argument("--lr", type=float, help="peak learning rate (cosine schedule)")
    parser.add_argument("--ce-weight", type=float, help="weight of the hard (argmax) term of the loss, 0..1")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from speckv.distill.data import GenConfig
    from speckv.distill.feature_training import FeatureTrainConfig
    from speckv.distill.prompts import extra_set_names
    from speckv.distill.run import DistillConfig, run_distill
    from speckv.distill.training import TrainConfig

    set_threads(args.threads)
    gen = GenConfig(
        **_given(
            prompts=args.prompts,
            new_tokens=args.new_tokens,
            temperature=args.temperature,
            extra=args.extra,
            features="" if args.features == "none" else args.features,
            precision=args.compression,
        )
    )
    gen.samples.update(parse_samples(args.samples))
    # Checked here (a typo fails before the held-out data is generated) and spelled one way, since
    # the string is part of the data key.
    gen.extra = ",".join(extra_set_names(gen.extra))
    common = _given(
        layers=args.layers,
        vocab=args.vocab,
        epochs=args.epochs,
        batch_tokens=args.batch_tokens,
        lr=args.lr,
        ce_weight=args.ce_weight,
    )
    if args.kind == "feature":
        train = FeatureTrainConfig(**common, **_given(unroll=args.unroll))
        if train.unroll < 1:
            raise SpecKVError("--unroll must be at least 1")
    elif args.unroll is not None:
        raise SpecKVError("--unroll applies to --kind feature only")
    else:
        train = TrainConfig(**common)
    if not 0 <= train.ce_weight <= 1:
        raise SpecKVError(f"--ce-weight must lie in 0..1, got {train.ce_weight}")
    if train.epochs < 1 or train.batch_tokens < 1 or gen.new_tokens < 1:
        raise SpecKVError("--epochs, --batch-tokens and --new-tokens must be positive")
    config = DistillConfig(
        target=args.target,
        out=Path(args.out).expanduser(),
        name=args.name,
        work_dir=Path(args.work_dir).expanduser() if args.work_dir else None,
        gen=gen,
        train=train,
        command="speckv distill " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else None,
        max_batches=max(0, args.max_batches),
        exclude=args.exclude or "",
    )
    return run_distill(config)


def parse_samples(text: str | None) -> dict[str, int]:
    """'code=8,chat=12' -> {'code': 8, 'chat': 12}: the tasks whose sample count the user set."""
    samples = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        task, _, count = part.partition("=")
        try:
            samples[task.strip()] = int(count)
        except ValueError:
            raise SpecKVError(f"--samples takes task=count pairs, got '{part}'") from None
    return samples


def _given(**options) -> dict:
    """The options the user set (not None), so unset ones take the dataclass defaults."""
    return {name: value for name, value in options.items() if value is not None}
