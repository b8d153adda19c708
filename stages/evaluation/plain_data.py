"""Plain values as one line of JSON, and only plain values: what crosses between a HumanEval judge
and the sandboxed program it questions.

Why: a verdict decided next to the program under test can be forged by it (an object whose
`__eq__` is always true, a patched `json.dumps`, a frame walk to the caller's result list). The
judge (`stages.evaluation.judge`) therefore decides in its own process, and the program only ever
hands it data: `None`, `bool`, `int`, `float` (nan and infinities included), `str`, `bytes`, and
`list`, `tuple`, `set`, `frozenset` and `dict` of those. Each value is tagged by its type, so a
tuple stays a tuple and `1 == 1.0` stays a distinction the test may make; decoding builds only
these types and rejects anything else, so no object the program chose reaches the judge.

This file is also sent, as source, into the sandbox (`judge.SERVER`): both sides share one codec.
It imports only `json`.
"""
import json

MAX_DEPTH = 64
"""Nesting deeper than this is refused (a crafted value must not exhaust the judge's stack)."""


class NotPlain(TypeError):
    """A value outside the plain types, or a malformed encoding."""


def to_plain(value, depth=0):
    """`value` as JSON-ready tagged data; NotPlain for anything that is not a plain value."""
    if depth > MAX_DEPTH:
        raise NotPlain("nested too deeply")
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return {"int": str(value)}  # JSON readers differ on huge integers: carry the digits
    if kind is float:
        return {"float": repr(value)}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind in (list, tuple, set, frozenset):
        items = [to_plain(v, depth + 1) for v in value]
        if kind in (set, frozenset):
            items.sort(key=lambda v: json.dumps(v, sort_keys=True))
        return {kind.__name__: items}
    if kind is dict:
        return {"dict": [[to_plain(k, depth + 1), to_plain(v, depth + 1)] for k, v in value.items()]}
    raise NotPlain(f"a {kind.__module__}.{kind.__qualname__} is not a plain value")


def from_plain(data, depth=0):
    """The value `to_plain` encoded; NotPlain for anything else."""
    if depth > MAX_DEPTH:
        raise NotPlain("nested too deeply")
    if data is None or type(data) in (bool, str):
        return data
    if type(data) is not dict or len(data) != 1:
        raise NotPlain(f"not a tagged plain value: {type(data).__name__}")
    (tag, body), = data.items()
    if type(body) is not (str if tag in ("int", "float", "bytes") else list):
        raise NotPlain(f"malformed {tag}")
    try:
        if tag == "int":
            return int(body)
        if tag == "float":
            return float(body)
        if tag == "bytes":
            return bytes.fromhex(body)
        if tag in ("list", "tuple", "set", "frozenset"):
            items = [from_plain(v, depth + 1) for v in body]
            return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
        if tag == "dict":
            return {from_plain(k, depth + 1): from_plain(v, depth + 1) for k, v in body}
    except (TypeError, ValueError) as err:
        raise NotPlain(f"malformed {tag}: {err}") from None
    raise NotPlain(f"unknown tag {tag!r}")


def dumps(value):
    """One line of JSON for `value` (NotPlain if it is not plain)."""
    return json.dumps(to_plain(value), separators=(",", ":"))


def loads(line):
    """The plain value of one line `dumps` wrote (NotPlain for anything else)."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError) as err:
        raise NotPlain(f"not JSON: {err}") from None
    return from_plain(data)
