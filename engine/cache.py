"""Per-sample outputs of a frozen source, computed once and read by (epoch, dataset index).

One format for every frozen source (tools/build_cache.py builds both kinds):
- `views: clean`: one view per index, the clean training image (RichKD's second source, arXiv 2511.09286);
- `views: augmented`: the teacher's outputs on each epoch's training view of each index, mixup included, for
  `--teacher-cache` (engine/teacher_cache.py); views are keyed by the sample (engine/views.py), so any process
  count and batch size reads the same rows.

On disk a cache is a folder:
    meta.json          format version, views, epochs, the dataset's identity (size, class names, sha256 of the
                       labels), the source (name, weights by sha256, preprocessing, or a run's fingerprint), the
                       arrays' widths and dtype, rows done, and how it was built (`build`: date, host, CPU,
                       processes, intra-op threads: fp32 CPU kernels round differently with another thread
                       count, so bit-exact runs use the builder's; equal caches may differ here)
    logits.npy         E x N x C (fp16 or fp32; E = 1 for clean views), or with `topk` K:
      logits_values.npy  E x N x K, the K largest logits, logits_index.npy their classes (int16/int32), and
      logits_lse.npy     E x N x 1 (fp32), the log-sum-exp of all C logits
    embedding.npy      E x N x D (when stored)
A top-K row is read back with each of the C - K missing logits set to one value: the one that gives them,
together, the softmax mass (at temperature 1) the K stored logits leave. Softmax at T = 1 is then exact on the K
classes and on the rest in total; at other temperatures, and within the rest, it is an approximation.
It is built in `<folder>.partial`, whose meta.json records how many rows are on disk, epoch-major (updated after
the rows are flushed), so an interrupted build resumes where it stopped; the finished folder is renamed into
place in one step. Training memory-maps the arrays read-only: processes on a machine share the page cache
instead of each holding a copy of an ImageNet-size cache.
"""
import hashlib
import json
import os

import numpy as np
import torch

from kdcore.errors import UserError
from kdcore.features import Features
from kdcore.io import atomic_write_json

FORMAT_VERSION = 2
ARRAYS = ("logits", "embedding")
VIEWS = ("clean", "augmented")
DTYPES = {"fp16": np.float16, "fp32": np.float32}
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
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        raise UserError(f"{path!r} is not readable JSON (a truncated cache?); rebuild with tools/build_cache.py") \
            from None


def check_format(meta, path):
    """Refuse a cache written in another format (format 1 had no views, epochs or dtype)."""
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"cache {path!r} has format {meta.get('format')}, this code reads {FORMAT_VERSION}; "
                        f"rebuild with tools/build_cache.py")


def array_layout(meta):
    """The arrays of a cache, {file name: (numpy dtype, width)}: one per stored output, or three for top-K logits."""
    dtype, layout = DTYPES[meta["dtype"]], {}
    for key, width in meta["widths"].items():
        k = meta.get("topk") if key == "logits" else None
        if k:
            layout.update(logits_values=(dtype, k), logits_index=(np.int16 if width < 2 ** 15 else np.int32, k),
                          logits_lse=(np.float32, 1))
        else:
            layout[key] = (dtype, width)
    return layout


def fill_topk(values, index, lse, width):
    """Full logits from the K largest (values, index) and the log-sum-exp of all `width`: each missing logit gets
    log(remaining mass / (width - K)) + lse, so that at T = 1 the missing classes keep their total mass."""
    missing = width - values.shape[1]
    if missing == 0:
        return torch.empty_like(values).scatter_(1, index, values)
    kept = torch.exp(values - lse).sum(dim=1, keepdim=True)
    rest = (1 - kept).clamp_min(torch.finfo(torch.float32).tiny)
    fill = torch.log(rest / missing) + lse
    return fill.expand(-1, width).clone().scatter_(1, index, values)


class CacheWriter:
    """Builds a cache folder at `path` in `path + '.partial'`, resuming an interrupted build of the same
    source on the same dataset; `finish()` renames it into place.

    `widths` maps each array to write ('logits', 'embedding') to its width; `epochs` views per index (1 for
    `views='clean'`); rows are E x N, written epoch-major. `build` (date, host, ...) is recorded, not compared.
    """

    def __init__(self, path, identity, source, widths, views="clean", epochs=1, dtype="fp32", build=None,
                 topk=None):
        self.path, self.partial = os.path.abspath(path), os.path.abspath(path) + PARTIAL_SUFFIX
        if os.path.exists(self.path):
            raise UserError(f"cache {self.path!r} already exists; delete it or choose another output path")
        unknown = sorted(set(widths) - set(ARRAYS))
        if unknown or not widths:
            raise UserError(f"a cache holds some of {', '.join(ARRAYS)}, got {sorted(widths)}")
        if views not in VIEWS or dtype not in DTYPES or epochs < 1 or (views == "clean" and epochs != 1):
            raise ValueError(f"views {views!r}, epochs {epochs}, dtype {dtype!r}")
        if topk is not None and not 1 <= topk <= widths.get("logits", 0):
            raise UserError(f"--cache-topk {topk} must lie between 1 and the {widths.get('logits', 0)} logits")
        self.meta = {"format": FORMAT_VERSION, "views": views, "epochs": int(epochs), "dataset": identity,
                     "source": source, "widths": {k: int(widths[k]) for k in ARRAYS if k in widths},
                     "dtype": dtype, "topk": topk, "done": 0, "build": dict(build or {})}
        self.size = identity["size"]
        if os.path.isdir(self.partial):
            previous = _read_meta(self.partial)
            if {**previous, "done": 0, "build": None} != {**self.meta, "build": None}:
                raise UserError(f"{self.partial!r} holds an interrupted build of another source, dataset or "
                                f"setting; delete it to start this one")
            self.meta["done"] = previous["done"]
            mode = "r+"
        else:
            os.makedirs(self.partial)
            mode = "w+"
        self.arrays = {name: np.lib.format.open_memmap(os.path.join(self.partial, f"{name}.npy"), mode=mode,
                                                       dtype=array_dtype, shape=(epochs, self.size, width))
                       for name, (array_dtype, width) in array_layout(self.meta).items()}
        if mode == "w+":
            atomic_write_json(self.meta, os.path.join(self.partial, META))

    @property
    def done(self):
        """Rows already on disk, epoch-major: the build continues at (done // N, done % N)."""
        return self.meta["done"]

    @property
    def total(self):
        return self.meta["epochs"] * self.size

    def write_rows(self, start, rows):
        """Rows ({array: (n, width) tensor or array}) at epoch-major positions start .. start + n - 1, flushed."""
        counts = {len(v) for v in rows.values()}
        if set(rows) != set(self.meta["widths"]) or len(counts) != 1:
            raise ValueError(f"expected equally long rows of {sorted(self.meta['widths'])}, got {sorted(rows)}")
        rows = {k: v.detach().float().cpu() if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v)).float()
                for k, v in rows.items()}
        if self.meta["topk"] and "logits" in rows:
            logits = rows.pop("logits")
            values, index = logits.topk(self.meta["topk"], dim=1)
            rows.update(logits_values=values, logits_index=index, logits_lse=logits.logsumexp(dim=1, keepdim=True))
        stop = start + counts.pop()
        if not 0 <= start <= stop <= self.total or start // self.size != (stop - 1) // self.size:
            raise ValueError(f"rows {start}..{stop} do not lie within one epoch of the cache")
        epoch, first = divmod(start, self.size)
        for key, value in rows.items():
            self.arrays[key][epoch, first:first + stop - start] = value.numpy()
            self.arrays[key].flush()
        return stop

    def mark_done(self, done):
        """Record that every row before `done` is on disk (after their write_rows)."""
        self.meta["done"] = int(done)
        atomic_write_json(self.meta, os.path.join(self.partial, META))

    def write(self, rows):
        """Append the next rows and record them as done."""
        self.mark_done(self.write_rows(self.done, rows))

    def finish(self):
        """Rename the complete cache into place; returns its path."""
        if self.done != self.total:
            raise RuntimeError(f"cache has {self.done} of {self.total} rows")
        self.arrays.clear()  # drop the memory maps before the rename
        os.replace(self.partial, self.path)
        return self.path


class SourceCache:
    """A finished cache, memory-mapped read-only; `lookup(index, epoch)` gives the rows of a batch's dataset
    indices at an epoch (clean caches have one view per index, whatever the epoch)."""

    def __init__(self, path):
        if not os.path.isdir(path):
            raise UserError(f"source cache {path!r} not found; build it with tools/build_cache.py (a folder "
                            f"named *{PARTIAL_SUFFIX} is an unfinished build: run the tool again to finish it)")
        self.path, self.meta = path, _read_meta(path)
        check_format(self.meta, path)
        total = self.meta["epochs"] * self.meta["dataset"]["size"]
        if self.meta["done"] != total:
            raise UserError(f"cache {path!r} is unfinished ({self.meta['done']} of {total} rows); run "
                            f"tools/build_cache.py again to finish it")
        self.arrays = {}
        for key, (dtype, width) in array_layout(self.meta).items():
            try:
                array = np.load(os.path.join(path, f"{key}.npy"), mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise UserError(f"cache {path!r}: {key}.npy does not load ({exc}); a truncated cache? rebuild with "
                                f"tools/build_cache.py") from None
            expected = (self.meta["epochs"], self.meta["dataset"]["size"], width)
            if array.shape != expected or array.dtype != dtype:
                raise UserError(f"cache {path!r}: {key}.npy holds {array.dtype} {array.shape}, its meta says "
                                f"{np.dtype(dtype)} {expected}; rebuild with tools/build_cache.py")
            self.arrays[key] = array

    @property
    def views(self):
        return self.meta["views"]

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
        missing = [k for k in needs if k not in self.meta["widths"]]
        if missing:
            raise UserError(f"cache {self.path!r} holds {', '.join(self.meta['widths'])} but this run needs "
                            f"{', '.join(missing)}; rebuild it with tools/build_cache.py --store {' '.join(needs)}")
        if "logits" in needs and self.width("logits") != num_classes:
            raise UserError(f"cache {self.path!r} has {self.width('logits')} logits per sample but the run has "
                            f"{num_classes} classes")

    def lookup(self, index, epoch=0):
        """`Features` (fp32, on `index`'s device) of the samples at these dataset indices, at `epoch`."""
        rows = index.detach().cpu().numpy()
        view = 0 if self.views == "clean" else epoch
        read = {k: torch.from_numpy(np.ascontiguousarray(a[view, rows])) for k, a in self.arrays.items()}
        if "logits_values" in read:
            read["logits"] = fill_topk(read.pop("logits_values").float(), read.pop("logits_index").long(),
                                       read.pop("logits_lse"), self.width("logits"))
        rows_of = {k: v.float().to(index.device, non_blocking=True) for k, v in read.items()}
        return Features(logits=rows_of.get("logits"), embedding=rows_of.get("embedding"))


def mix_rows(rows, partner_rows, lam):
    """Rows mixed as their images were: lam * row + (1 - lam) * partner_row, `lam` the weight of the row's own
    image (a float, or a (B, 1) tensor)."""
    if isinstance(lam, float) and lam == 1.0:
        return rows
    return lam * rows + (1 - lam) * partner_rows
