"""Golden plan: the converter's `--fit 24GB` recipe for Qwen3.5-35B-A3B at 32K context, unit by unit.

Any change to the tiers, the raise order, the 8-bit set or the group fallback shows up here
as a diff to review, not as a silent change of what users' conversions write.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_qwenmoe.convert import plan_conversion

A3B_CONFIG = Path(__file__).parent / "fixtures" / "qwen3_5_35b_a3b_config.json"

GOLDEN_UNITS = """\
  globals: dense 4b/g64; embedding 4b/g64; head 6b/g64
  layers 0-2,4-6,8-10,12-14,16-17,24-26,28-30,32-34,36-38: experts 3b/g64; shared_expert 4b/g64; deltanet 4b/g64; gates 8b/g64
  layers 3,7,11,15,23,27,31,35,39: experts 3b/g64; shared_expert 4b/g64; attention 4b/g64; gates 8b/g64
  layers 18,20-22: experts 3b/g128; shared_expert 4b/g64; deltanet 4b/g64; gates 8b/g64
  layers 19: experts 3b/g128; shared_expert 4b/g64; attention 4b/g64; gates 8b/g64
  mtp layers 0: experts 3b/g128; shared_expert 4b/g64; attention 4b/g64; gates 8b/g64"""


def test_a3b_fit_24gb_plan_is_golden():
    plan = plan_conversion(json.loads(A3B_CONFIG.read_text()), fit="24GB", context=32768)
    units = "\n".join(line for line in plan.summary().splitlines() if line.startswith("  "))
    assert units == GOLDEN_UNITS
    assert plan.weight_bytes == 15_835_094_272
    assert plan.cache_bytes + plan.weight_bytes + plan.reserve_bytes <= plan.working_set_bytes
    by_module = {t.module: t.bits for t in plan.tensors if t.bits}
    assert by_module["language_model.lm_head"] == 6
    assert by_module["language_model.model.layers.0.linear_attn.in_proj_a"] == 8
