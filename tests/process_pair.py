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
import itertools
import pickle
import queue
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def _serve(rank, init_file, tasks, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(minutes=5))  # a peer that failed mid-collective
    try:
        while (task := tasks[rank].get()) is not None:
            task_id, module, name, args = task
            try:  # pickled here, so an unpicklable result is this task's error, not a lost answer
                answer = True, pickle.dumps(getattr(importlib.import_module(module), name)(rank, WORLD_SIZE, *args))
            except BaseException:
                answer = False, traceback.format_exc()
            results.put((task_id, rank, *answer))
    finally:
        dist.destroy_process_group()


class ProcessPair:
    """After a task fails or times out the pair is replaced by a fresh one, so the next test starts clean."""

    def __init__(self, folder):
        self.folder, self.generation, self.task_ids = folder, 0, itertools.count()
        self._start()

    def _start(self):
        context = mp.get_context("spawn")
        self.tasks = [context.Queue() for _ in range(WORLD_SIZE)]
        self.results = context.Queue()
        self.generation += 1
        store = self.folder / f"store{self.generation}"
        self.processes = mp.spawn(_serve, args=(str(store), self.tasks, self.results), nprocs=WORLD_SIZE,
                                  join=False, daemon=True)

    def run(self, fn, *args, timeout=600):
        """[rank 0's result, rank 1's result] of `fn(rank, world_size, *args)`."""
        task_id = next(self.task_ids)
        for tasks in self.tasks:
            tasks.put((task_id, fn.__module__, fn.__name__, args))
        answers, deadline = {}, time.time() + timeout
        while len(answers) < WORLD_SIZE:
            try:
                answer_id, rank, ok, value = self.results.get(timeout=1)
            except queue.Empty:
                dead = [p.pid for p in self.processes.processes if not p.is_alive()]
                if dead or time.time() > deadline:
                    self.restart()
                    missing = sorted(set(range(WORLD_SIZE)) - set(answers))
                    raise AssertionError(f"{fn.__name__}: no answer from ranks {missing} "
                                         f"({'a process died' if dead else f'{timeout} s passed'})") from None
                continue
            if answer_id == task_id:
                answers[rank] = (ok, value)
        failed = [f"rank {rank}:\n{value}" for rank, (ok, value) in sorted(answers.items()) if not ok]
        if failed:
            self.restart()  # the other rank may be waiting in a collective
            raise AssertionError(f"{fn.__name__} failed in the process pair\n" + "\n".join(failed))
        return [pickle.loads(answers[rank][1]) for rank in range(WORLD_SIZE)]

    def restart(self):
        self.close()
        self._start()

    def close(self):
        for tasks in self.tasks:
            tasks.put(None)
        deadline = time.time() + 30
        for process in self.processes.processes:
            process.join(max(deadline - time.time(), 0))
            if process.is_alive():
                process.kill()
                process.join()
