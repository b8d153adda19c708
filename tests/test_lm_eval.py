"""lm-evaluation-harness integration: the `twotower` lm-eval model, its CLI and the `lm_eval` stage.

All offline, on a tiny real Llama backbone with the project's character tokenizer, exported the way
`export` does (save_pretrained + tokenizer + generation_config.json). Log-likelihoods are compared
with lm-eval's own `hf` model scoring the same backbone; tasks are local YAMLs over JSONL files
written here: one multiple-choice task and one generation task.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="needs the [eval] extra")

from harness_fixtures import tiny_char_twotower  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MAX_LENGTH = 32  # short, so truncation and several rolling windows are exercised

MC_YAML = """\
task: tt_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_YAML = """\
task: tt_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An export dir and the same backbone saved as a plain HF checkpoint."""
    root = tmp_path_factory.mktemp("lm_eval")
    model, tok = tiny_char_twotower()
    exp, bb = root / "export", root / "backbone"
    model.save_pretrained(exp)
    tok.save_pretrained(exp)
    (exp / "generation_config.json").write_text(json.dumps({"mode": "diffusion", "gamma": 0.8, "block_size": 4}))
    model.context_tower.save_pretrained(bb)
    tok.save_pretrained(bb)
    return {"root": root, "export": exp, "backbone": bb}


@pytest.fixture(scope="module")
def tasks(export):
    """A local task directory: tt_mc (multiple choice) and tt_gen (generate_until) over JSONL."""
    d = export["root"] / "tasks"
    d.mkdir()
    mc = [{"question": f"{a} + {b} =", "choices": [f" {a + b}", f" {a + b + 1}", f" {a * b + 3}"], "label": 0}
          for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]
    gen = [{"prompt": f"copy {w}:", "answer": w} for w in ["ab", "cd", "ef", "gh"]]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (d / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    (d / "tt_mc.yaml").write_text(MC_YAML.format(data=d / "mc.jsonl"))
    (d / "tt_gen.yaml").write_text(GEN_YAML.format(data=d / "gen.jsonl"))
    return d


@pytest.fixture(scope="module")
def lms(export):
    from lm_eval.models.huggingface import HFLM

    from stages.evaluation.lm_eval_model import TwoTowerLM

    ours = TwoTowerLM(pretrained=str(export["export"]), max_length=MAX_LENGTH, batch_size=3)
    hf = HFLM(pretrained=str(export["backbone"]), device="cpu", batch_size=1, max_length=MAX_LENGTH, dtype="float32")
    return ours, hf


def _req(kind, *args):
    return Instance(kind, {}, args, 0)


def test_loglikelihood_equals_the_backbone_under_lm_evals_hf_model(lms):
    ours, hf = lms
    pairs = [("hello", " world"), ("", "abc"), ("x" * 40, "yz"), ("def f(x):\n", "    return x"), ("1 + 2 =", " 3")]
    a = ours.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    b = hf.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    for (la, ga), (lb, gb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-4) and ga == gb
    assert len({round(la, 3) for la, _ in a}) == len(pairs)  # distinct requests, distinct scores


def test_loglikelihood_equals_a_direct_backbone_forward(lms, export):
    from transformers import AutoModelForCausalLM

    ours, _ = lms
    backbone = AutoModelForCausalLM.from_pretrained(export["backbone"]).float().eval()
    ctx, cont = ours.tok_encode("hello"), ours.tok_encode(" there", add_special_tokens=False)
    with torch.no_grad():
        logp = torch.log_softmax(backbone(torch.tensor([ctx + cont])).logits[0].double(), -1)
    want = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    (got, _), = ours._loglikelihood_tokens([(None, ctx, cont)])
    assert got == pytest.approx(want, abs=1e-4)


def test_loglikelihood_rolling_equals_hf(lms):
    ours, hf = lms
    texts = ["hello world " * 8, "ab", "def f(x):\n    return x * 2\n" * 3]  # several windows of 32
    a = ours.loglikelihood_rolling([_req("loglikelihood_rolling", t) for t in texts])
    b = hf.loglikelihood_rolling([_req("loglikelihood_rolling", t) for t in texts])
    assert a == pytest.approx(b, abs=1e-4)


def test_generate_until_honours_until_and_max_gen_toks_batched(lms, export):
    from stages.evaluation.lm_eval_model import TwoTowerLM

    ours, _ = lms
    contexts = ["abc", "hello", "1+1=", "xyz"]
    ar = TwoTowerLM(pretrained=str(export["export"]), mode="ar", batch_size=3, max_length=MAX_LENGTH)
    long = ar.generate_until([_req("generate_until", c, {"until": [], "max_gen_toks": 12}) for c in contexts])
    for c, text in zip(contexts, long):  # equals one long AR call, decoded
        ids = ar.tok_encode(c)
        out = ar.model.generate(torch.tensor([ids]), mode="ar", max_new_tokens=12)
        from stages.evaluation.decoding_eval import answer_text

        assert text == answer_text(ar.tokenizer, out.sequences[0, len(ids):].tolist())[0]
        assert len(ar.tok_encode(text, add_special_tokens=False)) <= 12
    short = ar.generate_until([_req("generate_until", c, {"until": [], "max_gen_toks": 5}) for c in contexts])
    assert all(len(s) <= 5 and lt.startswith(s) for s, lt in zip(short, long))
    stop = next(ch for ch in long[0][1:] if ch.strip())  # a character AR writes after the first
    cut = ar.generate_until([_req("generate_until", contexts[0], {"until": [stop], "max_gen_toks": 12})])
    assert cut == [long[0][: long[0].index(stop, 1) if long[0][0] == stop else long[0].index(stop)]]
    batch1 = TwoTowerLM(pretrained=str(export["export"]), mode="ar", batch_size=1, max_length=MAX_LENGTH)
    assert batch1.generate_until([_req("generate_until", c, {"until": [], "max_gen_toks": 12})
                                  for c in contexts]) == long
    dif = ours.generate_until([_req("generate_until", c, {"until": ["\n"], "max_gen_toks": 8}) for c in contexts])
    assert len(dif) == 4 and all("\n" not in t for t in dif) and ours.mode == "diffusion"


def test_bad_model_args_are_named(export, tmp_path):
    from stages.evaluation.lm_eval_model import TwoTowerLM

    with pytest.raises(ValueError, match="not an exported two-tower directory"):
        TwoTowerLM(pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="mode must be one of"):
        TwoTowerLM(pretrained=str(export["export"]), mode="beam")


def test_cli_runs_local_tasks(export, tasks, tmp_path):
    """`twotower-lm-eval --model twotower ...`: lm-eval's own CLI with our model registered."""
    out = tmp_path / "results"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "stages.evaluation.lm_eval_model", "--model", "twotower", "--model_args",
                        f"pretrained={export['export']},mode=diffusion,gamma=0.8", "--tasks", "tt_mc,tt_gen",
                        "--include_path", str(tasks), "--limit", "3", "--batch_size", "2", "--output_path", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (found,) = list(out.rglob("results*.json"))
    res = json.loads(found.read_text())
    assert res["results"]["tt_mc"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert "exact_match,none" in res["results"]["tt_gen"]
    assert res["config"]["model"] == "twotower" and res["config"]["model_args"]["mode"] == "diffusion"


def test_stage_logs_every_task_to_summary_and_mlflow(export, tasks, tmp_path, monkeypatch):
    import mlflow

    from pipeline import load_config, run_pipeline

    defaults = tmp_path / "defaults.yaml"
    defaults.write_text(f"""\
run: {{root: {tmp_path / 'runs'}, runner: local}}
ray: {{address: null, num_cpus: 2}}
tracking: {{enabled: true, experiment: lm-eval-test}}
graph:
  lm_eval: {{needs: [], resources: {{num_cpus: 1}}}}
lm_eval:
  pretrained: {export['export']}
  tasks: [tt_mc, tt_gen]
  include_path: {tasks}
  limit: 4
  batch_size: 2
""")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = run_pipeline(load_config(None, [], defaults=defaults), runner="local")
    metrics = result.summary["stages"]["lm_eval"]["metrics"]
    assert {"lm_eval_tt_mc_acc", "lm_eval_tt_gen_exact_match"} <= set(metrics)
    saved_file = next(p for p in (tmp_path / "runs").rglob("lm_eval_results.json") if "mlartifacts" not in p.parts)
    saved = json.loads(saved_file.read_text())
    summary_file = next((tmp_path / "runs").rglob("summary.json"))
    assert json.loads(summary_file.read_text())["stages"]["lm_eval"]["metrics"]["lm_eval_tt_mc_acc"] == \
        metrics["lm_eval_tt_mc_acc"]
    mlflow.set_tracking_uri(result.summary["mlflow"]["tracking_uri"])
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["lm-eval-test"], output_format="list")}
    assert runs["lm_eval"].data.metrics["lm_eval_tt_mc_acc"] == metrics["lm_eval_tt_mc_acc"]
    assert runs["lm_eval"].data.metrics["lm_eval_tt_gen_exact_match"] == metrics["lm_eval_tt_gen_exact_match"]
    assert saved["results"]["tt_mc"]["acc,none"] == metrics["lm_eval_tt_mc_acc"]


def test_flat_metrics_names():
    from stages.lm_eval_stage import flat_metrics

    got = flat_metrics({"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match":
                                  0.1, "acc,none": 0.5, "acc_stderr,none": "N/A"}})
    assert got == {"lm_eval_gsm8k_exact_match_strict-match": 0.25, "lm_eval_gsm8k_exact_match_stderr_strict-match": 0.1,
                   "lm_eval_gsm8k_acc": 0.5}


def test_missing_tasks_and_extra_are_named(monkeypatch):
    import importlib.util

    from stages import lm_eval_stage as S

    with pytest.raises(ValueError, match="lm_eval.tasks is empty"):
        S.Config()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ValueError, match=r"\[eval\]"):
        S.validate(S.Config(tasks=["tt_mc"]))


REGISTRY_PROBE = """
import json
from lm_eval.api import registry
before = "twotower" in registry.model_registry
try:
    registry.get_model("twotower")
    found_before = True
except ValueError:
    found_before = False
import stages.evaluation.lm_eval_model as m
after, hf_after = registry.get_model("twotower") is m.TwoTowerLM, registry.get_model("hf").__name__
import lm_eval.models
print(json.dumps({"before": before, "found_before": found_before, "after": after, "hf_after": hf_after,
                  "in_lm_evals_mapping": "twotower" in lm_eval.models.MODEL_MAPPING}))
"""


def test_twotower_is_registered_by_importing_the_module_and_not_before():
    """lm-eval finds models only through its own `MODEL_MAPPING` (no entry points), so `twotower`
    exists once `stages.evaluation.lm_eval_model` is imported, and not before. A fresh interpreter: the registry
    is process-global. Importing it first must not hide lm-eval's own models (`hf`): `get_model`
    loads them only while the registry is empty."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for order in ("", "import stages.evaluation.lm_eval_model\n"):
        probe = REGISTRY_PROBE if not order else REGISTRY_PROBE.replace(
            'before = "twotower" in registry.model_registry',
            'import stages.evaluation.lm_eval_model\nbefore = "twotower" in registry.model_registry')
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=str(REPO),
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["in_lm_evals_mapping"] is False
        assert got["after"] is True and got["hf_after"] == "HFLM"
        assert got["before"] is got["found_before"] is bool(order)


def test_model_card_names_the_wrapper_and_its_command():
    from stages import export as E

    card = E.model_card({}, {}, {}, {"block_size": 4, "gamma": 0.9, "mode": "diffusion"}, [])
    assert "## Evaluate with lm-evaluation-harness" in card
    assert "twotower-lm-eval --model twotower --model_args pretrained=PATH,mode=diffusion,gamma=0.9" in card
    assert "--model hf" in card  # says why the plain route fails


def test_loading_an_export_as_a_causal_lm_names_the_wrapper(export):
    """What lm-eval's `--model hf` does (in `twotower-lm-eval`, or in Python after importing the
    runtime): AutoModelForCausalLM on an export fails with the wrapper's name and call."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    import twotower.model  # noqa: F401 - registers model_type twotower, as the runtime's users have it

    want = rf"not a causal LM.*twotower-lm-eval --model twotower --model_args pretrained={export['export']}"
    with pytest.raises(ValueError, match=want):
        AutoModelForCausalLM.from_pretrained(export["export"])
    with pytest.raises(ValueError, match="twotower-lm-eval --model twotower"):
        HFLM(pretrained=str(export["export"]), device="cpu", batch_size=1)
    assert type(twotower.model.AutoModel.from_pretrained(export["export"])).__name__ == "TwoTowerForDiffusionLM"


def test_the_stage_takes_every_mode_the_wrapper_takes():
    import typing

    from pipeline.schema import build
    from stages import lm_eval_stage as S
    from twotower.generate import MODES

    literal = next(a for a in typing.get_args(typing.get_type_hints(S.Config)["mode"]) if a is not type(None))
    assert set(typing.get_args(literal)) == set(MODES)
    for mode in MODES:
        assert build(S.Config, {"tasks": ["tt_mc"], "mode": mode}).mode == mode


def test_stage_results_record_mode_gamma_and_export_and_log_samples(export, tasks, tmp_path, monkeypatch):
    """The results file names the export, the mode and γ (not `model_args: None`); with
    `log_samples` every scored example is in `lm_eval_samples.jsonl`."""
    from stages import lm_eval_stage as S
    from stages.api import StageContext

    events = []
    ctx = StageContext(name="lm_eval", out_dir=tmp_path / "out", work_dir=tmp_path / "work", run_dir=tmp_path,
                       report=events.append)
    cfg = S.Config(tasks=["tt_mc", "tt_gen"], include_path=str(tasks), limit=2, batch_size=2, mode="verified",
                   gamma=0.7, max_gen_toks=6, log_samples=True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    manifest = S.run(cfg, {"export": {"path": str(export["export"])}}, ctx)
    res = json.loads((tmp_path / "out" / "lm_eval_results.json").read_text())
    assert res["config"]["model"] == "twotower"
    args = res["config"]["model_args"]
    assert args["pretrained"] == str(export["export"]) and args["mode"] == "verified" and args["gamma"] == 0.7
    assert manifest["lm_eval"]["mode"] == "verified" and "samples" not in res
    rows = [json.loads(line) for line in (tmp_path / "out" / "lm_eval_samples.jsonl").read_text().splitlines()]
    assert sorted(r["task"] for r in rows) == ["tt_gen", "tt_gen", "tt_mc", "tt_mc"]
    assert all("resps" in r and "doc" in r for r in rows)
    assert manifest["artifacts"]["samples"].endswith("lm_eval_samples.jsonl")
