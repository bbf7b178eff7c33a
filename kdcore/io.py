"""Atomic file writing: a reader sees the old file or the complete new one, never a partial one. Every file the
repo writes (checkpoints, CSV and JSON records, cache metadata, plots) goes through `atomic_write`."""
import csv
import glob
import io
import json
import os
import shutil

import torch


def fsync_folder(folder):
    """Make renames inside `folder` durable (a rename is an update of the folder itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """`write(file)` into a temporary file beside `path`, fsync it, rename it over `path`, fsync the folder."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_folder(os.path.dirname(os.path.abspath(path)))


def atomic_save(obj, path):
    """torch.save `obj` to `path`, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text, path):
    """Write `text` to `path`, atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(value, path):
    """`value` as indented JSON at `path`, atomically."""
    atomic_write_text(json.dumps(value, indent=1), path)


def atomic_copy(src, dst):
    with open(src, "rb") as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f))


def csv_text(rows, columns=None):
    """`rows` (dicts) as CSV text with a header; columns default to every key, in first-seen order."""
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def atomic_write_csv(rows, path, columns=None):
    """`rows` as a CSV file at `path`, atomically (see `csv_text`)."""
    atomic_write_text(csv_text(rows, columns), path)


def remove_stale_temporaries(folder):
    """Partial files a killed process left behind (the real files are never partial)."""
    for path in glob.glob(os.path.join(folder, "*.tmp")):
        os.remove(path)
