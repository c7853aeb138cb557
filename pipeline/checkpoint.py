"""The checkpoint store on any fsspec URL: save, commit, list, latest, load, retention, verify, and the consolidated
fp32 weights of a step. It knows files and DeepSpeed states, not models: weight formats live in pipeline.convert.

DeepSpeed writes and reads local paths only, so every rank stages its checkpoint on node-local disk and moves it
to the store itself. Layout under `RUN/checkpoints/`:

```
step-000000100/            DeepSpeed files of the step (tag = folder name), meta.json, rank_state-00000.pt ...
step-000000100/meta.json       the step's record: step, time, world_size, zero_stage, spec_hash, model_config,
                               train_state (the trainer's own JSON state, e.g. the data stream's position)
step-000000100/manifest.json   the same record plus "files": {name: {bytes, sha256}}
step-000000100/universal/  the step converted for another world size (own manifest.json), made on demand
step-000000100/_commit/    while a save is in flight: one confirmation per rank (its files, sizes, sha256)
latest                     the newest committed step's folder name
```
The manifest is the commit: written by rank 0 only after every rank has confirmed its uploads, so a step without
one (a save killed half way) does not exist for `list`, `latest` or `load`. Every file read back is checked
against the manifest's sha256 before anything deserialises it, and every file name in a manifest must be one this
store writes (`_check_names`) before it is joined onto a local folder.

Staging is private: each save and each load gets a fresh folder (mode 0700, unpredictable name) under the staging
base, made by local rank 0 of each host and shared with the host's other ranks; it is removed after success and
after failure (a killed process's folder by the next store of that host).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pipeline import deepspeed_compat, storage
from pipeline.errors import MixerError
from pipeline.units import format_size

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
META = "meta.json"
LATEST = "latest"
UNIVERSAL = "universal"
COMMIT_DIR = "_commit"
COMMIT_TIMEOUT_S = 3600.0
IO_THREADS = 8

_STEP_RE = re.compile(r"^step-(\d{9})$")
# Files that belong to one rank: ZeRO shards (zero_pp_rank_R_..., also bf16_ prefixed) and our per-rank state.
# Everything else in a step (mp_rank_00_model_states.pt, meta.json) is written and uploaded by rank 0.
_RANK_FILE_RE = re.compile(r"(?:zero_pp_rank_|rank_state-)(\d+)")
# The only names a manifest may list: what DeepSpeed 0.19 (ZeRO 0-3, bf16 or not) and this store write in a step,
# and what ds_to_universal writes in its universal form. Anything else is refused before it is joined onto a path.
_STEP_FILE_RE = re.compile(r"meta\.json|rank_state-\d{5}\.pt|mp_rank_\d{2,}_model_states\.pt"
                           r"|(?:bf16_)?zero_pp_rank_\d+_mp_rank_\d{2,}_optim_states\.pt"
                           r"|zero_pp_rank_\d+_mp_rank_\d{2,}_model_states\.pt")
_UNIVERSAL_FILE_RE = re.compile(r"mp_rank_\d{2,}_model_states\.pt|zero_pp_rank_\d+_mp_rank_\d{2,}_model_states\.pt"
                                r"|zero/optimizer_state\.pt"
                                r"|zero/[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*/(?:fp32|exp_avg|exp_avg_sq|step)\.pt")
# Staging folders: mkdtemp(prefix=...) names, so that a host can tell a dead process's leftovers from live ones.
_ATTEMPT_RE = re.compile(r"mixer-(?:save|load)-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+")


class CheckpointError(MixerError):
    """A checkpoint that cannot be saved or loaded; the message names the step or file and what to do."""


class _Damaged(CheckpointError):
    """A step whose files do not match its manifest (or whose manifest is unreadable): load may skip it."""


@dataclass
class StepRecord:
    """What a step says about itself: written as meta.json and, with the list of files, as manifest.json."""

    step: int
    world_size: int
    zero_stage: int
    time: str = ""
    spec_hash: str | None = None
    model_config: dict[str, Any] | None = None
    train_state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> StepRecord:
        return cls(**{f.name: manifest[f.name] for f in fields(cls) if f.name in manifest})


@dataclass
class CheckpointInfo:
    step: int
    url: str
    time: str
    bytes: int
    world_size: int
    zero_stage: int
    verified: bool | None


def step_name(step: int) -> str:
    return f"step-{step:09d}"


def rank_state_name(rank: int) -> str:
    return f"rank_state-{rank:05d}.pt"


def checkpoints_url(url: str) -> str:
    """The checkpoints folder of a run: `url` itself when it is one already (`.../checkpoints`), else its child."""
    url = url.rstrip("/")
    return url if posixpath.basename(url) == "checkpoints" else storage.join(url, "checkpoints")


class CheckpointStore:
    """Checkpoints of one run. `run_url` is the run (RUN) or its checkpoints folder (RUN/checkpoints).

    `staging_dir` must be node-local disk with room for one checkpoint of this node's ranks, owned by this user and
    writable by no one else (created 0700 if missing); each save and load makes its own private folder in it. The
    default is the system temp directory. `lease` (a pipeline.lease.Lease, held by rank 0): once it is lost, the
    next save refuses to write."""

    def __init__(self, run_url: str, *, keep_last: int = 3, keep_every: int | None = None,
                 staging_dir: str | None = None, lease: Any = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        if keep_every is not None and keep_every < 1:
            raise ValueError(f"keep_every must be a positive number of steps or None, got {keep_every}")
        self.url = checkpoints_url(run_url)
        self.keep_last = keep_last
        self.keep_every = keep_every
        # Checked (owner, mode) and used by local rank 0 of each host at every save and load, not here: the store
        # is also built where nothing is staged (listing, preflight).
        self.staging_base = staging_dir
        self.lease = lease
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._node_cache: tuple[int, int] | None = None
        self._host_ranks: list[int] = []
        self._last_save_bytes = 0  # what this rank staged at its previous save: the next one's space estimate

    # ---- reading the store --------------------------------------------------------------------------------------

    def step_url(self, step: int) -> str:
        return storage.join(self.url, step_name(step))

    def list(self, verify: bool = False) -> list[CheckpointInfo]:
        """Committed steps, oldest first. `verify` re-reads every file and checks its sha256 against the manifest."""
        infos = []
        for step in _scan(self.url)[0]:
            url = self.step_url(step)
            manifest = _read_manifest(url)
            infos.append(CheckpointInfo(
                step=step, url=url, time=manifest["time"],
                bytes=sum(f["bytes"] for f in manifest["files"].values()),
                world_size=manifest["world_size"], zero_stage=manifest["zero_stage"],
                verified=not _verify_remote(url, manifest) if verify else None,
            ))
        return infos

    def record(self, step: int) -> StepRecord:
        """The record of a committed step, from its manifest."""
        return StepRecord.from_manifest(_read_manifest(self.step_url(step)))

    def latest(self) -> int | None:
        committed = _scan(self.url)[0]
        return committed[-1] if committed else None

    # ---- saving -------------------------------------------------------------------------------------------------

    def save(self, engine: Any, record: StepRecord, rank_state: dict | None = None) -> None:
        """Collective: every rank calls it with the same record. Writes the checkpoint to local staging (the only
        part the training step waits for), then uploads this rank's files in a background thread; rank 0's thread
        commits the step once every rank has confirmed. At most one save is in flight: this first waits for the
        previous one. `rank_state` (this rank's own tensors and numbers) is loaded back with weights_only."""

        nonce, need = self._start_save(engine)
        rank, world = _rank_world()
        # The store's own copy, with what only the store knows filled in: the upload thread builds the manifest
        # from it later, whatever the caller does with its record meanwhile. Serialised before any collective,
        # so that a record that is not JSON fails on every rank alike.
        record = dataclasses.replace(record, time=_utc_now(), world_size=world,
                                     zero_stage=int(engine.zero_optimization_stage()),
                                     train_state=copy.deepcopy(record.train_state))
        meta = json.dumps(asdict(record), indent=2)
        own_state = None if rank_state is None else _weights_only_bytes(rank_state)
        tag = step_name(record.step)
        root = self._attempt_dir("save", need)
        local_dir = os.path.join(root, tag)
        try:
            if self._node()[0] == 0:
                os.mkdir(local_dir, 0o700)
            if rank == 0:
                _uncommit_if_present(self.step_url(record.step))
            _barrier()
            engine.save_checkpoint(root, tag=tag, save_latest=False,
                                   client_state=deepspeed_compat.universal_info_client_state())
            if own_state is not None:
                with open(os.path.join(local_dir, rank_state_name(rank)), "wb") as f:
                    f.write(own_state)
            if rank == 0:
                with open(os.path.join(local_dir, META), "w") as f:
                    f.write(meta)
                _remove_all_but(root, tag)  # DeepSpeed's recovery scripts, written next to the tag: not a step's
        except BaseException:
            if self._node()[0] == 0:
                shutil.rmtree(root, ignore_errors=True)
            raise
        files = [name for name in _walk(local_dir) if _owner(name) == rank]
        self._last_save_bytes = sum(os.path.getsize(os.path.join(local_dir, n)) for n in files)
        # Every rank's files are in place before any upload thread may empty (and remove) the host's folder.
        _barrier()
        self._thread = threading.Thread(target=self._upload, args=(record, local_dir, files, nonce),
                                        name=f"checkpoint-upload-{tag}")
        self._thread.start()

    def _start_save(self, engine: Any) -> tuple[str, int]:
        """Wait for the previous save; refuse to go on if any rank's failed or rank 0 lost the run's lease. Returns
        the save's nonce (rank 0's, on every rank, so that stale confirmations of a killed save never count) and
        the bytes this host's ranks will stage."""
        previous = self._join()
        lost = self.lease.problem() if self.lease is not None else None
        status = _all_gather((None if previous is None else f"{type(previous).__name__}: {previous}",
                              uuid.uuid4().hex, self._last_save_bytes, lost))
        failed = [f"rank {r}: {err}" for r, (err, *_) in enumerate(status) if err]
        if failed:
            raise CheckpointError(f"{self.url}: the previous checkpoint upload failed ({'; '.join(failed)}); "
                                  "fix the store's access or space and resume from the last committed step")
        lease_lost = next((s[3] for s in status if s[3]), None)
        if lease_lost:
            raise CheckpointError(f"{lease_lost}; this run stops writing checkpoints to {self.url}, which another run "
                                  "now owns")
        return status[0][1], self._space_needed(engine, [s[2] for s in status])

    def check_staging(self, engine: Any) -> None:
        """Collective: make (and remove) one staging folder as a save would, so that a staging folder that is not
        private, not writable or too small for one save of `engine` is reported before the first step, not at the
        first checkpoint hours later."""
        need = self._space_needed(engine, [0] * _rank_world()[1])
        path = self._attempt_dir("save", need)
        _barrier()
        if self._node()[0] == 0:
            shutil.rmtree(path, ignore_errors=True)

    def _space_needed(self, engine: Any, last_bytes: list[int]) -> int:
        """Bytes this host's ranks stage for one save: what they staged last time, else an estimate from the
        engine (the module once, plus fp32 weights and two Adam moments, split over the ranks under ZeRO); 10 %
        on top for what pickling adds."""
        _, world = _rank_world()
        self._node()
        last = [last_bytes[r] for r in self._host_ranks]
        if all(last):
            return int(1.1 * sum(last))
        module = getattr(engine, "module", None)
        if module is None:
            return 0
        numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())
        module_bytes = sum(int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in module.parameters())
        module_bytes += sum(b.numel() * b.element_size() for b in module.buffers())
        share = len(self._host_ranks) / world if int(engine.zero_optimization_stage()) else 1.0
        return int(1.1 * (module_bytes + 12 * numel * share))

    def wait(self) -> None:
        """Block until this rank's in-flight upload (and on rank 0 the commit) is done; re-raise its error."""
        error = self._join()
        if error is not None:
            raise CheckpointError(f"{self.url}: checkpoint upload failed: {error}") from error

    def _join(self) -> BaseException | None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        return error

    def _upload(self, record: StepRecord, local_dir: str, files: list[str], nonce: str) -> None:
        # Runs in the background thread: no collectives here, only storage calls.
        rank, world = _rank_world()
        step_url = self.step_url(record.step)
        confirmation = storage.join(step_url, COMMIT_DIR, f"{nonce}-{rank:05d}.json")
        try:
            try:
                unknown = [n for n in files if _name_problem(n, universal=False)]
                if unknown:
                    # Committed, the step would be refused on load: fail the save instead, naming the file.
                    raise CheckpointError(f"{local_dir}/{unknown[0]}: DeepSpeed wrote a file this store does not "
                                          "know; check the DeepSpeed version against pipeline/deepspeed_compat.py")
                entries = _put_files(local_dir, files, step_url)
            except BaseException as e:
                storage.write_json_atomic(confirmation, {"rank": rank, "error": f"{type(e).__name__}: {e}"})
                raise
            finally:
                # Uploaded or not, this rank's files leave staging; the host's last rank out removes the folder.
                for name in files:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(local_dir, name))
                _remove_empty_dirs(os.path.dirname(local_dir))
            storage.write_json_atomic(confirmation, {"rank": rank, "files": entries})
            if rank == 0:
                self._commit(record, nonce, world)
        except BaseException as e:
            log.error("checkpoint %s: upload from rank %d failed: %s", step_name(record.step), rank, e)
            self._error = e

    def _commit(self, record: StepRecord, nonce: str, world: int) -> None:
        step_url = self.step_url(record.step)
        confirmations = _wait_for_confirmations(storage.join(step_url, COMMIT_DIR), nonce, world)
        files: dict[str, dict] = {}
        for r, c in enumerate(confirmations):
            if "error" in c:
                raise CheckpointError(f"{step_url}: rank {r} could not upload its files: {c['error']}")
            files.update(c["files"])
        storage.write_json_atomic(storage.join(step_url, MANIFEST),
                                  {**asdict(record), "files": dict(sorted(files.items()))})
        log.info("checkpoint %s committed (%d files, %.1f MB)", step_url, len(files),
                 sum(f["bytes"] for f in files.values()) / 1e6)
        # The manifest is the commit: from here on the step exists for list, latest and load (they read manifests,
        # not `latest`). What follows only tidies up and is done again by the next commit, so a failure is a warning
        # and never fails this save or the next.
        try:
            storage.remove(storage.join(step_url, COMMIT_DIR), recursive=True)
            committed, uncommitted = _scan(self.url)
            storage.write_bytes_atomic(storage.join(self.url, LATEST), (step_name(committed[-1]) + "\n").encode())
            self._retain(committed, uncommitted)
        except Exception as e:
            log.warning("checkpoint %s is committed, but tidying up after it failed (%s: %s); `latest` or retention "
                        "may lag until the next commit", step_url, type(e).__name__, e)

    def _retain(self, committed: list[int], uncommitted: list[int]) -> None:
        """Keep the last keep_last committed steps and every keep_every-th one; drop the rest, and any uncommitted
        step older than the newest committed one (a save that died half way)."""
        keep = set(committed[-self.keep_last:])
        if self.keep_every:
            keep |= {s for s in committed if s % self.keep_every == 0}
        for step in committed:
            if step not in keep:
                # The manifest goes first: a deletion interrupted half way leaves an uncommitted step, never a
                # committed one with missing files.
                self._drop(step, [MANIFEST, ""], "checkpoint %s removed (retention)")
        for step in uncommitted:
            if committed and step < committed[-1]:
                self._drop(step, [""], "uncommitted checkpoint %s removed")

    def _drop(self, step: int, parts: list[str], done: str) -> None:
        """Delete `parts` of a step folder ("" is the folder itself), in order. A failure (after storage's retries)
        is a warning: the step is left for the next commit's retention, and the others still go."""
        step_url = self.step_url(step)
        try:
            for part in parts:
                storage.remove(storage.join(step_url, part) if part else step_url, recursive=not part)
        except Exception as e:
            log.warning("retention: could not remove %s (%s: %s); the next commit tries again", step_url,
                        type(e).__name__, e)
            return
        log.info(done, step_name(step))

    # ---- loading ------------------------------------------------------------------------------------------------

    def load(self, engine: Any, step: int | None = None, *,
             url: str | None = None) -> tuple[StepRecord, dict | None]:
        """Collective. Load the newest committed step (or `step`, or the step folder `url` of any run; a run URL
        there means its newest step). Every file is checked against the manifest before it is deserialised; with
        no explicit step a damaged step is skipped for the previous committed one, with a warning. A checkpoint of
        another world size is converted once to a universal checkpoint, stored next to the step.
        Returns (the step's record, this rank's rank_state or None when the world size changed)."""
        rank, _ = _rank_world()
        found: tuple[Any, ...] = (None, False, None)
        if rank == 0:
            try:
                found = (*_candidates(self.url, step, url), None)
            except CheckpointError as e:  # every rank must hear of it, not wait in the broadcast
                found = (None, False, str(e))
        candidates, fallback, error = _broadcast(found)
        if error:
            raise CheckpointError(error)
        failures = []
        for i, step_url in enumerate(candidates):
            try:
                return self._load_step(engine, step_url)
            except _Damaged as e:
                if not fallback or i == len(candidates) - 1:
                    if failures:
                        raise CheckpointError(f"{e} (also skipped: {'; '.join(failures)})") from e
                    raise
                failures.append(str(e))
                log.warning("%s; falling back to the previous committed checkpoint %s", e, candidates[i + 1])
        raise AssertionError("unreachable: _candidates never returns an empty list")

    def _load_step(self, engine: Any, step_url: str) -> tuple[StepRecord, dict | None]:
        rank, world = _rank_world()
        local_rank, local_world = self._node()
        manifest, error = None, None
        if rank == 0:
            try:
                manifest = _read_manifest(step_url)
            except CheckpointError as e:
                error = e
        manifest, error = _broadcast((manifest, error))
        if error:
            raise error
        stage = int(engine.zero_optimization_stage())
        if manifest["zero_stage"] != stage:
            # A universal checkpoint keeps the source's model-state file layout, which another stage cannot read.
            raise CheckpointError(f"{step_url}: saved with ZeRO stage {manifest['zero_stage']} but this engine runs "
                                  f"stage {stage}; resume with deepspeed zero_stage {manifest['zero_stage']}")
        tag = step_name(manifest["step"])
        load_root = self._attempt_dir("load")
        try:
            # Without ZeRO nothing is partitioned: any world size reads the files as they are.
            same_layout = manifest["world_size"] == world or stage == 0
            shared = sorted(n for n in manifest["files"] if not n.startswith("rank_state-"))
            mine = shared[local_rank::local_world]
            same_world = manifest["world_size"] == world
            own = rank_state_name(rank) if same_world and rank_state_name(rank) in manifest["files"] else None
            if own:
                mine.append(own)
            _raise_any(_all_gather(_fetch(step_url, manifest, mine, os.path.join(load_root, tag))))
            # Before DeepSpeed touches the engine: a refused rank_state leaves it as it was, on every rank.
            rank_state, refused = _load_rank_state(os.path.join(load_root, tag), own, step_url)
            _raise_any(_all_gather([refused] if refused else []))
            if same_layout:
                tag_loaded = tag
            else:
                tag_loaded = self._universal(step_url, manifest, load_root, tag)
            if deepspeed_compat.load_checkpoint(engine, load_root, tag_loaded, universal=not same_layout) is None:
                raise CheckpointError(f"{load_root}/{tag_loaded}: DeepSpeed found no checkpoint to load")
            log.info("loaded checkpoint %s%s", step_url, "" if same_layout else " (universal)")
            return StepRecord.from_manifest(manifest), rank_state
        finally:
            _barrier()
            if local_rank == 0:
                shutil.rmtree(load_root, ignore_errors=True)

    def _universal(self, step_url: str, manifest: dict, load_root: str, tag: str) -> str:
        """Make sure the step's universal form exists in the store (rank 0 converts it, once), then fetch it."""
        rank, _ = _rank_world()
        local_rank, local_world = self._node()
        universal_url = storage.join(step_url, UNIVERSAL)
        universal_tag = f"{tag}-universal"
        out = os.path.join(load_root, universal_tag)
        result = (None, None)
        if rank == 0:
            try:
                if not storage.exists(storage.join(universal_url, MANIFEST)):
                    log.info("converting %s (world size %d, ZeRO %d) to a universal checkpoint", step_url,
                             manifest["world_size"], manifest["zero_stage"])
                    deepspeed_compat.to_universal(os.path.join(load_root, tag), out)
                    files = _walk(out)
                    entries = _put_files(out, files, universal_url)
                    storage.write_json_atomic(storage.join(universal_url, MANIFEST),
                                              {"step": manifest["step"], "time": _utc_now(),
                                               "world_size": manifest["world_size"],
                                               "zero_stage": manifest["zero_stage"], "files": entries})
                result = (_read_manifest(universal_url), None)
            except Exception as e:
                result = (None, f"{step_url}: conversion to a universal checkpoint failed: {type(e).__name__}: {e}")
        universal_manifest, error = _broadcast(result)
        if error:
            raise CheckpointError(error)
        names = sorted(universal_manifest["files"])[local_rank::local_world]
        _raise_any(_all_gather(_fetch(universal_url, universal_manifest, names, out)))
        return universal_tag

    def _node(self) -> tuple[int, int]:
        """(this rank's index among the ranks on its host, how many ranks share the host)."""
        if self._node_cache is None:
            rank, _ = _rank_world()
            hosts = _all_gather(socket.gethostname())
            same = [r for r, h in enumerate(hosts) if h == hosts[rank]]
            self._node_cache, self._host_ranks = (same.index(rank), len(same)), same
        return self._node_cache

    def _attempt_dir(self, kind: str, need: int = 0) -> str:
        """Collective: a fresh private folder for one save or load ("save"/"load"). Local rank 0 of each host makes
        it (mkdtemp: 0700, a name no one can guess or take first) and checks that `need` bytes are free there; the
        host's other ranks get its path, since DeepSpeed expects them to share one folder, and check it too. Any
        problem on any rank is raised on every rank."""
        local_rank, _ = self._node()
        host = socket.gethostname()
        path, problem = None, None
        if local_rank == 0:
            try:
                base = _private_base(self.staging_base)
                _sweep_dead_attempts(base, host)
                path = tempfile.mkdtemp(prefix=f"mixer-{kind}-{host}-{os.getpid()}-", dir=base)
                if need:
                    _check_space(path, need, kind)
            except CheckpointError as e:
                problem = str(e)
            except OSError as e:
                problem = (f"{self.staging_base or tempfile.gettempdir()}: cannot make a staging folder there "
                           f"({type(e).__name__}: {e}); set checkpoint.staging_dir to a node-local folder of yours")
        made = _all_gather((host, path))
        if local_rank != 0:
            path = next((p for h, p in made if h == host and p), None)
            problem = _private_problem(path, "staging folder", 0o077) if path else None
        problems = [p for p in _all_gather(problem) if p]
        if problems:
            if local_rank == 0 and path:
                shutil.rmtree(path, ignore_errors=True)
            raise CheckpointError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        return path


# ---- consolidated weights ---------------------------------------------------------------------------------------

def consolidated_state_dict(src: str) -> tuple[dict[str, Any], StepRecord]:
    """The fp32 weights of a checkpoint, its ZeRO shards gathered, and the step's record (whose `model_config`
    rebuilds the model). `src` is a run URL (its newest committed step) or a step URL. Every file is checked
    against the manifest before DeepSpeed reads it."""
    step_url = _resolve_step(src)
    manifest = _read_manifest(step_url)
    record = StepRecord.from_manifest(manifest)
    tag = step_name(record.step)
    with tempfile.TemporaryDirectory(prefix="mixer-weights-") as tmp:
        names = [n for n in manifest["files"] if not n.startswith("rank_state-")]
        _raise_any([_fetch(step_url, manifest, names, os.path.join(tmp, tag))])
        return deepspeed_compat.fp32_state_dict(tmp, tag, record.zero_stage), record


def _resolve_step(src: str) -> str:
    """A step URL as given, or the newest committed step of a run URL."""
    src = src.rstrip("/")
    if storage.exists(storage.join(src, MANIFEST)):
        return src
    url = checkpoints_url(src)
    committed = _scan(url)[0]
    if not committed:
        raise CheckpointError(f"{src}: neither a committed step folder (no {MANIFEST}) nor a run with committed "
                              f"checkpoints under {url}")
    return storage.join(url, step_name(committed[-1]))


def _candidates(url: str, step: int | None, src: str | None) -> tuple[list[str], bool]:
    """The step URLs to try in order, and whether a damaged one may be skipped for the next."""
    if src is not None and step is not None:
        raise ValueError("load(): give either step or url, not both")
    if src is not None:
        src = src.rstrip("/")
        if storage.exists(storage.join(src, MANIFEST)):
            return [src], False
        url = checkpoints_url(src)
    committed = _scan(url)[0]
    if step is not None:
        if step not in committed:
            raise CheckpointError(f"{url}: no committed checkpoint for step {step}; committed: "
                                  f"{committed or 'none'}")
        return [storage.join(url, step_name(step))], False
    if not committed:
        raise CheckpointError(f"{src or url}: no committed checkpoint to load (a step counts once its {MANIFEST} "
                              "exists); start without resuming or point at another run")
    return [storage.join(url, step_name(s)) for s in reversed(committed)], True


# ---- the store's folder -------------------------------------------------------------------------------------------

def _scan(url: str) -> tuple[list[int], list[int]]:
    """(committed steps, uncommitted step folders), both ascending. The listing and the existence checks retry
    brief faults (storage): a fault must never make a committed step look uncommitted, which retention deletes."""
    try:
        names = storage.ls(url)
    except FileNotFoundError:
        return [], []
    steps = sorted(int(m.group(1)) for n in names if (m := _STEP_RE.match(posixpath.basename(n.rstrip("/")))))
    with ThreadPoolExecutor(IO_THREADS) as pool:
        has_manifest = list(pool.map(lambda s: storage.exists(storage.join(url, step_name(s), MANIFEST)), steps))
    return [s for s, ok in zip(steps, has_manifest, strict=True) if ok], \
        [s for s, ok in zip(steps, has_manifest, strict=True) if not ok]


def _read_manifest(step_url: str) -> dict:
    url = storage.join(step_url, MANIFEST)
    try:
        manifest = storage.read_json(url)  # brief faults and cut reads are retried there
    except FileNotFoundError as e:
        raise _Damaged(f"{step_url}: not a committed checkpoint ({MANIFEST} is missing)") from e
    except json.JSONDecodeError as e:
        raise _Damaged(f"{url}: unreadable manifest ({e})") from e
    except OSError as e:
        # The store did not answer within the retry budget: not damage (no falling back to an older step), and a
        # CheckpointError so that a collective caller passes it to every rank instead of leaving them waiting.
        raise CheckpointError(f"{url}: cannot read the manifest ({type(e).__name__}: {e}); the store did not "
                              "answer within run.io_retry_s") from e
    missing = [k for k in ("step", "time", "world_size", "zero_stage", "files") if k not in manifest]
    if missing:
        raise _Damaged(f"{url}: manifest lacks {', '.join(missing)}")
    _check_names(manifest, url)
    return manifest


def _check_names(manifest: dict, url: str) -> None:
    """Refuse a manifest (at `url`) that lists a file this store never writes. Every name is later joined onto a
    local folder on every node that loads, evaluates, exports or initialises from the step, so `../../x` or `/x`
    would write anywhere; a universal manifest (under `universal/`) has ds_to_universal's layout."""
    files = manifest["files"]
    if not isinstance(files, dict):
        raise _Damaged(f"{url}: manifest 'files' of step {manifest['step']} is not a mapping of file names")
    universal = posixpath.basename(posixpath.dirname(url)) == UNIVERSAL
    for name, entry in files.items():
        problem = _name_problem(name, universal)
        if problem is None and not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                                    and isinstance(entry.get("sha256"), str)):
            problem = "its entry lacks an integer 'bytes' or a 'sha256'"
        if problem:
            raise _Damaged(f"{url}: refused file {name!r} of step {manifest['step']}: {problem}; the manifest was "
                           "altered or not written by this trainer: load another step")


def _path_problem(name: Any) -> str | None:
    """Why `name` could leave the folder it is joined onto, or None."""
    if not isinstance(name, str) or not name:
        return "not a file name"
    if "\\" in name or "\0" in name:
        return "it contains a backslash or NUL"
    if name.startswith("/") or os.path.isabs(name):
        return "it is an absolute path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "it climbs out of the step folder ('..') or has empty parts"
    return None


def _name_problem(name: Any, universal: bool) -> str | None:
    """Why `name` is not a file of a step (or of its universal form), or None."""
    problem = _path_problem(name)
    if problem is None and not (_UNIVERSAL_FILE_RE if universal else _STEP_FILE_RE).fullmatch(name):
        problem = ("not a file DeepSpeed or this trainer writes there (" +
                   ("mp_rank_00_model_states.pt, zero/optimizer_state.pt, zero/<parameter>/fp32.pt ..."
                    if universal else "meta.json, rank_state-00000.pt, mp_rank_00_model_states.pt, "
                    "[bf16_]zero_pp_rank_0_mp_rank_00_optim_states.pt ...") + ")")
    return problem


def _outside(root: str, name: str, url: str) -> str | None:
    """The refusal of a name whose local path would not stay under `root`, checked where names are joined."""
    problem = _path_problem(name)
    if problem is None:
        real_root = os.path.realpath(root)
        if os.path.commonpath([real_root, os.path.realpath(os.path.join(root, name))]) != real_root:
            problem = f"it resolves outside {root}"
    return None if problem is None else f"{url}/{name}: refused file name: {problem}; load another step"


def _load_rank_state(folder: str, name: str | None, step_url: str) -> tuple[dict | None, str | None]:
    """(this rank's rank_state, None), or (None, why it is refused). weights_only: tensors and plain values only,
    so that a pickle with code in it never runs."""
    import torch

    if name is None:
        return None, None
    try:
        return torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True), None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, (f"{step_url}/{name}: refused: it holds more than tensors and plain values "
                      f"({type(e).__name__}: {first}); the file was altered in the store: load another step")


# ---- private staging ----------------------------------------------------------------------------------------------

def _private_problem(path: str, what: str, forbidden: int) -> str | None:
    """Why the folder `path` is not private enough to stage checkpoints in, or None. `forbidden`: mode bits that
    must be off (0o022 for a base folder: no one else may write; 0o077 for a staging folder itself)."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"{path}: {what} cannot be checked ({type(e).__name__}: {e})"
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a folder"
    elif st.st_uid != os.geteuid():
        problem = f"belongs to uid {st.st_uid}, not to this process's uid {os.geteuid()}"
    elif st.st_mode & forbidden:
        problem = f"has mode {stat.S_IMODE(st.st_mode):o}, open to other users"
    else:
        return None
    return (f"{path}: {what} {problem}; refused, since another user could swap checkpoint files there between "
            "their check and their load. Use a folder of your own (mode 0700), or leave checkpoint.staging_dir unset")


def _private_base(base: str | None) -> str:
    """The folder to make staging folders in. The system temp directory by default: others may write there, but
    mkdtemp's 0700 folders with unguessable names cannot be taken or swapped in a sticky folder. A given base is
    made 0700 if missing, and must be this user's, writable by no one else, under folders no one else can rename."""
    if base is None:
        return tempfile.gettempdir()
    if not os.path.lexists(base):
        os.makedirs(base, mode=0o700)
    problem = _private_problem(base, "checkpoint.staging_dir", 0o022)
    folder = os.path.realpath(os.path.dirname(os.path.abspath(base)))
    while problem is None:
        st = os.stat(folder)
        if st.st_uid not in (0, os.geteuid()) or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            problem = (f"{base}: checkpoint.staging_dir lies under {folder}, which another user may change "
                       f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); choose a folder under your own")
        if folder == os.path.dirname(folder):
            break
        folder = os.path.dirname(folder)
    if problem:
        raise CheckpointError(problem)
    return base


def _sweep_dead_attempts(base: str, host: str) -> None:
    """Remove this user's staging folders on this host whose process is gone (killed before it could clean up)."""
    for name in os.listdir(base):
        m = _ATTEMPT_RE.fullmatch(name)
        if not m or m["host"] != host or _alive(int(m["pid"])):
            continue
        path = os.path.join(base, name)
        if _private_problem(path, "", 0o077) is None:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by process %s that no longer runs", path, m["pid"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_space(path: str, need: int, kind: str) -> None:
    free = shutil.disk_usage(path).free
    if free < need:
        raise CheckpointError(f"{path}: not enough free space to stage a checkpoint {kind}: {need} bytes "
                              f"({format_size(need)}) needed, {free} bytes ({format_size(free)}) free; free space "
                              "there or point checkpoint.staging_dir at a larger node-local disk")


def _remove_all_but(folder: str, keep: str) -> None:
    for name in os.listdir(folder):
        if name != keep:
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def _uncommit_if_present(step_url: str) -> None:
    """Saving a step again: drop its old manifest first, so it never vouches for files being replaced."""
    manifest = storage.join(step_url, MANIFEST)
    if storage.exists(manifest):
        log.warning("%s is committed already; saving it again replaces it", step_url)
        storage.remove(manifest)


def _wait_for_confirmations(commit_url: str, nonce: str, world: int) -> list[dict]:
    """Poll the commit folder until every rank's confirmation is there; listings and reads retry brief faults."""
    wanted = {f"{nonce}-{r:05d}.json": r for r in range(world)}
    deadline = time.monotonic() + COMMIT_TIMEOUT_S
    delay = 0.05
    while True:
        try:
            present = {posixpath.basename(n) for n in storage.ls(commit_url)}
        except FileNotFoundError:
            present = set()
        if present >= wanted.keys():
            break
        if time.monotonic() > deadline:
            missing = sorted(r for name, r in wanted.items() if name not in present)
            raise CheckpointError(f"{commit_url}: ranks {missing} did not confirm their uploads within "
                                  f"{COMMIT_TIMEOUT_S:.0f} s; the step stays uncommitted")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    return [storage.read_json(storage.join(commit_url, name)) for name in sorted(wanted, key=wanted.get)]


# ---- moving files ---------------------------------------------------------------------------------------------------

def _put_files(local_dir: str, names: list[str], url: str) -> dict[str, dict]:
    """Upload local_dir/name to url/name for each name, in parallel; returns {name: {bytes, sha256}}. The digests
    are computed while the uploads run, from the same local files."""
    with ThreadPoolExecutor(IO_THREADS) as pool:
        uploads = [pool.submit(storage.put_file_atomic, os.path.join(local_dir, n), storage.join(url, n))
                   for n in names]
        digests = {n: pool.submit(_local_sha256, os.path.join(local_dir, n)) for n in names}
        for upload in uploads:
            upload.result()
        return {n: {"bytes": os.path.getsize(os.path.join(local_dir, n)), "sha256": digests[n].result()}
                for n in sorted(names)}


def _fetch(url: str, manifest: dict, names: list[str], local_dir: str) -> list[str]:
    """Download url/name into local_dir/name for each name and check it against the manifest; a file already there
    with the right digest is kept. Returns the problems found (empty when all is well); a file that fails its check
    never reaches its final local name."""

    def one(name: str) -> str | None:
        if (refused := _outside(local_dir, name, url)) is not None:
            return refused
        want = manifest["files"][name]
        local = os.path.join(local_dir, name)
        if os.path.exists(local) and os.path.getsize(local) == want["bytes"] and _local_sha256(local) == want["sha256"]:
            return None
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = f"{local}.part-{uuid.uuid4().hex[:8]}"
        try:
            # Retries brief faults, and a download shorter than the object (a cut response) as one of them; what
            # is left to differ from the manifest is the stored file itself.
            storage.get_file(storage.join(url, name), tmp)
            digest = _local_sha256(tmp)
            if digest != want["sha256"]:
                return (f"{url}/{name}: sha256 {digest[:16]}... does not match the manifest's {want['sha256'][:16]}... "
                        "(the file was altered or truncated in the store); load another step")
            os.replace(tmp, local)
            return None
        except FileNotFoundError:
            return f"{url}/{name}: listed in the manifest but missing from the store; load another step"
        except OSError as e:
            # Returned, not raised: every rank has to reach the all-gather of problems, or the others wait forever.
            return (f"{url}/{name}: the store did not deliver it within run.io_retry_s ({type(e).__name__}: {e}); "
                    "the step may be intact: retry the load when the store answers again")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    with ThreadPoolExecutor(IO_THREADS) as pool:
        return [p for p in pool.map(one, names) if p]


def _verify_remote(step_url: str, manifest: dict) -> list[str]:
    """Re-read every file of a step from the store; returns the files whose size or sha256 differ."""

    def bad(name: str) -> bool:
        want = manifest["files"][name]
        try:
            size, digest = storage.sha256_of(storage.join(step_url, name))
        except FileNotFoundError:
            return True
        return size != want["bytes"] or digest != want["sha256"]

    names = sorted(manifest["files"])
    with ThreadPoolExecutor(IO_THREADS) as pool:
        return [n for n, b in zip(names, pool.map(bad, names), strict=True) if b]


def _local_sha256(path: str) -> str:
    return storage.sha256_of(path)[1]


def _walk(folder: str) -> list[str]:
    """Files under folder, as sorted relative paths with '/' separators."""
    found = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            found.append(os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/"))
    return sorted(found)


def _owner(name: str) -> int:
    m = _RANK_FILE_RE.search(posixpath.basename(name))
    return int(m.group(1)) if m else 0


def _remove_empty_dirs(folder: str) -> None:
    # Other ranks of this host may still be uploading from the same folder: only empty folders go, and a folder
    # that is not empty yet is left to the last rank to finish.
    for dirpath, _, _ in sorted(os.walk(folder, topdown=False), key=lambda w: -len(w[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


def _raise_any(problems_per_rank: list[list[str]]) -> None:
    problems = [p for ps in problems_per_rank for p in ps]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise _Damaged(problems[0] + more)


def _weights_only_bytes(state: dict) -> bytes:
    """`state` saved with torch.save, once it is known to load back with weights_only: a rank state holding more
    than tensors and plain values is refused at save time, on the rank that made it, not at a resume."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    except Exception as e:
        raise CheckpointError(f"rank_state holds more than tensors and plain values ({type(e).__name__}: {e}); "
                              "it would not load back with weights_only") from e
    return buf.getvalue()


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- torch.distributed, or a single process without it ----------------------------------------------------------

def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank_world() -> tuple[int, int]:
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def _barrier() -> None:
    dist = _dist()
    if dist:
        dist.barrier()


def _all_gather(obj: Any) -> list[Any]:
    dist = _dist()
    if not dist:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    dist = _dist()
    if not dist:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
