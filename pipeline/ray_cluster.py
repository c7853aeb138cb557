"""Joining Ray: a given cluster address, or Ray started in-process on loopback when there is none."""

from __future__ import annotations

import os

import ray


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
