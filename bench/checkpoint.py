"""Checkpoint cost during training: the stall a save adds to a training step, and the upload speed of the store
against a raw s3fs put of the same bytes to the same endpoint.

One DeepSpeed rank (CPU, gloo, ZeRO-2, fp32) trains a Mixer-B/32 at 224 px (60M parameters, ~1 GB of checkpoint
with its Adam state) against moto's S3 server started in this process on 127.0.0.1.
  stall   = what a save adds to its training step: the time CheckpointStore.save blocks the loop (the local write;
            the upload runs in the background), over the median training step;
  upload  = checkpoint bytes / time from save() returning to wait() returning (upload, sha256, manifest, retention),
            against the same files written by engine.save_checkpoint and sent with a plain s3fs `put`.
The stall is timed directly rather than as the difference of two step times, which on a shared machine are noisier
than the stall itself. The stall is the median over the saves; for the upload the best run of each side is kept, so
that a busy machine does not decide the ratio.

    python bench/checkpoint.py --json out/bench-checkpoint.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_s3() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                       "FSSPEC_S3_ENDPOINT_URL": endpoint})
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return server, endpoint


def init_single_rank() -> None:
    from pipeline.train import init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    init_distributed()


def build_engine(variant: str, image_size: int, batch: int):
    import deepspeed

    from pipeline.model import build

    net = build(variant, num_classes=1000, image_size=image_size)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config={
        "train_batch_size": batch, "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.05, "torch_adam": True}},
    })
    return engine, sum(p.numel() for p in net.parameters())


def train_step(engine, images, labels) -> None:
    import torch.nn.functional as F

    loss = F.cross_entropy(engine(images), labels)
    engine.backward(loss)
    engine.step()


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="B/32")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="plain steps timed before each save")
    parser.add_argument("--repeats", type=int, default=3, help="saves (and raw puts) measured")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import fsspec
    import torch

    from pipeline.checkpoint import CheckpointStore, StepRecord

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    server, endpoint = start_s3()
    init_single_rank()
    engine, params = build_engine(args.variant, args.image_size, args.batch)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 1000, (args.batch,))
    scratch = tempfile.mkdtemp(prefix="bench-checkpoint-")
    store = CheckpointStore("s3://bench/run", keep_last=1, staging_dir=os.path.join(scratch, "staging"))
    fs = fsspec.filesystem("s3")

    train_step(engine, images, labels)  # warm-up: first-step allocations
    plain, stalls, ours, raw = [], [], [], []
    ckpt_bytes = 0
    for r in range(args.repeats):
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            train_step(engine, images, labels)
            times.append(time.perf_counter() - t0)
        plain.extend(times)
        step = r + 1
        train_step(engine, images, labels)
        t0 = time.perf_counter()
        record = StepRecord(step=step, world_size=1, zero_stage=int(engine.zero_optimization_stage()),
                            model_config=engine.module.init_kwargs(), train_state={"step": step})
        store.save(engine, record, rank_state={"rng": torch.get_rng_state()})
        stalls.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        store.wait()
        ours.append(time.perf_counter() - t0)
        ckpt_bytes = sum(i.bytes for i in store.list() if i.step == step)

        # The baseline: the same DeepSpeed files, written the plain way, sent with one s3fs put.
        local = os.path.join(scratch, "raw")
        engine.save_checkpoint(local, tag="raw", client_state={"step": step})
        raw_bytes = folder_bytes(os.path.join(local, "raw"))
        t0 = time.perf_counter()
        fs.put(os.path.join(local, "raw"), f"bench/raw-{r}", recursive=True)
        raw.append((time.perf_counter() - t0, raw_bytes))
        fs.rm(f"bench/raw-{r}", recursive=True)
        shutil.rmtree(local)

    step_s = statistics.median(plain)
    upload_mb_s = ckpt_bytes / 1e6 / min(ours)
    raw_mb_s = max(b / 1e6 / t for t, b in raw)
    result = {
        "name": "checkpoint",
        "stall_fraction": round(statistics.median(stalls) / step_s, 3),
        "upload_ratio": round(upload_mb_s / raw_mb_s, 3),
        "upload_mb_s": round(upload_mb_s, 1),
        "raw_mb_s": round(raw_mb_s, 1),
        "step_s": round(step_s, 3),
        "stall_s": [round(s, 3) for s in stalls],
        "upload_s": [round(t, 3) for t in ours],
        "raw_put_s": [round(t, 3) for t, _ in raw],
        "checkpoint_mb": round(ckpt_bytes / 1e6, 1),
        "params": params,
        "model": f"Mixer-{args.variant} {args.image_size}px, batch {args.batch}, fp32, ZeRO-2, 1 rank",
        "endpoint": endpoint,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    shutil.rmtree(scratch)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
