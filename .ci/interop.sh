#!/usr/bin/env bash
# Interop suite: real clients and a real proxy against the real server.
#
# The unit tests (main_test.ts) speak HTTP to the server with our own bytes;
# this script asks the tools people actually use whether they agree: curl,
# ApacheBench, wrk, Deno's and Node's fetch, node:http, headless Chromium,
# and nginx as reverse proxy / load balancer, including a rolling restart.
# Applications behind the server (.ci/apps/): streamed bodies both ways and
# Server-Sent Events through `--app`, and a real framework, Hono from npm,
# through both `--app` and `serve(app.fetch)`. WebSockets: an echo app and
# Hono's helper through `--app`, checked with Deno's, Node's and the ws
# package's clients, Chromium, and through nginx (.ci/websocket_test.ts).
# Compression on the way: curl (--compressed, and gzip -d or a brotli
# decoder on the raw bytes), Deno's fetch and Chromium against an app whose
# responses main.ts compresses (.ci/apps/compress_app.ts), the same with
# --no-compress, Server-Sent Events compressed, and --root files with and
# without a precompressed sibling.
#
#   bash .ci/interop.sh                       # from anywhere
#   CI=true bash .ci/interop.sh               # a missing tool is a failure
#   UPDATE_SCREENSHOT=1 bash .ci/interop.sh   # rewrite .ci/screenshot.png
#   KEEP_WORK=1 bash .ci/interop.sh           # keep the logs in $TMPDIR
#
# Tools (Debian packages): curl, apache2-utils (ab), wrk, nodejs (node),
# chromium, nginx-light (nginx), iproute2 (ss); deno comes from npm, and so
# do Hono (deno fetches npm:hono@4 into its cache on the first run) and ws
# (npm installs ws@8 into the temp dir on every run).
# Everything talks to 127.0.0.1 only, every command is bounded by `timeout`,
# and the whole run takes about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source .ci/lib.sh
# shellcheck source-path=SCRIPTDIR/..
source .ci/websocket_lib.sh
# As .ci/run does, for a run by hand too: deno checks for no updates.
export DENO_NO_UPDATE_CHECK=1
setup interop logs

# ---------------------------------------------------------------------------
# Servers (launch, stop_server, free_port: lib.sh)
# ---------------------------------------------------------------------------

# start_server NAME [FLAGS...]: main.ts with the book's routes; the checks
# cannot go on without it.
start_server() {
  local name=$1
  shift
  launch "$name" deno run --allow-net main.ts --port 0 "$@" || exit 1
}

# start_app NAME MODULE [FLAGS...]: main.ts serving MODULE with --app, which
# needs --allow-read to import it. (No deno.lock for the apps' npm: imports:
# deno.json says "lock": false, and the "work tree" section checks it.)
start_app() {
  local name=$1 app=$2
  shift 2
  launch "$name" deno run --allow-net --allow-read main.ts --port 0 \
    --app "$app" "$@"
}

# ---------------------------------------------------------------------------
# Assertions for the checks (the general ones: lib.sh)
# ---------------------------------------------------------------------------

# ab_clean LOG N: all N requests completed, none failed, all 2xx (ab prints
# "Non-2xx responses" only when there are some).
ab_clean() {
  if grep -Eq "^Complete requests: +$2\$" "$1" &&
    grep -Eq '^Failed requests: +0$' "$1" &&
    ! grep -q '^Non-2xx responses' "$1"; then
    return 0
  fi
  grep -E '^(Complete|Failed|Non-2xx|Keep-Alive) |^   \(|apr_|ab:' "$1"
  return 1
}

# count_hits LOG: access-log lines of requests for / answered with 200.
count_hits() { grep -c '"GET / HTTP/1.1" 200 ' "$1" || true; }

# field FILE NAME: the value of the header field NAME (any case) in the
# headers that curl -D wrote to FILE, its last one; empty if there is none.
field() { tr -d '\r' <"$1" | sed -n "s/^$2: *//Ip" | tail -n 1; }

# varies FILE: the headers in FILE have a Vary that names Accept-Encoding.
varies() {
  # (grep -q could quit before tr is done: a SIGPIPE, which pipefail sees)
  tr -d '\r' <"$1" | grep -Ei '^vary:(.*[ ,])?accept-encoding *(,|$)' \
    >/dev/null || {
    echo "no Vary: Accept-Encoding in $(basename "$1"):"
    cat "$1"
    return 1
  }
}

# decode CODING IN OUT: IN decoded, with a decoder that is not the server's
# and fails on a stream cut short: gzip -d, or for brotli (which Debian's
# gzip cannot read) Deno's DecompressionStream.
decode() {
  case $1 in
    gzip) gzip -dc <"$2" >"$3" ;;
    br)
      timeout 30 deno eval 'const [from, to] = Deno.args;
        const file = await Deno.open(from);
        await Deno.writeFile(to,
          file.readable.pipeThrough(new DecompressionStream("brotli")));' \
        "$2" "$3"
      ;;
    *) echo "decode: no decoder for $1" && return 1 ;;
  esac
}

# size FILE: its size in bytes.
size() { wc -c <"$1" | tr -dc 0-9; }

# ---------------------------------------------------------------------------
# The server under test, and test data
# ---------------------------------------------------------------------------

need_deno

section "server"
# A short /sleep so that the clients can test it without slowing the run.
start_server main --sleep-delay 0.2
BASE="http://127.0.0.1:${PORT[main]}"
echo "  $BASE/ (pid ${PID[main]})"

head -c 204800 /dev/urandom >"$WORK/small.bin"  # 200 KiB
head -c 921600 /dev/urandom >"$WORK/large.bin"  # 900 KiB, under --max-body
head -c 1153434 /dev/urandom >"$WORK/huge.bin"  # 1.1 MiB, over it

# ---------------------------------------------------------------------------
# Applications behind the server (.ci/apps/): the clients below check them
# alongside the book's routes. First, the modules --app must refuse.
# ---------------------------------------------------------------------------

# app_refused MODULE TEXT [DENO FLAGS...]: main.ts, run with DENO FLAGS, will
# not serve MODULE: one line on stderr that contains TEXT, exit 2, nothing
# listening (refuses_to_start).
app_refused() {
  local app=$1 text=$2
  shift 2
  refuses_to_start "$text" deno run "$@" main.ts --port 0 --app "$app"
}

section "apps"
check "--app a missing file: one line naming it, exit 2" \
  app_refused .ci/apps/missing.ts missing.ts --allow-net --allow-read
check "--app a module whose default export has no fetch: one line, exit 2" \
  app_refused .ci/apps/no_fetch.ts fetch --allow-net --allow-read
check "--app without --allow-read: one line naming the flag, exit 2" \
  app_refused .ci/apps/stream_app.ts --allow-read --allow-net

# Streams both ways and Server-Sent Events.
STREAM=""
if start_app stream .ci/apps/stream_app.ts; then
  STREAM="http://127.0.0.1:${PORT[stream]}"
  echo "  $STREAM/ --app .ci/apps/stream_app.ts (pid ${PID[stream]})"
fi

# Responses that main.ts compresses, and the same app with --no-compress.
COMPRESS=""
if start_app compress .ci/apps/compress_app.ts; then
  COMPRESS="http://127.0.0.1:${PORT[compress]}"
  echo "  $COMPRESS/ --app .ci/apps/compress_app.ts (pid ${PID[compress]})"
fi
COMPRESS_OFF=""
if start_app compress-off .ci/apps/compress_app.ts --no-compress; then
  COMPRESS_OFF="http://127.0.0.1:${PORT[compress-off]}"
  echo "  $COMPRESS_OFF/ the same, with --no-compress" \
    "(pid ${PID[compress-off]})"
fi

# Hono, from the npm registry: fetched into deno's cache here, bounded,
# rather than by a server while a client waits for it to start.
HONO_APP=""
HONO_SERVE=""
if timeout 180 deno cache .ci/apps/hono_app.ts \
  >"$WORK/hono-cache.log" 2>&1; then
  if start_app hono-app .ci/apps/hono_app.ts; then
    HONO_APP="http://127.0.0.1:${PORT[hono-app]}"
    echo "  $HONO_APP/ --app .ci/apps/hono_app.ts (pid ${PID[hono-app]})"
  fi
  if launch hono-serve deno run --allow-net .ci/apps/hono_serve.ts; then
    HONO_SERVE="http://127.0.0.1:${PORT[hono-serve]}"
    echo "  $HONO_SERVE/ serve(app.fetch) (pid ${PID[hono-serve]})"
  fi
else
  fail "deno cache npm:hono@4 (from the npm registry)"
  tail -n 20 "$WORK/hono-cache.log" | sed "s/^/        /"
fi

# ---------------------------------------------------------------------------
# curl: the reference client, one behaviour per check
# ---------------------------------------------------------------------------

# Options repeated after every --next, which resets them.
CURL=(-sS --max-time 20)
c() { timeout 30 curl "${CURL[@]}" "$@"; }

curl_get() {
  expect "$(c -o "$WORK/get.html" -w '%{http_code}' "$BASE/")" 200 status
  contains "$WORK/get.html" '<h1>Hello!</h1>'
}

# HEAD, then GET on the same connection: had the HEAD response carried a
# body, curl would read it as the GET's status line and fail.
curl_head() {
  local out
  out=$(c -I -o "$WORK/head.txt" "$BASE/" \
    --next "${CURL[@]}" -o "$WORK/after-head.html" \
    -w '%{http_code} %{num_connects}' "$BASE/")
  tr -d '\r' <"$WORK/head.txt" >"$WORK/head.hdr"
  expect "$(head -n 1 "$WORK/head.hdr")" "HTTP/1.1 200 OK" "status line"
  expect "$(grep -i '^content-length:' "$WORK/head.hdr" | tr -dc 0-9)" \
    "$(wc -c <"$WORK/get.html" | tr -dc 0-9)" "Content-Length vs GET's body"
  expect "$out" "200 0" "GET after HEAD: status, new connections"
  contains "$WORK/after-head.html" '<h1>Hello!</h1>'
}

# "Expect:" turns off curl's own Expect header: a plain Content-Length upload.
curl_echo() {
  expect "$(c --data-binary @"$WORK/small.bin" -H 'Expect:' \
    -H 'Content-Type: application/octet-stream' \
    -o "$WORK/echo.bin" -w '%{http_code}' "$BASE/echo")" 200 status
  same_bytes "$WORK/small.bin" "$WORK/echo.bin"
}

curl_chunked() {
  expect "$(c -v --data-binary @"$WORK/small.bin" -H 'Expect:' \
    -H 'Transfer-Encoding: chunked' -o "$WORK/chunked.bin" \
    -w '%{http_code}' "$BASE/echo" 2>"$WORK/chunked.verbose")" 200 status
  contains "$WORK/chunked.verbose" '> Transfer-Encoding: chunked'
  same_bytes "$WORK/small.bin" "$WORK/chunked.bin"
}

# HTTP/1.0 without keep-alive: each request gets its own connection.
curl_http10() {
  expect "$(c --http1.0 -o "$WORK/get10.html" -o /dev/null \
    -w '%{http_code} %{num_connects} ' "$BASE/" "$BASE/")" \
    "200 1 200 1 " "status, new connections (x2)"
  contains "$WORK/get10.html" '<h1>Hello!</h1>'
  expect "$(c --http1.0 --data-binary @"$WORK/small.bin" \
    -o "$WORK/echo10.bin" -w '%{http_code}' "$BASE/echo")" 200 "POST status"
  same_bytes "$WORK/small.bin" "$WORK/echo10.bin"
}

# The server must answer "100 Continue" itself: curl would otherwise wait out
# --expect100-timeout and send anyway, and the echo alone would still pass.
curl_expect() {
  expect "$(c -v --expect100-timeout 15 -H 'Expect: 100-continue' \
    --data-binary @"$WORK/large.bin" -o "$WORK/large.out" \
    -w '%{http_code}' "$BASE/echo" 2>"$WORK/expect.verbose")" 200 status
  contains "$WORK/expect.verbose" '< HTTP/1.1 100 Continue'
  same_bytes "$WORK/large.bin" "$WORK/large.out"
}

# One curl invocation, five requests of three kinds, one connection.
# (The server closes after any 4xx/5xx on purpose, so only 2xx here.)
curl_reuse() {
  expect "$(c -v -o /dev/null -o /dev/null -w '%{num_connects} ' \
    "$BASE/" "$BASE/" \
    --next "${CURL[@]}" -v --data-binary @"$WORK/small.bin" -H 'Expect:' \
    -o "$WORK/reuse.bin" -w '%{num_connects} ' "$BASE/echo" \
    --next "${CURL[@]}" -v -o /dev/null -w '%{num_connects} ' "$BASE/sleep" \
    --next "${CURL[@]}" -v -I -o /dev/null -w '%{num_connects}' "$BASE/" \
    2>"$WORK/reuse.verbose")" "1 0 0 0 0" "new connections per request"
  expect "$(grep -Ec 'Re-?using existing connection' "$WORK/reuse.verbose")" 4 \
    "curl's 'Re-using existing connection' lines"
  same_bytes "$WORK/small.bin" "$WORK/reuse.bin"
}

curl_404() {
  expect "$(c -o "$WORK/404.html" -w '%{http_code}' "$BASE/nope")" 404 status
  contains "$WORK/404.html" '<h1>Oops!</h1>'
}

curl_405() {
  expect "$(c -X DELETE -D "$WORK/405.hdr" -o /dev/null -w '%{http_code}' \
    "$BASE/")" 405 status
  contains "$WORK/405.hdr" 'Allow: GET, HEAD'
}

# Over --max-body both ways: announced with Expect (the server can refuse
# before the upload) and sent straight away (the server must read, or at
# least not reset, the rest; curl then still sees the 413).
curl_413() {
  expect "$(c -H 'Expect: 100-continue' --data-binary @"$WORK/huge.bin" \
    -o /dev/null -w '%{http_code}' "$BASE/echo")" 413 "status with Expect"
  expect "$(c -H 'Expect:' --data-binary @"$WORK/huge.bin" \
    -o /dev/null -w '%{http_code}' "$BASE/echo")" 413 "status without Expect"
}

# Server-Sent Events as `curl -N` shows them. The server sends event 2 only
# after /ack, which is requested only once curl has shown event 1: a server
# that held the stream back until its end fails here (it then sends event 1
# after a 5 s wait for the ack, together with "two, without an ack").
# curl_sse [CODING]: curl asks for that coding alone and decodes it
# (--compressed): the stream comes compressed, and each event must be
# flushed through the compressor as it is sent, or event 1 waits in it.
curl_sse() {
  local coding=${1:-} id="curl-$$-${1:-identity}" curl _ flags=()
  [ -n "$coding" ] && flags=(--compressed -H "Accept-Encoding: $coding")
  # Emptied here, not by the background job: no earlier run's event 1.
  : >"$WORK/sse.txt"
  rm -f "$WORK/sse.hdr"
  timeout 30 curl -sS -N --max-time 20 "${flags[@]}" -D "$WORK/sse.hdr" \
    "$STREAM/events?id=$id" >"$WORK/sse.txt" &
  curl=$!
  for _ in $(seq 100); do # up to 10 s
    grep -qx 'data: one' "$WORK/sse.txt" && break
    sleep 0.1
  done
  contains "$WORK/sse.txt" "data: one"
  kill -0 "$curl" 2>/dev/null || {
    echo "the stream had ended before the ack"
    return 1
  }
  expect "$(c "$STREAM/ack?id=$id")" acknowledged "/ack"
  wait "$curl"
  tr -d '\r' <"$WORK/sse.hdr" >"$WORK/sse.headers"
  grep -qix 'content-type: text/event-stream' "$WORK/sse.headers"
  grep -qix 'transfer-encoding: chunked' "$WORK/sse.headers"
  expect "$(field "$WORK/sse.hdr" content-encoding)" "$coding" \
    "Content-Encoding"
  cat >"$WORK/sse.expected" <<'EOF'
: a comment, which clients ignore

id: 1
data: one

id: 2
data: two, after the ack

id: 3
data: three
data: in two lines

event: done
data: bye

EOF
  diff -u "$WORK/sse.expected" "$WORK/sse.txt"
}

section "curl"
if have curl curl; then
  check "curl: GET / is 200 with the hello page" curl_get
  check "curl: HEAD / is 200 with Content-Length and no body" curl_head
  check "curl: POST /echo 200 KiB (Content-Length) byte for byte" curl_echo
  check "curl: POST /echo 200 KiB chunked byte for byte" curl_chunked
  check "curl: HTTP/1.0 GET and POST, no keep-alive" curl_http10
  check "curl: Expect: 100-continue, 900 KiB byte for byte" curl_expect
  check "curl: keep-alive reuse across 5 requests" curl_reuse
  check "curl: /nope is 404 with the Oops page" curl_404
  check "curl: DELETE / is 405 with Allow" curl_405
  check "curl: a 1.1 MiB body is 413" curl_413
  if [ -n "$STREAM" ]; then
    check "curl -N: Server-Sent Events arrive as they are sent" curl_sse
  fi
fi

# ---------------------------------------------------------------------------
# Compression: the app of .ci/apps/compress_app.ts, whose responses main.ts
# compresses on the way, decoded by curl itself and by other decoders; the
# same app with --no-compress; the SSE stream of the stream app, compressed
# ---------------------------------------------------------------------------

# What the app's responses main.ts compresses: three of known length, and
# /lines.txt, a stream of unknown length (sent chunked).
ZIPPED=(/ /app.js /books.json /lines.txt)
# What it must send as the app made it: too short, not a compressible type,
# Cache-Control: no-transform, a 206 with Content-Range, and a body the app
# gzipped itself (Content-Encoding: gzip already).
UNZIPPED=(/small.txt /logo.png /no-transform /part /encoded)

# zfile PATH: the base name of PATH's files in $WORK ("/" is z_).
zfile() { echo "$WORK/z$(echo "$1" | tr -c 'a-z0-9.\n' _)"; }

# The reference bytes: what a request without Accept-Encoding gets (curl
# sends the field only when told to), which must not be compressed.
compress_reference() {
  local path file
  for path in "${ZIPPED[@]}" "${UNZIPPED[@]}"; do
    file=$(zfile "$path")
    expect "$(c -D "$file.plain.hdr" -o "$file.plain" -w '%{http_code}' \
      "$COMPRESS$path")" "$([ "$path" = /part ] && echo 206 || echo 200)" \
      "GET $path: status"
    [ "$path" = /encoded ] && continue
    expect "$(field "$file.plain.hdr" content-encoding)" "" \
      "GET $path without Accept-Encoding: Content-Encoding"
  done
}

# curl --compressed offers every coding it can decode (here deflate, gzip,
# br, zstd), and decodes what comes: brotli is main.ts's first choice.
curl_compressed() {
  local path file want=gzip
  [[ $(curl -V) == *brotli* ]] && want=br
  for path in "${ZIPPED[@]}"; do
    file=$(zfile "$path")
    c --compressed -D "$file.curl.hdr" -o "$file.curl" "$COMPRESS$path"
    expect "$(field "$file.curl.hdr" content-encoding)" "$want" \
      "$path: Content-Encoding"
    varies "$file.curl.hdr"
    same_bytes "$file.plain" "$file.curl"
  done
}

# curl_raw CODING: asked for CODING alone, without --compressed, curl keeps
# the bytes as they came; another decoder (decode) must give back the
# reference bytes. A known length is sent with the compressed size as
# Content-Length, the stream chunked.
curl_raw() {
  local coding=$1 path file sizes=""
  for path in "${ZIPPED[@]}"; do
    file=$(zfile "$path")
    c -H "Accept-Encoding: $coding" -D "$file.$coding.hdr" \
      -o "$file.$coding" "$COMPRESS$path"
    expect "$(field "$file.$coding.hdr" content-encoding)" "$coding" \
      "$path: Content-Encoding"
    varies "$file.$coding.hdr"
    if [ "$path" = /lines.txt ]; then
      expect "$(field "$file.$coding.hdr" transfer-encoding)" chunked \
        "$path: Transfer-Encoding"
      expect "$(field "$file.$coding.hdr" content-length)" "" \
        "$path: Content-Length"
    else
      expect "$(field "$file.$coding.hdr" content-length)" \
        "$(size "$file.$coding")" "$path: Content-Length"
    fi
    decode "$coding" "$file.$coding" "$file.$coding.out"
    same_bytes "$file.plain" "$file.$coding.out"
    sizes+=" $path $(size "$file.plain") -> $(size "$file.$coding"),"
  done
  note "$coding:${sizes%,}"
}

# Asked for both codings, raw: each of these comes as the app made it,
# byte for byte; /encoded keeps the app's own gzip, compressed once.
curl_unzipped() {
  local path file
  for path in "${UNZIPPED[@]}"; do
    file=$(zfile "$path")
    c -H "Accept-Encoding: br, gzip" -D "$file.both.hdr" -o "$file.both" \
      "$COMPRESS$path"
    expect "$(field "$file.both.hdr" content-encoding)" \
      "$([ "$path" = /encoded ] && echo gzip)" "$path: Content-Encoding"
    same_bytes "$file.plain" "$file.both"
  done
  file=$(zfile /encoded)
  gzip -dc <"$file.both" >"$file.both.out"
  same_bytes "$(zfile /no-transform).plain" "$file.both.out"
}

# --no-compress: curl --compressed gets every response as it is.
curl_no_compress() {
  local path file
  for path in "${ZIPPED[@]}"; do
    file=$(zfile "$path")
    c --compressed -D "$file.off.hdr" -o "$file.off" "$COMPRESS_OFF$path"
    expect "$(field "$file.off.hdr" content-encoding)" "" \
      "$path: Content-Encoding"
    same_bytes "$file.plain" "$file.off"
  done
}

section "compression"
if have curl curl && [ -n "$COMPRESS" ]; then
  check "curl: without Accept-Encoding, nothing is compressed" \
    compress_reference
  check "curl --compressed: HTML, JS, JSON and a stream, the same bytes" \
    curl_compressed
  check "curl -H 'Accept-Encoding: gzip': gzip -d gives the same bytes" \
    curl_raw gzip
  check "curl -H 'Accept-Encoding: br': a brotli decoder, the same bytes" \
    curl_raw br
  check "curl: short, binary, no-transform, 206, encoded bodies as they are" \
    curl_unzipped
  if [ -n "$COMPRESS_OFF" ]; then
    check "curl --compressed against --no-compress: nothing is compressed" \
      curl_no_compress
  fi
fi
if have curl curl && [ -n "$STREAM" ]; then
  check "curl --compressed -N: gzip Server-Sent Events arrive as sent" \
    curl_sse gzip
  check "curl --compressed -N: brotli Server-Sent Events arrive as sent" \
    curl_sse br
fi

# ---------------------------------------------------------------------------
# Load generators: thousands of requests, none may fail
# ---------------------------------------------------------------------------

ab_run() { # ab_run LOG N [AB FLAGS...]: -r counts socket errors, not abort
  local log=$1 n=$2 rc=0
  shift 2
  timeout 60 ab -r -n "$n" "$@" "$BASE/" >"$log" 2>&1 || rc=$?
  note "$(grep -E "^Requests per second" "$log")"
  ab_clean "$log" "$n"
  expect "$rc" 0 "ab's exit status"
}

# ab -k speaks HTTP/1.0 with "Connection: Keep-Alive": every request must
# have been kept alive, or the server ignored the 1.0 keep-alive.
ab_keepalive() {
  ab_run "$WORK/ab-k.log" 5000 -c 20 -k
  expect "$(grep -E '^Keep-Alive requests:' "$WORK/ab-k.log" | tr -dc 0-9)" \
    5000 "Keep-Alive requests"
}

# wrk prints "Socket errors" and "Non-2xx or 3xx responses" only if any.
wrk_run() {
  local rc=0
  timeout 20 wrk -d 3 -c 20 -t 1 --timeout 5s "$BASE/" >"$WORK/wrk.log" 2>&1 ||
    rc=$?
  note "$(grep -E "requests in|Requests/sec" "$WORK/wrk.log" | xargs)"
  cat "$WORK/wrk.log"
  if grep -Eq "Socket errors|Non-2xx" "$WORK/wrk.log"; then return 1; fi
  grep -Eq '^ +[1-9][0-9]* requests in' "$WORK/wrk.log"
  expect "$rc" 0 "wrk's exit status"
}

section "ab, wrk"
if have ab apache2-utils; then
  check "ab -n 5000 -c 20: no failed or non-2xx request" \
    ab_run "$WORK/ab.log" 5000 -c 20
  check "ab -n 5000 -c 20 -k: no failure, all 5000 kept alive" ab_keepalive
fi
if have wrk wrk; then
  check "wrk -d 3 -c 20: no socket error, no non-2xx" wrk_run
fi

# ---------------------------------------------------------------------------
# Programmatic clients: Deno's fetch (.ci/interop_test.ts) and Node's fetch
# (undici) and node:http (below). Both runners report in TAP.
# ---------------------------------------------------------------------------

# Connection reuse is checked with ss: counting the client's established
# connections to the server port after each request, and their local port.
SS=1
if ! have ss iproute2; then SS=0; fi

section "deno fetch"
rc=0
# A server that did not start is named by an empty variable: its tests are
# ignored (its start was a failure already).
variables=(INTEROP_URL INTEROP_SS INTEROP_STREAM_URL INTEROP_HONO_APP_URL
  INTEROP_HONO_SERVE_URL INTEROP_COMPRESS_URL INTEROP_NO_COMPRESS_URL)
INTEROP_URL="$BASE/" INTEROP_SS=$SS INTEROP_STREAM_URL=$STREAM \
  INTEROP_HONO_APP_URL=$HONO_APP INTEROP_HONO_SERVE_URL=$HONO_SERVE \
  INTEROP_COMPRESS_URL=$COMPRESS INTEROP_NO_COMPRESS_URL=$COMPRESS_OFF \
  timeout 120 deno test --reporter=tap --allow-net=127.0.0.1 \
  --allow-env="$(IFS=,; echo "${variables[*]}")" --allow-run=ss \
  .ci/interop_test.ts >"$WORK/deno-test.log" 2>&1 || rc=$?
tap_results "$rc" "$WORK/deno-test.log"

# The Node client lives here rather than in its own file: it is a few tests,
# and Node cannot run the TypeScript file.
cat >"$WORK/node_test.mjs" <<'EOF'
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash, randomBytes, randomUUID } from "node:crypto";
import http from "node:http";
import { setTimeout as sleep } from "node:timers/promises";
import { test } from "node:test";

const base = new URL(process.env.INTEROP_URL);
const haveSs = process.env.INTEROP_SS !== "0";
const HELLO = "<h1>Hello!</h1>";

// Local ports of this machine's established connections to the server.
function clientPorts() {
  const args = ["-Htn", "state", "established", "dst", base.host];
  return execFileSync("ss", args, { encoding: "utf8" }).trim().split("\n")
    .filter((line) => line.length > 0)
    .map((line) => line.trim().split(/\s+/).at(-2));
}

// First, while fetch's global connection pool is still empty. Fails on a new
// connection per request (the local port changes) or on connections piling
// up (more than one at a time). Two undici habits shape it: it closes the
// connection after any HEAD on purpose (it sends "connection: close"), so
// there is no HEAD here; and it gives a connection back to its pool a turn
// of the event loop after the body ends, so a POST sent at once (which it
// never pipelines) would open a second connection: hence the short pause.
test("node fetch: sequential requests reuse one connection", {
  skip: !haveSs,
}, async () => {
  const seen = new Set();
  for (const [method, path, body] of [
    ["GET", "/"], ["POST", "/echo", "ping"], ["GET", "/sleep"], ["GET", "/"],
    ["POST", "/echo", "pong"], ["GET", "/"],
  ]) {
    const response = await fetch(new URL(path, base), { method, body });
    await response.arrayBuffer();
    await sleep(10);
    const ports = clientPorts();
    const what = `${method} ${path}`;
    assert.equal(ports.length, 1, `connections after ${what}: ${ports}`);
    seen.add(ports[0]);
  }
  assert.equal(seen.size, 1, `local ports used: ${[...seen]}`);
});

test("node fetch: GET / is the hello page", async () => {
  const response = await fetch(base);
  assert.equal(response.status, 200);
  assert.match(response.headers.get("content-type"), /^text\/html/);
  assert.ok((await response.text()).includes(HELLO));
});

test("node fetch: HEAD / has Content-Length and no body", async () => {
  const length = (await (await fetch(base)).arrayBuffer()).byteLength;
  const head = await fetch(base, { method: "HEAD" });
  assert.equal(head.status, 200);
  assert.equal(head.headers.get("content-length"), String(length));
  assert.equal((await head.arrayBuffer()).byteLength, 0);
});

test("node fetch: POST /echo returns 300 KiB byte for byte", async () => {
  const sent = randomBytes(300 * 1024);
  const response = await fetch(new URL("/echo", base), {
    method: "POST",
    body: sent,
  });
  assert.equal(response.status, 200);
  assert.ok(sent.equals(Buffer.from(await response.arrayBuffer())));
});

test("node fetch: /nope is 404, DELETE / is 405", async () => {
  const missing = await fetch(new URL("/nope", base));
  assert.equal(missing.status, 404);
  assert.ok((await missing.text()).includes("<h1>Oops!</h1>"));
  const wrong = await fetch(base, { method: "DELETE" });
  assert.equal(wrong.status, 405);
  assert.match(wrong.headers.get("allow"), /GET/);
  await wrong.arrayBuffer();
});

test("node fetch: /sleep answers after the 0.2 s delay", async () => {
  const started = performance.now();
  const response = await fetch(new URL("/sleep", base));
  assert.ok((await response.text()).includes(HELLO));
  const elapsed = performance.now() - started;
  assert.ok(elapsed >= 180 && elapsed < 3000, `after ${elapsed} ms`);
});

// node:http says itself whether a request went out on a reused socket.
function request(options, body) {
  return new Promise((resolve, reject) => {
    const req = http.request(new URL(options.path, base), options, (res) => {
      const chunks = [];
      res.on("data", (chunk) => chunks.push(chunk));
      res.on("end", () =>
        resolve({
          status: res.statusCode,
          body: Buffer.concat(chunks),
          reused: req.reusedSocket,
        }));
      res.on("error", reject);
    });
    req.on("error", reject);
    // Several writes and no Content-Length: node:http sends it chunked.
    for (let i = 0; body && i < body.length; i += 10000) {
      req.write(body.subarray(i, i + 10000));
    }
    req.end();
  });
}

test("node:http keep-alive agent: one socket, chunked echo", async () => {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  try {
    const sent = randomBytes(100 * 1024);
    const reused = [];
    for (const path of ["/", "/", "/echo", "/"]) {
      const method = path === "/echo" ? "POST" : "GET";
      const body = method === "POST" ? sent : undefined;
      const res = await request({ agent, method, path }, body);
      assert.equal(res.status, 200);
      if (method === "POST") assert.ok(sent.equals(res.body), "echo differs");
      reused.push(res.reused);
    }
    assert.deepEqual(reused, [false, true, true, true]);
  } finally {
    agent.destroy();
  }
});

// Streaming both ways, against .ci/apps/stream_app.ts behind main.ts (see
// its module doc): a second request says that the first part travelled
// before the rest was sent.
const stream = process.env.INTEROP_STREAM_URL &&
  new URL(process.env.INTEROP_STREAM_URL);

test("node fetch: a streamed upload reaches the handler as it is sent", {
  skip: !stream,
}, async () => {
  const id = `node-${randomUUID()}`;
  const chunks = Array.from({ length: 8 }, () => randomBytes(16 * 1024));
  let sent = 0;
  let seen = "";
  // Pulled only when fetch wants the next chunk (highWaterMark 0): the
  // second is not made until the handler has said it has the first.
  const body = new ReadableStream({
    async pull(controller) {
      if (sent === 1) {
        const answer = await fetch(new URL(`/seen?id=${id}`, stream));
        seen = `${answer.status} ${await answer.text()}`;
      } else if (sent > 1) {
        await sleep(20);
      }
      if (sent === chunks.length) controller.close();
      else controller.enqueue(chunks[sent++]);
    },
  }, { highWaterMark: 0 });
  const response = await fetch(new URL(`/upload?id=${id}`, stream), {
    method: "POST",
    body,
    duplex: "half",
  });
  const report = await response.json();
  assert.equal(response.status, 200);
  assert.equal(seen, "200 the handler has the first chunk\n");
  const all = Buffer.concat(chunks);
  assert.equal(report.bytes, all.length);
  assert.equal(report.sha256, createHash("sha256").update(all).digest("hex"));
  assert.ok(report.chunks >= 2, `the handler saw ${report.chunks} chunk(s)`);
});

test("node fetch: a streamed response arrives chunk by chunk", {
  skip: !stream,
}, async () => {
  const id = `node-${randomUUID()}`;
  const response = await fetch(new URL(`/ticks?id=${id}`, stream));
  assert.equal(response.status, 200);
  const reader = response.body.pipeThrough(new TextDecoderStream())
    .getReader();
  // The first line must come while the stream waits for our ack; a server
  // that held it back sends it only after the wait, with the rest.
  let text = "";
  while (!text.includes("\n")) {
    const { done, value } = await reader.read();
    if (done) break;
    text += value;
  }
  assert.equal(text, "tick 1\n", "what came before the ack");
  const ack = await fetch(new URL(`/ack?id=${id}`, stream));
  assert.equal(await ack.text(), "acknowledged\n");
  for (let part = await reader.read(); !part.done; part = await reader.read()) {
    text += part.value;
  }
  assert.equal(text, "tick 1\ntick 2 after the ack\n");
});
EOF

section "node fetch, node:http"
if have node nodejs; then
  rc=0
  INTEROP_URL="$BASE/" INTEROP_SS=$SS INTEROP_STREAM_URL=$STREAM \
    timeout 60 node --test \
    --test-reporter=tap "$WORK/node_test.mjs" >"$WORK/node-test.log" 2>&1 ||
    rc=$?
  tap_results "$rc" "$WORK/node-test.log"
fi

# ---------------------------------------------------------------------------
# A real browser: headless Chromium renders the page
# ---------------------------------------------------------------------------

# chromium_run (lib.sh) talks to our server and to nothing else.
chromium_dom() {
  chromium_run --dump-dom "$BASE/" >"$WORK/dom.html" 2>"$WORK/chromium.log"
  contains "$WORK/dom.html" '<h1>Hello!</h1>'
  contains "$WORK/dom.html" 'Hi from Deno'
}

# The committed screenshot (README) is rewritten only on request.
SHOT="$WORK/screenshot.png"
if [ "${UPDATE_SCREENSHOT:-}" = 1 ]; then SHOT="$PWD/.ci/screenshot.png"; fi

# A PNG of the requested size (signature, then the IHDR width and height).
chromium_screenshot() {
  rm -f "$SHOT"
  chromium_run --window-size=800,400 --screenshot="$SHOT" "$BASE/" \
    >"$WORK/screenshot.log" 2>&1
  expect "$(od -An -tx1 -N8 "$SHOT" | tr -d " ")" 89504e470d0a1a0a \
    "PNG signature"
  expect "$(od -An -tu4 --endian=big -j16 -N8 "$SHOT" | xargs)" "800 400" \
    "width height"
  note "$SHOT"
}

# EventSource in a real browser. The stream app's page lists each event in
# its DOM and acknowledges the first, which the server waits for before it
# sends the second; so "after the ack" shows that the browser had event 1
# while the stream was open. --virtual-time-budget lets the page's scripts
# run (up to 10 s on the page's clock) before the DOM is dumped.
chromium_events() {
  chromium_run --virtual-time-budget=10000 --dump-dom "$STREAM/sse.html" \
    >"$WORK/sse-dom.html" 2>"$WORK/chromium-sse.log"
  local events=(
    "1: one" "2: two, after the ack" "3: three / in two lines" "done: bye"
  )
  # All four, in order, and nothing else (such as an "error" item).
  contains "$WORK/sse-dom.html" \
    "<ol id=\"events\">$(printf '<li>%s</li>' "${events[@]}")</ol>" || {
    grep -o '<ol id="events">.*</ol>' "$WORK/sse-dom.html"
    return 1
  }
}

# A page whose HTML, script and JSON all come compressed (brotli: Chromium
# offers gzip, deflate, br, zstd): the script runs, fetches the JSON and
# lists the 200 books; and the page reads in Resource Timing that each of
# the three came smaller than it decoded to (see .ci/apps/compress_app.ts).
chromium_compressed() {
  chromium_run --virtual-time-budget=10000 --dump-dom "$COMPRESS/" \
    >"$WORK/books-dom.html" 2>"$WORK/chromium-books.log"
  note "$(grep -Eo '<p id="(page|script|json)">[^<]*' "$WORK/books-dom.html" |
    sed 's/.*">//' | paste -sd ';' | sed 's/;/; /g')"
  contains "$WORK/books-dom.html" '<p id="count">200 books, the last: Book 200'
  expect "$(grep -o '<li>' "$WORK/books-dom.html" | wc -l)" 200 "books listed"
  contains "$WORK/books-dom.html" \
    '<p id="encoding">books.json Content-Encoding: br</p>'
  contains "$WORK/books-dom.html" '<p id="page">/: compressed ('
  contains "$WORK/books-dom.html" '<p id="script">/app.js: compressed ('
  contains "$WORK/books-dom.html" '<p id="json">/books.json: compressed ('
}

section "chromium"
if have chromium chromium; then
  check "chromium: --dump-dom shows the hello page" chromium_dom
  check "chromium: 800x400 screenshot" chromium_screenshot
  if [ -n "$STREAM" ]; then
    check "chromium: EventSource events show in the DOM" chromium_events
  fi
  if [ -n "$COMPRESS" ]; then
    check "chromium: a page with compressed HTML, script and JSON renders" \
      chromium_compressed
  fi
fi

# ---------------------------------------------------------------------------
# WebSockets: the echo app of .ci/apps/ws_echo_app.ts and Hono's helper
# behind --app, through Deno's, Node's and the ws package's clients, headless
# Chromium and an nginx proxy (.ci/websocket_test.ts)
# ---------------------------------------------------------------------------

# nginx passes the upgrade on only when told to: HTTP/1.1 upstream, and the
# Upgrade and Connection headers, which are hop-by-hop, set again.
ws_nginx_start() {
  local port dir="$WORK/ws-nginx"
  port=$(free_port)
  mkdir -p "$dir"
  nginx_conf "$dir/nginx.conf" <<EOF
    map \$http_upgrade \$connection_upgrade {
        default upgrade;
        '' close;
    }

    server {
        listen 127.0.0.1:$port;

        location / {
            proxy_pass http://127.0.0.1:${PORT[ws-echo]};
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
        }
    }
EOF
  WS_NGINX="http://127.0.0.1:$port"
  start_nginx "$dir" "$WS_NGINX/" "GET / to the echo app (port $port)"
}

section "websocket"
WS=""
if start_app ws-echo .ci/apps/ws_echo_app.ts; then
  WS="http://127.0.0.1:${PORT[ws-echo]}"
  echo "  $WS/ --app .ci/apps/ws_echo_app.ts (pid ${PID[ws-echo]})"
fi
# The same app with the WebSocket flags set low, to see them take effect.
WS_LIMITED=""
if start_app ws-limited .ci/apps/ws_echo_app.ts --ws-max-message 1000 \
  --ws-idle-timeout 0.5 --no-compress; then
  WS_LIMITED="http://127.0.0.1:${PORT[ws-limited]}"
  echo "  $WS_LIMITED/ the same, with --ws-max-message 1000" \
    "--ws-idle-timeout 0.5 --no-compress"
fi
# Hono is in deno's cache already, unless the "apps" section failed to fetch
# it; then this says so once more, rather than a server timing out.
HONO_WS=""
if timeout 180 deno cache .ci/apps/hono_ws_app.ts \
  >"$WORK/hono-ws-cache.log" 2>&1; then
  if start_app hono-ws .ci/apps/hono_ws_app.ts; then
    HONO_WS="http://127.0.0.1:${PORT[hono-ws]}"
    echo "  $HONO_WS/ --app .ci/apps/hono_ws_app.ts (pid ${PID[hono-ws]})"
  fi
else
  fail "deno cache npm:hono@4/deno (from the npm registry)"
  tail -n 20 "$WORK/hono-ws-cache.log" | sed "s/^/        /"
fi
WS_NGINX=""
if [ -n "$WS" ] && have nginx nginx-light && ws_nginx_start; then
  echo "  $WS_NGINX/ -> $WS/"
fi
ws_package
if [ -n "$WS$HONO_WS" ]; then
  ws_tests WS_URL="$WS" WS_HONO_URL="$HONO_WS" WS_NGINX_URL="$WS_NGINX" \
    WS_LIMITED_URL="$WS_LIMITED"
fi
if [ -n "$WS" ]; then
  check "access log: one 101 line per upgrade" ws_logged ws-echo "$WS"
fi
if [ -n "$WS_NGINX" ]; then
  stop_server nginx || true
fi

# ---------------------------------------------------------------------------
# nginx: reverse proxy and load balancer over two instances, then a rolling
# restart under load
# ---------------------------------------------------------------------------

nginx_start() {
  start_server up1
  start_server up2
  NGINX_PORT=$(free_port)
  NGX="$WORK/nginx"
  mkdir -p "$NGX"
  # .ci/nginx.conf is the README's example; only its three ports change.
  sed -e "s/server 127\.0\.0\.1:7878;/server 127.0.0.1:${PORT[up1]};/" \
    -e "s/server 127\.0\.0\.1:7879;/server 127.0.0.1:${PORT[up2]};/" \
    -e "s/listen 127\.0\.0\.1:8080;/listen 127.0.0.1:$NGINX_PORT;/" \
    .ci/nginx.conf >"$NGX/nginx.conf"
  local port
  for port in "${PORT[up1]}" "${PORT[up2]}" "$NGINX_PORT"; do
    grep -q "127\.0\.0\.1:$port;" "$NGX/nginx.conf" || {
      fail "nginx.conf: a port placeholder (7878, 7879, 8080) is missing"
      return 1
    }
  done
  NGINX="http://127.0.0.1:$NGINX_PORT/"
  start_nginx "$NGX" "$NGINX" "GET / (port $NGINX_PORT)"
}

nginx_load() {
  local rc=0
  timeout 60 ab -r -k -n 2000 -c 20 "$NGINX" >"$WORK/nginx-ab.log" 2>&1 ||
    rc=$?
  note "$(grep -E "^Requests per second" "$WORK/nginx-ab.log")"
  ab_clean "$WORK/nginx-ab.log" 2000
  expect "$rc" 0 "ab's exit status"
}

# Round robin: each instance's access log shows about half of the requests.
# (The log is written in batches, at most a quarter second late.)
nginx_balance() {
  local a b _
  for _ in $(seq 30); do
    a=$(count_hits "$WORK/up1.out")
    b=$(count_hits "$WORK/up2.out")
    [ $((a + b)) -ge 2000 ] && break
    sleep 0.1
  done
  note "instance 1 served $a, instance 2 served $b"
  [ $((a + b)) -ge 2000 ] && [ $((a * 5)) -ge $((a + b)) ] &&
    [ $((b * 5)) -ge $((a + b)) ]
}

# Upstream keep-alive works: after the load nginx still holds idle
# connections to the instances (the server's idle timeout is 5 s), at most
# the 16 of "keepalive 16" (a cache shared by both instances, so one of them
# may hold all 16).
nginx_keepalive() {
  local a b
  a=$(ss -Htn state established dst "127.0.0.1:${PORT[up1]}" | wc -l)
  b=$(ss -Htn state established dst "127.0.0.1:${PORT[up2]}" | wc -l)
  note "idle nginx connections: $a to instance 1, $b to instance 2"
  [ $((a + b)) -ge 1 ] && [ $((a + b)) -le 16 ]
}

# The rolling restart: SIGTERM instance 1 one second into a ~3 s load through
# nginx. The instance closes its idle keep-alive connections at once, refuses
# new ones and finishes what is in flight; nginx must retry whatever met a
# closed or refused connection on instance 2, so that its clients see no
# error at all. This part runs in the script's own shell, not in a check's
# subshell, because only the parent can wait for a child's exit status.
nginx_rolling_load() {
  local rps
  rps=$(awk '/^Requests per second:/ { print int($4) }' "$WORK/nginx-ab.log")
  ROLL_N=$((${rps:-0} * 3)) # about 3 s at the first run's rate
  [ "$ROLL_N" -lt 3000 ] && ROLL_N=3000
  [ "$ROLL_N" -gt 60000 ] && ROLL_N=60000
  timeout 60 ab -r -k -n "$ROLL_N" -c 10 "$NGINX" >"$WORK/roll-ab.log" 2>&1 &
  local ab=$!
  PIDS+=("$ab")
  sleep 1
  ROLL_MIDWAY=0
  kill -0 "$ab" 2>/dev/null && ROLL_MIDWAY=1
  ROLL_RC=0
  stop_server up1 || ROLL_RC=$?
  ROLL_AB_RC=0
  wait "$ab" || ROLL_AB_RC=$?
}

nginx_rolling_verify() {
  note "$ROLL_N requests; instance 1 exited $ROLL_RC, ab $ROLL_AB_RC;" \
    "nginx logged:"
  # What nginx absorbed: refused connects and broken keep-alive connections
  # that it retried on the other instance.
  grep -E '\[(error|warn)\]' "$NGX/error.log" |
    sed -E 's/^[^]]*\] [0-9#]+: \*[0-9]+ //; s/, client:.*//' |
    sort | uniq -c | sort -rn | head -n 8 >>"$WORK/check.notes" || true
  expect "$ROLL_MIDWAY" 1 "load still running at the SIGTERM"
  ab_clean "$WORK/roll-ab.log" "$ROLL_N"
  expect "$ROLL_AB_RC" 0 "ab's exit status"
  expect "$ROLL_RC" 0 "instance 1's exit status"
  contains "$WORK/up1.out" "Shutting down."
}

section "nginx"
if have nginx nginx-light && command -v ab >/dev/null && nginx_start; then
  echo "  $NGINX -> 127.0.0.1:${PORT[up1]}, 127.0.0.1:${PORT[up2]}"
  check "nginx: ab -n 2000 -c 20 -k through the proxy, no failure" nginx_load
  check "nginx: both instances served a fair share" nginx_balance
  if [ "$SS" = 1 ]; then
    check "nginx: keeps idle keep-alive connections upstream" nginx_keepalive
  fi
  nginx_rolling_load
  check "nginx: rolling restart (SIGTERM one instance under load), no failure" \
    nginx_rolling_verify
fi

# ---------------------------------------------------------------------------
# Graceful shutdown of the server that every client above used
# ---------------------------------------------------------------------------

MAIN_RC=0
stop_server main || MAIN_RC=$?

# The application servers that started, the same way.
APPS=()
declare -A APP_RC
for name in stream compress compress-off hono-app hono-serve ws-echo \
  ws-limited hono-ws; do
  [ -n "${PORT[$name]:-}" ] || continue
  APPS+=("$name")
  APP_RC[$name]=0
  stop_server "$name" || APP_RC[$name]=$?
done

apps_shutdown() {
  local name
  for name in "${APPS[@]}"; do
    exited_cleanly "$name" "${APP_RC[$name]}"
  done
}

# Anything on a server's stderr is an uncaught error or a warning.
quiet_stderr() {
  local name
  for name in main up1 up2 stream compress compress-off hono-app hono-serve \
    ws-echo ws-limited hono-ws files; do
    if [ -s "$WORK/$name.err" ]; then
      echo "$name.err:"
      head -n 20 "$WORK/$name.err"
      return 1
    fi
  done
}

section "--root with --workers: files, compressed or not"
# Each worker makes its own handler: every one must serve the files, not the
# book's pages. New connections spread over the workers (reusePort).
# Compression: page.html has no precompressed sibling, data.json has a
# data.json.gz (gzip -9, which names the file in its header: not what the
# server would make on the way).
mkdir -p "$WORK/site"
printf 'a file\n' >"$WORK/site/a.txt"
for i in $(seq 60); do
  echo "<p>Paragraph $i of a page that compresses well.</p>"
done >"$WORK/site/page.html"
seq 400 | sed 's/.*/{"n": &, "name": "item &"}/' | paste -sd , |
  sed 's/^/[/; s/$/]/' >"$WORK/site/data.json"
gzip -9 -k "$WORK/site/data.json"
files_everywhere() {
  local i
  for i in $(seq 20); do
    expect "$(curl -sS --max-time 5 "http://127.0.0.1:${PORT[files]}/a.txt")" \
      "a file" "GET /a.txt, connection $i"
  done
}

# No sibling: compressed on the way, brotli for curl --compressed and gzip
# when asked for it alone (gzip -d decodes it), with a weak ETag (RFC 9110
# §8.8.3.3: the strong one names the file's own bytes).
files_compressed() {
  local url="http://127.0.0.1:${PORT[files]}/page.html" want=gzip
  [[ $(curl -V) == *brotli* ]] && want=br
  c --compressed -D "$WORK/page.curl.hdr" -o "$WORK/page.curl" "$url"
  expect "$(field "$WORK/page.curl.hdr" content-encoding)" "$want" \
    "curl --compressed: Content-Encoding"
  varies "$WORK/page.curl.hdr"
  same_bytes "$WORK/site/page.html" "$WORK/page.curl"
  c -H 'Accept-Encoding: gzip' -D "$WORK/page.gz.hdr" -o "$WORK/page.gz" "$url"
  expect "$(field "$WORK/page.gz.hdr" content-encoding)" gzip \
    "Accept-Encoding: gzip: Content-Encoding"
  varies "$WORK/page.gz.hdr"
  expect "$(field "$WORK/page.gz.hdr" content-length)" \
    "$(size "$WORK/page.gz")" "Content-Length"
  [[ $(field "$WORK/page.gz.hdr" etag) == W/\"* ]] || {
    echo "ETag of the compressed file: $(field "$WORK/page.gz.hdr" etag)"
    return 1
  }
  decode gzip "$WORK/page.gz" "$WORK/page.gunzipped"
  same_bytes "$WORK/site/page.html" "$WORK/page.gunzipped"
  note "page.html: $(size "$WORK/site/page.html") bytes;" \
    "$want $(field "$WORK/page.curl.hdr" content-length);" \
    "gzip $(size "$WORK/page.gz")"
}

# A .gz sibling: a client that accepts gzip gets the sibling's own bytes.
files_sibling() {
  local url="http://127.0.0.1:${PORT[files]}/data.json"
  c -H 'Accept-Encoding: gzip' -D "$WORK/data.gz.hdr" -o "$WORK/data.gz" "$url"
  expect "$(field "$WORK/data.gz.hdr" content-encoding)" gzip \
    "Content-Encoding"
  varies "$WORK/data.gz.hdr"
  same_bytes "$WORK/site/data.json.gz" "$WORK/data.gz"
  c --compressed -H 'Accept-Encoding: gzip' -o "$WORK/data.curl" "$url"
  same_bytes "$WORK/site/data.json" "$WORK/data.curl"
}

# A Range request gets the bytes asked for of the file as it is: a 206 is
# never compressed on the way, whatever the client accepts.
files_range() {
  local url="http://127.0.0.1:${PORT[files]}/page.html"
  expect "$(c -H 'Accept-Encoding: br, gzip' -H 'Range: bytes=100-299' \
    -D "$WORK/range.hdr" -o "$WORK/range.out" -w '%{http_code}' "$url")" \
    206 status
  expect "$(field "$WORK/range.hdr" content-encoding)" "" "Content-Encoding"
  expect "$(field "$WORK/range.hdr" content-range)" \
    "bytes 100-299/$(size "$WORK/site/page.html")" "Content-Range"
  head -c 300 "$WORK/site/page.html" | tail -c 200 >"$WORK/range.expected"
  same_bytes "$WORK/range.expected" "$WORK/range.out"
}

# HEAD: the fields GET would have (RFC 9110 §9.3.2), so the GET's
# Content-Encoding and Vary, and no Content-Length (the compressed size is
# not known without compressing).
files_head() {
  local url="http://127.0.0.1:${PORT[files]}/page.html"
  c -I -H 'Accept-Encoding: gzip' -o "$WORK/page-head.hdr" "$url"
  note "HEAD, Accept-Encoding: gzip: $(tr -d '\r' <"$WORK/page-head.hdr" |
    grep -Ei '^(content-(encoding|length)|vary|etag):' | paste -sd ';' |
    sed 's/;/; /g')"
  expect "$(field "$WORK/page-head.hdr" content-encoding)" gzip \
    "Content-Encoding"
  varies "$WORK/page-head.hdr"
  expect "$(field "$WORK/page-head.hdr" content-length)" "" "Content-Length"
}

# A browser revalidates with the weak ETag it got: the file is unchanged.
files_revalidate() {
  local url="http://127.0.0.1:${PORT[files]}/page.html" etag
  c -H 'Accept-Encoding: gzip' -D "$WORK/revalidate.hdr" -o /dev/null "$url"
  etag=$(field "$WORK/revalidate.hdr" etag)
  note "ETag: $etag"
  expect "$(c -H 'Accept-Encoding: gzip' -H "If-None-Match: $etag" \
    -o /dev/null -w '%{http_code}' "$url")" 304 "If-None-Match: $etag"
}

if launch files deno run --allow-net --allow-read="$WORK/site,main.ts" \
  --unstable-net main.ts --port 0 --quiet --workers 2 --root "$WORK/site"; then
  check "--root --workers 2: every connection gets the file" files_everywhere
  check "--root: a file without a sibling is compressed (curl, gzip -d)" \
    files_compressed
  check "--root: a file with a .gz sibling gets the sibling's bytes" \
    files_sibling
  check "--root: a Range request gets identity" files_range
  check "--root: HEAD has GET's Content-Encoding and Vary, no Content-Length" \
    files_head
  check "--root: the compressed file's weak ETag revalidates (304)" \
    files_revalidate
  FILES_RC=0
  stop_server files || FILES_RC=$?
  check "--root --workers 2: SIGTERM, 'Shutting down.', exit 0" \
    exited_cleanly files "$FILES_RC"
fi

section "work tree"
# The apps' npm: imports (Hono) were resolved with deno.json's "lock": false:
# no deno.lock anywhere in the project, where git status would show it.
no_lockfile() {
  local found
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    found=$(git status --porcelain --ignored --untracked-files=all |
      grep -E '[ /]deno\.lock$' || true)
  else
    found=$(find . -name deno.lock -not -path './.git/*')
  fi
  expect "$found" "" "deno.lock in the work tree"
}
check "no deno.lock written into the project by the apps' npm: imports" \
  no_lockfile

section "shutdown"
check "SIGTERM: the server says 'Shutting down.' and exits 0" \
  exited_cleanly main "$MAIN_RC"
if [ "${#APPS[@]}" -gt 0 ]; then
  check "SIGTERM: the app servers say 'Shutting down.' and exit 0" \
    apps_shutdown
fi
check "no server wrote to stderr" quiet_stderr

echo
summary
