import pytest
import yaml

from distillers import DISTILLERS
from engine.config import parse_args_with_config
from engine.errors import UserError
from engine.train_args import build_train_parser

PAPER_CONFIGS = {
    "configs/cifar/cnn.yaml": dict(epochs=300, batch_size=128, lr=0.05, min_lr=1e-3, opt="sgd", weight_decay=2e-3,
                                   sched="cosine", warmup_epochs=3, color_jitter=0, smoothing=0.1),
    "configs/cifar/vit_mlp.yaml": dict(epochs=300, batch_size=128, lr=5e-4, min_lr=1e-5, opt="adamw",
                                       weight_decay=0.05, sched="cosine", warmup_epochs=20, warmup_lr=5e-7,
                                       clip_grad=5.0, smoothing=0.1, color_jitter=0.4, reprob=0.25,
                                       aa="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0),
    "configs/imagenet/cnn.yaml": dict(epochs=100, batch_size=64, lr=0.1, min_lr=1e-6, opt="sgd", weight_decay=1e-4,
                                      sched="step", decay_epochs=30, warmup_epochs=3, color_jitter=0, smoothing=0.1),
    "configs/imagenet/vit_mlp.yaml": dict(lr=1e-3, min_lr=1e-6, drop=0, drop_path=0, model_ema=True,
                                          model_ema_decay=[0.99996], opt="adamw", mixup=0.8),
    "configs/imagenet/stronger.yaml": dict(epochs=300, batch_size=256, lr=5e-3, opt="lamb", sched="cosine",
                                           weight_decay=0.02, warmup_epochs=5, warmup_lr=1e-6, smoothing=0,
                                           drop=0, drop_path=0.05, aug_repeats=3, aa="rand-m7-mstd0.5", mixup=0.1,
                                           cutmix=1.0, color_jitter=0, crop_pct=0.95, bce_loss=True, model_ema=True,
                                           model_ema_decay=[0.9998]),
}


def parse(argv):
    return parse_args_with_config(build_train_parser(DISTILLERS), argv)


@pytest.mark.parametrize("path", sorted(PAPER_CONFIGS))
def test_paper_configs_load_with_their_values(path):
    args = parse(["data", "-c", path])
    for key, value in PAPER_CONFIGS[path].items():
        assert getattr(args, key) == pytest.approx(value), key
        assert type(getattr(args, key)) is not str or isinstance(value, str), key


def test_command_line_wins_over_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 5e-4\nepochs: 7\n")  # '5e-4' is a string to YAML; converted like the CLI
    args = parse(["data", "-c", str(cfg), "--epochs", "3"])
    assert args.lr == 5e-4 and args.epochs == 3


def test_unknown_yaml_key_names_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.1\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match="learning_rate"):
        parse(["data", "-c", str(cfg)])


def test_missing_config_file():
    with pytest.raises(UserError, match="config file not found"):
        parse(["data", "-c", "nope.yaml"])


def test_paper_flag_defaults():
    args = parse(["data", "--distiller", "rsd"])
    assert (args.rsd_loss_weight, args.rsd_kappa, args.rsd_gamma) == (0.1, 0.01, 2.0)
    assert (args.gt_loss_weight, args.kd_loss_weight, args.kd_temperature) == (1.0, 1.0, 1.0)


def test_args_yaml_round_trip(tmp_path):
    from engine.config import save_args_yaml
    args = parse(["data", "--lr", "0.3", "--model-ema-decay", "0.9", "0.99"])
    save_args_yaml(args, tmp_path / "args.yaml")
    again = parse(["-c", str(tmp_path / "args.yaml")])
    assert vars(again) | {"config": ""} == vars(args) | {"config": ""}
    assert yaml.safe_load((tmp_path / "args.yaml").read_text())["lr"] == 0.3
