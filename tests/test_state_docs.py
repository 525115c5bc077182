"""The examples of docs/state.md and README.md run as printed: the Bank component of "Transactions
in your own component" keeps its total while a member moving money is killed with kill -9, and
the README's SharedDict taste does what its comments say."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

import mcs

ROOT = Path(__file__).resolve().parent.parent
STATE_DOC = ROOT / "docs" / "state.md"
README = ROOT / "README.md"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def bank_source() -> str:
    (block,) = [b for b in python_blocks(STATE_DOC) if "class Bank" in b]
    return block


# A member of the documented Bank that moves money between random accounts until killed,
# printing a line after each commit.
MOVER = r"""
import random, sys
ns = {}
exec(open(sys.argv[1]).read(), ns)
bank = ns["Bank"](sys.argv[2]).start()
rng = random.Random(int(sys.argv[3]))
print("ready", flush=True)
while True:
    a, b = rng.sample(range(16), 2)
    bank.move(a, b, rng.randint(1, 30))
    print("moved", flush=True)
"""


def total(bank, account) -> int:
    """The sum of the balances, read in one transaction (a consistent view)."""
    def read(tx):
        for i in range(16):
            tx.lock(i * account.SIZE + account.mutex.offset)
        words = [tx.load64(i * account.SIZE + account.balance.offset) for i in range(16)]
        return sum(w - (1 << 64) if w >> 63 else w for w in words)  # Int64: balances may go negative
    return bank.run_transaction(read)


@pytest.mark.slow
def test_documented_bank_keeps_its_total_under_kill(tmp_path, domain, spawn, seed):
    source = tmp_path / "bank.py"
    source.write_text(bank_source())
    ns: dict = {}
    exec(bank_source(), ns)
    bank, account = ns["Bank"](domain).start(), ns["Account"]
    try:
        assert total(bank, account) == 1600
        movers = [spawn(MOVER, str(source), domain, str(seed + i)) for i in range(2)]
        for m in movers:
            m.expect("ready", timeout=20)
        for m in movers:
            for _ in range(20):
                m.expect("moved")
        movers[0].kill()  # kill -9 in the middle of its stream of transactions
        for _ in range(20):
            movers[1].expect("moved")
        assert total(bank, account) == 1600
        movers[1].signal(signal.SIGKILL)
        movers[1].wait()
        deadline = time.monotonic() + 10
        while len(bank.view.members) != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert total(bank, account) == 1600
        # created once, then adopted at every recovery: never rebuilt
        assert [o for _, o in bank.stats.master_area_history] == [mcs.MasterAreaOutcome.CREATED]
        assert bank.stats.master_area is mcs.MasterAreaOutcome.ADOPTED
    finally:
        bank.stop()


# Another process of the domain: keeps the dict alive and answers what it holds.
HOLDER = r"""
import sys, mcs
with mcs.SharedDict(sys.argv[1]) as d:
    print("ready", flush=True)
    sys.stdin.readline()
    workers = [k for k in d.keys() if str(k).startswith("worker-")]
    print(d["visits"], d["stock"], d["sold"], len(workers), flush=True)
"""


def test_readme_shared_dict_taste(domain, spawn):
    (block,) = [b for b in python_blocks(README) if "SharedDict" in b]
    holder = spawn(HOLDER, domain)
    holder.expect("ready", timeout=20)
    exec(block.replace('"shop"', repr(domain)), {})
    holder.send("report")
    # incr from 0, one transaction, and the ephemeral key gone with the snippet's stop()
    assert holder.readline() == "1 9 1 0"
