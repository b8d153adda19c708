"""Where a backbone comes from: a hub id, a local HF directory or a GGUF file, one key scheme.

`resolve(name_or_path, gguf_file, revision, cache_root)` turns the `backbone` section into a
directory (or hub id) that `AutoModelForCausalLM.from_pretrained` loads in seconds, plus a
`BackboneSource` that names the checkpoint for the model card and `summary.json`:

- a **hub id** (`HuggingFaceTB/SmolLM2-135M-Instruct`): loaded by transformers itself (needs the
  network or its local hub cache); keyed by id and revision (a pinned `revision` is loaded from
  its snapshot directory);
- a **local directory** with a `config.json`: used in place; keyed by a digest of its files;
- a **GGUF file** (`backbone.gguf_file`: a path, or `package:MODULE/FILE` inside an installed
  package, found with `importlib.util.find_spec` without importing the package, since a package
  that ships weights may not import without its own dependencies): keyed by the file's sha256,
  loaded once through transformers' GGUF loader (dequantised to float; needs `gguf` and
  `accelerate`, the `[real]` extra) and written as a plain safetensors directory (config +
  tokenizer) to `<cache_root>/<key>/`. A GGUF-loaded model carries a `quantization_config` that
  `save_pretrained` refuses, so the weights are moved into a model built from the clean config.
  Every later load reads that directory.

Errors name the file: a missing file, an architecture no adapter handles (listing the supported
ones from `adapters.REGISTRY`) and a file that is not a readable GGUF.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stages.backbones.built_once import build_once
from stages.backbones.gguf_files import PACKAGE_PREFIX, gguf_path, gguf_tokenizer, package_file  # noqa: F401
from stages.backbones.gguf_files import gguf_model_type as _gguf_model_type
from twotower.checksums import directory_digest, sha256_file

CONVERTED_MARKER = "converted.json"
"""Written last into a converted directory: its presence means the conversion completed."""


@dataclass(frozen=True)
class BackboneSource:
    """One backbone checkpoint, as the user named it, with its content key."""

    kind: str
    """`hub`, `dir` or `gguf`."""
    reference: str
    """The hub id, the directory, or the GGUF file's resolved path."""
    key: str
    """Cache key: `hub-<digest of id@revision>`, `dir-<content digest>` or `gguf-<sha256 prefix>`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); None: the default branch."""
    sha256: str | None = None
    """The GGUF file's sha256 (None for the other kinds)."""

    def describe(self) -> dict[str, Any]:
        """What `summary.json` and the model card record: no local directory paths, only names."""
        if self.kind == "hub":
            return {"kind": "hub", "id": self.reference, "revision": self.revision or "main"}
        if self.kind == "gguf":
            return {"kind": "gguf", "file": Path(self.reference).name, "sha256": self.sha256}
        return {"kind": "dir", "name": Path(self.reference).name, "content_digest": self.key.removeprefix("dir-")}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def source_line(source: dict | None) -> str | None:
    """The source checkpoint in words: hub id (+ revision), or file name + sha256; None if unknown."""
    if not source or not source.get("kind"):
        return None
    if source["kind"] == "pretrain_backbone":
        return "pretrained from scratch by this pipeline (stage pretrain_backbone)"
    if source["kind"] == "hub":
        return f"hub:{source['id']}@{source.get('revision') or 'main'}"
    if source["kind"] == "gguf":
        return f"{source['file']} sha256:{source['sha256']}"
    if source["kind"] == "random_init":
        return f"random init (seed {source['seed']}) of {source['architecture']}'s architecture, shrunk"
    return f"{source.get('name')} (local directory, content digest {source.get('content_digest')})"


def source_of(name_or_path: str | None, gguf_file: str | None = None, revision: str | None = None) -> BackboneSource:
    """The `BackboneSource` the `backbone` section names (reads and hashes local files)."""
    if gguf_file:
        if gguf_file.startswith(PACKAGE_PREFIX):
            path = package_file(gguf_file)
        else:
            path = Path(gguf_file).expanduser()
            if not path.is_absolute() and name_or_path and Path(name_or_path).expanduser().is_dir():
                path = Path(name_or_path).expanduser() / gguf_file  # transformers' (dir, gguf_file) form
            if not path.is_file():
                raise ValueError(f"backbone.gguf_file={gguf_file!r}: file {path} does not exist")
        path = path.resolve()
        sha = sha256_file(path)
        return BackboneSource("gguf", str(path), f"gguf-{sha[:24]}", sha256=sha)
    if not name_or_path:
        raise ValueError("backbone.name_or_path or backbone.gguf_file is required when pretrain_backbone "
                         "is not in the graph")
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return source_of(None, str(path))
        if not (path / "config.json").exists():
            raise ValueError(f"backbone.name_or_path={name_or_path!r}: no config.json in that directory")
        return BackboneSource("dir", str(path.resolve()), f"dir-{directory_digest(path)[:24]}")
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise ValueError(f"backbone.name_or_path={name_or_path!r}: directory {path} does not exist "
                         "(and it is not a hub id of the form `org/name`)")
    ident = f"{name_or_path}@{revision or 'main'}"
    return BackboneSource("hub", name_or_path, f"hub-{hashlib.sha256(ident.encode()).hexdigest()[:24]}",
                          revision=revision)


def gguf_model_type(path: Path) -> str:
    """The HF `model_type` a GGUF file's metadata maps to; an unsupported architecture's error lists
    the model types this pipeline's adapters handle."""
    return _gguf_model_type(path, _supported)


def _supported() -> str:
    import adapters

    return ", ".join(sorted(adapters.REGISTRY))


def check_supported(model_type: str, where: str) -> None:
    """ValueError naming `where` and listing the adapters' model types when none handles it."""
    import adapters

    if model_type not in adapters.REGISTRY:
        raise ValueError(f"{where}: architecture {model_type!r} has no adapter; supported: {_supported()}")


def convert_gguf(path: Path, out_dir: Path, dtype: str = "float32") -> dict[str, Any]:
    """Load `path` through transformers' GGUF loader and write a plain safetensors HF directory
    (config, weights, tokenizer) to `out_dir`. Returns the conversion record."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_type = gguf_model_type(path)
    check_supported(model_type, str(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      dtype=getattr(torch, dtype))
    except Exception as err:
        raise ValueError(f"{path}: transformers could not load this GGUF file ({type(err).__name__}: {err})") from err
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        config.pop(key, None)
    clean = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(clean, dtype=getattr(torch, dtype))
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    if getattr(clean, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    record = {"gguf_file": path.name, "sha256": sha256_file(path), "model_type": model_type, "dtype": dtype,
              "parameters": sum(p.numel() for p in plain.parameters())}
    return record


def materialise(source: BackboneSource, cache_root: Path, dtype: str = "float32") -> str:
    """A path (or hub id) `AutoModelForCausalLM.from_pretrained` loads quickly: GGUF files are
    converted once into `cache_root/<key>/` (atomically: a temporary directory renamed into place
    after its `converted.json` is written), later calls return that directory at once."""
    if source.kind == "hub" and source.revision:
        # a pinned revision: its snapshot directory (hub cache, network when missing), so that every
        # later `from_pretrained(path)` reads exactly that revision
        from huggingface_hub import snapshot_download

        return snapshot_download(source.reference, revision=source.revision)
    if source.kind != "gguf":
        return source.reference
    final = Path(cache_root) / f"{source.key}-{dtype}"
    return build_once(final, CONVERTED_MARKER,
                      lambda tmp: json.dumps(convert_gguf(Path(source.reference), tmp, dtype), indent=1))


def resolve(name_or_path: str | None, gguf_file: str | None, revision: str | None, cache_root: Path,
            dtype: str = "float32") -> tuple[str, BackboneSource]:
    """(loadable path or hub id, source) for the `backbone` section."""
    source = source_of(name_or_path, gguf_file, revision)
    return materialise(source, cache_root, dtype), source
