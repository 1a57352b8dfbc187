#!/usr/bin/python3
"""python-qpid-proton from another host of a network-namespace lab against a node on its own
host: amqps:// with the cell's CA works; plain amqp:// is refused before SASL.

Usage: amqp_remote.py HOST PORT PASSWORD QUEUE CA_FILE
Prints one JSON object of findings; exits 1 with the reason on stderr if the server does not
behave. Run by crates/cli/tests/hosts.rs.
"""
import json
import sys

from proton import ConnectionException, Message, SSLDomain
from proton.utils import BlockingConnection

host, port, password, queue, ca_file = sys.argv[1:6]
found = {}


def fail(why):
    print(why, file=sys.stderr)
    sys.exit(1)


d = SSLDomain(SSLDomain.MODE_CLIENT)
d.set_trusted_ca_db(ca_file)
# Proton checks a peer name as a DNS name only; by IP the chain is what is checked.
d.set_peer_authentication(SSLDomain.VERIFY_PEER)
conn = BlockingConnection(
    "amqps://%s:%s" % (host, port),
    timeout=20,
    user="admin",
    password=password,
    allowed_mechs="PLAIN",
    ssl_domain=d,
)
snd = conn.create_sender(queue)
for i in range(5):
    snd.send(Message(body="remote-%d" % i, durable=True))
rcv = conn.create_receiver(queue, credit=5)
for i in range(5):
    m = rcv.receive(timeout=10)
    if m.body != "remote-%d" % i:
        fail("message %d came back as %r" % (i, m.body))
    rcv.accept()
conn.close()
found["round_trip"] = 5

try:
    BlockingConnection(
        "amqp://%s:%s" % (host, port),
        timeout=10,
        user="admin",
        password=password,
        allowed_mechs="PLAIN",
        allow_insecure_mechs=True,
    ).close()
    fail("a plain connection from another host was served")
except ConnectionException as e:
    found["plain_refused"] = str(e)

print(json.dumps(found))
