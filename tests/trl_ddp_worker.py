"""Worker of test_integration_trl.py's 2-process test (run by torchrun): DPHGRPOTrainer with stored D_pef samples,
2 optimizer steps under DDP (accelerate, gloo on CPU); rank 0 writes what the test checks to a JSON file.

    python -m torch.distributed.run --nproc_per_node=2 tests/trl_ddp_worker.py MODEL_DIR OUT_DIR REPORT.json
"""
import json
import os
import sys

import torch
import torch.distributed as dist

import trl_helpers as H


def main(model_dir, out_dir, report):
    from dph_kernels.integrations.trl import PEF_KEY, DPHGRPOTrainer

    rows = [dict(prompt_ids=[3 + i, 4], response_ids=[5 + i] * (2 + i % 3), ref_logp=[-3.5] * (2 + i % 3))
            for i in range(8)]
    args = H.grpo_config(out_dir, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    tr = DPHGRPOTrainer(model=model_dir, reward_funcs=H.reward_letters, args=args, train_dataset=H.prompt_dataset(),
                        processing_class=H.make_tokenizer(), pef_dataset=rows, dph="dph-js", pef_per_step=2)
    seen, calls = [], [0]
    tr.dph_loss.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    inner = tr._compute_loss

    def spy(model, inputs):
        seen.append([r["prompt_ids"][0] for r in inputs[PEF_KEY]["rows"]])
        return inner(model, inputs)

    tr._compute_loss = spy
    p0 = torch.cat([p.detach().flatten().clone() for p in tr.model.parameters()])
    tr.train()
    flat = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
    world = dist.get_world_size()
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    seen_all = [None] * world
    dist.all_gather_object(seen_all, seen)
    calls_all = [None] * world
    dist.all_gather_object(calls_all, calls[0])
    if dist.get_rank() == 0:
        rep = dict(world_size=world, backend=dist.get_backend(),
                   max_param_diff_across_ranks=float(max((g - gathered[0]).abs().max() for g in gathered)),
                   moved=float((flat - p0).norm() / p0.norm()), pef_rows_rank0=seen_all[0], pef_rows_rank1=seen_all[1],
                   steps=tr.state.global_step, dph_loss_calls=calls_all)
        with open(report, "w") as f:
            json.dump(rep, f)
    dist.barrier()  # before destroy_process_group: without both, gloo can abort at exit
    dist.destroy_process_group()
    # Even so, one run in the merged suite on a loaded 2-core machine aborted at interpreter exit (SIGABRT in rank 1,
    # after training and the report): end the process here, past the point where anything is checked.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:4])
