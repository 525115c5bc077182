"""A short chaos soak of the web cache (the long one is `mcs-chaos --seconds 600`)."""

from __future__ import annotations

import random

from webcache.chaos import soak


def test_short_chaos_soak():
    seed = random.SystemRandom().randrange(1 << 32)
    summary = soak(seconds=45, faults=12, seed=seed, nodes=3, clients=3, log=lambda *a: None)
    assert summary["violations"] == [], f"replay with: mcs-chaos --seed {seed} --faults 12: {summary}"
    assert summary["faults"] >= 5, summary
    assert summary["requests_ok"] > 0 and summary["wrong_bytes"] == 0
    assert summary["leaks"] == []
