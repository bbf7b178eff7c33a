"""Every registered distiller x a CNN, a DeiT, a Swin and a Mixer student x a ConvNeXt and a ViT teacher,
at 32 px on CPU, in one process: two training steps each, with mixup where the distiller supports it, and
again under bf16 autocast. Losses must be finite and every extra module (each AAD, projector, branch) must
get a non-zero gradient. Tiny inputs keep the whole matrix inside CI's budget.

The paper's RSD variants (Tables 3, 5, 6, 7) run as their own cases, named `<distiller>:<variant>`.
"""
import copy
import functools

import pytest
import torch

from distillers import DISTILLERS, DistillerContext, build_distiller
from engine.config import parse_args_with_config
from engine.loader import build_mixup
from engine.batch import Batch
from engine.loop import train_step
from engine.models import create_model
from engine.precision import autocast_factory
from engine.run import ground_truth_criterion
from engine.stages import probe_stages
from engine.teacher import FrozenSource
from engine.train_args import build_train_parser
from timm.optim import create_optimizer_v2

STUDENTS = ["resnet18", "deit_tiny_patch16_224", "swin_pico_patch4_window7_224", "mixer_s16_224"]
TEACHERS = ["convnext_atto", "vit_tiny_patch16_224"]
CLASSES, IMG, BATCH = 10, 32, 8
EXTRA_FLAGS = {"richkd": ["--dataset", "synthetic", "--richkd-source", "convnext_demo_32", "--richkd-source-pretrained",
                          __file__.rsplit("tests", 1)[0] + "pretrained/convnext_demo_32_fmnist.pth"]}
VARIANTS = {  # case name -> (distiller, flags): one flag away, as the README's RSD table lists them
    "rsd:corr-only": ("rsd", ["--rsd-kappa", "0"]),  # Table 3
    "rsd:logits": ("rsd", ["--rsd-target", "logits"]),  # Table 5
    "ofa:rsd-criterion": ("ofa", ["--ofa-criterion", "rsd"]),  # Table 6
    "rsd:branches": ("rsd", ["--rsd-branch-stage", "1", "2", "3", "4"]),  # Table 7
    "ofa:logits-only": ("ofa", ["--ofa-stage"]),  # the Table 5 OFA row
}


@functools.lru_cache(maxsize=None)
def _model(name):
    torch.manual_seed(0)
    return create_model(name, num_classes=CLASSES, img_size=IMG, drop_path_rate=0.0)


def cases():
    plain = {name: (name, EXTRA_FLAGS.get(name, [])) for name in set(DISTILLERS) - {"vanilla"}}
    return dict(sorted({**plain, **VARIANTS}.items()))


def extra_layers(distiller):
    """Every module of the distiller outside the student that holds trainable parameters itself (each
    branch's convs and norms, each AAD layer, each projector)."""
    return {name: module for name, module in distiller.named_modules()
            if not name.startswith("student") and any(p.requires_grad for p in module.parameters(recurse=False))}


def run_two_steps(name, student_name, teacher_name, mixup, bf16, flags=()):
    argv = ["--distiller", name, "--teacher", teacher_name, "--img-size", str(IMG), "-b", str(BATCH),
            "--smoothing", "0.1", *flags]
    if mixup:
        argv += ["--mixup", "0.8", "--cutmix", "1.0"]
    args = parse_args_with_config(build_train_parser(DISTILLERS), argv)
    args.num_classes = CLASSES
    student, teacher_model = copy.deepcopy(_model(student_name)), _model(teacher_name)
    student_request, teacher_request = DISTILLERS[name].feature_requests(args)
    mix = build_mixup(args, CLASSES)
    context = DistillerContext(
        args=args, gt_criterion=ground_truth_criterion(args, mix), num_classes=CLASSES, teacher=teacher_model,
        student_stages=probe_stages(student, (3, IMG, IMG), student_request.stages),
        teacher_stages=probe_stages(teacher_model, (3, IMG, IMG), teacher_request.stages),
        dataset_size=4 * BATCH, train_labels=torch.arange(4 * BATCH) % CLASSES, world_size=1,
        student_data_config={"mean": (0.5,) * 3, "std": (0.25,) * 3, "input_size": (3, IMG, IMG)})
    distiller = build_distiller(name, student, context).train()
    teacher = FrozenSource(teacher_model, distiller.teacher_request, "cpu", "bf16" if bf16 else "fp32")
    optimizer = create_optimizer_v2(distiller, opt="sgd", lr=0.01, momentum=0.9)
    autocast = autocast_factory(torch.device("cpu"), torch.bfloat16 if bf16 else None)
    generator = torch.Generator().manual_seed(0)
    for step in range(2):
        images = torch.randn(BATCH, 3, IMG, IMG, generator=generator)
        labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
        index = torch.arange(step * BATCH, (step + 1) * BATCH)
        targets, lam = labels, 1.0
        if mix is not None:
            images, targets, labels, lam = mix(images, labels)
        batch = Batch(images=images, targets=targets, labels=labels, index=index, lam=lam)
        loss, losses = train_step(distiller, teacher, optimizer, batch, autocast=autocast)
        assert torch.isfinite(loss), (name, losses)
        for term, value in losses.items():
            assert torch.isfinite(value), (name, term)
        for module_name, module in extra_layers(distiller).items():
            grads = [p.grad for p in module.parameters(recurse=False) if p.requires_grad]
            assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{name}: no gradient on {module_name}"
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("case", cases())
def test_every_distiller_trains_on_every_family(case):
    name, flags = cases()[case]
    supports_mixup = DISTILLERS[name].supports_mixup
    for student_name in STUDENTS:
        for teacher_name in TEACHERS:
            for mixup, bf16 in ((False, False), (supports_mixup, True)):
                run_two_steps(name, student_name, teacher_name, mixup, bf16, flags)


@pytest.mark.slow
def test_rsd_without_aad_where_the_widths_match():
    """Table 4: no AAD needs D_s == D_t (DeiT-T and ViT-T are both 192 wide)."""
    run_two_steps("rsd", "deit_tiny_patch16_224", "vit_tiny_patch16_224", True, True, ["--rsd-no-aad"])
