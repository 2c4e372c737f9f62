"""ddpo_fast: fast DDPO (reinforcement learning for diffusion models) with fused DDIM/PPO kernels."""
__version__ = "0.1.0"
