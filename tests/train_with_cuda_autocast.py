"""`python tests/train_with_cuda_autocast.py ARGS` (or as DeepSpeed's user script): the trainer with CPU
autocast following CUDA autocast's fp32 rule for norms and softmax (tests/emulated_cuda.py)."""
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from emulated_cuda import install_cuda_autocast_rules  # noqa: E402

install_cuda_autocast_rules()

from ddpo_fast import train  # noqa: E402

sys.exit(train.cli())
