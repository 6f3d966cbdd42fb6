"""Pre-sampling (method.md, "Data split"): sample n responses per training prompt from pi_ref, score them, split the
prompts into D_pef (fraction correct >= threshold; all n by default) and D_exp (the rest), sample D_pef prompts once
more and store the kept responses with their per-token log pi_ref — computed by dk.linear_logprob from the model's
last hidden states, never from logits. Everything is saved as a `datasets` Arrow DatasetDict plus a JSON summary:

    <run>/presample/data/{prompts, pef}     prompts: id, prompt, answer, split, n, n_correct, reasons
                                            pef:     example_id, prompt_ids, response_ids, ref_logp, text, correct
    <run>/presample/data/all                presample.store_all: every prompt's first-pass samples, pef's columns
    <run>/presample/summary.json
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter

import torch

from .batching import score_sequences
from .common import encode_prompt, write_json


def presample(cfg, model, tokenizer, task, engine, run, device) -> dict:
    pc = cfg.presample
    t0 = time.time()
    examples = task.examples("train")
    if pc.max_prompts is not None:
        examples = examples[:pc.max_prompts]
    if not examples:
        raise ValueError("the task has no training examples")
    prompts = [encode_prompt(tokenizer, ex.prompt, cfg.task) for ex in examples]
    run.log(f"[presample] {len(examples)} prompts x n={pc.n} from pi_ref (T={pc.temperature}, top_p={pc.top_p})")

    torch.manual_seed(cfg.seed * 7919 + 1)
    rb = engine.generate(prompts, n=pc.n, temperature=pc.temperature, top_p=pc.top_p, desc="presample")
    reasons_all = Counter()
    rows = []
    for i, ex in enumerate(examples):
        scores = [task.score(ex, rb.texts[i * pc.n + j]) for j in range(pc.n)]
        n_correct = sum(1 for s in scores if s.reward >= 1.0)
        reasons = Counter(s.reason for s in scores)
        reasons_all.update(reasons)
        frac = n_correct / pc.n
        is_pef = frac >= pc.pef_threshold and (n_correct > 0 or pc.pef_keep_incorrect)
        rows.append(dict(id=ex.id, prompt=ex.prompt, answer=str(ex.answer), split="pef" if is_pef else "exp",
                         n=pc.n, n_correct=n_correct, reasons=json.dumps(dict(reasons))))

    pef_idx = [i for i, r in enumerate(rows) if r["split"] == "pef"]
    pef_rows = []
    kept_reasons = Counter()
    if pef_idx and pc.pef_resample_n > 0:
        torch.manual_seed(cfg.seed * 7919 + 2)
        rb2 = engine.generate([prompts[i] for i in pef_idx], n=pc.pef_resample_n, temperature=pc.temperature,
                              top_p=pc.top_p, desc="presample D_pef")
        cand = []
        for a, i in enumerate(pef_idx):
            for j in range(pc.pef_resample_n):
                k = a * pc.pef_resample_n + j
                s = task.score(examples[i], rb2.texts[k])
                kept_reasons[s.reason] += 1
                if s.reward >= 1.0 or pc.pef_keep_incorrect:
                    cand.append((i, rb2.prompt_list(k), rb2.response_list(k), rb2.texts[k], s.reward >= 1.0))
        if cand:
            ref = score_sequences(model, [c[1] for c in cand], [c[2] for c in cand], tokenizer.pad_token_id,
                                  cfg.model, device, batch_size=pc.score_batch_size, impl=cfg.train.logp_impl)
            for c, lp in zip(cand, ref):
                pef_rows.append(dict(example_id=examples[c[0]].id, prompt_ids=c[1], response_ids=c[2],
                                     ref_logp=lp, text=c[3], correct=c[4]))

    all_rows = []
    if pc.store_all:  # the routing ablation's divergence samples: pi_ref's own samples, kept whatever their score
        ref = score_sequences(model, [rb.prompt_list(k) for k in range(len(rb))],
                              [rb.response_list(k) for k in range(len(rb))], tokenizer.pad_token_id, cfg.model,
                              device, batch_size=pc.score_batch_size, impl=cfg.train.logp_impl)
        for k, lp in enumerate(ref):
            i = k // pc.n
            all_rows.append(dict(example_id=examples[i].id, prompt_ids=rb.prompt_list(k),
                                 response_ids=rb.response_list(k), ref_logp=lp, text=rb.texts[k],
                                 correct=task.score(examples[i], rb.texts[k]).reward >= 1.0))

    n_exp = sum(1 for r in rows if r["split"] == "exp")
    counts = [r["n_correct"] for r in rows]
    summary = dict(
        n_prompts=len(rows), n=pc.n, pef_threshold=pc.pef_threshold,
        n_exp=n_exp, n_pef=len(pef_idx), n_pef_samples=len(pef_rows), n_all_samples=len(all_rows),
        pef_sample_tokens=sum(len(r["response_ids"]) for r in pef_rows),
        sample_accuracy=sum(counts) / (len(rows) * pc.n),
        frac_all_correct=sum(1 for c in counts if c == pc.n) / len(rows),
        frac_none_correct=sum(1 for c in counts if c == 0) / len(rows),
        correct_count_histogram={str(k): v for k, v in sorted(Counter(counts).items())},
        reasons=dict(reasons_all), pef_resample_reasons=dict(kept_reasons),
        mean_response_tokens=rb.n_response_tokens / len(rb),
        seconds=round(time.time() - t0, 1),
    )
    save_presample(run.p("presample"), rows, pef_rows, summary, all_rows)
    run.log(f"[presample] D_exp={n_exp} D_pef={len(pef_idx)} prompts, {len(pef_rows)} stored pi_ref samples; "
            f"sample accuracy {summary['sample_accuracy']:.3f}; {summary['seconds']}s")
    return summary


def save_presample(folder: str, rows: list, pef_rows: list, summary: dict, all_rows: list | None = None) -> None:
    import shutil

    from datasets import Dataset, DatasetDict, Features, List, Value

    pef_features = Features(dict(example_id=Value("string"), prompt_ids=List(Value("int64")),
                                 response_ids=List(Value("int64")), ref_logp=List(Value("float32")),
                                 text=Value("string"), correct=Value("bool")))
    dd = DatasetDict(prompts=Dataset.from_list(rows))
    if pef_rows:  # datasets cannot load back an empty split: no D_pef samples -> no "pef" split
        dd["pef"] = Dataset.from_list(pef_rows, features=pef_features)
    if all_rows:
        dd["all"] = Dataset.from_list(all_rows, features=pef_features)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, "data.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dd.save_to_disk(tmp)
    final = os.path.join(folder, "data")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_json(os.path.join(folder, "summary.json"), summary)


def presampled_data(folder: str) -> str:
    """The data folder that `presample` wrote under folder; FileNotFoundError, saying what to run, if there is none."""
    data = os.path.join(folder, "data")
    if not os.path.isdir(data):
        run_dir = os.path.dirname(os.path.normpath(folder))
        raise FileNotFoundError(f"no pre-sampled data in {folder}: run `dph-train presample --run_dir={run_dir}` "
                                "(same config) first, or `dph-train run`, which does both")
    return data


def load_presample(folder: str, samples: str = "pef"):
    """-> (prompts rows as list of dicts, stored sample rows as list of dicts, summary dict). samples: "pef" (the
    D_pef samples) or "all" (every prompt's, written only with presample.store_all)."""
    from datasets import load_from_disk

    dd = load_from_disk(presampled_data(folder))
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    if samples == "all" and "all" not in dd:
        raise FileNotFoundError(f"{folder} holds no samples of all prompts (train.divergence_samples=all): presample "
                                "again with presample.store_all=true")
    pef = dd[samples].to_list() if samples in dd else []
    check_stored_logprobs(folder, pef)
    return dd["prompts"].to_list(), pef, summary


def check_stored_logprobs(folder: str, pef: list) -> None:
    """Every stored log pi_ref is finite and <= 0 (dk's check_logprobs); the error names the row and the token."""
    import torch

    from dph_kernels._checks import check_logprobs

    for i, row in enumerate(pef):
        try:
            check_logprobs("ref_logp", torch.tensor(row["ref_logp"], dtype=torch.float32))
        except ValueError as e:
            raise ValueError(f"presample folder {folder}: D_pef row {i} (example {row.get('example_id')}): {e}") \
                from None
