"""Per-sample outputs of a frozen source, computed once over the training set and read by dataset index.

RichKD's second source (a CLIP model, arXiv 2511.09286) never runs during training: tools/build_cache.py runs
it once over the clean training images and writes its logits and/or embeddings here; training reads the rows
of each batch's dataset indices.

On disk a cache is a folder:
    meta.json          format version, the dataset's identity (size, class names, sha256 of the labels),
                       the source (name, weights, preprocessing), the arrays' widths, rows done
    logits.npy         N x C float32 (when written)
    embedding.npy      N x D float32 (when written)
It is built in `<folder>.partial`, whose meta.json records how many rows are on disk (updated after the rows
are flushed), so an interrupted build resumes where it stopped; the finished folder is renamed into place in
one step. Training memory-maps the arrays read-only: processes on a machine share the page cache instead of
each holding a copy of an ImageNet-size cache.
"""
import hashlib
import json
import os

import numpy as np
import torch

from kdcore.errors import UserError
from kdcore.features import Features
from kdcore.io import atomic_write_json

FORMAT_VERSION = 1
ARRAYS = ("logits", "embedding")
META = "meta.json"
PARTIAL_SUFFIX = ".partial"


def dataset_identity(labels, class_names):
    """What ties a cache to one training set: its size, class names and a checksum of its labels."""
    labels = np.ascontiguousarray(np.asarray(labels, dtype=np.int64))
    return {"size": int(labels.size), "class_names": [str(c) for c in class_names],
            "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest()}


def _read_meta(folder):
    path = os.path.join(folder, META)
    if not os.path.isfile(path):
        raise UserError(f"{folder!r} is not a source cache (no {META}); build one with tools/build_cache.py")
    with open(path) as f:
        return json.load(f)


class CacheWriter:
    """Builds a cache folder at `path` in `path + '.partial'`, resuming an interrupted build of the same
    source on the same dataset; `finish()` renames it into place.

    `widths` maps each array to write ('logits', 'embedding') to its width.
    """

    def __init__(self, path, identity, source, widths):
        self.path, self.partial = os.path.abspath(path), os.path.abspath(path) + PARTIAL_SUFFIX
        if os.path.exists(self.path):
            raise UserError(f"cache {self.path!r} already exists; delete it or choose another output path")
        unknown = sorted(set(widths) - set(ARRAYS))
        if unknown or not widths:
            raise UserError(f"a cache holds some of {', '.join(ARRAYS)}, got {sorted(widths)}")
        self.meta = {"format": FORMAT_VERSION, "dataset": identity, "source": source,
                     "widths": {k: int(widths[k]) for k in ARRAYS if k in widths}, "done": 0}
        size = identity["size"]
        if os.path.isdir(self.partial):
            previous = _read_meta(self.partial)
            if {**previous, "done": 0} != self.meta:
                raise UserError(f"{self.partial!r} holds an interrupted build of another source or dataset; "
                                f"delete it to start this one")
            self.meta["done"] = previous["done"]
            mode = "r+"
        else:
            os.makedirs(self.partial)
            mode = "w+"
        self.arrays = {k: np.lib.format.open_memmap(os.path.join(self.partial, f"{k}.npy"), mode=mode,
                                                    dtype=np.float32, shape=(size, w))
                       for k, w in self.meta["widths"].items()}
        if mode == "w+":
            atomic_write_json(self.meta, os.path.join(self.partial, META))

    @property
    def done(self):
        """Rows already on disk: the build continues at this dataset index."""
        return self.meta["done"]

    def write(self, rows):
        """Append the next rows ({array: (n, width) tensor or array}) and record them as done."""
        counts = {len(v) for v in rows.values()}
        if set(rows) != set(self.arrays) or len(counts) != 1:
            raise ValueError(f"expected equally long rows of {sorted(self.arrays)}, got {sorted(rows)}")
        start, stop = self.done, self.done + counts.pop()
        for key, value in rows.items():
            value = value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else value
            self.arrays[key][start:stop] = value
            self.arrays[key].flush()
        self.meta["done"] = stop
        atomic_write_json(self.meta, os.path.join(self.partial, META))

    def finish(self):
        """Rename the complete cache into place; returns its path."""
        if self.done != self.meta["dataset"]["size"]:
            raise RuntimeError(f"cache has {self.done} of {self.meta['dataset']['size']} rows")
        self.arrays.clear()  # drop the memory maps before the rename
        os.replace(self.partial, self.path)
        return self.path


class SourceCache:
    """A finished cache, memory-mapped read-only; `lookup(index)` gives the rows of a batch's dataset indices."""

    def __init__(self, path):
        if not os.path.isdir(path):
            raise UserError(f"source cache {path!r} not found; build it with tools/build_cache.py (a folder "
                            f"named *{PARTIAL_SUFFIX} is an unfinished build: run the tool again to finish it)")
        self.path, self.meta = path, _read_meta(path)
        if self.meta.get("format") != FORMAT_VERSION:
            raise UserError(f"cache {path!r} has format {self.meta.get('format')}, this code reads "
                            f"{FORMAT_VERSION}; rebuild it with tools/build_cache.py")
        if self.meta["done"] != self.meta["dataset"]["size"]:
            raise UserError(f"cache {path!r} is unfinished ({self.meta['done']} of {self.meta['dataset']['size']} "
                            f"rows); run tools/build_cache.py again to finish it")
        self.arrays = {k: np.load(os.path.join(path, f"{k}.npy"), mmap_mode="r") for k in self.meta["widths"]}

    def width(self, key):
        return self.meta["widths"][key]

    def check(self, labels, needs, num_classes):
        """Refuse a cache of another dataset, or one lacking what the run needs (`needs`: array names)."""
        ours, theirs = dataset_identity(labels, []), self.meta["dataset"]
        if (ours["size"], ours["labels_sha256"]) != (theirs["size"], theirs["labels_sha256"]):
            raise UserError(f"cache {self.path!r} was built for another training set ({theirs['size']} samples, "
                            f"labels sha256 {theirs['labels_sha256'][:12]}...) than this run's ({ours['size']} "
                            f"samples, {ours['labels_sha256'][:12]}...); build one for this dataset with "
                            f"tools/build_cache.py")
        missing = [k for k in needs if k not in self.arrays]
        if missing:
            raise UserError(f"cache {self.path!r} holds {', '.join(self.arrays)} but this run needs "
                            f"{', '.join(missing)}; rebuild it with tools/build_cache.py --store {' '.join(needs)}")
        if "logits" in needs and self.width("logits") != num_classes:
            raise UserError(f"cache {self.path!r} has {self.width('logits')} logits per sample but the run has "
                            f"{num_classes} classes")

    def lookup(self, index):
        """`Features` (fp32, on `index`'s device) of the samples at these dataset indices."""
        rows = index.detach().cpu().numpy()
        rows_of = {k: torch.from_numpy(np.ascontiguousarray(a[rows])).to(index.device, non_blocking=True)
                   for k, a in self.arrays.items()}
        return Features(logits=rows_of.get("logits"), embedding=rows_of.get("embedding"))


def mix_rows(rows, partner_rows, lam):
    """Rows mixed as their images were: lam * row + (1 - lam) * partner_row, `lam` the weight of the row's own
    image (a float, or a (B, 1) tensor)."""
    if isinstance(lam, float) and lam == 1.0:
        return rows
    return lam * rows + (1 - lam) * partner_rows
