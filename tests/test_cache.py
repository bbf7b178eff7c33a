"""Source caches (engine/cache.py, tools/build_cache.py): a timm source's rows equal a direct forward, a random-weight
open_clip model's zero-shot logits equal a direct computation with all 12 templates, an interrupted build resumes
to the same files, a cache of another dataset is refused, and cached rows are read memory-mapped by index."""
import json
import types
from pathlib import Path

import numpy as np
import open_clip  # required (requirements.txt): a missing package fails the module, never skips it
import pytest
import torch

import tools.build_cache as build_cache_tool
from engine.cache import CacheWriter, SourceCache, dataset_identity, mix_rows
from engine.datasets import dataset_labels
from engine.datasets.synthetic import make_synthetic
from engine.loader import build_eval_transform, resolve_data_settings
from engine.models import create_model
from engine.weights import load_weights
from kdcore.errors import UserError

N, BATCH = 40, 8
PAPER_TEMPLATES = [  # the RichKD paper's 12 prompts, written out independently of the tool
    "a photo of a {}", "a blurry photo of a {}", "a cropped photo of a {}", "a close-up photo of a {}",
    "a low resolution photo of a {}", "a bright photo of a {}", "a picture of a {}", "a detailed image of a {}",
    "a sketch of a {}", "a natural photo of a {} in the wild", "a realistic image of a {}",
    "a high quality photo of a {}"]
TINY_CLIP = "richkd-test-tiny-clip"
TINY_CLIP_CONFIG = {"embed_dim": 24,
                    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def tool_args(output, *flags, size=N):
    return build_cache_tool.build_parser().parse_args(
        ["--dataset", "synthetic", "--synthetic-train-size", str(size), "-b", str(BATCH), "-j", "0", "--device", "cpu",
         "--output", str(output), *flags])


def demo_source_flags(weights):
    return ["--source", "convnext_demo_32", "--weights", weights]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory, random_demo_teacher):
    return build_cache_tool.build_cache(tool_args(tmp_path_factory.mktemp("cache") / "demo",
                                                  *demo_source_flags(random_demo_teacher)))


def test_timm_source_rows_equal_a_direct_forward_on_clean_images(demo_cache, random_demo_teacher):
    dataset = make_synthetic("train", N, 10)
    model = create_model("convnext_demo_32", num_classes=10)
    model = load_weights(model, random_demo_teacher, "convnext_demo_32").eval()
    settings = resolve_data_settings(tool_args("unused", *demo_source_flags(random_demo_teacher)), model, dataset)
    dataset.transform = build_eval_transform(settings)
    images = torch.stack([dataset[i][0] for i in range(N)])
    with torch.no_grad():
        final = model.forward_features(images)
        embedding, logits = model.forward_head(final, pre_logits=True), model.forward_head(final)
    cache = SourceCache(demo_cache)
    assert all(isinstance(a, np.memmap) for a in cache.arrays.values()), "read memory-mapped, not loaded"
    index = torch.tensor([39, 0, 17, 17, 5])
    rows = cache.lookup(index)
    assert rows.logits.dtype == torch.float32 and rows.logits.shape == (5, 10) and rows.embedding.shape == (5, 256)
    assert torch.allclose(rows.logits, logits[index], atol=1e-5)
    assert torch.allclose(rows.embedding, embedding[index], atol=1e-5)
    meta = json.loads((Path(demo_cache) / "meta.json").read_text())
    assert meta["dataset"] == dataset_identity(dataset.labels, [f"class {i}" for i in range(10)])
    assert meta["done"] == N and meta["widths"] == {"logits": 10, "embedding": 256}


def test_a_cache_of_another_dataset_or_lacking_an_array_is_refused(demo_cache):
    cache = SourceCache(demo_cache)
    ours = dataset_labels(make_synthetic("train", N, 10))
    cache.check(ours, ["logits", "embedding"], 10)
    for labels in (dataset_labels(make_synthetic("train", N, 10, seed=1)), ours[:-1], ours.roll(1)):
        with pytest.raises(UserError, match="built for another training set"):
            cache.check(labels, ["logits"], 10)
    with pytest.raises(UserError, match="12 classes"):
        cache.check(ours, ["logits"], 12)


def test_only_the_requested_arrays_are_stored(tmp_path, random_demo_teacher):
    path = build_cache_tool.build_cache(tool_args(tmp_path / "c", *demo_source_flags(random_demo_teacher), "--store",
                                                  "logits"))
    cache = SourceCache(path)
    assert set(cache.arrays) == {"logits"} and cache.lookup(torch.tensor([1])).embedding is None
    with pytest.raises(UserError, match="needs embedding"):
        cache.check(dataset_labels(make_synthetic("train", N, 10)), ["embedding"], 10)


def test_interrupted_build_resumes_and_ends_with_the_same_files(tmp_path, monkeypatch, demo_cache, random_demo_teacher):
    original = build_cache_tool.build_source

    def interrupted_on_third_batch(*args, **kwargs):
        source, *rest = original(*args, **kwargs)
        calls = []

        def run(images):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return source.of_images(images)
        return (types.SimpleNamespace(of_images=run), *rest)

    target = tmp_path / "resumed"
    monkeypatch.setattr(build_cache_tool, "build_source", interrupted_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        build_cache_tool.build_cache(tool_args(target, *demo_source_flags(random_demo_teacher)))
    assert not target.exists(), "nothing appears at the output path until the cache is complete"
    partial = tmp_path / "resumed.partial"
    assert json.loads((partial / "meta.json").read_text())["done"] == 2 * BATCH
    with pytest.raises(UserError, match="unfinished"):
        SourceCache(str(partial))
    monkeypatch.setattr(build_cache_tool, "build_source", original)
    assert build_cache_tool.build_cache(tool_args(target, *demo_source_flags(random_demo_teacher))) == str(target)
    assert not partial.exists()
    for name in ("meta.json", "logits.npy", "embedding.npy"):
        assert (target / name).read_bytes() == (Path(demo_cache) / name).read_bytes(), name


def test_existing_output_and_foreign_partial_build_are_refused(tmp_path, demo_cache):
    with pytest.raises(UserError, match="already exists"):
        CacheWriter(demo_cache, {"size": 1}, {}, {"logits": 1})
    identity = dataset_identity([0, 1, 0], ["a", "b"])
    CacheWriter(tmp_path / "c", identity, {"name": "one"}, {"logits": 2}).write({"logits": np.ones((1, 2))})
    with pytest.raises(UserError, match="another source, dataset or setting"):
        CacheWriter(tmp_path / "c", identity, {"name": "two"}, {"logits": 2})
    writer = CacheWriter(tmp_path / "c", identity, {"name": "one"}, {"logits": 2})
    assert writer.done == 1
    writer.write({"logits": torch.full((2, 2), 3.0)})
    cache = SourceCache(writer.finish())
    assert torch.equal(cache.lookup(torch.tensor([2, 0])).logits, torch.tensor([[3.0, 3.0], [1.0, 1.0]]))


def test_cached_rows_are_mixed_with_their_partners_rows():
    """lam is one float (timm's batch mode) or one per image (its elem/pair modes, sample pairing)."""
    x = torch.arange(12, dtype=torch.float64).view(4, 3)
    partner = torch.tensor([2, 0, 3, 1])
    per_image = [0.9, 0.2, 0.2, 0.9]
    expected = torch.stack([0.3 * x[i] + 0.7 * x[partner[i]] for i in range(4)])
    assert torch.allclose(mix_rows(x, x[partner], 0.3), expected)
    expected = torch.stack([per_image[i] * x[i] + (1 - per_image[i]) * x[partner[i]] for i in range(4)])
    assert torch.allclose(mix_rows(x, x[partner], torch.tensor(per_image, dtype=torch.float64)[:, None]), expected)
    assert mix_rows(x, x[partner], 1.0) is x


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A small open_clip architecture with random weights saved to a local file (nothing downloaded)."""
    folder = tmp_path_factory.mktemp("clip")
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    torch.save(model.state_dict(), folder / "weights.pth")
    return open_clip, folder / "weights.pth"


def test_clip_zero_shot_logits_equal_a_direct_computation_with_all_12_templates(tmp_path, tiny_clip):
    open_clip, weights = tiny_clip
    assert list(build_cache_tool.TEMPLATES) == PAPER_TEMPLATES
    size = 12  # batches of 8 and 4
    path = build_cache_tool.build_cache(tool_args(tmp_path / "clip", "--source", f"clip:{TINY_CLIP}", "--weights",
                                                  str(weights), size=size))
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    model.eval()
    names = [f"class {i}" for i in range(10)]
    with torch.no_grad():
        class_vectors = []
        for name in names:
            texts = model.encode_text(tokenizer([t.format(name) for t in PAPER_TEMPLATES])).double()
            assert texts.shape[0] == 12
            mean = (texts / texts.norm(dim=1, keepdim=True)).mean(dim=0)
            class_vectors.append(mean / mean.norm())
        dataset = make_synthetic("train", size, 10)
        images = torch.stack([preprocess(dataset[i][0]) for i in range(size)])
        image_vectors = model.encode_image(images).double()
    image_vectors = image_vectors / image_vectors.norm(dim=1, keepdim=True)
    expected = image_vectors @ torch.stack(class_vectors).t()
    rows = SourceCache(path).lookup(torch.arange(size))
    assert rows.logits.shape == (size, 10) and rows.embedding.shape == (size, 24)
    assert torch.allclose(rows.logits.double(), expected, atol=1e-5)
    assert torch.allclose(rows.embedding.double(), image_vectors, atol=1e-5)
    assert (rows.logits.abs() <= 1 + 1e-5).all(), "cosines, not scaled by CLIP's logit scale"
    meta = json.loads((tmp_path / "clip" / "meta.json").read_text())
    assert meta["source"]["templates"] == PAPER_TEMPLATES


def test_missing_clip_weights_name_what_to_place_where(tmp_path, tiny_clip):
    args = tool_args(tmp_path / "clip", "--source", f"clip:{TINY_CLIP}", "--weights", str(tmp_path / "none.bin"))
    with pytest.raises(UserError, match=r"CLIP weights not found at .*none\.bin.*place the"):
        build_cache_tool.build_cache(args)
    assert not list(tmp_path.iterdir())
    with pytest.raises(UserError, match="own preprocessing"):
        build_cache_tool.build_cache(tool_args(tmp_path / "c", "--source", f"clip:{TINY_CLIP}", "--weights",
                                               str(tiny_clip[1]), "--img-size", "64"))
    with pytest.raises(UserError, match="unknown open_clip model"):
        build_cache_tool.build_cache(tool_args(tmp_path / "c", "--source", "clip:no-such-model", "--weights",
                                               str(tiny_clip[1])))


def test_cli_reports_a_user_error_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cache_tool.main(["--dataset", "synthetic", "--source", "convnext_demo_32", "--weights",
                               str(tmp_path / "missing.pth"), "--output", str(tmp_path / "c"), "--device", "cpu"])
    assert exit_info.value.code == 2 and "checkpoint not found" in capsys.readouterr().err
