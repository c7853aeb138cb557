"""A prep on two hosts (`tests/hosts.py`) that loses one mid-run: the shards in flight there are redone on the host
that remains, and the dataset is byte-identical to a one-host prep."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline import cli
from tests.hosts import files, mixer_losing_host_2, start

PREP = ["--max-size", "40", "--shard-size", "4", "--val-per-class", "5", "--no-progress"]


@pytest.fixture(scope="module")
def hosts(s3_endpoint, tmp_path_factory):
    yield from start(tmp_path_factory.mktemp("hosts"), head_ip="127.0.3.1", host_ips="127.0.2")


def test_a_prep_that_loses_a_host_redoes_its_shards_elsewhere_and_gives_the_same_bytes(hosts, ray_cluster,
                                                                                         tmp_path):
    raw, reference, spread = tmp_path / "raw", tmp_path / "one-host", tmp_path / "two-hosts"
    assert cli.main(["make-sample-data", str(raw), "--layout", "imagefolder", "--classes", "8",
                     "--per-class", "45"]) == 0
    assert cli.main(["prepare", str(raw), str(reference), *PREP]) == 0  # the session's one-machine cluster

    err, _ = mixer_losing_host_2(hosts, ["prepare", str(raw), str(spread), *PREP], b"ray::write_shard",
                                 when=lambda: 0, replace=False)

    made_by = {p.stem: json.loads(p.read_text())["host"] for p in (spread / "_progress").glob("*-*.json")}
    assert len(made_by) == 90 and set(made_by.values()) <= {"host-1", "host-2"}
    failed = [line for line in err.splitlines() if "attempt 1 failed" in line]
    assert failed, f"the shard in flight on host-2 was not lost and retried:\n{err[-3000:]}"
    for line in failed:  # redone, and by the host that remained
        assert made_by[line.split(".tar")[0]] == "host-1", line
    assert files(spread) == files(reference)  # shards, dataset.json and rejected.jsonl

    # a replacement joined after the prep: the cluster has both hosts again
    alive = subprocess.run(
        [sys.executable, "-c", "import ray; ray.init(log_to_driver=False); "
         "print(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))"],
        env=hosts.env, capture_output=True, text=True, timeout=120, check=True).stdout
    assert alive.strip().splitlines()[-1] == "['127.0.2.2', '127.0.2.3', '127.0.3.1']"
