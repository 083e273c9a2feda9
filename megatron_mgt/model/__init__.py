"""Pure-PyTorch model code; knows nothing of parallelism."""

from megatron_mgt.model.loss import lm_loss
from megatron_mgt.model.residual import RESIDUAL_RULES, build_rule
from megatron_mgt.model.transformer import Transformer, capture_geometry

__all__ = ["RESIDUAL_RULES", "Transformer", "build_rule", "capture_geometry", "lm_loss"]
