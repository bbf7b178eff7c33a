"""Self-contained distiller flags: each class adds only the flags it defines (subclasses inherit, never re-add), a
flag read by several methods says who reads it, and a registered subclass trains through train.py."""
import re

import pytest
import torch
from conftest import run_main

from distillers import DISTILLERS
from distillers.rsd import RSD
from engine.train_args import build_train_parser


class PlainRSD(RSD):
    """RSD under another name, without flags of its own."""


class ScaledRSD(RSD):
    """RSD with one flag of its own: a factor on its RSD terms."""

    def __init__(self, student, context):
        super().__init__(student, context)
        self.rsd_scaled_factor = context.args.rsd_scaled_factor

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument_group("RSD, scaled").add_argument("--rsd-scaled-factor", type=float, default=1.0,
                                                             help="factor on the RSD terms")

    def distill_losses(self, student_feats, teacher_feats, batch):
        losses = super().distill_losses(student_feats, teacher_feats, batch)
        return {name: self.rsd_scaled_factor * loss for name, loss in losses.items()}


@pytest.fixture
def subclasses(monkeypatch):
    """Both subclasses registered for one test (the registry is restored after it)."""
    for name, cls in (("rsd_plain", PlainRSD), ("rsd_scaled", ScaledRSD)):
        monkeypatch.setattr(cls, "name", name, raising=False)
        monkeypatch.setitem(DISTILLERS, name, cls)
    return DISTILLERS


def listed_options(help_text):
    """Every option string as --help lists it at the start of an entry."""
    return re.findall(r"^  ((?:-\w+, )?--[\w-]+)", help_text, flags=re.M)  # entries; wrapped help lines indent deeper


def test_subclasses_register_without_a_conflict_and_help_lists_each_flag_once(subclasses):
    parser = build_train_parser(subclasses)  # an argparse conflict would raise here
    options = [o.split(", ")[-1] for o in listed_options(parser.format_help())]
    repeated = sorted({o for o in options if options.count(o) > 1})
    assert not repeated, repeated
    for flag in ("--rsd-kappa", "--rsd-loss-weight", "--rsd-scaled-factor", "--crd-k", "--richkd-cache"):
        assert flag in options, flag
    args = parser.parse_args(["--distiller", "rsd_scaled", "--rsd-scaled-factor", "0.5", "--rsd-kappa", "0.02"])
    assert (args.rsd_scaled_factor, args.rsd_kappa) == (0.5, 0.02)


def test_shared_and_borrowed_flags_name_their_readers():
    actions = {a.dest: a for a in build_train_parser(DISTILLERS)._actions}
    readers = actions["kd_loss_weight"].help
    for method in ("kd", "bkd", "dkd", "dist", "correlation", "rkd", "crd", "ofa"):
        assert re.search(rf"\b{method}\b", readers), (method, readers)
    for method in ("rsd", "fitnet", "richkd"):  # they have weights of their own
        assert not re.search(rf"\b{method}\b", readers.split("(")[0]), (method, readers)
    assert "also read by ofa" in actions["rsd_kappa"].help
    for flag in ("crd_feat_dim", "crd_k", "crd_momentum", "crd_temperature", "crd_nce_eps"):
        assert "also read by richkd" in actions[flag].help, flag
    assert "every distiller" in actions["gt_loss_weight"].help


SYNTHETIC = ["--dataset", "synthetic", "--img-size", "32", "--workers", "0", "--synthetic-train-size", "16",
             "--synthetic-val-size", "8", "-b", "8", "--epochs", "1", "--model", "test_resnet", "--teacher",
             "test_vit", "--teacher-precision", "fp32", "--no-eval-teacher", "--log-interval", "1", "--seed", "5"]


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory):
    from engine.models import create_model
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "test_vit.pth"
    torch.save(create_model("test_vit", num_classes=10, img_size=32).state_dict(), path)
    return path


def trained_rsd_loss(output, name, *flags, teacher):
    done = run_main("train.py", *SYNTHETIC, "--distiller", name, "--teacher-pretrained", teacher, "--output", output,
                    "--experiment", name, *flags)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return float(re.findall(r"\brsd ([0-9.]+)", done.stdout)[0])  # the first step's


def test_both_subclasses_train_in_process_and_the_new_flag_acts(subclasses, random_teacher, tmp_path):
    base = trained_rsd_loss(tmp_path, "rsd", teacher=random_teacher)
    plain = trained_rsd_loss(tmp_path, "rsd_plain", teacher=random_teacher)
    halved = trained_rsd_loss(tmp_path, "rsd_scaled", "--rsd-scaled-factor", "0.5", teacher=random_teacher)
    assert plain == base  # the same method under another name: the same first-step loss
    assert halved == pytest.approx(base / 2, rel=1e-3)
