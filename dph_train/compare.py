"""`dph-train compare`: GRPO's diversity collapse and DPH-RL's cure, side by side, in one command.

For each seed: SFT a tiny Llama on the styles task (it samples every style about equally) -> presample it (n, the
8/8 rule) -> evaluate it ("base") -> for each method, RL from that same model with `dk.FusedLinearDPHLoss` through
the same Trainer as `dph-train train` -> evaluate. Jobs run in worker processes, one thread each (a seed's methods
start as soon as its SFT + presample are done). Everything lands in one folder:

    <run_dir>/compare.json                   the numbers (schema in the README), read by the tests and the report
    <run_dir>/report.md                      tables: mean +- sd over seeds, paired differences vs base and vs grpo
    <run_dir>/passk.png  styles.png  training.png
    <run_dir>/seed_<s>/sft/                  the SFT model (HF folder, reused when the settings match)
    <run_dir>/seed_<s>/base/                 presample/ + eval/base.json + log.txt
    <run_dir>/seed_<s>/<method>/             a `dph-train train` run folder: log, metrics.jsonl, checkpoint, eval/
"""
from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import sys
import time
from types import SimpleNamespace

from .common import RunDir, write_json

def rkl_name(beta: float) -> str:
    return f"rkl-b{beta:g}"


def _method_cfg(cfg, method: str, seed: int, run_dir: str, model_dir: str):
    """The resolved config of one job: the compare config with this seed, model and method."""
    job = copy.deepcopy(cfg)
    job.seed, job.run_dir, job.threads = seed, run_dir, 1
    job.model = dataclasses.replace(job.model, name=model_dir, tokenizer=None)
    if method.startswith("rkl-b"):
        job.train.method = "rkl"
        job.train.loss = dict(job.train.loss or {}, kl_beta=float(method[len("rkl-b"):]))
    elif method != "base":
        job.train.method = method
    return job


def _quiet_worker(log_path: str):
    """Worker output goes to the job's own log file; progress bars are the parent's business."""
    os.environ["TQDM_DISABLE"] = "1"
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    f = open(log_path, "a", buffering=1)
    sys.stdout = sys.stderr = f
    return f


def run_job(cfg, kind: str, seed: int, method: str, root: str, quiet: bool = True) -> dict:
    """One unit of work (module level so a worker process can run it): kind = "prepare" (SFT, presample, eval base)
    or "method" (RL from the seed's SFT model, then eval)."""
    import torch

    from . import tasks
    from .cli import Session, cmd_eval, cmd_presample, cmd_train
    from .config import save_config
    from .sft import sft_styles

    seed_dir = os.path.join(root, f"seed_{seed}")
    name = "base" if kind == "prepare" else method
    run_dir = os.path.join(seed_dir, name)
    out = _quiet_worker(os.path.join(run_dir, "worker.log")) if quiet else None
    try:
        torch.set_num_threads(1)
        t0 = time.time()
        model_dir = os.path.join(seed_dir, "sft")
        job = _method_cfg(cfg, name, seed, run_dir, model_dir)
        run = RunDir(run_dir)
        save_config(job, run.p("config.yaml"))
        args = SimpleNamespace(resume=False, checkpoint="latest", tag=None)
        if kind == "prepare":
            task = tasks.get_task(cfg.task.name, seed=cfg.task.seed, **(cfg.task.kwargs or {}))
            torch.manual_seed(seed)
            sft_styles(task, model_dir, cfg.compare.sft, seed=seed, log=run.log)
            s = Session(job)
            cmd_presample(job, args, s)
            res = cmd_eval(job, args, s, tag="base")
        else:
            src = os.path.join(seed_dir, "base", "presample")
            dst = run.p("presample")
            if not os.path.isdir(dst):
                shutil.copytree(src, dst)  # the same pi_ref samples and split for every method of this seed
            s = Session(job)
            cmd_train(job, args, s)
            res = cmd_eval(job, args, s, tag="final")
        s.close()
        return dict(kind=kind, seed=seed, method=name, seconds=round(time.time() - t0, 1), eval=res)
    finally:
        if out is not None:  # a pool worker runs several jobs: give each its own log, close the last one
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            out.close()


def _summary(res: dict) -> dict:
    """The per-split numbers compare.json keeps (the rest stays in the job's eval/*.json)."""
    out = {}
    for split, r in res["splits"].items():
        out[split] = {"pass@1": r["pass_at_k"]["1"], "pass@16": r["pass_at_k"].get("16"), "greedy": r.get("greedy"),
                      "style_entropy": r.get("style_entropy"),
                      "style_entropy_per_prompt": r.get("style_entropy_per_prompt"),
                      "pass_at_k": {k: v for k, v in r["pass_at_k"].items()},
                      "style_counts": r.get("style_counts", {})}
    return out


def check_compare(cfg) -> None:
    """The settings compare needs, checked before anything loads (ConfigError: one line, exit 2)."""
    from .config import METHODS, ConfigError

    if cfg.task.name != "styles":
        raise ConfigError(f"task.name: compare runs on the styles task, got {cfg.task.name!r}")
    cc = cfg.compare
    if not cc.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in cc.seeds):
        raise ConfigError(f"compare.seeds: expected a non-empty list of ints, got {cc.seeds!r}")
    bad = [m for m in cc.methods if m not in METHODS]
    if bad or not cc.methods:
        raise ConfigError(f"compare.methods: expected presets among {METHODS}, got {list(cc.methods)!r}")
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and b >= 0 for b in cc.rkl_betas):
        raise ConfigError(f"compare.rkl_betas: expected numbers >= 0, got {cc.rkl_betas!r}")
    if cfg.eval.n < 16 or 16 not in cfg.eval.ks or 1 not in cfg.eval.ks:
        raise ConfigError(f"eval.ks: compare reports Pass@1 and Pass@16, so eval.ks must hold 1 and 16 (eval.n >= 16);"
                          f" got ks={cfg.eval.ks}, n={cfg.eval.n}")


def _workers(cfg) -> int:
    if cfg.compare.workers:
        return int(cfg.compare.workers)
    return max(1, os.cpu_count() or 1)


def compare(cfg, log=print) -> dict:
    """Run the whole comparison; returns the compare.json content."""
    from tqdm.auto import tqdm

    from .config import to_dict

    check_compare(cfg)
    cc = cfg.compare
    methods = list(cc.methods) + [rkl_name(b) for b in cc.rkl_betas]
    root = os.path.abspath(cfg.run_dir)
    run = RunDir(root)
    t0 = time.time()
    workers = _workers(cfg)
    n_jobs = len(cc.seeds) * (1 + len(methods))
    log(f"[compare] seeds={list(cc.seeds)} methods={methods} jobs={n_jobs} workers={workers} -> {root}")
    results: dict = {m: {} for m in ["base"] + methods}
    timings: dict = {}
    bar = tqdm(total=n_jobs, desc="compare", unit="job")

    def done(r):
        results[r["method"]][str(r["seed"])] = _summary(r["eval"])
        timings[f"{r['method']}/seed_{r['seed']}"] = r["seconds"]
        t = results[r["method"]][str(r["seed"])]["test"]
        bar.update(1)
        bar.write(f"[compare] seed {r['seed']} {r['method']:>8s}: test pass@1={t['pass@1']:.3f} "
                  f"pass@16={t['pass@16']:.3f} style entropy={t['style_entropy']:.2f} bits ({r['seconds']:.0f} s)")

    if workers == 1:
        for seed in cc.seeds:
            done(run_job(cfg, "prepare", seed, "base", root, quiet=False))
            for m in methods:
                done(run_job(cfg, "method", seed, m, root, quiet=False))
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        # spawn: a fresh interpreter per worker (fork after torch has started threads can deadlock)
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            pending = {pool.submit(run_job, cfg, "prepare", s, "base", root): s for s in cc.seeds}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    pending.pop(fut)
                    r = fut.result()  # a failed job raises here; its log stays in its run folder
                    done(r)
                    if r["kind"] == "prepare":
                        for m in methods:
                            pending[pool.submit(run_job, cfg, "method", r["seed"], m, root)] = r["seed"]
    bar.close()
    results = {m: dict(sorted(r.items(), key=lambda kv: int(kv[0]))) for m, r in results.items()}
    out = dict(seeds=list(cc.seeds), methods=["base"] + methods, results=results,
               wall_s=round(time.time() - t0, 1), job_seconds=timings, config=to_dict(cfg))
    write_json(run.p("compare.json"), out)
    from .compare_report import write_report

    report = write_report(out, root)
    log(f"[compare] wall {out['wall_s']:.0f} s; {run.p('compare.json')}; {report}")
    return out
