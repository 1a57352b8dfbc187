#!/usr/bin/env bash
# Checks the two upstream patches against a pristine fe2o3-amqp 0.18.4 from crates.io.
#
#   third_party/upstream/verify.sh [SCRATCH_DIR]
#
# SCRATCH_DIR (default /tmp/fe2o3-upstream-verify) receives the fetched crate, one fresh copy
# per check and the cargo target dir (CARGO_TARGET_DIR, if set, is used instead). Nothing is
# written outside it. Each check prints one line: "<check>: <expected> -> <result>". Exits
# non-zero if any result differs from what is expected.
set -u -o pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
P1="$HERE/0001-acceptor-key-links-by-name-and-role.patch"
P2="$HERE/0002-client-set-tcp-nodelay.patch"
SCRATCH="${1:-/tmp/fe2o3-upstream-verify}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SCRATCH/target}"
export RUST_BACKTRACE=0
mkdir -p "$SCRATCH/logs"

# 1. pristine 0.18.4 from crates.io, through a throwaway project
FETCH="$SCRATCH/fetch"
mkdir -p "$FETCH/src"
cat > "$FETCH/Cargo.toml" <<'EOF'
[package]
name = "fe2o3-pristine-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
fe2o3-amqp = "=0.18.4"
EOF
echo 'fn main() {}' > "$FETCH/src/main.rs"
(cd "$FETCH" && cargo fetch -q) || { echo "cargo fetch failed"; exit 2; }
PRISTINE="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/fe2o3-amqp-0.18.4 | head -n1)"
[ -f "$PRISTINE/Cargo.toml" ] || { echo "pristine source not found"; exit 2; }

fresh() { # fresh <name>: a clean copy of the pristine crate, printed path
    rm -rf "$SCRATCH/$1" && cp -r "$PRISTINE" "$SCRATCH/$1" && echo "$SCRATCH/$1"
}

status=0
check() { # check <name> <expected pass|fail> <dir> <cargo test args...>
    local name="$1" expected="$2" dir="$3"
    shift 3
    local log="$SCRATCH/logs/$name.log" result
    if (cd "$dir" && cargo test --locked "$@") > "$log" 2>&1; then result=pass; else result=fail; fi
    echo "$name: expected $expected -> $result"
    grep -E "^test |panicked at|^(receiver|sender|TCP_NODELAY|called)|test result" "$log" | sed 's/^/    /'
    [ "$result" = "$expected" ] || status=1
}

T1=(--features acceptor --test acceptor sender_and_receiver_may_share_a_link_name)
T2=(--lib connect_tcp_sets_nodelay)

# 2. each patch applies alone
for p in "$P1" "$P2"; do
    d="$(fresh apply-check)"
    if (cd "$d" && git apply --check "$p"); then echo "git apply --check $(basename "$p"): ok"
    else echo "git apply --check $(basename "$p"): FAILED"; status=1; fi
done

# 3. patch 1: its test alone on pristine source fails, the whole patch passes
d="$(fresh p1-test-only)" && (cd "$d" && git apply --include=tests/acceptor.rs "$P1")
check p1-test-on-pristine fail "$d" "${T1[@]}"
# control: the patch without its acceptor half (incoming links still booked by name alone)
# fails the same test on the acceptor side, with the hang Keel saw from qpid-proton
d="$(fresh p1-without-acceptor-half)" && (cd "$d" && git apply \
    --exclude=src/acceptor/local_sender_link.rs --exclude=src/acceptor/local_receiver_link.rs "$P1")
check p1-without-acceptor-half fail "$d" "${T1[@]}"
d="$(fresh p1-applied)" && (cd "$d" && git apply "$P1")
check p1-applied pass "$d" "${T1[@]}"

# 4. patch 2: without `set_nodelay` the helper's test fails, with it it passes
d="$(fresh p2-without-set-nodelay)" && (cd "$d" && git apply "$P2" &&
    sed -i '/stream.set_nodelay(true)?;/d' src/connection/builder.rs)
check p2-without-set-nodelay fail "$d" "${T2[@]}"
d="$(fresh p2-applied)" && (cd "$d" && git apply "$P2")
check p2-applied pass "$d" "${T2[@]}"

# 5. both together (the link test then also opens its connection through `connect_tcp`)
d="$(fresh both)" && (cd "$d" && git apply "$P1" && git apply "$P2")
check both-p1-test pass "$d" "${T1[@]}"
check both-p2-test pass "$d" "${T2[@]}"

exit $status
