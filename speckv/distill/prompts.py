"""Extra training prompts for `speckv distill`, built offline, never from evaluation prompts.

The benchmark sets have few train prompts (59 chat, 129 code, 74 math), and a draft distilled on
them overfits: it learns those prompts' continuations, not the target's style. These generators
add *distinct* prompts in the benchmark tasks' styles:

- `stdlib-code`: HumanEval-style prompts (signature + docstring, the body to write) from the
  top-level functions of the running Python's standard library, read with `ast` (nothing imported);
- `template-chat`: assistant requests (write, explain, plan, compare, role-play, …) from fixed
  templates × fixed subjects, in the benchmark's chat style;
- `summarization-rest`: the summarization train prompts the benchmark mix leaves out.

Every id starts with `extra/`, which `datasets.split_of` files under `train`.
"""

from __future__ import annotations

import ast
import hashlib
import random
import sysconfig
from pathlib import Path

from speckv.datasets import PromptItem, load_prompts
from speckv.errors import SpecKVError

EXTRA_SETS = ("stdlib-code", "template-chat", "summarization-rest")
# Standard-library folders whose code is tests, GUIs or vendored tools, not library functions.
SKIPPED_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages"}


def stdlib_code_prompts(limit: int) -> list[PromptItem]:
    """Up to `limit` public, documented top-level functions of the standard library as prompts."""
    root = Path(sysconfig.get_paths()["stdlib"])
    items = []
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if doc is None or not 40 <= len(doc) <= 700:
                continue
            header = ast.unparse(node).splitlines()[0]  # "def name(args) -> ret:"
            first, *rest = doc.splitlines()
            body = "".join(f"\n{('    ' + line).rstrip()}" for line in rest)
            text = f'{header}\n    """ {first}{body}\n    """\n'
            items.append(PromptItem(f"extra/code/{module}.{node.name}", "code", text))
    return _sample(items, limit)


CHAT_TEMPLATES = (
    "Write a short blog post about {subject}. Keep it under 200 words.",
    "Explain {subject} to a high-school student in simple terms.",
    "Give me five practical tips about {subject}.",
    "Draft a professional email to a colleague proposing a meeting about {subject}.",
    "What are the main advantages and disadvantages of {subject}? Answer in a short list.",
    "Write a persuasive paragraph arguing that {subject} deserves more attention.",
    "Imagine you are a tour guide. Describe {subject} to a group of visitors.",
    "Create an outline for a presentation on {subject}, with headings and key points.",
    "Compose a short poem about {subject}.",
    "Summarize the history of {subject} in a few sentences.",
    "Pretend you are a teacher. Write three quiz questions about {subject}, with answers.",
    "Write a short story (under 150 words) in which {subject} plays a central role.",
    "Compare {subject} with a common alternative and recommend one.",
    "What are common misconceptions about {subject}? Correct them briefly.",
    "Plan a one-week schedule for someone who wants to learn about {subject}.",
    "Describe {subject} as if you were writing an encyclopedia entry.",
    "Write a friendly social media post announcing an event about {subject}.",
    "Give a step-by-step guide for a beginner getting started with {subject}.",
    "Role-play as an expert on {subject} and answer: what should everyone know about it?",
    "Write a product description for a new gadget related to {subject}.",
)
CHAT_SUBJECTS = (
    "renewable energy", "remote work", "the water cycle", "healthy sleep habits", "electric cars",
    "urban gardening", "the Roman Empire", "machine learning", "personal budgeting", "volcanoes",
    "public libraries", "climate change", "learning a second language", "the stock market",
    "coffee", "space exploration", "recycling", "the human immune system", "chess", "jazz music",
    "online privacy", "marathon training", "photosynthesis", "the printing press", "honeybees",
    "time management", "3D printing", "the Great Barrier Reef", "meditation", "cryptocurrency",
    "ancient Egypt", "public transportation", "vaccines", "board games", "the French Revolution",
    "smartphones", "rainforests", "job interviews", "baking bread", "the solar system",
    "social media", "volunteering", "the Olympic Games", "artificial intelligence in medicine",
    "minimalism", "earthquakes", "classical music", "electric bicycles", "ocean pollution",
    "the Internet", "video games", "team sports", "quantum computing", "the Renaissance",
    "first aid", "wind turbines", "photography", "the Silk Road", "composting", "startups",
    "black holes", "a healthy breakfast", "traveling on a budget", "museums", "dinosaurs",
    "cybersecurity", "the Moon landing", "yoga", "antibiotics", "robots in factories",
    "the history of writing", "pet adoption", "self-driving cars", "mountain hiking",
    "democracy", "desert ecosystems", "podcasts", "nuclear power", "handwriting", "tea",
)  # fmt: skip


def template_chat_prompts(limit: int) -> list[PromptItem]:
    """Up to `limit` template × subject requests (deterministic sample of all combinations)."""
    items = [
        PromptItem(f"extra/chat/{t:02d}-{s:03d}", "chat", template.format(subject=subject))
        for t, template in enumerate(CHAT_TEMPLATES)
        for s, subject in enumerate(CHAT_SUBJECTS)
    ]
    return _sample(items, limit)


def summarization_rest(skip: int) -> list[PromptItem]:
    """Summarization train prompts after the first `skip` (which the benchmark mix already uses)."""
    items = load_prompts("summarization", split="train")[skip:]
    return [PromptItem(f"extra/{item.id}", item.task, item.text) for item in items]


def extra_set_names(spec: str) -> list[str]:
    """The set names of a comma-separated `spec`, each checked ("none" or "" for no extra set)."""
    names = [part.strip() for part in spec.split(",") if part.strip() and part.strip() != "none"]
    unknown = [name for name in names if name not in EXTRA_SETS]
    if unknown:
        raise SpecKVError(f"unknown extra prompt set {unknown[0]!r}; use {', '.join(EXTRA_SETS)}")
    return names


def extra_prompts(spec: str, limits: dict[str, int], summarization_used: int) -> list[PromptItem]:
    """The sets named in `spec` (comma-separated), each cut to `limits[name]` items."""
    items = []
    for name in extra_set_names(spec):
        if name == "stdlib-code":
            items += stdlib_code_prompts(limits.get(name, 10**9))
        elif name == "template-chat":
            items += template_chat_prompts(limits.get(name, 10**9))
        else:
            items += summarization_rest(summarization_used)[: limits.get(name, 10**9)]
    return items


def _sample(items: list[PromptItem], limit: int) -> list[PromptItem]:
    """A deterministic sample (seeded by the ids), kept in id order."""
    if len(items) <= limit:
        return items
    seed = int.from_bytes(hashlib.sha256("\n".join(i.id for i in items).encode()).digest()[:8], "big")
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]
