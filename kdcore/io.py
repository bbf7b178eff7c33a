"""Atomic file writing: a reader sees the old file or the complete new one, never a partial one. Every file the
repo writes (checkpoints, CSV and JSON records, cache metadata, plots) goes through `atomic_write`."""
from __future__ import annotations

import csv
import errno
import glob
import hashlib
import io
import json
import os
import shutil
import time
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


def atomic_write(path: _Path, write: Callable[[IO[bytes]], Any], suffix: str = ".tmp") -> None:
    """`write(file)` into a temporary file beside `path`, fsync it, rename it over `path`, fsync the folder.

    A failure (a full disk, a quota, an I/O error) removes the temporary file and re-raises: `path` keeps its
    old contents.

    Args:
        path: the file to create or replace; the temporary file is `path` + `suffix`.
        write: called once with the temporary file, opened for writing bytes; its return value is ignored.
        suffix: of the temporary file. A writer into a folder that another process owns picks one that the
            owner's `remove_stale_temporaries` (of '*.tmp') does not match.
    """
    tmp = f"{path}{suffix}"
    try:
        with open(tmp, "wb") as f:
            _test_pause(os.path.basename(path))
            write(f)
            _test_failure(os.path.basename(path))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_folder(os.path.dirname(os.path.abspath(path)))


_WRITES_SEEN: dict = {}


def _test_pause(name: str) -> None:
    """Test-only, chosen by an environment variable (unset in real runs): KD_TEST_PAUSE_WRITE=PREFIX[#N]:FLAG
    pauses the N-th (default first) write of a file whose name starts with PREFIX before any byte of it is
    written, creating the file FLAG and waiting (up to 60 s) until the test removes it."""
    pause = os.environ.get("KD_TEST_PAUSE_WRITE")
    if not pause:
        return
    target, flag = pause.split(":", 1)
    prefix, _, count = target.partition("#")
    if name.startswith(prefix):
        seen = _WRITES_SEEN[("pause", prefix)] = _WRITES_SEEN.get(("pause", prefix), 0) + 1
        if seen == int(count or 1):
            open(flag, "w").close()
            deadline = time.time() + 60
            while os.path.exists(flag) and time.time() < deadline:
                time.sleep(0.01)


def _test_failure(name: str) -> None:
    """Test-only: KD_TEST_FAIL_WRITE=NAME:N makes the N-th write of NAME fail as a full disk does, after its
    bytes went to the temporary file (where the tests cannot mount a small tmpfs)."""
    fail = os.environ.get("KD_TEST_FAIL_WRITE")
    if fail:
        target, count = fail.rsplit(":", 1)
        if name == target:
            _WRITES_SEEN[("fail", target)] = _WRITES_SEEN.get(("fail", target), 0) + 1
            if _WRITES_SEEN[("fail", target)] == int(count):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _WriteErrors:
    """A file whose first failed write is kept: torch.save reports one as a RuntimeError of its zip writer
    ("unexpected pos ..."), which hides the OSError (no space left, quota exceeded) that the user must act on."""

    def __init__(self, file: IO[bytes]):
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.file.flush()


def _torch_save(obj: Any, file: IO[bytes]) -> None:
    recorder = _WriteErrors(file)
    try:
        torch.save(obj, recorder)
    except RuntimeError:
        if recorder.error is not None:
            raise recorder.error from None
        raise


def atomic_save(obj: Any, path: _Path) -> None:
    """torch.save `obj` to `path`, atomically; a failed write raises its OSError."""
    atomic_write(path, lambda f: _torch_save(obj, f))


def atomic_write_text(text: str, path: _Path, suffix: str = ".tmp") -> None:
    """Write `text` to `path`, atomically (`suffix`: see `atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode()), suffix)


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
