#!/usr/bin/env python3
"""Train a student, with or without a frozen teacher of another architecture family.

    python train.py DATA --config configs/cifar/cnn.yaml --model resnet18 \
        --teacher swin_tiny_patch4_window7_224 --teacher-pretrained CKPT --distiller rsd
    torchrun --nproc_per_node 8 train.py DATA ...      (or python -m torch.distributed.launch ...)
"""
from distillers import DISTILLERS
from engine.config import parse_args_with_config
from engine.errors import exit_cleanly_on_user_error
from engine.train_args import build_train_parser
from engine.trainer import setup_run, train


@exit_cleanly_on_user_error
def main(argv=None):
    args = parse_args_with_config(build_train_parser(DISTILLERS), argv)
    train(setup_run(args))


if __name__ == "__main__":
    main()
