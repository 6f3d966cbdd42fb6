"""Test setup. Without CUDA the Triton kernels run in Triton's interpreter, which must be switched on before any
kernel is decorated, so this happens before dph_kernels is imported anywhere."""
import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def parity(monkeypatch):
    """The arith task with ParityTask's reward (dph_train/testing.py): a random-init model earns it, so both loss
    terms have gradients."""
    import dph_train.tasks as tasks_mod
    from dph_train.testing import ParityTask

    real = tasks_mod.get_task
    monkeypatch.setattr(tasks_mod, "get_task", lambda name, **kw: ParityTask(**kw) if name == "arith"
                        else real(name, **kw))
