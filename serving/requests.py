"""An OpenAI request body -> a `Job`, or a `BadRequest` naming the field (the server answers 400).

Only what the server does is accepted: greedy decoding (`temperature` 0 or absent, `top_p` 1,
one choice), `max_tokens`, `stop`, `stream`, and the extensions `mode` (default `auto`) and `gamma`.
A field set to a value the server would silently not honour is refused rather than ignored; fields
it has no use for (`user`, `seed`, ...) are ignored, as OpenAI clients send them freely.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

SERVE_MODES = ("auto", "diffusion", "verified", "ar", "mock_ar")
MAX_STOPS = 4
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}")
"""For a tokenizer without a chat template (the tiny recipe's character tokenizer): one
`role: content` line per message, then `assistant: `."""
UNHONOURED = {"n": 1, "best_of": 1, "logprobs": None, "top_logprobs": None, "echo": False,
              "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "suffix": None}
"""Fields with the only value the server honours (greedy, one choice, no log-probabilities)."""


class BadRequest(ValueError):
    """A request the server refuses: answered 400 with `message` and the offending `param`."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def body(self) -> dict[str, Any]:
        """The OpenAI error object."""
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param, "code": None}}


@dataclass(eq=False)
class Job:
    """One request as the engine runs it (compared by identity: two equal requests are two jobs)."""

    prompt_ids: list[int]
    max_tokens: int
    stop: list[str]
    mode: str
    gamma: float
    stream: bool
    chat: bool
    model: str
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when the client goes away: the engine ends the row at its next commit."""
    sink: asyncio.Queue | None = None
    """Streaming: text pieces as they commit, then None."""
    loop: asyncio.AbstractEventLoop | None = None
    """The server's event loop (where `sink` and `done` live)."""
    done: asyncio.Future | None = None
    """The job's `Result`, set from the decoding thread when its row ends."""
    received: float = 0.0
    """`time.perf_counter()` when the server read the request (for the `server_ms` it reports)."""


def _integer(body: dict, key: str, default: int, low: int) -> int:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer, got {value!r}", key)
    if value < low:
        raise BadRequest(f"{key} must be >= {low}, got {value}", key)
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest(f"stop must be a non-empty string or a list of them, got {stop!r}", "stop")
    if len(stops) > MAX_STOPS:
        raise BadRequest(f"stop takes at most {MAX_STOPS} sequences, got {len(stops)}", "stop")
    return stops


def _check_greedy(body: dict) -> None:
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or temperature != 0):
        raise BadRequest(f"temperature={temperature!r}: this server decodes greedily; send 0 or leave it out",
                         "temperature")
    top_p = body.get("top_p")
    if top_p is not None and top_p != 1:
        raise BadRequest(f"top_p={top_p!r}: this server decodes greedily; send 1 or leave it out", "top_p")
    for key, honoured in UNHONOURED.items():
        if body.get(key, honoured) not in (honoured, None):
            raise BadRequest(f"{key}={body[key]!r} is not supported (greedy decoding, one choice per request)", key)


def prompt_of(body: dict, tokenizer, chat: bool) -> list[int]:
    """The prompt's token ids: `prompt` (text, or a list of token ids) or chat `messages`."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise BadRequest("messages must be a non-empty list of {role, content} objects with string content",
                             "messages")
        template = getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
        text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("prompt is empty", "prompt")
        return list(tokenizer(prompt)["input_ids"])
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = len(tokenizer)
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"prompt token ids must be in [0, {vocab}), got {bad[:3]}", "prompt")
        return list(prompt)
    raise BadRequest("prompt must be a non-empty string or list of token ids (one prompt per request)", "prompt")


def parse_job(body: Any, *, tokenizer, chat: bool, default_max_tokens: int, default_gamma: float,
              max_positions: int | None, model_name: str) -> Job:
    """Validate an OpenAI request body and tokenize its prompt."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    _check_greedy(body)
    mode = body.get("mode") or "auto"  # absent or null: the default (some clients send nulls for unset fields)
    if mode not in SERVE_MODES:
        raise BadRequest(f"mode must be one of {', '.join(SERVE_MODES)}; got {mode!r}", "mode")
    gamma = default_gamma if body.get("gamma") is None else body["gamma"]
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise BadRequest(f"gamma must be a number in (0, 1], got {gamma!r}", "gamma")
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _integer(body, key, default_max_tokens, 1)
    stream = body.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false, got {stream!r}", "stream")
    stops = _stops(body)
    ids = prompt_of(body, tokenizer, chat)
    if max_positions is not None and len(ids) + max_tokens > max_positions:
        raise BadRequest(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                         f"limit of {max_positions} positions", "prompt" if len(ids) >= max_positions else key)
    return Job(prompt_ids=ids, max_tokens=max_tokens, stop=stops, mode=mode, gamma=float(gamma), stream=stream,
               chat=chat, model=str(body.get("model") or model_name))
