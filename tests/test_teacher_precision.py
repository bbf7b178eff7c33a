"""A bf16 teacher (autocast) keeps its embeddings: per-dimension Pearson correlation >= 0.999 with fp32."""
import os

import pytest
import torch

from engine.datasets.fashion_mnist import read_fashion_mnist
from engine.loader import build_eval_transform, resolve_data_settings
from engine.models import create_model
from engine.sources import FrozenSource
from engine.weights import load_weights
from kdcore.features import FeatureRequest

DEMO_TEACHER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "pretrained", "convnext_demo_32_fmnist.pth")
EMBEDDING = FeatureRequest(logits=False, embedding=True)


def per_dimension_pearson(a, b):
    a, b = a.double() - a.double().mean(0), b.double() - b.double().mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))


def embeddings(model, images, precision):
    """The source's embeddings of `images` in float; and the dtypes it computed in: the embedding's own, and
    those of every convolution's and linear layer's output inside the source."""
    layers = set()
    hooks = [m.register_forward_hook(lambda module, args, out: layers.add(out.dtype))
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    source = FrozenSource(model, EMBEDDING, torch.device("cpu"), precision)
    try:
        with torch.inference_mode():
            computed = source.features(images).embedding
    finally:
        for hook in hooks:
            hook.remove()
    return computed.float(), computed.dtype, layers


def fp32_and_bf16_embeddings(model, images):
    """Both precisions' embeddings in float, once each source is seen to compute in its own precision. A bf16
    embedding can come out fp32 (ConvNeXt's head LayerNorm runs in fp32 under autocast), so the layers tell."""
    fp32, fp32_dtype, fp32_layers = embeddings(model, images, "fp32")
    assert fp32_dtype == torch.float32 and fp32_layers == {torch.float32}, (fp32_dtype, fp32_layers)
    bf16, _, bf16_layers = embeddings(model, images, "bf16")
    assert bf16_layers == {torch.bfloat16}, bf16_layers
    return fp32, bf16


def fashion_mnist_batch(model, n, img_size=None):
    from types import SimpleNamespace
    dataset = read_fashion_mnist("", "val")
    args = SimpleNamespace(mean=None, std=None, img_size=img_size, input_size=None, crop_pct=None, interpolation="")
    dataset.transform = build_eval_transform(resolve_data_settings(args, model, dataset))
    return torch.stack([dataset[i][0] for i in range(n)])


@pytest.mark.bf16
def test_bf16_demo_teacher_embeddings_track_fp32(fashion_mnist):
    model = load_weights(create_model("convnext_demo_32", num_classes=10), DEMO_TEACHER, "convnext_demo_32")
    images = fashion_mnist_batch(model, 256)
    fp32, bf16 = fp32_and_bf16_embeddings(model, images)
    assert per_dimension_pearson(fp32, bf16).min() >= 0.999


@pytest.mark.slow
@pytest.mark.bf16
def test_bf16_swin_tiny_embeddings_track_fp32():
    """The benchmark's teacher at 224 px on a fixed batch of smooth random colour images.

    Its weights are random (no hub download here). On upsampled Fashion-MNIST, whose grey images a random
    Swin barely tells apart, 3 of 768 dims fall to 0.9976: little spread across the batch leaves bf16's
    rounding more weight. Diverse inputs are the fair test of a random network.
    """
    torch.manual_seed(0)
    model = create_model("swin_tiny_patch4_window7_224", num_classes=100)
    coarse = torch.randn(32, 3, 14, 14, generator=torch.Generator().manual_seed(1))
    images = torch.nn.functional.interpolate(coarse, size=224, mode="bilinear")
    fp32, bf16 = fp32_and_bf16_embeddings(model, images)
    assert not torch.equal(fp32, bf16)
    assert per_dimension_pearson(fp32, bf16).min() >= 0.999


@pytest.mark.parametrize("flags, isa", [("fpu sse2 avx2 fma", "avx2"),
                                         ("avx2 avx512f avx512bw avx512_bf16", "avx512_bf16"),
                                         ("avx2 avx512f amx_bf16 amx_tile avx512_bf16", "amx_tile")])
def test_cpu_name_tells_the_vector_isa(tmp_path, flags, isa):
    """Figures name their CPU: two EPYCs with the same model name but different vector units must read differently."""
    from kdcore.machine import cpu_model_name
    block = f"processor\t: 0\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(block + "\n" + block.replace(": 0", ": 1", 1))
    cores = len(os.sched_getaffinity(0))
    assert cpu_model_name(str(cpuinfo)) == f"AMD EPYC (family 25 model 1, {isa}, {cores} cores)"
