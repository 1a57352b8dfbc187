#!/usr/bin/python3
"""python-qpid-proton (a real AMQP 1.0 client nobody here wrote) against Keel's bus port.

Usage: amqp_proton.py HOST:PORT PASSWORD QUEUE TOPIC
Runs the scenarios below in order and prints one JSON object of findings; exits 1 with the
reason on stderr at the first scenario that does not behave. Run by crates/cli/tests/amqp.rs.
"""
import json
import sys

from proton import ConnectionException, Delivery, Message
from proton.reactor import DurableSubscription
from proton.utils import BlockingConnection, LinkDetached, SendException

addr, password, queue, topic = sys.argv[1:5]
found = {}


def fail(why):
    print(why, file=sys.stderr)
    sys.exit(1)


def connect(pw=password):
    return BlockingConnection(
        "amqp://%s" % addr,
        timeout=20,
        user="admin",
        password=pw,
        allowed_mechs="PLAIN",
        allow_insecure_mechs=True,
    )


# 1. A wrong password is refused at SASL.
try:
    connect("not-the-password").close()
    fail("a wrong password was accepted")
except ConnectionException as e:
    found["wrong_password"] = str(e)

conn = connect()

# 2. Durable sends, each settled (accepted) before the next: BlockingSender.send raises
#    SendException for any other outcome.
snd = conn.create_sender(queue)
for i in range(10):
    snd.send(Message(body="m%d" % i, durable=True, subject="s", properties={"i": i, "who": "proton"}))
found["sent"] = 10

# 3. Receive with credit, in order, with properties intact; accept.
rcv = conn.create_receiver(queue, credit=10)
got = []
for i in range(10):
    m = rcv.receive(timeout=10)
    if m.body != "m%d" % i or m.properties.get("i") != i or m.subject != "s":
        fail("message %d came back as %r (properties %r, subject %r)" % (i, m.body, m.properties, m.subject))
    got.append(m.body)
    rcv.accept()
found["received_in_order"] = len(got)

# 4. Released: the message comes back (count unchanged). Modified with delivery failed: it
#    comes back with its delivery count raised.
snd.send(Message(body="again", durable=True))
m = rcv.receive(timeout=10)
rcv.release(delivered=False)
m = rcv.receive(timeout=10)
if m.body != "again":
    fail("a released message did not come back: %r" % m.body)
found["released_count"] = m.delivery_count
# Modified with delivery-failed set (BlockingReceiver.release(delivered=True) sends modified
# without it, which AMQP counts as not failed).
dlv = rcv.fetcher.unsettled[0]
dlv.local.failed = True
rcv.settle(Delivery.MODIFIED)
m = rcv.receive(timeout=10)
if m.body != "again" or m.delivery_count < 1:
    fail("a failed delivery came back as %r with count %r" % (m.body, m.delivery_count))
found["failed_count"] = m.delivery_count

# 5. Rejected: off to the exception destination, not redelivered here.
rcv.reject()
snd.send(Message(body="after-reject", durable=True))
m = rcv.receive(timeout=10)
if m.body != "after-reject":
    fail("a rejected message was redelivered: %r" % m.body)
rcv.accept()
found["rejected"] = True
rcv.close()

# 6. An undefined destination is refused (never silently dropped): the server answers the
#    attach and detaches at once with amqp:not-found, which proton reports at the attach or,
#    when the detach arrives a moment later, at the first send.
try:
    nowhere = conn.create_sender("no-such-queue")
    nowhere.send(Message(body="lost?", durable=True))
    fail("a message to an undefined destination was accepted")
except (LinkDetached, SendException) as e:
    found["undefined_destination"] = str(e)

# 7. An oversized message is refused with an AMQP error.
try:
    # proton names links <container>-<address>: a second sender to the same address while
    # the first is attached needs a name of its own.
    big = conn.create_sender(queue, name="big-sender")
    big.send(Message(body=b"x" * (2 * 1024 * 1024), durable=True))
    fail("a 2 MiB message was accepted on a bus with a 1 MiB limit")
except (SendException, LinkDetached) as e:
    found["oversized"] = str(e)

# 8. A durable subscription on a topic: published messages wait in it.
conn2 = connect()
sub = conn2.create_receiver(topic, name="proton-sub", options=DurableSubscription())
pub = conn2.create_sender(topic)
pub.send(Message(body="tick", durable=True))
m = sub.receive(timeout=10)
if m.body != "tick":
    fail("the subscription received %r" % m.body)
sub.accept()
found["subscription"] = m.body
conn2.close()

# 9. Something for the Keel side to read with `keel receive`.
snd.send(Message(body="for-keel-receive", durable=True))
conn.close()
print(json.dumps(found))
