"""`validate` against a live Ray cluster: does the recipe's training world fit its GPUs and CPUs?

The engine's side of the check (reaching Ray); the world and the rule come from planning
(`planning.estimate.plan_world`, `world_problem`).
"""
from __future__ import annotations

import os
import sys
from typing import Any

from planning.estimate import plan_world, world_problem


def cluster_problem(cfg: Any) -> str | None:
    """The training world against the Ray cluster, when one is reachable (`ray.address`,
    `RAY_ADDRESS`, or a Ray already initialised in this process); None when it fits or none is."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if not address and "ray" not in sys.modules:
        return None
    import ray

    world = plan_world(cfg)
    if world is None:
        return None
    owns = not ray.is_initialized()
    if owns and not address:
        return None
    if owns:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except Exception as err:  # not reachable: the config alone was checked
            print(f"note: Ray at {address} not reachable ({type(err).__name__}); cluster not checked",
                  file=sys.stderr)
            return None
    try:
        return world_problem(world, ray.cluster_resources())
    finally:
        if owns:
            ray.shutdown()
