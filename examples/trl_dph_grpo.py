"""DPH-RL with TRL: split the prompts by pi_ref's pass rate, store the near-perfect prompts' samples, train
DPHGRPOTrainer (GRPO on D_exp prompts + the Jensen-Shannon divergence on the stored samples), all on the CPU.

    .venv/bin/python examples/trl_dph_grpo.py                      # tiny random Llama, seconds (a toy reward)
    .venv/bin/python examples/trl_dph_grpo.py --model smollm2      # the bundled SmolLM2-135M on arithmetic, minutes

Needs the train and trl extras (`make setup` installs both). A random model never solves arithmetic, so the tiny
model is rewarded for even-length answers instead: then some prompts are near-perfect and both loss terms train.
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny | smollm2 | a local HF folder")
    ap.add_argument("--prompts", type=int, default=16, help="training prompts (arithmetic)")
    ap.add_argument("--n", type=int, default=4, help="pi_ref samples per prompt for the split")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dph", default="dph-js", help="dph-js | dph-f | alpha")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    a = ap.parse_args(argv)

    from datasets import Dataset
    from trl import GRPOConfig

    from dph_kernels.integrations.trl import DPHGRPOTrainer, build_pef_dataset
    from dph_train.config import ModelConfig
    from dph_train.models import load_model
    from dph_train.tasks import get_task

    model, tok = load_model(ModelConfig(name=a.model), "cpu")
    task = get_task("arith", n_train=a.prompts, n_test=4, n_ood=4)
    examples = {ex.id: ex for ex in task.examples("train")}
    train = Dataset.from_list([{"prompt": [{"role": "user", "content": ex.prompt}], "example_id": ex.id}
                               for ex in examples.values()])

    def reward(completions, example_id, **kwargs):
        texts = [c[-1]["content"] for c in completions]
        if a.model == "tiny":  # a reward a random model earns about half the time
            return [1.0 if len(t) % 2 == 0 else 0.0 for t in texts]
        return [task.score(examples[i], t).reward for i, t in zip(example_id, texts)]

    # 1. once, offline: sample pi_ref, split D_exp / D_pef, store D_pef samples with their log pi_ref
    exp_ds, pef_ds = build_pef_dataset(model, tok, train, reward, n=a.n, max_new_tokens=24)
    print(f"[split] {len(exp_ds)} D_exp prompts, {len(train) - len(exp_ds)} D_pef prompts, "
          f"{len(pef_ds)} stored pi_ref samples")
    if len(exp_ds) == 0:
        exp_ds = train  # every prompt near-perfect: keep exploring on all of them
    out = a.out or tempfile.mkdtemp(prefix="trl_dph_")
    args = GRPOConfig(output_dir=out, use_cpu=True, per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=24, max_steps=a.steps, learning_rate=1e-5 if a.model != "tiny" else 1e-3,
                      epsilon_high=0.28, delta=3.0, beta=0.0, loss_type="dapo", logging_steps=1, report_to="none",
                      save_strategy="no", bf16=False, disable_tqdm=True)
    # 2. train: D_exp prompts through TRL's GRPO loop, stored samples mixed into every step (pef_per_step of them)
    trainer = DPHGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=exp_ds, processing_class=tok,
                             pef_dataset=pef_ds if len(pef_ds) else None, dph=a.dph, pef_per_step=4)
    trainer.train()
    for h in trainer.state.log_history:
        if "reward" in h:
            print({k: round(h[k], 4) for k in ("reward", "entropy", "clip_ratio/region_mean", "dph/divergence_mean",
                                               "dph/loss_pef") if k in h})


if __name__ == "__main__":
    main()
