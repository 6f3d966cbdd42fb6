"""dph_kernels: fused losses for DPH-RL that never materialize the [tokens x vocab] logits."""
