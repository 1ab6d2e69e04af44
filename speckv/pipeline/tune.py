"""`speckv tune`: a new (target, draft) pair from nothing to a SpecKV controller, in one command.

profile → calibrate → train → compare, into one folder:
- `profile/`: replay traces of the fitting prompts at the chosen level (`speckv profile`, which
  resumes where it stopped: a rerun skips the prompts already recorded);
- the cost curve of this machine (`speckv.decoding.local_costs`, cached where `--costs auto`
  finds it, so the controller later plans with the curve it was trained with);
- `controller.json`: the SpecKV controller fitted on those traces (`speckv train`);
- `comparison.json` and `summary.md`: SpecKV against every fixed γ and the target alone, decoded
  live, side by side, on prompts the controller never saw (the `test` split).

Fitting prompts: the `dev` split for the demo's draft (distilled on `train`, it would look better
there than on new text), else `train`. `tune.json` holds the settings: a rerun with the same ones
resumes, one with others is refused (use another folder).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from speckv.controllers.speckv import ControllerModels
from speckv.datasets import load_prompts
from speckv.decoding.draft_files import draft_kind
from speckv.decoding.drafters import make_drafter
from speckv.decoding.local_costs import local_costs
from speckv.decoding.models import LoadedModel, encode_prompt, load_model, resolve_compression, resolve_device
from speckv.errors import SpecKVError
from speckv.pipeline.compare import Method, MethodResult, compare, speedup_table
from speckv.pipeline.profiling import ProfilePrompt, ProfileSettings, load_traces, run_profile
from speckv.pipeline.training import train_controller
from speckv.util.files import atomic_write_text, read_json

SETTINGS_FILE = "tune.json"
CONTROLLER_FILE = "controller.json"
COMPARISON_FILE = "comparison.json"
SUMMARY_FILE = "summary.md"
DEMO_DRAFTS = ("demo", "demo-model")  # distilled on the train split of the named prompt sets


@dataclass(frozen=True)
class TuneSettings:
    target: str
    draft: str
    compression: str  # resolved: fp32, bf16, …
    prompts: str  # a named set or a JSONL file
    fit_per_task: int
    test_per_task: int
    max_new_tokens: int
    gamma_max: int
    fixed: tuple[int, ...]  # the fixed γ rows SpecKV is compared with
    repeats: int

    @property
    def fit_split(self) -> str:
        return "dev" if self.draft in DEMO_DRAFTS else "train"


def tune(out: str | Path, settings: TuneSettings, device: str = "cpu", progress: bool = True) -> str:
    """Run (or resume) every stage into `out`; returns the one-screen summary (also in summary.md)."""
    out = Path(out)
    _check_settings(out, settings)
    if draft_kind(settings.draft) == "feature":
        raise SpecKVError("tune fits the controller to a draft model's signals; a feature head has its own")
    target = load_model(settings.target, settings.compression, device)
    fitting = _prompts(settings, target, settings.fit_split, settings.fit_per_task)
    testing = _prompts(settings, target, "test", settings.test_per_task)
    drafter = make_drafter(settings.draft, target)

    profile = out / "profile"
    profile_settings = ProfileSettings(
        settings.target,
        settings.draft,
        (settings.compression,),
        settings.max_new_tokens,
        settings.gamma_max,
        (),
    )
    run_profile(profile, profile_settings, fitting, lambda _level: (target, drafter.loaded), progress)

    widths = max(settings.gamma_max, max(settings.fixed))
    costs = local_costs("auto", target, drafter.loaded, widths, progress=progress)
    controller_path = out / CONTROLLER_FILE
    if not controller_path.exists():
        fitted = {p.id for p in fitting}
        traces = [t for t in load_traces(profile) if t.prompt_id in fitted]
        result = train_controller(
            traces,
            {settings.compression: costs.cost},
            compare_kinds=(),
            info={"pair": f"{settings.target} + {settings.draft}", "split": settings.fit_split},
        )
        result.models.save(controller_path)

    comparison_path = out / COMPARISON_FILE
    if not comparison_path.exists():
        methods = [
            Method("target only"),
            *(Method(f"fixed γ={g}", controller=f"fixed:{g}") for g in settings.fixed),
            Method("SpecKV (tuned)", controller=f"speckv:{controller_path}"),
        ]
        prompts = [list(p.token_ids) for p in testing]
        results = compare(
            target, drafter, prompts, methods, settings.max_new_tokens, settings.repeats, progress
        )
        rows = [_row(r) for r in results]
        table = speedup_table(results, baseline="target only")
        comparison = {
            "rows": rows,
            "table": table,
            "prompts": [p.id for p in testing],
            "cost_source": results[-1].cost_source,
            "threads": torch.get_num_threads(),  # the curve and the timings are for this count
        }
        atomic_write_text(comparison_path, json.dumps(comparison, indent=1))
    comparison = read_json(comparison_path)
    models = ControllerModels.load(controller_path)
    summary = summarise(settings, comparison, models, out)
    atomic_write_text(out / SUMMARY_FILE, summary + "\n")
    return summary


def _check_settings(out: Path, settings: TuneSettings) -> None:
    """Write the settings on the first run; a rerun must bring the same ones to resume."""
    path = out / SETTINGS_FILE
    wanted = asdict(settings) | {"fixed": list(settings.fixed)}
    if path.exists():
        found = read_json(path)
        if found != wanted:
            changed = sorted(key for key in wanted if found.get(key) != wanted[key])
            raise SpecKVError(
                f"{out} was tuned with other settings ({', '.join(changed)}); use another --out to start afresh"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(wanted, indent=1))


def _prompts(settings: TuneSettings, target: LoadedModel, split: str, per_task: int) -> list[ProfilePrompt]:
    items = load_prompts(settings.prompts, split=split, per_task=per_task)
    if not items:
        raise SpecKVError(
            f"{settings.prompts} has no prompts in the {split} split (prompts are split by a hash of "
            "their id; give more prompts)"
        )
    return [ProfilePrompt(i.id, i.task, tuple(encode_prompt(target.tokenizer, i.text))) for i in items]


def _row(result: MethodResult) -> dict:
    return {
        "method": result.method.name,
        "controller": result.method.controller,
        "tokens_per_s": result.tokens_per_s,
        "median_tokens_per_s": result.median_tokens_per_s,
        "mean_accepted": result.mean_accepted,
        "outputs": result.outputs,
    }


def summarise(settings: TuneSettings, comparison: dict, models, out: Path) -> str:
    """One screen: the pair, what was fitted, and SpecKV against the best fixed γ and the target."""
    from speckv.costs import device_description

    rows, threads = comparison["rows"], comparison["threads"]
    base = rows[0]["median_tokens_per_s"]
    fixed = [r for r in rows if r["controller"] and r["controller"].startswith("fixed:")]
    best = max(fixed, key=lambda r: r["median_tokens_per_s"])
    tuned = rows[-1]
    lossless = all(r["outputs"] == rows[0]["outputs"] for r in rows)
    lines = [
        f"# speckv tune: {settings.target} + {settings.draft} at {settings.compression}",
        "",
        f"Machine: {device_description()}, {threads} torch thread(s). Cost curve: {comparison['cost_source']}.",
        f"Fitted on {settings.fit_per_task} prompt(s) per task of the {settings.fit_split} split of "
        f"{settings.prompts}; compared on {settings.test_per_task} per task of the test split, "
        f"{settings.max_new_tokens} new tokens, median of {settings.repeats}.",
        "",
        "| method | tokens/s | speed-up | mean accepted / step |",
        "|---|---:|---:|---:|",
        *(
            f"| {r['method']} | {r['median_tokens_per_s']:.1f} | {r['median_tokens_per_s'] / base:.2f}× "
            f"| {r['mean_accepted']:.2f} |"
            for r in rows
        ),
        "",
        f"SpecKV {tuned['median_tokens_per_s'] / base:.2f}× the target alone; the best fixed γ "
        f"({best['method']}) {best['median_tokens_per_s'] / base:.2f}×: SpecKV / best fixed = "
        f"{tuned['median_tokens_per_s'] / best['median_tokens_per_s']:.2f}"
        f" (spread of SpecKV's runs: {_spread(tuned['tokens_per_s'])}).",
        f"Outputs {'equal the target-only output in every row' if lossless else 'differ from target-only in some rows (near-ties at reduced precision; `speckv check-lossless` checks them)'}.",
        "",
        f"Controller: {out / CONTROLLER_FILE} (levels {', '.join(models.compressions)}). Use it with",
        f"  speckv generate --target {settings.target} --draft {settings.draft} "
        f"--controller speckv:{out / CONTROLLER_FILE} --compression {settings.compression} "
        f"--threads {threads} --prompt …",
    ]
    return "\n".join(lines)


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return "one run"
    return f"{min(values):.1f}–{max(values):.1f} tokens/s, median {statistics.median(values):.1f}"


def resolve_settings(
    target: str,
    draft: str,
    compression: str,
    device: str,
    **rest,
) -> TuneSettings:
    """Settings with the compression level resolved (auto → this machine's default)."""
    return TuneSettings(target, draft, resolve_compression(compression, resolve_device(device)), **rest)
