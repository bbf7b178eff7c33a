"""--compile for real: the distiller's forward (and its backward) compiled by torch.compile's default inductor
backend trains as the eager run of the same seed does. The other --compile tests replace torch.compile."""

import pytest
import torch
import torch._dynamo
from conftest import SMALL_RUN
from torch._dynamo.utils import counters

from distillers import DISTILLERS
from engine.config import parse_args_with_config
from engine.run import build_run
from engine.run_log import close_log
from engine.train_args import build_train_parser
from engine.trainer import train

# the smallest timm ViT cut to one block (the compile time grows with the graph), 2 steps of 8 images at 32 px
TINY = [*SMALL_RUN, "--model", "test_vit", "--model-kwargs", "depth=1", "-b", "8", "--synthetic-train-size", "16",
        "--synthetic-val-size", "8", "--warmup-epochs", "0", "--epochs", "1", "--no-aug"]


@pytest.fixture(autouse=True)
def one_thread_and_a_clean_compiler():
    """One thread, as the CLI tests' processes had; nothing compiled, counted or logged left for other tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()
    counters.clear()
    close_log()


def two_steps(folder, *flags):
    """(initial student weights, final student weights, mean training loss, the run, torch.compile's counters)."""
    args = parse_args_with_config(build_train_parser(DISTILLERS), [str(a) for a in (*TINY, "--output", folder,
                                                                                   *flags)])
    torch._dynamo.reset()
    counters.clear()
    run = build_run(args)
    start = {k: v.detach().clone() for k, v in run.student.state_dict().items()}
    train(run)
    assert run.progress.global_step == 2
    counted = {kind: dict(values) for kind, values in counters.items()}
    return start, run.student.state_dict(), run.progress.history[0]["train_loss"], run, counted


@pytest.mark.slow
def test_compiled_run_trains_as_the_eager_run(tmp_path):
    eager_start, eager, eager_loss, eager_run, eager_counters = two_steps(tmp_path, "--experiment", "eager")
    assert eager_run.distiller._compiled_call_impl is None and not eager_counters.get("frames")
    # one compile thread: on 2 cores a pool of compile workers costs more than it saves for ~20 small kernels
    with torch._inductor.config.patch(compile_threads=1):
        start, compiled, loss, run, compile_counters = two_steps(tmp_path, "--experiment", "compiled", "--compile")

    assert run.distiller._compiled_call_impl is not None  # nn.Module.compile: the distiller's calls go through it
    assert compile_counters["frames"].get("ok", 0) >= 1 and compile_counters["stats"].get("unique_graphs", 0) >= 1
    assert compile_counters["aot_autograd"].get("ok", 0) >= 1  # the backward was compiled too
    for name, value in start.items():
        assert torch.equal(value, eager_start[name]), name  # the same seed, the same initial weights

    assert loss == pytest.approx(eager_loss, rel=1e-5)
    moved = max((eager[k] - eager_start[k]).abs().max().item() for k in eager if eager[k].is_floating_point())
    assert moved > 1e-3  # the tolerance below is far smaller than what the two steps changed
    for name, value in compiled.items():
        torch.testing.assert_close(value, eager[name], rtol=1e-4, atol=1e-5, msg=name)
