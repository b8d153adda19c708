"""The HTTP side: FastAPI routes in OpenAI's shapes, on a Ray Serve deployment.

Requests are batched continuously (`serving.scheduler`: up to `max_batch_size` rows, new requests
joining the running batch at its next block); decoding runs in the scheduler's thread so the event
loop keeps streaming and answering. A streaming response sends server-sent events as blocks commit and ends with
`data: [DONE]`; a client that disconnects sets its job's `cancelled`, which ends its row at the
next commit. Every refusal is a 400 with OpenAI's error object.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve

from serving.engine import Engine, Result
from serving.requests import BadRequest, Job, parse_job
from serving.scheduler import Scheduler

DEFAULT_MAX_BATCH = 16
DEFAULT_BATCH_WAIT_MS = 10.0


def _completion(job: Job, result: Result | None, rid: str, created: int, text: str | None = None,
                finish: str | None = None, chunk: bool = False) -> dict[str, Any]:
    """An OpenAI completion (or chat completion) object, or one streaming chunk of it."""
    kind = ("chat.completion" if job.chat else "text_completion") + (".chunk" if chunk and job.chat else "")
    if job.chat:
        key = "delta" if chunk else "message"
        content = {"role": "assistant", "content": text} if not chunk else ({"content": text} if text else {})
        choice = {"index": 0, key: content, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    body: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": job.model, "choices": [choice]}
    if result is not None:
        body["usage"] = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                         "total_tokens": result.prompt_tokens + result.completion_tokens}
        body["twotower"] = {"mode": result.mode, "modes": result.modes, "batch_size": result.batch_size,
                            "decode_ms": round(result.decode_seconds * 1000, 3),
                            "server_ms": round((time.perf_counter() - job.received) * 1000, 3)}
    return body


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def build_app(server: "Server"):
    """The FastAPI app over a server instance (its engine and its batched `run`). (Request types
    are imported at module level: FastAPI resolves the handlers' string annotations there.)"""
    app = FastAPI(title="twotower", description="OpenAI-compatible completions from a two-tower export")
    engine = server.engine

    async def complete(request: Request, chat: bool):
        received = time.perf_counter()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return JSONResponse(BadRequest(f"malformed JSON body: {err}").body(), status_code=400)
        try:
            job = parse_job(body, tokenizer=engine.tokenizer, chat=chat, default_max_tokens=engine.max_tokens,
                            default_gamma=engine.gamma, max_positions=engine.max_positions, model_name=engine.name)
        except BadRequest as err:
            return JSONResponse(err.body(), status_code=400)
        job.received = received
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        if not job.stream:
            try:
                result = await server.submit(job)
            finally:
                job.cancelled.set()  # gone before the answer (the request was cancelled): end its row
            return JSONResponse(_completion(job, result, rid, created, result.text, result.finish_reason))
        job.loop, job.sink = asyncio.get_running_loop(), asyncio.Queue()
        task = asyncio.ensure_future(server.submit(job))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if the client left
        return StreamingResponse(events(job, task, rid, created), media_type="text/event-stream")

    async def events(job: Job, task: asyncio.Future, rid: str, created: int):
        try:
            if job.chat:
                yield _sse(_completion(job, None, rid, created, chunk=True) | {
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            while (piece := await job.sink.get()) is not None:
                yield _sse(_completion(job, None, rid, created, piece, chunk=True))
            try:
                result = await task
            except Exception as err:  # noqa: BLE001 - the stream is already open: report in it
                yield _sse({"error": {"message": f"decoding failed: {err}", "type": "server_error"}})
            else:
                yield _sse(_completion(job, result, rid, created, "", result.finish_reason, chunk=True))
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "owned_by": "twotower",
                                            "auto_modes": engine.auto_modes}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render())

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


class Server:
    """The export loaded once and its scheduler: what a Ray Serve replica holds, or `pipeline serve
    --local` in its own process."""

    def __init__(self, export_dir: str, options: dict | None = None):
        import torch

        options = options or {}
        threads = int(options.get("threads") or 0) or (os.cpu_count() or 1)
        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS to the replica's CPU reservation (1)
        self.engine = Engine.load(export_dir, options.get("context_device", "auto"),
                                  options.get("denoiser_device", "auto"))
        self.scheduler = Scheduler(self.engine, int(options.get("max_batch_size", DEFAULT_MAX_BATCH)),
                                   float(options.get("batch_wait_ms", DEFAULT_BATCH_WAIT_MS)) / 1000)

    async def submit(self, job: Job) -> Result:
        """Queue a job; its result when its row ends (it joins a batch in flight where it can)."""
        return await self.scheduler.submit(job)


@serve.deployment
@serve.ingress()
class TwoTowerServer(Server):
    """One Ray Serve replica: the export loaded once, requests batched continuously by its scheduler."""

    def __serve_build_asgi_app__(self):
        return build_app(self)


def application(export_dir: str, **options):
    """The Ray Serve application for an export (`serve.run(application(...))` on any cluster)."""
    max_batch = int(options.get("max_batch_size", DEFAULT_MAX_BATCH))
    actor = {"num_cpus": float(options.pop("num_cpus", 1)), "num_gpus": float(options.pop("num_gpus", 0))}
    from pipeline.config import REPO_ROOT

    if (REPO_ROOT / "serving").is_dir():  # a source checkout: replicas import the same tree
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        actor["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
    return TwoTowerServer.options(ray_actor_options=actor, max_ongoing_requests=max(64, 4 * max_batch)).bind(
        os.path.abspath(export_dir), options)


def app_builder(args: dict[str, str]):
    """For Ray Serve's own CLI: `serve run serving.app:app_builder export_dir=DIR [max_batch_size=16]`."""
    args = dict(args)
    if "export_dir" not in args:
        raise ValueError("serving.app:app_builder needs export_dir=DIR")
    return application(args.pop("export_dir"), **args)
