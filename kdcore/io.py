"""Atomic file writing: a reader sees the old file or the complete new one, never a partial one. Every file the
repo writes (checkpoints, CSV and JSON records, cache metadata, plots) goes through `atomic_write`."""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import shutil
from typing import IO, Any, Callable, Mapping, Sequence, Union

import torch

_Path = Union[str, "os.PathLike[str]"]


def file_sha256(path: _Path) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB blocks: how results name the weights they used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_folder(folder: _Path) -> None:
    """Make renames inside `folder` durable (a rename is an update of the folder itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: _Path, write: Callable[[IO[bytes]], Any]) -> None:
    """`write(file)` into a temporary file beside `path`, fsync it, rename it over `path`, fsync the folder.

    Args:
        path: the file to create or replace; the temporary file is `path` + '.tmp'.
        write: called once with the temporary file, opened for writing bytes; its return value is ignored.
    """
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_folder(os.path.dirname(os.path.abspath(path)))


def atomic_save(obj: Any, path: _Path) -> None:
    """torch.save `obj` to `path`, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: _Path) -> None:
    """Write `text` to `path`, atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(value: Any, path: _Path) -> None:
    """`value` as indented JSON at `path`, atomically."""
    atomic_write_text(json.dumps(value, indent=1), path)


def atomic_copy(src: _Path, dst: _Path) -> None:
    """Copy the bytes of `src` to `dst`, atomically."""
    with open(src, "rb") as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f))


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """`rows` (dicts) as CSV text with a header; columns default to every key, in first-seen order.

    Args:
        rows: one mapping per CSV row; a key missing from a row leaves its cell empty.
        columns: the header, in order (a row key not in it is an error, as in `csv.DictWriter`).

    Returns:
        The CSV text, header line first.
    """
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def atomic_write_csv(rows: Sequence[Mapping[str, Any]], path: _Path, columns: Sequence[str] | None = None) -> None:
    """`rows` as a CSV file at `path`, atomically (see `csv_text`)."""
    atomic_write_text(csv_text(rows, columns), path)


def remove_stale_temporaries(folder: _Path) -> None:
    """Partial files a killed process left behind (the real files are never partial)."""
    for path in glob.glob(os.path.join(folder, "*.tmp")):
        os.remove(path)
