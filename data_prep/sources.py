"""Listing the raw images of a source, and reading one image's bytes back, through fsspec URLs.

Three layouts:
- `imagefolder`: `ROOT/<class>/<image>` (images may sit deeper inside the class folder);
- `i21k-tars`: the ImageNet-21k release, `ROOT/<synset>.tar` holding that class's JPEGs; members are listed with
  `tarfile` over a remote file object and later read by byte range, nothing is extracted to disk;
- `manifest`: a JSONL, CSV or Parquet file with one row per image: a path column (relative to the manifest's folder
  or a full URL) and a label column (a name, an index, or a list of them); any other column is kept as metadata.

Class indices follow the sorted class names unless a classes file (one name per line) fixes them, e.g. to match an
existing head. The listing is sorted by each input's stable name, so a plan built from it does not depend on the
order in which storage returned the files.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import tarfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fsspec.core import url_to_fs

from data_prep.images import Rejected
from pipeline import storage
from pipeline.errors import MixerError

LAYOUTS = ("imagefolder", "i21k-tars", "manifest")
MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")
PATH_COLUMNS = ("path", "url", "image", "file", "filename")
LABEL_COLUMNS = ("labels", "label", "classes", "class")
# A CSV cell holds several labels separated by this character.
CSV_LABEL_SEPARATOR = "|"


class SourceError(MixerError):
    """A source that cannot be listed; the message names the URL and what to change."""


@dataclass(slots=True)
class Item:
    source: str  # stable name relative to the source: shown in rejected.jsonl and in the sample's metadata
    url: str  # fsspec URL holding the bytes
    labels: tuple[int, ...]
    size: int = -1  # bytes, -1 when the listing does not say (manifests)
    offset: int = -1  # start of the bytes inside `url` (tar members); -1: the whole file
    fields: dict[str, Any] | None = None  # manifest columns kept as metadata


@dataclass
class Listing:
    layout: str
    classes: list[str]
    multi_label: bool
    items: list[Item]
    rejected: list[dict[str, str]] = field(default_factory=list)  # inputs refused while listing
    notes: list[str] = field(default_factory=list)  # files deliberately left out, said out loud

    @property
    def inputs(self) -> int:
        return len(self.items) + len(self.rejected)


@dataclass
class _Raw:
    """An input before class names are turned into indices."""

    source: str
    url: str
    labels: list[str | int]
    size: int = -1
    offset: int = -1
    fields: dict[str, Any] | None = None


def detect_layout(url: str) -> str:
    fs, path = storage.filesystem(url)
    if fs.isfile(path):
        if path.endswith(MANIFEST_SUFFIXES):
            return "manifest"
        raise SourceError(f"{url} is a file, but a manifest must end in {', '.join(MANIFEST_SUFFIXES)}")
    if not fs.isdir(path):
        raise SourceError(f"{url}: no such file or folder")
    entries = fs.ls(path, detail=True)
    tars = [e for e in entries if e["type"] == "file" and e["name"].endswith(".tar")]
    folders = [e for e in entries if e["type"] == "directory"]
    if tars and not folders:
        return "i21k-tars"
    if folders and not tars:
        return "imagefolder"
    raise SourceError(
        f"{url}: cannot tell the layout ({len(tars)} .tar files and {len(folders)} folders at the top); "
        "pass --layout imagefolder|i21k-tars|manifest"
    )


def list_source(url: str, layout: str = "auto", classes_file: str | None = None) -> Listing:
    """Every input of the source with its labels, sorted by stable name; refused inputs listed with a reason."""
    url = url.rstrip("/")
    if layout == "auto":
        layout = detect_layout(url)
    if layout not in LAYOUTS:
        raise SourceError(f"unknown layout {layout!r}; choose one of auto, {', '.join(LAYOUTS)}")
    rejected: list[dict[str, str]] = []
    try:
        if layout == "imagefolder":
            raws, notes = _list_imagefolder(url)
        elif layout == "i21k-tars":
            raws, notes = _list_i21k_tars(url, rejected)
        else:
            raws, notes = _list_manifest(url)
    except FileNotFoundError as e:
        raise SourceError(f"{url}: not found while listing the {layout} layout ({e})") from e
    if not raws:
        raise SourceError(f"{url}: no inputs found for layout {layout}")
    fixed = read_classes_file(classes_file) if classes_file else None
    return _index_classes(layout, raws, fixed, rejected, notes)


def read_classes_file(url: str) -> list[str]:
    try:
        text = storage.read_bytes(url).decode()
    except FileNotFoundError as e:
        raise SourceError(f"classes file {url} does not exist") from e
    names = [line.strip() for line in text.splitlines() if line.strip()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SourceError(f"classes file {url}: names listed twice: {', '.join(duplicates[:10])}")
    if not names:
        raise SourceError(f"classes file {url} is empty; it needs one class name per line")
    return names


def read_item(item: Item) -> bytes:
    """The raw bytes of one input. A missing or forbidden file is Rejected; other I/O errors propagate so the
    shard is retried rather than the image dropped."""
    fs, path = url_to_fs(item.url)
    try:
        if item.offset < 0:
            return fs.cat_file(path)
        if item.size == 0:
            return b""  # an empty byte range means "to the end" to some stores
        data = fs.cat_file(path, start=item.offset, end=item.offset + item.size)
    except FileNotFoundError as e:
        raise Rejected("missing", f"file not found: {item.url}") from e
    except (PermissionError, IsADirectoryError) as e:
        raise Rejected("unreadable", f"{type(e).__name__}: {e}") from e
    if len(data) != item.size:
        raise Rejected("truncated", f"the tar ends {item.size - len(data)} bytes into this member")
    return data


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _list_imagefolder(url: str) -> tuple[list[_Raw], list[str]]:
    fs, root = storage.filesystem(url)
    if not fs.isdir(root):
        raise SourceError(f"{url}: no such folder; the imagefolder layout is ROOT/<class>/<image>")
    found = fs.find(root, detail=True)
    raws, hidden, loose = [], 0, 0
    for path, info in found.items():
        relative = path[len(root.rstrip("/")) + 1 :]
        if _hidden(relative):
            hidden += 1
        elif "/" not in relative:
            loose += 1
        else:
            raws.append(_Raw(relative, fs.unstrip_protocol(path), [relative.split("/", 1)[0]], int(info["size"])))
    notes = []
    if hidden:
        notes.append(f"ignored {hidden} hidden files (names starting with '.') under {url}")
    if loose:
        notes.append(f"ignored {loose} files directly under {url}: ImageFolder images live in ROOT/<class>/")
    return raws, notes


def _list_i21k_tars(url: str, rejected: list[dict[str, str]]) -> tuple[list[_Raw], list[str]]:
    fs, root = storage.filesystem(url)
    entries = fs.ls(root, detail=True)
    tars = sorted(e["name"] for e in entries if e["type"] == "file" and e["name"].endswith(".tar"))
    others = len(entries) - len(tars)
    if not tars:
        raise SourceError(f"{url}: no .tar files; the i21k-tars layout is ROOT/<synset>.tar")
    with ThreadPoolExecutor(max_workers=16) as pool:
        listed = list(pool.map(lambda path: _list_tar(fs, path), tars))
    raws = [raw for members, _ in listed for raw in members]
    rejected.extend(error for _, error in listed if error)
    notes = [f"ignored {others} entries under {url} that are not .tar files"] if others else []
    return raws, notes


def _list_tar(fs, path: str) -> tuple[list[_Raw], dict[str, str] | None]:
    name = posixpath.basename(path)
    synset = name[: -len(".tar")]
    url = fs.unstrip_protocol(path)
    raws = []
    with fs.open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if member.isreg():
                        raws.append(_Raw(f"{name}/{member.name}", url, [synset], member.size, member.offset_data))
        except tarfile.TarError as e:
            # Members listed before the damage are still good; what follows cannot be found, so say so.
            detail = f"the tar cannot be read past member {len(raws)} ({e}); later members are lost"
            return raws, {"source": f"{name}/<after member {len(raws)}>", "reason": "unreadable", "detail": detail}
        end = tar.offset
    if end + 2 * tarfile.BLOCKSIZE > fs.size(path):
        # tarfile takes a cut-off header for the end of the archive; a complete tar ends with two zero blocks.
        detail = f"the tar ends without its end-of-archive marker after member {len(raws)}; it was cut short"
        return raws, {"source": f"{name}/<after member {len(raws)}>", "reason": "truncated", "detail": detail}
    return raws, None


def _list_manifest(url: str) -> tuple[list[_Raw], list[str]]:
    rows = list(_manifest_rows(url))
    if not rows:
        raise SourceError(f"manifest {url} has no rows")
    columns = list(rows[0])
    path_col = next((c for c in PATH_COLUMNS if c in columns), None)
    label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
    if path_col is None or label_col is None:
        raise SourceError(
            f"manifest {url}: needs a path column (one of {', '.join(PATH_COLUMNS)}) and a label column "
            f"(one of {', '.join(LABEL_COLUMNS)}); found columns {', '.join(map(str, columns))}"
        )
    folder = posixpath.dirname(url)
    local = storage.is_local(url)
    is_csv = url.endswith(".csv")
    raws = []
    for number, row in enumerate(rows, start=1):
        path = row.get(path_col)
        if not path:
            raise SourceError(f"manifest {url}, row {number}: empty {path_col!r}")
        path = str(path)
        if "://" in path or (local and path.startswith("/")):
            source, item_url = path, path
        else:
            source = posixpath.normpath(path)
            item_url = storage.join(folder, source)
        labels = _parse_labels(row.get(label_col), is_csv, f"manifest {url}, row {number}")
        fields = {k: _jsonable(v) for k, v in row.items() if k not in (path_col, label_col)}
        raws.append(_Raw(source, item_url, labels, fields=fields or None))
    return raws, []


def _manifest_rows(url: str) -> Iterable[dict[str, Any]]:
    if url.endswith(".parquet"):
        import pyarrow.parquet as pq

        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f:
            yield from pq.read_table(f).to_pylist()
        return
    text = storage.read_bytes(url).decode()
    if url.endswith(".csv"):
        yield from csv.DictReader(io.StringIO(text))
        return
    for _, row in storage.json_lines(text, f"manifest {url}", SourceError):
        yield row


def _parse_labels(value: Any, is_csv: bool, where: str) -> list[str | int]:
    """Labels as names (str) or indices (int). CSV has no types, so a CSV label of digits is an index."""
    if value is None or value == "":
        return []
    if isinstance(value, str) and is_csv:
        tokens = [t.strip() for t in value.split(CSV_LABEL_SEPARATOR) if t.strip()]
        return [int(t) if t.isdigit() else t for t in tokens]
    values = value if isinstance(value, list | tuple) else [value]
    labels: list[str | int] = []
    for v in values:
        if isinstance(v, bool):
            raise SourceError(f"{where}: label {v!r} is neither a class name nor an index")
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, str | int):
            raise SourceError(f"{where}: label {v!r} is neither a class name nor an index")
        labels.append(v)
    return labels


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def _index_classes(
    layout: str, raws: list[_Raw], fixed: list[str] | None, rejected: list[dict[str, str]], notes: list[str]
) -> Listing:
    raws.sort(key=lambda r: r.source)  # stable: among duplicates, the first in source order wins
    kinds = {type(label) for r in raws for label in r.labels}
    if kinds == {str, int}:
        raise SourceError("labels mix class names and indices; use one kind throughout")
    if fixed is not None:
        classes = fixed
    elif kinds == {int}:
        classes = [str(i) for i in range(max(label for r in raws for label in r.labels) + 1)]
    else:
        classes = sorted({label for r in raws for label in r.labels})
    index = {name: i for i, name in enumerate(classes)}

    items, seen = [], set()
    for r in raws:
        if r.source in seen:
            rejected.append({"source": r.source, "reason": "duplicate", "detail": "listed more than once"})
            continue
        seen.add(r.source)
        if not r.labels:
            rejected.append({"source": r.source, "reason": "no-label", "detail": "the manifest gives it no label"})
            continue
        try:
            labels = sorted({label if isinstance(label, int) else index[label] for label in r.labels})
        except KeyError as e:
            rejected.append({"source": r.source, "reason": "unknown-class",
                             "detail": f"class {e.args[0]!r} is not in the classes file"})
            continue
        if labels[0] < 0 or labels[-1] >= len(classes):
            rejected.append({"source": r.source, "reason": "unknown-class",
                             "detail": f"label index out of range 0..{len(classes) - 1}: {labels}"})
            continue
        items.append(Item(r.source, r.url, tuple(labels), r.size, r.offset, r.fields))
    multi_label = any(len(item.labels) > 1 for item in items)
    return Listing(layout, classes, multi_label, items, rejected, notes)
