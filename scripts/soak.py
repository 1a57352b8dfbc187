#!/usr/bin/python3
"""Soak: a real Keel server under load, crashes and hostile floods at once (issue 19).

For --duration-s seconds (default 600) against a fresh profile on loopback:
- senders (python-qpid-proton, an AMQP client Keel did not write) send numbered durable
  messages to a queue, each waiting for its outcome;
- receivers take and accept them;
- the server is killed with SIGKILL every --kill-every-s seconds; its node agent restarts it
  (auto_restart) and the clients reconnect;
- floods from other loopback sources: half-open bus-port connections (127.0.0.2), idle admin
  connections (127.0.0.3), wrong-password SASL logins (127.0.0.4), engine-link headers with a
  256 MiB first frame (127.0.0.5).
Then every message left is drained and the books are checked. Prints one JSON report:

  accepted     messages whose sender got `accepted`
  in_doubt     sent when the connection died, no outcome (may or may not be stored: never
               retried, so never a duplicate of the sender's making)
  received     distinct messages received
  lost         accepted but never received                                   (must be 0)
  duplicated   received again although the connection that took the earlier copy did not
               break within --settle-grace-s after taking it                (must be 0)
  redelivered  received again because the connection that took the earlier copy broke under
               a kill within the grace: its accept may never have reached the store (or the
               server: proton hands out prefetched messages after the connection died), so
               the message is delivered again, at least once as AMQP allows
  peak_rss_mib the server's highest resident memory over all its incarnations
  flood_*      connections each flood made (flood_login: wrong passwords the server answered,
               throttled: their answers wait longer and longer, per server incarnation)

Exits 1 when lost or duplicated is not 0. Every loop is bounded by the duration; traffic goes
to 127.0.0.0/8 only. Needs /usr/bin/python3 with python3-qpid-proton (scripts/test installs it).

Usage: scripts/soak.py [--keel target/debug/keel] [--duration-s 600] [--kill-every-s 60]
"""
import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

from proton import ConnectionException, Message
from proton.utils import BlockingConnection, SendException

ap = argparse.ArgumentParser()
ap.add_argument("--keel", default=None)
ap.add_argument("--duration-s", type=int, default=600)
ap.add_argument("--kill-every-s", type=int, default=60)
ap.add_argument("--senders", type=int, default=2)
ap.add_argument("--receivers", type=int, default=2)
ap.add_argument("--settle-grace-s", type=float, default=2.0)
ap.add_argument("--base-port", type=int, default=27300)
args = ap.parse_args()

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
keel = args.keel or next(
    p for p in (os.path.join(root, "target/release/keel"), os.path.join(root, "target/debug/keel"))
    if os.path.exists(p)
)
work = tempfile.mkdtemp(prefix="keel-soak-")
profile = os.path.join(work, "profile")
t0 = time.monotonic()
deadline = t0 + args.duration_s
stop = threading.Event()
lock = threading.Lock()


def run(*a, check=True):
    r = subprocess.run([keel, "--profile", profile, *a], capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        sys.exit("keel %s failed: %s" % (" ".join(a), r.stderr.strip()))
    return r.stdout


run("profile", "create", profile, "--base-port", str(args.base_port))
run("destination", "create", "bus1", "soak", "--type", "queue")
run("server", "set-monitor-policy", "server1", "--auto-restart", "true", "--ping-interval-s", "1")
run("node", "start")
run("server", "start", "server1")
status = json.loads(run("server", "status", "server1", "--json"))
bus_port = int(status["endpoints"]["bus"].rsplit(":", 1)[1])
admin_port = int(status["endpoints"]["admin"].rsplit(":", 1)[1])
password = open(os.path.join(profile, "secrets/admin-password")).read().strip()
url = "amqp://127.0.0.1:%d" % bus_port

accepted, in_doubt = set(), set()
duplicated, redelivered = [], []
kills = []  # monotonic times of each SIGKILL
peak_rss_kib = [0]
counters = {"flood_bus": 0, "flood_admin": 0, "flood_login": 0, "flood_link": 0, "kills": 0}


def server_pid():
    try:
        return int(open(os.path.join(profile, "run/server1.pid")).read().strip())
    except (OSError, ValueError):
        return None


def connect():
    return BlockingConnection(url, timeout=10, user="admin", password=password,
                              allowed_mechs="PLAIN", allow_insecure_mechs=True)


def sender(k):
    n = k
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            conn = connect()
            snd = conn.create_sender("soak")
            while not stop.is_set() and time.monotonic() < deadline:
                msg = Message(body="x" * 700, durable=True, properties={"n": n})
                try:
                    snd.send(msg, timeout=10)
                except SendException:
                    pass  # rejected/released: not accepted, not in doubt
                else:
                    with lock:
                        accepted.add(n)
                    n += args.senders
                    continue
                n += args.senders
            conn.close()
        except Exception:
            # The connection died with this message's outcome unknown: it is in doubt, never
            # sent again (a retry could duplicate it).
            with lock:
                in_doubt.add(n)
            n += args.senders
            time.sleep(0.5)


receipts = {}  # n -> [(time since start, connection, delivery_count)]
broken = {}  # connection -> when it ended with an error (the server was killed under it)


def take(m, now, who):
    with lock:
        receipts.setdefault(m.properties["n"], []).append((now - t0, who, m.delivery_count))


def classify():
    """Splits messages received more than once into redelivered (the connection that took the
    earlier copy broke within the grace after taking it: its accept may never have reached the
    store, or the server at all, if proton took the copy from its prefetch after the kill) and
    duplicated (anything else)."""
    for n, rs in receipts.items():
        for (t, who, _), _later in zip(rs, rs[1:]):
            e = broken.get(who)
            cut = e is not None and e - args.settle_grace_s <= t <= e
            (redelivered if cut else duplicated).append(n)


def receiver(k):
    serial = 0
    while not stop.is_set() and time.monotonic() < deadline + 5:
        serial += 1
        who = "r%d.%d" % (k, serial)
        try:
            conn = connect()
            rcv = conn.create_receiver("soak", credit=50)
            while not stop.is_set() and time.monotonic() < deadline + 5:
                try:
                    m = rcv.receive(timeout=1)
                except Exception as e:
                    if "Timeout" in type(e).__name__:
                        continue
                    raise
                take(m, time.monotonic(), who)
                rcv.accept()
            conn.close()
        except Exception:
            with lock:
                broken[who] = time.monotonic() - t0
            time.sleep(0.5)


def killer():
    while not stop.is_set():
        if stop.wait(args.kill_every_s) or time.monotonic() > deadline - 10:
            return
        pid = server_pid()
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
                with lock:
                    kills.append(time.monotonic())
                    counters["kills"] += 1
            except ProcessLookupError:
                pass


def rss_watch():
    while not stop.is_set():
        pid = server_pid()
        if pid:
            try:
                for line in open("/proc/%d/status" % pid):
                    if line.startswith(("VmRSS:", "VmHWM:")):
                        peak_rss_kib[0] = max(peak_rss_kib[0], int(line.split()[1]))
            except OSError:
                pass
        stop.wait(0.5)


def from_source(src, port):
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(2)
    s.connect(("127.0.0.1", port))
    return s


def flood_bus():  # half-open connections, never a byte
    while not stop.is_set() and time.monotonic() < deadline:
        held = []
        for _ in range(300):
            try:
                held.append(from_source("127.0.0.2", bus_port))
            except OSError:
                break
        counters["flood_bus"] += len(held)
        stop.wait(3)
        for s in held:
            s.close()


def flood_admin():  # idle connections to the admin port
    while not stop.is_set() and time.monotonic() < deadline:
        held = []
        for _ in range(600):
            try:
                held.append(from_source("127.0.0.3", admin_port))
            except OSError:
                break
        counters["flood_admin"] += len(held)
        stop.wait(3)
        for s in held:
            s.close()


def sasl_init_plain(user, pw):
    resp = b"\0" + user.encode() + b"\0" + pw.encode()
    fields = b"\xa3\x05PLAIN" + b"\xa0" + bytes([len(resp)]) + resp + b"\x40"
    body = b"\x00\x53\x41" + b"\xc0" + bytes([1 + len(fields), 3]) + fields
    return struct.pack(">IBBH", 8 + len(body), 2, 1, 0) + body


def flood_login():  # wrong passwords, as raw SASL; counts the attempts the server answered
    frame = sasl_init_plain("admin", "guess")
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            s = from_source("127.0.0.4", bus_port)
        except OSError:
            stop.wait(0.1)  # the server is restarting
            continue
        try:
            s.settimeout(20)
            s.sendall(b"AMQP\x03\x01\x00\x00" + frame)
            answer = b""
            while True:
                data = s.recv(4096)
                if not data:
                    break
                answer += data
            # The SASL outcome frame ends with its code: 1 (auth) for a wrong password.
            if answer.endswith(b"\x50\x01"):
                counters["flood_login"] += 1
        except OSError:
            pass
        finally:
            s.close()


def flood_link():  # KEEL header, then a first frame announcing 256 MiB
    chunk = b"\x5a" * (1 << 20)
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            s = from_source("127.0.0.5", bus_port)
        except OSError:
            stop.wait(0.1)
            continue
        try:
            s.sendall(b"KEEL\x02\x00\x00\x00" + struct.pack(">II", 256 << 20, 0))
            counters["flood_link"] += 1
            for _ in range(8):
                s.sendall(chunk)
        except OSError:
            pass
        finally:
            s.close()
        stop.wait(0.5)


threads = [threading.Thread(target=sender, args=(k,)) for k in range(args.senders)]
threads += [threading.Thread(target=receiver, args=(k,)) for k in range(args.receivers)]
threads += [threading.Thread(target=f) for f in (killer, rss_watch, flood_bus, flood_admin, flood_login, flood_link)]
for t in threads:
    t.daemon = True
    t.start()
started = time.monotonic()
try:
    while time.monotonic() < deadline + 5:
        time.sleep(1)
finally:
    stop.set()
    for t in threads:
        t.join(timeout=30)

# Drain what is left (the server may be restarting after the last kill).
drain_until = time.monotonic() + 60
while time.monotonic() < drain_until:
    try:
        conn = connect()
        rcv = conn.create_receiver("soak", credit=100)
        idle = 0
        while idle < 5:
            try:
                m = rcv.receive(timeout=1)
            except Exception:
                idle += 1
                continue
            idle = 0
            take(m, time.monotonic(), "drain")
            rcv.accept()
        conn.close()
        break
    except ConnectionException:
        time.sleep(1)

classify()
got = set(receipts)
lost = sorted(accepted - got)
report = {
    "duration_s": round(time.monotonic() - started),
    "keel": keel,
    "accepted": len(accepted),
    "in_doubt": len(in_doubt),
    "in_doubt_arrived": len(in_doubt & got),
    "received": len(got),
    "lost": len(lost),
    "duplicated": len(duplicated),
    "redelivered": len(redelivered),
    "peak_rss_mib": round(peak_rss_kib[0] / 1024, 1),
    "restarts": json.loads(run("server", "status", "server1", "--json"))["restarts"],
    **counters,
}
if lost:
    report["lost_first"] = lost[:20]
if duplicated:
    report["duplicated_first"] = {n: receipts[n] for n in sorted(duplicated)[:20]}
    report["broken_connections"] = broken
    report["kills_at_s"] = [round(k - t0, 2) for k in kills]
print(json.dumps(report, indent=2))
run("node", "stop", "--stop-servers", check=False)
subprocess.run(["rm", "-rf", work])
sys.exit(1 if lost or duplicated else 0)
