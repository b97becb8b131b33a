"""What an upstream answer says, taken once from dnspython's parse and kept with the cache entry.

Enforcement runs for cached answers too (reference §5.4), so it works from these facts and
never parses the wire form again.
"""

from __future__ import annotations

import dataclasses

import dns.exception
import dns.message
import dns.name
import dns.rdatatype

from ..addresses import canonical
from .packets import NOERROR

NO_ANSWER_TTL = 86_400   # the TTL of an answer without records (reference §5.4 step 1)


@dataclasses.dataclass(frozen=True, slots=True)
class CnameRecord:
    owner: str    # lowercased, no trailing dot
    target: str
    ttl: int


@dataclasses.dataclass(frozen=True, slots=True)
class AnswerFacts:
    rcode: int
    ips: tuple[str, ...]               # every A/AAAA of the answer section, first seen first
    ttl: int                           # smallest answer TTL (CNAMEs too); NO_ANSWER_TTL if none
    smallest_positive_ttl: int         # 0 when every TTL is 0 (or there is no answer)
    cnames: tuple[CnameRecord, ...]
    answer_records: int

    @property
    def cacheable(self) -> bool:
        """Reference §5.3: only NOERROR answers with at least one record are kept."""
        return self.rcode == NOERROR and self.answer_records > 0


def _plain(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def answer_facts(message: dns.message.Message) -> AnswerFacts:
    ips: dict[str, None] = {}
    ttls: list[int] = []
    cnames: list[CnameRecord] = []
    records = 0
    for rrset in message.answer:
        records += len(rrset)
        ttls.append(rrset.ttl)
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            ips.update((canonical(rdata.address), None) for rdata in rrset)
        elif rrset.rdtype == dns.rdatatype.CNAME:
            owner = _plain(rrset.name)
            cnames.extend(CnameRecord(owner, _plain(rdata.target), rrset.ttl) for rdata in rrset)
    positive = [ttl for ttl in ttls if ttl > 0]
    return AnswerFacts(message.rcode(), tuple(ips), min(ttls, default=NO_ANSWER_TTL),
                       min(positive, default=0), tuple(cnames), records)


def parse_answer(wire: bytes) -> AnswerFacts | None:
    """The facts of an upstream answer's wire form, None when dnspython cannot parse it."""
    try:
        return answer_facts(dns.message.from_wire(wire))
    except (dns.exception.DNSException, ValueError):
        return None
