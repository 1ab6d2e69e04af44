"""`speckv profile`: record replay data and live step records over prompts × compression levels.

A unit of work is one prompt at one compression level. For each unit the profile writes
- replay/<compression>/<prompt>.parquet: the replay trace of design §4 (see speckv.pipeline.replay):
  the target's greedy continuation (by the engine alone), the draft's teacher-forced predictions
  along it from one batched forward, and the draft's free-running continuation at each mismatch;
- steps/<compression>/<prompt>.parquet: live step records (design §6) of every controller of
  the sweep, each a full engine run with wall-clock timings.
Each file is written to a temporary name and renamed, so a file that exists is complete: a
rerun skips the units already on disk and never writes a record twice.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from transformers import DynamicCache

from speckv.controllers import make_controller
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.models import LoadedModel
from speckv.decoding.signals import signal_tensor
from speckv.errors import SpecKVError
from speckv.pipeline.replay import Trace, trace_to_frame, traces_from_frame
from speckv.util.files import atomic_write, atomic_write_text
from speckv.util.reporting import markdown_table

SETTINGS_FILE = "profile.json"


@dataclass(frozen=True)
class ProfileSettings:
    """What a profile directory holds; a rerun must use the same settings to resume it."""

    target: str
    draft: str
    compressions: tuple[str, ...]
    max_new_tokens: int
    gamma_max: int
    sweep: tuple[str, ...]

    @property
    def pair(self) -> str:
        return f"{self.target}+{self.draft}"


@dataclass(frozen=True)
class ProfilePrompt:
    id: str
    task: str
    token_ids: tuple[int, ...]


def unit_name(prompt_id: str) -> str:
    """A file name for a prompt id: readable, and unique thanks to a short hash of the id."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", prompt_id)[:60]
    return f"{readable}-{hashlib.sha256(prompt_id.encode()).hexdigest()[:8]}"


def write_settings(out_dir: Path, settings: ProfileSettings, prompts: list[ProfilePrompt]) -> None:
    """Create profile.json, or check that an existing one was made with the same settings."""
    path = out_dir / SETTINGS_FILE
    document = {
        "settings": asdict(settings),
        "prompts": [{"id": p.id, "task": p.task, "token_ids": list(p.token_ids)} for p in prompts],
    }
    if path.exists():
        old = json.loads(path.read_text())
        old_settings = {k: tuple(v) if isinstance(v, list) else v for k, v in old["settings"].items()}
        changed = [k for k, v in asdict(settings).items() if k != "compressions" and old_settings.get(k) != v]
        if changed:
            raise SpecKVError(
                f"{out_dir} was profiled with other settings ({', '.join(changed)}); use a new --out"
            )
        known = {p["id"]: p["token_ids"] for p in old["prompts"]}
        changed_prompts = [
            p["id"] for p in document["prompts"] if known.get(p["id"], p["token_ids"]) != p["token_ids"]
        ]
        if changed_prompts:
            raise SpecKVError(
                f"prompt {changed_prompts[0]} encodes differently from the profile's (--raw?); use a new --out"
            )
        document["prompts"] = old["prompts"] + [p for p in document["prompts"] if p["id"] not in known]
        compressions = list(dict.fromkeys([*old["settings"]["compressions"], *settings.compressions]))
        document["settings"]["compressions"] = compressions
    atomic_write_text(path, json.dumps(document, indent=1))


def read_settings(profile_dir: str | Path) -> tuple[ProfileSettings, list[dict]]:
    path = Path(profile_dir) / SETTINGS_FILE
    if not path.exists():
        raise SpecKVError(
            f"{profile_dir} is not a profile directory (no {SETTINGS_FILE}); run `speckv profile`"
        )
    document = json.loads(path.read_text())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in document["settings"].items()}
    return ProfileSettings(**fields), document["prompts"]


def run_profile(
    out_dir: str | Path,
    settings: ProfileSettings,
    prompts: list[ProfilePrompt],
    load_pair: Callable[[str], tuple[LoadedModel, LoadedModel]],
    progress: bool = True,
) -> dict[str, int]:
    """Profile every (compression, prompt) unit not yet on disk; returns counts of done/skipped."""
    out_dir = Path(out_dir)
    write_settings(out_dir, settings, prompts)
    counts = {"recorded": 0, "skipped": 0}
    bar = tqdm(total=len(prompts) * len(settings.compressions), desc="profile", disable=not progress)
    for compression in settings.compressions:
        todo = [p for p in prompts if not _unit_done(out_dir, settings, compression, p.id)]
        counts["skipped"] += len(prompts) - len(todo)
        bar.update(len(prompts) - len(todo))
        if not todo:
            continue
        target, draft = load_pair(compression)
        if target.compression != compression:
            raise SpecKVError(f"asked for a {compression} target, got {target.compression}")
        for prompt in todo:
            bar.set_postfix_str(f"{compression} {prompt.id}")
            record_unit(out_dir, settings, target, draft, prompt)
            counts["recorded"] += 1
            bar.update()
    bar.close()
    return counts


def _paths(out_dir: Path, compression: str, prompt_id: str) -> tuple[Path, Path]:
    name = unit_name(prompt_id) + ".parquet"
    return out_dir / "replay" / compression / name, out_dir / "steps" / compression / name


def _unit_done(out_dir: Path, settings: ProfileSettings, compression: str, prompt_id: str) -> bool:
    replay_path, steps_path = _paths(out_dir, compression, prompt_id)
    return replay_path.exists() and (steps_path.exists() or not settings.sweep)


def record_unit(
    out_dir: Path, settings: ProfileSettings, target: LoadedModel, draft: LoadedModel, prompt: ProfilePrompt
) -> None:
    """Write the replay trace and (with a sweep) the live step records of one prompt."""
    replay_path, steps_path = _paths(out_dir, target.compression, prompt.id)
    if not replay_path.exists():
        trace = record_trace(
            target, draft, list(prompt.token_ids), settings.max_new_tokens, settings.gamma_max
        )
        trace.prompt_id, trace.task, trace.pair = prompt.id, prompt.task, settings.pair
        atomic_write(replay_path, lambda tmp: trace_to_frame(trace).to_parquet(tmp, index=False))
    if settings.sweep and not steps_path.exists():
        frames = [live_steps(target, draft, prompt, spec, settings) for spec in settings.sweep]
        steps = pd.concat(frames, ignore_index=True)
        atomic_write(steps_path, lambda tmp: steps.to_parquet(tmp, index=False))


def record_trace(
    target: LoadedModel,
    draft: LoadedModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    gamma_max: int,
    eos_token_ids: tuple[int, ...] | None = None,
) -> Trace:
    """The replay data of one prompt (prompt id and task left blank for the caller)."""
    eos = tuple(sorted(target.eos_token_ids if eos_token_ids is None else eos_token_ids))
    decoder = SpeculativeDecoder(target, eos_token_ids=eos)
    tokens = decoder.generate(prompt_ids, max_new_tokens).token_ids
    n, p = len(tokens), len(prompt_ids)
    # One draft pass over prompt + y[:-1]: the logits at p - 1 + t predict y[t].
    cache = DynamicCache(config=draft.model.config)
    logits = SpeculativeDecoder._forward(draft, cache, prompt_ids + tokens[:-1], keep=n)
    draft_tokens, signals = _predictions(logits, draft.vocab_map)
    free = {}
    cached = p + n - 1
    for m in reversed(range(n)):  # cropping only shortens the cache: visit mismatches last to first
        if draft_tokens[m] == tokens[m] or draft_tokens[m] in eos:
            continue
        cache.crop((p + m) - cached)
        cached = p + m
        continuation = []
        feed = draft_tokens[m]
        for _ in range(gamma_max - 1):
            step_logits = SpeculativeDecoder._forward(draft, cache, [feed], keep=1)
            cached += 1
            (token,), (token_signals,) = _predictions(step_logits, draft.vocab_map)
            continuation.append((token, token_signals))
            if token in eos:
                break
            feed = token
        free[m] = continuation
    return Trace(
        prompt_id="",
        task="",
        compression=target.compression,
        prompt_len=p,
        max_new_tokens=max_new_tokens,
        gamma_max=gamma_max,
        eos_ids=eos,
        tokens=tokens,
        draft_tokens=draft_tokens,
        signals=signals,
        free=free,
    )


def _predictions(logits: torch.Tensor, vocab_map: torch.Tensor | None) -> tuple[list[int], list]:
    """Greedy draft tokens (target ids) and their signals, one per row of logits, as the engine computes them."""
    log_probs = torch.log_softmax(logits.float(), -1)
    indices = log_probs.argmax(-1)
    rows = torch.stack([signal_tensor(row, int(i)) for row, i in zip(log_probs, indices, strict=True)])
    tokens = indices if vocab_map is None else vocab_map[indices]
    return [int(t) for t in tokens.tolist()], [tuple(row) for row in rows.tolist()]


def live_steps(
    target: LoadedModel, draft: LoadedModel, prompt: ProfilePrompt, spec: str, settings: ProfileSettings
) -> pd.DataFrame:
    """Step records of one live engine run: the paper's schema, ids, timings, per-token signals."""
    controller = make_controller(spec, gamma_max=settings.gamma_max, compression=target.compression)
    decoder = SpeculativeDecoder(target, draft, controller)
    result = decoder.generate(list(prompt.token_ids), settings.max_new_tokens)
    frame = pd.DataFrame([step.to_dict() for step in result.steps])
    drafted = frame["gamma"].clip(lower=1)
    frame["acceptance_rate"] = np.where(frame["gamma"] > 0, frame["accepted"] / drafted, np.nan)
    for name, column, how in (
        ("mean_draft_entropy", "draft_entropy", np.mean),
        ("mean_draft_confidence", "draft_confidence", np.mean),
        ("max_draft_entropy", "draft_entropy", np.max),
        ("min_draft_confidence", "draft_confidence", np.min),
    ):
        frame[name] = [how(values) if len(values) else np.nan for values in frame[column]]
    ids = {
        "run": f"{settings.pair}/{target.compression}/{spec}/{prompt.id}",
        "pair": settings.pair,
        "compression": target.compression,
        "task": prompt.task,
        "prompt_id": prompt.id,
        "controller": spec,
        "prompt_len": len(prompt.token_ids),
        "new_tokens": len(result.token_ids),
        "total_time_s": result.total_time_s,
    }
    return frame.assign(**ids)


def load_traces(profile_dir: str | Path, compressions: list[str] | None = None) -> list[Trace]:
    """All replay traces of a profile, in profile.json's prompt order, compression by compression."""
    settings, prompts = read_settings(profile_dir)
    order = {p["id"]: i for i, p in enumerate(prompts)}
    frame = _read_parts(Path(profile_dir) / "replay", compressions or settings.compressions)
    if frame.empty:
        raise SpecKVError(f"{profile_dir} has no replay data yet; run `speckv profile`")
    traces = traces_from_frame(frame)
    rank = {c: i for i, c in enumerate(settings.compressions)}
    return sorted(traces, key=lambda tr: (rank.get(tr.compression, 99), order.get(tr.prompt_id, 1 << 30)))


def load_steps(profile_dir: str | Path) -> pd.DataFrame:
    """All live step records of a profile (empty when it ran no sweep)."""
    settings, _ = read_settings(profile_dir)
    return _read_parts(Path(profile_dir) / "steps", settings.compressions)


def _read_parts(root: Path, compressions) -> pd.DataFrame:
    files = [f for c in compressions for f in sorted((root / c).glob("*.parquet"))]
    if not files:
        return pd.DataFrame()
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def summary_table(steps: pd.DataFrame) -> pd.DataFrame:
    """Per task × compression × controller: acceptance, tokens per step and measured tokens/s."""
    runs = steps.groupby(["task", "compression", "controller", "prompt_id"], sort=False).agg(
        accepted=("accepted", "sum"),
        drafted=("gamma", "sum"),
        steps=("step", "size"),
        new_tokens=("new_tokens", "first"),
        time_s=("total_time_s", "first"),
    )
    table = runs.groupby(level=["task", "compression", "controller"], sort=False).sum()
    return pd.DataFrame(
        {
            "acceptance": table["accepted"] / table["drafted"].clip(lower=1),
            "tokens_per_step": table["new_tokens"] / table["steps"],
            "tokens_per_s": table["new_tokens"] / table["time_s"],
            "prompts": runs.groupby(level=["task", "compression", "controller"], sort=False).size(),
        }
    ).reset_index()


def summary_markdown(steps: pd.DataFrame) -> str:
    return markdown_table(summary_table(steps), digits=3)
