# shellcheck shell=bash
# What .ci/interop.sh and .ci/tls.sh share to check WebSockets: the ws
# package for the Node client, the run of .ci/websocket_test.ts (whose
# module doc says what each variable names), and the access log's 101 lines.
# Sourced after lib.sh; it only defines things.

# ws_package: ws@8 from the npm registry, under $WORK/npm, for
# .ci/ws_node_client.mjs. Sets WS_PACKAGE to that directory, or to nothing if
# node is missing (have, lib.sh) or the install failed (a failure).
ws_package() {
  WS_PACKAGE=""
  have node nodejs || return 0
  if timeout 120 npm install --prefix "$WORK/npm" --no-audit --no-fund \
    --no-save --no-package-lock ws@8 >"$WORK/npm-ws.log" 2>&1; then
    WS_PACKAGE="$WORK/npm"
  else
    fail "npm install ws@8 (from the npm registry)"
    tail -n 20 "$WORK/npm-ws.log" | sed "s/^/        /"
  fi
}

# ws_tests NAME=VALUE...: .ci/websocket_test.ts against the servers named
# (WS_URL, WS_HONO_URL, ...), main.ts being the server under test, with the
# clients this machine has; one pass or fail per test (tap_results, lib.sh).
# WS_CA, if given, is also the CA that Deno's client trusts (--cert).
ws_tests() {
  local variables=(WS_URL WS_SERVER WS_HONO_URL WS_NGINX_URL WS_LIMITED_URL WS_NODE
    WS_PACKAGE_DIR WS_CHROMIUM WS_WORK WS_SPKI WS_CA)
  local node="" chromium="" cert=() arg rc=0
  command -v node >/dev/null && node=node
  if have chromium chromium; then chromium=chromium; fi
  for arg in "$@"; do
    [[ $arg == WS_CA=?* ]] && cert=(--cert "${arg#WS_CA=}")
  done
  env WS_SERVER=main.ts WS_NODE="$node" WS_PACKAGE_DIR="$WS_PACKAGE" \
    WS_CHROMIUM="$chromium" WS_WORK="$WORK" "$@" \
    timeout 600 deno test --reporter=tap "${cert[@]}" \
    --allow-net=127.0.0.1 --allow-env="$(IFS=,; echo "${variables[*]}")" \
    --allow-run=node,timeout --allow-write="$WORK" .ci/websocket_test.ts \
    >"$WORK/ws-test.log" 2>&1 || rc=$?
  tap_results "$rc" "$WORK/ws-test.log"
}

# ws_logged NAME URL [CURL FLAGS...]: server NAME's access log has one line
# with status 101 for each upgrade that its echo app at URL answered. (The
# log is written in batches, at most a quarter second late.)
ws_logged() {
  local name=$1 url=$2 upgrades logged=0 _
  shift 2
  upgrades=$(timeout 30 curl -sS --max-time 20 "$@" "$url/stats" |
    tr -dc 0-9)
  for _ in $(seq 30); do
    logged=$(grep -c '"GET /ws[^"]* HTTP/1\.1" 101 ' "$WORK/$name.out" || true)
    [ "$logged" -ge "$upgrades" ] && break
    sleep 0.1
  done
  note "$upgrades upgrades; $(grep -m 1 '" 101 ' "$WORK/$name.out" || true)"
  [ "$upgrades" -gt 0 ]
  expect "$logged" "$upgrades" "101 lines in the access log"
}
