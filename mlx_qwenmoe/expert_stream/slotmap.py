"""Which expert sits in which slot of a layer's pool, and which slots to reuse: bookkeeping only.

``slots.ExpertSlots`` moves the bytes; the policy benchmark drives a ``SlotMap`` alone over
recorded routing traces, so both count hits and reads by the same rules.
"""

from __future__ import annotations

import numpy as np

from .policy import POLICIES


class SlotMap:
    def __init__(self, num_experts: int, num_slots: int, policy: str = "lfu"):
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: expected one of {', '.join(POLICIES)}")
        self.num_slots = num_slots
        self.slot_of = np.full(num_experts, -1, dtype=np.int64)
        self.expert_at = np.full(num_slots, -1, dtype=np.int64)
        self.policy = POLICIES[policy](num_slots)

    def missing(self, experts: np.ndarray) -> np.ndarray:
        return experts[self.slot_of[experts] < 0]

    def claim(self, experts: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Slots for the non-resident ``experts``, evicting by the policy but never an expert in ``keep``."""
        protected = self.slot_of[keep]
        slots = self.policy.victims(experts.size, protected[protected >= 0])
        evicted = self.expert_at[slots]
        self.slot_of[evicted[evicted >= 0]] = -1
        self.policy.forget(slots)
        self.expert_at[slots] = experts
        self.slot_of[experts] = slots
        return slots

    def use(self, experts: np.ndarray) -> None:
        """Record a use of the (resident) ``experts``."""
        self.policy.touch(self.slot_of[experts])

    def drop(self, experts: np.ndarray) -> None:
        """Forget ``experts`` (their rows never arrived), so their slots are reused first."""
        slots = self.slot_of[experts]
        self.expert_at[slots] = -1
        self.slot_of[experts] = -1
        self.policy.forget(slots)
