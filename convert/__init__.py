"""Convert Hugging Face Qwen3.5-MoE checkpoints to quantized mlx-lm directories, streaming.

``convert(src, dst, ...)`` writes the directory; ``plan_conversion(config, ...)`` says what it
would write (per-tensor bits, group size and bytes) and whether it fits a Mac's memory.
"""

from .pipeline import convert
from .plan import FIT_TIERS, Plan, TensorPlan, plan_conversion

__all__ = ["convert", "plan_conversion", "Plan", "TensorPlan", "FIT_TIERS"]
