"""Membership of a domain: exact crash detection (life mutexes), hang detection with fencing
(heartbeats + pidfds), numbered generations and a stable master.

>>> import membership
>>> with membership.join("demo", node="web-1") as member:   # doctest: +SKIP
...     print(member.view)
"""

from membership.member import Member, MemberStats, ProgressSource, join
from membership.timing import Timing
from membership.view import EvictionCause, MemberInfo, MemberState, View

__all__ = ["EvictionCause", "Member", "MemberInfo", "MemberState", "MemberStats",
           "ProgressSource", "Timing", "View", "join"]
