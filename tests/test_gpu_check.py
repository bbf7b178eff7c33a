"""tools/gpu_check.py: the CPU dry mode runs every check the CPU can and passes; the CUDA-only checks say so; the GPU
mode refuses a machine without CUDA; a failing check is reported and fails the command, the others still run."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tools import gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_ONLY = {"nccl_process_group", "amp_float16", "throughput"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "dry.json"
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--cpu-dry", "--out", str(out)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
    return proc, json.loads(out.read_text())


def test_the_dry_mode_passes_and_writes_every_check(dry_run):
    proc, report = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["mode"] == "cpu-dry" and report["failed"] == []
    assert list(report["checks"]) == ["nccl_process_group", "amp_float16", "amp_bfloat16", "channels_last",
                                      "prefetch_loader", "pat", "check_cache", "throughput", "compile"]
    for name, entry in report["checks"].items():
        if name in CUDA_ONLY:
            assert entry["status"] == "needs CUDA", name
        elif name == "compile":
            assert entry["status"].startswith("skipped") and "test_compile.py" in entry["status"]
        else:
            assert entry["status"] == "ok", (name, entry)
    assert report["torch"] == torch.__version__ and "written:" in proc.stdout


def test_the_cpu_stand_ins_ran_gloo_and_the_tiny_throughput(dry_run):
    checks = dry_run[1]["checks"]
    group = checks["nccl_process_group"]["stand_in"]
    assert group["status"] == "ok" and group["backend"] == "gloo" and group["world_size"] == 1
    assert group["grad_max_relative_deviation"] <= 1e-4
    assert "stand_in" not in checks["amp_float16"]
    rows = checks["throughput"]["stand_in"]["rows"]
    assert [r["distiller"] for r in rows] == ["vanilla", "kd", "rsd", "pat", "kd@cache", "rsd@cache"]  # PAT: live
    assert all(r["img_per_s"] > 0 for r in rows) and rows[2]["extra_params"] > 0 == rows[1]["extra_params"]


def test_the_dry_checks_measured_what_they_claim(dry_run):
    checks = dry_run[1]["checks"]
    assert checks["amp_bfloat16"]["autocast_dtype"] == "bfloat16" and checks["channels_last"]["channels_last_convs"]
    assert all(beta != 0 for beta in checks["pat"]["betas"].values()) and checks["pat"]["extra_params"] > 0
    loaders = checks["prefetch_loader"]
    assert loaders["val_max_deviation"] <= 1e-5 and 0 < loaders["erased_fraction_mean"] < 1
    fp32, fp16 = checks["check_cache"]["fp32"], checks["check_cache"]["fp16"]
    assert [c["batch_size"] for c in fp32["checks"]] == [8, 2]
    assert all(c["passed"] and c["tolerance"] == 1e-5 and max(c["largest_deviation"].values()) <= 1e-5
               for c in fp32["checks"])
    (only,) = fp16["checks"]
    assert only["passed"] and only["tolerance"] == 1e-3 and set(only["largest_deviation"]) == {"logits", "embedding"}


def test_the_gpu_mode_refuses_a_machine_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "check.json"
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "sees no GPU" in err and "--cpu-dry" in err
    assert not out.exists()


def test_a_failing_check_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "save_random_teacher", lambda profile, work: "")
    out = tmp_path / "check.json"
    checker = gpu_check.Checker(gpu_check.dry_profile(), True, str(out), str(tmp_path))

    def broken():
        raise gpu_check.CheckFailed("the loss is nan")
    checker.run("broken", broken)
    checker.run("fine", lambda: {"value": 1})
    checker.run("cuda_only", broken, needs_cuda=True, stand_in=broken)
    report = json.loads(out.read_text())
    assert report["checks"]["broken"]["status"] == "failed"
    assert report["checks"]["broken"]["error"] == "CheckFailed: the loss is nan"
    assert report["checks"]["fine"]["status"] == "ok" and report["checks"]["fine"]["value"] == 1
    assert report["checks"]["cuda_only"]["status"] == "needs CUDA"
    assert report["checks"]["cuda_only"]["stand_in"]["status"] == "failed"
    assert report["failed"] == ["broken", "cuda_only"]


def test_the_command_exits_1_when_a_check_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "save_random_teacher", lambda profile, work: "")
    monkeypatch.setattr(gpu_check, "run_checks", lambda checker: checker.run("broken", lambda: 1 / 0))
    out = tmp_path / "check.json"
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--cpu-dry", "--out", str(out)])
    assert exit_info.value.code == 1
    assert json.loads(out.read_text())["failed"] == ["broken"]
