#!/usr/bin/env bash
# Reliability checks that need the server as a real process or a Debian tool:
#   1. .ci/reliability_test.ts: real SIGTERM/SIGINT, --shutdown-timeout,
#      --max-connections counted from /proc, RSS under 5,000 slow clients,
#      the one-line error for a port in use, a blocked stdout, --root;
#   2. slowhttptest in slowloris (-H) and slow-body (-B) modes against a server
#      with short timeouts, while curl checks every 0.5 s that GET / still works.
# Each check prints one human-readable figure line; the script exits non-zero
# if any check failed. Loopback only; every loop is bounded.
# Needs: deno, curl, slowhttptest (Debian package), find, wc, awk, timeout,
# and an open-files hard limit of at least 20000.
set -euo pipefail
cd "$(dirname "$0")/.."

# 5,000 client sockets in the test process; inherited by every child.
ulimit -n 20000

for tool in deno curl slowhttptest timeout; do
  if ! command -v "$tool" >/dev/null; then
    echo "reliability: '$tool' is missing" >&2
    exit 1
  fi
done

work="$(mktemp -d)"
server_pid=""
probe_pid=""
# Always: stop what this script started (by PID), then remove its files.
cleanup() {
  local pid
  for pid in $probe_pid $server_pid; do
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

failed=0
fail() {
  echo "FAIL: $*"
  failed=1
}

began=$SECONDS

echo "== deno test .ci/reliability_test.ts"
deno test --allow-net=127.0.0.1 --allow-run=bash .ci/reliability_test.ts ||
  fail "deno test .ci/reliability_test.ts"

# Starts main.ts on a free loopback port; sets server_pid and port.
start_server() {
  deno run --allow-net main.ts --port 0 --quiet "$@" \
    >"$work/server.out" 2>"$work/server.err" &
  server_pid=$!
  local line="" i
  for ((i = 0; i < 300; i++)); do # at most 30 s
    line="$(head -n 1 "$work/server.out")"
    [[ -n $line ]] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  if [[ ! $line =~ ^Listening\ on\ http://127\.0\.0\.1:([0-9]+)/$ ]]; then
    echo "server did not start: '$line'" >&2
    cat "$work/server.err" >&2
    return 1
  fi
  port=${BASH_REMATCH[1]}
}

# SIGTERM, then at most 10 s for a clean exit; prints how it ended.
stop_server() {
  local i code=0
  kill -TERM "$server_pid"
  for ((i = 0; i < 100; i++)); do
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$server_pid" 2>/dev/null; then
    fail "server still running 10 s after SIGTERM"
    kill -KILL "$server_pid"
  fi
  wait "$server_pid" || code=$?
  server_pid=""
  [[ $code -eq 0 ]] || fail "server exited with $code after SIGTERM"
  echo "  server after SIGTERM: exit $code, last line '$(tail -n 1 "$work/server.out")'"
}

# attack NAME LABEL CONNECTIONS SLOWHTTPTEST-ARGS...
# Runs slowhttptest with curl probing GET / beside it, then judges the run:
# every connection opened, every one closed by the server (slowhttptest ends
# with "No open connections left"), and the service available throughout, by
# slowhttptest's own probe and by every curl probe.
attack() {
  local name=$1 label=$2 connections=$3
  shift 3
  local prefix="$work/$name" i
  : >"$prefix.probes"
  # At most 240 probes (over 2 minutes); it stops when slowhttptest is done.
  (
    for ((i = 0; i < 240; i++)); do
      [[ -e $prefix.done ]] && break
      curl -s -o /dev/null -w '%{http_code}\n' --max-time 2 \
        "http://127.0.0.1:$port/" >>"$prefix.probes" || true
      sleep 0.5
    done
  ) &
  probe_pid=$!
  local rc=0
  timeout 120 slowhttptest "$@" -c "$connections" -g -o "$prefix" \
    >"$prefix.log" 2>&1 || rc=$?
  touch "$prefix.done"
  wait "$probe_pid" || true
  probe_pid=""

  # slowhttptest colours its log; strip the escapes before reading it.
  sed -E 's/\x1b\[[0-9;]*[A-Za-z]//g' "$prefix.log" >"$prefix.txt"
  local exit_status ended unavailable_log
  exit_status="$(sed -n 's/^Exit status: *//p' "$prefix.txt" | tail -n 1)"
  ended="$(grep -o 'Test ended on [0-9]*' "$prefix.txt" | grep -o '[0-9]*$' || true)"
  unavailable_log="$(grep -c 'service available: *NO' "$prefix.txt" || true)"

  local header
  header="$(head -n 1 "$prefix.csv" 2>/dev/null || true)"
  if [[ $header != "Seconds,Closed,Pending,Connected,Service Available" ]]; then
    fail "$label: unexpected slowhttptest CSV header '$header' (rc $rc)"
    tail -n 20 "$prefix.txt"
    return
  fi
  # Per-second rows. Service Available is 0 in a second whose probe failed.
  local rows opened most_connected most_pending last_closed unavailable
  read -r rows opened most_connected most_pending last_closed unavailable \
    < <(awk -F, 'NR > 1 {
          rows++
          total = $2 + $3 + $4; if (total > opened) opened = total
          if ($4 > connected) connected = $4
          if ($3 > pending) pending = $3
          closed = $2
          if ($5 == 0) unavailable++
        }
        END { print rows + 0, opened + 0, connected + 0, pending + 0,
                    closed + 0, unavailable + 0 }' "$prefix.csv")

  local probes ok
  probes="$(wc -l <"$prefix.probes")"
  ok="$(grep -c '^200$' "$prefix.probes" || true)"

  local closed_text available=yes
  if [[ $exit_status == "No open connections left" ]]; then
    closed_text="all $opened closed by the server by second ${ended:-?}"
  else
    closed_text="$last_closed of $opened closed by the server (then: '$exit_status')"
  fi
  if ((unavailable > 0 || unavailable_log > 0 || probes == 0 || ok < probes)); then
    available=no
  fi
  echo "$label: $opened connections opened, $closed_text;" \
    "at most $most_connected connected / $most_pending pending at once;" \
    "service available throughout: $available" \
    "(slowhttptest probe: $((rows - unavailable))/$rows s available;" \
    "curl GET /: $ok/$probes got 200)"

  ((rc == 0)) || fail "$label: slowhttptest exited with $rc"
  ((opened == connections)) ||
    fail "$label: only $opened of $connections connections were opened"
  [[ $exit_status == "No open connections left" ]] ||
    fail "$label: the server did not close every slow connection ('$exit_status')"
  [[ $available == yes ]] || fail "$label: service unavailable during the attack"
}

echo "== slowhttptest (server: --header-timeout 5 --body-timeout 5)"
start_server --header-timeout 5 --body-timeout 5 --shutdown-timeout 2

# Slowloris: a header line every 2 s, sooner than the 5 s header timeout, so
# only a deadline on the whole head (not one reset by every read) ends them.
attack slowloris "slowloris (-H -c 500 -i 2 -r 200)" 500 \
  -H -i 2 -r 200 -l 30 -u "http://127.0.0.1:$port/"

# Slow body (R-U-Dead-Yet): Content-Length 4096, then a few body bytes every
# 10 s; the 5 s body timeout (a stall without progress) ends them.
attack slowbody "slow body (-B -c 500 -i 10 -r 200)" 500 \
  -B -i 10 -r 200 -l 30 -s 4096 -t POST -u "http://127.0.0.1:$port/echo"

stop_server

echo "== reliability: $((SECONDS - began)) s wall time"
if ((failed)); then
  echo "reliability: FAILED"
  exit 1
fi
echo "reliability: all checks passed"
