#!/usr/bin/python3
"""A producer that reuses delivery tags among its unsettled deliveries, as Qpid Proton C++
does (its tag counter restarts per sender handle), against Keel's bus port.

Usage: amqp_duplicate_tags.py HOST:PORT PASSWORD QUEUE COUNT
Sends COUNT durable, unsettled messages whose tags cycle through 7 values, waits at most
OUTCOME_WAIT_S for every outcome, then receives the queue and prints one JSON object of
findings. Run by crates/cli/tests/amqp.rs, which judges them.
"""
import json
import sys

from proton import Message
from proton.handlers import MessagingHandler
from proton.reactor import Container
from proton.utils import BlockingConnection

addr, password, queue, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
TAGS = 7
# Keel accepts a message once its store commit is durable: well under a second for a few
# hundred; a missing outcome waits for ever, so this only bounds the wait.
OUTCOME_WAIT_S = 30
URL = "amqp://admin:%s@%s" % (password, addr)


class Producer(MessagingHandler):
    def __init__(self):
        super().__init__(auto_settle=True)
        self.sent = 0
        self.accepted = 0
        self.other = []
        self.unsettled_tags = {}
        self.reused_while_unsettled = 0
        self.timed_out = False
        self.conn = None
        self.detached = None

    def on_start(self, event):
        self.conn = event.container.connect(
            URL, allowed_mechs="PLAIN", allow_insecure_mechs=True
        )
        event.container.create_sender(self.conn, queue)
        self.timer = event.container.schedule(OUTCOME_WAIT_S, self)

    def on_timer_task(self, event):
        self.timed_out = True
        self.conn.close()

    def on_sendable(self, event):
        while event.sender.credit and self.sent < count:
            tag = "t%d" % (self.sent % TAGS)
            # Count the sends whose tag an unsettled delivery of this link still carries.
            if self.unsettled_tags.get(tag, 0) > 0:
                self.reused_while_unsettled += 1
            self.unsettled_tags[tag] = self.unsettled_tags.get(tag, 0) + 1
            event.sender.send(
                Message(body="d%d" % self.sent, durable=True), tag=tag
            )
            self.sent += 1

    def settled(self, event):
        self.unsettled_tags[event.delivery.tag] -= 1
        if self.accepted + len(self.other) == count:
            self.timer.cancel()
            event.connection.close()

    def on_accepted(self, event):
        self.accepted += 1
        self.settled(event)

    def on_rejected(self, event):
        self.other.append("rejected")
        self.settled(event)

    def on_released(self, event):
        self.other.append("released")
        self.settled(event)

    def on_link_error(self, event):
        self.detached = str(event.link.remote_condition)
        self.timer.cancel()
        event.connection.close()


producer = Producer()
Container(producer).run()

found = {
    "sent": producer.sent,
    "accepted": producer.accepted,
    "other_outcomes": producer.other,
    "reused_while_unsettled": producer.reused_while_unsettled,
    "timed_out": producer.timed_out,
    "detached": producer.detached,
}

# What the store kept: every body, each exactly once.
conn = BlockingConnection(
    "amqp://%s" % addr,
    timeout=20,
    user="admin",
    password=password,
    allowed_mechs="PLAIN",
    allow_insecure_mechs=True,
)
rcv = conn.create_receiver(queue, credit=100)
bodies = []
while True:
    try:
        m = rcv.receive(timeout=3)
    except Exception:  # proton.Timeout: the queue is drained
        break
    bodies.append(m.body)
    rcv.accept()
conn.close()
found["received"] = len(bodies)
found["received_distinct"] = len(set(bodies))
found["missing"] = sorted(set("d%d" % i for i in range(count)) - set(bodies))[:10]
print(json.dumps(found))
