"""Which folder a run writes to, what counts as a run's files there, and where `--resume auto` continues from.

Rules:
- A fresh run (no --resume) refuses a folder that holds any run file: it would overwrite them.
- `--resume auto` (with --experiment, which fixes the folder) continues from the newest loadable checkpoint in
  it, and starts fresh when there is none. Candidates are ordered by (epoch, step): a recovery checkpoint by
  the position in its name, last.pth.tar as (its epoch + 1, 0); never best.pth.tar, never the file time. An
  unreadable file (empty, truncated) is skipped with a warning; one that is read and refused (another version,
  conflicting arguments) is an error. A recovery file of another process count gives way to the epoch
  checkpoint, with a warning.
- A run that fails before its first checkpoint removes the folder it created (train.py).
"""
import fnmatch
import os
import time
from dataclasses import dataclass, field
from typing import List, Optional

from kdcore.distributed import from_main_process
from kdcore.errors import UnreadableFile, UserError

from .checkpoint import read_training_checkpoint, recovery_position

# What train.py writes into a run folder; the first group before its first checkpoint
BEFORE_FIRST_CHECKPOINT = ("args.yaml", "log.txt", "events.out.tfevents.*")
RESULTS = ("last.pth.tar", "best.pth.tar", "student_last.pth", "student_best.pth", "summary.csv",
           "recovery-*-*.pth.tar", "PREEMPTED")


def matching(folder, patterns):
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder) if any(fnmatch.fnmatch(name, p) for p in patterns))


def default_name(args):
    name = "-".join([time.strftime("%Y%m%d-%H%M%S"), args.distiller, args.model] + ([args.teacher] if args.teacher
                                                                                    else []))
    return name.replace(":", "_").replace("/", "_")  # hf-hub:org/repo model names


def named_folder(args):
    """--output/--experiment (or a new timestamped name), refusing an --output that is not a folder."""
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UserError(f"--output {args.output!r} is a file; pass a folder (run folders are made inside it)")
    return os.path.join(args.output, args.experiment or default_name(args))


def check_fresh_folder(folder, resuming_auto=False):
    """Refuse a folder a fresh run would overwrite. Under --resume auto (nothing to resume), what a run writes
    before its first checkpoint may be there (an attempt killed that early)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"run folder {folder!r} is a file; choose another --experiment or --output")
    found = matching(folder, RESULTS + (() if resuming_auto else BEFORE_FIRST_CHECKPOINT))
    if not found:
        return
    if resuming_auto:
        raise UserError(f"--resume auto: run folder {folder!r} holds {', '.join(found[:5])} but no checkpoint that "
                        f"can be resumed; move those files away, or choose another --experiment.")
    raise UserError(f"run folder {folder!r} already holds files of a run ({', '.join(found[:5])}); continue it with "
                    f"--resume auto (or --resume PATH), or choose another --experiment")


@dataclass
class ResumePoint:
    """Where a launch starts: `path` and `checkpoint` of the checkpoint it continues (None: a fresh run in
    `folder`), with the lines to log once the run's log exists."""
    folder: Optional[str] = None
    path: str = ""
    checkpoint: Optional[dict] = None
    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


def candidates(folder):
    """[(position, path)] newest first: recovery files by their names; last.pth.tar is read for its epoch."""
    found = [(position, os.path.join(folder, name)) for name in os.listdir(folder)
             if (position := recovery_position(name)) is not None]
    return sorted(found, reverse=True)


def find_resume_point(folder, world_size):
    """The newest loadable checkpoint of `folder` for a run of `world_size` processes (`--resume auto`)."""
    point = ResumePoint(folder=folder)
    if not os.path.isdir(folder):
        point.notes.append(f"--resume auto: {folder} does not exist yet: starting a fresh run")
        return point
    last_path, last = os.path.join(folder, "last.pth.tar"), None
    if os.path.exists(last_path):
        try:
            last = read_training_checkpoint(last_path)
        except UnreadableFile as exc:
            point.warnings.append(f"--resume auto skips {last_path}: {exc}")
    last_position = (last["epoch"] + 1, 0) if last is not None else (-1, 0)
    for position, path in candidates(folder):
        if position <= last_position:
            break
        try:
            checkpoint = read_training_checkpoint(path)
        except UnreadableFile as exc:
            point.warnings.append(f"--resume auto skips {path}: {exc}")
            continue
        if len(checkpoint["rng"]) != world_size:
            point.warnings.append(f"--resume auto skips {path}: written by {len(checkpoint['rng'])} process(es) "
                                  f"mid-epoch, this run has {world_size}; falling back to the epoch checkpoint")
            continue
        point.path, point.checkpoint = path, checkpoint
        break
    if point.checkpoint is None and last is not None:
        point.path, point.checkpoint = last_path, last
    if point.checkpoint is None:
        try:
            check_fresh_folder(folder, resuming_auto=True)
        except UserError as exc:
            raise UserError(" ".join([str(exc), *point.warnings])) from None
        point.notes.append(f"--resume auto: no checkpoint in {folder}: starting a fresh run")
    else:
        point.notes.append(f"--resume auto: continuing from {point.path}")
    return point


def decided_by_main_process(decide, env):
    """`decide()` on rank 0 only, its result (or its UserError) on every rank: files that rank 0 is about to
    create or replace are never read by the others."""
    outcome = None
    if env.is_main:
        try:
            outcome = ("ok", decide())
        except UserError as exc:
            outcome = ("error", str(exc))
    kind, value = from_main_process(outcome, env)
    if kind == "error":
        raise UserError(value)
    return value


def resume_point(args, env):
    """Where this launch starts: --resume PATH, --resume auto (the newest checkpoint of --output/--experiment,
    chosen by rank 0, or fresh), or a fresh run."""
    if args.resume == "auto":
        if not args.experiment:
            raise UserError("--resume auto needs --experiment NAME, which fixes the run folder "
                            "(--output/NAME) that a requeued or restarted command finds again")

        def choose():
            point = find_resume_point(named_folder(args), env.world_size)
            return point.folder, point.path, point.notes, point.warnings

        folder, path, notes, warnings = decided_by_main_process(choose, env)
        checkpoint = read_training_checkpoint(path) if path else None
        return ResumePoint(folder=folder, path=path, checkpoint=checkpoint, notes=notes, warnings=warnings)
    if args.resume:
        return ResumePoint(path=args.resume, checkpoint=read_training_checkpoint(args.resume))
    return ResumePoint()
