"""Execute a validated pipeline: cache lookups, scheduling, retries, run directory, summary, hooks.

    from pipeline import load_config, run_pipeline
    result = run_pipeline(load_config("recipes/tiny.yaml"), runner="local")
    result.summary["stages"]["evaluate"]["metrics"]

The loop is the same for both executors (`pipeline.executors`): a stage whose upstream stages are
finished is either served from the artifact store (status `cached`) or submitted; stages without a
path between them run concurrently on Ray. A failed stage stops new submissions, lets the running
ones finish (their artifacts are cached for the resume), and raises `StageFailed` carrying the
stage's own exception type and message. Tracking and display are hooks (`pipeline.tracking`,
`pipeline.display`); the stages know nothing of them.

Before any executor starts, the driver reads every stage's completion marker (`cache_hits`): when
the cache serves the whole plan, no executor is created at all, so an unchanged re-run never pays
for Ray's start-up; a run with any stage to execute uses its executor exactly as before.
"""
from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timezone
from typing import Any

from pipeline.config import PipelineConfig, Stage
from pipeline.contracts import Executor, RunHook
from pipeline.locks import StageLock
from pipeline.rundir import EventTail, dump_yaml, new_run_dir
from pipeline.schema import suggest
from pipeline.state import FINISHED, PipelineError, RunInfo, RunResult, StageFailed, StageState
from pipeline.store import ArtifactStore, cache_key, write_atomic, write_json_atomic


def stage_keys(cfg: PipelineConfig) -> dict[str, str]:
    """Every stage's cache key, in topological order (a key covers its upstream keys)."""
    keys: dict[str, str] = {}
    for name, stage in cfg.stages.items():
        upstream = {n: keys[n] for n in stage.spec.needs}
        keys[name] = cache_key(name, stage.code_version, stage.config, upstream, cfg.run.seed)
    return keys


def cache_hits(cfg: PipelineConfig, store: ArtifactStore, keys: dict[str, str], forced: set[str]
               ) -> dict[str, dict[str, Any]] | None:
    """Every stage's cached manifest when the cache serves the whole plan, else None.

    Read in the driver before any executor starts; it stops at the first miss (a forced stage, or
    no complete artifact), so a run with work to do pays for a few marker reads only.
    """
    hits: dict[str, dict[str, Any]] = {}
    for name in cfg.stages:
        manifest = None if name in forced else store.lookup(name, keys[name])
        if manifest is None:
            return None
        hits[name] = manifest
    return hits


def _call(hooks: list[RunHook], method: str, *args: Any) -> None:
    for hook in hooks:
        fn = getattr(hook, method, None)
        if fn is not None:
            fn(*args)


def summary_of(run: RunInfo) -> dict[str, Any]:
    """The `summary.json` document of a run (also written while it runs)."""
    stages = {}
    for name, st in run.states.items():
        entry: dict[str, Any] = {"status": st.status, "duration_s": round(st.duration_s, 3),
                                 "metrics": st.metrics, "cache_key": st.key, "attempts": st.attempts,
                                 "artifact_dir": st.artifact_dir}
        if st.error:
            entry["error"] = st.error
        if st.waiting_for:
            entry["waited_for"] = st.waiting_for
        if st.mlflow_run_id:
            entry["mlflow_run_id"] = st.mlflow_run_id
        if st.damaged:
            entry["damaged_artifact"] = st.damaged
        stages[name] = entry
    return {"run": run.run_dir.name, "name": run.cfg.name, "status": run.status,
            "driver": {"host": socket.gethostname(), "pid": os.getpid()},
            "started": datetime.fromtimestamp(run.started, timezone.utc).isoformat(),
            "duration_s": round(time.time() - run.started, 3), "sources": run.cfg.sources,
            "mlflow": {"tracking_uri": run.tracking_uri, "run_id": run.mlflow_run_id},
            "stages": stages}


class Runner:
    """Runs one pipeline: owns the run directory, the states, the executor and the hooks."""

    def __init__(self, cfg: PipelineConfig, executor: Executor, hooks: list[RunHook], force: set[str],
                 from_stage: str | None, hits: dict[str, dict[str, Any]] | None = None,
                 runner: str = "local"):
        self.cfg, self.executor, self.hooks = cfg, executor, hooks
        self.store = ArtifactStore(cfg.run.root, cfg.run.verify_checksums)
        self.forced = cfg.dag.descendants(force | ({from_stage} if from_stage else set()))
        self.from_stage = from_stage
        self.hits = dict(hits or {})  # manifests `cache_hits` already read (not looked up twice)
        keys = stage_keys(cfg)
        self._check_from(keys)
        self.run_dir = new_run_dir(self.store.root, cfg.name)
        self.run = RunInfo(cfg=cfg, run_dir=self.run_dir, runner=runner, cache_only=hits is not None,
                           states={n: StageState(name=n, key=k) for n, k in keys.items()})
        self.tails = {n: EventTail(self.run_dir / "events" / f"{n}.jsonl") for n in keys}
        self.locks: dict[str, StageLock] = {}  # a stage's key lock, taken before it is computed

    def write_summary(self) -> dict[str, Any]:
        """Write `summary.json` atomically and return it."""
        summary = summary_of(self.run)
        write_json_atomic(self.run_dir / "summary.json", summary)
        return summary

    def _job(self, stage: Stage, st: StageState) -> dict[str, Any]:
        inputs = {n: self.run.states[n].manifest for n in stage.spec.needs}
        return {"stage": stage.name, "module": stage.module, "config": stage.config, "inputs": inputs,
                "key": st.key, "root": str(self.store.root), "run_dir": str(self.run_dir),
                "seed": self.cfg.run.seed, "tracking_uri": self.run.tracking_uri,
                "mlflow_run_id": st.mlflow_run_id,
                "events_path": str(self.run_dir / "events" / f"{stage.name}.jsonl"),
                "tmp_dir": str(self.store.new_tmp_dir(stage.name, st.key)),
                "final_dir": str(self.store.final_dir(stage.name, st.key)),
                "work_dir": str(self.store.work_dir(stage.name, st.key)),
                **self._fence(stage.name)}

    def _fence(self, name: str) -> dict[str, str]:
        """The lock this run holds for the stage's key (path and token): the worker publishes the
        artifact only while the lock is still this run's (`locks.check_fence`)."""
        lock = self.locks.get(name)
        if lock is None or not lock.held:
            return {}
        return {"lock_path": str(lock.path), "lock_token": lock.token}

    def _check_from(self, keys: dict[str, str]) -> None:
        if self.from_stage is None:
            return
        missing = [n for n in self.cfg.dag.ancestors(self.from_stage) if self.store.lookup(n, keys[n]) is None]
        if missing:
            raise PipelineError(f"--from {self.from_stage}: upstream stage(s) {', '.join(sorted(missing))} "
                                "have no complete cached artifact for this config; run without --from")

    def _schedule(self, failed: bool) -> None:
        """Serve every ready stage from the cache or submit it (nothing new after a failure)."""
        progressed = True
        while progressed and not failed:
            progressed = False
            for name, stage in self.cfg.stages.items():
                st = self.run.states[name]
                if st.status not in ("pending", "waiting"):
                    continue
                if not all(self.run.states[n].status in FINISHED for n in stage.spec.needs):
                    continue
                if name in self.hits:
                    manifest = self.hits.pop(name)
                else:
                    manifest = None if name in self.forced else self.store.lookup(name, st.key)
                if manifest is None and not self._lock(name, st):
                    continue  # another run computes this key: use its artifact when it is done
                if manifest is None and name not in self.forced:  # it may have finished while we waited
                    manifest = self.store.lookup(name, st.key)
                    if manifest is not None:
                        self._unlock(name)
                if manifest is not None:
                    st.status, st.manifest = "cached", manifest
                    st.artifact_dir = str(self.store.final_dir(name, st.key))
                    _call(self.hooks, "on_stage_start", self.run, st)
                    _call(self.hooks, "on_stage_end", self.run, st)
                    self._save_manifest(st)
                    progressed = True
                else:
                    st.damaged = self.store.damage.get((name, st.key))
                    self._submit(stage, st)
                    if st.damaged:
                        _call(self.hooks, "on_stage_event", self.run, st, {
                            "kind": "warning", "message": f"cached artifact damaged, recomputing "
                                                          f"{name}: {st.damaged}"})
                    if getattr(self.executor, "synchronous", False):
                        return  # it already finished: let the caller collect it first

    def _lock(self, name: str, st: StageState) -> bool:
        """Take the key's lock (True), or mark the stage waiting for the run that holds it (False)."""
        lock = self.locks.get(name) or StageLock(self.store.root, name, st.key, self.run_dir.name,
                                                 self.cfg.run.lock_stale_s)
        self.locks[name] = lock
        if lock.acquire():
            if lock.broke is not None:
                who = f"run {lock.broke.get('run', '?')} on {lock.broke.get('host', '?')}"
                _call(self.hooks, "on_stage_event", self.run, st, {
                    "kind": "lock", "message": f"took over {name} from {who} (its lock was stale): "
                                               "resuming from its checkpoints"})
                lock.broke = None
            return True
        who = lock.describe_holder()
        if st.status != "waiting" or st.waiting_for != who:
            st.status, st.waiting_for = "waiting", who
            _call(self.hooks, "on_stage_event", self.run, st,
                  {"kind": "waiting", "holder": lock.holder, "message": f"waiting for {name} ({who})"})
        return False

    def _unlock(self, name: str) -> None:
        lock = self.locks.pop(name, None)
        if lock is not None:
            lock.release()

    def _submit(self, stage: Stage, st: StageState) -> None:
        st.status, st.started, st.attempts = "running", time.time(), st.attempts + 1
        if st.attempts == 1:
            _call(self.hooks, "on_stage_start", self.run, st)
        self.write_summary()
        self.executor.submit(stage.name, self._job(stage, st), stage)

    def _save_manifest(self, st: StageState) -> None:
        write_json_atomic(self.run_dir / "stages" / f"{st.name}.json", st.manifest)

    def _drain_events(self, name: str) -> None:
        st = self.run.states[name]
        for event in self.tails[name].read():
            if event.get("kind") == "progress":
                st.progress = event
            _call(self.hooks, "on_stage_event", self.run, st, event)

    def _finish(self, name: str, outcome: dict[str, Any]) -> StageFailed | None:
        st, stage = self.run.states[name], self.cfg.stages[name]
        self._drain_events(name)
        st.duration_s = outcome.get("duration_s", time.time() - (st.started or time.time()))
        if outcome["ok"]:
            st.status, st.manifest = "done", outcome["manifest"]
            st.artifact_dir = str(self.store.final_dir(name, st.key))
            self._save_manifest(st)
            self._unlock(name)
            _call(self.hooks, "on_stage_end", self.run, st)
            return None
        if outcome.get("error_type") == "LockLostError":  # judged dead while alive: yield to the new holder
            self._unlock(name)  # no longer ours: release() leaves the other run's lock file alone
            self.forced.discard(name)  # the other run computes this key: its artifact serves a --force too
            st.status = "waiting"
            _call(self.hooks, "on_stage_event", self.run, st, {
                "kind": "lock", "message": f"lost the lock of {name} (another run judged this one dead and "
                                           f"took over): not publishing; waiting for that run's artifact"})
            return None
        st.error = f"{outcome['error_type']}: {outcome['message']}"
        log = self.run_dir / "logs" / f"{name}.traceback"
        write_atomic(log, outcome.get("traceback", ""))
        transient = set(outcome.get("error_bases", [])) & set(stage.spec.retry_on + ["WorkerCrashedError"])
        if transient and st.attempts <= stage.spec.retries:
            _call(self.hooks, "on_stage_event", self.run, st,
                  {"kind": "retry", "attempt": st.attempts, "error": st.error})
            self._submit(stage, st)
            return None
        st.status = "failed"
        self._unlock(name)
        _call(self.hooks, "on_stage_end", self.run, st)
        return StageFailed(name, outcome["error_type"], outcome["message"], str(log))

    def execute(self) -> RunResult:
        """Run every stage (or serve it from the cache); raise `StageFailed` on a stage's failure."""
        (self.run_dir / "events").mkdir(exist_ok=True)
        _call(self.hooks, "on_run_start", self.run)
        failure: StageFailed | None = None
        try:
            self._schedule(False)
            while any(st.status == "running" or (st.status == "waiting" and failure is None)
                      for st in self.run.states.values()):
                for name, st in self.run.states.items():
                    if st.status == "running":
                        self._drain_events(name)
                if not any(st.status == "running" for st in self.run.states.values()):
                    time.sleep(0.25)  # only waiting for other runs' locks: poll them, not the executor
                for name, outcome in self.executor.wait(0.25):
                    failure = self._finish(name, outcome) or failure
                    self.write_summary()
                self._schedule(failure is not None)
                _call(self.hooks, "on_tick", self.run)
        except BaseException:
            self.run.status = "interrupted"
            for st in self.run.states.values():
                if st.status == "running":
                    st.status, st.duration_s = "interrupted", time.time() - (st.started or time.time())
            raise
        finally:
            for name in list(self.locks):
                self._unlock(name)
            for st in self.run.states.values():
                if st.status in ("pending", "waiting"):
                    st.status = "skipped"
            if self.run.status == "running":
                self.run.status = "failed" if failure else "done"
            summary = self.write_summary()
            _call(self.hooks, "on_run_end", self.run, summary)
        if failure is not None:
            raise failure
        return RunResult(run_dir=self.run_dir, summary=summary)


def run_pipeline(cfg: PipelineConfig, *, runner: str | None = None, force: list[str] | tuple[str, ...] = (),
                 from_stage: str | None = None, hooks: list[RunHook] | None = None, display: bool = False,
                 tracking: bool | None = None) -> RunResult:
    """Run `cfg`'s DAG; `runner` overrides `run.runner`, `tracking` overrides `tracking.enabled`.

    `force` reruns those stages and everything downstream; `from_stage` reruns it and its downstream
    while every upstream stage must come from the cache. Extra `hooks` receive the runner's calls
    (`on_run_start`, `on_stage_start`, `on_stage_event`, `on_stage_end`, `on_tick`, `on_run_end`).
    """
    for name in [*force, *([from_stage] if from_stage else [])]:
        if name not in cfg.stages:
            raise PipelineError(f"unknown stage '{name}'{suggest(name, cfg.stages)} "
                                f"(stages: {', '.join(cfg.stages)})")
    all_hooks: list[RunHook] = []
    if cfg.tracking.enabled if tracking is None else tracking:
        from pipeline.tracking import MlflowHook, TrackingUnavailable, check_tracking
        try:  # seconds, before any work: a typo in tracking.uri must not cost minutes of retries
            answers = check_tracking(cfg)
        except TrackingUnavailable as err:
            raise PipelineError(str(err)) from None
        if answers:
            all_hooks.append(MlflowHook(cfg))
    if display:
        from pipeline.display import LiveDisplay
        all_hooks.append(LiveDisplay())
    all_hooks += list(hooks or [])
    kind = runner or cfg.run.runner
    forced = cfg.dag.descendants(set(force) | ({from_stage} if from_stage else set()))
    hits = cache_hits(cfg, ArtifactStore(cfg.run.root, cfg.run.verify_checksums), stage_keys(cfg), forced)
    if hits is not None:  # nothing to run: no executor, so no Ray start-up (seconds) for a re-run
        from pipeline.executors import NoExecutor
        runner_ = Runner(cfg, NoExecutor(), all_hooks, set(force), from_stage, hits, kind)
        write_atomic(runner_.run_dir / "config.yaml", dump_yaml(cfg.resolved))
        return runner_.execute()
    from pipeline.executors import make_executor
    executor = make_executor(kind, cfg.ray)
    try:
        executor.check(list(cfg.stages.values()))  # before any run directory or stage exists
        runner_ = Runner(cfg, executor, all_hooks, set(force), from_stage, runner=kind)
        write_atomic(runner_.run_dir / "config.yaml", dump_yaml(cfg.resolved))
        return runner_.execute()
    finally:
        executor.close()
