"""Every registered distiller x a CNN, a DeiT, a Swin and a Mixer student x a ConvNeXt and a ViT teacher, at 32 px on
CPU, in one process: two training steps each, in fp32 with mixup/cutmix wherever the distiller supports it. Losses
must be finite and every extra module (each AAD, projector, branch) must get a non-zero gradient at every step,
except by a method's own rule (PAT: its prompt convolutions from the second step on, behind beta = 0, and not behind
an SE gate closed for the whole batch; tests/pat_gates.py). Then the same steps under bf16 autocast (the teacher in
bf16 too), on fewer students: bf16 is emulated, 4-10x slower, on a CPU without AMX/AVX512-BF16. Each case gets one
student there, the four families rotated over the cases, except the cases whose extra modules are built per family
(OFA's branches, RSD's branches, FitNets' adapters), which get all four. Every run checks the precision its convs
and linears really computed in, the student's and the teacher's, so a bf16 run that silently ran in fp32 fails. Tiny
inputs keep the whole matrix inside CI's budget.

The paper's RSD variants (Tables 3, 5, 6, 7) run as their own cases, named `<distiller>:<variant>`.
"""
import contextlib
import copy
import functools

import pytest
import torch
from pat_gates import closed_gates, excused
from timm.optim import create_optimizer_v2

from distillers import DISTILLERS, build_distiller
from engine.config import parse_args_with_config
from engine.loader import build_mixup
from engine.loop import train_step
from engine.models import create_model
from engine.run import ground_truth_criterion
from engine.sources import FrozenSource, build_extra_sources
from engine.train_args import build_train_parser
from kdcore.batch import Batch
from kdcore.precision import autocast_factory

STUDENTS = {"resnet18": "resnet18", "deit_tiny": "deit_tiny_patch16_224", "swin_pico": "swin_pico_patch4_window7_224",
            "mixer_s16": "mixer_s16_224"}  # short name (in test ids) -> timm name: a CNN, a ViT, a Swin, a Mixer
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


CASES = cases()


def built_per_family(case):
    """Whether the case's extra modules depend on the student's family: OFA's stage branches (every OFA case
    with branches; `ofa:logits-only` has none), RSD's branches (Table 7) and FitNets' hint adapters are CNN or
    token modules built from the stage shapes."""
    return (CASES[case][0] == "ofa" and case != "ofa:logits-only") or case in ("rsd:branches", "fitnet")


def bf16_cases():
    """(case, short student name, teacher) of the bf16 half: all four students where the modules differ by
    family, otherwise one, the families taken in turn over the remaining cases in sorted order; the two
    teachers alternate over the sorted pairs (the fp32 half runs every student with both)."""
    rotated = [case for case in CASES if not built_per_family(case)]
    families = list(STUDENTS)
    pairs = [(case, student) for case in CASES if built_per_family(case) for student in families]
    pairs += [(case, families[i % len(families)]) for i, case in enumerate(rotated)]
    return [(case, student, TEACHERS[i % len(TEACHERS)]) for i, (case, student) in enumerate(sorted(pairs))]


def extra_layers(distiller):
    """Every module of the distiller outside the student that holds trainable parameters itself (each
    branch's convs and norms, each AAD layer, each projector)."""
    return {name: module for name, module in distiller.named_modules()
            if not name.startswith("student") and any(p.requires_grad for p in module.parameters(recurse=False))}


@contextlib.contextmanager
def computed_dtypes(model):
    """The set of dtypes `model`'s convs and linears output while inside: the precision it really computed in
    (bf16 under bf16 autocast, fp32 without), whatever path (forward_intermediates, forward_head) ran them."""
    seen = set()
    handles = [m.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
               for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def run_two_steps(name, student_name, teacher_name, mixup, bf16, flags=()):
    argv = ["--distiller", name, "--teacher", teacher_name, "--img-size", str(IMG), "-b", str(BATCH),
            "--smoothing", "0.1", *flags]
    if mixup:
        argv += ["--mixup", "0.8", "--cutmix", "1.0"]
    args = parse_args_with_config(build_train_parser(DISTILLERS), argv)
    args.num_classes = CLASSES
    student, teacher_model = copy.deepcopy(_model(student_name)), _model(teacher_name)
    mix = build_mixup(args, CLASSES)
    labels = torch.arange(4 * BATCH) % CLASSES
    data_config = {"mean": (0.5,) * 3, "std": (0.25,) * 3, "input_size": (3, IMG, IMG)}
    sources = build_extra_sources(args, DISTILLERS[name], labels, data_config, "cpu")
    distiller = build_distiller(args, student, input_size=(3, IMG, IMG), teacher=teacher_model, sources=sources,
                                gt_criterion=ground_truth_criterion(args), dataset_size=4 * BATCH,
                                train_labels=labels).train()
    teacher = FrozenSource(teacher_model, distiller.teacher_request, "cpu", "bf16" if bf16 else "fp32")
    distiller.attach_teacher(teacher)
    optimizer = create_optimizer_v2(distiller, opt="sgd", lr=0.01, momentum=0.9)
    autocast = autocast_factory(torch.device("cpu"), torch.bfloat16 if bf16 else None)
    generator = torch.Generator().manual_seed(0)
    expected = torch.bfloat16 if bf16 else torch.float32
    for step in range(2):
        images = torch.randn(BATCH, 3, IMG, IMG, generator=generator)
        labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
        index = torch.arange(step * BATCH, (step + 1) * BATCH)
        targets, lam = labels, 1.0
        if mix is not None:
            images, targets, labels, lam = mix(images, labels)
        batch = Batch(images=images, targets=targets, labels=labels, index=index, lam=lam)
        with computed_dtypes(student) as student_dtypes, computed_dtypes(teacher_model) as teacher_dtypes, \
                closed_gates(distiller) as closed:
            loss, losses = train_step(distiller, teacher, optimizer, batch, autocast=autocast, sources=sources)
        assert student_dtypes == {expected}, f"{name}: the student computed in {student_dtypes}, not {expected}"
        assert teacher_dtypes == {expected}, f"{name}: the teacher computed in {teacher_dtypes}, not {expected}"
        assert torch.isfinite(loss), (name, losses)
        for term, value in losses.items():
            assert torch.isfinite(value), (name, term)
        for module_name, module in extra_layers(distiller).items():
            grads = [p.grad for p in module.parameters(recurse=False) if p.requires_grad]
            assert any(g is not None and g.abs().sum() > 0 for g in grads) or excused(distiller, module_name, step,
                                                                                      closed), \
                f"{name}: no gradient on {module_name} at step {step + 1}"
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_every_distiller_trains_on_every_family(case):
    """fp32, with mixup/cutmix wherever the distiller supports it: every student x every teacher."""
    name, flags = CASES[case]
    for student_name in STUDENTS.values():
        for teacher_name in TEACHERS:
            run_two_steps(name, student_name, teacher_name, DISTILLERS[name].supports_mixup, False, flags)


@pytest.mark.slow
@pytest.mark.bf16
@pytest.mark.parametrize("case, student, teacher", [pytest.param(*triple, id="-".join(triple))
                                                    for triple in bf16_cases()])
def test_every_distiller_trains_under_bf16(case, student, teacher):
    """bf16 autocast for the student step and a bf16 teacher; with mixup/cutmix on every other student of the
    case's row (mixed soft targets meet bf16 logits there), without on the rest."""
    name, flags = CASES[case]
    mixup = DISTILLERS[name].supports_mixup and list(STUDENTS).index(student) % 2 == 0
    run_two_steps(name, STUDENTS[student], teacher, mixup, True, flags)


def test_the_bf16_half_covers_every_case_and_every_family():
    triples = bf16_cases()
    assert {case for case, _, _ in triples} == set(CASES)
    for case in ("fitnet", "rsd:branches", *(c for c in CASES if c.startswith("ofa") and c != "ofa:logits-only")):
        assert {s for c, s, _ in triples if c == case} == set(STUDENTS), case
        assert {t for c, _, t in triples if c == case} == set(TEACHERS), case
    assert all({t for _, s, t in triples if s == student} == set(TEACHERS) for student in STUDENTS)
    single = [student for case, student, _ in triples if not built_per_family(case)]
    assert len(single) == sum(not built_per_family(case) for case in CASES)  # one student each
    assert all(single.count(s) >= 2 for s in STUDENTS)  # each family under several distillers


@pytest.mark.slow
def test_rsd_without_aad_where_the_widths_match():
    """Table 4: no AAD needs D_s == D_t (DeiT-T and ViT-T are both 192 wide). fp32 with mixup: nothing here
    depends on the precision, which the bf16 half covers for RSD."""
    run_two_steps("rsd", "deit_tiny_patch16_224", "vit_tiny_patch16_224", True, False, ["--rsd-no-aad"])
