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
against the manifest's sha256 before anything deserialises it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pipeline import deepspeed_compat, storage
from pipeline.errors import MixerError

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

    `staging_dir` must be node-local disk with room for one checkpoint of this node's ranks; the default is a folder
    under the system temp directory. Ranks on the same host share it, as DeepSpeed expects."""

    def __init__(self, run_url: str, *, keep_last: int = 3, keep_every: int | None = None,
                 staging_dir: str | None = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        if keep_every is not None and keep_every < 1:
            raise ValueError(f"keep_every must be a positive number of steps or None, got {keep_every}")
        self.url = checkpoints_url(run_url)
        self.keep_last = keep_last
        self.keep_every = keep_every
        base = staging_dir or os.path.join(tempfile.gettempdir(), "mixer-checkpoints",
                                           hashlib.sha1(self.url.encode()).hexdigest()[:12])
        # The host name keeps nodes apart even when staging_dir happens to be on a shared file system.
        self.staging = os.path.join(base, socket.gethostname())
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._node_cache: tuple[int, int] | None = None

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
        import torch

        nonce = self._start_save()
        rank, _ = _rank_world()
        record.time = _utc_now()
        tag = step_name(record.step)
        root = os.path.join(self.staging, "save")
        local_dir = os.path.join(root, tag)
        if self._node()[0] == 0:
            if os.path.exists(local_dir):
                shutil.rmtree(local_dir)
            os.makedirs(local_dir)
        if rank == 0:
            _uncommit_if_present(self.step_url(record.step))
        _barrier()
        engine.save_checkpoint(root, tag=tag, save_latest=False,
                               client_state=deepspeed_compat.universal_info_client_state())
        if rank_state is not None:
            torch.save(rank_state, os.path.join(local_dir, rank_state_name(rank)))
        if rank == 0:
            with open(os.path.join(local_dir, META), "w") as f:
                json.dump(asdict(record), f, indent=2)
        files = [name for name in _walk(local_dir) if _owner(name) == rank]
        self._thread = threading.Thread(target=self._upload, args=(record, local_dir, files, nonce),
                                        name=f"checkpoint-upload-{tag}")
        self._thread.start()

    def _start_save(self) -> str:
        """Wait for the previous save; refuse to go on if any rank's failed. Returns the save's nonce (rank 0's, on
        every rank, so that stale confirmations of a killed save never count)."""
        previous = self._join()
        status = _all_gather((None if previous is None else f"{type(previous).__name__}: {previous}",
                              uuid.uuid4().hex))
        failed = [f"rank {r}: {err}" for r, (err, _) in enumerate(status) if err]
        if failed:
            raise CheckpointError(f"{self.url}: the previous checkpoint upload failed ({'; '.join(failed)}); "
                                  "fix the store's access or space and resume from the last committed step")
        return status[0][1]

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
                entries = _put_files(local_dir, files, step_url)
            except BaseException as e:
                storage.write_json_atomic(confirmation, {"rank": rank, "error": f"{type(e).__name__}: {e}"})
                raise
            storage.write_json_atomic(confirmation, {"rank": rank, "files": entries})
            for name in files:
                os.remove(os.path.join(local_dir, name))
            _remove_empty_dirs(local_dir)
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
        fs, path = storage.filesystem(step_url)
        fs.rm(posixpath.join(path, COMMIT_DIR), recursive=True)
        committed, uncommitted = _scan(self.url)
        storage.write_bytes_atomic(storage.join(self.url, LATEST), (step_name(committed[-1]) + "\n").encode())
        self._retain(committed, uncommitted)
        log.info("checkpoint %s committed (%d files, %.1f MB)", step_url, len(files),
                 sum(f["bytes"] for f in files.values()) / 1e6)

    def _retain(self, committed: list[int], uncommitted: list[int]) -> None:
        """Keep the last keep_last committed steps and every keep_every-th one; drop the rest, and any uncommitted
        step older than the newest committed one (a save that died half way)."""
        keep = set(committed[-self.keep_last:])
        if self.keep_every:
            keep |= {s for s in committed if s % self.keep_every == 0}
        fs, path = storage.filesystem(self.url)
        for step in committed:
            if step not in keep:
                # The manifest goes first: a deletion interrupted half way leaves an uncommitted step, never a
                # committed one with missing files.
                fs.rm(posixpath.join(path, step_name(step), MANIFEST))
                fs.rm(posixpath.join(path, step_name(step)), recursive=True)
                log.info("checkpoint %s removed (retention)", step_name(step))
        for step in uncommitted:
            if committed and step < committed[-1]:
                fs.rm(posixpath.join(path, step_name(step)), recursive=True)
                log.info("uncommitted checkpoint %s removed", step_name(step))

    # ---- loading ------------------------------------------------------------------------------------------------

    def load(self, engine: Any, step: int | None = None, *,
             url: str | None = None) -> tuple[StepRecord, dict | None]:
        """Collective. Load the newest committed step (or `step`, or the step folder `url` of any run; a run URL
        there means its newest step). Every file is checked against the manifest before it is deserialised; with
        no explicit step a damaged step is skipped for the previous committed one, with a warning. A checkpoint of
        another world size is converted once to a universal checkpoint, stored next to the step.
        Returns (the step's record, this rank's rank_state or None when the world size changed)."""
        rank, _ = _rank_world()
        candidates, fallback = None, False
        if rank == 0:
            candidates, fallback = _candidates(self.url, step, url)
        candidates, fallback = _broadcast((candidates, fallback))
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
        import torch

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
        load_root = os.path.join(self.staging, "load", hashlib.sha1(step_url.encode()).hexdigest()[:12])
        if local_rank == 0 and os.path.exists(load_root):
            shutil.rmtree(load_root)
        _barrier()
        try:
            # Without ZeRO nothing is partitioned: any world size reads the files as they are.
            same_layout = manifest["world_size"] == world or stage == 0
            shared = sorted(n for n in manifest["files"] if not n.startswith("rank_state-"))
            mine = shared[local_rank::local_world]
            same_world = manifest["world_size"] == world
            if same_world and rank_state_name(rank) in manifest["files"]:
                mine.append(rank_state_name(rank))
            _raise_any(_all_gather(_fetch(step_url, manifest, mine, os.path.join(load_root, tag))))
            if same_layout:
                tag_loaded = tag
            else:
                tag_loaded = self._universal(step_url, manifest, load_root, tag)
            if deepspeed_compat.load_checkpoint(engine, load_root, tag_loaded, universal=not same_layout) is None:
                raise CheckpointError(f"{load_root}/{tag_loaded}: DeepSpeed found no checkpoint to load")
            rank_state = None
            if same_world and rank_state_name(rank) in manifest["files"]:
                rank_state = torch.load(os.path.join(load_root, tag, rank_state_name(rank)), map_location="cpu",
                                        weights_only=True)
            log.info("loaded checkpoint %s%s", step_url, "" if same_layout else " (universal)")
            return StepRecord.from_manifest(manifest), rank_state
        finally:
            _barrier()
            if local_rank == 0 and os.path.exists(load_root):
                shutil.rmtree(load_root)

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
            self._node_cache = (same.index(rank), len(same))
        return self._node_cache


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
    """(committed steps, uncommitted step folders), both ascending."""
    fs, path = storage.filesystem(url)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return [], []
    steps = sorted(int(m.group(1)) for n in names if (m := _STEP_RE.match(posixpath.basename(n.rstrip("/")))))
    with ThreadPoolExecutor(IO_THREADS) as pool:
        has_manifest = list(pool.map(lambda s: fs.exists(posixpath.join(path, step_name(s), MANIFEST)), steps))
    return [s for s, ok in zip(steps, has_manifest, strict=True) if ok], \
        [s for s, ok in zip(steps, has_manifest, strict=True) if not ok]


def _read_manifest(step_url: str) -> dict:
    url = storage.join(step_url, MANIFEST)
    try:
        manifest = storage.read_json(url)
    except FileNotFoundError as e:
        raise _Damaged(f"{step_url}: not a committed checkpoint ({MANIFEST} is missing)") from e
    except json.JSONDecodeError as e:
        raise _Damaged(f"{url}: unreadable manifest ({e})") from e
    missing = [k for k in ("step", "time", "world_size", "zero_stage", "files") if k not in manifest]
    if missing:
        raise _Damaged(f"{url}: manifest lacks {', '.join(missing)}")
    return manifest


def _uncommit_if_present(step_url: str) -> None:
    """Saving a step again: drop its old manifest first, so it never vouches for files being replaced."""
    fs, path = storage.filesystem(step_url)
    manifest = posixpath.join(path, MANIFEST)
    if fs.exists(manifest):
        log.warning("%s is committed already; saving it again replaces it", step_url)
        fs.rm(manifest)


def _wait_for_confirmations(commit_url: str, nonce: str, world: int) -> list[dict]:
    fs, path = storage.filesystem(commit_url)
    wanted = {f"{nonce}-{r:05d}.json": r for r in range(world)}
    deadline = time.monotonic() + COMMIT_TIMEOUT_S
    delay = 0.05
    while True:
        fs.invalidate_cache(path)
        try:
            present = {posixpath.basename(n) for n in fs.ls(path, detail=False)}
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
        want = manifest["files"][name]
        local = os.path.join(local_dir, name)
        if os.path.exists(local) and os.path.getsize(local) == want["bytes"] and _local_sha256(local) == want["sha256"]:
            return None
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = f"{local}.part-{uuid.uuid4().hex[:8]}"
        try:
            fs, path = storage.filesystem(storage.join(url, name))
            fs.get_file(path, tmp)
            digest = _local_sha256(tmp)
            if digest != want["sha256"]:
                return (f"{url}/{name}: sha256 {digest[:16]}... does not match the manifest's {want['sha256'][:16]}... "
                        "(the file was altered or truncated in the store); load another step")
            os.replace(tmp, local)
            return None
        except FileNotFoundError:
            return f"{url}/{name}: listed in the manifest but missing from the store; load another step"
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
