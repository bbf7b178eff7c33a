"""tools/overhead.py: the paper's Figure 3 counts, its table and its JSON."""
import json
import os

from conftest import REPO
from paper_widths import EMBEDDING_WIDTHS, PROMPT_SHAPES, STUDENT_KINDS, STUDENT_STAGES, TEACHER_STAGES

from tools import overhead

SWIN_NANO = "configs/presets/imagenet/convnext_tiny-swin_nano.yaml"
RESNET18 = "configs/presets/cifar100/swin_tiny-resnet18.yaml"


def test_figure_3_counts_table_and_json(tmp_path, capsys):
    """The RSD paper's (ICCV 2025) Figure 3 counts: Swin-N <- ConvNeXt-T at 1000 classes and ResNet18 <- Swin-T
    at 100."""
    out = tmp_path / "overhead.json"
    overhead.main([os.path.join(REPO, SWIN_NANO), os.path.join(REPO, RESNET18), "--json", str(out)])
    rows = {row["preset"]: row for row in json.loads(out.read_text())}
    swin_nano, resnet18 = rows[SWIN_NANO], rows[RESNET18]
    assert (swin_nano["num_classes"], swin_nano["student_params"]) == (1000, 9_599_940)
    assert (swin_nano["rsd_gamma2"], swin_nano["rsd_gamma4"], swin_nano["ofa"]) == (1_312_768, 2_625_536, 28_187_040)
    assert abs(swin_nano["ofa_ratio"] - 28_187_040 / 9_599_940) < 1e-12
    assert (resnet18["num_classes"], resnet18["rsd_gamma2"], resnet18["pat"]) == (100, 1_312_768, 38_521_997)

    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| dataset | teacher -> student | student params |") and len(table) == 4
    assert table[2] == ("| imagenet | convnext_tiny -> swin_nano_patch4_window7_224 | 9,599,940 | 1,312,768 | "
                        f"0.14x | 2,625,536 | 0.27x | 28,187,040 | 2.94x | {swin_nano['pat']:,} | "
                        f"{swin_nano['pat'] / 9_599_940:.2f}x |")


# OFA's extra parameters written from the branch definitions (distillers/branches.py's docstring, OFA-KD) and the
# layer definitions of torch and timm; K classes, D_s/D_t the embedding widths, one branch per stage 1-4.


def linear(n_in, n_out, bias=True):
    return n_in * n_out + (n_out if bias else 0)


def batch_norm(chans):
    return 2 * chans  # weight and bias


def sep_conv(c_in, c_out):
    """Depthwise 3x3 (stride 2), pointwise 1x1, BN, then depthwise 3x3, pointwise 1x1 to c_out, BN; no conv bias."""
    return 9 * c_in + c_in * c_in + batch_norm(c_in) + 9 * c_in + c_in * c_out + batch_norm(c_out)


def vit_block(dim):
    """timm's ViT Block, mlp ratio 4: LayerNorm, qkv (no bias) and proj, LayerNorm, fc1 and fc2."""
    return (2 * dim + linear(dim, 3 * dim, bias=False) + linear(dim, dim)
            + 2 * dim + linear(dim, 4 * dim) + linear(4 * dim, dim))


def patch_merging(c_in, c_out):
    """timm's Swin PatchMerging: LayerNorm over the 2x2 neighbours' 4 * c_in, a bias-free Linear to c_out."""
    return 2 * 4 * c_in + linear(4 * c_in, c_out, bias=False)


def ofa_cnn_student(stages, d_s, d_t, classes):
    """Per stage s of C channels, width W = max(D_s, D_t): stage 4 a 1x1 conv (bias) C -> W; stage s < 4 a chain of
    4 - s separable convs C -> 2C -> 4C ... the last one to W; then a Linear W -> K after the pooling."""
    width = max(d_s, d_t)
    total = 0
    for stage, (chans, _) in enumerate(stages, 1):
        if stage == 4:
            total += chans * width + width
        else:
            widths = [chans * 2 ** i for i in range(4 - stage)] + [width]
            total += sum(sep_conv(a, b) for a, b in zip(widths, widths[1:]))
        total += linear(width, classes)
    return total


def ofa_token_student(stages, d_s, classes):
    """Per stage s of C channels on a side x side grid: patch mergings halving the grid down to 7 x 7 (the first
    C -> D_s, the rest D_s -> D_s), or Linear(C -> D_s) when none is needed and C != D_s; max(4 - s, 1) ViT blocks
    of width D_s; a Linear D_s -> K."""
    total = 0
    for stage, (chans, side) in enumerate(stages, 1):
        merges = {56: 3, 28: 2, 14: 1, 7: 0}[side]
        if merges:
            total += patch_merging(chans, d_s) + (merges - 1) * patch_merging(d_s, d_s)
        elif chans != d_s:
            total += linear(chans, d_s)
        total += max(4 - stage, 1) * vit_block(d_s) + linear(d_s, classes)
    return total


def ofa_count(student, teacher, classes):
    d_s, d_t, stages = EMBEDDING_WIDTHS[student], EMBEDDING_WIDTHS[teacher], STUDENT_STAGES[student]
    if STUDENT_KINDS[student] == "cnn":
        return ofa_cnn_student(stages, d_s, d_t, classes)
    return ofa_token_student(stages, d_s, classes)


def prompt_block(c):
    """PAT's prompt block on c channels (all convs with bias): fusion 1x1 2c -> c, 5x5, 1x1, SE gate, 1x1; prompt
    1x1 in 4 groups, depthwise 5x5, 1x1, SE gate, 1x1 in 4 groups; beta. The SE gate: 1x1 c -> c // 16 -> c."""
    se = linear(c, c // 16) + linear(c // 16, c)
    fusion = linear(2 * c, c) + linear(25 * c, c) + linear(c, c) + se + linear(c, c)
    prompt = linear(c // 4, c) + linear(25, c) + linear(c, c) + se + linear(c // 4, c)
    return fusion + prompt + 1


def pat_count(student, teacher, dim=512, grid=4):
    """PAT's extra parameters from the stage tables: a prompt block per teacher stage (plus, where the teacher's
    stage differs from the tensor at the prompt, a feedback projection: BatchNorm2d and a bias-free 1x1 conv); the
    region attention (per student stage a conv with kernel = stride = ceil(side / 4) to 512, a LayerNorm, q and kv
    projections); an aligner per teacher stage (CNN: BatchNorm2d(512) and a bias-free 1x1 conv; token: BatchNorm1d
    over the 16 region tokens, Linear 512 -> D, BatchNorm1d(D), Linear 16 -> patch tokens)."""
    kind, _, stages = TEACHER_STAGES[teacher]
    total = 0
    for (chans, side), (prompt_chans, prompt_side) in zip(stages, PROMPT_SHAPES[teacher]):
        total += prompt_block(prompt_chans)
        if (chans, side) != (prompt_chans, prompt_side):
            total += batch_norm(chans) + chans * prompt_chans
        total += (batch_norm(dim) + dim * chans if kind == "cnn" else
                  batch_norm(grid * grid) + linear(dim, chans) + batch_norm(chans) + linear(grid * grid, side * side))
    for chans, side in STUDENT_STAGES[student]:
        kernel = -(-side // grid)
        total += linear(chans * kernel * kernel, dim)
    return total + batch_norm(dim) + linear(dim, dim) + linear(dim, 2 * dim)


def test_the_pat_formula_gives_the_official_totals():
    """The totals of PAT's official modules at 224 px (the paper's code, counted by running its modules)."""
    assert pat_count("resnet18", "swin_tiny_patch4_window7_224") == 38_521_997
    assert pat_count("deit_tiny_patch16_224", "convnext_tiny") == 14_475_236
    assert pat_count("resmlp_12_224", "swin_tiny_patch4_window7_224") == 38_325_389
    assert pat_count("mobilenetv2_100", "swin_tiny_patch4_window7_224") == 32_361_613
    assert pat_count("swin_pico_patch4_window7_224", "convnext_tiny") == 17_768_420
    assert pat_count("resnet18", "vit_small_patch16_224") == 32_566_100
    assert pat_count("resnet18", "mixer_b16_224") == 87_822_356


def test_the_ofa_formula_gives_the_known_figures():
    """Swin-N <- ConvNeXt-T at 1000 classes (Figure 3's pair) and ResNet18 <- Swin-T at 100 (the count the
    seed run logs), from the formula alone."""
    assert ofa_count("swin_nano_patch4_window7_224", "convnext_tiny", 1000) == 28_187_040
    assert ofa_count("resnet18", "swin_tiny_patch4_window7_224", 100) == 1_626_256


def test_every_paper_pair_and_the_aad_formula(tmp_path):
    """All 27 pairs; the AAD's count is h * (D_s + 2 + D_t) with h = gamma * D_s (two linears without bias and
    a BatchNorm's weight and bias); OFA's is the branch formula above."""
    rows = overhead.main(["--json", str(tmp_path / "all.json")])
    assert len(rows) == 27 and sorted(r["dataset"] for r in rows) == ["cifar100"] * 12 + ["imagenet"] * 15
    for row in rows:
        d_s, d_t = EMBEDDING_WIDTHS[row["student"]], EMBEDDING_WIDTHS[row["teacher"]]
        for gamma in (2, 4):
            assert row[f"rsd_gamma{gamma}"] == gamma * d_s * (d_s + 2 + d_t), (row["preset"], gamma)
        assert row["ofa"] == ofa_count(row["student"], row["teacher"], row["num_classes"]), row["preset"]
        assert row["ofa_ratio"] == row["ofa"] / row["student_params"]
        assert row["pat"] == pat_count(row["student"], row["teacher"]), row["preset"]
