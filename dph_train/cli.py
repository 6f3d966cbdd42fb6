"""`dph-train` — the DPH-RL recipe from the command line.

    dph-train presample [--config FILE] [--key=value ...]       sample pi_ref, split D_exp / D_pef, store D_pef
    dph-train train --method dph-js [--resume] [...]            the RL loop (presets: see config.METHODS)
    dph-train eval [--checkpoint latest|base|PATH] [--tag T]    Greedy + Pass@k on test and ood; JSON + PNG
    dph-train run [--method M] [--resume] [...]                 presample -> eval(base) -> train -> eval(final) -> report
    dph-train compare [--config configs/compare_styles.yaml]    SFT -> per method train + eval, 3 seeds: the collapse
                      [--resume]                                and its cure side by side (compare.json, report.md)

Multi-process training: torchrun --nproc_per_node=N -m dph_train train|run --train.parallel=ddp|fsdp2 [...]
(README "Multi-process training"); under torchrun, presample and eval run on rank 0 only.

Config: dataclass defaults (the CPU schedule on SmolLM2 + arith) <- --config FILE (or <run_dir>/config.yaml when it
exists) <- --section.key=value overrides, e.g. --train.steps=4 --run_dir=runs/try. Everything a run writes goes under
run_dir; the resolved config is saved there as config.yaml. `dph-train <command> --help` lists the config keys that
command reads, with type, default and help. Every value is type- and range-checked before anything is loaded; a user
error (bad value, unknown key, missing file, no checkpoint) prints one line and exits 2 (--debug: the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from .config import METHODS, load_config, save_config
from .pipeline import Session, run_eval, run_presample, run_train

COMMANDS = ("presample", "train", "eval", "run", "compare")
# The config sections each command reads (--help lists their keys; top-level keys always). A command not named here
# lists every section.
COMMAND_SECTIONS = {
    "presample": ("model", "task", "rollout", "presample"),
    "train": ("model", "task", "rollout", "train"),
    "eval": ("model", "task", "rollout", "eval"),
    "compare": ("task", "rollout", "presample", "train", "eval", "compare"),
}
COMMAND_HELP = {
    "presample": "sample pi_ref, split D_exp / D_pef, store D_pef",
    "train": "the RL loop (presets: " + " ".join(METHODS) + ")",
    "eval": "Greedy + Pass@k on the eval splits; JSON + PNG",
    "run": "presample -> eval(base) -> train -> eval(final) -> report",
    "compare": ("SFT -> presample -> every method -> eval, per seed: GRPO's collapse and DPH-RL's cure side by side "
                "(without --config it reads configs/compare_styles.yaml, whose values replace the defaults listed)"),
}


class UsageError(Exception):
    """A user mistake found by a command (not a bug): main prints it as one line and exits 2."""


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default=None, help="YAML config file (default: <run_dir>/config.yaml if present)")
    p.add_argument("--method", choices=METHODS, default=None, help="loss preset (= --train.method=...)")
    p.add_argument("--run-dir", dest="run_dir", default=None, help="run directory (= --run_dir=...)")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's last checkpoint / results")
    p.add_argument("--checkpoint", default="latest",
                   help="eval: latest (the run dir's newest checkpoint; an error when there is none) | base (the "
                        "untrained model) | a checkpoint folder")
    p.add_argument("--tag", default=None, help="eval: name of the result (default: base / final / folder name)")
    p.add_argument("--debug", action="store_true", help="print the full traceback of a user error")
    return p


def _parser() -> argparse.ArgumentParser:
    from .config import describe, format_keys

    p = argparse.ArgumentParser(prog="dph-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="command", required=True)
    common = _common()
    for name in COMMANDS:
        keys = format_keys(describe(COMMAND_SECTIONS.get(name)))
        sub.add_parser(name, parents=[common], help=COMMAND_HELP.get(name, ""),
                       description=f"dph-train {name}: {COMMAND_HELP.get(name, '')}",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="config keys (--key=value overrides; defaults shown, a --config file may change them):\n"
                              + keys)
    return p


def resolve_config(args, overrides: list):
    if args.method:
        overrides = overrides + [f"--train.method={args.method}"]
    if args.run_dir:
        overrides = overrides + [f"--run_dir={args.run_dir}"]
    cfg = load_config(args.config, overrides)
    saved = os.path.join(cfg.run_dir, "config.yaml")
    if args.config is None and os.path.exists(saved):
        cfg = load_config(saved, overrides)
    return cfg


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated(f"terminated by signal {signum}")


def cmd_presample(cfg, args, s: Session | None = None) -> dict:
    return run_presample(s or Session(cfg))


def cmd_train(cfg, args, s: Session | None = None) -> dict:
    own = s is None
    s = s or Session(cfg, par=getattr(args, "par", None))
    out = run_train(s, resume=args.resume)
    if own:  # the rollout engine shuts down while the process group still exists (vLLM under torchrun needs that)
        s.close()
    return out


def _eval_target(cfg, args):
    from .trainer import list_checkpoints

    if args.checkpoint == "base":
        return None, args.tag or "base"
    if args.checkpoint == "latest":
        ck = list_checkpoints(os.path.join(cfg.run_dir, "checkpoints"))
        if not ck:
            raise UsageError(f"no checkpoint in {os.path.join(cfg.run_dir, 'checkpoints')}; train first, or pass "
                             "--checkpoint base to evaluate the untrained model")
        return ck[-1], args.tag or "final"
    if not os.path.isdir(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint!r}: not base, latest or a folder")
    return args.checkpoint, args.tag or os.path.basename(os.path.normpath(args.checkpoint))


def cmd_eval(cfg, args, s: Session | None = None, tag: str | None = None) -> dict:
    from .evaluate import format_table

    if s is None:
        path, tag = getattr(args, "eval_target", None) or _eval_target(cfg, args)
        s = Session(cfg, model_name=path)
    res = run_eval(s, tag or args.tag or "base")
    print(format_table({res["tag"]: res}, ks=[k for k in (1, 8) if k in cfg.eval.ks] or cfg.eval.ks[:1]))
    return res


def cmd_run(cfg, args) -> dict:
    import json

    from .evaluate import format_table, load_evals, write_report

    t0 = time.time()
    s = Session(cfg, par=getattr(args, "par", None))
    run, par = s.run, s.par
    if par.is_main:  # under torchrun: presample and eval on rank 0, the others wait (train.dist_timeout_min)
        if args.resume and os.path.exists(run.p("presample", "summary.json")):
            run.log("[run] presample: reusing the stored data")
        else:
            with run.memory("presample"):
                cmd_presample(cfg, args, s)
        if args.resume and os.path.exists(run.p("eval", "base.json")):
            run.log("[run] eval base: reusing eval/base.json")
        else:
            with run.memory("eval base"):
                cmd_eval(cfg, args, s, tag="base")
    par.barrier()
    with run.memory("train"):
        train = cmd_train(cfg, args, s)
    if not par.is_main:
        s.close()
        return dict(train=train)
    with run.memory("eval final"):
        cmd_eval(cfg, args, s, tag="final")
    wall = time.time() - t0
    report = write_report(cfg, run, dict(wall_seconds=wall, device=str(s.device)))
    evals = {k: v for k, v in load_evals(run.p("eval")).items() if k in ("base", "final")}
    ks = [k for k in (1, 8) if k in cfg.eval.ks] or cfg.eval.ks[:2]
    print("\n" + format_table(evals, ks=ks))
    print(f"\n{cfg.train.method}: {train['steps']} steps; wall {wall:.0f} s; report {report}")
    s.close()
    return dict(wall_seconds=wall, report=report, train=train, evals=json.loads(json.dumps(evals)))


def _user_error(args, e: BaseException) -> int:
    """One line on stderr, exit status 2; the traceback only with --debug."""
    if getattr(args, "debug", False):
        raise e
    print(f"dph-train: error: {e}", file=sys.stderr)
    return 2


COMPARE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                              "compare_styles.yaml")


def cmd_compare(cfg, args) -> dict:
    from .compare import compare
    from .compare_report import format_table

    out = compare(cfg, log=print)
    for split in ("test", "ood-shift"):
        print("\n" + format_table(out, split))
    for exp, c in out["claims"].items():
        print(f"claim {exp}: {c['verdict']} — {c['statement']}")
    if "replication" in out:
        print(f"qualitative replication ({cfg.compare.criteria}): {out['replication']['verdict']} — "
              f"{out['replication']['statement']}")
    print(f"\nwall {out['wall_s']:.0f} s; report {os.path.join(os.path.abspath(cfg.run_dir), 'report.md')}")
    return out


def main(argv: list | None = None) -> int:
    from .config import ConfigError
    from .parallel import Parallel, check_launch, env_rank, env_world_size

    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if not (r.startswith("--") and "=" in r)]
    if bad:
        parser.error(f"unrecognized arguments {bad}; config overrides look like --section.key=value")
    if args.command == "compare" and args.config is None and os.path.exists(COMPARE_CONFIG):
        args.config = COMPARE_CONFIG  # compare's own defaults: the styles task and the tiny SFT model
    try:
        cfg = resolve_config(args, rest)
        if args.command == "eval":
            args.eval_target = _eval_target(cfg, args)  # before anything is written or loaded
        if args.command == "compare":
            from .compare import check_compare

            if args.resume:  # --resume = --compare.resume=true: reuse the jobs that finished (compare.run_job)
                cfg.compare.resume = True
            check_compare(cfg)
        if args.command in ("train", "run"):
            check_launch(cfg.train.parallel, args.command)
        elif args.command == "compare" and (env_world_size() or 1) > 1:
            raise ConfigError("compare runs its own worker processes (compare.workers): launch it without torchrun")
        if args.command == "train":  # train reads the split that presample wrote: say so before the model loads
            from .presample import presampled_data

            try:
                presampled_data(os.path.join(cfg.run_dir, "presample"))
            except FileNotFoundError as e:
                raise UsageError(str(e)) from None
    except (ConfigError, UsageError) as e:
        return _user_error(args, e)
    if args.command in ("presample", "eval") and env_rank() != 0:
        return 0  # under torchrun rank 0 samples / evaluates alone; the other ranks have nothing to do
    from .common import CheckpointWriteError, NonFiniteStep, RunDir

    run = RunDir(cfg.run_dir)
    if run.main:
        save_config(cfg, run.p("config.yaml"))
    run.status("running", command=args.command)
    import signal

    try:
        signal.signal(signal.SIGTERM, _on_sigterm)  # a killed run still records why it stopped
    except ValueError:  # not the main thread
        pass
    import torch

    threads = torch.get_num_threads()
    try:
        # train / run under torchrun: join the process group (a no-op for train.parallel=none)
        args.par = (Parallel.setup(cfg.train.parallel, cfg.device, cfg.train.dist_timeout_min)
                    if args.command in ("train", "run") else Parallel())
        fn = dict(presample=cmd_presample, train=cmd_train, eval=cmd_eval, run=cmd_run,
                  compare=cmd_compare)[args.command]
        with run.memory(args.command):
            fn(cfg, args)
        args.par.close()  # a barrier, then the group is destroyed (on an error: no barrier, the process just ends)
    except KeyboardInterrupt as e:
        run.fail(args.command, e)
        return 130
    except (ConfigError, UsageError) as e:
        run.fail(args.command, e, quiet=True)
        return _user_error(args, e)
    except (NonFiniteStep, CheckpointWriteError) as e:  # the run stops cleanly; its message says where it stands
        run.fail(args.command, e, quiet=True)
        print(f"[{args.command}] stopped: {e}; logs and checkpoints stay in {run.path}", file=sys.stderr)
        return 1
    except Exception as e:
        run.fail(args.command, e)
        raise
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) get their thread count back
    run.status("done", command=args.command)
    return 0


if __name__ == "__main__":  # the vLLM CPU backend may spawn processes: keep the entry point guarded
    sys.exit(main())
