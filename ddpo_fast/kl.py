"""The KL penalty's closed form now lives in the reference module (ddpo_fast.reference.ddim_kl, the
specification) and is fused into the loss ops (ddim_ppo_loss / flow_sde_ppo_loss with
reference_output and kl_beta). This module only re-exports ddim_kl for ddpo_fast.train, which
still adds the KL beside the fused loss; remove it once the trainer uses the fused op."""
from ddpo_fast.reference import ddim_kl

__all__ = ["ddim_kl"]
