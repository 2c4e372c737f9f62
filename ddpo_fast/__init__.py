"""ddpo_fast: fast DDPO (reinforcement learning for diffusion models) with fused DDIM/PPO kernels."""
import logging

__version__ = "0.1.0"

# transformers warns on every run that its image processors fall back to PIL without torchvision;
# ddpo_fast preprocesses images with tensors and needs neither, so that warning is noise here.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())
