"""`dph-train compare`: GRPO's diversity collapse and DPH-RL's cure side by side, and the paper's claims tested on
the styles task (experiments.md), in one command.

For each seed: SFT a tiny Llama on the styles task (it samples every style about equally, and learns the held-out
T2 probes) -> presample it (n, the 8/8 rule) -> evaluate it ("base") -> for each arm of compare.variants, RL from that
same model (or, for recovery arms, from the seed's grpo checkpoint) through the same pipeline as `dph-train train`
-> evaluate. Jobs run in worker processes, one thread each (config `threads` when set). Everything lands in one
folder:

    <run_dir>/compare.json        seeds, arms (family, kappa, routing, samples, estimator, start), results, claims
    <run_dir>/report.md           tables (mean +- sd over seeds, paired differences), the pre-registered verdicts
    <run_dir>/*.png               Pass@k, styles, training reward, frontiers
    <run_dir>/seed_<s>/sft/       the SFT model (HF folder, reused when the settings match)
    <run_dir>/seed_<s>/base/      presample/ + eval/base.json + log.txt (+ probes_screened.json: spelling words)
    <run_dir>/seed_<s>/<arm>/     a `dph-train train` run folder: log, metrics.jsonl, checkpoint, eval/

An arm is data (compare.variants), not code: {name, family, preset, kappa, loss, routing, samples, start, steps, lr}.
kappa = eta * f''(1) (divergence presets) or kl_beta (kl-k3, rkl-k2): the strength that is comparable across
divergences (experiments.md §2). A list of kappas makes one arm per value, named <name>-k<kappa>.

A real model (compare.sft.base_model, the styles task spelled in its tokenizer: task.kwargs spelling "words") gets
the keep-rate probes: the base job screens them once with greedy decoding of the SFT model (the RL start and pi_ref),
before any RL, into seed_<s>/base/probes_screened.json; every job's "probes" split holds only the probes kept there,
so its greedy accuracy is the keep-rate. compare.resume reuses every job that finished in an earlier run of the same
run_dir (run_job), so a long run can be stopped and continued, or split across sessions.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import sys
import time

from .common import RunDir, write_json

ARM_KEYS = ("name", "family", "preset", "kappa", "loss", "routing", "samples", "start", "steps", "lr")
STARTS = ("sft", "grpo")
SAMPLES = ("pef", "all")


def _divergence(preset: str, loss: dict):
    import dph_kernels as dk

    return {**dk.PRESETS[preset], **loss}.get("divergence")


def expand_arms(cc) -> dict:
    """compare.variants -> {arm name: resolved arm}, in order. Raises ConfigError naming the bad entry."""
    import dph_kernels as dk

    from .config import METHODS, ConfigError

    arms = {}
    if not isinstance(cc.variants, list) or not cc.variants:
        raise ConfigError("compare.variants: expected a non-empty list of arms")
    for i, v in enumerate(cc.variants):
        where = f"compare.variants[{i}]"
        if not isinstance(v, dict) or "name" not in v or "preset" not in v:
            raise ConfigError(f"{where}: expected a mapping with at least name and preset, got {v!r}")
        bad = sorted(set(v) - set(ARM_KEYS))
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {bad}; known: {list(ARM_KEYS)}")
        if v["preset"] not in METHODS:
            raise ConfigError(f"{where}.preset: expected one of {METHODS}, got {v['preset']!r}")
        loss = dict(v.get("loss") or {})
        div = _divergence(v["preset"], loss)
        params = {**dk.PRESETS[v["preset"]], **loss}
        routing = v.get("routing", "exp" if div is not None else "all")
        if routing not in ("exp", "all"):
            raise ConfigError(f"{where}.routing: expected exp or all, got {routing!r}")
        samples = v.get("samples", "pef" if div is not None else None)
        if div is not None and samples not in SAMPLES:
            raise ConfigError(f"{where}.samples: expected one of {SAMPLES} for a divergence preset, got {samples!r}")
        if div is None and v.get("samples") is not None:
            raise ConfigError(f"{where}.samples: preset {v['preset']} has no divergence term")
        start = v.get("start", "sft")
        if start not in STARTS:
            raise ConfigError(f"{where}.start: expected one of {STARTS}, got {start!r}")
        kl = float(params.get("kl_beta", 0.0)) > 0
        kappas = v.get("kappa")
        if kappas is not None and div is None and not kl:
            raise ConfigError(f"{where}.kappa: preset {v['preset']} has neither a divergence nor a KL penalty")
        for kappa in (kappas if isinstance(kappas, list) else [kappas]):
            if kappa is not None and not (isinstance(kappa, (int, float)) and not isinstance(kappa, bool)
                                          and kappa >= 0):
                raise ConfigError(f"{where}.kappa: expected numbers >= 0, got {kappa!r}")
            arm_loss = dict(loss)
            if div is not None:
                curv = dk.CURVATURE[div]
                if kappa is not None:
                    arm_loss["eta"] = float(kappa) / curv
                k = float(arm_loss.get("eta", params["eta"])) * curv
                estimator = f"{div} on stored pi_ref samples ({'D_pef' if samples == 'pef' else 'all prompts'})"
            elif kl:
                curv = dk.CURVATURE[params["kl_estimator"]]
                if kappa is not None:
                    arm_loss["kl_beta"] = float(kappa) / curv
                k = float(arm_loss.get("kl_beta", params["kl_beta"])) * curv
                estimator = f"{params['kl_estimator']} penalty on-policy"
            else:
                k, estimator = 0.0, None
            name = v["name"] if not isinstance(kappas, list) else f"{v['name']}-k{kappa:g}"
            if name in arms or name == "base":
                raise ConfigError(f"{where}: arm name {name!r} is used twice (or is 'base')")
            arms[name] = dict(name=name, family=v.get("family", v["name"]), preset=v["preset"], kappa=round(k, 6),
                              loss=arm_loss, routing=routing,
                              samples=samples if div is not None else ("on-policy" if kl else "none"),
                              estimator=estimator, start=start, steps=v.get("steps"), lr=v.get("lr"))
    if any(a["start"] == "grpo" for a in arms.values()) and "grpo" not in arms:
        raise ConfigError("compare.variants: recovery arms (start: grpo) need an arm named grpo")
    return arms


def arm_config(cfg, arm: dict | None, seed: int, run_dir: str, model_dir: str, probes_screened: str | None = None):
    """The resolved config of one job: the compare config with this seed, model and arm (None: the base job);
    probes_screened: the seed's screening file, for a task with keep-rate probes."""
    job = copy.deepcopy(cfg)
    job.seed, job.run_dir, job.threads = seed, run_dir, cfg.threads or 1  # threads set: a real model, few workers
    job.model = dataclasses.replace(job.model, name=model_dir, tokenizer=None)
    if probes_screened is not None:
        job.task.kwargs = {**(job.task.kwargs or {}), "probes_screened": probes_screened}
    if arm is not None:
        job.train.method, job.train.loss = arm["preset"], dict(arm["loss"])
        job.train.routing = arm["routing"]
        job.train.divergence_samples = arm["samples"] if arm["samples"] in SAMPLES else "pef"
        if arm["steps"] is not None:
            job.train.steps = int(arm["steps"])
        if arm["lr"] is not None:
            job.train.lr = float(arm["lr"])
    return job


def _quiet_worker(log_path: str):
    """Worker output goes to the job's own log file; progress bars are the parent's business."""
    os.environ["TQDM_DISABLE"] = "1"
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    f = open(log_path, "a", buffering=1)
    sys.stdout = sys.stderr = f
    return f


def _resume_key(job) -> dict:
    """A job's resolved config as compare.resume compares it: whether a run resumes, or with how many workers, does
    not change a job's numbers."""
    import yaml

    from .config import to_dict

    d = yaml.safe_load(yaml.safe_dump(to_dict(job), sort_keys=False))  # as config.yaml stores it
    for k in ("resume", "workers"):
        d["compare"].pop(k, None)
    return d


def finished_job(run_dir: str, job, arm: dict | None) -> str | None:
    """The eval file of a job that finished in this run folder with the same resolved config (an arm: eval/final.json;
    base: eval/base.json, its presample and, with keep-rate probes, the screening), else None."""
    import yaml

    files = [os.path.join(run_dir, "eval", "final.json" if arm is not None else "base.json")]
    if arm is None:
        files.append(os.path.join(run_dir, "presample", "summary.json"))
        if job.task.kwargs.get("probes_screened"):
            files.append(job.task.kwargs["probes_screened"])
    if not all(os.path.exists(f) for f in files + [os.path.join(run_dir, "config.yaml")]):
        return None
    with open(os.path.join(run_dir, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    for k in ("resume", "workers"):
        saved.get("compare", {}).pop(k, None)
    return files[0] if saved == _resume_key(job) else None


def has_probes(cfg) -> bool:
    from .tasks import task_splits
    from .tasks.styles import PROBE_SPLIT

    return PROBE_SPLIT in task_splits(cfg.task.name, cfg.task.kwargs)


def screen_probes(s, path: str) -> dict:
    """Greedy decoding of the session's model (the SFT model, before any RL) on every keep-rate probe; the ones it
    answers right are written to `path` ("kept") and form the "probes" split of every later job."""
    from .common import encode_prompt
    from .tasks.styles import PROBE_SPLIT

    examples = s.task.examples(PROBE_SPLIT)
    prompts = [encode_prompt(s.tok, ex.prompt, s.cfg.task) for ex in examples]
    max_new = s.cfg.eval.max_new_tokens or s.cfg.rollout.max_new_tokens
    rb = s.engine.generate(prompts, n=1, greedy=True, max_new_tokens=max_new, desc="screen probes")
    rows = [dict(id=ex.meta["probe_id"], prompt=ex.prompt, answers=ex.answer, response=t,
                 ok=s.task.score(ex, t).reward >= 1.0) for ex, t in zip(examples, rb.texts)]
    out = dict(kept=[r["id"] for r in rows if r["ok"]], n=len(rows), max_new_tokens=max_new, rows=rows)
    write_json(path, out)
    s.run.log(f"[probes] screening: the SFT model answers {len(out['kept'])}/{len(rows)} keep-rate probes greedily "
              f"-> {path}")
    return out


def run_job(cfg, arm: dict | None, seed: int, root: str, quiet: bool = True) -> dict:
    """One unit of work (module level so a worker process can run it): arm None = the seed's base job (SFT,
    presample, screen the keep-rate probes, eval base); otherwise one arm's RL run from its start model, then eval.
    With compare.resume a job that finished before (finished_job) is read back instead of rerun, and an unfinished
    one's folder is removed first (a rerun from the start is deterministic; a half-written one would not be)."""
    import json

    import torch

    from . import tasks
    from .config import save_config
    from .pipeline import Session, run_eval, run_presample, run_train
    from .sft import sft_styles
    from .trainer import list_checkpoints

    seed_dir = os.path.join(root, f"seed_{seed}")
    name = "base" if arm is None else arm["name"]
    run_dir = os.path.join(seed_dir, name)
    sft_dir = os.path.join(seed_dir, "sft")
    start_dir = sft_dir
    if arm is not None and arm["start"] == "grpo":  # recovery: from the seed's GRPO checkpoint; pi_ref stays SFT
        start_dir = list_checkpoints(os.path.join(seed_dir, "grpo", "checkpoints"))[-1]
    screened = os.path.join(seed_dir, "base", "probes_screened.json") if has_probes(cfg) else None
    job = arm_config(cfg, arm, seed, run_dir, start_dir, screened)
    if cfg.compare.resume:
        done = finished_job(run_dir, job, arm)
        if done is not None:
            with open(done) as f:
                res = json.load(f)
            seconds = None
            if os.path.exists(os.path.join(run_dir, "job.json")):
                with open(os.path.join(run_dir, "job.json")) as f:
                    seconds = json.load(f).get("seconds")
            RunDir(run_dir).log(f"[compare] resume: seed {seed} {name} finished before; reusing {done}")
            return dict(seed=seed, arm=name, seconds=seconds, eval=res, reused=True)
        if os.path.isdir(run_dir):  # unfinished, or other settings: its logs, metrics and checkpoints would mix in
            RunDir(run_dir).log(f"[compare] resume: seed {seed} {name} did not finish with these settings; rerun")
            shutil.rmtree(run_dir)
    out = _quiet_worker(os.path.join(run_dir, "worker.log")) if quiet else None
    try:
        torch.set_num_threads(cfg.threads or 1)
        t0 = time.time()
        run = RunDir(run_dir)
        save_config(job, run.p("config.yaml"))
        if arm is None:
            task = tasks.get_task(cfg.task.name, seed=cfg.task.seed, **(cfg.task.kwargs or {}))
            torch.manual_seed(seed)
            sft_styles(task, sft_dir, cfg.compare.sft, seed=seed, log=run.log, task_cfg=cfg.task, model_cfg=cfg.model)
            if screened is None:
                s = Session(job)
            else:  # the task is built with every probe first; the screening then picks the base eval's probes too
                s = Session(arm_config(cfg, arm, seed, run_dir, start_dir))
                screen_probes(s, screened)
                s.cfg, s.task = job, tasks.get_task(job.task.name, seed=job.task.seed, **job.task.kwargs)
            run_presample(s)
            res = run_eval(s, "base")
        else:
            dst = run.p("presample")
            if not os.path.isdir(dst):  # the same pi_ref samples and split for every arm of this seed
                shutil.copytree(os.path.join(seed_dir, "base", "presample"), dst)
            s = Session(job)
            run_train(s, ref_model_name=sft_dir)  # a KL penalty's reference is the SFT model, whatever the start
            res = run_eval(s, "final")
        s.close()
        seconds = round(time.time() - t0, 1)
        write_json(run.p("job.json"), dict(seconds=seconds))  # read back by a resumed run
        return dict(seed=seed, arm=name, seconds=seconds, eval=res)
    finally:
        if out is not None:  # a pool worker runs several jobs: give each its own log, close the last one
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            out.close()


# ---------------------------------------------------------------------------------------------------- measurements
def _kl(p: list, q: list) -> float:
    """KL(p || q) of two discrete distributions (nats); q is floored so a vanished style gives a large, finite KL."""
    return sum(a * (math.log(max(a, 1e-12)) - math.log(max(b, 1e-12))) for a, b in zip(p, q) if a > 0)


def _per_prompt_pass(counts: list, n: int, k: int) -> list:
    from .passk import pass_at_k

    return [pass_at_k(n, c, k) for c in counts]


def summarize(res: dict, base: dict) -> dict:
    """The per-split numbers compare.json keeps for one (arm, seed) eval, with the measurements relative to the
    seed's base eval: realised KL of the first-token style distribution in both directions, and keep / explore at
    k = 16 (of the prompts base solves, i.e. its per-prompt Pass@16 >= 0.5, the arm's mean Pass@16; of those it
    misses, the same)."""
    out = {}
    n = res["n"]
    for split, r in res["splits"].items():
        s = {"pass@1": r["pass_at_k"]["1"], "pass@16": r["pass_at_k"].get("16"), "greedy": r.get("greedy"),
             "style_entropy": r.get("style_entropy"), "style_entropy_per_prompt": r.get("style_entropy_per_prompt"),
             "pass_at_k": dict(r["pass_at_k"]), "style_counts": r.get("style_counts", {}),
             "by_category": {g: {k: v for k, v in c.items() if k in ("n_prompts", "pass@1", "pass@16", "pass_at_k",
                                                                      "style_entropy", "style_entropy_per_prompt")}
                             for g, c in (r.get("by_category") or {}).items()}}
        b = base["splits"].get(split, {})
        if r.get("style_first_token_probs") and b.get("style_first_token_probs"):
            P, Q = b["style_first_token_probs"], r["style_first_token_probs"]
            s["kl_ref_theta"] = sum(_kl(p, q) for p, q in zip(P, Q)) / len(P)
            s["kl_theta_ref"] = sum(_kl(q, p) for p, q in zip(P, Q)) / len(P)
            s["style_first_token_mean"] = [sum(q[i] for q in Q) / len(Q) for i in range(len(Q[0]))]
        if "16" in r["pass_at_k"] and b.get("correct_counts"):
            arm16 = _per_prompt_pass(r["correct_counts"], n, 16)
            base16 = _per_prompt_pass(b["correct_counts"], base["n"], 16)
            solved = [a for a, c in zip(arm16, base16) if c >= 0.5]
            missed = [a for a, c in zip(arm16, base16) if c < 0.5]
            s["keep@16"] = sum(solved) / len(solved) if solved else None
            s["explore@16"] = sum(missed) / len(missed) if missed else None
        out[split] = s
    return out


# ---------------------------------------------------------------------------------------------------- the job
def check_compare(cfg) -> dict:
    """The settings compare needs, checked before anything loads (ConfigError: one line, exit 2); -> the arms."""
    from .config import ConfigError

    if cfg.task.name != "styles":
        raise ConfigError(f"task.name: compare runs on the styles task, got {cfg.task.name!r}")
    cc = cfg.compare
    if not cc.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in cc.seeds):
        raise ConfigError(f"compare.seeds: expected a non-empty list of ints, got {cc.seeds!r}")
    if cfg.eval.n < 16 or 16 not in cfg.eval.ks or 1 not in cfg.eval.ks:
        raise ConfigError(f"eval.ks: compare reports Pass@1 and Pass@16, so eval.ks must hold 1 and 16 (eval.n >= 16);"
                          f" got ks={cfg.eval.ks}, n={cfg.eval.n}")
    arms = expand_arms(cc)
    if any(a["samples"] == "all" for a in arms.values()) and not cfg.presample.store_all:
        raise ConfigError("compare.variants: an arm uses samples: all, so presample.store_all must be true")
    return arms


def _workers(cfg) -> int:
    if cfg.compare.workers:
        return int(cfg.compare.workers)
    return max(1, os.cpu_count() or 1)


def compare(cfg, log=print) -> dict:
    """Run the whole comparison; returns the compare.json content."""
    from tqdm.auto import tqdm

    from .compare_claims import claims
    from .config import to_dict

    arms = check_compare(cfg)
    cc = cfg.compare
    root = os.path.abspath(cfg.run_dir)
    run = RunDir(root)
    t0 = time.time()
    workers = _workers(cfg)
    n_jobs = len(cc.seeds) * (1 + len(arms))
    log(f"[compare] seeds={list(cc.seeds)} arms={list(arms)} jobs={n_jobs} workers={workers} -> {root}"
        + (" (resume: finished jobs are reused)" if cc.resume else ""))
    evals: dict = {m: {} for m in ["base"] + list(arms)}
    timings: dict = {}
    bar = tqdm(total=n_jobs, desc="compare", unit="job")

    reused = []

    def done(r):
        evals[r["arm"]][r["seed"]] = r["eval"]
        timings[f"{r['arm']}/seed_{r['seed']}"] = r["seconds"]
        if r.get("reused"):
            reused.append(f"{r['arm']}/seed_{r['seed']}")
        t = r["eval"]["splits"]["test"]
        bar.update(1)
        took = "reused" if r.get("reused") else f"{r['seconds']:.0f} s"
        bar.write(f"[compare] seed {r['seed']} {r['arm']:>14s}: test pass@1={t['pass_at_k']['1']:.3f} "
                  f"pass@16={t['pass_at_k']['16']:.3f} style entropy={t['style_entropy']:.2f} bits ({took})")

    def next_jobs(r):
        """What a finished job unlocks: a base job its seed's arms from SFT; the grpo arm its seed's recoveries."""
        start = "sft" if r["arm"] == "base" else "grpo" if r["arm"] == "grpo" else None
        return [a for a in arms.values() if a["start"] == start] if start else []

    if workers == 1:
        queue = [(None, s) for s in cc.seeds]
        while queue:
            arm, seed = queue.pop(0)
            r = run_job(cfg, arm, seed, root, quiet=False)
            done(r)
            queue += [(a, seed) for a in next_jobs(r)]
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        # spawn: a fresh interpreter per worker (fork after torch has started threads can deadlock)
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            pending = {pool.submit(run_job, cfg, None, s, root) for s in cc.seeds}
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    r = fut.result()  # a failed job raises here; its log stays in its run folder
                    done(r)
                    pending |= {pool.submit(run_job, cfg, a, r["seed"], root) for a in next_jobs(r)}
    bar.close()
    results = {m: {str(s): summarize(evals[m][s], evals["base"][s]) for s in sorted(evals[m])} for m in evals}
    out = dict(seeds=list(cc.seeds), job_version=cc.job_version, methods=["base"] + list(arms), arms=arms,
               results=results, wall_s=round(time.time() - t0, 1), job_seconds=timings, config=to_dict(cfg))
    if reused:
        out["reused_jobs"] = sorted(reused)  # compare.resume: these jobs' numbers come from an earlier invocation
    out["claims"] = claims(out)
    if cc.criteria == "smollm2":
        from .compare_real import replication

        out["replication"] = replication(out)
    write_json(run.p("compare.json"), out)
    from .compare_report import write_report

    report = write_report(out, root)
    log(f"[compare] wall {out['wall_s']:.0f} s; {run.p('compare.json')}; {report}")
    return out
