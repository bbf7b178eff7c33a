"""Which of PAT's prompt blocks had an SE gate closed for a whole batch: PAT's SE keeps channels // 16 hidden units
(2 at 40 channels), and when every one is off for every sample the gate passes no gradient to the modules before
it. The gradient checks (tests/test_pat.py, the distiller matrix) excuse those blocks only."""
import contextlib

import torch


@contextlib.contextmanager
def closed_gates(distiller):
    """Yields the set of prompt-block names (stage numbers as strings) whose SE ReLU output was all zero."""
    closed, handles = set(), []
    for stage, block in getattr(distiller, "prompts", {}).items():
        for module in block.modules():
            if isinstance(module, torch.nn.ReLU):
                handles.append(module.register_forward_hook(
                    lambda m, i, out, stage=stage: None if bool((out > 0).any()) else closed.add(stage)))
    try:
        yield closed
    finally:
        for handle in handles:
            handle.remove()


def excused(distiller, module_name, step, closed):
    """Whether a zero gradient on `module_name` at `step` (0-based) is by design: a module the distiller names late
    (PAT's prompt convolutions, behind beta = 0) at the first step, or one behind a gate closed at this step."""
    if not distiller.late_gradient(module_name):
        return False
    return step == 0 or module_name.split(".")[1] in closed
