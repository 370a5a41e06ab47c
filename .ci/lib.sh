# shellcheck shell=bash
# What the suites that drive real clients against the real server share
# (.ci/interop.sh, .ci/tls.sh): their background processes and temp dir,
# their reporting, and their assertions. Sourced after the script's own
# `set -euo pipefail` and its `cd` to the repository root; it only defines
# things, and the script's `setup` call makes the temp dir and the traps.

export NO_COLOR=1 # plain TAP and logs from deno

# ---------------------------------------------------------------------------
# Processes: everything started in the background is recorded here, and the
# trap stops it however the script ends.
# ---------------------------------------------------------------------------

PIDS=()
declare -A PID PORT

# The scheme a server names in its first line: tls.sh sets https.
SCHEME=http

# setup NAME KEPT: $WORK, a fresh temp dir named after the suite, and the
# traps that stop every background process and remove $WORK however the
# script ends. KEEP_WORK=1 keeps it instead, saying "KEPT kept in $WORK".
# NAME also begins the summary line.
setup() {
  SUITE=$1
  WORK_KEPT=$2
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/$SUITE.XXXXXX")
  trap cleanup EXIT
  trap 'exit 130' INT TERM
}

cleanup() {
  local pid _
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  # SIGTERM is a graceful shutdown: give it a few seconds before SIGKILL.
  for _ in $(seq 50); do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  if [ "${KEEP_WORK:-}" = 1 ]; then
    echo "$WORK_KEPT kept in $WORK" >&2
  else
    rm -rf "$WORK"
  fi
}

# launch NAME COMMAND...: starts a server that listens on a free port and
# waits for its first line, "Listening on SCHEME://127.0.0.1:PORT/", to
# learn the port. Sets PID[NAME] and PORT[NAME]; stdout (the access log) goes
# to $WORK/NAME.out and stderr to $WORK/NAME.err. `timeout` is the backstop
# if this script is killed outright; it passes our SIGTERM on to deno and
# exits with deno's status, so PID[NAME] can be signalled and waited for as
# if it were the server itself. A server that does not start is a failure,
# shown with its stderr, and launch returns 1.
launch() {
  local name=$1 line="" _
  shift
  # Made here, not by the background job, so the first look finds them.
  : >"$WORK/$name.out"
  : >"$WORK/$name.err"
  timeout -k 5 300 "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  PID[$name]=$!
  PIDS+=("$!")
  for _ in $(seq 150); do # up to 15 s
    line=$(head -n 1 "$WORK/$name.out")
    [ -n "$line" ] && break
    kill -0 "${PID[$name]}" 2>/dev/null || break
    sleep 0.1
  done
  if [[ $line =~ ^Listening\ on\ $SCHEME://127\.0\.0\.1:([0-9]+)/$ ]]; then
    # shellcheck disable=SC2034 # read by the suites
    PORT[$name]=${BASH_REMATCH[1]}
  else
    fail "server '$name' started (first line: '$line')"
    head -n 20 "$WORK/$name.err" | sed "s/^/        /"
    return 1
  fi
}

# stop_server NAME: SIGTERM, then its exit status (124 if it hung for 20 s).
stop_server() {
  local pid=${PID[$1]} rc=0 _
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 200); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && return 124
  wait "$pid" || rc=$?
  return "$rc"
}

# exited_cleanly NAME RC: server NAME, stopped by stop_server with status RC,
# exited 0 and said "Shutting down." last.
exited_cleanly() {
  expect "$2" 0 "$1's exit status"
  expect "$(tail -n 1 "$WORK/$1.out")" "Shutting down." "$1's last line"
}

free_port() {
  deno eval 'const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    console.log(l.addr.port); l.close();'
}

# nginx_conf FILE: an nginx.conf whose pid, logs and temp files are all
# relative to its directory, with stdin as the inside of its http block.
nginx_conf() {
  {
    cat <<'EOF'
worker_processes 1;
pid nginx.pid;
error_log error.log warn;
events {
    worker_connections 64;
}
http {
    access_log access.log;
    client_body_temp_path client_body;
    proxy_temp_path proxy;
    fastcgi_temp_path fastcgi;
    uwsgi_temp_path uwsgi;
    scgi_temp_path scgi;

EOF
    cat
    echo "}"
  } >"$1"
}

# start_nginx DIR URL WHAT: nginx with DIR/nginx.conf (its paths relative to
# DIR, its logs in DIR), in the foreground of a background job, recorded as
# PID[nginx]; waits for a 200 from URL. If none comes, "nginx started and
# proxied WHAT" is a failure, shown with nginx's logs, and it returns 1.
start_nginx() {
  local dir=$1 url=$2 what=$3
  # As root, nginx's workers would run as nobody, who cannot enter our 0700
  # temp dir to read what the config names (a CA) or write proxy temp files.
  local globals="daemon off;"
  [ "$(id -u)" = 0 ] && globals="$globals user root;"
  timeout -k 5 300 nginx -p "$dir" -c "$dir/nginx.conf" -e stderr \
    -g "$globals" >"$dir/stderr.log" 2>&1 &
  PID[nginx]=$!
  PIDS+=("$!")
  local _ code
  for _ in $(seq 100); do # up to 10 s
    code=$(curl -s --max-time 2 -o /dev/null -w "%{http_code}" "$url" || true)
    [ "$code" = 200 ] && return 0
    kill -0 "${PID[nginx]}" 2>/dev/null || break
    sleep 0.1
  done
  fail "nginx started and proxied $what"
  cat "$dir/stderr.log" "$dir/error.log" 2>/dev/null | tail -n 20
  return 1
}

# chromium_run [FLAGS...] URL: headless Chromium with background networking,
# sync, component updates and QUIC off, so that the browser talks to our
# server and to nothing else, and a fresh profile each run.
chromium_run() {
  timeout 60 chromium --headless --no-sandbox --disable-gpu --disable-quic \
    --disable-background-networking --disable-component-update \
    --disable-sync --no-first-run \
    --user-data-dir="$(mktemp -d "$WORK/chromium.XXXXXX")" "$@"
}

# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

PASSED=0
FAILED=0
pass() {
  PASSED=$((PASSED + 1))
  echo "  ok    $*"
}
fail() {
  FAILED=$((FAILED + 1))
  echo "  FAIL  $*"
}
section() { printf '\n== %s\n' "$*"; }

# summary: the counts, and a status that fails if anything failed.
summary() {
  echo "$SUITE: $PASSED passed, $FAILED failed"
  [ "$FAILED" = 0 ]
}

# need_deno: every suite starts main.ts with deno; without it, the run ends.
need_deno() {
  command -v deno >/dev/null 2>&1 && return 0
  fail "deno not installed (npm install -g deno@2.9.6)"
  summary
  exit 1
}

# check NAME COMMAND...: one check. COMMAND runs in a subshell with errexit
# on, so its first failing command fails the check; its output is shown only
# then. (errexit is ignored inside `if`, `||` and `&&`, even in a subshell,
# hence the set +e dance instead of `if ( ... )`.)
check() {
  local name=$1 rc
  shift
  : >"$WORK/check.notes"
  set +e
  (
    set -e
    "$@"
  ) >"$WORK/check.out" 2>&1
  rc=$?
  set -e
  if [ "$rc" = 0 ]; then
    pass "$name"
  else
    fail "$name"
    tail -n 30 "$WORK/check.out" | cut -c 1-300 | sed "s/^/        /"
  fi
  sed "s/^/        /" "$WORK/check.notes"
}

# note TEXT: a line shown under the check whether it passes or fails.
note() { echo "$*" >>"$WORK/check.notes"; }

# have TOOL PACKAGE: is TOOL installed? In CI a missing tool is a failure
# (the tools are part of the contract); elsewhere a visible skip.
have() {
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "${CI:-}" = true ]; then
    fail "$1 not installed (apt-get install -y $2)"
  else
    echo "SKIP: $1 not installed (apt-get install -y $2)"
  fi
  return 1
}

# tap_results RC FILE: one pass or fail per top-level TAP test line of a
# test runner's output (deno test and node --test both speak TAP), with the
# runner's diagnostics under a failure. A runner that failed or ran nothing
# without a failing test to show for it is one more failure.
tap_results() {
  local rc=$1 file=$2 line name seen=0 bad=0 show=0
  while IFS= read -r line; do
    if [[ $line =~ ^(not\ )?ok\ [0-9]+\ -\ (.*)$ ]]; then
      name=${BASH_REMATCH[2]}
      show=0
      if [[ $name == *"# SKIP"* ]]; then
        echo "SKIP: ${name%% # SKIP*}"
      elif [ -n "${BASH_REMATCH[1]}" ]; then
        fail "$name"
        bad=1
        show=1
      else
        pass "$name"
      fi
      seen=1
    elif [ "$show" = 1 ] && [[ $line == " "* ]]; then
      echo "$line" | cut -c 1-300 | sed 's/^/      /'
    fi
  done <"$file"
  if [ "$seen" = 0 ] || { [ "$rc" != 0 ] && [ "$bad" = 0 ]; }; then
    fail "test runner exited $rc"
    tail -n 20 "$file" | sed 's/^/        /'
  fi
}

# ---------------------------------------------------------------------------
# Assertions for the checks
# ---------------------------------------------------------------------------

expect() { # expect ACTUAL WANTED WHAT
  [ "$1" = "$2" ] || {
    echo "$3: got '$1', wanted '$2'"
    return 1
  }
}

contains() { # contains FILE TEXT
  grep -qF -- "$2" "$1" || {
    echo "$(basename "$1") lacks '$2'; it begins:"
    head -c 600 "$1"
    echo
    return 1
  }
}

lacks() { # lacks FILE TEXT
  if grep -qF -- "$2" "$1"; then
    echo "$(basename "$1") has '$2'"
    return 1
  fi
}

same_bytes() { # same_bytes SENT RECEIVED
  cmp "$1" "$2" || {
    echo "sent $(wc -c <"$1") bytes, got back $(wc -c <"$2")"
    return 1
  }
}

# refuses_to_start TEXT COMMAND...: COMMAND, a server given a command line
# that cannot work, exits 2 with one line on stderr that names the problem
# (the line contains TEXT), and writes nothing on stdout: it never said
# "Listening". No stdin: deno must not prompt for a permission.
refuses_to_start() {
  local text=$1 rc=0
  shift
  timeout 30 "$@" </dev/null >"$WORK/refused.out" 2>"$WORK/refused.err" ||
    rc=$?
  note "stderr: $(head -c 300 "$WORK/refused.err")"
  expect "$rc" 2 "exit status"
  expect "$(grep -c '' "$WORK/refused.err")" 1 "lines on stderr"
  contains "$WORK/refused.err" "$text"
  expect "$(wc -c <"$WORK/refused.out" | tr -dc 0-9)" 0 "bytes on stdout"
}
