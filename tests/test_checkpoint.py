"""The checkpoint store against a real S3 endpoint (moto) with real DeepSpeed ranks (processes on CPU/gloo).

Rank processes run this file as a script (`python tests/test_checkpoint.py SCENARIO CONFIG`), like torchrun would
start a trainer: RANK/WORLD_SIZE/MASTER_* in the environment, the AWS_* variables inherited from the test session.
Each scenario is one group of rank processes behind one module fixture. A fixture depends only on the checkpoints
its own claim reads and a test only on the groups its claim needs, so a failing group takes down its own tests only:

  fixture         ranks  reads    what it does                                            tests
  duo             2               unbroken runs (ZeRO 2/3), each resumed on the same 2    bitwise resume, records,
                                  ranks right after                                       ZeRO-3 export
  solo            1               unbroken runs (ZeRO 0/2/3)                              records
  up              2      solo     solo's runs resumed on 2 ranks                          1 -> 2, universal form
  down            1      duo      duo's runs resumed on 1 rank                            2 -> 1, universal form
  faults          1               an altered file, a ZeRO stage change, retention         those, and the CLI list
  killed          1               commits step 1, is killed with SIGKILL while step 2     latest stays on step 1
                                  uploads
  killed_resumed  1      killed   resumes the killed run, saves step 2 again              the next save commits
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8
SAVE_AT = 3
STEPS_AFTER = 5
MODEL_CONFIG = {"image_size": 8, "patch_size": 4, "hidden_dim": 16, "num_blocks": 2, "tokens_mlp_dim": 8,
                "channels_mlp_dim": 32, "num_classes": 5}
SPEC_HASH = "test-spec-hash"
BIG_BUFFER = 16 * 2**20  # floats: a 64 MB model-state file, so that its upload takes long enough to be killed


# ---------------------------------------------------------------------------------------------------------------
# rank side


def _engine(stage: int, big: bool = False):
    import deepspeed
    import torch

    from pipeline.model import MlpMixer
    from pipeline.optim import param_groups

    torch.manual_seed(0)
    net = MlpMixer(**MODEL_CONFIG)
    if big:
        net.register_buffer("ballast", torch.ones(BIG_BUFFER))
    world = int(os.environ["WORLD_SIZE"])
    # Two groups as the trainer has them (no decay on biases and norms): a universal load must keep them apart.
    optimizer = torch.optim.AdamW(param_groups(net, weight_decay=0.1), lr=1e-2)
    engine, *_ = deepspeed.initialize(
        model=net, optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
        config={"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
                "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
                "steps_per_print": 10**9})
    return engine


def _train(engine, steps: range) -> list[float]:
    """Steps on a global batch that is a function of the step only; returns the all-reduced losses."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = GLOBAL_BATCH // world
    losses = []
    for step in steps:
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g)
        y = torch.randint(0, MODEL_CONFIG["num_classes"], (GLOBAL_BATCH,), generator=g)
        sl = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = torch.nn.functional.cross_entropy(engine(x[sl]), y[sl])
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def _snapshot(engine) -> dict:
    """This rank's fp32 master partitions and optimizer state, exactly as held."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    params = [p.detach().clone() for group in inner.param_groups for p in group["params"]]
    state = [{k: (v.clone() if hasattr(v, "clone") else v) for k, v in inner.state[p].items()}
             for group in inner.param_groups for p in group["params"]]
    return {"params": params, "state": state, "lr": engine.get_lr(), "global_steps": engine.global_steps}


def _gathered_state(engine) -> dict:
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def _train_state(step: int) -> dict:
    return {"step": step, "stream": {"epoch": 0, "position": step * GLOBAL_BATCH}}


def _rank_state(rank: int) -> dict:
    """What a trainer keeps per rank (its RNG state): tensors, numbers and strings only, for `weights_only`."""
    import torch

    return {"rank": rank, "rng": torch.get_rng_state(), "kind": "MT19937", "extra": [0.5, None, {"rank": rank}]}


def _save(store, engine, step: int) -> dict:
    """Save `step` with the record a trainer would write; returns the rank_state saved."""
    import torch.distributed as dist

    from pipeline.checkpoint import StepRecord

    rank, world = dist.get_rank(), dist.get_world_size()
    record = StepRecord(step=step, world_size=world, zero_stage=int(engine.zero_optimization_stage()),
                        spec_hash=SPEC_HASH, model_config=MODEL_CONFIG, train_state=_train_state(step))
    rank_state = _rank_state(rank)
    store.save(engine, record, rank_state=rank_state)
    return rank_state


def _store(cfg: dict, name: str, **kw):
    from pipeline.checkpoint import CheckpointStore

    return CheckpointStore(f"{cfg['bucket']}/{name}", staging_dir=cfg["staging"], **kw)


def _unbroken_run(cfg: dict, name: str, stage: int) -> dict:
    """Train, save at SAVE_AT (snapshotting this rank's optimizer and rank_state there), keep training."""
    import torch
    import torch.distributed as dist

    engine = _engine(stage)
    store = _store(cfg, name)
    _train(engine, range(SAVE_AT))
    rank_state = _save(store, engine, SAVE_AT)
    torch.save({**_snapshot(engine), "rank_state": rank_state}, f"{cfg['tmp']}/{name}-rank{dist.get_rank()}.pt")
    if stage == 3:
        gathered = _gathered_state(engine)
        if dist.get_rank() == 0:
            torch.save(gathered, f"{cfg['tmp']}/{name}-gathered.pt")
    after = _train(engine, range(SAVE_AT, SAVE_AT + STEPS_AFTER))
    store.wait()
    return {"after": after}


def _resume(cfg: dict, name: str, stage: int) -> dict:
    """A fresh engine loads the run's newest step (snapshotting this rank's optimizer and the rank_state it got
    back) and trains on."""
    import torch
    import torch.distributed as dist

    engine = _engine(stage)
    record, rank_state = _store(cfg, name).load(engine)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.save({**_snapshot(engine), "rank_state": rank_state},
               f"{cfg['tmp']}/{name}-resumed-on-{world}-rank{rank}.pt")
    rank_state_ranks = [None] * world
    dist.all_gather_object(rank_state_ranks, None if rank_state is None else rank_state["rank"])
    return {"record": asdict(record), "rank_state_ranks": rank_state_ranks,
            "after": _train(engine, range(SAVE_AT, SAVE_AT + STEPS_AFTER))}


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def scenario_solo(cfg: dict) -> dict:
    """1 rank: unbroken runs."""
    return {"unbroken": {stage: _unbroken_run(cfg, f"solo-z{stage}", stage) for stage in (0, 2, 3)}}


def scenario_duo(cfg: dict) -> dict:
    """2 ranks: unbroken runs, each resumed on the same world size."""
    out: dict = {"unbroken": {}, "same": {}}
    for stage in (2, 3):
        out["unbroken"][stage] = _unbroken_run(cfg, f"duo-z{stage}", stage)
        out["same"][stage] = _resume(cfg, f"duo-z{stage}", stage)
    return out


def scenario_up(cfg: dict) -> dict:
    """2 ranks: solo's 1-rank runs resumed (1 -> 2)."""
    return {stage: _resume(cfg, f"solo-z{stage}", stage) for stage in (0, 2, 3)}


def scenario_down(cfg: dict) -> dict:
    """1 rank: duo's 2-rank runs resumed (2 -> 1)."""
    return {stage: _resume(cfg, f"duo-z{stage}", stage) for stage in (2, 3)}


def scenario_faults(cfg: dict) -> dict:
    """1 rank: an altered file in the newest step, a ZeRO stage change, retention."""
    import fsspec

    from pipeline.checkpoint import CheckpointError

    out: dict = {}
    # Corruption: alter one file of the newest step in the bucket.
    engine = _engine(2)
    store = _store(cfg, "corrupt")
    for step in (1, 2):
        _train(engine, range(step - 1, step))
        _save(store, engine, step)
        store.wait()
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    fs, path = fsspec.core.url_to_fs(f"{store.step_url(2)}/{name}")
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    engine = _engine(2)
    try:
        store.load(engine, step=2)
        explicit = None
    except CheckpointError as e:
        explicit = str(e)
    handler = _Warnings()
    logging.getLogger("pipeline.checkpoint").addHandler(handler)
    record, _ = store.load(engine)
    logging.getLogger("pipeline.checkpoint").removeHandler(handler)
    out["corrupt"] = {"name": name, "explicit_error": explicit, "fallback_step": record.step,
                      "train_state": record.train_state, "warnings": handler.messages}

    # A ZeRO stage change: the intact step 1, loaded by a stage-3 engine.
    try:
        store.load(_engine(3), step=1)
        out["stage_mismatch"] = None
    except CheckpointError as e:
        out["stage_mismatch"] = str(e)

    # Retention: keep the last 2 and every 3rd; an older half-written step goes too.
    store = _store(cfg, "retain", keep_last=2, keep_every=3)
    fs, path = fsspec.core.url_to_fs(store.url)
    fs.pipe_file(f"{path}/step-000000000/mp_rank_00_model_states.pt", b"half written")
    for step in range(1, 8):
        _save(store, engine, step)
    store.wait()
    out["retain"] = {"committed": [i.step for i in store.list()],
                     "folders": sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))}
    return out


def scenario_kill(cfg: dict) -> dict:
    """1 rank: commit step 1, then save step 2 and say so; the test kills this process while step 2 uploads."""
    engine = _engine(2, big=True)
    store = _store(cfg, "killed")
    _train(engine, range(1))
    _save(store, engine, 1)
    store.wait()
    _train(engine, range(1, 2))
    _save(store, engine, 2)
    print("SAVE_RETURNED", flush=True)
    time.sleep(300)
    raise AssertionError("not killed")


def scenario_kill_resume(cfg: dict) -> dict:
    """1 rank: the killed run resumed and step 2 saved again."""
    engine = _engine(2, big=True)
    store = _store(cfg, "killed")
    record, _ = store.load(engine)
    _save(store, engine, 2)
    store.wait()
    listed = store.list(verify=True)
    return {"loaded": record.step, "committed": [i.step for i in listed], "verified": [i.verified for i in listed]}


def _rank_main(scenario: str, config_path: str) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from pipeline import deepspeed_compat

    cfg = json.loads(Path(config_path).read_text())
    # What pipeline.train.init_distributed does on CPU, without importing the trainer's data stack (torchvision,
    # webdataset: seconds of CPU per rank process, and this file starts nine of them).
    deepspeed_compat.use_gloo_allreduce_on_cpu()
    deepspeed_compat.skip_muon_import()  # as pipeline.optim.build_engine does
    deepspeed.init_distributed(dist_backend="gloo")
    out = globals()[f"scenario_{scenario}"](cfg)
    if dist.get_rank() == 0:
        torch.save(out, cfg["result"])
    dist.barrier()
    # The result is on disk: skip the interpreter's teardown of torch, which takes seconds on a busy machine.
    sys.stdout.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------------------------
# test side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(scenario: str, world: int, cfg: dict, tmp: Path) -> tuple[list[subprocess.Popen], Path]:
    # Each group stages on its own folder: no group's leftovers (a killed save's files) reach another.
    cfg = {**cfg, "result": str(tmp / f"{scenario}-result.pt"), "tmp": str(tmp),
           "staging": str(tmp / "staging" / scenario)}
    config_path = tmp / f"{scenario}.json"
    config_path.write_text(json.dumps(cfg))
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, scenario, str(config_path)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs, Path(cfg["result"])


def _run(scenario: str, world: int, cfg: dict, tmp: Path, timeout: float = 300) -> dict:
    import torch

    procs, result = _start(scenario, world, cfg, tmp)
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(out)
    if any(p.returncode for p in procs):
        raise AssertionError(f"{scenario} failed:\n" + "\n".join(log[-6000:] for log in logs))
    return torch.load(result, weights_only=False)


@pytest.fixture(scope="module")
def env(s3_endpoint, tmp_path_factory):
    import boto3

    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    tmp = tmp_path_factory.mktemp("checkpoint")
    return {"bucket": f"s3://{name}"}, tmp


@pytest.fixture(scope="module")
def solo(env):
    return _run("solo", 1, *env)


@pytest.fixture(scope="module")
def duo(env):
    return _run("duo", 2, *env)


@pytest.fixture(scope="module")
def up(env, solo):
    return _run("up", 2, *env)


@pytest.fixture(scope="module")
def down(env, duo):
    return _run("down", 1, *env)


@pytest.fixture(scope="module")
def faults(env):
    return _run("faults", 1, *env)


@pytest.fixture(scope="module")
def killed(env):
    """Run `kill`; once its last save has returned and step 2 has started to appear in the bucket, SIGKILL it.
    Returns what the bucket holds right after."""
    import fsspec

    from pipeline import storage
    from pipeline.checkpoint import CheckpointStore

    cfg, tmp = env
    run = f"{cfg['bucket']}/killed"
    (proc,), _ = _start("kill", 1, cfg, tmp)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("SAVE_RETURNED"):
                break
        else:
            raise AssertionError("kill ended before its last save:\n" + "".join(lines[-80:]))
        fs, path = fsspec.core.url_to_fs(f"{run}/checkpoints/step-000000002")
        deadline = time.monotonic() + 60
        while not fs.exists(f"{path}/meta.json") and time.monotonic() < deadline:
            fs.invalidate_cache()
            time.sleep(0.005)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    fs.invalidate_cache()
    store = CheckpointStore(run)
    return {"files": sorted(p.rsplit("/", 1)[-1] for p in fs.find(path)), "returncode": proc.returncode,
            "latest_file": storage.read_bytes(f"{run}/checkpoints/latest").decode().strip(),
            "latest": store.latest(), "committed": [i.step for i in store.list()]}


@pytest.fixture(scope="module")
def killed_resumed(env, killed):
    return _run("kill_resume", 1, *env)


def _equal(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _assert_record(record: dict, world: int, stage: int, step: int = SAVE_AT) -> None:
    assert record["step"] == step and record["train_state"] == _train_state(step)
    assert record["world_size"] == world and record["zero_stage"] == stage
    assert record["model_config"] == MODEL_CONFIG and record["spec_hash"] == SPEC_HASH and record["time"]


@pytest.mark.parametrize("stage", [2, 3])
def test_same_world_size_resume_is_bitwise(env, duo, stage):
    import torch

    _, tmp = env
    same = duo["same"][stage]
    _assert_record(same["record"], world=2, stage=stage)
    assert same["rank_state_ranks"] == [0, 1], "each rank gets back the state it saved"
    for rank in (0, 1):
        saved = torch.load(tmp / f"duo-z{stage}-rank{rank}.pt", weights_only=False)
        loaded = torch.load(tmp / f"duo-z{stage}-resumed-on-2-rank{rank}.pt", weights_only=False)
        assert _equal(loaded["params"], saved["params"]), f"rank {rank}: fp32 master weights differ after load"
        assert _equal(loaded["state"], saved["state"]), f"rank {rank}: optimizer state differs after load"
        assert loaded["lr"] == saved["lr"] and loaded["global_steps"] == saved["global_steps"] == SAVE_AT
        # rank_state comes back through torch.load(weights_only=True) exactly as saved, RNG tensors included.
        assert _equal(loaded["rank_state"], saved["rank_state"]), f"rank {rank}: rank_state differs after load"
        assert isinstance(loaded["rank_state"]["rng"], torch.Tensor) and loaded["rank_state"]["rank"] == rank
    assert same["after"] == duo["unbroken"][stage]["after"], "losses after resume differ from the unbroken run"


def _assert_meta_and_manifest_agree(cfg: dict, group: str, world: int) -> None:
    from pipeline import storage
    from pipeline.checkpoint import CheckpointStore, StepRecord

    for stage in (2, 3):
        store = CheckpointStore(f"{cfg['bucket']}/{group}-z{stage}")
        step = store.step_url(SAVE_AT)
        manifest = storage.read_json(f"{step}/manifest.json")
        meta = storage.read_json(f"{step}/meta.json")
        assert "meta.json" in manifest["files"] and "files" not in meta
        record = StepRecord.from_manifest(manifest)
        assert StepRecord.from_manifest(meta) == record == store.record(SAVE_AT)
        _assert_record(asdict(record), world=world, stage=stage)


def test_meta_and_manifest_carry_the_same_record_2_ranks(env, duo):
    _assert_meta_and_manifest_agree(env[0], "duo", world=2)


def test_export_zero3_equals_gathered_weights(env, duo, tmp_path):
    import numpy as np
    import timm
    import torch

    from pipeline import convert
    from pipeline.cli import main

    cfg, tmp = env
    gathered = torch.load(tmp / "duo-z3-gathered.pt")
    out = f"{cfg['bucket']}/duo-z3/exports/step-3.safetensors"
    assert main(["export", f"{cfg['bucket']}/duo-z3", out]) == 0
    model = convert.load_safetensors(out)
    state = model.state_dict()
    assert state.keys() == gathered.keys()
    for name, value in gathered.items():
        assert torch.equal(state[name], value), name

    assert main(["export", f"{cfg['bucket']}/duo-z3/checkpoints/step-000000003", str(tmp_path / "w.pth"),
                 "--format", "timm"]) == 0
    ref = timm.models.mlp_mixer.MlpMixer(num_classes=5, img_size=8, patch_size=4, num_blocks=2, embed_dim=16,
                                         mlp_ratio=(0.5, 2.0))
    ref.load_state_dict(torch.load(tmp_path / "w.pth"))
    assert main(["export", f"{cfg['bucket']}/duo-z3", str(tmp_path / "w.npz"), "--format", "npz"]) == 0
    arrays = np.load(tmp_path / "w.npz")
    np.testing.assert_array_equal(arrays["head/kernel"], gathered["head.weight"].numpy().T)


def test_meta_and_manifest_carry_the_same_record_1_rank(env, solo):
    _assert_meta_and_manifest_agree(env[0], "solo", world=1)


def _assert_universal_form_stored(cfg: dict, run: str, world: int) -> None:
    from pipeline import storage

    for stage in (2, 3):
        step = f"{cfg['bucket']}/{run}-z{stage}/checkpoints/step-000000003"
        manifest = storage.read_json(f"{step}/universal/manifest.json")
        assert manifest["world_size"] == world and any(n.startswith("zero/") for n in manifest["files"])


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_resume_on_more_ranks(solo, up, stage):
    import numpy as np

    resumed = up[stage]
    _assert_record(resumed["record"], world=1, stage=stage)
    assert resumed["rank_state_ranks"] == [None, None], "no rank_state across a world size change"
    np.testing.assert_allclose(resumed["after"], solo["unbroken"][stage]["after"], rtol=1e-5, atol=0)
    # The check has teeth: the runs do change from step to step.
    assert len(set(resumed["after"])) == STEPS_AFTER


def test_universal_form_is_stored_next_to_the_step_1_to_2(env, up):
    from pipeline import storage

    cfg, _ = env
    _assert_universal_form_stored(cfg, "solo", world=1)
    # Without ZeRO the files are read as they are: nothing to convert.
    assert not storage.exists(f"{cfg['bucket']}/solo-z0/checkpoints/step-000000003/universal")


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_fewer_ranks(duo, down, stage):
    import numpy as np

    resumed = down[stage]
    _assert_record(resumed["record"], world=2, stage=stage)
    assert resumed["rank_state_ranks"] == [None], "no rank_state across a world size change"
    np.testing.assert_allclose(resumed["after"], duo["unbroken"][stage]["after"], rtol=1e-5, atol=0)
    assert len(set(resumed["after"])) == STEPS_AFTER


def test_universal_form_is_stored_next_to_the_step_2_to_1(env, down):
    _assert_universal_form_stored(env[0], "duo", world=2)


def test_altered_file_is_refused_and_load_falls_back(faults):
    corrupt = faults["corrupt"]
    assert corrupt["explicit_error"] is not None and corrupt["name"] in corrupt["explicit_error"]
    assert "sha256" in corrupt["explicit_error"]
    assert corrupt["fallback_step"] == 1 and corrupt["train_state"] == _train_state(1)
    assert any(corrupt["name"] in w and "step-000000001" in w for w in corrupt["warnings"])


def test_zero_stage_change_is_refused(faults):
    assert "saved with ZeRO stage 2 but this engine runs stage 3" in faults["stage_mismatch"]


def test_retention_keeps_last_and_every_nth(faults):
    assert faults["retain"]["committed"] == [3, 6, 7]
    assert faults["retain"]["folders"] == ["latest", "step-000000003", "step-000000006", "step-000000007"]


def test_cli_list_and_verify(env, faults, capsys):
    from pipeline.cli import main

    cfg, _ = env
    assert main(["checkpoints", "list", f"{cfg['bucket']}/retain"]) == 0
    table = capsys.readouterr().out
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["3", "6", "7"]
    assert main(["checkpoints", "list", f"{cfg['bucket']}/corrupt", "--verify"]) == 1
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[0], r[-1]) for r in rows] == [("1", "yes"), ("2", "NO")]


def test_kill_during_upload_leaves_previous_step(killed):
    assert killed["returncode"] == -signal.SIGKILL
    # Step 2 had started to appear (meta.json) but never got its manifest: the store still ends at step 1.
    assert "meta.json" in killed["files"] and "manifest.json" not in killed["files"]
    assert killed["latest_file"] == "step-000000001"
    assert killed["latest"] == 1 and killed["committed"] == [1]


def test_save_after_kill_commits(env, killed_resumed):
    from pipeline import storage
    from pipeline.checkpoint import CheckpointStore

    cfg, _ = env
    run = f"{cfg['bucket']}/killed"
    assert killed_resumed["loaded"] == 1
    assert killed_resumed["committed"] == [1, 2] and killed_resumed["verified"] == [True, True]
    assert storage.read_bytes(f"{run}/checkpoints/latest").decode().strip() == "step-000000002"
    assert CheckpointStore(run).latest() == 2


def test_partial_step_is_invisible(env, tmp_path, capsys):
    from pipeline import storage
    from pipeline.checkpoint import CheckpointError, CheckpointStore
    from pipeline.cli import main

    cfg, _ = env
    run = f"{cfg['bucket']}/partial"
    storage.write_json_atomic(f"{run}/checkpoints/step-000000001/manifest.json",
                              {"step": 1, "time": "t", "world_size": 1, "zero_stage": 2, "files": {}})
    storage.write_bytes_atomic(f"{run}/checkpoints/step-000000002/meta.json", b"{}")
    store = CheckpointStore(run)
    assert [i.step for i in store.list()] == [1] and store.latest() == 1
    with pytest.raises(CheckpointError, match="no committed checkpoint for step 2"):
        store.load(None, step=2)
    # Nor can it be exported: a refusal on purpose, so `mixer` says why and exits with status 2.
    capsys.readouterr()
    assert main(["export", f"{run}/checkpoints/step-000000002", str(tmp_path / "w.safetensors")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2])
