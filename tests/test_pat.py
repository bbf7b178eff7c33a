"""PAT (distillers/pat.py, custom_forward/staged.py): hcl against an independent computation, the official parameter
totals, the prompted teacher equal to the teacher at beta = 0 (and the official token-order defect caught), the
gradient rule, the module tree, precision, refusals, and training on Swin, Mixer and ResNet teachers."""
import contextlib
import copy
import math
import socket

import pytest
import torch
import torch.distributed as dist
from pat_gates import closed_gates, excused
from timm.optim import create_optimizer_v2
from torch.nn.parallel import DistributedDataParallel

import custom_forward.staged as staged
from distillers import DISTILLERS, build_distiller
from distillers.pat import hcl_loss, stage_map_size
from engine.loop import train_step
from engine.models import create_model
from engine.run import check_arguments
from engine.sources import FrozenSource
from engine.train_args import build_train_parser
from kdcore.batch import Batch
from kdcore.distributed import DistEnv
from kdcore.errors import UserError
from kdcore.features import FeatureRequest, extract_features
from kdcore.precision import autocast_factory

IMG, CLASSES, BATCH = 32, 10, 8


def parse(*flags):
    args = build_train_parser(DISTILLERS).parse_args(["--distiller", "pat", "--num-classes", str(CLASSES), *flags])
    return args


# hcl ------------------------------------------------------------------------------------------------------------

def adaptive_mean(x, level):
    """Average pooling to level x level with adaptive bins [floor(i h / l), ceil((i + 1) h / l)), written out."""
    h = x.shape[-1]
    out = torch.empty(*x.shape[:2], level, level, dtype=x.dtype)
    for i in range(level):
        for j in range(level):
            rows = slice(i * h // level, -(-(i + 1) * h // level))
            cols = slice(j * h // level, -(-(j + 1) * h // level))
            out[:, :, i, j] = x[:, :, rows, cols].mean(dim=(2, 3))
    return out


def reference_hcl(s, t, weights):
    """sum_l w_l * mean((pool_l s - pool_l t)^2) / sum_l w_l over the listed {level: weight} (None: full map)."""
    total = 0
    for level, weight in weights.items():
        a, b = (s, t) if level is None else (adaptive_mean(s, level), adaptive_mean(t, level))
        total = total + weight * ((a - b) ** 2).sum() / a.numel()
    return total / sum(weights.values())


# the levels each map size uses: a level is skipped unless smaller than the map; each used one halves the weight
WEIGHTS = {2: {None: 1, 1: 0.5}, 4: {None: 1, 2: 0.5, 1: 0.25}, 7: {None: 1, 4: 0.5, 2: 0.25, 1: 0.125}}


@pytest.mark.parametrize("side", sorted(WEIGHTS))
def test_hcl_equals_the_written_out_levels_with_gradients(side):
    g = torch.Generator().manual_seed(side)
    s = torch.randn(3, 5, side, side, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(3, 5, side, side, dtype=torch.float64, generator=g, requires_grad=True)
    ours, expected = hcl_loss(s, t), reference_hcl(s, t, WEIGHTS[side])
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(ours, (s, t)), torch.autograd.grad(expected, (s, t))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert torch.autograd.gradcheck(hcl_loss, (s, t))


def test_hcl_lays_tokens_out_row_by_row():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 49, 6, dtype=torch.float64, generator=g), torch.randn(2, 49, 6, dtype=torch.float64,
                                                                                 generator=g)
    as_maps = [torch.stack([torch.stack([x[:, 7 * r + c] for c in range(7)], dim=-1) for r in range(7)], dim=-2)
               for x in (s, t)]  # token 7r + c is pixel (r, c)
    torch.testing.assert_close(hcl_loss(s, t), reference_hcl(*as_maps, WEIGHTS[7]), rtol=1e-12, atol=0)
    assert hcl_loss(s, s) == 0


# parameter counts -----------------------------------------------------------------------------------------------

# the totals of the official modules at 224 px, counted by running the paper's code: (prompts with feedback
# projections, region attention, aligners)
OFFICIAL = {("resnet18", "swin_tiny_patch4_window7_224"): (24_138_904, 13_570_560, 812_533),
            ("deit_tiny_patch16_224", "convnext_tiny"): (6_651_364, 7_082_496, 741_376),
            ("resmlp_12_224", "swin_tiny_patch4_window7_224"): (24_138_904, 13_373_952, 812_533)}


@pytest.mark.parametrize("student, teacher", sorted(OFFICIAL))
def test_the_parameters_equal_the_official_totals(student, teacher):
    torch.manual_seed(0)
    args = parse()
    distiller = build_distiller(args, create_model(student, num_classes=100, img_size=224), input_size=224,
                                teacher=create_model(teacher, num_classes=100, img_size=224))
    count = [sum(p.numel() for p in m.parameters()) for m in (distiller.prompts, distiller.region_attention,
                                                               distiller.aligners)]
    assert tuple(count) == OFFICIAL[student, teacher]
    assert distiller.extra_parameter_count() == sum(OFFICIAL[student, teacher])


# the prompted teacher at beta = 0 ---------------------------------------------------------------------------------

BETA_ZERO_TEACHERS = ["resnet18", "convnext_atto", "vit_tiny_patch16_224", "swin_pico_patch4_window7_224"]


def random_feedback_hooks(distiller, generator):
    """Prompt hooks fed with random feedback of the right shape (what a step would fuse)."""
    hooks = {}
    for stage in distiller.afp_stages:
        channels, side = stage_map_size(distiller.teacher_stages[stage])
        block = distiller.prompts[str(stage)]
        feedback = torch.randn(BATCH, channels, side, side, generator=generator)
        if hasattr(block, "feedback"):
            feedback = block.feedback(feedback)
        hooks[stage] = lambda x, block=block, f=feedback: block(x, f)
    return hooks


def beta_zero_pass(teacher_name):
    torch.manual_seed(0)
    teacher = create_model(teacher_name, num_classes=CLASSES, img_size=IMG)
    distiller = build_distiller(parse(), create_model("resnet18", num_classes=CLASSES, img_size=IMG), input_size=IMG,
                                teacher=teacher)
    source = FrozenSource(teacher, distiller.teacher_request, "cpu", "fp32")
    images = torch.randn(BATCH, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = extract_features(teacher, images, FeatureRequest(stages=(1, 2, 3, 4)))
        prompted = source.staged_pass(images, random_feedback_hooks(distiller, torch.Generator().manual_seed(2)))
    return plain, prompted


@pytest.mark.parametrize("teacher", BETA_ZERO_TEACHERS)
def test_at_beta_zero_the_prompted_teacher_is_the_teacher_exactly(teacher):
    plain, prompted = beta_zero_pass(teacher)
    assert torch.equal(prompted.logits, plain.logits)
    for stage in (1, 2, 3, 4):
        assert torch.equal(prompted.stages[stage], plain.stages[stage]), stage


@pytest.mark.parametrize("teacher", ["vit_tiny_patch16_224", "swin_pico_patch4_window7_224"])
def test_the_official_token_order_defect_would_fail_the_beta_zero_test(teacher, monkeypatch):
    """The official prompt block turns a map back into tokens by reshape, without the transpose."""
    def official(h, hook, layout, prefix):
        b, _, d = h.shape if layout == "NLC" else (h.shape[0], None, h.shape[-1])
        if layout == "NHWC":
            grid = h.permute(0, 3, 1, 2)
            return hook(grid).reshape(h.shape)
        tokens = h[:, prefix:]
        side = math.isqrt(tokens.shape[1])
        grid = tokens.transpose(1, 2).reshape(b, d, side, side)
        return torch.cat((h[:, :prefix], hook(grid).reshape(b, -1, d)), dim=1)
    monkeypatch.setattr(staged, "_hooked", official)
    plain, prompted = beta_zero_pass(teacher)
    assert not torch.equal(prompted.logits, plain.logits)


def test_a_hook_sees_the_patch_tokens_as_a_row_major_map_and_the_class_token_passes_untouched():
    """A ViT's (B, 1 + 4, D) tokens: the hook gets (B, D, 2, 2) with token 1 + 2r + c at (r, c), and what it returns
    replaces the patch tokens only (the official code dropped the last token instead of the class token)."""
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    seen = {}

    def hook(grid):
        seen["grid"] = grid.clone()
        return grid + 100
    out = staged._hooked(tokens, hook, "NLC", prefix=1)
    for r in range(2):
        for c in range(2):
            assert torch.equal(seen["grid"][:, :, r, c], tokens[:, 1 + 2 * r + c])
    assert torch.equal(out[:, 0], tokens[:, 0]) and torch.equal(out[:, 1:], tokens[:, 1:] + 100)


def test_the_region_attention_does_not_depend_on_the_samples_place_in_the_batch():
    """Its positional encoding is indexed by token position (the official code indexed it by batch position)."""
    torch.manual_seed(0)
    distiller = build_distiller(parse(), create_model("resnet18", num_classes=CLASSES, img_size=IMG), input_size=IMG,
                                teacher=create_model("convnext_atto", num_classes=CLASSES, img_size=IMG)).eval()
    images = torch.randn(4, 3, IMG, IMG)
    stages = extract_features(distiller.student, images, FeatureRequest(stages=(1, 2, 3, 4))).stages
    order = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        plain = distiller.region_attention(stages)
        permuted = distiller.region_attention({s: t[order] for s, t in stages.items()})
    for stage in plain:
        torch.testing.assert_close(permuted[stage], plain[stage][order], rtol=1e-5, atol=1e-6)


# gradients, module tree, precision -------------------------------------------------------------------------------

def check_gradients(distiller, step, closed):
    """beta and every module outside the prompt blocks at every step; the prompt blocks' modules from the second
    step on, unless the block's SE gate was closed for the whole batch (tests/pat_gates.py)."""
    for name, module in distiller.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if name.startswith("student") or not params:
            continue
        has_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        assert has_grad or excused(distiller, name, step, closed), (step, name)


def two_steps(student_name, teacher_name, autocast=contextlib.nullcontext, precision="fp32", flags=(), on_teacher=None):
    """Two training steps of PAT, the gradient rule checked at each; `on_teacher(model)` sees the teacher first."""
    torch.manual_seed(0)
    teacher = create_model(teacher_name, num_classes=CLASSES, img_size=IMG)
    if on_teacher is not None:
        on_teacher(teacher)
    distiller = build_distiller(parse(*flags), create_model(student_name, num_classes=CLASSES, img_size=IMG),
                                input_size=IMG, teacher=teacher).train()
    source = FrozenSource(teacher, distiller.teacher_request, "cpu", precision)
    distiller.attach_teacher(source)
    optimizer = create_optimizer_v2(distiller, opt="sgd", lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        labels = torch.randint(0, CLASSES, (BATCH,), generator=g)
        batch = Batch(images=torch.randn(BATCH, 3, IMG, IMG, generator=g), targets=labels, labels=labels,
                      index=torch.arange(BATCH))
        with closed_gates(distiller) as closed:
            loss, losses = train_step(distiller, source, optimizer, batch, autocast=autocast)
        assert set(losses) == {"ce", "kd", "hcl", "reg"} and torch.isfinite(loss), losses
        check_gradients(distiller, step, closed)
        if step == 0:
            assert all(block.beta.grad.abs() > 0 for block in distiller.prompts.values())
            assert all(block.beta.item() != 0 for block in distiller.prompts.values())  # the step moved beta
    return distiller, source, losses


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["swin_pico_patch4_window7_224", "mixer_s16_224", "resnet18"])
def test_pat_trains_on_swin_mixer_and_resnet_teachers(teacher):
    distiller, source, _ = two_steps("deit_tiny_patch16_224" if teacher == "resnet18" else "resnet18", teacher)
    assert not any(p.requires_grad or p.grad is not None for p in source.model.parameters())
    assert not source.model.training


def test_the_saved_state_and_ddp_hold_no_teacher_tensor():
    distiller, source, _ = two_steps("resnet18", "convnext_atto", flags=("--pat-afp-stage", "2", "3"))
    teacher_tensors = {t.data_ptr() for t in (*source.model.parameters(), *source.model.buffers())}
    state = distiller.extra_state_dict()
    assert not any(k.startswith("teacher") for k in state) and {"prompts.2.beta", "prompts.3.beta"} <= set(state)
    assert not {t.data_ptr() for t in state.values()} & teacher_tensors
    distiller.train()
    assert not source.model.training
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(distiller)
        tensors = {t.data_ptr() for t in (*wrapped.parameters(), *wrapped.buffers())}
        assert tensors and not tensors & teacher_tensors
    finally:
        dist.destroy_process_group()


@pytest.mark.bf16
def test_the_prompted_pass_runs_in_the_teachers_precision_under_the_students_autocast():
    seen = set()

    def record(teacher):
        for m in teacher.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    two_steps("resnet18", "convnext_atto", autocast=autocast_factory(torch.device("cpu"), torch.bfloat16),
              on_teacher=record)
    assert seen == {torch.float32}  # both passes, although the student ran under bf16 autocast


# refusals and flags ------------------------------------------------------------------------------------------------

def test_a_teacher_cache_is_refused_before_anything_is_built(tmp_path):
    args = parse("--teacher", "resnet18", "--teacher-cache", str(tmp_path))
    with pytest.raises(UserError, match="--distiller pat needs the live teacher .*prompts train inside the teacher"):
        check_arguments(args, DistEnv())


def test_a_teacher_family_without_a_staged_forward_is_refused_by_name():
    teacher = create_model("mobilenetv2_100", num_classes=CLASSES, img_size=IMG)
    with pytest.raises(UserError, match="no staged forward for teacher class EfficientNet"):
        build_distiller(parse(), create_model("resnet18", num_classes=CLASSES, img_size=IMG), input_size=IMG,
                        teacher=teacher)


def test_pat_declares_the_kd_flags_it_reads():
    helps = {a.dest: a.help for a in build_train_parser(DISTILLERS)._actions}
    assert "pat" in helps["kd_loss_weight"] and "also read by pat" in helps["kd_temperature"]
    args = parse("--kd-temperature", "4", "--kd-loss-weight", "2", "--pat-afp-stage", "3",
                 "--pat-mse-loss-weight", "0.5", "--pat-reg-loss-weight", "0.25")
    distiller = build_distiller(args, create_model("resnet18", num_classes=CLASSES, img_size=IMG), input_size=IMG,
                                teacher=create_model("convnext_atto", num_classes=CLASSES, img_size=IMG))
    assert (distiller.temperature, distiller.kd_loss_weight, distiller.afp_stages) == (4.0, 2.0, (3,))
    assert (distiller.mse_loss_weight, distiller.reg_loss_weight) == (0.5, 0.25) and list(distiller.prompts) == ["3"]


def test_a_step_without_the_attached_teacher_says_what_to_do():
    distiller, _, _ = two_steps("resnet18", "convnext_atto")
    distiller.attach_teacher(None)
    labels = torch.arange(BATCH) % CLASSES
    batch = Batch(images=torch.randn(BATCH, 3, IMG, IMG), targets=labels, labels=labels, index=torch.arange(BATCH))
    copy.deepcopy(distiller)  # the distiller stays copyable
    with pytest.raises(RuntimeError, match="attach_teacher"):
        distiller(batch, None)
