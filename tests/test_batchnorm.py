"""engine.batchnorm: --sync-bn keeps timm's fused BatchNormAct layers (defect 14), and running statistics are
averaged over processes before evaluation and saving (defect 15)."""
import copy

import timm
import torch
import torch.distributed as dist
from torch import nn

from engine.batchnorm import convert_sync_batchnorm, sync_batchnorm_stats


def _model_with_running_stats(name):
    """A randomly initialised model whose running stats come from a few train-mode passes, in eval mode."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    return model.eval()


@torch.no_grad()
def test_sync_bn_keeps_mobilenet_logits():
    model = _model_with_running_stats("mobilenetv2_100")
    x = torch.randn(4, 3, 32, 32)
    reference = model(x)

    converted = convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    assert not any(type(m) is nn.BatchNorm2d or type(m) is timm.layers.BatchNormAct2d for m in converted.modules())
    torch.testing.assert_close(converted(x), reference, atol=1e-5, rtol=1e-5)  # eval-mode SyncBN runs on CPU

    # The defect: torch's converter drops the activation fused into timm's BatchNormAct2d.
    by_torch = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert (by_torch(x) - reference).abs().max() > 100 * reference.abs().max()


@torch.no_grad()
def test_sync_bn_keeps_resnet_logits():
    model = _model_with_running_stats("resnet18")
    x = torch.randn(4, 3, 32, 32)
    reference = model(x)
    converted = convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == 20
    torch.testing.assert_close(converted(x), reference, atol=1e-5, rtol=1e-5)


def _bn_model():
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(4))


def _rank_stats(rank, model):
    """Distinct running stats per rank and per module, a function of (rank, buffer name)."""
    with torch.no_grad():
        for i, (name, buf) in enumerate(model.named_buffers()):
            if "running_" in name:
                buf.copy_(torch.arange(buf.numel(), dtype=buf.dtype) * (rank + 1) + 10 * i + rank * 3.5)
            else:  # num_batches_tracked: must stay each rank's own
                buf.fill_(rank + 7)


def _reduce_worker(rank, world_size):
    student, ema = _bn_model(), _bn_model()
    _rank_stats(rank, student)
    _rank_stats(rank + 10, ema)
    sync_batchnorm_stats([student, ema], world_size)
    return {"student": student.state_dict(), "ema": ema.state_dict()}


def _expected(ranks):
    """Mean over ranks of the stats each rank set, computed here from the same per-rank recipe."""
    models = [_bn_model() for _ in ranks]
    for rank, model in zip(ranks, models):
        _rank_stats(rank, model)
    states = [m.state_dict() for m in models]
    return {k: torch.stack([s[k].float() for s in states]).mean(0) for k in states[0] if "running_" in k}


def test_sync_batchnorm_stats_averages_over_two_processes(gloo_pair):
    results = gloo_pair.run(_reduce_worker)
    for key, ranks in (("student", [0, 1]), ("ema", [10, 11])):
        expected = _expected(ranks)
        assert len(expected) == 4  # running mean and var of both norms
        for rank, result in enumerate(results):
            state = result[key]
            for name, value in expected.items():
                torch.testing.assert_close(state[name], value)
            for name in (n for n in state if n.endswith("num_batches_tracked")):
                assert state[name].item() == ranks[rank] + 7


def test_sync_batchnorm_stats_single_process_is_a_no_op():
    assert not dist.is_initialized()  # a collective here would raise
    model = _bn_model()
    _rank_stats(3, model)
    before = copy.deepcopy(model.state_dict())
    sync_batchnorm_stats([model], 1)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
