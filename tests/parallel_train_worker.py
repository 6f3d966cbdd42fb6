"""Worker of test_parallel_train.py, run by torchrun (or plain python for one process): the real `dph-train` CLI
with the arith task's reward replaced by ParityTask's (dph_train/testing.py: a random-init model earns it, so both
loss terms have gradients).

    python -m torch.distributed.run --nproc_per_node=2 tests/parallel_train_worker.py train --train.parallel=ddp ...

DPH_TEST_FAIL_RANK=r: rank r raises in its first update (to test that the other ranks do not hang).
"""
import os
import sys

import dph_train.tasks as tasks_mod
from dph_train.cli import main
from dph_train.testing import ParityTask


def _install():
    real = tasks_mod.get_task
    tasks_mod.get_task = lambda name, **kw: ParityTask(**kw) if name == "arith" else real(name, **kw)
    fail = os.environ.get("DPH_TEST_FAIL_RANK")
    if fail is not None and os.environ.get("RANK", "0") == fail:
        from dph_train.trainer import Trainer

        def update(self, *a, **kw):
            raise RuntimeError(f"injected failure on rank {fail}")

        Trainer.update = update


if __name__ == "__main__":
    _install()
    sys.exit(main(sys.argv[1:]))
