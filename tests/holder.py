"""A component whose master area holds one global mutex: the lock holder of the hang tests
(tests/test_hung.py) and of the supervision benchmarks (bench/test_supervision.py). This process
imports :class:`Holder`; a child process runs ``IMPORT`` first, then its own script."""

from __future__ import annotations

from pathlib import Path

from mcs import McsComponent
from mcs._gsm import GlobalMutex

__all__ = ["IMPORT", "Holder"]

IMPORT = (f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
          "from holder import Holder\n")


class Holder(McsComponent):
    name = "holder"
    master_area_size = 4096

    def on_master(self, view) -> None:
        if self.master_area_fresh or not self.mutex().recoverable:
            GlobalMutex.create(self.master_area, 0)

    def mutex(self) -> GlobalMutex:
        return GlobalMutex.open(self.master_area, 0, tag=self.member.incarnation)
