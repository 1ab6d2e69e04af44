"""`speckv distill`: train a draft for a target by distillation."""

from __future__ import annotations


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
        "--temperature", type=float, help="temperature of the sampled continuations (default 0.8)"
    )
    parser.add_argument("--layers", help="target layers that initialise the draft's layers (default 0,1)")
    parser.add_argument("--vocab", type=int, help="draft output vocabulary size, 0 = full (default 8192)")
    parser.add_argument("--epochs", type=int, help="training epochs (default 4)")
    parser.add_argument("--batch-tokens", type=int, help="response tokens per optimiser step")
    parser.add_argument("--lr", type=float, help="peak learning rate (cosine schedule)")
    parser.add_argument("--ce-weight", type=float, help="weight of the hard (argmax) term of the loss, 0..1")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from speckv.distill import run as distill

    return distill.run(args)
