"""Small shared pieces: prompt encoding, the run directory (log, metrics JSONL, status), seeding, memory."""
from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import time
import traceback

import torch


def encode_prompt(tokenizer, prompt: str, task_cfg) -> list:
    """Token ids of the prompt as one user turn of the chat template (with the assistant header appended)."""
    if task_cfg.chat_template and getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": prompt}]
        if task_cfg.system_prompt:
            msgs.insert(0, {"role": "system", "content": task_cfg.system_prompt})
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset; CPU: peak RSS since the last reset_peak_rss() (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return rss_mb()[1]


def rss_mb() -> tuple:
    """(current RSS, peak RSS since the last reset) of this process in MiB (Linux /proc; elsewhere both = the
    lifetime peak from getrusage)."""
    try:
        with open("/proc/self/status") as f:
            kv = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        return int(kv["VmRSS"].split()[0]) / 1024, int(kv["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak


_OPEN_PHASES: dict = {}  # memory phase name -> the largest peak RSS seen in it so far (MiB)


# Trimming and collecting cost ~0.25 s per training step on the 2-core CPU (measured with the compare job: 150 steps
# took 75 s instead of 35 s), worth it only when there is something to give back: below this growth of RSS since the
# last release they are skipped (a tiny model never pays; SmolLM2's ~0.3 GB micro-batch activations always do).
RELEASE_MIN_GROWTH_MB = 128
_LAST_RELEASE_RSS = 0.0


def _grown(force: bool) -> bool:
    return force or rss_mb()[0] - _LAST_RELEASE_RSS >= RELEASE_MIN_GROWTH_MB


def _released() -> None:
    global _LAST_RELEASE_RSS
    _LAST_RELEASE_RSS = rss_mb()[0]


def trim_heap(force: bool = False) -> None:
    """glibc malloc_trim: hand the heap pages freed tensors left behind back to the OS. Without it, activations freed
    after one micro-batch's backward stay resident and the next micro-batch's land beside them (measured on the
    SmolLM2 run: ~0.3 GB more peak RSS per step). Skipped when RSS grew by < RELEASE_MIN_GROWTH_MB since the last
    release, unless force."""
    global _LIBC
    if not _grown(force):
        return
    if _LIBC is None:
        import ctypes

        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
    _released()


_LIBC = None


def release_memory(force: bool = False) -> None:
    """Free what Python and glibc hold but no longer use: gc, then malloc_trim (skipped like trim_heap)."""
    import gc

    if not _grown(force):
        return
    gc.collect()
    trim_heap(force=True)


def reset_peak_rss(force: bool = False) -> None:
    """Start a new peak-RSS window (writes 5 to /proc/self/clear_refs, which resets VmHWM); the peak so far is
    folded into every open memory phase first, so a phase's peak survives the resets inside it. Releases memory
    first (always with force, else only past RELEASE_MIN_GROWTH_MB of growth)."""
    peak = rss_mb()[1]
    for k in _OPEN_PHASES:
        _OPEN_PHASES[k] = max(_OPEN_PHASES[k], peak)
    release_memory(force)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return str(x)
    return x


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(jsonable(obj), f, indent=2)
    os.replace(tmp, path)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (its .tmp folder is removed; the earlier checkpoints are intact)."""

    def __init__(self, message, step):
        super().__init__(message)
        self.step = step


class NonFiniteStep(RuntimeError):
    """A step's loss or gradient norm is NaN / inf: training stops before the optimizer step, so the weights (and
    every checkpoint) are those of the last good step."""

    def __init__(self, step, loss, grad_norm, checkpoints):
        self.step = step
        last = checkpoints[-1] if checkpoints else "none yet"
        super().__init__(f"step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                         f"(loss={loss}, grad_norm={grad_norm}); the optimizer step was not taken; last checkpoint: "
                         f"{last}")


class RunDir:
    """Everything a run writes lives under one folder:

        config.yaml  log.txt  metrics.jsonl  status.json
        presample/{data (datasets Arrow), summary.json}
        checkpoints/step_XXXXXX/{HF model folder, trainer_state.pt, optimizer/ (DCP)}
        eval/{<tag>.json, passk.png}     report.md

    Under torchrun only rank 0 (RANK=0) writes the log, metrics and status; the other ranks' log lines are dropped,
    and a rank that fails records its error in status.json and log.txt like rank 0 would.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.main = int(os.environ.get("RANK", "0")) == 0
        os.makedirs(self.path, exist_ok=True)

    def p(self, *parts) -> str:
        return os.path.join(self.path, *parts)

    def log(self, msg: str) -> None:
        if not self.main:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(self.p("log.txt"), "a") as f:
            f.write(line + "\n")

    def memory(self, phase: str):
        """with run.memory("train"): ...  logs "[mem] train: peak RSS X MiB, RSS after Y MiB" (CPU process RSS)."""
        return _MemoryPhase(self, phase)

    def metrics(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.p("metrics.jsonl"), "a") as f:
            f.write(json.dumps(jsonable(record)) + "\n")
            f.flush()

    def truncate_metrics(self, step: int) -> int:
        """Drop the per-step records after `step` from metrics.jsonl (a resume from step `step` redoes them, so each
        step appears once), and a last line cut short by a killed write. Records without a step are kept. Returns
        how many lines were dropped."""
        path = self.p("metrics.jsonl")
        if not self.main or not os.path.exists(path):
            return 0
        with open(path) as f:
            lines = f.read().splitlines()

        def keep(line):
            try:
                return json.loads(line).get("step", 0) <= step
            except ValueError:
                return False

        kept = [ln for ln in lines if ln.strip() and keep(ln)]
        if len(kept) != len(lines):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write("".join(ln + "\n" for ln in kept))
            os.replace(tmp, path)
        return len(lines) - len(kept)

    def status(self, state: str, **info) -> None:
        if not self.main and state != "failed":
            return
        write_json(self.p("status.json"), {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info})

    def fail(self, command: str, exc: BaseException, quiet: bool = False) -> None:
        """Record the failure in status.json (with the step, when the error carries one) and log.txt; quiet: the
        caller prints the message itself."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if not self.main:
            command = f"{command} (rank {os.environ.get('RANK')})"
        at = {"step": exc.step} if isinstance(getattr(exc, "step", None), int) else {}
        self.status("failed", command=command, error=repr(exc), traceback=tb, **at)
        with open(self.p("log.txt"), "a") as f:
            f.write(tb)
        if not quiet:
            print(f"[{command}] failed: {exc!r}; logs and checkpoints stay in {self.path}", file=sys.stderr)


class _MemoryPhase:
    def __init__(self, run, name):
        self.run, self.name = run, name

    def __enter__(self):
        reset_peak_rss(force=True)
        _OPEN_PHASES[self.name] = 0.0
        return self

    def __exit__(self, *exc):
        reset_peak_rss(force=True)  # folds this phase's last window in; the RSS after is read with the freed memory returned
        self.peak = _OPEN_PHASES.pop(self.name)
        self.rss = rss_mb()[0]
        if exc[0] is None:
            self.run.log(f"[mem] {self.name}: peak RSS {self.peak:.0f} MiB, RSS after {self.rss:.0f} MiB")
        return False


def read_jsonl(path: str) -> list:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a half-written last line of a killed run
                    pass
    return out
