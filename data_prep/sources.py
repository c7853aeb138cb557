"""The inputs of a source, one partition at a time, and one input's bytes read back, through fsspec URLs.

Sources are cut into partitions the way they arrive, so listing runs as many small tasks and no process ever
holds the whole listing:
- `imagefolder`: `ROOT/<class>/<image>` (images may sit deeper inside the class folder); a partition per class;
- `i21k-tars`: the ImageNet-21k release, `ROOT/<synset>.tar` holding that class's JPEGs; a partition per tar.
  Only the members' headers are read; their bytes are read later by byte range, nothing is extracted to disk;
- `wds`: existing WebDataset tars (`ROOT/*.tar`, members `<key>.<ext>` grouped by key, a `.cls` or `.json` label);
  a partition per tar, images read later by byte range like the i21k tars;
- `manifest`: one JSONL, CSV or Parquet file, or a folder (or glob) of such parts, one row per image: a path column
  (relative to the part's folder, or a full URL) and a label column (a name, an index, or a list of them); any
  other column is kept as metadata. A partition per JSONL/CSV part and per Parquet row group. A Parquet `image`
  column holding structs of `bytes` and `path` (the layout of image datasets on the Hugging Face Hub) means the
  images are inside the manifest: they are read back from their row group.

Every input is named by a stable `source` string relative to the source root, and ordered by an ordinal
(partition, row) that does not depend on how many partitions a manifest was cut into.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fsspec.core import url_to_fs

from data_prep.images import Rejected
from pipeline import storage
from pipeline.errors import MixerError

LAYOUTS = ("imagefolder", "i21k-tars", "wds", "manifest")
MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")
PATH_COLUMNS = ("path", "url", "image", "file", "filename")
LABEL_COLUMNS = ("labels", "label", "classes", "class")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
# A CSV cell holds several labels separated by this character.
CSV_LABEL_SEPARATOR = "|"
# Headers of a remote tar are read through blocks this small, so listing does not pull the members' bytes.
TAR_HEADER_BLOCK = 16 << 10
# Rough bytes per row of a part, for sizing the plan's tasks only (never for what the plan contains). A tar's rows
# are images: ImageNet-21k's 1.3 TB hold 14.2M (92 kB each); an overestimate costs the driver a reference per list
# task and bucket for nothing.
BYTES_PER_ROW = {"jsonl": 64, "csv": 32, "tar": 92_000}
ROWS_PER_CLASS_FOLDER = 1000


class SourceError(MixerError):
    """A source that cannot be listed; the message names the URL and what to change."""


@dataclass(frozen=True, slots=True)
class Partition:
    index: int  # position in the source; orders duplicates across partitions
    url: str  # the class folder, tar, or manifest part holding it
    row_group: int = -1  # Parquet parts: the row group
    rows: int = -1  # rows when known before listing (Parquet row groups), else an estimate


@dataclass(slots=True)
class Item:
    source: str  # stable name relative to the source: shown in rejected.jsonl and in the sample's metadata
    url: str  # fsspec URL holding the bytes
    labels: tuple[int, ...]
    size: int = -1  # bytes, -1 when the listing does not say (manifests)
    offset: int = -1  # start of the bytes inside `url` (tar members), or the row group (Parquet images); -1: the file
    row: int = -1  # Parquet images: the row inside the row group
    fields: dict[str, Any] | None = None  # manifest columns kept as metadata


@dataclass(slots=True)
class Raw:
    """An input as listed: labels still as names (str) or indices (int)."""

    source: str
    url: str
    labels: list[str | int]
    size: int = -1
    offset: int = -1
    row: int = -1
    fields: dict[str, Any] | None = None


@dataclass
class Listed:
    """What one partition holds."""

    raws: list[Raw]
    rejected: list[dict[str, str]] = field(default_factory=list)  # inputs refused while listing
    hidden: int = 0  # files deliberately left out (names starting with '.')
    classes: list[str] | None = None  # class names the part itself declares (Hugging Face metadata)
    table: Any = None  # the inputs as an Arrow table instead of `raws` (columns of ARROW_LISTED), when listed in bulk


@dataclass
class Partitions:
    layout: str
    parts: list[Partition]
    notes: list[str]

    def estimated_inputs(self) -> int:
        return sum(max(p.rows, 1) for p in self.parts)


def detect_layout(url: str) -> str:
    if _is_glob(url):
        return "manifest"
    fs, path = storage.filesystem(url)
    if fs.isfile(path):
        if path.endswith(MANIFEST_SUFFIXES):
            return "manifest"
        raise SourceError(f"{url} is a file, but a manifest must end in {', '.join(MANIFEST_SUFFIXES)}")
    if not fs.isdir(path):
        raise SourceError(f"{url}: no such file or folder")
    entries = fs.ls(path, detail=True)
    files = [e for e in entries if e["type"] == "file" and not _hidden(posixpath.basename(e["name"]))]
    tars = [e for e in files if e["name"].endswith(".tar")]
    parts = [e for e in files if e["name"].endswith(MANIFEST_SUFFIXES)]
    folders = [e for e in entries if e["type"] == "directory"]
    if tars and not folders and not parts:
        return "i21k-tars"
    if parts and not folders and not tars:
        return "manifest"
    if folders and not tars and not parts:
        return "imagefolder"
    raise SourceError(
        f"{url}: cannot tell the layout ({len(tars)} .tar files, {len(parts)} manifest parts and {len(folders)} "
        "folders at the top); pass --layout imagefolder|i21k-tars|wds|manifest"
    )


def partitions(url: str, layout: str = "auto") -> Partitions:
    """The source's partitions in a stable order; reads folder listings and Parquet footers, never the inputs."""
    url = url.rstrip("/")
    if layout == "auto":
        layout = detect_layout(url)
    if layout not in LAYOUTS:
        raise SourceError(f"unknown layout {layout!r}; choose one of auto, {', '.join(LAYOUTS)}")
    try:
        if layout == "imagefolder":
            parts, notes = _class_folders(url)
        elif layout in ("i21k-tars", "wds"):
            parts, notes = _tars(url, layout)
        else:
            parts, notes = _manifest_parts(url)
    except FileNotFoundError as e:
        raise SourceError(f"{url}: not found while listing the {layout} layout ({e})") from e
    return Partitions(layout, parts, notes)


def list_partition(part: Partition, layout: str) -> Listed:
    """Every input of one partition, in the partition's own order."""
    try:
        if layout == "imagefolder":
            return _list_class_folder(part)
        if layout == "i21k-tars":
            return _list_tar(part)
        if layout == "wds":
            return _list_wds_tar(part)
        return _list_manifest_part(part)
    except FileNotFoundError as e:
        raise SourceError(f"{part.url}: vanished while being listed ({e}); re-run when the source is complete") from e


def read_classes_file(url: str) -> list[str]:
    try:
        text = storage.read_bytes(url).decode()
    except FileNotFoundError as e:
        raise SourceError(f"classes file {url} does not exist") from e
    names = [line.strip() for line in text.splitlines() if line.strip()]
    seen: set[str] = set()
    duplicates = sorted({n for n in names if n in seen or seen.add(n)})
    if duplicates:
        raise SourceError(f"classes file {url}: names listed twice: {', '.join(duplicates[:10])}")
    if not names:
        raise SourceError(f"classes file {url} is empty; it needs one class name per line")
    return names


def read_item(item: Item) -> bytes:
    """The raw bytes of one input. A missing or forbidden file is Rejected; other I/O errors propagate so the
    shard is retried rather than the image dropped."""
    try:
        if item.row >= 0:
            return _read_parquet_image(*url_to_fs(item.url), item)
        if item.size == 0 and item.offset >= 0:
            return b""  # an empty byte range means "to the end" to some stores
        if is_local_path(item.url):
            with open(item.url.removeprefix("file://"), "rb") as f:
                if item.offset < 0:
                    return f.read()
                f.seek(item.offset)
                data = f.read(item.size)
        else:
            fs, path = url_to_fs(item.url)
            if item.offset < 0:
                return fs.cat_file(path)
            data = fs.cat_file(path, start=item.offset, end=item.offset + item.size)
    except FileNotFoundError as e:
        raise Rejected("missing", f"file not found: {item.url}") from e
    except (PermissionError, IsADirectoryError) as e:
        raise Rejected("unreadable", f"{type(e).__name__}: {e}") from e
    if len(data) != item.size:
        raise Rejected("truncated", f"the tar ends {item.size - len(data)} bytes into this member")
    return data


def is_local_path(url: str) -> bool:
    """A plain path or file:// URL: read with the operating system directly, no filesystem layer in between."""
    return "://" not in url or url.startswith("file://")


def _read_parquet_image(fs, path: str, item: Item) -> bytes:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        column = pq.ParquetFile(f).read_row_group(item.offset, columns=["image.bytes"]).column(0)
    value = column[item.row].as_py()
    data = value.get("bytes") if isinstance(value, dict) else value
    if data is None:
        raise Rejected("missing", f"row {item.row} of row group {item.offset} has no image bytes")
    return data


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _normal(path: str) -> bool:
    """Whether posixpath.normpath would leave a relative path as it is (most rows: skip the call)."""
    return not path.startswith(("./", "../", "/")) and "/./" not in path and "/../" not in path and "//" not in path \
        and not path.endswith(("/", "/.", "/..")) and path not in (".", "..")


def _is_glob(url: str) -> bool:
    return any(c in url for c in "*?[")


def _class_folders(url: str) -> tuple[list[Partition], list[str]]:
    fs, root = storage.filesystem(url)
    if not fs.isdir(root):
        raise SourceError(f"{url}: no such folder; the imagefolder layout is ROOT/<class>/<image>")
    entries = sorted(fs.ls(root, detail=True), key=lambda e: e["name"])
    folders = [e["name"] for e in entries if e["type"] == "directory" and not _hidden(posixpath.basename(e["name"]))]
    hidden = sum(_hidden(posixpath.basename(e["name"])) for e in entries)
    loose = sum(e["type"] != "directory" and not _hidden(posixpath.basename(e["name"])) for e in entries)
    if not folders:
        raise SourceError(f"{url}: no class folders; the imagefolder layout is ROOT/<class>/<image>")
    parts = [Partition(i, fs.unstrip_protocol(path), rows=ROWS_PER_CLASS_FOLDER) for i, path in enumerate(folders)]
    notes = []
    if hidden:
        notes.append(f"ignored {hidden} hidden entries (names starting with '.') directly under {url}")
    if loose:
        notes.append(f"ignored {loose} files directly under {url}: ImageFolder images live in ROOT/<class>/")
    return parts, notes


def _list_class_folder(part: Partition) -> Listed:
    fs, folder = url_to_fs(part.url)
    folder = folder.rstrip("/")
    root = posixpath.dirname(folder)
    name = posixpath.basename(folder)
    raws, hidden = [], 0
    for path, info in sorted(fs.find(folder, detail=True).items()):
        relative = path[len(root) + 1 :]
        if _hidden(relative):
            hidden += 1
        else:
            raws.append(Raw(relative, fs.unstrip_protocol(path), [name], int(info["size"])))
    return Listed(raws, hidden=hidden)


def _tars(url: str, layout: str) -> tuple[list[Partition], list[str]]:
    fs, root = storage.filesystem(url)
    if not fs.isdir(root):
        raise SourceError(f"{url}: no such folder; the {layout} layout is a folder of .tar files")
    entries = fs.ls(root, detail=True)
    tars = sorted((e["name"], int(e.get("size") or 0)) for e in entries
                  if e["type"] == "file" and e["name"].endswith(".tar"))
    others = len(entries) - len(tars)
    if not tars:
        shape = "ROOT/<synset>.tar" if layout == "i21k-tars" else "ROOT/*.tar"
        raise SourceError(f"{url}: no .tar files; the {layout} layout is {shape}")
    parts = [Partition(i, fs.unstrip_protocol(path), rows=max(1, size // BYTES_PER_ROW["tar"]))
             for i, (path, size) in enumerate(tars)]
    notes = [f"ignored {others} entries under {url} that are not .tar files"] if others else []
    return parts, notes


def _tar_members(part: Partition) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """The regular members of a tar, headers only; raises _TarDamage after the good ones when the tar is damaged."""
    fs, path = url_to_fs(part.url)
    count = 0
    with fs.open(path, "rb", block_size=TAR_HEADER_BLOCK) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if member.isreg():
                        count += 1
                        yield member, tar
        except tarfile.TarError as e:
            # Members listed before the damage are still good; what follows cannot be found, so say so.
            raise _TarDamage("unreadable", f"the tar cannot be read past member {count} ({e}); later members are "
                             "lost", count) from e
        end = tar.offset
    if end + 2 * tarfile.BLOCKSIZE > fs.size(path):
        # tarfile takes a cut-off header for the end of the archive; a complete tar ends with two zero blocks.
        raise _TarDamage("truncated", f"the tar ends without its end-of-archive marker after member {count}; it "
                         "was cut short", count)


class _TarDamage(Rejected):
    """A damaged tar: what is wrong, and after how many good members."""

    def __init__(self, reason: str, detail: str, count: int):
        super().__init__(reason, detail)
        self.count = count


def _damage(name: str, e: _TarDamage) -> dict[str, str]:
    return {"source": f"{name}/<after member {e.count}>", "reason": e.reason, "detail": e.detail}


def _list_tar(part: Partition) -> Listed:
    name = posixpath.basename(part.url)
    synset = name[: -len(".tar")]
    raws: list[Raw] = []
    try:
        for member, _ in _tar_members(part):
            raws.append(Raw(f"{name}/{member.name}", part.url, [synset], member.size, member.offset_data))
    except _TarDamage as e:
        return Listed(raws, [_damage(name, e)])
    return Listed(raws)


def _list_wds_tar(part: Partition) -> Listed:
    """Samples of a WebDataset tar: members grouped by key (the name up to the first dot after the last '/');
    the image member becomes the input, a `.cls` (index or name) or `.json` ("label"/"labels") gives the labels."""
    name = posixpath.basename(part.url)
    samples: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    rejected: list[dict[str, str]] = []
    try:
        for member, tar in _tar_members(part):
            folder, _, base = member.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot:
                continue
            key = f"{folder}/{stem}" if folder else stem
            if key not in samples:
                samples[key] = {}
                order.append(key)
            ext = ext.lower()
            if ext in ("cls", "json"):
                samples[key][ext] = tar.extractfile(member).read()
            elif ext in WDS_IMAGE_EXTS and "image" not in samples[key]:
                samples[key]["image"] = (member.offset_data, member.size)
    except _TarDamage as e:
        rejected.append(_damage(name, e))
    raws = []
    for key in order:
        sample, source = samples[key], f"{name}/{key}"
        if "image" not in sample:
            rejected.append({"source": source, "reason": "no-image",
                             "detail": f"no member with an image extension ({', '.join(WDS_IMAGE_EXTS)})"})
            continue
        try:
            labels = _wds_labels(sample)
        except ValueError as e:
            rejected.append({"source": source, "reason": "bad-label", "detail": str(e)})
            continue
        offset, size = sample["image"]
        raws.append(Raw(source, part.url, labels, size, offset))
    return Listed(raws, rejected)


def _wds_labels(sample: dict[str, Any]) -> list[str | int]:
    if "cls" in sample:
        text = sample["cls"].decode("utf-8", "replace").strip()
        return [int(text) if text.isdigit() else text] if text else []
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as e:
            raise ValueError(f"its .json is not JSON ({e})") from e
        for column in LABEL_COLUMNS:
            if isinstance(meta, dict) and column in meta:
                return _parse_labels(meta[column], False, "its .json")
    return []


def _manifest_parts(url: str) -> tuple[list[Partition], list[str]]:
    fs, path = storage.filesystem(url)
    if _is_glob(url):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(e["name"] for e in fs.ls(path, detail=True)
                       if e["type"] == "file" and not _hidden(posixpath.basename(e["name"])))
    elif fs.isfile(path):
        files = [path]
    else:
        raise SourceError(f"{url}: not found (no such manifest file or folder)")
    parts = [p for p in files if p.endswith(MANIFEST_SUFFIXES)]
    if not parts:
        raise SourceError(f"{url}: no manifest parts (files ending in {', '.join(MANIFEST_SUFFIXES)})")
    kinds = {p.rsplit(".", 1)[1] for p in parts}
    if len(kinds) > 1:
        raise SourceError(f"{url}: manifest parts of several formats ({', '.join(sorted(kinds))}); use one")
    others = len(files) - len(parts)
    notes = [f"ignored {others} files under {url} that are not manifest parts"] if others else []
    if kinds == {"parquet"}:
        return _row_groups(fs, parts), notes
    sizes = {p: int(fs.size(p) or 0) for p in parts}
    per_row = BYTES_PER_ROW[kinds.pop()]
    return [Partition(i, fs.unstrip_protocol(p), rows=max(1, sizes[p] // per_row)) for i, p in enumerate(parts)], notes


def _row_groups(fs, paths: list[str]) -> list[Partition]:
    import pyarrow.parquet as pq

    def groups(path: str) -> list[int]:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]

    with ThreadPoolExecutor(max_workers=16) as pool:
        counts = list(pool.map(groups, paths))
    parts = []
    for path, rows in zip(paths, counts, strict=True):
        for g, n in enumerate(rows):
            parts.append(Partition(len(parts), fs.unstrip_protocol(path), row_group=g, rows=n))
    return parts


def _list_manifest_part(part: Partition) -> Listed:
    if part.row_group >= 0:
        table, schema, embedded = _read_row_group(part)
        if not embedded and (listed := _list_table_in_bulk(part, table, schema)) is not None:
            return listed
        rows, columns, classes = _table_rows(table, schema, embedded)
    else:
        rows, columns, classes = _manifest_rows(part)
    if not columns:
        return Listed([])
    path_col = next((c for c in PATH_COLUMNS if c in columns), None)
    label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
    if path_col is None or label_col is None:
        raise SourceError(
            f"manifest {part.url}: needs a path column (one of {', '.join(PATH_COLUMNS)}) and a label column "
            f"(one of {', '.join(LABEL_COLUMNS)}); found columns {', '.join(map(str, columns))}"
        )
    folder = posixpath.dirname(part.url)
    local = storage.is_local(part.url)
    is_csv = part.url.endswith(".csv")
    where = part.url if part.row_group < 0 else f"{part.url} row group {part.row_group}"
    name = posixpath.basename(part.url)
    raws = []
    for number, row in enumerate(rows):
        value = row.get(path_col)
        embedded = isinstance(value, dict)
        path = value.get("path") if embedded else value
        labels = _parse_labels(row.get(label_col), is_csv, f"manifest {where}, row {number + 1}")
        fields = {k: _jsonable(v) for k, v in row.items() if k not in (path_col, label_col)} or None
        if embedded:
            # The image is inside this row; its own file name, when it has one, names it.
            source = str(path) if path else f"{name}/{part.row_group}/{number}"
            raws.append(Raw(source, part.url, labels, offset=part.row_group, row=number, fields=fields))
            continue
        if not path:
            raise SourceError(f"manifest {where}, row {number + 1}: empty {path_col!r}")
        path = str(path)
        if "://" in path or (local and path.startswith("/")):
            source, item_url = path, path
        else:
            source = path if _normal(path) else posixpath.normpath(path)
            item_url = f"{folder}/{source}"
        raws.append(Raw(source, item_url, labels, fields=fields))
    return Listed(raws, classes=classes)


# A path that posixpath.normpath would change, or that is absolute or a URL: such row groups are listed row by row.
SPECIAL_PATH = r"(^\.\.?/|^/|/\.\.?/|//|/\.?\.?$|^\.\.?$|://)"
ARROW_LISTED = ("source", "url", "names", "indices", "size", "offset", "row", "fields")


def _read_row_group(part: Partition) -> tuple[Any, Any, list[str]]:
    """(the row group, its file's Arrow schema, the columns holding embedded images): embedded images are left in
    the file, only their names are read while listing."""
    import pyarrow.parquet as pq

    fs, path = url_to_fs(part.url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        embedded = [n for n in schema.names if n in PATH_COLUMNS and _holds_bytes(schema.field(n).type)]
        columns = [n for n in schema.names if n not in embedded]
        columns += [f"{n}.path" for n in embedded if schema.field(n).type.get_field_index("path") >= 0]
        return pf.read_row_group(part.row_group, columns=columns), schema, embedded


def _list_table_in_bulk(part: Partition, table: Any, schema: Any) -> Listed | None:
    """A Parquet row group of plain relative paths and typed labels, listed with Arrow kernels; None when any row
    needs the row-by-row rules (absolute paths and URLs, paths to normalise, untyped labels)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    path_col = next((c for c in PATH_COLUMNS if c in schema.names), None)
    label_col = next((c for c in LABEL_COLUMNS if c in schema.names), None)
    if path_col is None or label_col is None or not pa.types.is_string(schema.field(path_col).type):
        return None
    n = len(table)
    paths, labels = table[path_col].combine_chunks(), table[label_col].combine_chunks()
    if paths.null_count or (n and pc.min(pc.utf8_length(paths)).as_py() == 0) \
            or pc.any(pc.match_substring_regex(paths, SPECIAL_PATH)).as_py():
        return None
    if pa.types.is_list(labels.type):
        values = pc.list_flatten(labels)
        if values.null_count:
            return None
        counts = pc.list_value_length(labels).fill_null(0).to_numpy(zero_copy_only=False)
        bounds = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    elif not labels.null_count:
        values = labels
        bounds = pa.array(np.arange(n + 1, dtype=np.int32))
    else:
        return None
    if pa.types.is_integer(values.type) and not pa.types.is_boolean(values.type):
        indices = pa.ListArray.from_arrays(bounds, values.cast(pa.int64()))
        names = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()))
    elif pa.types.is_string(values.type):
        names = pa.ListArray.from_arrays(bounds, values)
        indices = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.int64()))
    else:
        return None
    others = [c for c in table.column_names if c not in (path_col, label_col)]
    fields = [json.dumps({k: _jsonable(v) for k, v in row.items()}) for row in table.select(others).to_pylist()] \
        if others else [None] * n
    minus_one = pa.array(np.full(n, -1, np.int64))
    columns = [paths, pc.binary_join_element_wise(posixpath.dirname(part.url) + "/", paths, ""), names, indices,
               minus_one, minus_one, minus_one, pa.array(fields, pa.string())]
    return Listed([], table=pa.table(dict(zip(ARROW_LISTED, columns, strict=True))),
                  classes=_hugging_face_classes(schema))


def _table_rows(
    table: Any, schema: Any, embedded: list[str]
) -> tuple[list[dict[str, Any]], list[str], list[str] | None]:
    """(rows, column names, class names the file declares) of a row group read by _read_row_group."""
    rows = table.to_pylist()
    for row in rows:
        for name in embedded:
            row[name] = {"path": (row.get(name) or {}).get("path")}
    return rows, schema.names, _hugging_face_classes(schema)


def _manifest_rows(part: Partition) -> tuple[list[dict[str, Any]], list[str], list[str] | None]:
    """(rows, column names, None: no declared class names) of a JSONL or CSV manifest part."""
    text = storage.read_bytes(part.url).decode()
    if part.url.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        rows = list(reader)
        return rows, list(reader.fieldnames or []), None
    rows = [row for _, row in storage.json_lines(text, f"manifest {part.url}", SourceError)]
    return rows, list(rows[0]) if rows else [], None


def _holds_bytes(kind) -> bool:
    return getattr(kind, "num_fields", 0) > 0 and kind.get_field_index("bytes") >= 0


def _hugging_face_classes(schema) -> list[str] | None:
    """The label names a Hugging Face dataset stores in its Parquet metadata (a ClassLabel feature)."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        features = json.loads(meta).get("info", {}).get("features", {})
    except ValueError:
        return None
    for column in LABEL_COLUMNS:
        names = features.get(column, {}).get("names") if isinstance(features.get(column), dict) else None
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return names
    return None


def _parse_labels(value: Any, is_csv: bool, where: str) -> list[str | int]:
    """Labels as names (str) or indices (int). CSV has no types, so a CSV label of digits is an index."""
    if value is None or value == "":
        return []
    if type(value) is list and (all(type(v) is int for v in value) or all(type(v) is str for v in value)):
        return value
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
