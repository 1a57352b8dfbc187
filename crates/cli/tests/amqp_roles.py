#!/usr/bin/python3
"""python-qpid-proton against Keel's bus roles.

Usage: amqp_roles.py HOST:PORT USER PASSWORD QUEUE
USER may send to QUEUE but not receive from it. Prints one JSON object of findings; exits 1
with the reason on stderr if the server does not behave. Run by crates/cli/tests/users.rs.
"""
import json
import sys

from proton import Message
from proton.utils import BlockingConnection, LinkDetached

addr, user, password, queue = sys.argv[1:5]
found = {}

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
    print("a receiver was attached without the receiver role", file=sys.stderr)
    sys.exit(1)
except LinkDetached as e:
    found["receive_refused"] = str(e)
conn.close()
print(json.dumps(found))
