"""The benchmark suite: one run header for every RESULTS.md section, every generated section has a
script that writes it, and the optional llama.cpp reference without llama-cpp-python installed."""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from speckv.records import StepRecord
from speckv.util.benchmark_header import (
    CPU_FLAGS,
    HAND_WRITTEN,
    REPO,
    RESULTS,
    default_command,
    format_header,
    parse_cpuinfo,
    run_info,
    with_header,
    write_section,
)

BENCHMARKS = REPO / "benchmarks"
MARKER = re.compile(r"^<!-- (\S+):start -->$", re.MULTILINE)

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R)   Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx2 amx_bf16 avx512f avx512_bf16 amx_tile
processor\t: 1
model name\t: something else
"""

INFO = {
    "cpu": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
    "flags": ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"],
    "gpu": None,
    "threads": 2,
    "torch": "2.13.0+cpu",
    "level": "bf16",
    "date": "2026-01-02",
    "command": "python benchmarks/engine_speed.py --compression bf16",
}


def test_parse_cpuinfo_takes_the_first_model_and_the_isa_flags_in_a_fixed_order():
    model, flags = parse_cpuinfo(CPUINFO)
    assert model == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert flags == ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]
    assert parse_cpuinfo("processor : 0\n") == (None, [])


def test_header_is_one_line_with_every_field():
    assert format_header(INFO) == (
        "> Run 2026-01-02 (UTC) · CPU Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz "
        "(avx2 avx512f avx512_bf16 amx_tile amx_bf16) · GPU none · threads 2 · torch 2.13.0+cpu · "
        "level bf16 · `python benchmarks/engine_speed.py --compression bf16`"
    )
    bare = format_header(INFO | {"flags": [], "gpu": "NVIDIA H100", "level": None})
    assert "(none of " + "/".join(CPU_FLAGS) + ")" in bare
    assert "· GPU NVIDIA H100 ·" in bare and "· level n/a ·" in bare
    assert "\n" not in bare


def test_header_goes_under_the_title():
    assert with_header("### Title\n\nText.\n", "> H") == "### Title\n\n> H\n\nText.\n"
    assert with_header("### Title", "> H") == "### Title\n\n> H\n"
    assert with_header("No title.\n", "> H") == "> H\n\nNo title.\n"


def test_default_command_is_the_script_relative_to_the_repository():
    script = str(BENCHMARKS / "engine_speed.py")
    assert default_command([script, "--gammas", "2,3", "--note", "a b"]) == (
        "python benchmarks/engine_speed.py --gammas 2,3 --note 'a b'"
    )
    assert default_command(["/elsewhere/x.py"]) == "python /elsewhere/x.py"


def test_run_info_on_this_machine():
    info = run_info(level="fp32", threads=3, command="python x.py")
    assert set(info) == set(INFO)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", info["date"])
    assert info["cpu"] and set(info["flags"]) <= set(CPU_FLAGS)
    assert (info["threads"], info["level"], info["command"]) == (3, "fp32", "python x.py")
    assert run_info()["command"].startswith("python ")


def test_write_section_adds_the_header_and_keeps_hand_written_sections_last(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(
        f"# Benchmark results\n\n<!-- a:start -->\nold\n<!-- a:end -->\n\n{HAND_WRITTEN}\n\n## Hand\n\nkept\n"
    )
    text = write_section("b", "### B\n\nnew b\n", level="int8", command="python b.py", path=path)
    assert text.startswith("### B\n\n> Run ") and "level int8" in text and "`python b.py`" in text
    write_section("a", "### A\n\nnew a\n", threads=1, command="python a.py", path=path)
    result = path.read_text()
    assert "old" not in result and result.count("> Run ") == 2
    assert result.index("new a") < result.index("new b") < result.index(HAND_WRITTEN)
    assert result.rstrip().endswith("kept")
    before = path.read_text()
    assert "> Run " in write_section("c", "### C", command="x", path=path, write=False)
    assert path.read_text() == before


def writers(sources: dict[str, str]) -> tuple[set[str], set[str]]:
    """Section names a script can write: its string literals, and the prefixes of its f-strings."""
    literals, prefixes = set(), set()
    for text in sources.values():
        literals |= set(re.findall(r'(?<!f)"([\w.+-]+)"', text))
        prefixes |= {p for p in re.findall(r'f"([\w.+-]+)\{', text) if len(p) >= 5}
    return literals, prefixes


def orphans(results: str, sources: dict[str, str]) -> list[str]:
    """Generated sections (before the hand-written part) that no script writes."""
    generated = results.split(HAND_WRITTEN)[0]
    literals, prefixes = writers(sources)
    return [
        name
        for name in MARKER.findall(generated)
        if name not in literals and not any(name.startswith(p) for p in prefixes)
    ]


def test_orphan_check_finds_a_section_no_script_writes():
    results = (
        "<!-- kept:start -->\nx\n<!-- kept:end -->\n<!-- speed-fp32:start -->\ny\n<!-- speed-fp32:end -->\n"
        "<!-- lost:start -->\nz\n<!-- lost:end -->\n"
        f"{HAND_WRITTEN}\n<!-- by-hand:start -->\nw\n<!-- by-hand:end -->\n"
    )
    sources = {"a.py": 'write_section("kept", body)', "b.py": 'name = f"speed-{p}"\nf"lost{x}"'}
    assert orphans(results, sources) == ["lost"]


def test_every_generated_section_of_results_is_written_by_a_script():
    sources = {path.name: path.read_text() for path in BENCHMARKS.glob("*.py")}
    text = RESULTS.read_text()
    assert text.count(HAND_WRITTEN) == 1
    assert MARKER.findall(text.split(HAND_WRITTEN)[0])  # the check sees the sections
    assert orphans(text, sources) == []


def test_scripts_write_through_the_shared_header():
    """No hand-made machine line, and no section written around the header."""
    for path in BENCHMARKS.glob("*.py"):
        source = path.read_text()
        assert "platform." not in source, path.name
        assert "write_results_section" not in source, path.name


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv", [[], ["--no-write"]])
def test_llama_cpp_reference_without_llama_cpp_says_how_to_install(monkeypatch, capsys, argv):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    reference = load_script("llama_cpp_reference")
    before = RESULTS.read_text()
    assert reference.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "pip install llama-cpp-python" in out[0] and "6.5 min" in out[0]
    assert RESULTS.read_text() == before


def test_llama_cpp_reference_section_is_written_by_name():
    assert load_script("llama_cpp_reference").SECTION == "llama_cpp_reference"


def test_hand_written_sections_have_no_generated_markers():
    assert MARKER.findall(RESULTS.read_text().split(HAND_WRITTEN)[1]) == []


def test_serve_report_reads_the_server_options():
    serve_report = load_script("serve_report")
    extra = ["--compression", "bf16", "--threads=2"]
    assert serve_report.server_option(extra, "--compression") == "bf16"
    assert serve_report.server_option(extra, "--threads") == "2"
    assert serve_report.server_option(extra, "--draft") is None


def test_results_path_is_the_benchmarks_file():
    assert Path(RESULTS) == BENCHMARKS / "RESULTS.md" and RESULTS.exists()


class FakeLlama:
    """llama-cpp-python's surface the reference uses: reset and greedy create_completion."""

    def __init__(self):
        self.calls = []

    def reset(self):
        self.calls.append("reset")

    def create_completion(self, prompt, max_tokens, temperature, repeat_penalty=1.0):
        assert temperature == 0.0 and repeat_penalty == 1.0
        self.calls.append(len(prompt))
        return {"usage": {"completion_tokens": max_tokens}, "choices": [{"text": f"{prompt[0]}"}]}


def test_llama_cpp_reference_passes_and_table():
    reference = load_script("llama_cpp_reference")
    llm = FakeLlama()
    speeds, texts = reference.passes(llm, [[1] * 20, [2, 3]], max_new_tokens=5, repeats=2)
    assert len(speeds) == 2 and all(s > 0 for s in speeds) and texts == ["1", "2"]
    assert llm.calls[:4] == ["reset", 16, "reset", 20]  # warm-up on a cut prompt, then a reset per call
    lines = reference.table([("base", [10.0, 12.0], ["a"]), ("lookup", [22.0], ["b"])]).splitlines()
    assert lines[2] == "| base | 11.0 | 10.0, 12.0 | 1.00× | yes |"
    assert lines[3] == "| lookup | 22.0 | 22.0 | 2.00× | NO |"


# -- serve_load's sweep and serve_report: the pure parts (the sweep itself needs servers: run by hand)


@functools.cache
def serve_load_script():
    return load_script("serve_load")


@functools.cache
def serve_report_script():
    return load_script("serve_report")


def served(index: int, tokens: int, seconds: float, ttft: float = 0.1, ok: bool = True):
    """A finished request of serve_load, sent at 0, first token at `ttft`, done at `seconds`."""
    return serve_report_script().Outcome(
        ok, index, 0.0, seconds, tokens, 20, ttft, seconds, "" if ok else "HTTP 500"
    )


def test_serve_report_percentiles_and_milliseconds():
    serve_report = serve_report_script()
    assert serve_report.p50_p95([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, 3.85))
    assert serve_report.p50_p95([]) is None
    assert serve_report.ms((0.0125, 0.2)) == ("12", "200")
    assert serve_report.ms(None) == ("–", "–")


def test_serve_report_outcome_times():
    outcome = serve_report_script().Outcome(True, 3, 10.0, 12.0, 5, 40, 10.5, 11.5)
    assert outcome.ttft_s == 0.5 and outcome.tpot_s == 0.25 and outcome.latency_s == 2.0
    one_token = serve_report_script().Outcome(True, 0, 0.0, 1.0, 1, 4, 0.5, 0.5)
    assert one_token.tpot_s is None


def test_serve_load_parses_configs():
    serve_load = serve_load_script()
    configs = serve_load.parse_configs("target, fixed3,speckv,table,wide=--controller tree:8 --gamma-max 6")
    assert configs == {
        "target": ["--no-draft"],
        "fixed3": ["--controller", "fixed:3"],
        "speckv": ["--controller", "speckv"],
        "table": ["--controller", "batch-table"],
        "wide": ["--controller", "tree:8", "--gamma-max", "6"],
    }
    is_fixed = serve_report_script().is_fixed
    assert [is_fixed(a) for a in configs.values()] == [False, True, False, False, False]
    assert is_fixed(["--gamma", "2"]) and is_fixed(["--controller=fixed:5"])
    with pytest.raises(ValueError, match="unknown config 'fixed'"):
        serve_load.parse_configs("target,fixed")
    with pytest.raises(ValueError, match="named twice"):
        serve_load.parse_configs("fixed2,fixed2=--gamma 2")
    with pytest.raises(ValueError, match="empty name"):
        serve_load.parse_configs("target,,speckv")


def test_serve_load_client_counts():
    serve_load = serve_load_script()
    assert serve_load.client_counts("1,2,4,8") == [1, 2, 4, 8]
    for bad in ("1,x", "0,2", "2,2", ""):
        with pytest.raises(serve_load.argparse.ArgumentTypeError):
            serve_load.client_counts(bad)


def test_serve_load_interleaves_tasks():
    from speckv.datasets import PromptItem

    items = [
        PromptItem(f"{t}/{i}", t, f"{t}{i}")
        for t, n in (("code", 3), ("math", 1), ("chat", 2))
        for i in range(n)
    ]
    order = [item.text for item in serve_load_script().interleave(items)]
    assert order == ["code0", "math0", "chat0", "code1", "chat1", "code2"]


def test_serve_load_reads_rss_from_proc_status():
    serve_load = serve_load_script()
    status = "Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t   4096 kB\nVmRSS:\t    2048 kB\nThreads:\t3\n"
    assert serve_load.status_kib(status, "VmRSS") == 2048
    assert serve_load.status_kib(status, "VmHWM") == 4096
    with pytest.raises(ValueError, match="no VmSwap line"):
        serve_load.status_kib(status, "VmSwap")
    with pytest.raises(ValueError, match="not kB"):
        serve_load.status_kib("VmRSS:\t2 MB\n", "VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_serve_load_samples_the_peak_rss_of_a_process():
    import os
    import time

    serve_load = serve_load_script()
    pid = os.getpid()
    with serve_load.RssSampler(pid, interval=0.01) as sampler:
        start = sampler.peak
        block = b"\x01" * (64 << 20)  # 64 MiB, every page written
        time.sleep(0.2)
        del block
    assert sampler.peak >= start + 50
    assert serve_load.rss_mib(pid, "VmHWM") >= serve_load.rss_mib(pid)  # the kernel's peak


def test_serve_report_margin_ci_is_paired_over_requests():
    serve_report = serve_report_script()
    tokens = np.full((40, 2), 32.0)
    times = np.random.default_rng(1).uniform(1, 20, size=40)  # requests of very different lengths
    # The subject takes 0.8 of the other's time on every request: every resample says +25%,
    # which only a paired resampling gives.
    point, low, high = serve_report.rate_ratio_ci(tokens, np.column_stack([0.8 * times, times]))
    assert (point, low, high) == pytest.approx((0.25, 0.25, 0.25))
    assert serve_report.rate_ratio_ci(tokens, np.column_stack([times, times])) == pytest.approx((0, 0, 0))


def test_serve_report_margin_ci_covers_the_estimate_and_narrows_with_requests():
    serve_report = serve_report_script()
    rng = np.random.default_rng(2)

    def sample(n):
        times = rng.uniform(1, 3, size=(n, 1)) * rng.uniform(0.7, 1.3, size=(n, 2))
        return np.full((n, 2), 16.0), times

    point, low, high = serve_report.rate_ratio_ci(*sample(10))
    assert low < point < high
    wide = high - low
    tokens, times = sample(400)
    point, low, high = serve_report.rate_ratio_ci(tokens, times)
    assert low < point < high and high - low < wide / 3
    assert serve_report.rate_ratio_ci(tokens, times) == (point, low, high)  # seeded: same again


def test_serve_report_pairs_requests_both_configs_finished():
    serve_report = serve_report_script()
    ours = [served(0, 10, 1.0), served(1, 10, 2.0), served(2, 10, 1.0, ok=False), served(3, 0, 1.0)]
    theirs = [served(3, 10, 1.0), served(1, 12, 4.0), served(0, 10, 2.0), served(2, 10, 1.0)]
    tokens, times = serve_report.paired(ours, theirs)
    assert tokens.tolist() == [[10, 10], [10, 12]] and times.tolist() == [[1, 2], [2, 4]]
    assert serve_report.paired([], theirs)[0].shape == (0, 2)


def sweep_runs(serve_report):
    """target fastest, then fixed3, fixed2, speckv; speckv 1.25x faster per request than target at 1 client."""

    def cell(config, clients, seconds, wall_s, ttft=0.1):
        outcomes = [served(i, 16, seconds, ttft) for i in range(4)]
        spec = {"drafts": 10.0, "draft_tokens": 40.0, "accepted": 30.0}
        return serve_report.Cell(config, clients, outcomes, wall_s, spec, (800.0, 850.4, 820.0))

    runs = []
    for name, options, seconds, wall_s in (
        ("target", ["--no-draft"], 1.0, 4.0),
        ("fixed2", ["--controller", "fixed:2"], 1.0, 8.0),
        ("fixed3", ["--controller", "fixed:3"], 1.0, 6.0),
        ("speckv", ["--controller", "speckv"], 0.8, 5.0),
    ):
        run = serve_report.ConfigRun(name, options, rss_idle=790.0, rss_end=830.0, rss_hwm=900.0)
        run.cells = [cell(name, 1, seconds, wall_s), cell(name, 4, seconds, wall_s, ttft=0.25)]
        run.cells[0].spec = {"drafts": 0.0, "draft_tokens": 0.0, "accepted": 0.0}
        runs.append(run)
    runs.append(serve_report.ConfigRun("table", ["--controller", "batch-table"], failure="exited: no such"))
    return runs


def test_serve_report_best_fixed_gamma_is_the_fastest_fixed_config():
    serve_report = serve_report_script()
    runs = sweep_runs(serve_report)
    assert serve_report.best_fixed(runs, 1).config == "fixed3"  # not target, faster but not fixed
    assert serve_report.best_fixed(runs, 2) is None
    runs[2].cells[0].outcomes = [served(0, 16, 1.0, ok=False)]  # fixed3 finished nothing
    assert serve_report.best_fixed(runs, 1).config == "fixed2"


def test_serve_report_sweep_report_tables(tmp_path):
    from types import SimpleNamespace

    serve_report = serve_report_script()
    runs = sweep_runs(serve_report)
    long = serve_report.Outcome(True, 0, 0.0, 40.0, 16, 4048, 30.0, 40.0)
    runs[0].probe = serve_report.Probe(long, serve_report.Outcome(True, 1, 0.5, 31.0, 16, 30, 30.5, 31.0))
    runs[1].probe = serve_report.Probe(long, serve_report.Outcome(True, 1, 0.5, 2.0, 16, 30, 1.5, 2.0))
    runs[2].probe = serve_report.Probe(long, serve_report.Outcome(True, 1, 35.0, 36.0, 16, 30, 35.5, 36.0))
    runs[0].cell(4).outcomes = [served(i, 16, 1.0, ttft=0.3) for i in range(4)]
    args = SimpleNamespace(
        clients=[1, 4], max_tokens=16, ignore_eos=False, requests=4, duration=300.0, long_prompt_probe=True
    )
    text = serve_report.sweep_report(runs, args, ["--threads", "1"], "figures/serve_sweep.png")
    lines = text.splitlines()
    assert "| 1 | target | 4 | 0 | 16.0 | 100 | 100 | 60 | 60 | – | 800 / 850 / 820 |" in lines
    assert "| 1 | fixed3 (best fixed γ) | 4 | 0 | 10.7 | 100 | 100 | 60 | 60 | – | 800 / 850 / 820 |" in lines
    assert (
        "| 4 | fixed3 (best fixed γ) | 4 | 0 | 10.7 | 250 | 250 | 50 | 50 | 75.0% | 800 / 850 / 820 |"
        in lines
    )
    # speckv (12.8 tokens/s) against target (16.0), per request 1.25x faster on the same prompts.
    assert "| 1 | 12.8 | target | 16.0 | +25.0% [+25.0%, +25.0%] | 4 | yes (CI above 0) |" in lines
    assert "| target | 790 | 830 | 900 | 3.00× (NO) | 4048 | 30.00 | 30.00 (NO) |" in lines
    assert "| fixed2 | 790 | 830 | 900 | 2.50× (NO) | 4048 | 30.00 | 1.00 (yes) |" in lines
    assert (
        "| fixed3 | 790 | 830 | 900 | 2.50× (NO) | 4048 | 30.00 | – (read before the short request came) |"
        in lines
    )
    assert "- `table`: exited: no such" in lines and "- `table`: `--controller batch-table`" in lines
    assert "| table |" not in text  # it never ran
    assert lines[-1] == "![tokens/s and TPOT p50 against concurrency](figures/serve_sweep.png)"
    assert "`speckv serve --demo --threads 1` process with the options below and `--max-running 4`" in text
    without = serve_report.sweep_report(runs[:3], args, [], None)
    assert "No `speckv` configuration in this sweep, so no margin." in without and "![" not in without
    path = serve_report.plot_sweep(runs, tmp_path / "figures" / "sweep.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_serve_report_margin_needs_two_paired_requests():
    serve_report = serve_report_script()
    runs = sweep_runs(serve_report)
    runs[3].cells[0].outcomes = [served(0, 16, 0.8)]
    assert serve_report.margin_rows(runs, [1, 2]) == [
        "| 1 | 3.2 | target | 16.0 | – (fewer than 2 paired requests) | 1 | – |",
        "| 2 | – | – | – | – | 0 | – |",
    ]


def test_serve_load_long_prompt_is_whole_articles_then_a_part():
    from speckv.datasets import SUMMARY_INSTRUCTION

    serve_load = serve_load_script()
    first = " ".join(["word"] * 30) + "."
    articles = [SUMMARY_INSTRUCTION + first, "One. Two three four. Five six seven eight.", "Nine ten."]
    text = serve_load.long_prompt(articles, 35)
    assert text.startswith(serve_load.LONG_PROMPT_INSTRUCTION) and SUMMARY_INSTRUCTION not in text
    # The second article is cut at its last sentence end within budget; the third fills the rest.
    assert text.removeprefix(serve_load.LONG_PROMPT_INSTRUCTION) == f"{first}\n\nOne. Two three four.\n\nNine"
    assert serve_load.long_prompt(articles, 30) == serve_load.LONG_PROMPT_INSTRUCTION + first
    with pytest.raises(ValueError, match="give only 40 of the 60 words"):
        serve_load.long_prompt(articles, 60)


def test_live_verdict_names_the_best_fixed_and_the_fastest_other_row():
    from speckv.pipeline.compare import Method, MethodResult

    live = load_script("speckv_live")
    rows = {
        "target only (speckv)": 10.0,
        "chain fixed γ=1": 12.0,
        "chain fixed γ=3": 15.0,
        "n-gram fixed γ=4": 20.0,
        live.OURS: 18.0,
        live.COPYING: 24.0,  # faster, but SpecKV's own: not "another row"
    }
    # One prompt, one repeat, v tokens in a second: every bootstrap round is the point itself.
    results = [
        MethodResult(
            Method(name, controller="speckv" if name.startswith("SpecKV") else None),
            timings=[[(v, 1.0)]],
            verified=[1, 1, 3],
        )
        for name, v in rows.items()
    ]
    assert live.verdict(results, live.OURS) == (
        f"{live.OURS}: 1.80× (90% CI 1.80–1.80) the target alone, 0.90× (90% CI 0.90–0.90) the fastest "
        "other row (pooled: n-gram fixed γ=4), 1.20× (90% CI 1.20–1.20) the best fixed γ (pooled: "
        "chain fixed γ=3); tokens verified per drafting step: 1: 67%  3: 33%"
    )


def test_replay_verdicts_name_the_fastest_other_row():
    replay = load_script("speckv_replay")
    steps = [
        StepRecord(i, g, g, 0, 1, copied=c)
        for i, (g, c) in enumerate([(0, 0), (0, 0), (3, 0), (3, 3), (1, 0)])
    ]
    assert replay.width_shares(steps) == "0: 40%  1: 20%  3: 20%  3c: 20%"
    rows = [
        ("–", "target only", 1.0, 1.0),
        ("demo", "fixed γ=4", 1.5, 0.9),
        ("demo", replay.SHIPPED, 1.7, 0.8),  # SpecKV's own rows are not the others it is held against
        ("demo+ngram", "fixed γ=1", 1.2, 0.95),
        ("demo+ngram", replay.SPECKV, 1.65, 1.02),
        ("demo+ngram", "oracle", 2.2, 1.2),
    ]
    table = pd.DataFrame([{"drafter": d, "policy": p, "code": a, "chat": b} for d, p, a, b in rows])
    assert replay.verdicts(table, ["code", "chat"]).splitlines() == [
        "- code: SpecKV (demo+ngram) 1.65× the target alone, 1.10× the fastest other row (demo fixed γ=4, "
        "1.50×), 75% of its oracle's speed",
        "- chat: SpecKV (demo+ngram) 1.02× the target alone, 1.02× the fastest other row (target only, "
        "1.00×), 85% of its oracle's speed",
    ]
