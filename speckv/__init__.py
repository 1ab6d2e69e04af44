"""SpecKV: adaptive speculative decoding with compression-aware speculation length."""

__version__ = "0.1.0"
