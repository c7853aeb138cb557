"""Joining Ray: a given cluster address, or Ray started in-process on loopback when there is none."""

from __future__ import annotations

import ray


def connect(address: str | None = None, **init_kwargs) -> None:
    """Connect this process to Ray once. With no address, start Ray in-process bound to 127.0.0.1."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=init_kwargs.pop("log_to_driver", True), **init_kwargs)
    else:
        init_kwargs.setdefault("include_dashboard", False)
        ray.init(_node_ip_address="127.0.0.1", **init_kwargs)
