"""The DNS proxy's pure logic: no sockets, no clock (time is passed in), no BPF.

- endpoints: listen and upstream addresses, the resolv.conf default.
- packets: strict query parsing, the cache-hit shape, answer checks, small replies.
- answers: what an upstream answer says (addresses, TTLs, CNAME records).
- queryfilter: which questions may be asked at all (reference §5.2), and a memory of it.
- cache: the response cache (reference §5.3).
- cnames: chain walk, learned CNAME targets and derived allows (reference §5.4 steps 3-5).
- enforce: what one answer asks of the policy stage and of enrich (reference §5.4 6-7).
- confirmed: which (name, address) pairs the policy stage already opened, per map generation.
- holders: who holds an address the proxy could not bind, read from /proc/net text.
- triage: for one query, a local reply, the cached answer or a forward.

The I/O side is the `net` subpackage (sockets and timers on the stage loop's reactor);
pipeline/stages/dns.py wires both and follows a query through them.
"""
