"""Failures of the storage under `run.root`, with the engine's test graph (`source -> scale -> combine`):
corrupt cached files (a flipped bit, a truncated safetensors, a damaged tokenizer) caught by
checksum and recomputed, stage by stage; a full disk under a file-size limit failing the stage
with the path and the bytes and leaving nothing that looks complete; `validate` refusing an
unwritable `run.root`; `run --resume RUN_DIR key=value` keeping the failed stage's work directory
and recording the change.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TESTS, cli

from pipeline import load_config, run_pipeline
from pipeline import store as store_mod
from pipeline.diskspace import check_root, plan_bytes
from pipeline.store import MARKER, ArtifactStore


def _run(defaults: Path, *overrides: str):
    return run_pipeline(load_config(None, list(overrides), defaults=defaults), runner="local")


def _statuses(result) -> dict[str, str]:
    return {name: st["status"] for name, st in result.summary["stages"].items()}


def _flip_byte(path: Path, keep_mtime: bool = False) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    with open(path, "r+b") as fh:  # in place: same inode, same size
        fh.write(data)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_bit_flip_in_a_cached_file_reruns_that_stage_only_and_names_the_file(engine_defaults: Path) -> None:
    first = _run(engine_defaults)
    scaled = Path(first.summary["stages"]["scale"]["artifact_dir"]) / "scaled.json"
    _flip_byte(scaled)
    second = _run(engine_defaults)
    # scale is recomputed; combine's own artifact verifies, and its key covers scale's key
    assert _statuses(second) == {"source": "cached", "scale": "done", "combine": "cached"}
    assert str(scaled) in second.summary["stages"]["scale"]["damaged_artifact"]
    assert "sha256 mismatch" in second.summary["stages"]["scale"]["damaged_artifact"]
    assert json.loads(scaled.read_text()) == [2.0, 4.0, 6.0, 8.0]  # the recomputed, intact file


def test_unchanged_stat_is_trusted_until_verify_checksums(engine_defaults: Path) -> None:
    first = _run(engine_defaults)
    result = Path(first.summary["stages"]["combine"]["artifact_dir"]) / "result.json"
    _flip_byte(result, keep_mtime=True)  # size, mtime and inode as recorded: the memo holds
    assert _statuses(_run(engine_defaults))["combine"] == "cached"
    forced = _run(engine_defaults, "run.verify_checksums=true")  # re-hash everything
    assert _statuses(forced)["combine"] == "done"
    assert "result.json: sha256 mismatch" in forced.summary["stages"]["combine"]["damaged_artifact"]


def test_a_cached_rerun_hashes_nothing(engine_defaults: Path, monkeypatch) -> None:
    first = _run(engine_defaults)
    calls: list[str] = []
    real = store_mod.sha256_file
    monkeypatch.setattr(store_mod, "sha256_file", lambda p: calls.append(str(p)) or real(p))
    store = ArtifactStore(engine_defaults.parent / "runs")
    for name, st in first.summary["stages"].items():
        assert store.lookup(name, st["cache_key"]) is not None
    assert calls == []  # every file's stat matches the one recorded at commit
    store = ArtifactStore(engine_defaults.parent / "runs", verify_checksums=True)
    assert store.lookup("combine", first.summary["stages"]["combine"]["cache_key"]) is not None
    assert len(calls) >= 4  # result.json, plot.svg, table.csv, partial.bin, manifest.json


def _commit(store: ArtifactStore, stage: str, key: str, write) -> Path:
    tmp = store.new_tmp_dir(stage, key)
    tmp.mkdir(parents=True)
    write(tmp)
    final = store.final_dir(stage, key)
    store.commit(tmp, final, stage, key, {"metrics": {}})
    return final


def test_truncated_safetensors_and_damaged_tokenizer_are_refused(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from stages.data.tokenizer import build_char_tokenizer

    store = ArtifactStore(tmp_path / "runs")
    weights = _commit(store, "train_denoiser", "k1",
                      lambda d: save_file({"w": torch.arange(64, dtype=torch.float32)},
                                          str(d / "denoiser.safetensors")))
    tok = _commit(store, "pretrain_backbone", "k2", lambda d: build_char_tokenizer().save_pretrained(str(d)))
    assert store.lookup("train_denoiser", "k1") and store.lookup("pretrain_backbone", "k2")

    path = weights / "denoiser.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    assert store.lookup("train_denoiser", "k1") is None
    assert store.damage[("train_denoiser", "k1")].startswith(f"{path}: size")

    tokenizer_file = next(p for p in sorted(tok.iterdir()) if p.name.startswith("tokenizer"))
    _flip_byte(tokenizer_file)
    assert store.lookup("pretrain_backbone", "k2") is None
    assert store.damage[("pretrain_backbone", "k2")] == f"{tokenizer_file}: sha256 mismatch (the file is corrupt)"


DISK_SCRIPT = """
import resource, signal, sys
from pipeline import load_config, run_pipeline
from pipeline.state import StageFailed
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # writes past the limit fail with EFBIG, as a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    run_pipeline(load_config(None, sys.argv[2:], defaults=sys.argv[1]), runner="local", tracking=False)
except StageFailed as err:
    print("FAILED", err)
"""


def test_disk_full_fails_the_stage_naming_path_and_bytes_and_keeps_nothing(engine_defaults: Path,
                                                                          tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    proc = subprocess.run([sys.executable, "-c", DISK_SCRIPT, str(engine_defaults), "combine.write_bytes=4000000"],
                          env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert "FAILED stage 'combine' failed: DiskFullError: file size limit (ulimit -f) reached while writing" in out, out
    assert "big.bin" in out and "bytes are free there" in out
    written = int(out.split("the stage had written ")[1].split(" bytes")[0])
    assert written >= 1 << 20  # the bytes it got down before the limit
    combine = tmp_path / "runs" / "cache" / "combine"
    assert not list(combine.glob(".tmp-*")) and not list(combine.glob("*/" + MARKER))
    # the upstream stages are complete; the same run without the big file resumes from them
    result = _run(engine_defaults)
    assert _statuses(result) == {"source": "cached", "scale": "cached", "combine": "done"}


def test_validate_refuses_an_unwritable_root_and_warns_about_space(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = cli("validate", "tiny", f"run.root={blocker}/runs")
    assert proc.returncode == 2
    assert f"run.root: {blocker}/runs cannot be created ({blocker} is not a directory)" in proc.stderr
    assert check_root(tmp_path / "new" / "runs", None) == (None, None)
    assert not (tmp_path / "new").exists()  # validate creates nothing
    error, warning = check_root(tmp_path, 1 << 62)
    assert error is None and "the plan estimates up to" in warning
    assert plan_bytes({"params": {"denoiser": {"total": 10}, "both_towers_total": 20}}) == 4 * 10 + 24 * 10 + 80
    assert plan_bytes({"backbone": None}) is None


def test_validate_warns_when_the_estimate_exceeds_the_free_space_and_caches_it(tmp_path: Path) -> None:
    """The shipped Nano config with a vocabulary sized so that the estimate (~36 bytes per
    parameter) is twice the free space of tmp_path's filesystem, whatever that disk is: `validate`
    itself sizes it, warns naming run.root, free and needed GiB, exits 0, and keeps the counts."""
    from pipeline.diskspace import free_bytes
    from stages.backbones.backbone_configs import SHIPPED_BACKBONES

    data = json.loads((SHIPPED_BACKBONES / "nemotron-3-nano-30b-a3b.json").read_text())
    data["vocab_size"] = int(2 * free_bytes(tmp_path) / (36 * data["hidden_size"])) + 1
    huge = tmp_path / "huge-backbone.json"
    huge.write_text(json.dumps(data))
    cache = tmp_path / "xdg"
    # one CPU process: the world fits this machine, so only the disk is in question
    args = ("validate", "nemotron_nano", f"run.root={tmp_path}/runs", f"backbone.name_or_path={huge}",
            "train.num_workers=1", "train.gpus_per_worker=0", "train.accelerator=cpu")
    proc = cli(*args, env={"XDG_CACHE_HOME": str(cache), "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if "warning: run.root:" in x)
    assert f"warning: run.root: {tmp_path}/runs has " in line and "the plan estimates up to" in line, line
    free, needed = (float(x.split(" GiB")[0].split()[-1]) for x in line.split(" free, "))
    assert needed > 1.5 * free, line
    (kept,) = (cache / "twotower-pipeline" / "estimates").glob("*.json")
    counts = json.loads(kept.read_text())
    assert plan_bytes(counts) / 2**30 == pytest.approx(needed, abs=0.1)
    # the next validate reads the kept counts instead of sizing again: shrunk, they fit
    counts["params"] = {"denoiser": {"total": 1000}, "both_towers_total": 2000}
    kept.write_text(json.dumps(counts))
    again = cli(*args, env={"XDG_CACHE_HOME": str(cache), "RAY_ADDRESS": ""})
    assert again.returncode == 0 and "warning: run.root" not in again.stderr, again.stderr


def test_resume_with_an_override_keeps_the_work_dir_and_records_the_change(engine_defaults: Path,
                                                                          tmp_path: Path) -> None:
    root = tmp_path / "runs"
    failed = cli("run", "--defaults", str(engine_defaults), "combine.fail=true", "--runner", "local",
                 "--quiet", "--no-track")
    assert failed.returncode == 1 and "combine exploded" in failed.stderr
    failed_dir = (root / "latest").resolve()
    resumed = cli("run", "--resume", str(failed_dir), "combine.fail=false", "--runner", "local", "--quiet",
                  "--no-track")
    assert resumed.returncode == 0, resumed.stderr
    run_dir = Path(resumed.stdout.strip().splitlines()[-1])
    record = json.loads((run_dir / "resume.json").read_text())
    assert record["resumed_run"] == str(failed_dir) and record["overrides"] == ["combine.fail=false"]
    assert record["changes"] == {"combine.fail": {"old": True, "new": False}}
    summary = json.loads((run_dir / "summary.json").read_text())
    new_work = root / "work" / "combine" / summary["stages"]["combine"]["cache_key"]
    assert record["carried_checkpoints"]["combine"]["to"] == str(new_work)
    assert (new_work / "attempts").read_text() == "2"  # the failed attempt's work dir continued
    assert {n: s["status"] for n, s in summary["stages"].items()} == {
        "source": "cached", "scale": "cached", "combine": "done"}
