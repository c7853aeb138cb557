"""Joining Ray (a given cluster address, or Ray started in-process on loopback when there is none), and what the
cluster has room for."""

from __future__ import annotations

import logging
import os

import ray

from pipeline.config import ClusterSpec

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, **init_kwargs) -> None:
    """Connect this process to Ray once: to `address`, or to RAY_ADDRESS (set inside a Ray job), else to a new
    in-process Ray bound to 127.0.0.1 (never to another cluster that happens to run on this machine)."""
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **init_kwargs)
    else:
        # A single-machine Ray: without this Ray advertises the machine's network address instead of loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        init_kwargs.setdefault("include_dashboard", False)
        ray.init(address="local", _node_ip_address="127.0.0.1", **init_kwargs)


def worker_resources(cluster: ClusterSpec) -> dict[str, float]:
    """What one training worker reserves."""
    resources = {"CPU": float(cluster.cpus_per_worker)}
    if cluster.gpus_per_worker:
        resources["GPU"] = float(cluster.gpus_per_worker)
    return resources


def most_workers(cluster: ClusterSpec, running: int, wait_s: float = 5.0) -> int:
    """The most workers, up to `cluster.workers`, the cluster could run now with `running` of them running already:
    room for the others is proven by placing them, as Ray Train would, in a placement group that is then removed.
    `running` when there is no room for one more."""
    from ray.util.placement_group import placement_group, remove_placement_group

    per_worker = worker_resources(cluster)
    free = ray.available_resources()
    for size in range(cluster.workers, running, -1):
        extra = size - running
        if any(free.get(name, 0.0) < amount * extra for name, amount in per_worker.items()):
            continue
        group = placement_group([dict(per_worker)] * extra, strategy="PACK")
        try:
            if group.wait(timeout_seconds=wait_s):
                return size
        finally:
            remove_placement_group(group)
    return running


def refresh_node_view() -> None:
    """Make Ray's AutoscalingCoordinator look at the nodes now. Ray Train (2.60) sizes an elastic worker group from
    the coordinator's view of the nodes, which it refreshes every 20 s on its own: a group started in between would
    not see a host that just joined, nor miss one just lost. Best effort: the view refreshes itself anyway."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        coordinator = get_or_create_autoscaling_coordinator()
        ray.get(coordinator.get_reserved_resources.remote("mixer-node-view", recompute=True), timeout=60)
    except Exception as e:
        log.warning("could not refresh Ray's view of the nodes before sizing the worker group (%s: %s); the group "
                    "may start smaller than the cluster allows and grow at a later commit", type(e).__name__, e)
