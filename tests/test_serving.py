"""`python -m pipeline serve` for real: Ray Serve on loopback, an export with a tokenizer, the
`openai` client and raw HTTP. Completions, chat, streaming as blocks commit, `auto` choosing the
mode by batch size, malformed requests answered 400 without hurting the server, a client that
disconnects freeing its row, `/metrics`, and the load test at a small size."""
from __future__ import annotations

import http.client
import json
import re
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from serving_fixtures import free_port, tiny_export

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from serving import launch

    port = free_port()
    # no EOS: every request runs to its max_tokens, so long ones stay in flight
    export = tiny_export(tmp_path_factory.mktemp("export") / "model", eos=False, max_positions=4096)
    url = launch.start(str(export), port=port, max_batch_size=8, batch_wait_ms=50)
    yield url, export
    launch.stop(ray_too=False)


def post(url, path, body, raw=None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", path, body=raw if raw is not None else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    reply = conn.getresponse()
    return reply.status, reply.read().decode()


def get(url, path):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("GET", path)
    return conn.getresponse().read().decode()


def metric(url, name, **labels):
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in get(url, "/metrics").splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def test_the_openai_client_completes_and_chats(server):
    import openai

    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    done = client.completions.create(model="m", prompt="copy abc=", max_tokens=6, extra_body={"mode": "ar"})
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 6
    assert done.model_extra["twotower"]["mode"] == "ar"
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    # streamed: the same text, in more than one piece (blocks of 4 commit as they come)
    pieces = [c.choices[0].text for c in client.completions.create(
        model="m", prompt="copy abc=", max_tokens=6, stream=True, extra_body={"mode": "ar"})]
    assert "".join(pieces) == done.choices[0].text and len([p for p in pieces if p]) > 1
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert client.models.list().data[0].id == "model"


def test_auto_picks_the_mode_for_each_block_by_batch_size_and_verified_answers_as_ar(server):
    url, _ = server
    prompts = ["copy abc=", "12+34=", "sort: zyx=", "rev: abc=", "copy xy=", "9+9="]
    ar = [json.loads(post(url, "/v1/completions", {"prompt": p, "max_tokens": 8, "mode": "ar"})[1]) for p in prompts]
    assert all(a["twotower"]["batch_size"] == 1 for a in ar)
    with ThreadPoolExecutor(len(prompts)) as pool:  # sent together: they start or join one batch, 6 rows
        together = list(pool.map(lambda p: json.loads(post(url, "/v1/completions", {"prompt": p, "max_tokens": 8})[1]),
                                 prompts))
    sizes = [t["twotower"]["batch_size"] for t in together]
    for t in together:  # the export's auto_modes: ar below 4 rows, verified from 4, picked block by block
        assert set(t["twotower"]["modes"]) <= {"ar", "verified"} and sum(t["twotower"]["modes"].values()) == 8
        assert t["twotower"]["mode"] in t["twotower"]["modes"]
    assert max(sizes) >= 4 and any("verified" in t["twotower"]["modes"] for t in together), together
    assert [t["choices"][0]["text"] for t in together] == [a["choices"][0]["text"] for a in ar]


@pytest.mark.parametrize("path, body, raw, param", [
    ("/v1/completions", None, b"{not json", None),
    ("/v1/completions", None, b"\xff\xfe", None),
    ("/v1/completions", {"prompt": "ab", "mode": "fastest"}, None, "mode"),
    ("/v1/completions", {"prompt": "ab", "max_tokens": -5}, None, "max_tokens"),
    ("/v1/completions", {"prompt": "x" * 5000}, None, "prompt"),
    ("/v1/completions", {"prompt": "ab", "temperature": 1.0}, None, "temperature"),
    ("/v1/chat/completions", {"messages": "hi"}, None, "messages"),
    ("/v1/completions", [1, 2], None, None),
])
def test_malformed_requests_get_a_400_with_a_message_and_no_row(server, path, body, raw, param):
    url, _ = server
    before = metric(url, "twotower_batches_total", size="1")
    status, text = post(url, path, body, raw)
    assert status == 400, text
    error = json.loads(text)["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param
    assert metric(url, "twotower_batches_total", size="1") == before  # refused before any decoding
    status, _ = post(url, "/v1/completions", {"prompt": "ab", "max_tokens": 2})
    assert status == 200  # and the server still answers


BAD_VALUES = {
    "prompt": ["", [], [[1, 2]], ["a", "b"], [-1], 3.5, {"text": "x"}, True],
    "max_tokens": [-1, 0, "8", 2.5, True, [8], 10**9],
    "mode": ["fast", 3, ["ar"], "AR"],
    "gamma": [0, 1.5, -0.1, "0.9", True],
    "stop": ["", [""], [1], ["a", "b", "c", "d", "e"], {"s": 1}],
    "stream": ["yes", 1, [True]],
    "temperature": [0.7, "0", [0]],
    "n": [2, 5],
    "top_p": [0.9],
    "logprobs": [1, 5],
    "echo": [True],
}


def test_fuzzed_bad_requests_all_get_a_400_and_leave_no_request_behind(server):
    """Target of the serving issue: no malformed request crashes the server or leaks a row, and
    every one gets a 4xx with a message. 60 bodies, each one good request with one field spoiled,
    plus bodies that are not JSON objects; then nothing is in flight and the server answers."""
    import random

    url, _ = server
    rng = random.Random(0)
    bodies = []
    for _ in range(60):
        field = rng.choice(sorted(BAD_VALUES))
        bodies.append((None, {"prompt": "copy ab=", "max_tokens": 4} | {field: rng.choice(BAD_VALUES[field])}))
    bodies += [(raw, None) for raw in (b"", b"null", b"[]", b'"text"', b"{", b"\x00\x01", b'{"prompt": "a"')]
    with ThreadPoolExecutor(8) as pool:  # concurrently, as clients would
        replies = list(pool.map(lambda rb: post(url, "/v1/completions", rb[1], rb[0]), bodies))
    for (raw, body), (status, text) in zip(bodies, replies):
        assert status == 400, (raw, body, status, text)
        assert json.loads(text)["error"]["message"], text
    assert metric(url, "twotower_requests_in_flight") == 0
    status, _ = post(url, "/v1/completions", {"prompt": "ab", "max_tokens": 2, "mode": None, "stream": None})
    assert status == 200  # nulls are the defaults


def test_a_client_that_disconnects_frees_its_row(server):
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    before = metric(url, "twotower_finished_total", reason="cancelled")
    tokens_before = metric(url, "twotower_generated_tokens_total")
    sock = socket.create_connection((host, int(port)))
    body = json.dumps({"prompt": "copy abc=", "max_tokens": 4000, "mode": "ar", "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while b"data: " not in received:  # the headers, then the stream has started
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    sock.close()
    deadline = time.monotonic() + 60
    while metric(url, "twotower_finished_total", reason="cancelled") == before:
        assert time.monotonic() < deadline, get(url, "/metrics")
        time.sleep(0.2)
    assert metric(url, "twotower_generated_tokens_total") - tokens_before < 4000  # it stopped early
    assert metric(url, "twotower_requests_in_flight") == 0
    status, _ = post(url, "/v1/completions", {"prompt": "ab", "max_tokens": 2})
    assert status == 200


def test_metrics_count_tokens_modes_and_batches(server):
    url, _ = server
    post(url, "/v1/completions", {"prompt": "ab", "max_tokens": 3, "mode": "diffusion"})
    text = get(url, "/metrics")
    assert re.search(r'twotower_requests_total\{mode="diffusion"\} [1-9]', text)
    assert float(re.search(r"^twotower_tokens_per_second (\S+)", text, re.M).group(1)) > 0
    assert float(re.search(r"^twotower_tokens_per_forward (\S+)", text, re.M).group(1)) > 0


def test_the_readmes_curl_and_openai_calls_work_as_written(server):
    """README's "Serving an exported model": the curl line and the Python block, run as written
    with only the server's address substituted."""
    import subprocess

    url, _ = server
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Serving an exported model"):]
    curl = re.search(r"```bash\n(curl .*?)```", section, re.S).group(1).replace("http://127.0.0.1:8000", url)
    ran = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and json.loads(ran.stdout)["usage"]["completion_tokens"] == 16, ran.stdout + ran.stderr
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1).replace("http://127.0.0.1:8000", url)
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.split()[-1] in ("ar", "verified")  # the mode auto chose, from the export's table


def test_the_load_test_runs_against_the_server(server):
    sys.path.insert(0, str(REPO / "bench"))
    import serve_load

    url, _ = server
    result = serve_load.run(url, serve_load.prompts_for(8), [1, 4], max_tokens=8, repeats=1, long_every=4,
                            long_tokens=12)  # rows 0 and 4 ask for 12 tokens, the others for 8
    assert [row["concurrency"] for row in result["table"]] == [1, 4]
    assert all(row["ar_tokens_per_s"] > 0 and row["auto_tokens_per_s"] > 0 for row in result["table"])
    assert result["exact"]["verified"] == result["exact"]["of"] == 8
    ex = result["exact"]["auto_exact_modes"]
    assert ex["equal"] == ex["of"] == 16  # this export's auto only ever picks ar or verified
    assert all(0 < row["auto_short_p50_s"] for row in result["table"])
    assert "| 1 |" in serve_load.render(result) and "p50 of the short requests" in serve_load.render(result)
