"""SpecKV: adaptive speculative decoding with compression-aware speculation length.

    import speckv
    pair = speckv.load("demo")
    print(pair.generate("Name three uses of a hash table.").text)

`speckv.load`, `SpecKV` and `Completion` live in `speckv.api`; they are imported on first use so
that `import speckv` (and the CLI's start) stays instant.
"""

__version__ = "0.1.0"
__all__ = ["Completion", "SpecKV", "__version__", "load"]


def __getattr__(name: str):
    if name in ("Completion", "SpecKV", "load"):
        from speckv import api

        return getattr(api, name)
    raise AttributeError(f"module 'speckv' has no attribute {name!r}")
