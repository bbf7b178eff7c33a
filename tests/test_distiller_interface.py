"""The distiller interface the zoo builds on: a distiller declares the paper stages, embeddings and logits it
needs and receives them, with the step's `Batch`, from one forward pass per model.

A small distiller written here reads paper stages 2 and 4 of both models, the pooled embeddings, the hard
labels and the dataset indices, and trains two steps for a CNN, a DeiT, a Swin and a Mixer student against a
ConvNeXt and a ViT teacher, with mixup off and on. The run is built by train.py's own build steps. Checked:
each model runs once per step, the stage tensors equal an independent `forward_intermediates` call, and the
labels and indices match a dataset whose images encode their own index and class.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distillers import DISTILLERS, Distiller, register_distiller
from engine.config import parse_args_with_config
from engine.datasets import ArrayImageDataset
from engine.loop import train_step
from engine.train_args import build_train_parser
from engine.views import normalise
from kdcore.features import FeatureRequest, embedding_dim

STAGES = (2, 4)
N_IMAGES, N_CLASSES, MEAN, STD = 48, 6, (0.5,) * 3, (0.25,) * 3


def encoded_dataset():
    """Solid-colour 32 px images: red = 5 x dataset index, green = 40 x class, so both survive any resize."""
    index = np.arange(N_IMAGES)
    labels = (index * 7) % N_CLASSES
    images = np.zeros((N_IMAGES, 32, 32, 3), dtype=np.uint8)
    images[..., 0] = (5 * index)[:, None, None]
    images[..., 1] = (40 * labels)[:, None, None]
    images[..., 2] = 128
    return ArrayImageDataset(images, labels, N_CLASSES, "(encoded)", MEAN, STD)


def decode(images):
    """(dataset index, class) of each unmixed normalised image."""
    pixels = (images[:, :2].mean(dim=(2, 3)) * STD[0] + MEAN[0]) * 255
    return torch.round(pixels[:, 0] / 5).long(), torch.round(pixels[:, 1] / 40).long()


class InterfaceProbe(Distiller):
    """MSE between a projected student embedding and the teacher's, plus a term on each requested stage."""
    student_request = FeatureRequest(stages=STAGES, embedding=True)
    teacher_request = FeatureRequest(stages=STAGES, embedding=True, logits=True)

    def __init__(self, student, context):
        super().__init__(student, context)
        self.context = context
        self.projector = nn.Linear(context.student.embedding_width, context.teacher.embedding_width)
        self.seen = []

    def distill_losses(self, student_feats, teacher_feats, batch):
        self.seen.append((batch, student_feats, teacher_feats))
        stage_term = sum(student_feats.stages[s].float().pow(2).mean() for s in STAGES)
        return {"probe": F.mse_loss(self.projector(student_feats.embedding), teacher_feats.embedding)
                + 1e-3 * stage_term}


# forward_intermediates indices of paper stages 1-4 (ResNet: the 4 stage outputs after the stem; ConvNeXt and
# Swin: the 4 stages; ViT: blocks 1, 3, 9, 11 of 12), written out for the test's models
PAPER_STAGE_INDICES = {"ResNet": (1, 2, 3, 4), "ConvNeXt": (0, 1, 2, 3), "SwinTransformer": (0, 1, 2, 3),
                       "VisionTransformer": (1, 3, 9, 11)}


def independent_stages(model, x, stages_info):
    """Paper stages 2 and 4 from a direct forward_intermediates call, laid out as the interface promises."""
    name = type(model).__name__
    indices = PAPER_STAGE_INDICES[name] if name != "MlpMixer" else (0, 2, 6, 7)  # 8 blocks: round((i+1)*8/12)-1
    wanted = [indices[s - 1] for s in STAGES]
    if name == "VisionTransformer":
        _, inter = model.forward_intermediates(x, indices=sorted(set(wanted)), output_fmt="NLC",
                                               return_prefix_tokens=True, norm=False)
        by_index = dict(zip(sorted(set(wanted)), [torch.cat([prefix, tokens], dim=1) for tokens, prefix in inter]))
    elif name == "MlpMixer":
        _, inter = model.forward_intermediates(x, indices=sorted(set(wanted)), output_fmt="NLC", norm=False)
        by_index = dict(zip(sorted(set(wanted)), inter))
    else:
        _, inter = model.forward_intermediates(x, indices=sorted(set(wanted)), norm=False)
        if name == "SwinTransformer":
            inter = [t.flatten(2).transpose(1, 2) for t in inter]
        by_index = dict(zip(sorted(set(wanted)), inter))
    result = {s: by_index[indices[s - 1]] for s in STAGES}
    for s in STAGES:
        assert tuple(result[s].shape[1:]) == stages_info[s].shape
    return result


class CallCounter:
    """Counts forward_intermediates/forward_features calls of one model (instance-level wrappers)."""

    def __init__(self, model):
        self.calls, self.paused = 0, False
        for method in ("forward_intermediates", "forward_features"):
            original = getattr(model, method)

            def counted(*args, _original=original, **kwargs):
                self.calls += 0 if self.paused else 1
                return _original(*args, **kwargs)
            setattr(model, method, counted)


@pytest.fixture
def probe_registered():
    register_distiller("interface_probe")(InterfaceProbe)
    yield
    DISTILLERS.pop("interface_probe")


STUDENTS = ["resnet18", "deit_tiny_patch16_224", "swin_pico_patch4_window7_224", "mixer_s16_224"]
TEACHERS = ["convnext_atto", "vit_tiny_patch16_224"]


@pytest.mark.slow
@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("student", STUDENTS)
def test_probe_distiller_trains_two_steps(tmp_path, monkeypatch, saved_weights, probe_registered, student, teacher):
    import engine.run
    dataset = encoded_dataset()
    monkeypatch.setattr(engine.run, "load_datasets", lambda args: ("synthetic", dataset, encoded_dataset()))
    teacher_ckpt = saved_weights(teacher, num_classes=N_CLASSES, img_size=32)
    for mixup in ("0", "1.0"):
        argv = ["--model", student, "--teacher", teacher, "--teacher-pretrained", teacher_ckpt, "--distiller",
                "interface_probe", "--img-size", "32", "-b", "8", "--workers", "0", "--no-aug", "--smoothing", "0",
                "--mixup", mixup, "--teacher-precision", "fp32", "--no-eval-teacher", "--lr", "0.01",
                "--drop-path", "0", "--output", str(tmp_path), "--experiment", f"mixup{mixup}"]
        args = parse_args_with_config(build_train_parser(DISTILLERS), argv)
        run = engine.run.build_run(args)
        distiller = run.distiller
        assert isinstance(distiller, InterfaceProbe)
        context = distiller.context
        assert (context.num_classes, context.dataset_size, context.world_size) == (N_CLASSES, N_IMAGES, 1)
        assert set(context.student.stages) == set(context.teacher.stages) == set(STAGES)
        assert (context.student.embedding_width, context.teacher.embedding_width) == (
            embedding_dim(run.student), embedding_dim(run.teacher.model))
        counters = CallCounter(run.student), CallCounter(run.teacher.model)
        before = {k: v.clone() for k, v in run.student.state_dict().items()}
        run.model.train()
        loader = iter(run.data.train_loader)
        for step in range(2):
            batch = run.batches(next(loader))
            expected = expected_stages(run, batch.images, counters, context)  # before the step moves the weights
            loss, losses = train_step(run.model, run.teacher, run.optimizer, batch, autocast=run.autocast,
                                      sources=run.sources)
            assert [c.calls for c in counters] == [step + 1, step + 1], "each model runs once per step"
            assert torch.isfinite(loss) and losses["probe"] > 0
            assert distiller.projector.weight.grad is not None and distiller.projector.weight.grad.abs().sum() > 0
            seen_batch, student_feats, teacher_feats = distiller.seen[-1]
            check_batch(seen_batch, dataset, mixup_on=mixup != "0")
            assert seen_batch is batch
            for s in STAGES:
                assert torch.allclose(student_feats.stages[s].detach(), expected[0][s], atol=1e-5), f"student {s}"
                assert torch.allclose(teacher_feats.stages[s], expected[1][s], atol=1e-5), f"teacher stage {s}"
                assert not teacher_feats.stages[s].requires_grad
        moved = [k for k, v in run.student.state_dict().items()
                 if v.is_floating_point() and not torch.equal(v, before[k])]
        assert moved, "two steps must change the student"


def check_batch(batch, dataset, mixup_on):
    index, labels = batch.index.cpu(), batch.labels.cpu()
    expected_labels = torch.as_tensor(dataset.labels)[index]
    if not mixup_on:
        decoded_index, decoded_class = decode(batch.images.cpu())
        assert torch.equal(decoded_index, index) and torch.equal(decoded_class, labels)
        assert torch.equal(labels, expected_labels) and batch.lam == 1.0
        return
    # Mixed: every image is lam x itself + (1 - lam) x its mirror in the batch, as dataset[index] predicts.
    lam = float(batch.lam)
    clean = normalise(torch.stack([dataset[i][0] for i in index.tolist()]), MEAN, STD)  # the uint8 training views
    assert torch.allclose(batch.images.cpu(), lam * clean + (1 - lam) * clean.flip(0), atol=1e-5)
    dominant = expected_labels if lam >= 0.5 else expected_labels.flip(0)
    differ = expected_labels != expected_labels.flip(0)
    assert torch.equal(labels[differ], dominant[differ]) and torch.equal(labels, batch.targets.argmax(1).cpu())
    assert batch.targets.shape == (len(index), N_CLASSES)


def expected_stages(run, images, counters, context):
    """(student stages, teacher stages) by direct calls, not counted as the step's forwards."""
    for counter in counters:
        counter.paused = True
    try:
        with torch.no_grad():
            return (independent_stages(run.student, images, context.student.stages),
                    independent_stages(run.teacher.model, images, context.teacher.stages))
    finally:
        for counter in counters:
            counter.paused = False


def test_request_merge_and_mixup_refusal(tmp_path, monkeypatch):
    """A distiller that declares no mixup support refuses mixup at start-up with a clear error."""
    import engine.run
    from kdcore.errors import UserError

    @register_distiller("interface_no_mixup")
    class NoMixup(Distiller):
        supports_mixup = False
    try:
        args = parse_args_with_config(build_train_parser(DISTILLERS), [
            "--dataset", "synthetic", "--img-size", "32", "--model", "resnet18", "--distiller", "interface_no_mixup",
            "--mixup", "0.8", "-b", "8", "--workers", "0", "--output", str(tmp_path)])
        with pytest.raises(UserError, match="does not support mixup"):
            engine.run.build_run(args)
        assert not list(tmp_path.iterdir())
    finally:
        DISTILLERS.pop("interface_no_mixup")
    merged = FeatureRequest(stages=(4,), logits=False).merge(FeatureRequest(stages=(2,), embedding=True))
    assert merged == FeatureRequest(stages=(2, 4), embedding=True, logits=True)
