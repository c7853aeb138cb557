"""Shared test services: a real S3 endpoint (moto's server on 127.0.0.1) and a real two-node Ray cluster.

Credentials and the endpoint go into the environment before any service starts, so Ray workers, DeepSpeed ranks and
subprocesses reach the same bucket the way they would in production (AWS_* variables, no keys in specs).
"""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray Train's preemption watcher (an actor per worker group that logs node drains) is one more process to start on
# the way to every training start and restart; no node here is ever drained.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Keep every Ray address on loopback: without this Ray rewrites 127.0.0.1 to the machine's network address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# The suite keeps up to seven Ray nodes alive on two cores; each one's dashboard agent samples every process every
# 5 s and exports metrics nobody reads here. Less often, and no metrics: a 2-node cluster idles at 8.6% of a core
# instead of 11.2%.
os.environ.setdefault("REPORTER_UPDATE_INTERVAL_MS", "60000")
os.environ.setdefault("RAY_enable_metrics_collection", "0")


# `make test` hands whole test files to its processes in collection order: the longest go first, so that none of
# them starts last and runs on alone while the other processes have nothing left to do.
LONGEST_FIRST = ("test_hosts.py", "test_resume.py", "test_hosts_prep.py", "test_submit.py", "test_train.py",
                 "test_dedup.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_terminal_summary(terminalreporter) -> None:
    """What tests recorded as `record_property("summary", text)` (tables of faults met...), after the results:
    a test's own prints do not reach the terminal from the suite's worker processes."""
    for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", []):
        for name, text in getattr(report, "user_properties", []):
            if name == "summary":
                terminalreporter.write_sep("-", report.nodeid)
                terminalreporter.write_line(text)


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """Start moto's S3 server on loopback and point every AWS client in this process tree at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            "FSSPEC_S3_ENDPOINT_URL": endpoint,
        }
    )
    yield endpoint
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket; returns its s3:// URL."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint: str):
    """Two real Ray nodes on this machine (a head and a worker), joined by this process as driver."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 200 * 2**20, "include_dashboard": False,
                        "node_ip_address": "127.0.0.1"},
    )
    cluster.add_node(num_cpus=2, object_store_memory=200 * 2**20, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def sample_dataset(ray_cluster, tmp_path_factory) -> str:
    """A small single-label dataset made by `mixer prepare` on the test cluster; returns its URL.
    8 classes x 45 learnable images (short side at most 40): train 16 shards x 20, val 2 shards x 20 (5 per class)."""
    from pipeline import cli

    root = tmp_path_factory.mktemp("sample_dataset")
    raw, ds = str(root / "raw"), str(root / "ds")
    assert cli.main(["make-sample-data", raw, "--layout", "imagefolder", "--classes", "8", "--per-class", "45"]) == 0
    assert cli.main(["prepare", raw, ds, "--max-size", "40", "--shard-size", "20", "--val-per-class", "5",
                     "--no-progress"]) == 0
    return ds


@pytest.fixture(scope="session")
def digits_dataset(ray_cluster, tmp_path_factory) -> str:
    """scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes), written as 32x32 PNGs (each pixel 4x4)
    and made a dataset by `mixer prepare`: a downstream set for few-shot evaluation. val: 30 a class; train: the
    other 1,497; shards of 100."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from pipeline import cli

    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / "raw" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray((pixels * 255 / 16).round().astype(np.uint8))
        grey.resize((32, 32), Image.Resampling.NEAREST).convert("RGB").save(folder / f"{i:04d}.png")
    ds = str(root / "digits")
    assert cli.main(["prepare", str(root / "raw"), ds, "--shard-size", "100", "--val-per-class", "30",
                     "--no-progress"]) == 0
    return ds


@pytest.fixture(scope="session")
def sample_multilabel_dataset(ray_cluster, tmp_path_factory) -> str:
    """A small multi-label dataset (manifest layout, `{key}.json` with "labels") made by `mixer prepare`.
    8 classes x 30 images, a quarter of them with 2-3 labels: train 11 shards, val 2 shards (3 per class)."""
    from pipeline import cli

    root = tmp_path_factory.mktemp("sample_multilabel_dataset")
    raw, ds = str(root / "raw"), str(root / "ds")
    assert cli.main(["make-sample-data", raw, "--layout", "manifest", "--classes", "8", "--per-class", "30"]) == 0
    assert cli.main(["prepare", f"{raw}/manifest.jsonl", ds, "--max-size", "40", "--shard-size", "20",
                     "--val-per-class", "3", "--no-progress"]) == 0
    return ds
