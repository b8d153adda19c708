"""`python -m pipeline serve EXPORT --local`: the same app from uvicorn in this process, no Ray. The
openai client completes and streams; a short request sent while a long one decodes joins its batch
and is answered first (continuous batching over HTTP); bad flags are refused."""
from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
from serving_fixtures import free_port, tiny_export


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    from serving.launch import LocalServer

    export = tiny_export(tmp_path_factory.mktemp("export") / "model", eos=False, max_positions=4096)
    server = LocalServer(str(export), "127.0.0.1", free_port(), max_batch_size=8, batch_wait_ms=0, threads=1)
    yield server
    server.stop()
    assert not server.thread.is_alive()


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


def test_the_openai_client_completes_and_streams_without_ray(local):
    import openai

    client = openai.OpenAI(base_url=f"{local.url}/v1", api_key="unused", max_retries=0)
    done = client.completions.create(model="m", prompt="copy abc=", max_tokens=6, extra_body={"mode": "verified"})
    assert done.usage.completion_tokens == 6 and done.model_extra["twotower"]["mode"] == "verified"
    pieces = [c.choices[0].text for c in client.completions.create(
        model="m", prompt="copy abc=", max_tokens=6, stream=True, extra_body={"mode": "ar"})]
    assert "".join(pieces) == done.choices[0].text  # verified == ar


def test_a_short_request_joins_a_long_one_and_is_answered_first(local):
    answers: dict[str, tuple[dict, float]] = {}

    def send(name, body):
        reply = post(local.url, body)
        answers[name] = (reply, time.monotonic())

    alone = post(local.url, {"prompt": "12+34=", "max_tokens": 6, "mode": "ar"})
    long = threading.Thread(target=send, args=("long", {"prompt": "copy abcdef=", "max_tokens": 1500, "mode": "ar"}))
    long.start()
    deadline = time.monotonic() + 60
    while local_metric(local.url, "twotower_requests_in_flight") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    send("short", {"prompt": "12+34=", "max_tokens": 6, "mode": "ar"})
    long.join()
    short, long_reply = answers["short"][0], answers["long"][0]
    assert answers["short"][1] < answers["long"][1]
    assert short["twotower"]["batch_size"] == 2 and short["choices"][0]["text"] == alone["choices"][0]["text"]
    assert long_reply["usage"]["completion_tokens"] == 1500
    assert local_metric(local.url, "twotower_joined_total") >= 1
    assert local_metric(local.url, "twotower_requests_in_flight") == 0


def local_metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


def test_local_and_address_together_are_refused(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["serve", str(tmp_path), "--local", "--address", "auto"]) == 2
    assert "--local serves without Ray" in capsys.readouterr().err


def test_the_serve_command_with_local_answers_and_stops_on_ctrl_c(tmp_path):
    """`python -m pipeline serve EXPORT --local` as a user runs it: it prints its URL, answers, and
    Ctrl-C (SIGINT) stops it with status 0, even started as a script's background job, which
    inherits SIGINT ignored (simulated here: the child starts with SIGINT ignored)."""
    import signal
    import subprocess
    import sys

    export = tiny_export(tmp_path / "model")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", str(export), "--local", "--port", str(port),
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = proc.stdout.readline()
        assert f"at http://127.0.0.1:{port}/v1" in line, line + proc.stderr.read()
        reply = post(f"http://127.0.0.1:{port}", {"prompt": "copy ab=", "max_tokens": 3, "mode": "ar"})
        assert reply["twotower"]["mode"] == "ar" and reply["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"running 60 s after Ctrl-C; out: {out[-2000:]} err: {err[-4000:]}") from None
    assert proc.returncode == 0 and "stopping" in out, err[-2000:]
