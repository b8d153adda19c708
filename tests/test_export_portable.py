"""An export loads anywhere: no local paths in it, and importing the twotower model is all AutoModel needs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from twotower_fixtures import llama_config

from twotower import TwoTowerConfig, TwoTowerForDiffusionLM

REPO = Path(__file__).resolve().parent.parent


def _export(tmp_path: Path, **config) -> tuple[Path, Path, TwoTowerForDiffusionLM]:
    """A backbone saved in a 'run cache', loaded from there, wrapped and exported elsewhere
    (`config`: fields of the tiny Llama config to change)."""
    torch.manual_seed(0)
    cache = tmp_path / "runs" / "cache" / "backbone"
    AutoModelForCausalLM.from_config(llama_config().__class__(**{**llama_config().to_dict(), **config})) \
        .save_pretrained(str(cache))
    backbone = AutoModelForCausalLM.from_pretrained(str(cache)).eval()
    model = TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=4)).eval()
    with torch.no_grad():  # make the denoiser differ from its zero init, so the reload is a real check
        for p in model.denoiser.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export = tmp_path / "export"
    model.save_pretrained(str(export))
    return export, tmp_path / "runs", model


def test_export_holds_no_local_path_and_loads_after_moving_it_and_deleting_the_cache(tmp_path):
    export, runs, model = _export(tmp_path)
    for f in export.glob("*.json"):
        assert str(tmp_path) not in f.read_text(), f"{f.name} holds a local path"
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    want = {m: model.generate(ids, mode=m, max_new_tokens=8).sequences for m in ("ar", "mock_ar", "diffusion")}
    moved = tmp_path / "copied_to_another_machine"
    shutil.move(str(export), str(moved))
    shutil.rmtree(runs)
    loaded = TwoTowerForDiffusionLM.from_pretrained(str(moved))
    for mode, seq in want.items():
        assert torch.equal(loaded.generate(ids, mode=mode, max_new_tokens=8).sequences, seq), mode
    # saved again from the moved copy: still no path of this machine
    again = tmp_path / "again"
    loaded.save_pretrained(str(again))
    assert str(tmp_path) not in (again / "config.json").read_text()


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(REPO),
                          timeout=300)


def test_importing_the_model_registers_the_auto_classes_and_a_bare_import_stays_light(tmp_path):
    export, _, _ = _export(tmp_path)
    ok = _python(
        "import sys\n"
        "import twotower\n"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'import twotower stays light'\n"
        "from twotower import TwoTowerForDiffusionLM\n"
        "from transformers import AutoConfig, AutoModel\n"
        f"m = AutoModel.from_pretrained({str(export)!r})\n"
        f"c = AutoConfig.from_pretrained({str(export)!r})\n"
        "print(type(m).__name__, type(c).__name__)\n")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.split() == ["TwoTowerForDiffusionLM", "TwoTowerHFConfig"]
    # the same with transformers' Auto classes loaded before twotower
    before = _python("from transformers import AutoModel\nimport twotower.model\n"
                     f"print(type(AutoModel.from_pretrained({str(export)!r})).__name__)\n")
    assert before.returncode == 0 and before.stdout.strip() == "TwoTowerForDiffusionLM", before.stderr[-2000:]
    # a bare `import twotower` registers nothing (no import hook), and neither does no import at all
    for preamble in ("", "import twotower\n"):
        without = _python(f"{preamble}from transformers import AutoModel\nAutoModel.from_pretrained({str(export)!r})\n")
        assert without.returncode != 0 and "twotower" in without.stderr, preamble


def test_the_readmes_python_example_runs_on_an_export(tmp_path):
    """The README's "Using an exported model" block, run as written on an export with a tokenizer
    (only the directory substituted): a newcomer's first lines of Python must work."""
    import re

    from stages.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    export, _, _ = _export(tmp_path, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    tok.save_pretrained(str(export))
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Using an exported model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "runs/cache/export/<key>/model" in code
    ran = _python(code.replace("runs/cache/export/<key>/model", str(export)))
    assert ran.returncode == 0, ran.stderr[-2000:]
    text, forwards = ran.stdout.strip().rsplit(" ", 1)
    assert text.startswith("copy abc=") or "copy abc=" in text, text
    assert int(forwards) >= 1
