"""sluice: a Linux egress firewall built as a pipeline of ZeroMQ stages.

Code map: one line per module, by concern (the README has the same map; a test fails when a
module is missing from either).

The stages and what every stage shares
  stages/__init__.py       `sluice run STAGE`: a stage by its Procfile label
  stages/capture.py        loads the classifier, drains the ring buffer into the journal
  stages/enrich.py         names each event's destination: DNS answers, reverse lookups
  stages/policy.py         programs the maps, decides each event, opens DNS answers
  stages/persist.py        the one writer of the JSONL file and the SQL store
  stages/notify.py         one alert per blocked destination, retried; storms summarized
  stages/dns.py            the DNS proxy: forwards, caches, filters, opens answers in time
  stages/export.py         stored rows to OpenTelemetry and syslog; Prometheus /metrics
  loop.py                  the loop every stage runs in: sockets, polling, counters, stop
  reactor.py               raw descriptors and timers the loop serves beside its sockets
  stopping.py              when a stopping stage has all its upstream sends (pure)
  topology.py              the wiring: who binds which inbox and feeds whom, and addresses
  livepolicy.py            the policy stages judge by, watched, reloaded and counted
  startup.py               the start-up policy: the loaded one plus what the host needs
  hostfiles.py             what the stages read from the host, behind one seam
  settings.py              the one settings object, from SLUICE_* variables
  errors.py                typed start-up errors and their exit codes
  workers.py               helper threads that cannot die silently
  histogram.py             latency histograms written beside a stage's counters
  cpushare.py              the DNS proxy's share of a CPU ahead of a flood (pure)
  lending.py               real-time lent to the thread that answers a DNS allow request

Messages between the stages
  messages.py              every message kind, registered: encode and decode any of them
  wire.py                  msgpack framing and the one validation at each inbox
  events.py                raw and enriched events, DNS mappings, allow requests/replies
  addresses.py             address text exactly as cargowall renders it

The kernel side
  kernel/__init__.py       (package) everything that touches BPF
  kernel/compile.py        compiles bpf/sluice.c with bcc in a short-lived process
  kernel/doctor.py         requirement checks for `sluice doctor` and capture's start
  kernel/libbpf.py         ctypes bindings to the system libbpf
  kernel/loader.py         load, pin, attach and detach the classifier and hooks
  kernel/maps.py           the pinned firewall maps, written through one adapter
  kernel/ringbuf.py        the ring buffer read through its memory mapping
  kernel/structs.py        ctypes mirrors of bpf/sluice.h
  kernel/event_layout.py   the ring-buffer record (struct sluice_event), decoded
  kernel/generation.py     map_config as userspace reads it: mode, default, generation
  kernel/redirect.py       the DNS redirect's host side: addresses on lo, its map, caches
  kernel/cgroups.py        cgroup v2 ids (what the hooks record) to paths
  journal.py               capture's on-disk journal: records are durable before they travel
  rulemaps.py              the firewall maps as userspace sees them, and a dict-backed twin

The firewall: decisions and map writes
  firewall/__init__.py     (package) the map writer and the decisions that ask it to write
  firewall/writer.py       the one writer of the firewall maps: programs, diffs, grants
  firewall/opening.py      late-allow plans and a DNS answer's writes
  firewall/outcome.py      one event's outcome (pure), with the late-allow plan to apply
  firewall/recentblocks.py recent blocks a later DNS answer re-labels late-allowed

The policy language (pure: no sockets, no clock, no host files)
  policy/__init__.py       the policy's public face
  policy/load.py           the JSON file or the SLUICE_* environment form, validated
  policy/model.py          a loaded policy: rules plus the indexes questions use
  policy/rules.py          one normalized rule
  policy/hostnames.py      hostname rules: validation, globs, the indexed matcher
  policy/cidrs.py          CIDR rules: most specific match, the hostname/CIDR conflict
  policy/ports.py          port lists and protocols: overlap, union, coverage
  policy/verdict.py        small value types shared by matching and the map writer
  policy/searchdomains.py  suffixes stripped from names before matching
  policy/envform.py        the environment form's entry grammar
  policy/autoallow.py      rules sluice adds itself, and their tags
  policy/cipresets.py      the CI presets' service hosts
  policy/existing.py       connections open before start: /proc/net text, their gate
  policy/mapstate.py       what the maps should hold for a policy and runtime grants
  policy/mapdiff.py        the order of map operations from one content to another
  policy/namecache.py      IP <-> hostname knowledge from DNS answers
  policy/explain.py        which rule decides a name or address (`sluice policy explain`)

The DNS proxy's logic (pure) and its I/O side (net/)
  dns/__init__.py          (package) the DNS proxy's pure logic
  dns/endpoints.py         listen and upstream addresses
  dns/packets.py           strict query parsing and the replies the proxy makes itself
  dns/answers.py           what an upstream answer says
  dns/queryfilter.py       which questions may be asked at all
  dns/cache.py             the response cache
  dns/lru.py               the bounded, expiring LRU behind the cache and CNAME targets
  dns/cnames.py            CNAME chains: the walk, learned targets, derived allows
  dns/enforce.py           what one answer asks for before it may be released
  dns/confirmed.py         which (name, address) pairs policy already opened
  dns/tcpslots.py          who gets one of the proxy's TCP slots
  dns/holders.py           who holds an address the proxy could not bind
  dns/triage.py            one parsed query: a local reply, the cached answer or a forward
  dns/net/__init__.py      (package) the proxy's I/O side, on the loop's reactor
  dns/net/listeners.py     the listening sockets: UDP queries read, TCP clients admitted
  dns/net/clients.py       where a query came from and how its answer goes back
  dns/net/upstream.py      questions to the upstream: UDP, then TCP when truncated
  dns/net/allow.py         allow requests to the policy stage over a DEALER

Names
  names/__init__.py        (package) what enrich and policy know of a name
  names/namer.py           what enrich knows of a destination's name (pure)
  names/reverse.py         reverse (PTR) lookups beside the stage loop
  names/answers.py         names of the addresses policy opened for DNS answers (pure)
  containers.py            which container a process belongs to, from its cgroup

The audit trail
  audit/__init__.py        (package) the audit trail: records, store, what reads it
  audit/records.py         audit records: the seed's types, normalization, the JSONL form
  audit/store.py           the SQL store: tables, migrations, the writer, readers
  audit/rollups.py         what new rows add to the rollup tables (pure)
  audit/retention.py       old rows deleted a small batch at a time
  audit/sqlite_memory.py   SQLite started without its allocation statistics (faster)
  audit/timestamps.py      audit timestamps as text, and back
  audit/query.py           `sluice query`: read-only SQL and its output formats
  audit/importer.py        `sluice import`: NDJSON audit logs into the store
  audit/suggest.py         `sluice suggest`: a policy that would allow what was seen
  audit/browse.py          `sluice browse`: the store in Datasette, read-only
  recording.py             recordings of what entered enrich
  replay.py                `sluice replay`: into a running pipeline, or offline
  limited.py               files people hand us, read with limits
  private.py               what sluice creates is readable by root alone

Alerts and export
  notify.py                the dedup, log client and retry schedule of notify
  fingerprints.py          a set of strings kept as 8-byte fingerprints (alerted keys)
  webhook.py               notify's webhook client, loaded only with a URL
  export/__init__.py       (package) the stored trail out: OTLP, syslog, metrics
  export/delivery.py       delivery to an outside sink: failures, backoff, the worker
  export/otlp.py           audit rows as OpenTelemetry log records, and their client
  export/syslog.py         audit rows as RFC 5424 syslog messages, and their socket
  export/store.py          what export reads from the store, and its cursors
  export/metrics.py        Prometheus metrics: what `sluice status` shows

Status, service and the command line
  posture.py               every protection layer and its state
  accounting.py            in = out, end to end, from the stages' counters
  service.py               `sluice up` / `sluice down`: the pipeline as a service
  report/__init__.py       (package) `sluice report`
  report/data.py           the report's facts, from the store's views and rollups
  report/suggestion.py     the allowlist additions a run's blocks ask for
  report/render.py         the report as markdown and JSON
  report/html.py           the report as one self-contained HTML page
  report/gate.py           which blocks a run did not expect, and how CI is told
  report/make.py           a report put together: facts, policy, posture
  cli/__init__.py          (package) the `sluice` command line
  cli/app.py               the `sluice` command: run, wait, detach, doctor, policy
  cli/data.py              the data commands: replay, query, import, suggest, prune, browse
  cli/service.py           the service commands: up, down, report, systemd-units
  cli/shared.py            what every command shares: settings, errors as one line
  cli/entry.py             the `sluice` executable
"""

__version__ = "0.1.0"
