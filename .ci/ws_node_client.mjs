// A Node.js WebSocket client for .ci/websocket_test.ts, which runs it and
// judges what it prints: one JSON line with what it saw. Node runs no
// TypeScript, hence a plain module.
//
//   node [--experimental-websocket] .ci/ws_node_client.mjs URL CLIENT [MODE]
//
// CLIENT is `builtin` (Node's own WebSocket, undici's) or `ws` (the npm
// package, from the node_modules under $WS_PACKAGE_DIR), `ws-deflate` being
// `ws` offering permessage-deflate. The default MODE echoes messages of the
// sizes where frame headers change, up to 1 MiB, text and binary, random and
// repetitive, all sent at once; with `ws`, also a message in three fragments
// (a UTF-8 character split between two) and a ping. MODE `oversize` sends
// one 2 MiB message of zeros instead, which deflates to about 2 KiB.
// $WS_CA, if set, is a CA file for `ws` (`builtin` takes
// NODE_EXTRA_CA_CERTS).

import { randomBytes, randomInt } from "node:crypto";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

const [url, client, mode = "echo"] = process.argv.slice(2);
const MAX = 1024 * 1024;
const SIZES = [0, 1, 125, 126, 127, 65535, 65536, 65537, MAX];
const PHRASE = "Grüße, 世界! 🦀 ";
const CHARACTERS = ["a", "é", "€", "🦀", "Z", "ж", "世", "𝄞"];

// Exactly `size` bytes of UTF-8.
function repetitiveText(size) {
  const times = Math.floor(size / Buffer.byteLength(PHRASE));
  const text = PHRASE.repeat(times);
  return text + "x".repeat(size - Buffer.byteLength(text));
}

function randomText(size) {
  const parts = [];
  for (let left = size; left > 0;) {
    const character = CHARACTERS[randomInt(CHARACTERS.length)];
    const bytes = Buffer.byteLength(character);
    if (bytes > left) continue;
    parts.push(character);
    left -= bytes;
  }
  return parts.join("");
}

function describe(data) {
  return typeof data === "string"
    ? `text of ${Buffer.byteLength(data)} bytes`
    : `binary of ${data.byteLength} bytes`;
}

const usesWs = client.startsWith("ws");
const WebSocket = usesWs
  ? createRequire(join(process.env.WS_PACKAGE_DIR, "client.js"))("ws")
  : globalThis.WebSocket;
const socket = usesWs
  ? new WebSocket(url, ["echo"], {
    perMessageDeflate: client === "ws-deflate" ? { threshold: 0 } : false,
    ca: process.env.WS_CA ? readFileSync(process.env.WS_CA) : undefined,
  })
  : new WebSocket(url, ["echo"]);
socket.binaryType = "arraybuffer";

const result = { echoed: 0, bytes: 0, errors: [] };
const expected = [];

function send(data) {
  expected.push(data);
  socket.send(data);
}

function done() {
  clearTimeout(timer);
  console.log(JSON.stringify(result));
}
const timer = setTimeout(() => {
  result.errors.push(`timed out, ${expected.length} echoes outstanding`);
  done();
  process.exit(1);
}, 60_000);

// ws's `extensions` names them without their parameters: the header has them.
socket.on?.("upgrade", (response) => {
  result.extensions = response.headers["sec-websocket-extensions"] ?? "";
});

socket.addEventListener("open", () => {
  result.extensions ??= socket.extensions;
  result.protocol = socket.protocol;
  if (mode === "oversize") {
    socket.send(Buffer.alloc(2 * MAX));
    return;
  }
  for (const size of SIZES) {
    send(randomBytes(size));
    send(Buffer.alloc(size, "abc"));
    send(randomText(size));
    send(repetitiveText(size));
  }
  if (usesWs) {
    // The crab's four bytes are 8 to 11: split 2 + 1 + 1.
    const whole = Buffer.from("a crab: 🦀, in fragments");
    expected.push(whole.toString());
    socket.send(whole.subarray(0, 10), { binary: false, fin: false });
    socket.send(whole.subarray(10, 11), { binary: false, fin: false });
    socket.send(whole.subarray(11), { binary: false, fin: true });
    const ping = randomBytes(16);
    socket.on("pong", (data) => {
      result.pong = Buffer.compare(data, ping) === 0 ? "same" : "different";
    });
    socket.ping(ping);
  }
});

socket.addEventListener("message", ({ data }) => {
  if (result.errors.length > 0) return;
  const sent = expected.shift();
  const same = typeof sent === "string"
    ? data === sent
    : sent !== undefined && typeof data !== "string" &&
      Buffer.from(data).equals(sent);
  if (!same) {
    result.errors.push(
      `echo ${result.echoed}: sent ${
        sent === undefined ? "nothing" : describe(sent)
      }, got ${describe(data)}`,
    );
    socket.close(4000, "mismatch");
    return;
  }
  result.echoed++;
  result.bytes += typeof data === "string"
    ? Buffer.byteLength(data)
    : data.byteLength;
  if (expected.length === 0) socket.close(4001, "bye ✓");
});

socket.addEventListener("error", (event) => {
  result.errors.push(`error event: ${event.message ?? event.error ?? ""}`);
});

socket.addEventListener("close", ({ code, reason, wasClean }) => {
  result.close = { code, reason, wasClean };
  done();
});
