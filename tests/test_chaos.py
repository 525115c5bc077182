"""A short chaos soak of the web cache (the long one is `mcs-chaos --seconds 600`)."""

from __future__ import annotations

import pytest

from webcache.chaos import soak


@pytest.mark.slow
@pytest.mark.parametrize("sealed_dir", [False, True], ids=["memfd-copies", "file-copies"])
def test_short_chaos_soak(seed, sealed_dir):
    summary = soak(seconds=45, faults=12, seed=seed, nodes=3, clients=3, log=lambda *a: None,
                   sealed_dir=sealed_dir)
    replay = f"mcs-chaos --seed {seed} --faults 12" + (" --sealed-dir" if sealed_dir else "")
    assert summary["violations"] == [], (
        f"replay with: MCS_TEST_SEED={seed}, or {replay}: {summary}")
    assert summary["faults"] >= 5, summary
    assert summary["requests_ok"] > 0 and summary["wrong_bytes"] == 0
    assert summary["leaks"] == []
    assert set(summary["evictions"]) == {"frozen", "stopped", "hung", "stalled"}, summary
    served = summary["served"]  # the native loop served, large bodies from sealed copies
    assert served["native_served"] > 0 and served["native_sealed_hits"] > 0, summary
