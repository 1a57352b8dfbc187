#!/bin/bash
# Server and client CPU per message of one `keel-bench peers` run against Keel, read from
# /proc/<pid>/stat (utime + stime, clock ticks of 10 ms) over the server's whole life.
# Usage: scripts/cpu-per-message.sh [keel-binary]   (N=messages, default 600000)
# Needs target-bench/release/keel-bench (see BENCHMARKS.md) and nothing else measuring.
set -u
cd "$(git rev-parse --show-toplevel)"
n=${N:-600000}
args=(--messages "$n" --systems keel)
[ -n "${1:-}" ] && args+=(--keel "$1")
log=$(mktemp)
target-bench/release/keel-bench peers "${args[@]}" > "$log" 2>&1 &
bp=$!
pid=""
for _ in $(seq 600); do
    pid=$(pgrep -f "keel server run" | head -1)
    [ -n "$pid" ] && break
    sleep 0.1
done
[ -n "$pid" ] || { echo "no keel server appeared"; cat "$log"; exit 1; }
last=0; clast=0
while kill -0 "$pid" 2>/dev/null; do
    v=$(awk '{print $14+$15}' "/proc/$pid/stat" 2>/dev/null) && [ -n "$v" ] && last=$v
    c=$(awk '{print $14+$15}' "/proc/$bp/stat" 2>/dev/null) && [ -n "$c" ] && clast=$c
    sleep 0.1
done
wait "$bp" || { cat "$log"; exit 1; }
rate=$(tail -1 "$log" | awk '{print $2}')
echo "msgs_per_s=$rate server_us_per_msg=$(echo "$last*10000/$n" | bc -l | cut -c1-5) client_us_per_msg=$(echo "$clast*10000/$n" | bc -l | cut -c1-5)"
rm -f "$log"
