"""Triton kernels of ddpo_fast, installed as the subpackage `ddpo_fast.kernels`.

`ddpo_fast.kernels.ddim` holds the fused DDIM step / log-probability / PPO kernels behind the
"triton" backend of `ddpo_fast.ops`. Importing this package does not import Triton; importing
`ddpo_fast.kernels.ddim` does. To run the kernels on CPU tensors (Triton's interpreter), set
TRITON_INTERPRET=1 before Triton is first imported.
"""
