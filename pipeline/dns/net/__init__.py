"""The DNS proxy's I/O side: sockets and timers registered with the stage loop's reactor
(pipeline/reactor.py). Each piece gets the reactor and callbacks, never the stage.

- listeners: binding the listen addresses, reading UDP queries, admitting TCP clients.
- clients: where a query came from and how its answer goes back (UDP, TCP, timed).
- upstream: one question's exchange with the upstream (UDP, then TCP when truncated).
- allow: allow_requests to the policy stage over a DEALER, many in flight.

What to do with a query is decided by the pure modules one level up (pipeline/dns/triage.py).
"""
