#!/usr/bin/env bash
# HTTPS suite (issue 10): real TLS clients and a real proxy against the real
# server started with --cert and --key.
#
# main_test.ts speaks TLS to the server with Deno's own client; this script
# asks the others whether they agree: curl, openssl s_client, Deno's fetch,
# Node's https and fetch, headless Chromium, and nginx as a reverse proxy
# that verifies its HTTPS upstream; and WebSockets over TLS (wss://) with
# Deno's, Node's and the ws package's clients and Chromium
# (.ci/websocket_test.ts). It also checks --redirect-http and the command
# line's refusals (one line, exit 2, nothing listening).
#
#   bash .ci/tls.sh               # from anywhere
#   CI=true bash .ci/tls.sh       # a missing tool is a failure
#   KEEP_WORK=1 bash .ci/tls.sh   # keep the certificates and logs
#
# Tools (Debian packages): openssl, curl, nodejs (node), chromium,
# nginx-light (nginx), iproute2 (ss); deno comes from npm, and so does ws
# (npm installs ws@8 into the temp dir on every run). A fresh test CA
# and a `localhost` certificate are made with openssl in a temp dir on every
# run. Everything talks to 127.0.0.1 only and every command is bounded by
# `timeout`; the run takes well under a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source .ci/lib.sh
# shellcheck source-path=SCRIPTDIR/..
source .ci/websocket_lib.sh
# As .ci/run does, for a run by hand too: deno checks for no updates.
export DENO_NO_UPDATE_CHECK=1
setup tls "certificates and logs"
SCHEME=https

# start_server NAME [FLAGS...]: launch (lib.sh) for an HTTPS instance with
# the test certificate; the checks cannot go on without it. It may read the
# certificate and the key, and nothing else: that is all it needs.
start_server() {
  local name=$1
  shift
  launch "$name" deno run --allow-net --allow-read="$CERT,$KEY" main.ts \
    --port 0 --cert "$CERT" --key "$KEY" "$@" || exit 1
}

# ---------------------------------------------------------------------------
# A test CA and a certificate for localhost, fresh on every run
# ---------------------------------------------------------------------------

need_deno

section "certificates"
if ! have openssl openssl; then
  # Without a certificate there is nothing to serve.
  summary
  exit
fi

CA="$WORK/ca.crt"
CERT="$WORK/localhost.crt"
KEY="$WORK/localhost.key"

# The README's recipe: a CA (basicConstraints CA:TRUE, allowed to sign
# certificates), and a leaf for localhost and 127.0.0.1 — names a client
# checks in subjectAltName (RFC 6125 §6.4), never in the CN — that is not a
# CA, as rustls requires of a server's own certificate. ECDSA P-256 keys.
make_certificates() {
  local ssl=(timeout 30 openssl)
  "${ssl[@]}" req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$WORK/ca.key" -out "$CA" -days 1 -subj "/CN=tls.sh test CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign"
  "${ssl[@]}" req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$KEY" -out "$WORK/localhost.csr" -subj "/CN=localhost"
  printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" >"$WORK/localhost.ext"
  "${ssl[@]}" x509 -req -in "$WORK/localhost.csr" -CA "$CA" \
    -CAkey "$WORK/ca.key" -set_serial "0x$(openssl rand -hex 16)" -days 1 \
    -extfile "$WORK/localhost.ext" -out "$CERT"
  # A key of no certificate here, and a file that is no PEM at all.
  "${ssl[@]}" genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
    -out "$WORK/other.key"
  echo "not a certificate" >"$WORK/junk.pem"
  "${ssl[@]}" verify -CAfile "$CA" "$CERT"
}
check "openssl: a test CA and a certificate for localhost" make_certificates
[ -s "$CERT" ] || exit 1

# ---------------------------------------------------------------------------
# The command line refuses what cannot work, before anything listens
# ---------------------------------------------------------------------------

# refused WHAT [FLAGS...]: the server, given FLAGS, exits 2 with one line on
# stderr that names WHAT, and listens on nothing (refuses_to_start).
refused() {
  local what=$1
  shift
  refuses_to_start "$what" \
    deno run --allow-net --allow-read="$WORK" main.ts --port 0 "$@"
}

# Read access to the key only: the certificate is unreadable.
refused_unreadable() {
  refuses_to_start "$CERT" deno run --allow-net --allow-read="$KEY" main.ts \
    --port 0 --cert "$CERT" --key "$KEY"
}

section "refusals"
check "--cert without --key: one line, exit 2" refused --key --cert "$CERT"
check "--key without --cert: one line, exit 2" refused --cert --key "$KEY"
check "a missing --cert file: one line, exit 2" \
  refused "$WORK/nope.crt" --cert "$WORK/nope.crt" --key "$KEY"
check "a --cert that is no PEM: one line, exit 2" \
  refused "$WORK/junk.pem" --cert "$WORK/junk.pem" --key "$KEY"
check "a certificate and a key that do not match: one line, exit 2" \
  refused "$WORK/other.key" --cert "$CERT" --key "$WORK/other.key"
check "a certificate it may not read: one line, exit 2" refused_unreadable
check "--redirect-http without --cert: one line, exit 2" \
  refused --redirect-http --redirect-http 0

# ---------------------------------------------------------------------------
# The server under test
# ---------------------------------------------------------------------------

section "server"
REDIRECT_PORT=$(free_port)
start_server main --sleep-delay 0.2 --redirect-http "$REDIRECT_PORT"
P=${PORT[main]}
BASE="https://localhost:$P"
echo "  $BASE/ (pid ${PID[main]})"
echo "  http://127.0.0.1:$REDIRECT_PORT/ redirects to it"

head -c 204800 /dev/urandom >"$WORK/small.bin" # 200 KiB

# ---------------------------------------------------------------------------
# curl
# ---------------------------------------------------------------------------

# localhost resolves to 127.0.0.1 here whatever /etc/hosts says (::1 first,
# on some machines): the server listens on 127.0.0.1 only.
CURL=(-sS --max-time 20 --cacert "$CA" --resolve "localhost:$P:127.0.0.1")
c() { timeout 30 curl "${CURL[@]}" "$@"; }

# curl offers http/1.1 by ALPN and says what the server chose.
curl_get() {
  expect "$(c -v --http1.1 -o "$WORK/get.html" \
    -w '%{http_code} %{http_version}' "$BASE/" 2>"$WORK/get.verbose")" \
    "200 1.1" "status, version"
  contains "$WORK/get.html" '<h1>Hello!</h1>'
  grep -E 'ALPN.*(server accepted|accepted to use).*http/1\.1' \
    "$WORK/get.verbose" || {
    grep -E 'ALPN|SSL connection' "$WORK/get.verbose"
    return 1
  }
  note "$(grep -E 'SSL connection using' "$WORK/get.verbose" | sed 's/^\* //')"
}

# Offered h2 first, as browsers do, the server still picks http/1.1.
curl_h2_offered() {
  expect "$(c -v --http2 -o /dev/null -w '%{http_code} %{http_version}' \
    "$BASE/" 2>"$WORK/h2.verbose")" "200 1.1" "status, version"
  grep -E 'ALPN.*offers h2' "$WORK/h2.verbose" >/dev/null
}

# The certificate's other name, and TLS 1.2 as well as 1.3.
curl_ip_tls12() {
  expect "$(c -v --tlsv1.2 --tls-max 1.2 -o /dev/null -w '%{http_code}' \
    "https://127.0.0.1:$P/" 2>"$WORK/tls12.verbose")" 200 status
  contains "$WORK/tls12.verbose" 'SSL connection using TLSv1.2'
}

# Without the CA, curl must refuse: the trust above came from --cacert.
curl_untrusted() {
  local rc=0
  timeout 30 curl -sS --max-time 20 --resolve "localhost:$P:127.0.0.1" \
    -o /dev/null "$BASE/" 2>"$WORK/untrusted.err" || rc=$?
  expect "$rc" 60 "curl's exit status (60: peer certificate not trusted)"
}

# Keep-alive over TLS: GET, GET, POST 200 KiB, /sleep on one connection.
curl_reuse() {
  expect "$(c -o /dev/null -o /dev/null -w '%{num_connects} ' \
    "$BASE/" "$BASE/" \
    --next "${CURL[@]}" --data-binary @"$WORK/small.bin" -H 'Expect:' \
    -o "$WORK/reuse.bin" -w '%{num_connects} ' "$BASE/echo" \
    --next "${CURL[@]}" -o /dev/null -w '%{num_connects}' "$BASE/sleep")" \
    "1 0 0 0" "new connections per request"
  same_bytes "$WORK/small.bin" "$WORK/reuse.bin"
}

curl_expect() {
  expect "$(c -v -H 'Expect: 100-continue' --expect100-timeout 15 \
    --data-binary @"$WORK/small.bin" -o "$WORK/expect.bin" \
    -w '%{http_code}' "$BASE/echo" 2>"$WORK/expect.verbose")" 200 status
  contains "$WORK/expect.verbose" '< HTTP/1.1 100 Continue'
  same_bytes "$WORK/small.bin" "$WORK/expect.bin"
}

section "curl"
if have curl curl; then
  check "curl --cacert: GET / is the hello page, ALPN http/1.1" curl_get
  check "curl --http2: offered h2 and http/1.1, served HTTP/1.1" \
    curl_h2_offered
  check "curl: https://127.0.0.1 (IP SAN) over TLS 1.2" curl_ip_tls12
  check "curl without --cacert: refused, exit 60" curl_untrusted
  check "curl: four requests, one TLS connection, echo byte for byte" \
    curl_reuse
  check "curl: 100 Continue over TLS" curl_expect
fi

# ---------------------------------------------------------------------------
# openssl s_client: the protocol version, ALPN and verification, spelled out
# ---------------------------------------------------------------------------

# s_client VERSION_FLAG: one GET with Connection: close; -ign_eof keeps
# s_client reading until the server closes.
s_client() {
  printf 'GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' |
    timeout 20 openssl s_client -connect "127.0.0.1:$P" -servername localhost \
      -verify_hostname localhost -CAfile "$CA" -verify_return_error \
      -alpn http/1.1 -ign_eof "$1" >"$WORK/s_client$1.out" 2>&1
}

s_client_tls13() {
  s_client -tls1_3
  grep -E '^ *Protocol *: TLSv1\.3$' "$WORK/s_client-tls1_3.out"
  contains "$WORK/s_client-tls1_3.out" 'ALPN protocol: http/1.1'
  contains "$WORK/s_client-tls1_3.out" 'Verify return code: 0 (ok)'
  contains "$WORK/s_client-tls1_3.out" 'HTTP/1.1 200 OK'
  contains "$WORK/s_client-tls1_3.out" '<h1>Hello!</h1>'
  note "$(grep -E '^New, ' "$WORK/s_client-tls1_3.out")"
}

s_client_tls12() {
  s_client -tls1_2
  grep -E '^ *Protocol *: TLSv1\.2$' "$WORK/s_client-tls1_2.out"
  contains "$WORK/s_client-tls1_2.out" 'ALPN protocol: http/1.1'
  contains "$WORK/s_client-tls1_2.out" 'Verify return code: 0 (ok)'
  contains "$WORK/s_client-tls1_2.out" 'HTTP/1.1 200 OK'
  note "$(grep -E '^New, ' "$WORK/s_client-tls1_2.out")"
}

section "openssl s_client"
check "s_client -tls1_3 -alpn http/1.1: verified, ALPN http/1.1, 200" \
  s_client_tls13
check "s_client -tls1_2 -alpn http/1.1: verified, ALPN http/1.1, 200" \
  s_client_tls12

# ---------------------------------------------------------------------------
# Deno's fetch with Deno.createHttpClient({ caCerts }), Node's https and fetch
# ---------------------------------------------------------------------------

cat >"$WORK/deno_tls_test.ts" <<'EOF'
import assert from "node:assert/strict";

const base = new URL(Deno.env.get("TLS_URL")!);
const ca = Deno.readTextFileSync(Deno.env.get("TLS_CA")!);
const HELLO = "<h1>Hello!</h1>";

Deno.test("deno fetch: GET / over HTTPS trusting the test CA", async () => {
  using client = Deno.createHttpClient({ caCerts: [ca] });
  const response = await fetch(base, { client });
  assert.equal(response.status, 200);
  assert.ok((await response.text()).includes(HELLO));
});

Deno.test("deno fetch: POST /echo 300 KiB byte for byte", async () => {
  using client = Deno.createHttpClient({ caCerts: [ca] });
  const sent = new Uint8Array(300 * 1024);
  for (let i = 0; i < sent.length; i += 65536) {
    crypto.getRandomValues(sent.subarray(i, i + 65536));
  }
  const response = await fetch(new URL("/echo", base), {
    client,
    method: "POST",
    body: sent,
  });
  assert.equal(response.status, 200);
  assert.deepEqual(new Uint8Array(await response.arrayBuffer()), sent);
});

Deno.test("deno fetch: without the CA the certificate is refused", async () => {
  await assert.rejects(fetch(base).then((response) => response.text()));
});
EOF

cat >"$WORK/node_tls_test.mjs" <<'EOF'
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import https from "node:https";
import { test } from "node:test";
import tls from "node:tls";

const base = new URL(process.env.TLS_URL);
const ca = readFileSync(process.env.TLS_CA, "utf8");
const HELLO = "<h1>Hello!</h1>";

function get(path, options) {
  return new Promise((resolve, reject) => {
    const req = https.get(new URL(path, base), options, (res) => {
      // Read now: a kept-alive socket leaves the response at its end.
      const alpn = res.socket.alpnProtocol;
      const chunks = [];
      res.on("data", (chunk) => chunks.push(chunk));
      res.on("end", () =>
        resolve({
          status: res.statusCode,
          body: Buffer.concat(chunks).toString(),
          alpn,
          reused: req.reusedSocket,
        }));
      res.on("error", reject);
    });
    req.on("error", reject);
  });
}

test("node https.get with ca: ALPN http/1.1, keep-alive", async () => {
  const agent = new https.Agent({
    ca,
    keepAlive: true,
    maxSockets: 1,
    ALPNProtocols: ["http/1.1"],
  });
  try {
    const first = await get("/", { agent });
    assert.equal(first.status, 200);
    assert.ok(first.body.includes(HELLO));
    assert.equal(first.alpn, "http/1.1");
    const second = await get("/", { agent });
    assert.equal(second.status, 200);
    assert.equal(second.reused, true, "the second request reused the socket");
  } finally {
    agent.destroy();
  }
});

// Node's own roots only: NODE_EXTRA_CA_CERTS, which fetch below needs,
// would otherwise make the test CA trusted by default.
test("node https.get without ca: the certificate is refused", async () => {
  await assert.rejects(
    get("/", { agent: false, ca: tls.rootCertificates }),
    { code: "UNABLE_TO_VERIFY_LEAF_SIGNATURE" },
  );
});

// NODE_EXTRA_CA_CERTS (set by tls.sh) is how fetch trusts a private CA.
test("node fetch: GET / over HTTPS", async () => {
  const response = await fetch(base);
  assert.equal(response.status, 200);
  assert.ok((await response.text()).includes(HELLO));
});
EOF

section "deno fetch"
rc=0
TLS_URL="$BASE/" TLS_CA="$CA" timeout 60 deno test --reporter=tap \
  --allow-net=localhost,127.0.0.1 --allow-env=TLS_URL,TLS_CA \
  --allow-read="$WORK" "$WORK/deno_tls_test.ts" >"$WORK/deno-test.log" 2>&1 ||
  rc=$?
tap_results "$rc" "$WORK/deno-test.log"

section "node https, node fetch"
if have node nodejs; then
  rc=0
  TLS_URL="https://127.0.0.1:$P/" TLS_CA="$CA" NODE_EXTRA_CA_CERTS="$CA" \
    timeout 60 node --test --test-reporter=tap "$WORK/node_tls_test.mjs" \
    >"$WORK/node-test.log" 2>&1 || rc=$?
  tap_results "$rc" "$WORK/node-test.log"
fi

# ---------------------------------------------------------------------------
# Headless Chromium, trusting the leaf by the hash of its public key
# ---------------------------------------------------------------------------

# What --ignore-certificate-errors-spki-list takes: base64 of the SHA-256 of
# the leaf's SubjectPublicKeyInfo (DER).
SPKI=$(openssl x509 -in "$CERT" -pubkey -noout |
  openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64)

# chromium_run (lib.sh), with localhost mapped to 127.0.0.1.
chromium_tls() {
  chromium_run --host-resolver-rules="MAP localhost 127.0.0.1" "$@"
}

chromium_dom() {
  chromium_tls --ignore-certificate-errors-spki-list="$SPKI" \
    --dump-dom "$BASE/" >"$WORK/dom.html" 2>"$WORK/chromium.log"
  contains "$WORK/dom.html" '<h1>Hello!</h1>'
  contains "$WORK/dom.html" 'Hi from Deno'
  note "SPKI sha256: $SPKI"
}

# Without the flag, the browser must not show the page: the trust above
# came from the flag.
chromium_untrusted() {
  chromium_tls --dump-dom "$BASE/" >"$WORK/dom-untrusted.html" \
    2>"$WORK/chromium-untrusted.log" || true
  lacks "$WORK/dom-untrusted.html" '<h1>Hello!</h1>'
}

section "chromium"
if have chromium chromium; then
  check "chromium --ignore-certificate-errors-spki-list: renders the page" \
    chromium_dom
  check "chromium without it: no page" chromium_untrusted
fi

# ---------------------------------------------------------------------------
# WebSockets over TLS (wss://): the echo app of .ci/apps/ws_echo_app.ts
# behind --app, through Deno's, Node's and the ws package's clients, and
# Chromium (.ci/websocket_test.ts)
# ---------------------------------------------------------------------------

section "websocket"
WS=""
if launch ws-echo deno run --allow-net \
  --allow-read="$CERT,$KEY,.ci/apps/ws_echo_app.ts" main.ts --port 0 \
  --cert "$CERT" --key "$KEY" --app .ci/apps/ws_echo_app.ts; then
  WS="https://127.0.0.1:${PORT[ws-echo]}"
  echo "  $WS/ --app .ci/apps/ws_echo_app.ts (pid ${PID[ws-echo]})"
  ws_package
  ws_tests WS_URL="$WS" WS_CA="$CA" WS_SPKI="$SPKI"
  check "access log: one 101 line per upgrade" \
    ws_logged ws-echo "$WS" --cacert "$CA"
fi

# ---------------------------------------------------------------------------
# nginx proxying to the HTTPS upstream, verifying its certificate
# ---------------------------------------------------------------------------

nginx_start() {
  NGINX_PORT=$(free_port)
  NGX="$WORK/nginx"
  mkdir -p "$NGX"
  nginx_conf "$NGX/nginx.conf" <<EOF
    upstream hello_tls {
        server 127.0.0.1:$P;
        keepalive 8;
        keepalive_timeout 4s;
    }

    server {
        listen 127.0.0.1:$NGINX_PORT;

        # Verify the upstream as a browser would: chain to the CA, and the
        # name localhost (sent by SNI too).
        proxy_ssl_trusted_certificate $CA;
        proxy_ssl_verify on;
        proxy_ssl_server_name on;
        proxy_http_version 1.1;
        proxy_set_header Connection "";

        location / {
            proxy_pass https://hello_tls;
            proxy_ssl_name localhost;
        }

        # The same server under a name its certificate does not have:
        # nginx must refuse it (502), or the check above proves nothing.
        # Not through the upstream block: a connection kept alive there was
        # verified once, for localhost, and would be reused unchecked.
        location /wrong-name/ {
            proxy_pass https://127.0.0.1:$P/;
            proxy_ssl_name example.com;
        }
    }
EOF
  NGINX="http://127.0.0.1:$NGINX_PORT"
  start_nginx "$NGX" "$NGINX/" "GET / to HTTPS (port $NGINX_PORT)"
}

nginx_get() {
  local n=(timeout 30 curl -sS --max-time 20)
  expect "$("${n[@]}" -o "$WORK/nginx-get.html" -w '%{http_code}' \
    "$NGINX/")" 200 status
  contains "$WORK/nginx-get.html" '<h1>Hello!</h1>'
  expect "$("${n[@]}" --data-binary @"$WORK/small.bin" -H 'Expect:' \
    -o "$WORK/nginx-echo.bin" -w '%{http_code}' "$NGINX/echo")" 200 \
    "POST status"
  same_bytes "$WORK/small.bin" "$WORK/nginx-echo.bin"
}

# Twenty requests, then nginx still holds a TLS connection to the server
# (keepalive 8): the upstream's keep-alive works over TLS.
nginx_keepalive() {
  local i idle
  for i in $(seq 20); do
    timeout 30 curl -sS --max-time 20 -o /dev/null "$NGINX/?$i"
  done
  idle=$(ss -Htn state established dst "127.0.0.1:$P" | wc -l)
  note "idle nginx connections to the server: $idle"
  [ "$idle" -ge 1 ] && [ "$idle" -le 8 ]
}

nginx_wrong_name() {
  expect "$(timeout 30 curl -sS --max-time 20 -o /dev/null -w '%{http_code}' \
    "$NGINX/wrong-name/")" 502 status
  grep -E 'upstream SSL certificate does not match' "$NGX/error.log"
}

section "nginx"
if have nginx nginx-light && nginx_start; then
  echo "  $NGINX/ -> https://127.0.0.1:$P/"
  check "nginx proxy_ssl_verify: GET / and POST /echo through the proxy" \
    nginx_get
  if have ss iproute2; then
    check "nginx: keeps a TLS connection to the server alive" nginx_keepalive
  fi
  check "nginx: a name the certificate lacks is refused (502)" \
    nginx_wrong_name
fi

# ---------------------------------------------------------------------------
# --redirect-http: 308 to the same URL over HTTPS
# ---------------------------------------------------------------------------

HTTP="http://127.0.0.1:$REDIRECT_PORT"

redirect_get() {
  expect "$(timeout 30 curl -sS --max-time 20 -o /dev/null \
    -w '%{http_code} %{redirect_url}' "$HTTP/some/path?q=1&r")" \
    "308 https://127.0.0.1:$P/some/path?q=1&r" "status, Location"
}

# The Host the client asked for is kept; only scheme and port change.
redirect_host() {
  expect "$(timeout 30 curl -sS --max-time 20 -o /dev/null \
    -H "Host: localhost:$REDIRECT_PORT" -w '%{http_code} %{redirect_url}' \
    "$HTTP/a%20b/?x=%2F")" "308 https://localhost:$P/a%20b/?x=%2F" \
    "status, Location"
}

# 308, unlike 301, keeps the method and body (RFC 9110 §15.4.9): the POST
# arrives at /echo over HTTPS intact.
redirect_post() {
  expect "$(timeout 30 curl -sS --max-time 20 -L --cacert "$CA" \
    --resolve "localhost:$REDIRECT_PORT:127.0.0.1" \
    --resolve "localhost:$P:127.0.0.1" --data-binary @"$WORK/small.bin" \
    -H 'Expect:' -o "$WORK/redirect-echo.bin" \
    -w '%{http_code} %{num_redirects} %{url_effective}' \
    "http://localhost:$REDIRECT_PORT/echo")" \
    "200 1 https://localhost:$P/echo" "status, redirects, final URL"
  same_bytes "$WORK/small.bin" "$WORK/redirect-echo.bin"
}

section "--redirect-http"
if command -v curl >/dev/null; then
  check "--redirect-http: GET is 308 to the same path and query" redirect_get
  check "--redirect-http: the requested host is kept" redirect_host
  check "--redirect-http: curl -L follows a POST to /echo over HTTPS" \
    redirect_post
fi

# ---------------------------------------------------------------------------
# Graceful shutdown
# ---------------------------------------------------------------------------

MAIN_RC=0
stop_server main || MAIN_RC=$?
WS_RC=0
if [ -n "$WS" ]; then stop_server ws-echo || WS_RC=$?; fi

# Anything on the server's stderr is an uncaught error or a warning, such
# as a TLS error logged for a client that gave up.
quiet_stderr() {
  local name
  for name in main ws-echo; do
    if [ -s "$WORK/$name.err" ]; then
      echo "$name.err:"
      head -n 20 "$WORK/$name.err"
      return 1
    fi
  done
}

section "shutdown"
check "SIGTERM: the server says 'Shutting down.' and exits 0" \
  exited_cleanly main "$MAIN_RC"
if [ -n "$WS" ]; then
  check "SIGTERM: the WebSocket app server says 'Shutting down.', exits 0" \
    exited_cleanly ws-echo "$WS_RC"
fi
check "the servers wrote nothing to stderr" quiet_stderr

echo
summary
