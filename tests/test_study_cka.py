"""The fidelity study's CKA maps over seeds (tools/study_cka.py): the floor, the cells beyond it, scratch against
scratch, and the AAD column, against expectations computed another way."""
import json

import numpy as np
import pytest
import torch

from distillers.rsd import ArchitectureAgnosticDecoupler
from engine.datasets import build_dataset
from engine.models import create_model
from tools import cka
from tools.study_cka import method_summary, seed_cka

IMAGES = 20
RECORDED = {"model": "resnet_demo_32", "dataset": "synthetic", "synthetic_val_size": 30, "num_classes": 10,
            "img_size": 32}


def save_run(path, seed, aad=None):
    """A run's checkpoint as train.py writes it: student weights, recorded args and (RSD) the AAD."""
    torch.manual_seed(seed)
    model = create_model("resnet_demo_32", num_classes=10, img_size=32)
    checkpoint = {"state_dict": model.state_dict(), "args": dict(RECORDED)}
    if aad is not None:
        checkpoint["distiller_extra"] = {f"aad.{k}": v for k, v in aad.state_dict().items()}
    torch.save(checkpoint, path)
    return str(path)


def unbiased_cka(x, y):
    """Linear CKA with Song et al.'s unbiased HSIC in closed form (one minibatch), in float64 numpy."""
    def hsic(k, m):
        n = len(k)
        k, m = k - np.diag(np.diag(k)), m - np.diag(np.diag(m))
        ones = np.ones(n)
        return (np.trace(k @ m) + ones @ k @ ones * (ones @ m @ ones) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * ones @ k @ m @ ones) / (n * (n - 3))
    x = x.reshape(len(x), -1).double().numpy()
    y = y.reshape(len(y), -1).double().numpy()
    k, m = x @ x.T, y @ y.T
    return hsic(k, m) / np.sqrt(hsic(k, k) * hsic(m, m))


@pytest.fixture
def study_runs(tmp_path, saved_weights):
    teacher = saved_weights("convnext_demo_32")
    aads = []
    for seed in range(3):
        torch.manual_seed(100 + seed)
        aad = ArchitectureAgnosticDecoupler(128, 256)
        aad[1].running_mean.normal_()  # a trained BN's statistics, not the identity of a fresh one
        aad[1].running_var.uniform_(0.5, 2.0)
        aads.append(aad.eval())
    runs = {"scratch": [save_run(tmp_path / f"scratch{s}.pth", s) for s in range(3)],
            "kd": [save_run(tmp_path / f"kd{s}.pth", s) for s in range(3)],  # the very weights of scratch
            "rsd": [save_run(tmp_path / f"rsd{s}.pth", 10 + s, aads[s]) for s in range(3)]}
    return teacher, runs, aads


def test_method_summary_floor_is_the_larger_std_and_differs_only_beyond_it():
    scratch = [[[0.5, 0.2]], [[0.6, 0.2]], [[0.7, 0.2]]]  # mean [0.6, 0.2], std [0.1, 0]
    method = [[[0.1, 0.25]], [[0.3, 0.25]], [[0.5, 0.25]]]  # mean [0.3, 0.25], std [0.2, 0]
    reference = (np.array([[0.6, 0.2]]), np.array([[0.1, 0.0]]))
    entry = method_summary("kd", method, reference)
    assert entry["mean"][0] == pytest.approx([0.3, 0.25])
    assert entry["std"][0] == pytest.approx([0.2, 0.0])
    assert entry["floor"][0] == pytest.approx([0.2, 0.0])
    assert entry["differs"] == [[True, True]]  # 0.3 > 0.2, and 0.05 > 0 where no seed moves
    assert entry["differs_count"] == 2
    near = method_summary("kd", [[[0.55, 0.2]], [[0.6, 0.2]], [[0.75, 0.2]]], reference)
    assert near["differs"] == [[False, False]] and near["differs_count"] == 0
    assert "floor" not in method_summary("scratch", scratch, reference)


def test_three_seeds_floor_scratch_pairs_and_aad_column(tmp_path, study_runs):
    teacher, runs, aads = study_runs
    out = tmp_path / "maps"
    result = seed_cka("convnext_demo_32", teacher, runs, [0, 1, 2], IMAGES, str(out / "cka.json"),
                      str(out / "cka.png"))
    written = json.loads((out / "cka.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert (out / "cka.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = written["summary"]
    assert summary["seeds"] == [0, 1, 2] and summary["images"] == IMAGES
    layers = written["student_layers"]
    assert layers["scratch"][-2:] == ["embedding", "logits"] and layers["rsd"][-1] == cka.AAD_LAYER
    assert summary["cells"] == len(written["teacher_layers"]) * len(layers["scratch"])
    # kd's checkpoints are scratch's: identical maps, so nothing lies beyond the floor
    assert written["methods"]["kd"]["mean"] == written["methods"]["scratch"]["mean"]
    assert summary["differs_count"]["kd"] == 0
    # rsd is compared on the layers scratch has too; its AAD column has no reference cell
    rsd = written["methods"]["rsd"]
    assert np.array(rsd["differs"]).shape == np.array(written["methods"]["scratch"]["mean"]).shape
    floor = np.maximum(np.array(rsd["std"])[:, :-1], np.array(written["methods"]["scratch"]["std"]))
    gap = np.abs(np.array(rsd["mean"])[:, :-1] - np.array(written["methods"]["scratch"]["mean"]))
    assert summary["differs_count"]["rsd"] == int((gap > floor).sum())
    per_seed = np.array([next(s["cka"] for s in written["seeds"][str(seed)] if s["label"] == "scratch")
                         for seed in range(3)])
    np.testing.assert_allclose(written["methods"]["scratch"]["std"], per_seed.std(0, ddof=1), atol=1e-12)
    # scratch seed i against seed i+1, cyclically; the same architecture, so its diagonal is defined
    assert [p["seeds"] for p in written["scratch_vs_scratch"]] == [[0, 1], [1, 2], [2, 0]]
    assert 0 < summary["scratch_vs_scratch_diagonal_mean"] <= 1
    # the AAD column: CKA of the teacher's embedding with the decoupler's output, computed here by hand
    args = cka.build_parser().parse_args(["--teacher", "convnext_demo_32", "--teacher-checkpoint", teacher,
                                          "--student-checkpoint", runs["rsd"][0], "--images", str(IMAGES),
                                          "--workers", "0", "--output", str(tmp_path / "x.png")])
    cka.fill_data_args(args, RECORDED)
    dataset = build_dataset("synthetic", args.data_dir, "val", args)
    t_model = cka.load_weights(create_model("convnext_demo_32", num_classes=10, img_size=32), teacher,
                               "convnext_demo_32").eval()
    s_model = create_model("resnet_demo_32", num_classes=10, img_size=32)
    cka.load_weights(s_model, runs["rsd"][0], "resnet_demo_32")
    images = torch.cat([x for x, _ in cka.validation_batches(args, dataset, s_model.eval())])
    with torch.no_grad():
        t_embed = t_model.forward_head(t_model.forward_features(images), pre_logits=True)
        s_embed = s_model.forward_head(s_model.forward_features(images), pre_logits=True)
        expected_aad = unbiased_cka(t_embed, aads[0](s_embed))
        expected_raw = unbiased_cka(t_embed, s_embed)
    aad = summary["aad"]["rsd"]
    assert aad["aad_output"][0] == pytest.approx(expected_aad, abs=1e-5)
    assert aad["raw_embedding"][0] == pytest.approx(expected_raw, abs=1e-5)
    assert aad["aad_output"][0] != pytest.approx(aad["raw_embedding"][0], abs=1e-3)
    assert set(summary["aad"]) == {"rsd"} and len(aad["aad_output"]) == 3
    # portable: no absolute path anywhere in the JSON
    assert str(tmp_path) not in (out / "cka.json").read_text()


def test_one_seed_has_maps_but_no_floor(tmp_path, study_runs):
    teacher, runs, _ = study_runs
    one = {m: paths[:1] for m, paths in runs.items()}
    result = seed_cka("convnext_demo_32", teacher, one, [0], IMAGES, str(tmp_path / "c.json"),
                      str(tmp_path / "c.png"))
    assert result["methods"]["rsd"]["std"] is None and "floor" not in result["methods"]["rsd"]
    assert result["summary"]["differs_count"] == {} and result["scratch_vs_scratch"] == []
    assert "scratch_vs_scratch_diagonal_mean" not in result["summary"]
    assert len(result["summary"]["aad"]["rsd"]["aad_output"]) == 1
    assert (tmp_path / "c.png").is_file()


def test_checkpoint_count_must_match_the_seeds(tmp_path, study_runs):
    teacher, runs, _ = study_runs
    with pytest.raises(ValueError, match="one checkpoint per seed"):
        seed_cka("convnext_demo_32", teacher, {"scratch": runs["scratch"][:2]}, [0, 1, 2], IMAGES,
                 str(tmp_path / "c.json"), str(tmp_path / "c.png"))
    assert not (tmp_path / "c.json").exists()
