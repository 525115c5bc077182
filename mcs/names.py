"""The names operators type, resolved to the bootstrap domains mcs runs.

An application (a web cache started with ``--domain webcache-8080``, a registry in domain
``shop``) runs each of its components in a domain of its own, ``<domain>.<component>``
(:func:`mcs.component_record.component_domain`): the cache's real domain is ``webcache-8080.webcache``.
The tools (``mcs status``, ``mcs gc``, ``mcs fault poison``) accept either name: the
application's (all its components), the full one, or the application's with ``--component``.
A name that matches nothing is an error that lists the domains of this host.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from mcs.bootstrap import Bootstrap, list_domains, validate_domain
from mcs.component_record import component_domain
from mcs.errors import DomainNotFoundError

__all__ = ["Target", "resolve", "target_of", "describe_domains"]

LISTED_MAX = 20  # application domains named in an "unknown domain" message


@dataclass(frozen=True)
class Target:
    """One bootstrap domain a name resolved to."""

    domain: str
    """The application's domain (what the user started it with, e.g. ``webcache-8080``)."""
    component: str | None
    """The component (``webcache``), None for a domain that is not ``<domain>.<component>``."""
    full_name: str
    """The bootstrap domain (``webcache-8080.webcache``): what :class:`Bootstrap` opens."""


def target_of(full_name: str) -> Target:
    """A full name read as ``<domain>.<component>`` (split at its last dot), or a plain domain."""
    domain, dot, component = full_name.rpartition(".")
    return Target(domain, component, full_name) if dot else Target(full_name, None, full_name)


def describe_domains(existing: list[str], asked: str = "") -> str:
    """The host's domains, grouped by application: ``a (components: x, y), b``; the ones
    closest to the ``asked`` name first (a typo finds its domain among many)."""
    groups: dict[str, list[str]] = {}
    for name in existing:
        t = target_of(name)
        groups.setdefault(t.domain, [])
        if t.component is not None:
            groups[t.domain].append(t.component)
    if not groups:
        return "there is no mcs domain on this host"
    shown = [name + (f" (components: {', '.join(comps)})" if comps else "")
             for name, comps in sorted(groups.items(), key=_closest_to(asked))[:LISTED_MAX]]
    more = len(groups) - LISTED_MAX
    return "domains on this host: " + ", ".join(shown) + (f", and {more} more" if more > 0 else "")


def _closest_to(asked: str) -> Callable[[tuple[str, list[str]]], tuple[float, str]]:
    """Sort key: the names most similar to ``asked`` first, then by name."""
    def key(item: tuple[str, list[str]]) -> tuple[float, str]:
        return (-difflib.SequenceMatcher(None, asked, item[0]).ratio() if asked else 0.0, item[0])
    return key


def _not_found(name: str, existing: list[str]) -> DomainNotFoundError:
    """The error for a name that matches nothing; a name unlinked under live processes gets
    :class:`Bootstrap`'s own, more precise error (raised from here)."""
    try:
        Bootstrap.open(name, create=False, wait=0.0).close()
    except DomainNotFoundError:
        pass
    return DomainNotFoundError(
        f"domain {name!r} does not exist; {describe_domains(existing, name)}")


def resolve(name: str, component: str | None = None) -> list[Target]:
    """The bootstrap domains ``name`` (and ``component``) stand for, exact match first.

    Without ``component``: ``name`` itself if it exists, and each ``<name>.<component>``. With
    it: ``<name>.<component>``, or ``name`` when it is that full name already (one target).
    ValueError for a malformed name; :class:`DomainNotFoundError` (listing what exists) when
    nothing matches.
    """
    validate_domain(name)
    existing = list_domains()
    if component is None:
        found = [target_of(name)] if name in existing else []
        found += [Target(name, d[len(name) + 1:], d) for d in existing
                  if d.startswith(name + ".")]
        if not found:
            raise _not_found(name, existing)
        return found
    try:
        full: str | None = component_domain(name, component)
        invalid: ValueError | None = None
    except ValueError as exc:
        full, invalid = None, exc
    if full is not None and full in existing:
        return [Target(name, component, full)]
    if name in existing and name.endswith("." + component):  # the full name, given as --domain
        return [Target(name[:-len(component) - 1], component, name)]
    if invalid is not None:
        raise invalid
    assert full is not None
    others = [d[len(name) + 1:] for d in existing if d.startswith(name + ".")]
    if others:
        raise DomainNotFoundError(f"domain {name!r} has no component {component!r} (it has: "
                                  f"{', '.join(others)})")
    raise _not_found(full, existing) if name not in existing else DomainNotFoundError(
        f"domain {name!r} has no component {component!r} (it runs none)")

