"""Search domains: suffixes stripped from names before rule matching (reference §3.6)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from publicsuffixlist import PublicSuffixList

# Always stripped, and never accepted as user search domains: a user domain equal to one of
# them would let every in-cluster name bypass the DNS filter.
KUBERNETES_SUFFIXES = (".default.svc.cluster.local", ".svc.cluster.local", ".cluster.local")

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    from publicsuffixlist import PublicSuffixList

    # Private section included: `.github.io` is as shared as `.co.uk`.
    return PublicSuffixList(only_icann=False)


def normalize_search_domains(domains: Iterable[str]) -> list[str]:
    """Trimmed, lowercased, dot-prefixed, first occurrence kept; empty entries stay empty so
    that validation can reject them."""
    seen: dict[str, None] = {}
    for raw in domains:
        domain = raw.strip().lower()
        if domain and not domain.startswith("."):
            domain = "." + domain
        seen.setdefault(domain, None)
    return list(seen)


def search_domain_problem(domain: str) -> str | None:
    """Why a normalized search domain is unusable, or None."""
    if domain in ("", "."):
        return "empty search domain"
    if domain in KUBERNETES_SUFFIXES:
        return f'"{domain}" is a Kubernetes suffix, which is always stripped and never bypasses'
    labels = domain[1:].split(".")
    if len(labels) < 2:
        return f'"{domain}" needs at least two labels (a single label is a top-level domain)'
    for label in labels:
        if not _LABEL.fullmatch(label):
            return (f'"{domain}": label "{label}" must be 1-63 characters of a-z, 0-9 and "-", '
                    'not starting or ending with "-" (use punycode for other scripts)')
    if _public_suffixes().is_public(domain[1:]):
        return f'"{domain}" is a public suffix: it would match names of unrelated owners'
    return None

