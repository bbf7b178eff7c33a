import contextlib
import importlib
import io
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def random_demo_teacher(tmp_path_factory):
    """A random-init convnext_demo_32 checkpoint: the machinery under test needs no trained weights."""
    from engine.models import create_model
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "convnext_demo_32.pth"
    torch.save(create_model("convnext_demo_32", num_classes=10).state_dict(), path)
    return str(path)


def run_cli(script, *args, env=None, timeout=600, cwd=REPO):
    """Run one of the repo's CLIs in a subprocess; returns CompletedProcess with text output. For what only a
    real process shows (a signal, a launcher, the script file itself); `run_main` runs the same in-process."""
    full_env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=full_env, timeout=timeout)


def run_main(script, *args, cwd=REPO):
    """Run one of the repo's CLIs (`train.py`, `tools/x.py`) in this process: its `main(argv)` with stdout and
    stderr captured and SystemExit caught, from `cwd`. Returns what `run_cli` returns (returncode, stdout,
    stderr) without a subprocess's ~4-7 s of imports. Any other exception propagates, so a crash fails the test
    with its traceback; a clean CLI error (exit 2, one `error:` line) comes back as it would from a process."""
    from engine.run_log import close_log
    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    returncode = 0
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()  # a run seeds them all
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(cwd):
        try:
            module.main(argv)
        except SystemExit as exc:
            returncode = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        finally:
            torch.set_rng_state(rng[0])
            np.random.set_state(rng[1])
            random.setstate(rng[2])
            close_log()  # the run's log file, and a stream that is about to close
    return subprocess.CompletedProcess([script, *argv], returncode, out.getvalue(), err.getvalue())


def _have_fashion_mnist():
    from engine.datasets.fashion_mnist import FASHION_MNIST_SYSTEM_DIR
    return os.path.isfile(os.path.join(FASHION_MNIST_SYSTEM_DIR, "train-images-idx3-ubyte.gz"))


@pytest.fixture(scope="session")
def fashion_mnist():
    """For tests on the real Fashion-MNIST (Debian package dataset-fashion-mnist): skipped where it is not
    installed, but a failure in CI (CI=true), where `bash test.sh` installs it, so it can never go untested.
    Session-scoped, so module-scoped fixtures built on the data (caches, folders) can ask for it too."""
    if not _have_fashion_mnist():
        message = "needs Fashion-MNIST: apt-get install dataset-fashion-mnist (bash test.sh does it as root)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def fault_teacher(tmp_path_factory):
    """The reference runs' teachers: {name: path} of random-init test_resnet and test_vit checkpoints."""
    from engine.models import create_model
    folder, paths = tmp_path_factory.mktemp("fault_teacher"), {}
    for name in ("test_resnet", "test_vit"):
        torch.manual_seed(0)
        paths[name] = str(folder / f"{name}.pth")
        torch.save(create_model(name, num_classes=10, img_size=32).state_dict(), paths[name])
    return paths


def _reference_run(tmp_path_factory, teacher, nproc, method=None):
    import runs
    output = tmp_path_factory.mktemp(f"reference_{nproc}p{method or ''}")
    script = "train.py" if nproc == 1 else "tests/ddp_states.py"  # the latter also saves each rank's states
    runs.train(nproc, *runs.reference_args(nproc, teacher, output, method), "--experiment", "reference",
               script=script)
    return output / "reference"


def _killed_run(tmp_path_factory, teacher, nproc, method=None):
    import runs
    output = tmp_path_factory.mktemp(f"killed_{nproc}p{method or ''}")
    steps, interval = runs.STEPS_PER_EPOCH[nproc], runs.RECOVERY_INTERVAL[nproc]
    first_recovery = interval - steps % interval  # epoch 1's first recovery checkpoint, after this update
    mark = f"Train: 1 [{first_recovery + 1:>4d}/{steps}"  # one update past it
    runs.train_and_kill(nproc, [*runs.reference_args(nproc, teacher, output, method), "--experiment", "killed"],
                        output / "killed", mark)
    return output / "killed"


@pytest.fixture(scope="session")
def one_process_reference(tmp_path_factory, fault_teacher):
    """The uninterrupted one-process reference run (tests/runs.py), trained once per session: its folder."""
    return _reference_run(tmp_path_factory, fault_teacher, 1)


@pytest.fixture(scope="session")
def two_process_reference(tmp_path_factory, fault_teacher):
    """The uninterrupted two-process reference run (tests/runs.py), with rank<r>.pt per rank: its folder."""
    return _reference_run(tmp_path_factory, fault_teacher, 2)


@pytest.fixture(scope="session")
def one_process_killed(tmp_path_factory, fault_teacher):
    """The reference's arguments SIGKILLed mid-epoch 1, once per session: its folder (copy it to resume)."""
    return _killed_run(tmp_path_factory, fault_teacher, 1)


@pytest.fixture(scope="session")
def pat_reference(tmp_path_factory, fault_teacher):
    """The one-process reference's data and schedule trained with PAT, uninterrupted: its folder."""
    return _reference_run(tmp_path_factory, fault_teacher, 1, "pat")


@pytest.fixture(scope="session")
def pat_killed(tmp_path_factory, fault_teacher):
    """The PAT reference's arguments SIGKILLed mid-epoch 1: its folder (copy it to resume)."""
    return _killed_run(tmp_path_factory, fault_teacher, 1, "pat")


@pytest.fixture(scope="session")
def two_process_killed(tmp_path_factory, fault_teacher):
    """The two-process reference's arguments, every process SIGKILLed mid-epoch 1: its folder (copy to resume)."""
    return _killed_run(tmp_path_factory, fault_teacher, 2)


@pytest.fixture(scope="session")
def gloo_pair(tmp_path_factory):
    """Two gloo processes for the whole session (tests/process_pair.py): gloo_pair.run(fn, *args)."""
    from process_pair import ProcessPair
    pair = ProcessPair(tmp_path_factory.mktemp("gloo_pair"))
    yield pair
    pair.close()


SMALL_RUN = ["--dataset", "synthetic", "--img-size", "32", "--workers", "0", "-b", "16",
             "--synthetic-train-size", "64", "--synthetic-val-size", "32", "--log-interval", "1"]


@pytest.fixture
def saved_weights(tmp_path):
    """Save a freshly built model's state dict: save_weights(name, num_classes, img_size) -> path."""
    from engine.models import create_model

    def save(name, num_classes=10, img_size=32, wrap=None, filename=None):
        torch.manual_seed(0)
        model = create_model(name, num_classes=num_classes, img_size=img_size)
        state = model.state_dict()
        path = tmp_path / (filename or f"{name}_{num_classes}.pth")
        torch.save({wrap: state} if wrap else state, path)
        return str(path)

    return save


# The `bf16` marker: tests that compute in bf16 on the CPU, emulated (4-10x slower) where the CPU lacks AMX and
# AVX512-BF16. Their total time is printed at the end of every run, so the suite's budget can be watched on both.
_BF16_TESTS, _BF16_SECONDS = set(), []


def pytest_collection_finish(session):
    _BF16_TESTS.update(item.nodeid for item in session.items if item.get_closest_marker("bf16"))  # as selected


def pytest_runtest_logreport(report):
    if report.nodeid in _BF16_TESTS and report.when == "call":  # not session fixtures' setup or teardown
        _BF16_SECONDS.append(report.duration)


def pytest_terminal_summary(terminalreporter):
    from kdcore.machine import cpu_model_name
    from kdcore.precision import native_bf16
    if not _BF16_SECONDS:
        return  # none ran
    native, why = native_bf16("cpu")
    terminalreporter.write_sep("=", f"bf16-marked tests ({len(_BF16_SECONDS)}): {sum(_BF16_SECONDS):.1f} s "
                                    f"({'native' if native else 'emulated'} bf16: {why}) on {cpu_model_name()}")
