"""The optional parts of SpecKV and the pip extra that installs each.

`pip install speckv` gives the core (the Python API, `generate`, `demo`); the server, quantisation
and the controller pipeline need extras. Modules import these packages where they are used, so
a missing one surfaces as a ModuleNotFoundError naming it, which `extra_for` turns into the pip
command that fixes it. tests/test_packaging.py checks this table against pyproject.toml.
"""

from __future__ import annotations

# Import name → (distribution, extra).
OPTIONAL = {
    "fastapi": ("fastapi", "serve"),
    "starlette": ("starlette", "serve"),
    "pydantic": ("pydantic", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "prometheus_client": ("prometheus-client", "serve"),
    "torchao": ("torchao", "quant"),
    "bitsandbytes": ("bitsandbytes", "quant"),
    "pandas": ("pandas", "pipeline"),
    "pyarrow": ("pyarrow", "pipeline"),
    "sklearn": ("scikit-learn", "pipeline"),
    "matplotlib": ("matplotlib", "pipeline"),
}


def extra_for(error: ModuleNotFoundError) -> str | None:
    """The extra that provides the module `error` could not import; None for anything else."""
    top = (error.name or "").partition(".")[0]
    return OPTIONAL[top][1] if top in OPTIONAL else None


def install_hint(extra: str) -> str:
    return f'pip install "speckv[{extra}]"'
