#!/usr/bin/python3
"""python-qpid-proton against Keel's bus roles.

Usage: amqp_roles.py HOST:PORT USER PASSWORD QUEUE MODE
MODE sender: USER (SASL PLAIN) may send to QUEUE but not receive from it.
MODE anonymous-receiver: an anonymous client (SASL ANONYMOUS; USER and PASSWORD unused) may
receive from QUEUE but not send to it.
Prints one JSON object of findings; exits 1 with the reason on stderr if the server does not
behave. Run by crates/cli/tests/users.rs.
"""
import json
import sys

from proton import Message
from proton.utils import BlockingConnection, LinkDetached

addr, user, password, queue, mode = sys.argv[1:6]
found = {}


def fail(why):
    print(why, file=sys.stderr)
    sys.exit(1)


if mode == "sender":
    conn = BlockingConnection(
        "amqp://%s" % addr,
        timeout=20,
        user=user,
        password=password,
        allowed_mechs="PLAIN",
        allow_insecure_mechs=True,
    )
    snd = conn.create_sender(queue)
    snd.send(Message(body="from proton", durable=True))
    found["sent"] = 1
    try:
        conn.create_receiver(queue)
        fail("a receiver was attached without the receiver role")
    except LinkDetached as e:
        found["refused"] = str(e)
elif mode == "anonymous-receiver":
    conn = BlockingConnection("amqp://%s" % addr, timeout=20, allowed_mechs="ANONYMOUS")
    rcv = conn.create_receiver(queue)
    msg = rcv.receive(timeout=10)
    rcv.accept()
    body = msg.body
    found["received"] = body.decode() if isinstance(body, (bytes, memoryview)) else str(body)
    try:
        conn.create_sender(queue)
        fail("an anonymous sender was attached without the sender role")
    except LinkDetached as e:
        found["refused"] = str(e)
else:
    fail("unknown mode %s" % mode)
conn.close()
print(json.dumps(found))
