"""tools/study_fusion.py: RichKD's fused logits scored on their own, against validate.py and a hand-made fusion."""
import argparse
import json

import pytest
import torch

from engine.datasets import build_dataset
from engine.loader import build_eval_transform, resolve_data_settings
from engine.models import create_model
from engine.train_args import add_data_arguments
from tools.study_fusion import main as fusion_main
from validate import main as validate_main

DATA = ["--dataset", "synthetic", "--synthetic-val-size", "60", "--workers", "0", "-b", "25"]


@pytest.fixture
def two_models(saved_weights):
    return saved_weights("convnext_demo_32"), saved_weights("resnet_demo_32")


def fusion(teacher, source, alpha, tmp_path=None):
    json_args = ["--json", str(tmp_path / "fusion.json")] if tmp_path else []
    return fusion_main([*DATA, "--teacher", "convnext_demo_32", "--teacher-checkpoint", teacher,
                        "--source", "resnet_demo_32", "--source-checkpoint", source, "--alpha", str(alpha),
                        *json_args])


def test_each_model_scores_as_validate_py_does(two_models, tmp_path):
    teacher, source = two_models
    result = fusion(teacher, source, 0.7, tmp_path)
    assert json.loads((tmp_path / "fusion.json").read_text()) == result and result["images"] == 60
    for model, path, key in (("convnext_demo_32", teacher, "teacher"), ("resnet_demo_32", source, "source")):
        expected = validate_main([*DATA, "--model", model, "--checkpoint", path, "--device", "cpu"])["top1"]
        assert result[key] == pytest.approx(expected, abs=0.005)


def test_alpha_one_is_the_teacher_and_zero_the_source_and_between_is_the_sum(two_models):
    teacher, source = two_models
    ends = fusion(teacher, source, 1.0), fusion(teacher, source, 0.0)
    assert ends[0]["fused"] == ends[0]["teacher"] and ends[1]["fused"] == ends[1]["source"]
    # alpha 0.7 by hand: the argmax of 0.7 z_T + 0.3 z_C on the same images
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    args = parser.parse_args(DATA)
    args.num_classes = None
    dataset = build_dataset("synthetic", "", "val", args)
    models = []
    for name, path in (("convnext_demo_32", teacher), ("resnet_demo_32", source)):
        model = create_model(name, num_classes=10, img_size=32)
        model.load_state_dict(torch.load(path))
        models.append(model.eval())
    dataset.transform = build_eval_transform(resolve_data_settings(args, models[0], dataset))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        fused = 0.7 * models[0](images) + 0.3 * models[1](images)
    expected = round(100.0 * float((fused.argmax(1) == labels).float().mean()), 2)
    assert fusion(teacher, source, 0.7)["fused"] == pytest.approx(expected, abs=1e-9)


def test_alpha_outside_zero_one_is_refused(two_models, capsys, tmp_path):
    teacher, source = two_models
    with pytest.raises(SystemExit) as exit_info:
        fusion(teacher, source, 1.5, tmp_path)
    assert exit_info.value.code != 0
    assert "--alpha 1.5: the fusion weight lies between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "fusion.json").exists()
