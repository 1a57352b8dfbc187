#!/usr/bin/env python3
"""WAL bytes and CPU per message of candidate SQLite layouts for the store's message table.

Models the peers benchmark's steady state: a backlog of 15 000 1 KiB messages on one queue;
each commit inserts N messages at the tail and deletes the N oldest at the head (as settles
do), then updates the queue's depth row. WAL growth per commit counts the pages SQLite writes.

Usage: scripts/store-layout-model.py LAYOUT PAGE_BYTES [N]
  LAYOUT  A: the store's layout (rowid table + delivery index, crates/store/src/sqlite.rs)
          B: WITHOUT ROWID keyed (dest, priority DESC, seq), no index
          C: like A with bodies in their own table
Prints frames per commit, WAL KiB per message and process CPU µs per message (insert + delete;
Python's own overhead included, so compare layouts with each other only).
"""
import os
import random
import sqlite3
import sys
import tempfile
import time

LAYOUTS = {
    "A": """
CREATE TABLE messages (seq INTEGER PRIMARY KEY, dest TEXT NOT NULL, id TEXT NOT NULL,
 priority INTEGER NOT NULL, reliability INTEGER NOT NULL, expiry_ms INTEGER,
 delivery_count INTEGER NOT NULL, properties BLOB NOT NULL, body BLOB NOT NULL,
 stream_id TEXT, tick INTEGER);
CREATE INDEX messages_delivery ON messages (dest, priority DESC, seq);
CREATE INDEX messages_stream ON messages (stream_id, tick) WHERE stream_id IS NOT NULL;
""",
    "B": """
CREATE TABLE messages (seq INTEGER NOT NULL, dest TEXT NOT NULL, id TEXT NOT NULL,
 priority INTEGER NOT NULL, reliability INTEGER NOT NULL, expiry_ms INTEGER,
 delivery_count INTEGER NOT NULL, properties BLOB NOT NULL, body BLOB NOT NULL,
 stream_id TEXT, tick INTEGER, PRIMARY KEY (dest, priority DESC, seq)) WITHOUT ROWID;
""",
    "C": """
CREATE TABLE messages (seq INTEGER PRIMARY KEY, dest TEXT NOT NULL, id TEXT NOT NULL,
 priority INTEGER NOT NULL, reliability INTEGER NOT NULL, expiry_ms INTEGER,
 delivery_count INTEGER NOT NULL, properties BLOB NOT NULL, stream_id TEXT, tick INTEGER);
CREATE TABLE bodies (seq INTEGER PRIMARY KEY, body BLOB NOT NULL);
CREATE INDEX messages_delivery ON messages (dest, priority DESC, seq);
""",
}
DESTS = "CREATE TABLE dests (dest TEXT PRIMARY KEY, depth INTEGER NOT NULL) WITHOUT ROWID;"
BACKLOG = 15_000
COMMITS = 300

layout, page = sys.argv[1], int(sys.argv[2])
per_commit = int(sys.argv[3]) if len(sys.argv) > 3 else 70
assert layout in LAYOUTS and page in (4096, 8192, 16384, 32768, 65536) and 0 < per_commit
workdir = tempfile.mkdtemp(prefix="keel-layout-")
path = os.path.join(workdir, "store.db")
c = sqlite3.connect(path, isolation_level=None)
c.execute(f"PRAGMA page_size={page}")
c.execute("PRAGMA journal_mode=WAL")
c.execute("PRAGMA synchronous=OFF")  # page counts do not depend on it
c.execute("PRAGMA wal_autocheckpoint=0")  # the WAL only grows, so its size counts frames
c.executescript(LAYOUTS[layout] + DESTS)
body = os.urandom(1024)
tail, head = 1, 1


def insert(n):
    global tail
    for _ in range(n):
        mid = "%032x" % random.getrandbits(128)
        if layout == "C":
            c.execute("INSERT INTO messages VALUES (?,?,?,4,3,NULL,0,?,NULL,NULL)",
                      (tail, "q1", mid, b""))
            c.execute("INSERT INTO bodies VALUES (?,?)", (tail, body))
        else:
            c.execute("INSERT INTO messages VALUES (?,?,?,4,3,NULL,0,?,?,NULL,NULL)",
                      (tail, "q1", mid, b"", body))
        tail += 1


def delete(n):
    global head
    for _ in range(n):
        if layout == "B":
            c.execute("DELETE FROM messages WHERE dest=? AND priority=4 AND seq=?", ("q1", head))
        else:
            c.execute("DELETE FROM messages WHERE seq=? AND dest=?", (head, "q1"))
            if layout == "C":
                c.execute("DELETE FROM bodies WHERE seq=?", (head,))
        head += 1


def wal_bytes():
    try:
        return os.path.getsize(path + "-wal")
    except FileNotFoundError:
        return 0


c.execute("BEGIN")
insert(BACKLOG)
c.execute("INSERT INTO dests VALUES ('q1', 1)")
c.execute("COMMIT")
for phase in ("warm up", "measure"):
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    start_bytes, start_cpu = wal_bytes(), time.process_time()
    for _ in range(COMMITS):
        c.execute("BEGIN")
        insert(per_commit)
        delete(per_commit)
        c.execute("UPDATE dests SET depth = depth WHERE dest = 'q1'")
        c.execute("COMMIT")
    cpu_s = time.process_time() - start_cpu
    frames = (wal_bytes() - start_bytes) / (page + 24)
assert tail - head == BACKLOG
print(f"{layout} page={page} n={per_commit}: frames/commit={frames / COMMITS:.1f} "
      f"KiB/msg={frames * (page + 24) / COMMITS / per_commit / 1024:.1f} "
      f"cpu_us/msg={cpu_s / COMMITS / per_commit * 1e6:.1f}")
for suffix in ("", "-wal", "-shm"):
    try:
        os.remove(path + suffix)
    except FileNotFoundError:
        pass
os.rmdir(workdir)
