"""The pipeline in one place: the loaded pieces of a run (Session) and its stages, called with real arguments by
the CLI (cli.py) and by `dph-train compare` (compare.py) alike.

    s = Session(cfg)                                  # device, task, model + tokenizer, rollout engine, run folder
    run_presample(s)                                  # pi_ref samples, the D_exp / D_pef split (presample.py)
    run_eval(s, "base")                               # Greedy + Pass@k on cfg.eval.splits (evaluate.py)
    run_train(s, resume=False, ref_model_name=None)   # the RL loop (trainer.py)
    s.close()

Session(cfg, model_name=folder) loads another starting point (a checkpoint); run_train's ref_model_name names the
reference model of a KL penalty when it is not the starting model (recovery runs: start from a GRPO checkpoint,
penalise against the SFT model).
"""
from __future__ import annotations

import dataclasses
import os


def auto_threads() -> int:
    """Torch threads = the cores not already busy (1-minute load average). On a shared 2-core machine, two OpenMP
    threads competing with another busy process run ~5x slower than one thread (measured here), so the default
    leaves busy cores alone; threads=N in the config overrides."""
    n = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(n, int(n - busy + 0.5)))


class Session:
    """The loaded pieces a stage needs: device, model, tokenizer, task, rollout engine, run dir; par: the process
    group (parallel.Parallel; default one process)."""

    def __init__(self, cfg, model_name: str | None = None, par=None):
        import torch

        from . import tasks
        from .common import RunDir, seed_all
        from .models import load_model, resolve_device
        from .parallel import Parallel
        from .rollout import make_engine

        self.cfg = cfg
        self.par = par or Parallel()
        seed_all(cfg.seed)
        self.run = RunDir(cfg.run_dir)
        self.device = self.par.device if self.par.enabled else resolve_device(cfg.device)
        if self.device.type == "cpu":
            # under torchrun the processes on one machine share its cores
            n = int(cfg.threads) if cfg.threads else max(1, auto_threads() // int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                                                   "1")))
            torch.set_num_threads(n)
            self.run.log(f"[session] cpu threads: {n} (cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f})")
        try:  # the task first: a wrong task name or argument is a user error, found before the model loads
            self.task = tasks.get_task(cfg.task.name, seed=cfg.task.seed, **(cfg.task.kwargs or {}))
        except (TypeError, ValueError, FileNotFoundError) as e:
            from .config import ConfigError
            raise ConfigError(f"task {cfg.task.name!r} (task.name / task.kwargs): {e}") from e
        mc = cfg.model if model_name is None else dataclasses.replace(cfg.model, name=model_name,
                                                                      tokenizer=model_name)
        with self.run.memory("load model"):
            self.model, self.tok = load_model(mc, self.device)
        # rollouts sample from the plain model (fsdp2: a full copy; parallel.py)
        self.engine = make_engine(cfg.rollout, self.par.plain_copy(self.model), self.tok, cfg.model, self.device,
                                  self.run.p("engine"),
                                  seed=cfg.seed, max_new_tokens_cap=cfg.eval.max_new_tokens)
        self.run.log(f"[session] rollout backend: {self.engine.name}")

    def close(self):
        self.engine.close()


def run_presample(s: Session) -> dict:
    from .presample import presample

    return presample(s.cfg, s.model, s.tok, s.task, s.engine, s.run, s.device)


def run_train(s: Session, resume: bool = False, ref_model_name: str | None = None) -> dict:
    """The RL loop from the session's model on the presampled data in the run folder. A KL-penalty loss scores a
    frozen reference: a copy of the starting model, or the model in ref_model_name."""
    from .models import load_model
    from .presample import load_presample
    from .trainer import Trainer, build_loss, make_ref_model, needs_ref_model

    cfg = s.cfg
    prompts_rows, stored_rows, _ = load_presample(s.run.p("presample"), cfg.train.divergence_samples)
    ref = None
    if needs_ref_model(build_loss(cfg.train.method, cfg.train.loss)):
        if ref_model_name is None:
            ref = make_ref_model(s.model)
        else:
            ref = make_ref_model(load_model(dataclasses.replace(cfg.model, name=ref_model_name,
                                                                tokenizer=ref_model_name), s.device)[0])
    trainer = Trainer(cfg, s.model, s.tok, s.task, s.engine, s.run, s.device, prompts_rows, stored_rows,
                      ref_model=ref, par=s.par)
    out = trainer.fit(resume=resume)
    del ref
    return out


def run_eval(s: Session, tag: str) -> dict:
    from .evaluate import evaluate

    return evaluate(s.cfg, s.model, s.tok, s.task, s.engine, s.run, tag)
