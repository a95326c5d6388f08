"""The parity gate's rules on synthetic outputs: argmax agreement and the low-bit near-tie rule."""

from __future__ import annotations

import numpy as np

from edgecompile.check.parity import compare
from edgecompile.lowering.targets import load_target


def test_a_low_bit_classifier_may_disagree_only_at_a_near_tie():
    cpu = load_target("cpu")
    refs = [np.array([2.0, 1.999, -1.0], np.float32), np.array([3.0, 0.0, -1.0], np.float32)]
    tied = [np.array([2.0, 2.0015, -1.0], np.float32), refs[1].copy()]  # two near-equal classes swapped by 1.5e-3
    row = compare(cpu, "cluster_0", "logits", refs, tied, lowbit=True)
    assert row.passed and row.agreement == 0.5 and row.near_ties == 1
    assert not compare(cpu, "cluster_0", "logits", refs, tied, lowbit=False).passed  # fp32 graphs: no such excuse
    confident = [refs[0].copy(), np.array([2.9, 3.05, -1.0], np.float32)]  # a 3.0 margin overturned: a fault
    row = compare(cpu, "cluster_0", "logits", refs, confident, lowbit=True)
    assert not row.passed and row.near_ties == 0 and "argmax agreement" in " ".join(row.failures)
