"""A short chaos soak of the web cache (the long one is `mcs-chaos --seconds 600`)."""

from __future__ import annotations

import pytest

from webcache.chaos import soak


@pytest.mark.slow
def test_short_chaos_soak(seed):
    summary = soak(seconds=45, faults=12, seed=seed, nodes=3, clients=3, log=lambda *a: None)
    assert summary["violations"] == [], (
        f"replay with: MCS_TEST_SEED={seed}, or mcs-chaos --seed {seed} --faults 12: {summary}")
    assert summary["faults"] >= 5, summary
    assert summary["requests_ok"] > 0 and summary["wrong_bytes"] == 0
    assert summary["leaks"] == []
    assert set(summary["evictions"]) == {"frozen", "stopped", "hung", "stalled"}, summary
    served = summary["served"]  # the native loop served, large bodies from sealed copies
    assert served["native_served"] > 0 and served["native_sealed_hits"] > 0, summary
