"""Two gloo processes that stay up for the whole test session and run test functions on request.

A spawned pair costs each test that starts one several seconds of imports (much more on a slow CPU); the
session's pair (conftest's `gloo_pair` fixture) pays them once. `pair.run(fn, *args)` calls
`fn(rank, world_size, *args)` in both processes, inside their process group, and returns the two results in
rank order; an exception in either comes back as a test failure with its traceback. `fn` must be a module-level
function of an importable module (a test module is: pytest puts tests/ on the path, and spawn passes it on).
Code that must run without a process group (a single-process reference) belongs in the test itself.
"""
import datetime
import importlib
import queue
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def _serve(rank, init_file, tasks, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(minutes=5))  # a peer that failed mid-collective
    try:
        while (task := tasks[rank].get()) is not None:
            module, name, args = task
            try:
                results.put((rank, True, getattr(importlib.import_module(module), name)(rank, WORLD_SIZE, *args)))
            except BaseException:
                results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class ProcessPair:
    def __init__(self, folder):
        context = mp.get_context("spawn")
        self.tasks = [context.Queue() for _ in range(WORLD_SIZE)]
        self.results = context.Queue()
        self.processes = mp.spawn(_serve, args=(str(folder / "store"), self.tasks, self.results),
                                  nprocs=WORLD_SIZE, join=False)

    def run(self, fn, *args, timeout=600):
        """[rank 0's result, rank 1's result] of `fn(rank, world_size, *args)`."""
        for tasks in self.tasks:
            tasks.put((fn.__module__, fn.__name__, args))
        answers = {}
        try:
            for _ in range(WORLD_SIZE):
                rank, ok, value = self.results.get(timeout=timeout)
                answers[rank] = (ok, value)
        except queue.Empty:
            raise AssertionError(f"{fn.__name__} did not finish in {timeout} s on ranks "
                                 f"{sorted(set(range(WORLD_SIZE)) - set(answers))}") from None
        failed = [f"rank {rank}:\n{value}" for rank, (ok, value) in sorted(answers.items()) if not ok]
        assert not failed, f"{fn.__name__} failed in the process pair\n" + "\n".join(failed)
        return [answers[rank][1] for rank in range(WORLD_SIZE)]

    def close(self):
        for tasks in self.tasks:
            tasks.put(None)
        self.processes.join(60)
