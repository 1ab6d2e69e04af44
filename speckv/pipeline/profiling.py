"""`speckv profile`: record replay data and live step records over prompts × compression levels.

A unit of work is one prompt at one compression level. For each unit the profile writes
- replay/<compression>/<prompt>.parquet: the replay trace of design §4 (see speckv.pipeline.replay):
  the target's greedy continuation (by the engine alone), the draft's teacher-forced predictions
  along it from one batched forward, and the draft's free-running continuation at each mismatch;
- steps/<compression>/<prompt>.parquet: live step records (design §6) of every controller of
  the sweep, each a full engine run with wall-clock timings.
Each file is written to a unique temporary name and renamed, and a unit counts as done only when
its files read back whole (the right prompt, every position, every controller of the sweep): a
rerun skips the units already on disk, records again those whose files are missing or damaged,
and never writes a record twice. Readers take exactly one file per (level, prompt) listed in
profile.json and name a damaged one in a one-line error. One profile process at a time may write
a directory (a lock file), so it can also remove the temporary files a killed run left.
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

from speckv.controllers import make_controller
from speckv.decoding.cache import CachedModel
from speckv.decoding.drafters import FeatureDrafter
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.models import LoadedModel, check_context
from speckv.decoding.signals import signal_tensor
from speckv.errors import SpecKVError
from speckv.pipeline.replay import TRACE_COLUMNS, Trace, trace_to_frame, traces_from_frame
from speckv.util.files import TMP_SUFFIX, atomic_write, atomic_write_text, read_json
from speckv.util.progress import progress_bar
from speckv.util.reporting import markdown_table

SETTINGS_FILE = "profile.json"
LOCK_FILE = ".profile.lock"
STEP_KEYS = ("prompt_id", "controller", "step", "compression")


@dataclass(frozen=True)
class ProfileSettings:
    """What a profile directory holds; a rerun must use the same settings to resume it."""

    target: str
    draft: str
    compressions: tuple[str, ...]
    max_new_tokens: int
    gamma_max: int
    sweep: tuple[str, ...]

    def __post_init__(self):
        for name in ("compressions", "sweep"):
            check_unique(getattr(self, name), name)
        if not self.compressions:
            raise SpecKVError("a profile needs at least one compression level")

    @property
    def pair(self) -> str:
        return f"{self.target}+{self.draft}"


@dataclass(frozen=True)
class ProfilePrompt:
    id: str
    task: str
    token_ids: tuple[int, ...]


def check_unique(values, what: str) -> None:
    """One line naming the first value listed twice: a repeated level or prompt would be read twice."""
    seen = set()
    for value in values:
        if value in seen:
            raise SpecKVError(f"{what} lists {value} twice; give each once")
        seen.add(value)


def unit_name(prompt_id: str) -> str:
    """A file name for a prompt id: readable, and unique thanks to a short hash of the id."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", prompt_id)[:60]
    return f"{readable}-{hashlib.sha256(prompt_id.encode()).hexdigest()[:8]}"


def write_settings(out_dir: Path, settings: ProfileSettings, prompts: list[ProfilePrompt]) -> None:
    """Create profile.json, or check that an existing one was made with the same settings."""
    path = out_dir / SETTINGS_FILE
    check_unique([p.id for p in prompts], "the prompts")
    document = {
        "settings": asdict(settings),
        "prompts": [{"id": p.id, "task": p.task, "token_ids": list(p.token_ids)} for p in prompts],
    }
    if path.exists():
        old_settings, old_prompts = read_settings(out_dir)
        changed = [
            k for k, v in asdict(settings).items() if k != "compressions" and getattr(old_settings, k) != v
        ]
        if changed:
            raise SpecKVError(
                f"{out_dir} was profiled with other settings ({', '.join(changed)}); use a new --out"
            )
        known = {p["id"]: p["token_ids"] for p in old_prompts}
        changed_prompts = [
            p["id"] for p in document["prompts"] if known.get(p["id"], p["token_ids"]) != p["token_ids"]
        ]
        if changed_prompts:
            raise SpecKVError(
                f"prompt {changed_prompts[0]} encodes differently from the profile's (--raw?); use a new --out"
            )
        document["prompts"] = old_prompts + [p for p in document["prompts"] if p["id"] not in known]
        compressions = list(dict.fromkeys([*old_settings.compressions, *settings.compressions]))
        document["settings"]["compressions"] = compressions
    atomic_write_text(path, json.dumps(document, indent=1))


def read_settings(profile_dir: str | Path) -> tuple[ProfileSettings, list[dict]]:
    """The settings and prompts of profile.json, checked: one line names what is wrong with it."""
    path = Path(profile_dir) / SETTINGS_FILE
    if not path.exists():
        raise SpecKVError(
            f"{profile_dir} is not a profile directory (no {SETTINGS_FILE}); run `speckv profile`"
        )
    document = read_json(path, "profile settings")
    try:
        settings = _settings_from(document)
        prompts = _prompts_from(document)
    except SpecKVError as error:
        raise SpecKVError(f"{path} is damaged: {error}; profile into a new --out") from None
    return settings, prompts


def _settings_from(document) -> ProfileSettings:
    fields = document.get("settings") if isinstance(document, dict) else None
    expected = set(ProfileSettings.__dataclass_fields__)
    if not isinstance(fields, dict) or set(fields) != expected:
        raise SpecKVError(f"'settings' must hold exactly {', '.join(sorted(expected))}")
    for name in ("target", "draft"):
        if not isinstance(fields[name], str):
            raise SpecKVError(f"{name} is not a string")
    for name in ("max_new_tokens", "gamma_max"):
        if not isinstance(fields[name], int) or isinstance(fields[name], bool) or fields[name] < 1:
            raise SpecKVError(f"{name} is not a positive integer")
    for name in ("compressions", "sweep"):
        values = fields[name]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise SpecKVError(f"{name} is not a list of strings")
    return ProfileSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _prompts_from(document: dict) -> list[dict]:
    prompts = document.get("prompts")
    if not isinstance(prompts, list):
        raise SpecKVError("'prompts' is not a list")
    for prompt in prompts:
        if not (
            isinstance(prompt, dict)
            and isinstance(prompt.get("id"), str)
            and isinstance(prompt.get("task"), str)
            and isinstance(prompt.get("token_ids"), list)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt["token_ids"])
        ):
            raise SpecKVError("a prompt is not {id, task, token_ids}")
    check_unique([p["id"] for p in prompts], "prompts")
    return prompts


def run_profile(
    out_dir: str | Path,
    settings: ProfileSettings,
    prompts: list[ProfilePrompt],
    load_pair: Callable[[str], tuple[LoadedModel, LoadedModel]],
    progress: bool = True,
) -> dict[str, int]:
    """Profile every (compression, prompt) unit not yet whole on disk; returns counts of done/skipped."""
    from filelock import FileLock, Timeout

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SpecKVError(
            f"another `speckv profile` is writing to {out_dir}; wait for it to finish or use another --out"
        ) from None
    try:
        _remove_orphans(out_dir)
        return _run_profile(out_dir, settings, prompts, load_pair, progress)
    finally:
        lock.release()


def _run_profile(out_dir, settings, prompts, load_pair, progress) -> dict[str, int]:
    write_settings(out_dir, settings, prompts)
    counts = {"recorded": 0, "skipped": 0}
    total = len(prompts) * len(settings.compressions)
    with progress_bar(total=total, desc="profile", show=progress) as bar:
        checked = False
        for compression in settings.compressions:
            needed = [(p, _missing_parts(out_dir, settings, compression, p)) for p in prompts]
            todo = [(p, parts) for p, parts in needed if any(parts)]
            counts["skipped"] += len(prompts) - len(todo)
            bar.update(len(prompts) - len(todo))
            if not todo:
                continue
            target, draft = load_pair(compression)
            if target.compression != compression:
                raise SpecKVError(f"asked for a {compression} target, got {target.compression}")
            if not checked:  # every prompt fits the models' context, before any decoding
                for prompt in prompts:
                    check_context(target, draft, len(prompt.token_ids), settings.max_new_tokens)
                checked = True
            for prompt, parts in todo:
                bar.set_postfix_str(f"{compression} {prompt.id}")
                record_unit(out_dir, settings, target, draft, prompt, parts)
                counts["recorded"] += 1
                bar.update()
    return counts


def _remove_orphans(out_dir: Path) -> None:
    """Temporary files of a killed run (only while holding the directory's lock)."""
    for folder in (out_dir, *out_dir.glob("replay/*"), *out_dir.glob("steps/*")):
        for orphan in folder.glob(f"*{TMP_SUFFIX}"):
            orphan.unlink(missing_ok=True)


def _paths(out_dir: Path, compression: str, prompt_id: str) -> tuple[Path, Path]:
    name = unit_name(prompt_id) + ".parquet"
    return out_dir / "replay" / compression / name, out_dir / "steps" / compression / name


def _missing_parts(
    out_dir: Path, settings: ProfileSettings, compression: str, prompt: ProfilePrompt
) -> tuple[bool, bool]:
    """(replay trace needed, step records needed): a part is done only when its file reads back whole."""
    replay_path, steps_path = _paths(out_dir, compression, prompt.id)
    replay_needed = _read_replay(replay_path, compression, prompt.id)[0] is None
    steps_needed = (
        bool(settings.sweep) and _read_steps(steps_path, compression, prompt.id, settings)[0] is None
    )
    return replay_needed, steps_needed


def _read_replay(path: Path, compression: str, prompt_id: str) -> tuple[pd.DataFrame | None, str]:
    """The replay rows of one unit, or None and why not (missing, unreadable, incomplete)."""
    frame, problem = _read_parquet(path)
    if frame is None:
        return None, problem
    missing = [c for c in TRACE_COLUMNS if c not in frame.columns]
    if missing:
        return None, f"it lacks columns {', '.join(missing)}"
    if frame.empty or set(frame["prompt_id"]) != {prompt_id} or set(frame["compression"]) != {compression}:
        return None, f"it does not hold the {compression} trace of prompt {prompt_id}"
    if sorted(frame["position"].tolist()) != list(range(len(frame))):
        return None, "some positions are missing or repeated"
    return frame, ""


def _read_steps(
    path: Path, compression: str, prompt_id: str, settings: ProfileSettings
) -> tuple[pd.DataFrame | None, str]:
    """The live step records of one unit, or None and why not."""
    frame, problem = _read_parquet(path)
    if frame is None:
        return None, problem
    if any(c not in frame.columns for c in STEP_KEYS):
        return None, f"it lacks some of the columns {', '.join(STEP_KEYS)}"
    if frame.empty or set(frame["prompt_id"]) != {prompt_id} or set(frame["compression"]) != {compression}:
        return None, f"it does not hold the {compression} step records of prompt {prompt_id}"
    if set(frame["controller"]) != set(settings.sweep) or frame.duplicated(["controller", "step"]).any():
        return None, "its controllers or steps differ from the sweep's"
    return frame, ""


def _read_parquet(path: Path) -> tuple[pd.DataFrame | None, str]:
    if not path.exists():
        return None, "it does not exist"
    try:
        return pd.read_parquet(path), ""
    except Exception as error:  # pyarrow raises several types for a damaged file
        text = str(error).strip()
        return None, text.splitlines()[0] if text else type(error).__name__


def record_unit(
    out_dir: Path,
    settings: ProfileSettings,
    target: LoadedModel,
    draft: LoadedModel,
    prompt: ProfilePrompt,
    parts: tuple[bool, bool] | None = None,
) -> None:
    """Write the replay trace and (with a sweep) the live step records of one prompt, each unless
    already whole on disk (`parts`: which are needed, when the caller has checked)."""
    replay_path, steps_path = _paths(out_dir, target.compression, prompt.id)
    replay_needed, steps_needed = parts or _missing_parts(out_dir, settings, target.compression, prompt)
    if replay_needed:
        trace = record_trace(
            target, draft, list(prompt.token_ids), settings.max_new_tokens, settings.gamma_max
        )
        trace.prompt_id, trace.task, trace.pair = prompt.id, prompt.task, settings.pair
        atomic_write(replay_path, lambda tmp: trace_to_frame(trace).to_parquet(tmp, index=False))
    if steps_needed:
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
    if isinstance(draft, FeatureDrafter):
        return _feature_trace(target, draft, prompt_ids, tokens, max_new_tokens, gamma_max, eos)
    n, p = len(tokens), len(prompt_ids)
    # One draft pass over prompt + y[:-1]: the logits at p - 1 + t predict y[t].
    model = CachedModel(draft)
    logits = model.feed(prompt_ids + tokens[:-1], keep=n).logits[0]
    draft_tokens, signals = _predictions(logits, draft.vocab_map)
    free = {}
    for m in reversed(range(n)):  # cropping only shortens the cache: visit mismatches last to first
        if draft_tokens[m] == tokens[m] or draft_tokens[m] in eos:
            continue
        model.crop(p + m)
        continuation = []
        feed = draft_tokens[m]
        for _ in range(gamma_max - 1):
            step_logits = model.feed([feed], keep=1).logits[0]
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
        prompt=list(prompt_ids),
    )


def _feature_trace(target, drafter, prompt_ids, tokens, max_new_tokens, gamma_max, eos) -> Trace:
    """A feature head's trace: the chain of a step starting at every position (`Trace.chains`),
    from the target's hidden states of one pass over prompt + tokens[:-1]."""
    model = CachedModel(target)
    hidden = model.feed(list(prompt_ids) + tokens[:-1], hidden_states=True).hidden_states
    features = torch.stack([hidden[i][0] for i in drafter.target_hidden_layers], 1)
    chains = drafter.chains_along(prompt_ids, tokens, features, gamma_max, set(eos))
    nan = (float("nan"),) * 3
    return Trace(
        prompt_id="",
        task="",
        compression=target.compression,
        prompt_len=len(prompt_ids),
        max_new_tokens=max_new_tokens,
        gamma_max=gamma_max,
        eos_ids=eos,
        tokens=tokens,
        draft_tokens=[chain[0].token if chain else -1 for chain in chains],
        signals=[(c[0].entropy, c[0].confidence, c[0].token_prob) if c else nan for c in chains],
        chains=[[(x.token, (x.entropy, x.confidence, x.token_prob)) for x in chain] for chain in chains],
        prompt=list(prompt_ids),
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
    levels = list(dict.fromkeys(compressions or settings.compressions))
    frame = _read_units(Path(profile_dir), settings, prompts, levels, replay=True)
    if frame.empty:
        raise SpecKVError(f"{profile_dir} has no replay data yet; run `speckv profile`")
    return traces_from_frame(frame)


def load_steps(profile_dir: str | Path) -> pd.DataFrame:
    """All live step records of a profile (empty when it ran no sweep)."""
    settings, prompts = read_settings(profile_dir)
    if not settings.sweep:
        return pd.DataFrame()
    return _read_units(Path(profile_dir), settings, prompts, settings.compressions, replay=False)


def _read_units(
    profile_dir: Path, settings: ProfileSettings, prompts: list[dict], levels, replay: bool
) -> pd.DataFrame:
    """One file per (level, prompt of profile.json) that exists; a damaged one is a one-line error."""
    frames = []
    for level in levels:
        for prompt in prompts:
            path = _paths(profile_dir, level, prompt["id"])[0 if replay else 1]
            if not path.exists():  # not profiled (yet)
                continue
            if replay:
                frame, problem = _read_replay(path, level, prompt["id"])
            else:
                frame, problem = _read_steps(path, level, prompt["id"], settings)
            if frame is None:
                raise SpecKVError(
                    f"{path} cannot be used ({problem}); rerun the same `speckv profile` command to record it again"
                )
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


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
