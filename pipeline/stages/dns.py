"""dns: the DNS proxy that opens the firewall just in time, filters queries, follows CNAMEs.

Serves:   DNS over UDP and TCP on each SLUICE_DNS_LISTEN address (default 127.0.0.1:53), and
          only there: a wildcard address is refused at start, so it is never an open resolver.
Forwards: to SLUICE_DNS_UPSTREAM (default: the first /etc/resolv.conf nameserver that is not
          this proxy) over UDP, again over TCP when the answer comes back truncated; no
          answer within SLUICE_DNS_TIMEOUT -> SERVFAIL. NOERROR answers with records are
          cached (reference §5.3). Upstream answers whose source, id or question do not
          match what was asked are discarded and counted.
Filters:  with SLUICE_DNS_FILTER, questions the policy does not let through (reference §5.2,
          canonical reverse names always pass) get a `dns_blocked` audit record and, in
          enforce mode, REFUSED without any upstream traffic; audit mode records and forwards.
Opens:    before any NOERROR answer with addresses (cached or fresh) leaves, the addresses go
          to the policy stage as an `allow_requests` record on its REP inbox
          policy-allow.sock; the answer is released only when the `allow_replies` record says
          ok. Not ok, a rejected request or no reply within Waits.allow_s: enforce mode answers
          SERVFAIL (an address the firewall would drop is worse than no address), audit mode
          answers normally. Nothing is ever released on a timeout in enforce mode. An ok is
          remembered under the maps' generation (map_config.generation of the maps pinned in
          SLUICE_BPF_DIR, one lookup per answer): a later answer for the same name whose every
          address was confirmed at the current generation is already open and leaves at once
          (pipeline/dns/confirmed.py). Without readable pinned maps every answer asks.
          CNAME targets of allowed names are learned, derive their origin's allow, and are
          resolved ahead of the client when an answer stops at a CNAME (reference §5.4).
Produces: `dns_mappings` (name, addresses, TTL, CNAME chain) to enrich for every answer with
          addresses (but a name let through only by the search-domain bypass);
          `audit_records` (dns_blocked) to persist.
Binds:    the DNS listeners (no ZeroMQ inbox). Connects: enrich, persist, policy-allow.
Cache hits: a query of the usual shape (one question, standard query, at most an EDNS OPT)
          finds its cached answer by the question's bytes, is judged by the filter's memory
          of the policy (pipeline/dns/queryfilter.py) and is answered from the cached wire
          form with its id; anything else, and any name the filter might refuse, takes the
          full parse.
Bad input: malformed, truncated or oversized queries are counted (`malformed`) and dropped;
          each query holds bounded memory (MAX_QUERY_BYTES in, one answer out, at most
          MAX_IN_FLIGHT queries and MAX_TCP_CLIENTS connections at once).
TCP slots: a connection without a whole query for Waits.tcp_idle_s is closed; one client address
          holds at most MAX_TCP_PER_ADDRESS connections, and a newcomer beyond that share or
          beyond MAX_TCP_CLIENTS takes the slot of the longest-idle connection (its own
          address's first; tcp_idle_evicted), so idle connections never deny TCP DNS to
          others; only when every candidate is busy is it refused (tcp_clients_refused).
Reload:   SIGHUP, or a change of the policy file (pipeline/livepolicy.py): a valid policy
          replaces the old one, an invalid one is logged and the old one stays.
Start:    an address that cannot be bound stops the stage with one line naming the address
          and the process holding it.
Timing:   histograms answer_latency_seconds (a query's arrival in the socket to its
          answer), query_wait_seconds (its arrival to this stage reading it: the wait for a
          CPU, UDP only), upstream_round_trip_seconds (a question to the upstream's answer)
          and allow_round_trip_seconds (an allow request to policy's reply) are written
          with the counters (<run_dir>/dns.counters.json); the export stage's
          /metrics serves them.

Concurrency: one thread, no locks. Every socket (listeners, client TCP connections, one UDP
socket per upstream query, upstream TCP retries, the ZeroMQ DEALER to policy) and every
deadline is registered with the stage loop's reactor (pipeline/reactor.py), so queries
waiting on the upstream or on the policy stage never hold up the others. The pieces live in
pipeline/dns/net/ (I/O) and pipeline/dns/ (pure); this module wires them and follows one
query: triage (pipeline/dns/triage.py), then the cache or the upstream, then enforcement.
Time comes from the clock the stage is built with, and the waits from its Waits.

Example:  SLUICE_MODE=enforce SLUICE_DNS_UPSTREAM=1.1.1.1 sluice run dns
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Hashable

import dns.message
import dns.rdatatype
import zmq

from ..audit.records import AuditEvent, new_event_id, normalize
from ..dns import packets
from ..dns.answers import AnswerFacts, parse_answer
from ..dns.cache import ResponseCache
from ..dns.cnames import LearnedTargets
from ..dns.confirmed import ConfirmedOpen
from ..dns.endpoints import parse_listen, redirect_endpoints
from ..dns.enforce import AllowAsk, PreResolveMemory, plan_answer
from ..dns.net.allow import AllowClient
from ..dns.net.clients import Client, Timed
from ..dns.net.listeners import Listeners
from ..dns.net.upstream import Upstream
from ..dns.packets import Malformed, Query
from ..dns.queryfilter import REFUSE, PolicyMemory, judge_query
from ..dns.triage import CACHED, LOCAL, triage
from ..errors import SettingsError
from ..events import DnsMapping
from ..kernel.generation import PIN_CHECK_S, PinnedGeneration
from ..kernel.redirect import check_mark, ipv6_available
from ..kernel.structs import DNS_MARK
from ..livepolicy import LivePolicy
from ..loop import BaseStage, StageIO, batched, run_stage
from ..policy.model import Policy
from ..hostfiles import HostFiles
from ..startup import proxy_upstream
from ..settings import Settings

MAX_IN_FLIGHT = 2048      # queries waiting on the upstream or the policy at once
MAX_PRE_RESOLVING = 64
PRE_RESOLVE_PAYLOAD = 1232  # EDNS size of our own queries (the DNS flag day's safe value)


@dataclasses.dataclass(frozen=True, slots=True)
class Waits:
    """How long the stage waits, in seconds of its clock (the upstream's is a setting)."""

    allow_s: float = 2.0      # well inside a stub resolver's 5 s retry; policy answers in ~1 ms
    tcp_idle_s: float = 3.0   # a connection without a query this long is closed (RFC 7766)
    pin_check_s: float = PIN_CHECK_S  # how soon maps pinned anew are followed


class DnsStage(BaseStage):
    name = "dns"

    def __init__(self, files: HostFiles | None = None,
                 clock: Callable[[], int] = time.time_ns,
                 generation: Callable[[], Hashable | None] | None = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 waits: Waits = Waits()) -> None:
        """clock: wall time of records (ns); monotonic: the loop's and every wait's clock;
        generation: the maps' current generation, None when unknown; by default
        PinnedGeneration on SLUICE_BPF_DIR, opened at setup."""
        self.files = files or HostFiles()
        self.clock, self.monotonic, self.waits = clock, monotonic, waits
        self.generation = generation
        self.confirmed = ConfirmedOpen()
        self.policy_memory = PolicyMemory()  # per name: its verdict under this policy
        self.cache = ResponseCache()
        self.learned = LearnedTargets()
        self.pre_resolved = PreResolveMemory()
        self.opened = contextlib.ExitStack()  # what setup() opened, for teardown to close
        self.mappings: list[DnsMapping] = []
        self.audits: list[AuditEvent] = []
        self.allow_in_flight = self.pre_resolving = 0

    # ------------------------------------------------------------- start and stop

    def setup(self, io: StageIO) -> None:
        self.io = io
        self.settings = settings = io.settings
        reactor = io.reactor
        try:
            listen = parse_listen(settings.dns_listen)
        except ValueError as err:
            raise SettingsError(f"SLUICE_DNS_LISTEN={settings.dns_listen!r}: {err}") from None
        try:
            upstream = proxy_upstream(settings, self.files)
        except ValueError as err:
            raise SettingsError(f"SLUICE_DNS_UPSTREAM={settings.dns_upstream!r}: {err}") from None
        # Where the redirect sends queries (capture puts the addresses on lo; they may not be
        # there yet, hence the freebind); the proxy's own upstream sockets carry the mark the
        # hooks let through, or its queries would come back to it.
        redirected = redirect_endpoints(ipv6_available()) if settings.dns_redirect else ()
        mark = DNS_MARK if settings.dns_redirect else 0
        if mark:
            check_mark(mark, "the proxy's upstream sockets")
        self.live = LivePolicy(io, files=self.files)
        self.host = settings.host_name
        feeds = io.connect_feeds()
        self.enrich, self.persist = feeds["dns_mappings"], feeds["audit_records"]
        self.allow = AllowClient(io.connect_requests()["allow_requests"], reactor,
                                 self.waits.allow_s, self.clock, io.counters,
                                 io.histogram("allow_round_trip_seconds"), io.log,
                                 io.lenders["allow_requests"].lend,
                                 io.lenders["allow_requests"].take_back)
        self.answer_latency = io.histogram("answer_latency_seconds")
        self.query_wait = io.histogram("query_wait_seconds")
        self.upstream = Upstream(reactor, upstream, settings.dns_timeout, mark, io.counters,
                                 io.histogram("upstream_round_trip_seconds"))
        self.opened.callback(self.upstream.close)
        if self.generation is None:
            pinned = PinnedGeneration(settings.bpf_dir, self.waits.pin_check_s, self.monotonic)
            self.opened.callback(pinned.close)
            self.generation = pinned.read
        self.listeners = Listeners(reactor, io.counters, self.waits.tcp_idle_s, self.on_query,
                                   self.files, wall_ns=self.clock)
        self.opened.callback(self.listeners.close)
        for endpoint in listen:
            self.listeners.bind(endpoint)
        for endpoint in redirected:
            if endpoint not in listen:
                self.listeners.bind(endpoint, freebind=True)
        listening = [str(endpoint) for endpoint in listen]
        io.report_layer("dns_proxy", "on", f"answering on {', '.join(listening)} (udp, tcp), "
                        f"forwarding to {upstream}", listen=listening,
                        upstream=str(upstream), filter=settings.dns_filter)
        io.ready = True
        io.log.info("answering on %s (udp, tcp), forwarding to %s; %r; filter %s, %s mode; %s",
                    ", ".join(listening), upstream, self.policy,
                    "on" if settings.dns_filter else "off", settings.mode,
                    f"redirected queries arrive on {', '.join(map(str, redirected))}"
                    if redirected else "no DNS redirect (SLUICE_DNS_REDIRECT=false)")

    def teardown(self) -> None:
        self.opened.close()  # also after a setup that failed part way: what it opened

    # ------------------------------------------------------------- the loop's hooks

    def tick(self, now: float) -> None:
        """After each pass of the loop: the pass's mappings and records, one message each
        to enrich and persist however many answers left in it."""
        self.allow.drain()
        self._flush_records()

    def hangup(self) -> None:
        self.live.reload("SIGHUP")

    @property
    def policy(self) -> Policy:
        return self.live.current

    def _flush_records(self) -> None:
        for batch in batched(self.mappings, self.settings.batch_max):
            self.enrich.send(batch)
        for batch in batched(self.audits, self.settings.batch_max):
            self.persist.send(batch)
        self.mappings, self.audits = [], []

    # ------------------------------------------------------------- queries in

    def on_query(self, data: bytes, client: Client, waited: float = 0.0) -> None:
        self.io.counters.add("queries")
        self.query_wait.observe(waited)
        client = Timed(client, self.answer_latency, self.monotonic, waited)
        if not self._answered_from_cache(data, client):
            self._on_full_query(data, client)

    def _answered_from_cache(self, data: bytes, client: Client) -> bool:
        """The cache-hit path, without the full parse: a simple query with a live answer
        for a name the policy lets through whatever the learned targets hold. False leaves
        the query to the full path, which decides (and counts) everything else."""
        simple = packets.simple_question(data)
        if simple is None:
            return False
        question, udp_limit = simple
        cached = self.cache.live(packets.question_key(question), self.monotonic())
        if cached is None:
            return False
        query = packets.known_query(data, question, cached.qname, udp_limit)
        if self.settings.dns_filter and not self.policy_memory.of(self.policy, query.name)[1]:
            return False
        decided = triage(query, refused=False, audit_mode=self.settings.audit_mode,
                         overloaded=self._overloaded(), cached=True)
        if decided.route != CACHED:
            return False
        self.io.counters.add(decided.counter)
        self._answer(query, client, cached.wire, cached.facts)
        return True

    def _on_full_query(self, data: bytes, client: Client) -> None:
        try:
            query = packets.parse_query(data)
        except Malformed as err:
            self.io.counters.add("malformed")
            self.io.log.debug("dropped a malformed query: %s", err)
            client.dropped()
            return
        now = self.monotonic()
        cached = self.cache.live(query.cache_key, now) if query.question else None
        decided = triage(query, refused=self._refuses(query, now),
                         audit_mode=self.settings.audit_mode, overloaded=self._overloaded(),
                         cached=cached is not None)
        if decided.blocked:
            self._record_blocked(query.name)
        if decided.counter:
            self.io.counters.add(decided.counter)
        if decided.route == LOCAL:
            self._reply(query, client, decided.rcode)
        elif decided.route == CACHED:
            assert cached is not None, "triage routes to the cache only with an entry"
            self._answer(query, client, cached.wire, cached.facts)
        else:
            self._forward(query, client)

    def _overloaded(self) -> bool:
        return self.upstream.in_flight() + self.allow_in_flight >= MAX_IN_FLIGHT

    def _refuses(self, query: Query, now: float) -> bool:
        """The filter is on and refuses the question (PolicyMemory answers most at once)."""
        if not (self.settings.dns_filter and query.question and query.opcode ==
                packets.OPCODE_QUERY):
            return False
        name = query.name
        return not self.policy_memory.of(self.policy, name)[1] and judge_query(
            self.policy, self.learned, name, query.qtype, now) == REFUSE

    def _record_blocked(self, name: str) -> None:
        now_ns = self.clock()
        self.audits.append(normalize(AuditEvent(
            timestamp=now_ns, event_type="dns_blocked", dst_hostname=name,
            event_id=new_event_id(now_ns), host=self.host), self.settings.audit_mode, now_ns))
        self.io.counters.add("dns_blocked")

    def _reply(self, query: Query, client: Client, rcode: int) -> None:
        if rcode == packets.SERVFAIL:
            self.io.counters.add("servfail")
        client.send(packets.reply(query, rcode), query)

    # ------------------------------------------------------------- upstream and answers

    def _forward(self, query: Query, client: Client) -> None:
        def done(wire: bytes | None) -> None:
            if wire is None:
                self._reply(query, client, packets.SERVFAIL)
            else:
                self._on_upstream_answer(query, client, wire)

        self.upstream.ask(query.question, query.wire, done)

    def _on_upstream_answer(self, query: Query, client: Client, wire: bytes) -> None:
        if packets.rcode_of(wire) != packets.NOERROR:
            client.send(packets.with_id(wire, query.id), query)
            return
        facts = parse_answer(wire)
        if facts is None:
            self.io.counters.add("malformed_answers")
            self._reply(query, client, packets.SERVFAIL)
            return
        self.cache.store(query.cache_key, query.qname, wire, facts, self.monotonic())
        self._answer(query, client, wire, facts)

    def _answer(self, query: Query, client: Client, wire: bytes, facts: AnswerFacts) -> None:
        """Enforcement first (reference §5.4), then the answer, with the client's id."""
        def release(ok: bool) -> None:
            self.allow_in_flight -= 1
            if ok or self.settings.audit_mode:
                client.send(packets.with_id(wire, query.id), query)
            else:
                self._reply(query, client, packets.SERVFAIL)

        self.allow_in_flight += 1
        self._enforce(query.name, facts, 0, release)

    def _enforce(self, name: str, facts: AnswerFacts, depth: int,
                 done: Callable[[bool], None]) -> None:
        now = self.monotonic()
        verdict = self.policy_memory.of(self.policy, name)[0]
        plan = plan_answer(self.policy, self.learned, name, facts, now, depth, verdict)
        if plan.mapping_chain is not None:
            self.mappings.append(DnsMapping(name, list(facts.ips), facts.ttl,
                                            list(plan.mapping_chain), self.clock()))
        if plan.pre_resolve and self.pre_resolving < MAX_PRE_RESOLVING and (
                self.pre_resolved.claim(plan.pre_resolve, now)):
            self._pre_resolve(plan.pre_resolve, depth + 1)
        if plan.ask is None:
            done(True)
        else:
            self._open(plan.ask, facts, done)

    def _open(self, ask: AllowAsk, facts: AnswerFacts, done: Callable[[bool], None]) -> None:
        """Have the policy stage open the answer's addresses, unless it already confirmed
        them all for this name at the maps' current generation."""
        assert self.generation is not None, "setup() chose the generation's source"
        generation = self.generation()
        if self.confirmed.covers(ask.name, facts.ips, generation):
            self.io.counters.add("already_open")
            done(True)
            return

        def answered(ok: bool) -> None:
            if ok:
                self.confirmed.confirm(ask.name, facts.ips, generation)
            done(ok)

        # A new name's mapping leaves before policy is asked, so enrich usually has it before
        # the connection's first record. An answer already open leaves at once and its
        # mapping at the end of the pass; an event that overtakes it is named by policy,
        # which opened the address for the same answer (pipeline/names/answers.py).
        self._flush_records()
        self.allow.request(ask, facts, answered)

    def _pre_resolve(self, target: str, depth: int) -> None:
        """Resolve a CNAME target the answer stopped at, so its addresses are open before
        the client asks for them (reference §5.4 step 7). Failures only reach the debug log."""
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            wire = dns.message.make_query(target, rdtype, use_edns=0,
                                          payload=PRE_RESOLVE_PAYLOAD).to_wire()
            self.io.counters.add("pre_resolutions")
            self.pre_resolving += 1
            self.upstream.ask(packets.parse_query(wire).question, wire,
                              lambda answer: self._on_pre_resolved(target, answer, depth))

    def _on_pre_resolved(self, target: str, wire: bytes | None, depth: int) -> None:
        self.pre_resolving -= 1
        facts = parse_answer(wire) if wire and packets.rcode_of(wire) == packets.NOERROR else None
        if facts is None:
            self.io.log.debug("pre-resolving %s gave no usable answer", target)
            return
        self._enforce(target, facts, depth, lambda ok: None)


def run(settings: Settings, *, ctx: zmq.Context | None = None,
        stop: threading.Event | None = None) -> int:
    return run_stage(DnsStage(), settings, ctx=ctx, stop=stop)
