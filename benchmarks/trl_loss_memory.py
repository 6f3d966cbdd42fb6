"""Peak memory of one TRL GRPO loss step (compute_loss + backward on one micro-batch): DPHGRPOTrainer vs TRL's own
GRPOTrainer, at the smollm2-135m head shape (D=576, V=49152) and N completion tokens.

    python -m benchmarks.trl_loss_memory                  # N=2048 (4 x 512), CPU; prints a table, writes JSON
    python -m benchmarks.trl_loss_memory --tokens 4096 --seq-len 1024

The model is a 1-layer Llama with SmolLM2-135M's hidden size and vocabulary (random init: the head dominates the
loss step's memory, which is what differs between the two trainers). Each trainer runs in a fresh subprocess (glibc
told to return freed buffers, as for the kernel benchmarks); one untimed step first, then the measured one. Peak
extra = peak RSS during the step minus RSS before it (CPU) or max_memory_allocated minus allocated (CUDA), so it
counts the parameter gradients (the same in both) plus whatever the loss path keeps alive.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2, "a": 3}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def worker(which, tokens, seq_len, device, loss_type, is_level="token"):
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.measure import _PeakMeter
    from dph_kernels.integrations.trl import DPHGRPOTrainer

    D, V = 576, 49152
    folder = tempfile.mkdtemp(prefix="trl_mem_")
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                      num_key_value_heads=3, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok = _tokenizer()
    tok.save_pretrained(folder)
    args = GRPOConfig(output_dir=os.path.join(folder, "out"), use_cpu=device == "cpu", per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=seq_len, report_to="none", save_strategy="no",
                      loss_type=loss_type, importance_sampling_level=is_level, bf16=False, disable_tqdm=True)
    cls = DPHGRPOTrainer if which == "dph" else GRPOTrainer
    tr = cls(model=folder, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args,
             train_dataset=Dataset.from_list([{"prompt": "a"}] * 4), processing_class=tok)
    tr.current_gradient_accumulation_steps = 1
    model = tr.model.to(device)
    model.train()
    B, P = tokens // seq_len, 16
    g = torch.Generator().manual_seed(0)
    inputs = dict(prompt_ids=torch.randint(3, V, (B, P), generator=g), prompt_mask=torch.ones(B, P, dtype=torch.long),
                  completion_ids=torch.randint(3, V, (B, seq_len), generator=g),
                  completion_mask=torch.ones(B, seq_len, dtype=torch.long),
                  advantages=torch.randn(B, generator=g), num_items_in_batch=torch.tensor(float(B * seq_len)))
    inputs = {k: v.to(device) for k, v in inputs.items()}

    def step():
        loss = tr.compute_loss(model, inputs)
        loss.backward()
        return float(loss.detach())

    step()
    model.zero_grad(set_to_none=True)
    meter = _PeakMeter(device)
    meter.start()
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    mb = meter.stop()
    print(json.dumps(dict(trainer=which, peak_extra_mb=round(mb, 1), seconds=round(seconds, 2), loss=loss,
                          dW_mb=round(V * D * 4 / 2**20, 1))), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--loss-type", default="dapo")
    ap.add_argument("--importance-sampling-level", default="token", choices=["token", "sequence"],
                    help="sequence: GSPO's sequence-level ratio (with --loss-type grpo)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "trl_loss_memory.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.tokens, a.seq_len, a.device, a.loss_type, a.importance_sampling_level)
    import torch
    import trl

    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", HF_HUB_OFFLINE="1")
    for which in ("trl", "dph"):
        cmd = [sys.executable, "-m", "benchmarks.trl_loss_memory", "--worker", which, "--tokens", str(a.tokens),
               "--seq-len", str(a.seq_len), "--device", a.device, "--loss-type", a.loss_type,
               "--importance-sampling-level", a.importance_sampling_level]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(HERE))
        line = [x for x in res.stdout.splitlines() if x.startswith("{")]
        if res.returncode or not line:
            raise RuntimeError(f"{which} worker failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(line[-1]))
    meta = dict(shape=dict(N=a.tokens, D=576, V=49152, seq_len=a.seq_len), loss_type=a.loss_type,
                importance_sampling_level=a.importance_sampling_level, device=a.device,
                torch=torch.__version__, trl=trl.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                load=os.getloadavg()[0], threads=torch.get_num_threads())
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"TRL GRPO loss step (loss_type={a.loss_type}), smollm2 head N={a.tokens} D=576 V=49152, {a.device}, "
          f"{meta['date']}, load {meta['load']:.1f}")
    print(f"  {'trainer':<16} {'peak extra MiB':>15} {'seconds':>8}   (parameter gradients alone: dW = "
          f"{rows[0]['dW_mb']} MiB for the tied head)")
    for r in rows:
        name = "DPHGRPOTrainer" if r["trainer"] == "dph" else "GRPOTrainer"
        print(f"  {name:<16} {r['peak_extra_mb']:>15.1f} {r['seconds']:>8.2f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
