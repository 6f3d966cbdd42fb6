"""Helpers for the test suite (and for trying the loop quickly); nothing here is used by a real run.

- `tiny_args(run_dir)`: CLI overrides for a seconds-long run on the tiny random-init Llama.
- `ParityTask`: the arith prompts with a reward a *random* model can earn (1 when the response text has an even
  number of characters). A random-init model never solves arithmetic, so with the real verifier every reward is 0,
  every GRPO advantage is 0 and no prompt is near-perfect: the loss would have no gradient to test. The parity
  reward gives ~half the samples reward 1, so both loss terms (PPO on D_exp, the divergence on D_pef) are exercised.
- `ReplayEngine`: a rollout engine that returns pre-generated batches (to run a training step with no sampling).
"""
from __future__ import annotations

from .tasks import Score, get_task

TINY_OVERRIDES = {
    "model.name": "tiny",
    "model.gradient_checkpointing": "true",
    "task.name": "arith",
    "task.kwargs": "{n_train: 12, n_test: 4, n_ood: 4}",
    "rollout.backend": "hf",
    "rollout.max_new_tokens": 8,
    "rollout.hf_dtype": "float32",
    "presample.n": 4,
    "presample.max_prompts": "null",
    "presample.pef_threshold": 0.5,
    "presample.pef_resample_n": 2,
    "train.steps": 2,
    "train.prompts_per_step": 2,
    "train.group_size": 4,
    "train.pef_per_step": 4,
    "train.micro_batch_size": 4,
    "train.lr": 1e-3,
    "train.weight_decay": 0.0,
    "train.old_logp": "recompute",
    "eval.n": 4,
    "eval.max_prompts": "null",
    "eval.ks": "[1, 2, 4]",
}


def tiny_args(run_dir: str, **extra) -> list:
    kv = dict(TINY_OVERRIDES)
    kv["run_dir"] = str(run_dir)
    kv.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"--{k}={v}" for k, v in kv.items()]


class ParityTask:
    """arith prompts; reward 1 iff len(response) is even (reason "ok"), else 0 ("mismatch")."""

    name = "parity"
    REASONS = ("ok", "mismatch")

    def __init__(self, **kwargs):
        self._inner = get_task("arith", **kwargs)

    def examples(self, split):
        return self._inner.examples(split)

    def score(self, example, response):
        return Score(1.0, "ok") if len(response) % 2 == 0 else Score(0.0, "mismatch")


class ReplayEngine:
    """Returns the given RolloutBatches in order, whatever it is asked; never touches a model."""

    name = "replay"

    def __init__(self, batches: list):
        self.batches = list(batches)
        self.synced = 0

    def generate(self, prompts, **kw):
        return self.batches.pop(0)

    def sync_weights(self, model):
        self.synced += 1
        return 0.0

    def close(self):
        pass
