import json

from tools.benchmark import main


def test_benchmark_reports_every_distiller(tmp_path):
    out = tmp_path / "bench.json"
    rows = main(["--student", "resnet18", "--teacher", "deit_tiny_patch16_224", "--img-size", "32", "-b", "8",
                 "--steps", "2", "--warmup", "1", "--distillers", "kd", "rsd", "--device", "cpu", "--json", str(out)])
    assert [r["distiller"] for r in rows] == ["vanilla", "kd", "rsd"]
    saved = json.loads(out.read_text())
    assert saved["results"] == rows and saved["settings"]["batch_size"] == 8
    assert rows[0]["x_vanilla"] == 1.0
    for r in rows:
        assert r["s_per_step"] > 0 and abs(r["img_per_s"] - 8 / r["s_per_step"]) < 1e-6 and r["peak_memory_mb"] > 0
        assert r["student_params"] == 11_181_642 + 90 * 513  # resnet18 at 100 classes
    # AAD 512 -> 1024 -> 192 (DeiT-T embedding), BN 1024
    assert rows[2]["extra_params"] == 512 * 1024 + 2 * 1024 + 1024 * 192
    assert rows[0]["extra_params"] == rows[1]["extra_params"] == 0


def test_benchmark_times_each_distiller_from_a_teacher_cache_too():
    rows = main(["--student", "resnet18", "--teacher", "deit_tiny_patch16_224", "--img-size", "32", "-b", "8",
                 "--steps", "2", "--warmup", "1", "--distillers", "kd", "rsd", "--device", "cpu", "--cached",
                 "--dataset-size", "512"])
    assert [r["distiller"] for r in rows] == ["vanilla", "kd", "rsd", "kd@cache", "rsd@cache"]
    assert rows[4]["extra_params"] == rows[2]["extra_params"], "the AAD is built from the cache's widths alike"
