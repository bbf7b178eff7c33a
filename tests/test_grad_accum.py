"""--grad-accum-steps K: K micro-batches of B per optimizer update train like one batch of K x B."""
import pytest
import torch

from distillers import DISTILLERS
from engine.config import parse_args_with_config
from engine.loop import accumulation_groups, updates_per_epoch
from engine.run import build_run, check_arguments
from engine.train_args import build_train_parser
from engine.trainer import train
from kdcore.distributed import DistEnv
from kdcore.errors import UserError

# A BatchNorm-free student (LayerNorm only), so a micro-batch's statistics cannot differ from the batch's;
# augmentation on, since each sample's augmentation must not depend on how samples are grouped into batches.
VANILLA = ["--dataset", "synthetic", "--img-size", "32", "--workers", "0", "--synthetic-train-size", "64",
           "--synthetic-val-size", "16", "--model", "test_vit", "--epochs", "2", "--lr", "0.05",
           "--sched-on-updates", "--warmup-epochs", "0", "--log-interval", "1"]


@pytest.fixture
def one_thread():
    """One intra-op thread, as the CLI tests run (OMP_NUM_THREADS=1): quicker for tiny models on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trained(tmp_path, name, *flags):
    args = parse_args_with_config(build_train_parser(DISTILLERS),
                                  [*VANILLA, *flags, "--output", str(tmp_path), "--experiment", name])
    run = build_run(args)
    initial = {k: v.clone() for k, v in run.student.state_dict().items()}
    train(run)
    return run, initial


# Sample-paired Mixup/CutMix and erasing: a sample's partner, lambda and box do not depend on its batch either.
MIXED = ["--mixup", "0.8", "--cutmix", "1.0", "--mixup-pairing", "sample", "--reprob", "0.5"]


@pytest.mark.parametrize("flags", [[], MIXED], ids=["augmented", "augmented-sample-mixup"])
def test_two_micro_batches_of_b_match_one_batch_of_2b(tmp_path, one_thread, flags):
    accumulated, initial = _trained(tmp_path, "accumulated", "-b", "8", "--grad-accum-steps", "2", *flags)
    large, _ = _trained(tmp_path, "large", "-b", "16", *flags)
    assert accumulated.progress.global_step == large.progress.global_step == 2 * 64 // 16
    log = (tmp_path / "accumulated" / "log.txt").read_text()
    assert "Train: 1 [   4/4" in log and "global batch 8 x 2 accumulated = 16 per update" in log
    # fp32 rounding differs at ~1e-7; a wrong gradient scale or another sample order would differ at the size
    # of the update, which is a few percent of the weights
    final = large.student.state_dict()
    for name, weight in final.items():
        assert (accumulated.student.state_dict()[name] - weight).norm() <= 1e-5 * weight.norm(), name
    update = torch.cat([(w - initial[n]).flatten() for n, w in final.items()])
    assert update.norm() > 1e-2 * torch.cat([w.flatten() for w in final.values()]).norm()


def test_trailing_micro_batches_make_one_shorter_update():
    """5 batches with K = 2: updates of 2, 2 and 1 batches (timm's train.py does the same)."""
    groups = list(accumulation_groups(list("abcde"), 2))
    assert [(item, position, size) for item, position, size in groups] == [
        ("a", 0, 2), ("b", 1, 2), ("c", 0, 2), ("d", 1, 2), ("e", 0, 1)]
    assert updates_per_epoch(5, 2) == 3 and updates_per_epoch(4, 2) == 2 and updates_per_epoch(4, 1) == 4


@pytest.mark.parametrize("flag, value", [("--grad-accum-steps", "0"), ("--recovery-interval", "-1"),
                                         ("--checkpoint-hist", "0")])
def test_out_of_range_values_are_refused(flag, value):
    args = parse_args_with_config(build_train_parser(DISTILLERS), ["--dataset", "synthetic", flag, value])
    with pytest.raises(UserError, match=f"{flag} must be at least"):
        check_arguments(args, DistEnv())
