"""The DPH-RL training loop (method.md): one optimizer step =

    D_exp prompts x G rollouts -> rewards -> dk.grpo_advantages -> log pi_old (no grad, fused kernel)
    + a batch of stored D_pef samples (with their log pi_ref)
    -> dk.FusedLinearDPHLoss per micro-batch, normalized by the global token count of the sequence's set
    -> AdamW -> grad clip -> weight sync to the rollout engine.

Micro-batches are routed: each one holds only D_exp rollouts or only D_pef samples, and its loss is divided by the
token count of its whole set in this step, so the sum over micro-batches is exactly
    L = token-mean over D_exp tokens of the PPO-clip loss + eta * token-mean over D_pef tokens of f(u_t),
the weighting method.md asks to expose (not the released code's accidental eta/8).

Routing (train.routing): RL explores on D_exp only ("exp") or on every training prompt ("all"); "auto" = "exp" when the
loss has a divergence term (the DPH presets), "all" otherwise (grpo, dapo, kl-k3, rkl-k2). The divergence term uses the
stored pi_ref samples of D_pef (train.divergence_samples="pef", the method) or of every prompt ("all": the routing
ablation; presample.store_all must have stored them). KL-penalty presets (kl_beta > 0) score a live reference model.
The loss path (PolicyLoss, one module whose forward is backbone + fused loss) hands lm_head's weight to the kernel;
lm_head's forward is never called here.

Under torchrun (train.parallel=ddp|fsdp2) each rank generates its share of the step's GRPO groups, the token counts
and metrics are summed over ranks, and the distributed details live in parallel.py (`self.par`); with the default
parallel=none every `self.par` call is the identity.
"""
from __future__ import annotations

import copy
import math
import os
import random
import shutil
import time
from collections import Counter, defaultdict

import torch

import dph_kernels as dk

from .batching import IGNORE, Batch, Seq, collate, head_weight_like, pad_float, response_hidden, score_sequences
from .common import (CheckpointWriteError, NonFiniteStep, encode_prompt, peak_memory_mb, reset_peak_rss, trim_heap,
                     write_json)
from .models import autocast, head_transform, save_hf_folder
from .parallel import Parallel

def build_loss(method: str, overrides: dict, impl: str = "auto", log_entropy: bool = False, head: dict | None = None):
    """The preset's loss; head: the model's softcap / logit_scale (models.head_transform), for both heads."""
    kw = dict(overrides or {})
    for k, v in (head or {}).items():
        kw.setdefault(k, v)
        kw.setdefault("ref_" + k, v)
    kw.setdefault("impl", impl)
    kw.setdefault("log_entropy", log_entropy)
    return dk.FusedLinearDPHLoss.preset(method, **kw)


class PolicyLoss(torch.nn.Module):
    """backbone -> last hidden states of the response positions -> fused loss with lm_head's weight, in one
    forward: DDP and FSDP2 hook the root module's forward, and under FSDP2 the weight is whole only inside it."""

    def __init__(self, model, loss_fn, model_cfg):
        super().__init__()
        self.model, self.loss_fn, self.model_cfg = model, loss_fn, model_cfg

    def forward(self, input_ids, attention_mask, position_ids, targets, response_mask, is_pef, prompt_len: int,
                **loss_kw):
        b = Batch(input_ids, attention_mask, position_ids, targets, response_mask, prompt_len)
        with autocast(self.model_cfg, input_ids.device):
            h = response_hidden(self.model, b)
        return self.loss_fn(h, head_weight_like(self.model, h), targets, response_mask, is_pef, **loss_kw)


def _chunks(xs: list, n: int):
    for i in range(0, len(xs), n):
        yield xs[i:i + n]


class Trainer:
    def __init__(self, cfg, model, tokenizer, task, engine, run, device, prompts_rows: list, pef_rows: list,
                 ref_model=None, par: Parallel | None = None):
        self.cfg, self.model, self.tok, self.task, self.engine, self.run = cfg, model, tokenizer, task, engine, run
        self.device = device
        self.par = par or Parallel()
        tc = cfg.train
        # The entropy metric comes from the log pi_old pass, or (old_logp=on_policy) from the update pass itself.
        self.loss_fn = build_loss(tc.method, tc.loss, tc.logp_impl, log_entropy=tc.old_logp == "on_policy",
                                  head=head_transform(model))
        self.use_pef = self.loss_fn.cfg["divergence"] is not None
        self.routing = routing = tc.routing if tc.routing != "auto" else ("exp" if self.use_pef else "all")
        by_id = {ex.id: ex for ex in task.examples("train")}
        missing = [r["id"] for r in prompts_rows if r["id"] not in by_id]
        if missing:
            raise ValueError(f"{len(missing)} pre-sampled prompts are not in the task's train split (task changed?): "
                             f"{missing[:3]}")
        pool = [r for r in prompts_rows if r["split"] == "exp"] if routing == "exp" else list(prompts_rows)
        self.exp_examples = [by_id[r["id"]] for r in pool]
        self.exp_prompt_ids = [encode_prompt(tokenizer, ex.prompt, cfg.task) for ex in self.exp_examples]
        self.pef_rows = pef_rows if (self.use_pef and tc.pef_per_step > 0) else []
        if self.use_pef and not self.pef_rows:
            run.log("[train] warning: no stored D_pef samples; the divergence term is empty (pure PPO-clip steps)")
        if not self.exp_examples and not self.pef_rows:
            raise ValueError("nothing to train on: D_exp is empty and there are no D_pef samples")
        self.ref_model = ref_model
        if needs_ref_model(self.loss_fn) and ref_model is None:
            raise ValueError(f"method {tc.method} has a KL penalty (kl_beta > 0): it needs a reference model "
                             "(pass ref_model)")
        # The optimizer is built on the wrapped module's parameters (under fsdp2: this rank's shards).
        self.policy = self.par.wrap(PolicyLoss(model, self.loss_fn, cfg.model), model)
        self.opt = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad], lr=tc.lr,
                                     weight_decay=tc.weight_decay, betas=tuple(tc.betas))
        self.step = 0
        self.total_steps = self._total_steps()

    def _total_steps(self) -> int:
        tc = self.cfg.train
        if tc.steps is not None:
            return int(tc.steps)
        n = max(1, len(self.exp_examples))
        return max(1, math.ceil(tc.epochs * n / tc.prompts_per_step))

    # ---------------------------------------------------------------- data order (a pure function of the step)
    def _order(self, n: int, epoch: int, salt: int) -> list:
        idx = list(range(n))
        random.Random(self.cfg.seed * 1_000_003 + epoch * 7_919 + salt).shuffle(idx)
        return idx

    def _take(self, n_items: int, per_step: int, step: int, salt: int) -> list:
        if n_items == 0 or per_step == 0:
            return []
        out = []
        start = step * per_step
        for g in range(start, start + per_step):
            epoch, k = divmod(g, n_items)
            out.append(self._order(n_items, epoch, salt)[k])
        return out

    # ---------------------------------------------------------------- one step
    def collect(self, step: int):
        """Rollouts + rewards + advantages for this rank's share of the step's D_exp prompts (whole GRPO groups, so
        the advantages are the one-process ones), plus its share of the step's D_pef samples. The returned info
        holds the whole step's statistics (gathered over ranks)."""
        tc = self.cfg.train
        G = tc.group_size
        idx = self._take(len(self.exp_examples), tc.prompts_per_step, step, salt=1)
        exp_seqs, rewards, reasons, gen_tokens = [], [], Counter(), 0
        parts, t_roll = self._rollouts(idx, step)
        for positions, rb in parts:
            part_rewards = []
            for k in range(len(rb)):
                s = self.task.score(self.exp_examples[idx[positions[k // G]]], rb.texts[k])
                part_rewards.append(float(s.reward))
                reasons[s.reason] += 1
            adv = dk.grpo_advantages(torch.tensor(part_rewards, dtype=torch.float32), G)
            for k in range(len(rb)):
                exp_seqs.append(Seq(rb.prompt_list(k), rb.response_list(k), advantage=float(adv[k]),
                                    meta=dict(finished=rb.finished[k])))
            rewards += part_rewards
            gen_tokens += rb.n_response_tokens
        pef_seqs = []
        # never the same stored sample twice in one step (fewer stored samples than pef_per_step: use each once)
        for j in self.par.shard(self._take(len(self.pef_rows), min(tc.pef_per_step, len(self.pef_rows)), step,
                                           salt=2)):
            r = self.pef_rows[j]
            pef_seqs.append(Seq(list(r["prompt_ids"]), list(r["response_ids"]), is_pef=True,
                                ref_logp=list(r["ref_logp"])))
        info = dict(rewards=rewards, reasons=dict(reasons), gen_tokens=gen_tokens, t_rollout=t_roll,
                    response_lens=[s.n_tokens for s in exp_seqs], finished=[bool(s.meta["finished"]) for s in exp_seqs],
                    n_pef=len(pef_seqs))
        if self.par.enabled:
            ranks = self.par.gather(info)
            info = {k: sum((r[k] for r in ranks), []) for k in ("rewards", "response_lens", "finished")}
            info.update(reasons=sum((Counter(r["reasons"]) for r in ranks), Counter()),
                        gen_tokens=sum(r["gen_tokens"] for r in ranks), n_pef=sum(r["n_pef"] for r in ranks),
                        t_rollout=max(r["t_rollout"] for r in ranks))
        return exp_seqs, pef_seqs, info

    def _rollouts(self, idx: list, step: int):
        """-> ([(positions in idx, RolloutBatch)] for this rank's groups, seconds spent generating).
        One process: one generate call for the whole step, seeded by the step. Under torchrun: one call per group,
        seeded by (step, position), so the union over ranks is the same batch whatever the number of ranks."""
        if not idx:
            return [], 0.0
        rc, G, seed = self.cfg.rollout, self.cfg.train.group_size, self.cfg.seed * 1_000_003 + step
        if self.par.enabled:
            calls = [([p], seed * 1_009 + p) for p in self.par.shard(range(len(idx)))]
        else:
            calls = [(list(range(len(idx))), seed)]
        out, t0 = [], time.time()
        for positions, call_seed in calls:
            torch.manual_seed(call_seed)
            kw = dict(seed=call_seed) if self.engine.name == "vllm" else {}
            rb = self.engine.generate([self.exp_prompt_ids[idx[p]] for p in positions], n=G,
                                      temperature=rc.temperature, top_p=rc.top_p,
                                      desc=f"rollout {step + 1}" if self.par.is_main else False, **kw)
            out.append((positions, rb))
        return out, time.time() - t0

    def _fill_logps(self, exp_seqs: list) -> dict:
        """log pi_old (and entropy) of the rollouts under the current policy, no grad; the online reference's
        log-probs for a KL penalty.
        Scored on the plain model (parallel.py): no collective, whatever this rank's share is."""
        if self.cfg.train.old_logp == "on_policy":
            if exp_seqs and self.ref_model is not None:
                self._fill_online_ref(exp_seqs)
            return {}
        ent_sum, n = 0.0, 0
        if exp_seqs:
            pad, mc, impl = self.tok.pad_token_id, self.cfg.model, self.cfg.train.logp_impl
            P = [s.prompt_ids for s in exp_seqs]
            R = [s.response_ids for s in exp_seqs]
            bs = self.cfg.train.micro_batch_size
            old, ent = score_sequences(self.par.plain, P, R, pad, mc, self.device, batch_size=bs,
                                       return_entropy=True, impl=impl)
            for s, lp in zip(exp_seqs, old):
                s.old_logp = lp
            n = sum(len(e) for e in ent)
            ent_sum = sum(sum(e) for e in ent)
            if self.ref_model is not None:
                self._fill_online_ref(exp_seqs)
        ent_sum, n = self.par.all_sum([ent_sum, n])
        return dict(entropy=ent_sum / n) if n else {}

    def _fill_online_ref(self, exp_seqs: list) -> None:
        ref = score_sequences(self.ref_model, [s.prompt_ids for s in exp_seqs], [s.response_ids for s in exp_seqs],
                              self.tok.pad_token_id, self.cfg.model, self.device,
                              batch_size=self.cfg.train.micro_batch_size, impl=self.cfg.train.logp_impl)
        for s, lp in zip(exp_seqs, ref):
            s.online_ref_logp = lp

    def _micro_loss(self, seqs: list | None, normalizer):
        """seqs None: an empty micro-batch (one padding token, no loss token, zero loss and gradient) for a rank
        that has fewer micro-batches than the others: every rank must run as many forwards (see update)."""
        empty = seqs is None
        if empty:
            seqs = [Seq([self.tok.pad_token_id], [self.tok.pad_token_id])]
        b = collate([s.prompt_ids for s in seqs], [s.response_ids for s in seqs], self.tok.pad_token_id)
        if empty:
            b.targets.fill_(IGNORE)
            b.response_mask.fill_(False)
        b = b.to(self.device)
        R = b.targets.shape[1]
        is_pef = torch.tensor([s.is_pef for s in seqs], dtype=torch.bool, device=self.device)
        adv = torch.tensor([s.advantage for s in seqs], dtype=torch.float32, device=self.device)
        kw = dict(advantages=adv, normalizer=normalizer)
        if any(s.old_logp is not None for s in seqs):
            kw["old_logp"] = pad_float([s.old_logp for s in seqs], R).to(self.device)
        if any(s.ref_logp is not None for s in seqs):
            kw["ref_logp"] = pad_float([s.ref_logp for s in seqs], R).to(self.device)
        if any(s.online_ref_logp is not None for s in seqs):
            kw["online_ref_logp"] = pad_float([s.online_ref_logp for s in seqs], R).to(self.device)
        return self.policy(b.input_ids, b.attention_mask, b.position_ids, b.targets, b.response_mask, is_pef,
                           b.prompt_len, **kw)

    def update(self, exp_seqs: list, pef_seqs: list) -> dict:
        """Loss over routed micro-batches, backward, grad clip, AdamW step. Never calls lm_head's forward."""
        tc, par = self.cfg.train, self.par
        self.policy.train()
        # The whole step's token count of each set (over all ranks): summing micro-batch losses gives one big
        # batch's token-means.
        n_exp, n_pef = (int(v) for v in par.all_sum([sum(s.n_tokens for s in exp_seqs),
                                                     sum(s.n_tokens for s in pef_seqs)]))
        normalizer = {k: float(v) for k, v in (("exp", n_exp), ("pef", n_pef)) if v > 0}
        # Longest first keeps padding small inside each micro-batch.
        exp_sorted = sorted(exp_seqs, key=lambda s: -(len(s.prompt_ids) + s.n_tokens))
        pef_sorted = sorted(pef_seqs, key=lambda s: -(len(s.prompt_ids) + s.n_tokens))
        mbs = list(_chunks(exp_sorted, tc.micro_batch_size)) + list(_chunks(pef_sorted, tc.micro_batch_size))
        n_mb = par.all_max(len(mbs))  # ranks with fewer micro-batches pad with empty ones
        grad_norm, acc = 0.0, _MetricAcc()
        for _ in range(tc.ppo_epochs):
            self.opt.zero_grad(set_to_none=True)
            metrics = []
            for i in range(n_mb):
                with par.grad_sync(last=i == n_mb - 1):
                    out = self._micro_loss(mbs[i] if i < len(mbs) else None, normalizer)
                    (out.loss * par.loss_scale).backward()
                if i < len(mbs):
                    metrics.append(out.metrics)
                del out
                if self.device.type == "cpu":
                    trim_heap()  # this micro-batch's activations go back to the OS before the next one
            acc = _MetricAcc()
            for m in sum(par.gather(metrics), []):
                acc.add(m)
            params = [p for p in self.policy.parameters() if p.grad is not None]
            grad_norm = par.clip_grad_norm(params, tc.grad_clip)
            loss = acc.result().get("loss", 0.0)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # the same on every rank (reduced values)
                raise NonFiniteStep(self.step + 1, loss, grad_norm, list_checkpoints(self.ckpt_root()))
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)  # the gradients (one model's size) are not kept between steps
        m = acc.result()
        m.update(grad_norm=grad_norm, exp_tokens=n_exp, pef_tokens=n_pef)
        return m

    def train_step(self) -> dict:
        step = self.step
        t0 = time.time()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()  # peak_memory_mb = this step's peak RSS
        exp_seqs, pef_seqs, info = self.collect(step)
        t1 = time.time()
        extra = self._fill_logps(exp_seqs)
        t2 = time.time()
        m = self.update(exp_seqs, pef_seqs)
        t3 = time.time()
        self.par.refresh_plain()  # fsdp2: the full copy that rollouts and scoring use
        self.engine.sync_weights(self.par.plain)
        t_sync = time.time() - t3
        self.step += 1
        rewards, lens, finished = info["rewards"], info["response_lens"], info["finished"]
        trained = m["exp_tokens"] + m["pef_tokens"]
        rec = dict(
            step=self.step, method=self.cfg.train.method,
            reward_mean=sum(rewards) / len(rewards) if rewards else None,
            accuracy=sum(1 for r in rewards if r >= 1.0) / len(rewards) if rewards else None,
            n_exp_seqs=len(lens), n_pef_seqs=info["n_pef"],
            response_len_mean=sum(lens) / len(lens) if lens else None,
            frac_finished=sum(finished) / len(finished) if finished else None,
            entropy=extra.get("entropy", m.get("entropy_mean_exp")),
            **m,
            reasons=dict(info["reasons"]),
            lr=self.opt.param_groups[0]["lr"],
            time_rollout=round(info["t_rollout"], 3), time_old_logp=round(t2 - t1, 3),
            time_update=round(t3 - t2, 3), time_sync=round(t_sync, 3), time_step=round(time.time() - t0, 3),
            rollout_tokens_per_s=info["gen_tokens"] / info["t_rollout"] if info["t_rollout"] > 0 else None,
            train_tokens_per_s=trained / (t3 - t2) if t3 > t2 else None,
            peak_memory_mb=round(peak_memory_mb(self.device), 1),  # rank 0's under torchrun
        )
        if self.par.enabled:
            rec["world_size"] = self.par.world
        return rec

    # ---------------------------------------------------------------- checkpoints
    def ckpt_root(self) -> str:
        return self.run.p("checkpoints")

    def save_checkpoint(self) -> str:
        """step_XXXXXX/ = the HF folder (rank 0, full weights) + trainer_state.pt (step, RNG) + optimizer/ (DCP,
        every rank writes its part; only with train.save_optimizer); COMPLETE.json last, after a barrier.
        Everything is written into step_XXXXXX.tmp and renamed at the end: a write that fails (a full disk, a
        read-only folder) removes the .tmp folder and raises an OSError naming the path; the checkpoints before it
        are untouched."""
        par = self.par
        root = self.ckpt_root()
        final = os.path.join(root, f"step_{self.step:06d}")
        tmp = final + ".tmp"
        try:
            if par.is_main:
                os.makedirs(root, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                save_hf_folder(par.plain, self.tok, tmp)
                state = dict(step=self.step, torch_rng=torch.get_rng_state(), python_rng=random.getstate())
                torch.save(state, os.path.join(tmp, "trainer_state.pt"))
            par.barrier()
            # The optimizer state is twice the model's size (AdamW moments): written only when a resume is wanted.
            if self.cfg.train.save_optimizer:
                par.save_optimizer(self.opt, os.path.join(tmp, "optimizer"))
            par.barrier()
            if par.is_main:
                write_json(os.path.join(tmp, "COMPLETE.json"), dict(step=self.step, method=self.cfg.train.method,
                                                                    world_size=par.world))
        except OSError as e:
            if par.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            last = list_checkpoints(root)
            raise CheckpointWriteError(f"writing checkpoint {tmp} failed ({e.strerror or e}); the last complete "
                                       f"checkpoint is {last[-1] if last else 'none'}", self.step) from e
        if par.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            keep = max(1, self.cfg.train.keep_checkpoints)
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        par.barrier()
        return final

    def load_checkpoint(self, path: str) -> None:
        """Any checkpoint of save_checkpoint, whatever the number of processes that wrote it."""
        from safetensors.torch import load_file

        plain = self.par.plain
        sd = {}
        for f in sorted(os.listdir(path)):
            if f.endswith(".safetensors"):
                sd.update(load_file(os.path.join(path, f)))
        missing, unexpected = plain.load_state_dict(sd, strict=False)
        tied = {"lm_head.weight"} if getattr(plain.config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing}, extra {unexpected}")
        if tied:
            plain.tie_weights()
        self.par.push_plain()
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
        if os.path.isdir(os.path.join(path, "optimizer")):
            self.par.load_optimizer(self.opt, os.path.join(path, "optimizer"))
        elif "optimizer" in state:  # checkpoints written before the optimizer moved to DCP
            self.opt.load_state_dict(state["optimizer"])
        else:
            self.run.log(f"[train] {path} has no optimizer state (saved with train.save_optimizer=false): AdamW's "
                         "moments start from zero")
        self.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.engine.sync_weights(plain)

    # ---------------------------------------------------------------- the loop
    def fit(self, resume: bool = False) -> dict:
        from tqdm.auto import tqdm

        tc = self.cfg.train
        if resume:
            ck = list_checkpoints(self.ckpt_root())
            if ck:
                self.load_checkpoint(ck[-1])
                self.run.log(f"[train] resumed from {ck[-1]} (step {self.step})")
            else:
                self.run.log("[train] --resume: no checkpoint yet, starting from step 0")
            dropped = self.run.truncate_metrics(self.step)  # the steps redone from here are logged once
            if dropped:
                self.run.log(f"[train] metrics.jsonl: dropped {dropped} line(s) after step {self.step}")
        self.run.log(f"[train] method={tc.method} steps={self.total_steps} D_exp prompts={len(self.exp_examples)} "
                     f"routing={self.routing} stored pi_ref samples={len(self.pef_rows)} G={tc.group_size} prompts/step={tc.prompts_per_step} "
                     f"pef/step={min(tc.pef_per_step, len(self.pef_rows))} lr={tc.lr}"
                     + (f" parallel={tc.parallel} world_size={self.par.world}" if self.par.enabled else ""))
        self.run.status("training", step=self.step, total_steps=self.total_steps)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {tc.method}", unit="step",
                   disable=not self.par.is_main)
        t0 = time.time()
        last = {}
        while self.step < self.total_steps:
            rec = self.train_step()
            rec["time_elapsed"] = round(time.time() - t0, 1)
            self.run.metrics(rec)
            last = rec
            bar.update(1)
            bar.set_postfix(reward=f"{rec['reward_mean'] or 0:.3f}", loss=f"{rec['loss']:.4f}",
                            s=f"{rec['time_step']:.1f}")
            self.run.status("training", step=self.step, total_steps=self.total_steps)
            if tc.save_every and self.step % tc.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        ck = list_checkpoints(self.ckpt_root())
        if not ck or not ck[-1].endswith(f"step_{self.step:06d}"):
            path = self.save_checkpoint()
        else:
            path = ck[-1]
        self.run.log(f"[train] done: {self.step} steps in {time.time() - t0:.1f}s; checkpoint {path}")
        return dict(steps=self.step, seconds=round(time.time() - t0, 1), checkpoint=path, last=last)


class _MetricAcc:
    """Combines FusedLinearDPHLoss metrics over micro-batches: loss terms are summed (each micro-batch is already
    divided by the step's token count), D_exp statistics are weighted by D_exp tokens, D_pef ones by D_pef tokens."""

    SUM = ("loss", "loss_exp", "loss_pef")
    EXP = ("clipfrac_low", "clipfrac_high", "clipfrac_dual", "ratio_mean", "approx_kl", "kl_penalty_mean",
           "entropy_mean_exp")
    PEF = ("divergence_mean",)

    def __init__(self):
        self.sums, self.w, self.max = defaultdict(float), defaultdict(float), {}

    def add(self, m: dict) -> None:
        ne, npf = m.get("n_tokens_exp", 0), m.get("n_tokens_pef", 0)
        for k in self.SUM:
            if k in m:
                self.sums[k] += float(m[k])
                self.w[k] = 1.0
        for keys, n in ((self.EXP, ne), (self.PEF, npf)):
            for k in keys:
                if k in m and n > 0:
                    self.sums[k] += float(m[k]) * n
                    self.w[k] += n
        if "divergence_max" in m and npf > 0:
            self.max["divergence_max"] = max(self.max.get("divergence_max", float("-inf")), float(m["divergence_max"]))

    def result(self) -> dict:
        out = {k: (self.sums[k] if k in self.SUM else self.sums[k] / self.w[k]) for k in self.sums if self.w[k] > 0}
        out.update(self.max)
        return out


def list_checkpoints(root: str) -> list:
    """Complete checkpoints (those with COMPLETE.json), oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for d in sorted(os.listdir(root)):
        p = os.path.join(root, d)
        if d.startswith("step_") and not d.endswith(".tmp") and os.path.exists(os.path.join(p, "COMPLETE.json")):
            out.append(p)
    return out


def needs_ref_model(loss_fn) -> bool:
    """A KL penalty (kl-k3, rkl-k2) scores the rollouts under a live reference model every step."""
    return float(loss_fn.cfg.get("kl_beta", 0.0)) > 0


def make_ref_model(model):
    """A frozen copy of the initial policy (the KL-penalty baselines' online reference)."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
