"""Extra training prompts for `speckv distill`, built offline, never from evaluation prompts.

The benchmark sets have few train prompts (59 chat, 129 code, 74 math), and a draft distilled on
them overfits: it learns those prompts' continuations, not the target's style. These generators
add *distinct* prompts in the benchmark tasks' styles:

- `stdlib-code`: HumanEval-style prompts (signature + docstring, the body to write) from the
  top-level functions of the running Python's standard library, read with `ast` (nothing imported);
- `template-chat`: assistant requests (write, explain, plan, compare, role-play, …) from fixed
  templates × fixed subjects, in the benchmark's chat style;
- `template-math`: grade-school word problems (GSM8K style) from fixed templates with seeded
  names and numbers;
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

EXTRA_SETS = ("stdlib-code", "template-chat", "template-math", "summarization-rest")
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
    "How does {subject} work? Explain it step by step.",
    "Why is {subject} important today? Give three reasons.",
    "Write a short dialogue between two friends discussing {subject}.",
    "I am skeptical about {subject}. Convince me with evidence, in a friendly tone.",
    "List ten interesting facts about {subject}.",
    "Write a haiku sequence (three haikus) about {subject}.",
    "What questions should I ask an expert on {subject}? Suggest five and say why.",
    "Describe a typical day of a person whose job is related to {subject}.",
    "Write the opening paragraph of a news article about a surprising discovery in {subject}.",
    "Explain {subject} using an analogy a ten-year-old would understand.",
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


NAMES = ("Ava", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonah", "Kemi", "Liam",
         "Maya", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wen", "Yusuf")  # fmt: skip
# Each template takes a name and numbers a..d drawn from its ranges; the answer needs 2-4 steps.
MATH_TEMPLATES = (
    ("{n} buys {a} packs of pencils with {b} pencils in each pack. {n} gives {c} pencils to "
     "friends. How many pencils does {n} have left?", (3, 9), (6, 12), (2, 15), (1, 2)),
    ("A bakery sells muffins for ${a} each and cookies for ${b} each. {n} buys {c} muffins and {d} "
     "cookies. How much does {n} spend?", (2, 5), (1, 3), (2, 8), (3, 12)),
    ("{n} reads {a} pages on Monday and twice as many on Tuesday. On Wednesday {n} reads {b} pages "
     "fewer than on Tuesday. How many pages did {n} read in the three days?", (10, 40), (2, 9), (1, 2), (1, 2)),
    ("A train travels at {a} miles per hour for {b} hours, then at {c} miles per hour for {d} hours. "
     "How far does it travel in total?", (30, 80), (2, 5), (20, 60), (1, 4)),
    ("{n} has ${a}. {n} spends a quarter of it on a book and ${b} on lunch. How much money does "
     "{n} have left?", (40, 120), (5, 15), (1, 2), (1, 2)),
    ("There are {a} students in a class. {b} of them walk to school, {c} come by bus and the rest "
     "are driven by their parents. How many students are driven?", (28, 40), (5, 10), (6, 12), (1, 2)),
    ("A farmer has {a} chickens and {b} cows. How many legs do the animals have altogether?",
     (10, 60), (3, 20), (1, 2), (1, 2)),
    ("{n} saves ${a} every week. How many weeks does {n} need to save to buy a bike that costs "
     "${b}, if {n} already has ${c}?", (5, 20), (150, 400), (10, 50), (1, 2)),
    ("A rectangle is {a} cm long and {b} cm wide. What is its perimeter, and what is its area?",
     (5, 30), (3, 20), (1, 2), (1, 2)),
    ("{n} ran {a} km each day for {b} days and then {c} km on the last day. What was the average "
     "distance per day?", (3, 10), (4, 6), (5, 15), (1, 2)),
    ("A shop had {a} apples. It sold {b} in the morning and {c} in the afternoon, then received a "
     "delivery of {d} apples. How many apples does it have now?", (80, 200), (10, 40), (10, 40), (20, 60)),
    ("{n} is {a} years old. {n}'s brother is {b} years younger and {n}'s mother is three times as old "
     "as {n} is. What is the sum of their ages?", (9, 16), (2, 6), (1, 2), (1, 2)),
    ("A recipe needs {a} cups of flour for {b} cookies. How many cups of flour are needed for {c} "
     "cookies?", (2, 4), (12, 24), (36, 96), (1, 2)),
    ("{n} buys a jacket that costs ${a} with a {b}% discount. How much does {n} pay?",
     (40, 150), (10, 40), (1, 2), (1, 2)),
    ("A tank holds {a} liters of water. A pipe fills it at {b} liters per minute and a leak drains "
     "{c} liters per minute. How many minutes does it take to fill the empty tank?", (100, 400),
     (8, 15), (1, 5), (1, 2)),
    ("{n} scored {a}, {b} and {c} points in three games. How many points does {n} need in the "
     "fourth game to average {d} points per game?", (10, 25), (12, 28), (8, 22), (18, 26)),
    ("A box holds {a} red balls and {b} blue balls. {n} takes out {c} red balls and adds {d} blue "
     "balls. What fraction of the balls are red now?", (10, 30), (5, 20), (1, 9), (1, 9)),
    ("{n} works {a} hours a day, {b} days a week, and earns ${c} per hour. How much does {n} earn "
     "in {d} weeks?", (4, 9), (3, 6), (10, 25), (2, 5)),
    ("A garden has {a} rows of tomato plants with {b} plants in each row. Each plant gives {c} "
     "tomatoes. If {n} sells the tomatoes in bags of {d}, how many bags can {n} fill?", (3, 9),
     (4, 12), (5, 15), (4, 10)),
    ("{n} had {a} stickers. {n} gave half to a friend and then bought {b} more. Then {n} lost "
     "{c}. How many stickers does {n} have?", (20, 80), (5, 25), (1, 10), (1, 2)),
    ("A bus has {a} seats. On a trip, {b} people get on at the first stop, {c} get on and {d} get "
     "off at the second stop. How many seats are empty?", (40, 60), (10, 25), (5, 15), (2, 8)),
    ("{n} plants {a} trees every year. After {b} years, {c} trees have died. How many trees are "
     "still standing?", (10, 40), (3, 8), (5, 20), (1, 2)),
    ("A store sells notebooks in packs of {a} for ${b}. How much do {c} notebooks cost?",
     (3, 6), (4, 10), (12, 60), (1, 2)),
    ("{n} drives {a} miles to work and back every day, five days a week. The car uses one gallon "
     "for every {b} miles and gas costs ${c} per gallon. How much does {n} spend on gas each "
     "week?", (20, 60), (20, 35), (3, 5), (1, 2)),
)  # fmt: skip


def template_math_prompts(limit: int) -> list[PromptItem]:
    """`limit` word problems: templates in turn, names and numbers drawn with a fixed seed."""
    rng = random.Random(0)
    items = []
    for index in range(limit):
        text, *ranges = MATH_TEMPLATES[index % len(MATH_TEMPLATES)]
        a, b, c, d = (rng.randint(low, high) for low, high in ranges)
        name = NAMES[rng.randrange(len(NAMES))]
        items.append(PromptItem(f"extra/math/{index:05d}", "math", text.format(n=name, a=a, b=b, c=c, d=d)))
    return items


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
        elif name == "template-math":
            items += template_math_prompts(limits.get(name, 1200))
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
