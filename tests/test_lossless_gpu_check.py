"""`benchmarks/gpu_check.py --dry-run`: the GPU readiness check's code path on CPU with tiny models."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_check  # noqa: E402


def test_dry_run_writes_a_report(tmp_path):
    out = tmp_path / "report.md"
    argv = ["--dry-run", "--levels", "fp32,bf16,fp8", "--fp32-head", "--threads", "1", "--out", str(out)]
    code = gpu_check.main(argv)
    report = out.read_text()
    assert code == 1  # fp8 is no level: reported as failed, and the others still ran
    assert report.startswith("# GPU readiness check (dry run")
    assert "| fp32 | fp32 | yes | 0/3 |" in report
    assert "| bf16 | bf16+fp32-head | yes |" in report
    assert "| fp8 | fp8 | failed |" in report and "unknown compression level 'fp8'" in report
    for section in ("### Lossless check", "### Target forward time", "### Speed", "| speckv fixed γ=4 |"):
        assert report.count(section) == 2
