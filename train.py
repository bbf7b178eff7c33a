#!/usr/bin/env python3
"""Train a student, with or without a frozen teacher of another architecture family.

    python train.py DATA --config configs/cifar/cnn.yaml --model resnet18 \
        --teacher swin_tiny_patch4_window7_224 --teacher-pretrained CKPT --distiller rsd
    torchrun --nproc_per_node 8 train.py DATA ...      (or python -m torch.distributed.launch ...)
    python train.py --resume output/train/<run>/last.pth.tar      (the run's own arguments come back)
    python train.py ... --experiment NAME --resume auto      (the same command line continues after a preemption)

Exit codes: kdcore/errors.py (0 done, 2 bad input, 3 a peer failed, 4 a write failed, 5 a loader worker died,
75 preempted with a recovery checkpoint).
"""
import shutil

from distillers import DISTILLERS
from engine.config import explicit_arguments, parse_args_with_config, resumed_arguments
from engine.plugins import import_modules, import_modules_of_command_line
from engine.preemption import stop_on_signals
from engine.run import build_run, join_processes
from engine.run_folder import resume_point
from engine.run_log import close_log
from engine.train_args import build_train_parser
from engine.trainer import train
from kdcore.distributed import shutdown_distributed
from kdcore.errors import exit_cleanly_on_error


def discard_unfinished_folder(run):
    """Remove the run folder this launch created when the run failed before its first checkpoint: nothing in it
    can be resumed, and a folder of only a log would block the same --experiment."""
    if run.created_folder and not run.has_checkpoint:
        if run.writer is not None:
            run.writer.close()
        close_log()
        shutil.rmtree(run.folder, ignore_errors=True)


@exit_cleanly_on_error
def main(argv=None):
    import_modules_of_command_line(argv)  # before the parser: their datasets and distillers are valid choices
    parser = build_train_parser(DISTILLERS)
    args = parse_args_with_config(parser, argv)
    given = explicit_arguments(parser, argv)
    env = join_processes(args)
    start = resume_point(args, env)
    if start.checkpoint is not None:
        recorded_given = start.checkpoint.get("given_args")
        args = resumed_arguments(parser, argv, start.checkpoint["args"], recorded_given)
        args.resume, given = start.path, recorded_given or given
    import_modules(args.import_modules)  # those a config or the resumed run names
    with stop_on_signals(args.stop_signals) as stops:
        run = build_run(args, start, stops, given, env)
        try:
            train(run)
        except BaseException:
            discard_unfinished_folder(run)
            raise
    shutdown_distributed()


if __name__ == "__main__":
    main()
