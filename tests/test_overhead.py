"""tools/overhead.py: the paper's Figure 3 counts, its table and its JSON."""
import json
import os

from conftest import REPO
from tools import overhead

SWIN_NANO = "configs/presets/imagenet/convnext_tiny-swin_nano.yaml"
RESNET18 = "configs/presets/cifar100/swin_tiny-resnet18.yaml"


def test_figure_3_counts_table_and_json(tmp_path, capsys):
    """Swin-N <- ConvNeXt-T at 1000 classes and ResNet18 <- Swin-T at 100 (REFERENCE.md §2)."""
    out = tmp_path / "overhead.json"
    overhead.main([os.path.join(REPO, SWIN_NANO), os.path.join(REPO, RESNET18), "--json", str(out)])
    rows = {row["preset"]: row for row in json.loads(out.read_text())}
    swin_nano, resnet18 = rows[SWIN_NANO], rows[RESNET18]
    assert (swin_nano["num_classes"], swin_nano["student_params"]) == (1000, 9_599_940)
    assert (swin_nano["rsd_gamma2"], swin_nano["rsd_gamma4"], swin_nano["ofa"]) == (1_312_768, 2_625_536, 28_187_040)
    assert abs(swin_nano["ofa_ratio"] - 28_187_040 / 9_599_940) < 1e-12
    assert (resnet18["num_classes"], resnet18["rsd_gamma2"]) == (100, 1_312_768)

    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| dataset | teacher -> student | student params |") and len(table) == 4
    assert table[2] == ("| imagenet | convnext_tiny -> swin_nano_patch4_window7_224 | 9,599,940 | 1,312,768 | "
                        "0.14x | 2,625,536 | 0.27x | 28,187,040 | 2.94x |")


EMBEDDING_WIDTHS = {"resnet18": 512, "mobilenetv2_100": 1280, "deit_tiny_patch16_224": 192, "resmlp_12_224": 384,
                    "swin_pico_patch4_window7_224": 384, "swin_nano_patch4_window7_224": 512, "resnet50": 2048,
                    "swin_tiny_patch4_window7_224": 768, "vit_small_patch16_224": 384, "mixer_b16_224": 768,
                    "convnext_tiny": 768}


def test_every_paper_pair_and_the_aad_formula(tmp_path):
    """All 27 pairs; the AAD's count is h * (D_s + 2 + D_t) with h = gamma * D_s (two linears without bias and
    a BatchNorm's weight and bias)."""
    rows = overhead.main(["--json", str(tmp_path / "all.json")])
    assert len(rows) == 27 and sorted(r["dataset"] for r in rows) == ["cifar100"] * 12 + ["imagenet"] * 15
    for row in rows:
        d_s, d_t = EMBEDDING_WIDTHS[row["student"]], EMBEDDING_WIDTHS[row["teacher"]]
        for gamma in (2, 4):
            assert row[f"rsd_gamma{gamma}"] == gamma * d_s * (d_s + 2 + d_t), (row["preset"], gamma)
        assert row["ofa"] > 0 and row["ofa_ratio"] == row["ofa"] / row["student_params"]
