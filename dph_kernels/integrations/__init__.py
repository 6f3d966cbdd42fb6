"""Adapters for trainer packages. Each module imports its package lazily and nothing in dph_kernels imports them:

    from dph_kernels.integrations.trl import DPHGRPOTrainer     # needs trl (pip install "dph[trl]")
"""
