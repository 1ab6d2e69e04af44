"""The benchmark suite: one run header for every RESULTS.md section, every generated section has a
script that writes it, and the optional llama.cpp reference without llama-cpp-python installed."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

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


def test_serve_load_reads_the_server_options():
    serve_load = load_script("serve_load")
    extra = ["--compression", "bf16", "--threads=2"]
    assert serve_load.server_option(extra, "--compression") == "bf16"
    assert serve_load.server_option(extra, "--threads") == "2"
    assert serve_load.server_option(extra, "--draft") is None


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
