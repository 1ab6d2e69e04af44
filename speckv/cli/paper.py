"""`speckv paper reproduce|audit`: the SpecKV paper's offline evaluation."""

from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("paper", help="reproduce or audit the SpecKV paper's offline results")
    actions = parser.add_subparsers(dest="paper_action", required=True, metavar="ACTION")
    for action, help_text in (
        ("reproduce", "run the paper's released evaluation protocol, flaws included"),
        ("audit", "evaluate the same data honestly: observed outcomes, leakage, prompt split, cost"),
    ):
        command = actions.add_parser(action, help=help_text)
        command.add_argument("--data", required=True, metavar="DIR", help="folder of the paper's CSVs")
        command.add_argument(
            "--out",
            default=f"paper-{action}",
            metavar="DIR",
            help=f"output folder (default ./paper-{action})",
        )
        command.add_argument("--seed", type=int, default=42, help="bootstrap seed (default 42)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from speckv import paper

    command = {"reproduce": paper.reproduce, "audit": paper.audit}[args.paper_action]
    print(command(args.data, args.out, args.seed).summary)
    return 0
