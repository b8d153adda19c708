"""Training plans: memory per device, step time and the fewest GPUs for a training shape.

The arithmetic `plan` runs for training (`planning.estimate`, the `duplicate_backbone` stage's
memory report), on the parameter counts and family facts of `twotower.sizing`. Units as there:
parameters are integers, memory is GiB.
"""
from __future__ import annotations

from dataclasses import dataclass

from planning.memory import BF16_BYTES, DEFAULT_GPU_GIB, FP32_BYTES, GIB, kv_bytes_per_token, mamba_state_bytes
from twotower.sizing import FamilyFacts, ParamCounts


@dataclass(frozen=True)
class TrainShape:
    """The training job whose per-GPU memory is estimated."""

    num_gpus: int
    """Data-parallel world size; FSDP shards both towers across all of it (FULL_SHARD)."""
    micro_batch: int = 1
    """Sequences per GPU per forward."""
    seq_len: int = 4096
    """Tokens per sequence (a whole number of blocks)."""
    block_size: int = 16
    """Diffusion block size B."""


def training_memory(
    context_params: int, denoiser_params: int, largest_layer: int, facts: FamilyFacts, shape: TrainShape
) -> dict:
    """Per-GPU training memory under FSDP FULL_SHARD with activation checkpointing, bf16 compute.

    Trainable denoiser: fp32 master weights + fp32 grads + two fp32 Adam moments = 16 B/param,
    sharded over the world. Frozen context tower: bf16, sharded, run without grad. Transient: two
    gathered layers in flight (prefetch) per tower plus one layer's bf16 grads. Activations: one
    bf16 hidden state per layer boundary (checkpointing) plus what the context tower hands the
    denoiser (per-layer K/V and the Mamba states at every block start), plus fp32 logits and their
    grad for one micro-batch. Recompute peaks and allocator fragmentation are covered by a 10%
    margin; the figures are estimates to size a cluster, not measurements.
    """
    if shape.num_gpus < 1:
        raise ValueError(f"train shape: num_gpus={shape.num_gpus} must be >= 1")
    if shape.seq_len % shape.block_size:
        raise ValueError(f"train shape: seq_len={shape.seq_len} is not a multiple of block_size={shape.block_size}")
    n, b, L = shape.num_gpus, shape.micro_batch, shape.seq_len
    d, n_layers = facts.hidden_size, facts.num_layers
    sharded_state = (16 * denoiser_params + BF16_BYTES * context_params) / n
    gathered = (2 * 2 + 1) * largest_layer * BF16_BYTES
    checkpoints = b * L * d * BF16_BYTES * n_layers
    context_handoff = b * (kv_bytes_per_token(facts) * L + mamba_state_bytes(facts) * (L // shape.block_size))
    logits = b * L * facts.vocab_size * (FP32_BYTES + FP32_BYTES)
    subtotal = sharded_state + gathered + checkpoints + context_handoff + logits
    return {
        "num_gpus": n,
        "micro_batch": b,
        "seq_len": L,
        "sharded_weights_optimizer_gib": sharded_state / GIB,
        "gathered_layers_gib": gathered / GIB,
        "activation_checkpoints_gib": checkpoints / GIB,
        "context_handoff_gib": context_handoff / GIB,
        "logits_gib": logits / GIB,
        "total_gib": 1.1 * subtotal / GIB,
    }


@dataclass(frozen=True)
class Cluster:
    """Assumed hardware for wall-clock estimates (H100 SXM nodes of 8 GPUs by default)."""

    gpu_tflops: float = 989.0
    """Dense bf16 peak per GPU, TFLOP/s."""
    mfu: float = 0.25
    """Model FLOPs utilisation reached on the compute (MoE with a Python expert loop: low)."""
    gpus_per_node: int = 8
    """GPUs sharing a fast intra-node link."""
    intra_node_gbs: float = 450.0
    """Per-GPU intra-node bandwidth, GB/s (NVLink 4)."""
    inter_node_gbs: float = 50.0
    """Per-GPU inter-node bandwidth, GB/s (one 400 Gb/s NIC per GPU)."""


def training_step_time(ctx: ParamCounts, den: ParamCounts, shape: TrainShape, *, grad_accum: int = 1,
                       cluster: Cluster = Cluster()) -> dict:
    """Where a training step's wall-clock goes, FSDP FULL_SHARD, per GPU (estimate, not measured).

    Compute per token: denoiser forward + backward (6 x active) + its recompute under activation
    checkpointing (2 x active) + the frozen context forward (2 x active). Communication per
    micro-batch: all-gather of the context tower once, of the denoiser twice (forward, backward),
    reduce-scatter of its bf16 grads once; the slowest link sets the pace once the job spans nodes.
    """
    tokens = shape.micro_batch * shape.seq_len
    flops_per_token = 8 * den.active_without_embeddings + 2 * ctx.active_without_embeddings
    compute_s = tokens * flops_per_token / (cluster.gpu_tflops * 1e12 * cluster.mfu)
    n = shape.num_gpus
    moved = BF16_BYTES * (ctx.total + 3 * den.total) * (n - 1) / n
    link = cluster.inter_node_gbs if n > cluster.gpus_per_node else cluster.intra_node_gbs
    comm_s = moved / (link * 1e9)
    micro_s = max(compute_s, comm_s)  # FSDP overlaps the two at best
    step_tokens = tokens * n * grad_accum
    return {
        "flops_per_token_g": flops_per_token / 1e9,
        "compute_s_per_microbatch": compute_s,
        "comm_gb_per_microbatch": moved / 1e9,
        "comm_s_per_microbatch": comm_s,
        "bound": "communication" if comm_s > compute_s else "compute",
        "step_s": micro_s * grad_accum,
        "tokens_per_step": step_tokens,
        "tokens_per_s": step_tokens / (micro_s * grad_accum),
    }


def min_gpus(context_params: int, denoiser_params: int, largest_layer: int, facts: FamilyFacts, shape: TrainShape,
             gpu_gib: float = DEFAULT_GPU_GIB) -> int:
    """The smallest power-of-two GPU count whose per-GPU estimate fits in `gpu_gib` (0: none <= 1024)."""
    n = 1
    while n <= 1024:
        plan = training_memory(context_params, denoiser_params, largest_layer, facts,
                               TrainShape(n, shape.micro_batch, shape.seq_len, shape.block_size))
        if plan["total_gib"] <= gpu_gib:
            return n
        n *= 2
    return 0
