"""Training on two Ray Train workers (real DeepSpeed ZeRO ranks on CPU/gloo) from shards written by `mixer prepare`."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch

from pipeline import config, launch, run, storage
from pipeline.metrics import read_records


def tiny_spec(dataset: str, run_url: str, **overrides) -> config.Spec:
    raw = {
        "model": {"variant": "tiny", "image_size": 32},
        "data": {"dataset": dataset, "crop_scale": [0.35, 1.0], "streams": 8, "loader_workers": 0},
        "optim": {"lr": 3e-3, "weight_decay": 0.05},
        "schedule": {"warmup_steps": 5, "total_steps": 60, "end_lr": 1e-4},
        "batch": {"global": 32, "micro": 8},
        "deepspeed": {"zero_stage": 2, "bf16": False},
        "cluster": {"workers": 2, "cpus_per_worker": 1, "max_failures": 0},
        "eval": {"every_steps": 0, "batch_size": 64},
        "checkpoint": {"every_steps": 30, "keep_last": 2},
        "run": {"url": run_url, "log_every": 1},
    }
    for key, value in overrides.items():
        if "__" in key:
            section, name = key.split("__")
            raw.setdefault(section, {})[name] = value
        else:
            raw[key] = value
    return config.from_dict(raw)


def run_training(spec: config.Spec) -> None:
    """What `mixer train` does: resolve the spec for the run, then train it on Ray Train workers."""
    launch.run(run.resolve(spec))


def read_metrics(run_url: str) -> tuple[list[dict], list[dict]]:
    lines = read_records(run_url)
    return [x for x in lines if x["kind"] == "train"], [x for x in lines if x["kind"] == "eval"]


# Steps of the learning tests: the tiny Mixer is well past its claims by then (about a third of ln(8), and every
# validation image right); checkpoint.every_steps (30) falls on the last step only.
STEPS = 30


def assert_learned(run_url: str, steps: int, stage: int, bf16: bool) -> None:
    """What a two-worker run of `steps` steps on the sample dataset shows when it learns: every step logged, a start
    at exactly ln(8) and an end far below it, a validation top-1 far above chance, the export of the last step, and
    (ZeRO 1 and 2, whose checkpoints hold the whole module) the module saved in the run's dtype."""
    train, evals = read_metrics(run_url)
    assert [x["step"] for x in train] == list(range(1, steps + 1))
    start = train[0]["loss"]
    end = sum(x["loss"] for x in train[-5:]) / 5
    chance = 1 / 8
    # a zero-initialised head starts at exactly ln(8); a model that learns ends far below it
    assert start == pytest.approx(math.log(8), rel=1e-3)
    assert end < 0.6 * start, (start, end)
    assert evals[-1]["top1"] > 4 * chance, evals[-1]
    assert storage.exists(storage.join(run_url, "exports", f"step-{steps:09d}.safetensors"))
    if stage < 3:  # ZeRO-3 saves no whole module
        saved = storage.read_bytes(storage.join(run_url, "checkpoints", f"step-{steps:09d}",
                                                "mp_rank_00_model_states.pt"))
        states = torch.load(io.BytesIO(saved), map_location="cpu", weights_only=False)
        assert {t.dtype for t in states["module"].values()} == {torch.bfloat16 if bf16 else torch.float32}


# One run covers what no other test's run does: ZeRO-1 as a GPU spec runs it with model.compile on (DeepSpeed's bf16
# mode: a bf16 model fed bf16 images, fp32 master weights in the optimizer; the engine's torch.compile), on the
# multi-label dataset with big_vision's sigmoid loss. ZeRO-2 and 3 (fp32, single-label) are unbroken runs other tests
# share, which make assert_learned's checks: tests/test_resume.py's test_the_unbroken_run_learns_with_zero_stage_2
# and tests/test_hosts.py's test_the_unbroken_run_learns_with_zero_stage_3.
def test_a_multilabel_run_learns_with_sigmoid_and_zero_stage_1_in_bf16_compiled(sample_multilabel_dataset,
                                                                                 ray_cluster, tmp_path):
    run_url = str(tmp_path / "run")
    spec = tiny_spec(sample_multilabel_dataset, run_url, loss="sigmoid", model__head_bias=-2.0,
                     deepspeed__zero_stage=1, deepspeed__bf16=True, model__compile=True, schedule__total_steps=STEPS)
    run_training(spec)
    train, evals = read_metrics(run_url)
    assert [x["step"] for x in train] == list(range(1, STEPS + 1))
    start = train[0]["loss"]
    # a zero head with bias b gives each of the 8 sigmoids the loss ln(1 + e^b) on a negative, ln(1 + e^-b) on a
    # label; 1 to 3 labels an image
    negative, positive = math.log1p(math.exp(-2.0)), math.log1p(math.exp(2.0))
    assert 7 * negative + positive - 0.05 < start < 5 * negative + 3 * positive + 0.05, start
    assert sum(x["loss"] for x in train[-5:]) / 5 < 0.7 * start
    assert "prec1" in evals[-1] and evals[-1]["prec1"] > 0.4, evals[-1]
    assert storage.exists(storage.join(run_url, "exports", f"step-{STEPS:09d}.safetensors"))
    saved = storage.read_bytes(storage.join(run_url, "checkpoints", f"step-{STEPS:09d}",
                                            "mp_rank_00_model_states.pt"))
    states = torch.load(io.BytesIO(saved), map_location="cpu", weights_only=False)
    assert {t.dtype for t in states["module"].values()} == {torch.bfloat16}


def test_a_multilabel_dataset_with_softmax_is_refused_before_start(sample_multilabel_dataset, tmp_path):
    spec = tiny_spec(sample_multilabel_dataset, str(tmp_path / "run"))
    with pytest.raises(config.SpecError, match="multi-label datasets need `loss: sigmoid`"):
        run.preflight(spec)


def test_a_diverging_run_stops_before_it_saves_broken_weights(sample_dataset, tmp_path):
    """bf16 without the per-step overflow test (the default): a loss that turns non-finite stops the run at the next
    checkpoint, naming the steps, and nothing after it is committed. (In fp32, DeepSpeed skips a step whose gradient
    norm is not finite.) A world of one, started as torchrun starts a worker."""
    import os
    import socket
    import subprocess
    import sys

    from pipeline.checkpoint import CheckpointStore

    run_url = str(tmp_path / "run")
    # Adam's first step moves every weight by about lr: 1e36 leaves the model's numbers overflowing to inf and nan.
    spec = tiny_spec(sample_dataset, run_url, optim={"lr": 1e36, "clip_grad_norm": None},
                     schedule={"warmup_steps": 0, "total_steps": 6, "decay": "constant"},
                     deepspeed={"zero_stage": 2, "bf16": True}, cluster={"workers": 1}, checkpoint={"every_steps": 2},
                     run={"url": run_url, "log_every": 5})
    path = tmp_path / "spec.yaml"
    path.write_text(spec.to_yaml())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pipeline.train", str(path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    found = re.search(r"DivergedError: the training loss or weights became non-finite \(nan or inf\) between steps "
                      r"(\d+) and (\d+); the run stops without saving", done.stderr)
    assert found, done.stderr[-3000:]
    stopped_at = int(found.group(2))
    assert stopped_at % 2 == 0 and stopped_at < 6
    newest = CheckpointStore(run_url).latest()
    assert newest is None or newest < stopped_at
    for step in range(2, stopped_at, 2):  # every commit before the stop holds numbers only
        saved = storage.read_bytes(storage.join(run_url, "checkpoints", f"step-{step:09d}",
                                                "mp_rank_00_model_states.pt"))
        module = torch.load(io.BytesIO(saved), map_location="cpu", weights_only=False)["module"]
        assert all(torch.isfinite(t).all() for t in module.values())
