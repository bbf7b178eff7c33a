import pytest
import yaml

from distillers import DISTILLERS
from engine.config import parse_args_with_config
from engine.train_args import build_train_parser
from kdcore.errors import UserError

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


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_include_reads_the_recipe_and_the_file_wins(tmp_path):
    (tmp_path / "recipes").mkdir()
    _write(tmp_path / "recipes" / "base.yaml", "lr: 0.1\nepochs: 7\nopt: sgd\n")
    cfg = _write(tmp_path / "preset.yaml", "include: recipes/base.yaml\nepochs: 9\n")  # relative to the file
    args = parse(["data", "-c", cfg])
    assert (args.lr, args.epochs, args.opt) == (0.1, 9, "sgd")
    assert parse(["data", "-c", cfg, "--epochs", "2"]).epochs == 2


def test_include_errors_name_the_file(tmp_path):
    _write(tmp_path / "base.yaml", "lr: 0.1\nlearnig_rate: 3\n")
    with pytest.raises(UserError, match=r"base\.yaml.*learnig_rate"):
        parse(["data", "-c", _write(tmp_path / "p.yaml", "include: base.yaml\n")])
    with pytest.raises(UserError, match="config file not found"):
        parse(["data", "-c", _write(tmp_path / "q.yaml", "include: missing.yaml\n")])
    _write(tmp_path / "a.yaml", "include: b.yaml\n")
    _write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(UserError, match="includes itself"):
        parse(["data", "-c", str(tmp_path / "a.yaml")])


OVERRIDDEN = "lr: 0.1\nkd_temperature: 2\ndistiller: rsd\ndistiller_overrides:\n  kd: {kd_temperature: 4, lr: 2e-4}\n"


def test_distiller_overrides_rank_between_the_file_and_the_command_line(tmp_path):
    cfg = _write(tmp_path / "c.yaml", OVERRIDDEN)
    rsd = parse(["data", "-c", cfg])
    assert (rsd.distiller, rsd.lr, rsd.kd_temperature) == ("rsd", 0.1, 2.0)
    kd = parse(["data", "-c", cfg, "--distiller", "kd"])
    assert (kd.lr, kd.kd_temperature) == (2e-4, 4.0) and type(kd.lr) is float  # '2e-4' converted as on the CLI
    explicit = parse(["data", "-c", cfg, "--distiller", "kd", "--kd-temperature", "8"])
    assert (explicit.lr, explicit.kd_temperature) == (2e-4, 8.0)


def test_distiller_overrides_apply_to_the_files_own_distiller(tmp_path):
    cfg = _write(tmp_path / "c.yaml", OVERRIDDEN.replace("distiller: rsd", "distiller: kd"))
    assert parse(["data", "-c", cfg]).lr == 2e-4
    assert parse(["data", "-c", cfg, "--distiller", "rsd"]).lr == 0.1


def test_distiller_overrides_of_an_included_file_merge_per_distiller(tmp_path):
    _write(tmp_path / "base.yaml", OVERRIDDEN)
    cfg = _write(tmp_path / "c.yaml", "include: base.yaml\ndistiller_overrides:\n  kd: {lr: 0.3}\n")
    args = parse(["data", "-c", cfg, "--distiller", "kd"])
    assert (args.lr, args.kd_temperature) == (0.3, 4.0)


@pytest.mark.parametrize("table, named", [
    ("kd: {kd_temprature: 4}", "kd_temprature"),
    ("kd: {distiller: rsd}", "distiller"),
    ("nonesuch: {lr: 0.1}", "nonesuch"),
    ("kd: 4", "distiller_overrides"),
])
def test_distiller_overrides_refuse_what_is_not_an_argument(tmp_path, table, named):
    cfg = _write(tmp_path / "c.yaml", f"distiller_overrides:\n  {table}\n")
    with pytest.raises(UserError, match=named):
        parse(["data", "-c", cfg])


def test_args_yaml_of_a_run_with_overrides_loads_again(tmp_path):
    from engine.config import save_args_yaml
    _write(tmp_path / "base.yaml", "epochs: 5\n")
    cfg = _write(tmp_path / "c.yaml", "include: base.yaml\n" + OVERRIDDEN)
    args = parse(["data", "-c", cfg, "--distiller", "kd"])
    save_args_yaml(args, tmp_path / "args.yaml")
    saved = yaml.safe_load((tmp_path / "args.yaml").read_text())
    assert "distiller_overrides" not in saved and "include" not in saved
    again = parse(["-c", str(tmp_path / "args.yaml")])
    assert vars(again) | {"config": ""} == vars(args) | {"config": ""}


def test_explicit_arguments_resolve_includes_and_overrides(tmp_path):
    from engine.config import explicit_arguments
    _write(tmp_path / "base.yaml", "epochs: 5\n")
    cfg = _write(tmp_path / "c.yaml", "include: base.yaml\n" + OVERRIDDEN)
    given = explicit_arguments(build_train_parser(DISTILLERS), ["-c", cfg, "--distiller", "kd"])
    assert given["epochs"] == 5 and given["lr"] == 2e-4 and given["kd_temperature"] == 4.0
    assert "batch_size" not in given  # a parser default, not set by the command


def test_resume_with_the_same_config_and_distiller_agrees_with_the_run(tmp_path):
    from engine.config import resumed_arguments
    cfg = _write(tmp_path / "c.yaml", OVERRIDDEN)
    recorded = vars(parse(["data", "-c", cfg, "--distiller", "kd"])) | {"config": ""}
    resumed = resumed_arguments(build_train_parser(DISTILLERS), ["--resume", "r.pth.tar", "-c", cfg, "--distiller",
                                                                 "kd", "--epochs", "9"], recorded)
    assert (resumed.lr, resumed.kd_temperature, resumed.epochs) == (2e-4, 4.0, 9)
    with pytest.raises(UserError, match="--distiller 'rsd'"):  # the file alone selects rsd, not the run's kd
        resumed_arguments(build_train_parser(DISTILLERS), ["--resume", "r.pth.tar", "-c", cfg], recorded)
