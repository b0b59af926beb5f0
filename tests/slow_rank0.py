"""train.py with one rank slowed down, for the collective timeout tests in tests/test_faults.py:

    torchrun --standalone --nproc_per_node=2 tests/slow_rank0.py export SECONDS CONFIG [--key=value ...]
        rank 0's first export takes SECONDS longer (a 7B model's take minutes): the others wait in the control group
    torchrun --standalone --nproc_per_node=2 tests/slow_rank0.py hang SECONDS CONFIG [--key=value ...]
        rank 1's third training step takes SECONDS longer: rank 0 waits in the training loop's all-reduce
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train  # noqa: E402

what, seconds = sys.argv[1], float(sys.argv[2])
export, train_step = train.export, train.train_step


def slow_export(*args, **kwargs):
    if not getattr(slow_export, "done", False):  # the first one (pruned/): the wait is the point, not its length
        slow_export.done = True
        time.sleep(seconds)
    return export(*args, **kwargs)


def hanging_step(run, st):
    if run.rank == 1 and st.step == 3:
        time.sleep(seconds)
    return train_step(run, st)


if what == "export":
    train.export = slow_export
else:
    train.train_step = hanging_step
sys.exit(train.main(sys.argv[3:]))
