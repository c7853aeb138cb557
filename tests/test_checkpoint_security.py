"""What a checkpoint store refuses: file names in a manifest that leave their folder, a rank_state pickle that carries
code, a staging folder another user could swap files in, a save that would not fit; and what it cleans up.

One process, no DeepSpeed: `FakeEngine` writes and reads the files of a one-rank ZeRO-2 save the way DeepSpeed
names them, which is all the store asks of an engine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline import checkpoint, deepspeed_compat, storage
from pipeline.checkpoint import CheckpointError, CheckpointStore, StepRecord

EVIL = "../../../evil.sh"


class FakeEngine:
    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.module = torch.nn.Linear(4, 2)
        self._config = SimpleNamespace(load_universal_checkpoint=False)
        self.optimizer = None  # as an engine built without one
        self.roots: list[str] = []  # the staging folders it was handed, with their mode and owner at the time

    def zero_optimization_stage(self) -> int:
        return 2

    def _seen(self, root: str) -> None:
        st = os.lstat(root)
        self.roots.append((root, stat.S_IMODE(st.st_mode), st.st_uid))

    def save_checkpoint(self, root: str, tag: str, save_latest: bool, client_state: dict) -> None:
        self._seen(root)
        folder = os.path.join(root, tag)
        os.makedirs(folder, exist_ok=True)
        torch.save({"module": self.module.state_dict()}, os.path.join(folder, "mp_rank_00_model_states.pt"))
        torch.save({"optimizer_state_dict": {"step": 1}},
                   os.path.join(folder, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
        Path(root, "zero_to_fp32.py").write_text("# DeepSpeed's recovery script, written next to the tag\n")

    def load_checkpoint(self, root: str, tag: str, **_) -> tuple[str, dict]:
        self._seen(root)
        folder = os.path.join(root, tag)
        self.module.load_state_dict(torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"),
                                               weights_only=True)["module"])
        return folder, {}


@pytest.fixture(autouse=True)
def _no_deepspeed(monkeypatch):
    # The universal-checkpoint marker comes from DeepSpeed's constants; a fake engine needs none.
    monkeypatch.setattr(deepspeed_compat, "universal_info_client_state", lambda: {})


def save_step(store: CheckpointStore, step: int, engine: FakeEngine | None = None) -> FakeEngine:
    engine = engine or FakeEngine()
    record = StepRecord(step=step, world_size=1, zero_stage=2, spec_hash="h", train_state={"step": step})
    store.save(engine, record, rank_state={"rng": torch.get_rng_state(), "rank": 0})
    store.wait()
    return engine


def rewrite_file(store: CheckpointStore, step: int, name: str, data: bytes, put: bool = True) -> None:
    """Put `data` in the store as `name` of `step` (unless `put` is False) and make the manifest vouch for it."""
    step_url = store.step_url(step)
    if put:
        storage.write_bytes_atomic(storage.join(step_url, name), data)
    manifest = storage.read_json(storage.join(step_url, "manifest.json"))
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    storage.write_json_atomic(storage.join(step_url, "manifest.json"), manifest)


# ---------------------------------------------------------------------------------------------------------------
# names in manifests


GOOD_STEP = ["meta.json", "rank_state-00003.pt", "mp_rank_00_model_states.pt",
             "zero_pp_rank_12_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_model_states.pt"]
GOOD_UNIVERSAL = ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
                  "zero/optimizer_state.pt", "zero/stem.weight/fp32.pt", "zero/blocks.0.mlp_tokens.fc1.bias/exp_avg.pt",
                  "zero/head.weight/exp_avg_sq.pt", "zero/head.weight/step.pt"]
BAD = [EVIL, "/etc/cron.d/x", "..", "zero/../../x.pt", "a\\b.pt", "meta.json\0", "mp_rank_00_model_states.pt/",
       "./meta.json", "zero_to_fp32.py", "evil.sh", "zero/a..b/fp32.pt", "zero/x/fp32.pt.sh", ""]


def test_only_the_files_a_step_or_its_universal_form_holds_are_accepted():
    for name in GOOD_STEP:
        assert checkpoint._name_problem(name, universal=False) is None, name
    for name in GOOD_UNIVERSAL:
        assert checkpoint._name_problem(name, universal=True) is None, name
    for name in BAD:
        assert checkpoint._name_problem(name, universal=False), name
        assert checkpoint._name_problem(name, universal=True), name
    assert checkpoint._name_problem("zero/stem.weight/fp32.pt", universal=False)  # not in a step
    assert checkpoint._name_problem("meta.json", universal=True)  # not in a universal form
    assert "climbs out" in checkpoint._name_problem(EVIL, universal=False)
    assert "absolute" in checkpoint._name_problem("/etc/cron.d/x", universal=False)
    root = "/tmp/some/staging"
    assert checkpoint._outside(root, EVIL, "s3://b/run/checkpoints/step-000000001") == (
        f"s3://b/run/checkpoints/step-000000001/{EVIL}: refused file name: it climbs out of the step folder ('..') "
        "or has empty parts; load another step")
    assert checkpoint._outside(root, "zero/x/fp32.pt", "u") is None


def test_a_manifest_naming_a_path_outside_the_step_is_refused_and_nothing_is_written(bucket, tmp_path, caplog):
    base = tmp_path / "stage" / "base"
    store = CheckpointStore(f"{bucket}/run", staging_dir=str(base))
    for step in (1, 2):
        save_step(store, step)
    payload = b"#!/bin/sh\necho owned\n"
    rewrite_file(store, 2, EVIL, payload)  # the store holds it, under the very key the manifest names
    step_url = store.step_url(2)
    refused = (f"{step_url}/manifest.json: refused file '{EVIL}' of step 2: it climbs out of the step folder "
               "('..') or has empty parts; the manifest was altered or not written by this trainer: load another step")
    with pytest.raises(CheckpointError) as e:
        store.load(FakeEngine(), step=2)
    assert str(e.value) == refused
    with pytest.raises(CheckpointError, match="refused file '../../../evil.sh' of step 2"):
        checkpoint.consolidated_state_dict(step_url)  # export, eval, model.init
    with pytest.raises(CheckpointError, match="refused file '../../../evil.sh' of step 2"):
        store.list()
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        record, _ = store.load(FakeEngine())  # no step asked for: the previous one, with a warning
    assert record.step == 1 and any(refused in r.getMessage() for r in caplog.records)
    # Where `base/<attempt>/step-000000002/../../../evil.sh` would have landed, and anywhere else on this disk.
    assert not (tmp_path / "stage" / "evil.sh").exists()
    assert not list(tmp_path.rglob("evil.sh"))
    assert os.listdir(base) == []

    # The same for a universal form's manifest, which has its own layout.
    universal = storage.join(store.step_url(1), "universal")
    storage.write_json_atomic(storage.join(universal, "manifest.json"), {
        "step": 1, "time": "t", "world_size": 1, "zero_stage": 2,
        "files": {"zero/head.weight/fp32.pt": {"bytes": 1, "sha256": "0" * 64},
                  "zero/../../../evil.sh": {"bytes": 1, "sha256": "0" * 64}}})
    with pytest.raises(CheckpointError, match=r"universal/manifest.json: refused file 'zero/\.\./\.\./\.\./evil.sh' "
                                              r"of step 1: it climbs out"):
        checkpoint._read_manifest(universal)


# ---------------------------------------------------------------------------------------------------------------
# rank_state: weights_only


class Payload:
    """Unpickled with weights_only=False, this creates the folder `marker`: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_a_rank_state_pickle_with_code_is_refused_and_never_runs(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"), staging_dir=str(tmp_path / "staging"))
    saved = save_step(store, 1)
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"rng": torch.get_rng_state(), "rank": Payload(str(marker))}, evil)
    torch.load(evil, weights_only=False)  # the payload has teeth
    assert marker.exists()
    marker.rmdir()
    rewrite_file(store, 1, "rank_state-00000.pt", evil.read_bytes())
    engine = FakeEngine(seed=1)
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        store.load(engine, step=1)
    message = str(e.value)
    assert message.startswith(f"{store.step_url(1)}/rank_state-00000.pt: refused: it holds more than tensors and "
                              "plain values (UnpicklingError: "), message
    assert message.endswith("the file was altered in the store: load another step")
    assert not marker.exists()
    # Refused before DeepSpeed's own load: the engine is as it was.
    assert all(torch.equal(before[k], v) for k, v in engine.module.state_dict().items())
    assert not torch.equal(saved.module.weight, engine.module.weight)


# ---------------------------------------------------------------------------------------------------------------
# staging


def test_each_save_and_load_stages_in_a_fresh_private_folder_removed_after(tmp_path):
    base = tmp_path / "staging"
    store = CheckpointStore(str(tmp_path / "run"), staging_dir=str(base))
    engine = save_step(store, 1)
    save_step(store, 2, engine)
    loaded = FakeEngine(seed=3)
    record, rank_state = store.load(loaded)
    assert record.step == 2 and rank_state["rank"] == 0
    assert torch.equal(loaded.module.weight, engine.module.weight)
    roots = engine.roots + loaded.roots
    assert len({r for r, _, _ in roots}) == 3, "one folder per attempt"
    for root, mode, uid in roots:
        assert os.path.dirname(root) == str(base) and mode == 0o700 and uid == os.geteuid()
        assert os.path.basename(root).startswith(("mixer-save-", "mixer-load-"))
    assert os.listdir(base) == []  # uploaded files, DeepSpeed's recovery script and the folders: all gone
    assert stat.S_IMODE(base.stat().st_mode) == 0o700  # made private when missing


def _refusal(store: CheckpointStore) -> str:
    with pytest.raises(CheckpointError) as e:
        store.save(FakeEngine(), StepRecord(step=1, world_size=1, zero_stage=2))
    return str(e.value)


def test_a_staging_folder_others_could_swap_files_in_is_refused(tmp_path):
    run = str(tmp_path / "run")
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    assert _refusal(CheckpointStore(run, staging_dir=str(open_to_all))).startswith(
        f"{open_to_all}: checkpoint.staging_dir has mode 777, open to other users; refused, since another user "
        "could swap checkpoint files there between their check and their load")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(private)
    assert _refusal(CheckpointStore(run, staging_dir=str(link))).startswith(
        f"{link}: checkpoint.staging_dir is a symbolic link; refused")
    under_open = open_to_all / "mine"
    under_open.mkdir(mode=0o700)
    assert _refusal(CheckpointStore(run, staging_dir=str(under_open))).startswith(
        f"{under_open}: checkpoint.staging_dir lies under {open_to_all}, which another user may change")
    if os.geteuid() == 0:  # only root can hand a folder to someone else
        taken = tmp_path / "taken"
        taken.mkdir(mode=0o700)
        os.chown(taken, 65534, 65534)
        assert _refusal(CheckpointStore(run, staging_dir=str(taken))).startswith(
            f"{taken}: checkpoint.staging_dir belongs to uid 65534, not to this process's uid 0; refused")
    assert not os.path.exists(os.path.join(run, "checkpoints")), "nothing reached the store"
    assert os.listdir(private) == []


def test_a_save_that_would_not_fit_is_refused_naming_folder_and_bytes(tmp_path, monkeypatch):
    base = tmp_path / "staging"
    store = CheckpointStore(str(tmp_path / "run"), staging_dir=str(base))
    engine = FakeEngine()
    # Linear(4, 2): 10 fp32 parameters, 40 bytes of module + 12 bytes a parameter of optimizer state, + 10 %
    need = int(1.1 * (40 + 120))
    message = _refusal_with(store, engine, free=100, monkeypatch=monkeypatch)
    assert f"not enough free space to stage a checkpoint save: {need} bytes" in message
    assert message.startswith(f"{base}/mixer-save-") and "100 bytes (100 B) free" in message
    assert os.listdir(base) == []
    # The next estimate is what the previous save staged.
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(free=10**12))
    save_step(store, 1, engine)
    staged = store._last_save_bytes
    assert staged > 1000
    message = _refusal_with(store, engine, free=1000, monkeypatch=monkeypatch)
    assert f"{int(1.1 * staged)} bytes" in message and "checkpoint.staging_dir" in message


def _refusal_with(store: CheckpointStore, engine: FakeEngine, free: int, monkeypatch) -> str:
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
    with pytest.raises(CheckpointError) as e:
        store.save(engine, StepRecord(step=9, world_size=1, zero_stage=2))
    return str(e.value)


def test_a_failed_upload_leaves_nothing_in_staging(tmp_path, monkeypatch):
    base = tmp_path / "staging"
    store = CheckpointStore(str(tmp_path / "run"), staging_dir=str(base))

    def unreachable(*_):
        raise OSError("the store is unreachable")

    monkeypatch.setattr(checkpoint, "_put_files", unreachable)
    store.save(FakeEngine(), StepRecord(step=1, world_size=1, zero_stage=2), rank_state={"rank": 0})
    with pytest.raises(CheckpointError, match="the store is unreachable"):
        store.wait()
    assert os.listdir(base) == []


def test_folders_of_dead_processes_are_swept_live_ones_kept(tmp_path):
    base = tmp_path / "staging"
    base.mkdir(mode=0o700)
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    leftovers = {name: base / name for name in (f"mixer-save-{host}-{dead}-abc_12", f"mixer-load-{host}-1-xyz",
                                                f"mixer-save-otherhost-{dead}-abc", "unrelated")}
    for path in leftovers.values():
        path.mkdir(mode=0o700)
        (path / "f.pt").write_bytes(b"x")
    save_step(CheckpointStore(str(tmp_path / "run"), staging_dir=str(base)), 1)
    assert sorted(os.listdir(base)) == sorted(n for n in leftovers if f"-{host}-{dead}-" not in n)
    shutil.rmtree(base)
