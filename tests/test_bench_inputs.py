"""benchmarks.inputs: softmax_stats on inputs whose answer is known by hand, and synthetic_peaked_inputs hitting its
target entropy. Fast (no SmolLM2 load)."""
import math

import pytest
import torch

from benchmarks import inputs as bi


def test_uniform_logits():
    V = 5000  # 1/V < 2^-12, and V is not a multiple of 128: the partial last tile counts
    hidden, weight = torch.zeros(100, 8), torch.randn(V, 8)
    targets = torch.arange(100)
    s = bi.softmax_stats(hidden, weight, targets)
    assert s["entropy_nats_mean"] == pytest.approx(math.log(V), abs=1e-4)
    assert s["entropy_bits_mean"] == pytest.approx(math.log2(V), abs=1e-4)
    assert s["entropy_nats_std"] == pytest.approx(0.0, abs=1e-4)
    assert s["max_prob_mean"] == pytest.approx(1 / V, rel=1e-4)
    assert s["target_logprob_mean"] == pytest.approx(-math.log(V), abs=1e-4)
    assert s["tiles"] == 2 * math.ceil(V / 128)
    assert s["skippable_tile_fraction"] == 1.0
    # 1/V above the threshold: nothing can be skipped
    assert bi.softmax_stats(hidden, weight[:4000])["skippable_tile_fraction"] == 0.0


def _one_hot_case():
    """130 rows (row blocks of 64, 64, 2) x 300 columns (vocab blocks of 128, 128, 44); each row puts all its mass
    on one column. Hot tiles: (0, 0); (1, 1) and (1, 2); (2, 2). So 4 of 9 tiles are hot, 5 skippable."""
    hot = torch.zeros(130, dtype=torch.long)  # row block 0 -> column 0
    hot[64:100] = 130  # row block 1 -> vocab block 1
    hot[100:128] = 290  # ... and vocab block 2
    hot[128:] = 299  # partial row block -> partial vocab block
    hidden = 50.0 * torch.nn.functional.one_hot(hot, 300).float()
    return hidden, torch.eye(300), hot


def test_one_hot_peaked_logits():
    hidden, weight, hot = _one_hot_case()
    s = bi.softmax_stats(hidden, weight, hot)
    assert s["tiles"] == 9
    assert s["skippable_tile_fraction"] == pytest.approx(5 / 9)
    assert s["entropy_nats_mean"] == pytest.approx(0.0, abs=1e-6)
    assert s["max_prob_mean"] == pytest.approx(1.0, abs=1e-6)
    assert s["target_logprob_mean"] == pytest.approx(0.0, abs=1e-6)
    # a single row block of 130 rows: the three vocab blocks are all hot
    assert bi.softmax_stats(hidden, weight, block_n=256)["skippable_tile_fraction"] == 0.0


def test_stats_do_not_depend_on_chunking(monkeypatch):
    hidden, weight, hot = _one_hot_case()
    hidden = hidden + torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
    whole = bi.softmax_stats(hidden, weight, hot)
    monkeypatch.setattr(bi, "STATS_BUFFER_BYTES", 1)  # one row block per chunk
    chunked = bi.softmax_stats(hidden, weight, hot)
    assert chunked == pytest.approx(whole, rel=1e-5)


def test_softcap_flattens():
    hidden, weight, _ = _one_hot_case()
    capped = bi.softmax_stats(hidden, weight, softcap=1.0)  # logits in [0, 1]: close to uniform
    assert capped["entropy_nats_mean"] > math.log(300) - 0.1
    assert capped["skippable_tile_fraction"] == 0.0


def test_synthetic_hits_target_entropy():
    target = 3.7
    hidden, weight, targets = bi.synthetic_peaked_inputs(256, 64, 4096, target_entropy_nats=target, seed=1)
    assert hidden.shape == (256, 64) and weight.shape == (4096, 64) and targets.shape == (256,)
    assert 0 <= int(targets.min()) and int(targets.max()) < 4096
    s = bi.softmax_stats(hidden, weight, targets)
    assert s["entropy_nats_mean"] == pytest.approx(target, rel=0.05)
    assert s["entropy_nats_std"] > 0.5  # per-row scales spread the entropy, as in a real LM
    again = bi.synthetic_peaked_inputs(256, 64, 4096, target_entropy_nats=target, seed=1)
    assert all(torch.equal(a, b) for a, b in zip((hidden, weight, targets), again))


def test_synthetic_rejects_impossible_entropy():
    with pytest.raises(ValueError):
        bi.synthetic_peaked_inputs(16, 8, 64, target_entropy_nats=math.log(64) + 0.1)

