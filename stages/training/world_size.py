"""The training job's world size, stated once: `train.num_workers` x `train.gpus_per_worker`.

Why one module: `plan` (planning/estimate.py and the plan's `world` entry), `validate` (the engine's
`check_resources` hook of `train_denoiser`) and the fit itself (`train_denoiser`, `denoiser_fit`,
`train_distributed.config_from_train`) all need the number of processes, the GPUs they reserve and
the tokens per optimizer step. When each derived them its own way, the shipped recipe set
`train.devices: 16` with the default one worker: the plan sized 16 GPUs while the run asked Lightning
for 16 devices inside a Ray task that had reserved none. Now every caller goes through `world_of`.

Light by contract (imported at config time): no torch, no Ray.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GPU_ACCELERATORS = ("gpu", "cuda")
REMOVED_TRAIN_KEYS = {
    "devices": "removed: the world size is train.num_workers (Ray Train processes) x "
               "train.gpus_per_worker (0: CPU over gloo, 1: one GPU each); set those instead",
}
"""Keys of the `train` section that no longer exist, with what replaces them (schema errors)."""


@dataclass(frozen=True)
class World:
    """One training job's shape: processes, the GPUs they reserve, and what one optimizer step eats."""

    num_workers: int
    """Training processes (Ray Train workers when above 1; this process when 1)."""
    gpus_per_worker: int
    """GPUs each process reserves: 0 (CPU, gloo) or 1."""
    micro_batch: int
    """Rows per micro-batch per process (`train.batch_size`)."""
    grad_accum: int
    """Micro-batches per optimizer step (`train.grad_accum`)."""
    seq_len: int
    """Tokens per row (`data.seq_len`)."""

    @property
    def world_size(self) -> int:
        """Data-parallel ranks: one per process."""
        return self.num_workers

    @property
    def gpus(self) -> int:
        """GPUs the whole job reserves."""
        return self.num_workers * self.gpus_per_worker

    @property
    def distributed(self) -> bool:
        """Whether the fit runs on Ray Train workers (else in the stage's own process)."""
        return self.num_workers > 1

    @property
    def tokens_per_step(self) -> int:
        """Token positions per optimizer step across all ranks (row capacity, pads included)."""
        return self.num_workers * self.micro_batch * self.grad_accum * self.seq_len

    def as_dict(self) -> dict[str, Any]:
        """Plain data for `plan --json`, the stage's metrics and its manifest."""
        return {**asdict(self), "world_size": self.world_size, "gpus": self.gpus,
                "tokens_per_step": self.tokens_per_step}


def gpus_per_worker(train: Any) -> int:
    """`train.gpus_per_worker` when set, else 1 for `train.accelerator` gpu/cuda and 0 otherwise
    (`auto` trains on CPU unless GPUs are asked for: a Ray task sees only the GPUs it reserved)."""
    explicit = getattr(train, "gpus_per_worker", None)
    accelerator = str(getattr(train, "accelerator", "auto"))
    if explicit is None:
        return 1 if accelerator in GPU_ACCELERATORS else 0
    if explicit == 0 and accelerator in GPU_ACCELERATORS:
        raise ValueError(f"train.gpus_per_worker=0 contradicts train.accelerator={accelerator!r}: "
                         "set gpus_per_worker to 1, or the accelerator to cpu/auto")
    if explicit > 0 and accelerator == "cpu":
        raise ValueError(f"train.gpus_per_worker={explicit} contradicts train.accelerator='cpu'")
    return int(explicit)


def world_of(train: Any, seq_len: int) -> World:
    """The world of a `train` section (a `train_denoiser.Config` or any object with its fields)
    whose rows are `seq_len` tokens long."""
    return World(num_workers=int(getattr(train, "num_workers", 1)), gpus_per_worker=gpus_per_worker(train),
                 micro_batch=int(getattr(train, "batch_size", 1)), grad_accum=int(getattr(train, "grad_accum", 1)),
                 seq_len=int(seq_len))


def check_stage_resources(world: World, stage: str, reserved_gpus: float) -> None:
    """The training stage's own Ray task against the world, before anything runs (ValueError naming
    the keys). One process: the task is the trainer and must hold its GPU. Several: the task is the
    Ray Train driver, the workers reserve the GPUs; a driver holding GPUs would keep them from its
    own workers on a cluster sized for the job."""
    key = f"graph.{stage}.resources.num_gpus"
    if not world.distributed and reserved_gpus < world.gpus:
        raise ValueError(f"train.num_workers=1 x train.gpus_per_worker={world.gpus_per_worker} trains in the "
                         f"stage's own task, which reserves {key}={reserved_gpus:g}: reserve {world.gpus}, "
                         "or set train.gpus_per_worker=0")
    if world.distributed and reserved_gpus > 0:
        raise ValueError(f"{key}={reserved_gpus:g}: under train.num_workers={world.num_workers} the stage is "
                         f"the Ray Train driver and its workers reserve the {world.gpus} GPU(s); set it to 0")


CPUS_PER_WORKER = 1
"""CPUs each Ray Train worker reserves (`DistributedConfig.cpus_per_worker`'s default, which
`config_from_train` keeps)."""


def check_cluster(world: World, cluster: dict[str, float]) -> None:
    """The world against a Ray cluster's totals (`ray.cluster_resources()`, or what an embedded Ray
    on this machine would have): ValueError naming the keys and both numbers."""
    have = float(cluster.get("GPU", 0))
    if world.gpus > have:
        raise ValueError(f"train.num_workers={world.num_workers} x train.gpus_per_worker={world.gpus_per_worker} "
                         f"needs {world.gpus} GPUs; the Ray cluster has {have:g}")
    cpus = float(cluster.get("CPU", 0))
    if world.distributed and world.num_workers * CPUS_PER_WORKER > cpus:
        raise ValueError(f"train.num_workers={world.num_workers} x {CPUS_PER_WORKER} CPU needs "
                         f"{world.num_workers * CPUS_PER_WORKER} CPUs; the Ray cluster has {cpus:g}")
