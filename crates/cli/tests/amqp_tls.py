#!/usr/bin/python3
"""python-qpid-proton over TLS (amqps://) against Keel's bus port, trusting the cell's CA.

Usage: amqp_tls.py HOST PORT PASSWORD QUEUE CA_FILE OTHER_CA_FILE
Prints one JSON object of findings; exits 1 with the reason on stderr at the first scenario
that does not behave. Run by crates/cli/tests/amqp.rs.
"""
import json
import sys

from proton import ConnectionException, Message, SSLDomain
from proton.utils import BlockingConnection

host, port, password, queue, ca_file, other_ca = sys.argv[1:7]
found = {}


def fail(why):
    print(why, file=sys.stderr)
    sys.exit(1)


def domain(ca, verify=SSLDomain.VERIFY_PEER_NAME):
    d = SSLDomain(SSLDomain.MODE_CLIENT)
    d.set_trusted_ca_db(ca)
    d.set_peer_authentication(verify)
    return d


def connect(name, ca=ca_file, verify=SSLDomain.VERIFY_PEER_NAME):
    # PLAIN over TLS needs no allow_insecure_mechs: the channel is encrypted.
    return BlockingConnection(
        "amqps://%s:%s" % (name, port),
        timeout=20,
        user="admin",
        password=password,
        allowed_mechs="PLAIN",
        ssl_domain=domain(ca, verify),
    )


# 1. Durable messages over TLS, by host name (checked against the certificate) and by IP
#    address. Proton checks a peer name as a DNS name only (OpenSSL's X509_check_host), so an
#    IP address never matches the certificate's IP entry: by IP, the chain alone is checked.
for name, verify in [("localhost", SSLDomain.VERIFY_PEER_NAME), (host, SSLDomain.VERIFY_PEER)]:
    conn = connect(name, verify=verify)
    snd = conn.create_sender(queue)
    for i in range(5):
        snd.send(Message(body="tls-%s-%d" % (name, i), durable=True))
    rcv = conn.create_receiver(queue, credit=5)
    for i in range(5):
        m = rcv.receive(timeout=10)
        if m.body != "tls-%s-%d" % (name, i):
            fail("over TLS to %s, message %d came back as %r" % (name, i, m.body))
        rcv.accept()
    conn.close()
    found["round_trip_" + name] = 5

# 2. A client that trusts another CA refuses the server's certificate.
try:
    connect("localhost", ca=other_ca).close()
    fail("a client trusting another CA connected")
except ConnectionException as e:
    found["other_ca"] = str(e)

print(json.dumps(found))
