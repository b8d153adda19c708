"""Serving an export: an OpenAI-compatible HTTP endpoint on Ray Serve (or, `--local`, on uvicorn).

    python -m pipeline serve EXPORT_DIR --port 8000

- `requests`: an OpenAI request body -> a validated `Job` (or a `BadRequest`, answered 400);
- `text`: token ids -> text as they commit, stop strings, held back until they cannot be a stop;
- `engine`: jobs through `generate` (`auto`: the export's `auto_modes`, block by block),
  streaming each row, ending rows that stop or whose client left, each job answered as its row
  ends; the metrics;
- `scheduler`: continuous batching: one decoding thread, requests joining the running batch;
- `app`: the FastAPI routes (`/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/metrics`,
  `/health`), the `Server` they call, and its Ray Serve deployment;
- `launch`: `python -m pipeline serve` (Ray Serve, or `--local` without Ray).

`docs/serving.md` describes the API, the batching and the measured load test (`bench/serve_load.py`).
"""
