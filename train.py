#!/usr/bin/env python3
"""Train a student, with or without a frozen teacher of another architecture family.

    python train.py DATA --config configs/cifar/cnn.yaml --model resnet18 \
        --teacher swin_tiny_patch4_window7_224 --teacher-pretrained CKPT --distiller rsd
    torchrun --nproc_per_node 8 train.py DATA ...      (or python -m torch.distributed.launch ...)
    python train.py --resume output/train/<run>/last.pth.tar      (the run's own arguments come back)
"""
from distillers import DISTILLERS
from engine.checkpoint import read_training_checkpoint
from engine.config import parse_args_with_config, resumed_arguments
from engine.plugins import import_modules, import_modules_of_command_line
from engine.run import build_run
from engine.train_args import build_train_parser
from engine.trainer import train
from kdcore.distributed import shutdown_distributed
from kdcore.errors import exit_cleanly_on_user_error


@exit_cleanly_on_user_error
def main(argv=None):
    import_modules_of_command_line(argv)  # before the parser: their datasets and distillers are valid choices
    parser = build_train_parser(DISTILLERS)
    args = parse_args_with_config(parser, argv)
    checkpoint = None
    if args.resume:
        checkpoint = read_training_checkpoint(args.resume)
        args = resumed_arguments(parser, argv, checkpoint["args"])
    import_modules(args.import_modules)  # those a config or the resumed run names
    train(build_run(args, checkpoint))
    shutdown_distributed()


if __name__ == "__main__":
    main()
