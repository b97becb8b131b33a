"""The allow client's lend: taken back once none of its requests waits, before the answer."""

import logging

import zmq

from pipeline import messages
from pipeline.dns.answers import AnswerFacts
from pipeline.dns.enforce import AllowAsk
from pipeline.dns.net.allow import AllowClient
from pipeline.events import AllowReply
from pipeline.histogram import Histogram
from pipeline.loop import Counters
from pipeline.reactor import Reactor

FACTS = AnswerFacts(0, ("192.0.2.7",), 60, 60, (), 1)


def test_the_lend_is_taken_back_once_no_request_waits_and_before_the_answer_is_released():
    ctx = zmq.Context()
    policy = ctx.socket(zmq.ROUTER)
    policy.bind("inproc://allow-requests")
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect("inproc://allow-requests")
    steps: list = []
    client = AllowClient(dealer, Reactor(), 5.0, lambda: 1, Counters(), Histogram(),
                         logging.getLogger("sluice.test"), lend=lambda: steps.append("lend"),
                         take_back=lambda: steps.append("take back"))
    try:
        for name in ("a.test", "b.test"):
            client.request(AllowAsk(name, ()), FACTS,
                           lambda ok, name=name: steps.append(f"{name} answered"))
        asked = [policy.recv_multipart() for _ in range(2)]
        for peer, empty, frame in reversed(asked):  # b's reply first
            request = messages.decode(frame)[1][0]
            reply = AllowReply(request.request_id, True, list(request.ips), "")
            policy.send_multipart([peer, empty, messages.encode([reply])])
            assert dealer.poll(5000)
            client.drain()
        assert steps == ["lend", "lend", "b.test answered", "take back", "a.test answered"]
    finally:
        dealer.close(0)
        policy.close(0)
        ctx.term()
