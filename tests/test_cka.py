"""Minibatch linear CKA (tools/cka_metric.py) against independent formulas, its invariances, and tools/cka.py."""
import itertools
import json
import os

import numpy as np
import pytest
import torch

from tools.cka import main as cka_main
from tools.cka_metric import MinibatchCKA, hsic_unbiased, linear_gram


def features(seed, shape):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape))


def cka_matrix(rows, cols, batches=1, unbiased=True):
    """CKA of each row against each column representation, `batches` equal minibatches."""
    cka = MinibatchCKA(unbiased=unbiased)
    for part in zip(*[r.chunk(batches) for r in rows], *[c.chunk(batches) for c in cols]):
        cka.update(part[:len(rows)], part[len(rows):])
    return cka.value()


def feature_space_cka(x, y):
    """Kornblith et al.'s linear CKA on centred features: ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F), in numpy."""
    x = x.reshape(len(x), -1).numpy().astype(np.float64)
    y = y.reshape(len(y), -1).numpy().astype(np.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def u_statistic_hsic(gram_k, gram_l):
    """Unbiased HSIC as the U-statistic over distinct index tuples (Song et al. 2012, eq. 3), by enumeration."""
    k, m = gram_k, gram_l
    n = len(k)
    pairs = sum(k[i, j] * m[i, j] for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    triples = sum(k[i, j] * m[i, q] for i, j, q in itertools.permutations(range(n), 3)) / (n * (n - 1) * (n - 2))
    quads = sum(k[i, j] * m[q, r] for i, j, q, r in itertools.permutations(range(n), 4)) / (
        n * (n - 1) * (n - 2) * (n - 3))
    return pairs + quads - 2 * triples


def test_one_batch_biased_cka_is_feature_space_linear_cka():
    x, y = features(0, (40, 3, 4, 5)), features(1, (40, 25))  # a CNN-like map and a vector, flattened per sample
    y = y + 0.5 * x.reshape(40, -1)[:, :25]  # related, so the value is far from 0
    expected = feature_space_cka(x, y)
    assert 0.2 < expected < 0.9
    assert cka_matrix([x], [y], unbiased=False).item() == pytest.approx(expected, rel=1e-12)


def test_unbiased_hsic_equals_the_u_statistic():
    x, y = features(2, (8, 5)), features(3, (8, 3, 2))
    gram_k, gram_l = linear_gram(x), linear_gram(y)
    expected = u_statistic_hsic(gram_k.numpy(), gram_l.numpy())
    assert hsic_unbiased(gram_k, gram_l).item() == pytest.approx(expected, rel=1e-10)


def test_minibatch_cka_is_the_ratio_of_mean_hsics():
    """Nguyen et al.: HSIC averaged over minibatches first, then one ratio (not a mean of per-batch CKAs)."""
    x, y = features(4, (21, 6)), features(5, (21, 4))
    parts = list(zip(x.chunk(3), y.chunk(3)))

    def mean_hsic(a, b):
        return np.mean([u_statistic_hsic(linear_gram(p[a]).numpy(), linear_gram(p[b]).numpy()) for p in parts])

    expected = mean_hsic(0, 1) / np.sqrt(mean_hsic(0, 0) * mean_hsic(1, 1))
    assert cka_matrix([x], [y], batches=3).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("unbiased", [True, False])
def test_a_representation_against_itself_is_one(unbiased):
    x, y = features(6, (30, 7)), features(7, (30, 2, 3))
    values = cka_matrix([x, y], [x, y], batches=3, unbiased=unbiased)
    assert torch.diagonal(values).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    assert values[0, 1] < 0.99


@pytest.mark.parametrize("unbiased", [True, False])
def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(unbiased):
    x, y = features(8, (30, 12)), features(9, (30, 9))
    y = y + x[:, :9]
    q_x = torch.linalg.qr(features(10, (12, 12)))[0]
    q_y = torch.linalg.qr(features(11, (9, 9)))[0]
    reference = cka_matrix([x], [y], batches=2, unbiased=unbiased).item()
    for a, b in ((x @ q_x, y), (x, y @ q_y), (3.7 * x, y), (x, 0.02 * y), (5.0 * x @ q_x, 0.3 * y @ q_y)):
        assert cka_matrix([a], [b], batches=2, unbiased=unbiased).item() == pytest.approx(reference, rel=1e-10)


def test_fewer_than_four_examples_per_minibatch_is_refused():
    with pytest.raises(ValueError, match="at least 4"):
        cka_matrix([features(12, (3, 4))], [features(13, (3, 4))])


def test_tool_maps_a_model_against_itself_and_side_by_side(tmp_path, saved_weights):
    """tools/cka.py on generated images: the teacher as its own student gives 1 on the diagonal; a second
    student adds a panel; every layer (stages/blocks, embedding, logits) gets a row or a column."""
    teacher = saved_weights("convnext_demo_32")
    student = saved_weights("mixer_demo_32")
    png, out = tmp_path / "cka.png", tmp_path / "cka.json"
    result = cka_main(["--dataset", "synthetic", "--synthetic-val-size", "24", "--images", "20", "-b", "10",
                       "--workers", "0", "--teacher", "convnext_demo_32", "--teacher-checkpoint", teacher,
                       "--student", "convnext_demo_32", "mixer_demo_32", "--student-checkpoint", teacher, student,
                       "--labels", "itself", "mixer", "--output", str(png), "--json", str(out)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(out.read_text())["students"][1]["layers"] == result["students"][1]["layers"]
    assert result["images"] == 20 and result["minibatches"] == 2
    itself, mixer = result["students"]
    assert result["teacher_layers"] == ["stages.0", "stages.1", "stages.2", "stages.3", "embedding", "logits"]
    assert np.diagonal(np.array(itself["cka"])) == pytest.approx(1.0, abs=1e-9)
    assert mixer["layers"] == [f"blocks.{i}" for i in range(6)] + ["embedding", "logits"]
    assert np.array(mixer["cka"]).shape == (6, 8)


def test_tool_refuses_a_label_count_that_does_not_match(tmp_path, saved_weights, capsys):
    teacher = saved_weights("convnext_demo_32")
    with pytest.raises(SystemExit) as exit_info:
        cka_main(["--dataset", "synthetic", "--teacher", "convnext_demo_32", "--teacher-checkpoint", teacher,
                  "--student", "convnext_demo_32", "--student-checkpoint", teacher, teacher, "--labels", "one",
                  "--output", os.path.join(tmp_path, "x.png")])
    assert exit_info.value.code == 2
    assert "--labels takes one title per student checkpoint (2), got 1" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(tmp_path, "x.png"))
