/**
 * WebSocket interop: real clients against running servers of the echo app
 * .ci/apps/ws_echo_app.ts (see its routes), which .ci/interop.sh and
 * .ci/tls.sh start and name in the environment:
 *
 * - `WS_URL`: the echo app (`http:` or, with a test CA, `https:`);
 * - `WS_SERVER`: `main.ts` when that is main.ts serving it with `--app`: the
 *   checks of what only main.ts does (permessage-deflate, the 1 MiB message
 *   limit) then apply too. Anything else, such as `Deno.serve` for
 *   `deno serve`, the reference, leaves them out;
 * - `WS_HONO_URL`: main.ts with `--app .ci/apps/hono_ws_app.ts`;
 * - `WS_NGINX_URL`: nginx proxying WebSockets to the echo app;
 * - `WS_LIMITED_URL`: the echo app under main.ts with `--ws-max-message
 *   1000 --ws-idle-timeout 0.5 --no-compress`;
 * - `WS_NODE`: the `node` command, for Node's own WebSocket and, with
 *   `WS_PACKAGE_DIR` (an `npm install --prefix` of `ws@8`), the ws package
 *   (.ci/ws_node_client.mjs);
 * - `WS_CHROMIUM`: the `chromium` command, with `WS_WORK`, a directory for
 *   its fresh profile (and `WS_SPKI` over TLS, see .ci/tls.sh);
 * - `WS_CA`: the test CA of an `https:` `WS_URL`, for Node (Deno's own
 *   client trusts it through `deno test --cert`).
 *
 * By hand, against the reference (`deno serve` prints the port; DIR has ws
 * from `npm install --prefix DIR --no-save ws@8`):
 *
 *   deno serve --allow-net --host 127.0.0.1 --port 0 .ci/apps/ws_echo_app.ts
 *   WS_URL=http://127.0.0.1:PORT/ WS_SERVER=Deno.serve WS_NODE=node \
 *     WS_PACKAGE_DIR=DIR WS_CHROMIUM=chromium WS_WORK=/tmp \
 *     deno test --allow-net=127.0.0.1 --allow-env --allow-run=node,timeout \
 *     --allow-write=/tmp .ci/websocket_test.ts
 *
 * and against main.ts the same with `deno run --allow-net --allow-read
 * main.ts --port 0 --app .ci/apps/ws_echo_app.ts` and `WS_SERVER=main.ts`.
 * (`deno serve ... .ci/apps/hono_ws_app.ts` serves the Hono app.)
 * Black-box, like .ci/interop_test.ts: a test whose server is not named is
 * ignored, so a plain `deno test` of this file ignores every test.
 * @module
 */

import assert from "node:assert/strict";

/** An environment variable, if this run may read it (asking never prompts). */
function env(name: string): string | undefined {
  const { state } = Deno.permissions.querySync({ name: "env", variable: name });
  return state === "granted" ? Deno.env.get(name) || undefined : undefined;
}

function serverUrl(name: string): URL | undefined {
  const value = env(name);
  return value ? new URL(value) : undefined;
}

const echoServer = serverUrl("WS_URL");
const ours = env("WS_SERVER") === "main.ts";
const honoServer = serverUrl("WS_HONO_URL");
const nginxServer = serverUrl("WS_NGINX_URL");
const limitedServer = serverUrl("WS_LIMITED_URL");
const node = env("WS_NODE");
const wsPackage = env("WS_PACKAGE_DIR");
const chromium = env("WS_CHROMIUM");
const work = env("WS_WORK");
const spki = env("WS_SPKI");
const ca = env("WS_CA");

/** `Deno.test` of the server at `server`, ignored when there is none. */
function withServer(
  server: URL | undefined,
  name: string,
  fn: (server: URL) => Promise<void>,
  ignore = false,
) {
  Deno.test({ name, ignore: ignore || !server, fn: () => fn(server!) });
}

/** The largest message main.ts takes by default; one byte more is 1009. */
const MAX = 1024 * 1024;
/** Where frame headers change (7-bit, 16-bit, 64-bit lengths), the limit. */
const SIZES = [0, 1, 125, 126, 127, 65535, 65536, 65537, MAX];
const PHRASE = "Grüße, 世界! 🦀 ";
const encoder = new TextEncoder();

type Message = string | Uint8Array<ArrayBuffer>;
type Data = string | ArrayBuffer;

function randomBytes(size: number): Uint8Array<ArrayBuffer> {
  const bytes = new Uint8Array(size);
  for (let i = 0; i < size; i += 65536) {
    crypto.getRandomValues(bytes.subarray(i, Math.min(size, i + 65536)));
  }
  return bytes;
}

function repetitiveBytes(size: number): Uint8Array<ArrayBuffer> {
  return new Uint8Array(size).map((_, i) => i % 61);
}

/** Exactly `size` bytes of UTF-8, of code points 1 to 4 bytes long. */
function randomText(size: number): string {
  const random = new Uint32Array(2 * size);
  for (let i = 0; i < random.length; i += 16384) {
    crypto.getRandomValues(random.subarray(i, i + 16384));
  }
  const points: number[] = [];
  for (let left = size, r = 0; left > 0; r += 2) {
    const width = 1 + random[r] % Math.min(4, left);
    const pick = random[r + 1];
    let point;
    if (width === 1) point = 0x20 + pick % 0x5f;
    else if (width === 2) point = 0x80 + pick % 0x780;
    else if (width === 4) point = 0x10000 + pick % 0x100000;
    else {
      point = 0x800 + pick % 0xf000;
      if (point >= 0xd800) point += 0x800; // no surrogates
      // A leading BOM is dropped by UTF-8 decode, rightly.
      if (point === 0xfeff) point = 0xfefe;
    }
    points.push(point);
    left -= width;
  }
  let text = "";
  for (let i = 0; i < points.length; i += 8192) {
    text += String.fromCodePoint(...points.slice(i, i + 8192));
  }
  return text;
}

function repetitiveText(size: number): string {
  const times = Math.floor(size / encoder.encode(PHRASE).length);
  const text = PHRASE.repeat(times);
  return text + "x".repeat(size - encoder.encode(text).length);
}

/** Each size of {@linkcode SIZES} as each kind of message. */
function edgeMessages(): Message[] {
  return SIZES.flatMap((size) => [
    randomBytes(size),
    randomText(size),
    repetitiveBytes(size),
    repetitiveText(size),
  ]);
}

/** `count` messages of all kinds, mostly small, the largest 64 KiB. */
function mixedMessages(count: number): Message[] {
  const makers = [randomBytes, randomText, repetitiveBytes, repetitiveText];
  return Array.from({ length: count }, (_, i) => {
    const size = Math.floor(2 ** (16 * Math.random() ** 2)) - 1;
    return makers[i % 4](size);
  });
}

function size(data: Message | Data): number {
  return typeof data === "string"
    ? encoder.encode(data).length
    : data.byteLength;
}

function describe(data: Message | Data): string {
  return `${typeof data === "string" ? "text" : "binary"} of ${
    size(data)
  } bytes`;
}

/** How `got` differs from `sent`, briefly (never 1 MiB of diff), or "". */
function difference(sent: Message, got: Data): string {
  if (typeof sent === "string") {
    if (typeof got !== "string") return `sent text, got ${describe(got)}`;
    if (got === sent) return "";
    let at = 0;
    while (got[at] === sent[at]) at++;
    return `text differs from UTF-16 index ${at} (sent ${sent.length}, got ${got.length} code units)`;
  }
  if (typeof got === "string") return `sent binary, got ${describe(got)}`;
  if (got.byteLength !== sent.byteLength) {
    return `sent ${sent.byteLength} bytes, got ${got.byteLength}`;
  }
  const bytes = new Uint8Array(got);
  for (let i = 0; i < bytes.length; i++) {
    if (bytes[i] !== sent[i]) return `bytes differ from offset ${i}`;
  }
  return "";
}

/** `promise`, or an error naming `what` after `ms`; no timer outlives it. */
async function within<T>(
  promise: Promise<T>,
  ms: number,
  what: string,
): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeUp = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`${what}: nothing after ${ms / 1000} s`)),
      ms,
    );
  });
  try {
    return await Promise.race([promise, timeUp]);
  } finally {
    clearTimeout(timer);
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function wsUrl(server: URL, path: string): string {
  const url = new URL(path, server);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

/** Deno's own WebSocket client, with its messages queued for the reading. */
class Client {
  readonly socket: WebSocket;
  readonly closed: Promise<CloseEvent>;
  #inbox: Data[] = [];
  #wake = () => {};
  #closeEvent?: CloseEvent;

  private constructor(socket: WebSocket) {
    this.socket = socket;
    socket.binaryType = "arraybuffer";
    socket.onmessage = (event) => {
      this.#inbox.push(event.data);
      this.#wake();
    };
    this.closed = new Promise((resolve) => {
      socket.onclose = (event) => {
        this.#closeEvent = event;
        this.#wake();
        resolve(event);
      };
    });
  }

  static async open(url: string, protocols?: string[]): Promise<Client> {
    const client = new Client(new WebSocket(url, protocols));
    const opened = new Promise<void>((resolve, reject) => {
      client.socket.onopen = () => resolve();
      client.closed.then(({ code }) =>
        reject(new Error(`${url}: closed (${code}) before it opened`))
      );
    });
    try {
      await within(opened, 15_000, `opening ${url}`);
    } catch (error) {
      await client.close();
      throw error;
    }
    return client;
  }

  /** The next message, or an error if the socket closes first. */
  async next(ms = 30_000): Promise<Data> {
    while (this.#inbox.length === 0) {
      const event = this.#closeEvent;
      if (event) {
        throw new Error(
          `closed (${event.code} ${event.reason}) while a message was due`,
        );
      }
      await within(
        new Promise<void>((resolve) => this.#wake = resolve),
        ms,
        "waiting for a message",
      );
    }
    return this.#inbox.shift()!;
  }

  /** Starts the closing handshake (unless closed) and awaits its end. */
  async close(code?: number, reason?: string): Promise<CloseEvent> {
    if (this.socket.readyState < WebSocket.CLOSING) {
      this.socket.close(code, reason);
    }
    return await within(this.closed, 15_000, "the closing handshake");
  }
}

/** Sends `messages`, `window` at a time, and checks that each echoes. */
async function echo(client: Client, messages: Message[], window = 1) {
  let sent = 0;
  for (let i = 0; i < messages.length; i++) {
    while (sent < messages.length && sent < i + window) {
      client.socket.send(messages[sent++]);
    }
    const problem = difference(messages[i], await client.next());
    if (problem) {
      assert.fail(`echo ${i} (${describe(messages[i])}): ${problem}`);
    }
  }
}

interface Report {
  binaryType: string;
  protocol: string;
  extensions: string;
  messages: number;
  bytes: number;
  close?: { code: number; reason: string; wasClean: boolean };
}

/** What the app saw of socket `id`, once its close event came (≤ 5 s). */
async function serverReport(server: URL, id: string): Promise<Report> {
  let report: Report | undefined;
  for (let i = 0; i < 50 && !report?.close; i++) {
    if (i > 0) await sleep(100);
    const response = await fetch(new URL(`/report?id=${id}`, server));
    report = response.ok ? await response.json() : undefined;
    if (!response.ok) await response.body?.cancel();
  }
  assert.ok(report, `the app has no socket ${id}`);
  assert.ok(report.close, `the app's socket ${id} never closed`);
  return report;
}

function total(messages: Message[]): number {
  return messages.reduce((sum, message) => sum + size(message), 0);
}

// ---------------------------------------------------------------------------
// Deno's own WebSocket client
// ---------------------------------------------------------------------------

withServer(
  echoServer,
  "deno WebSocket: text and binary, 0 B to 1 MiB, echo byte for byte",
  async (server) => {
    const id = crypto.randomUUID();
    const messages = edgeMessages();
    const client = await Client.open(wsUrl(server, `/ws?id=${id}`));
    try {
      await echo(client, messages);
    } finally {
      await client.close(1000);
    }
    const report = await serverReport(server, id);
    assert.equal(report.messages, messages.length, "messages the app got");
    assert.equal(report.bytes, total(messages), "bytes the app got");
    // Deno's server sockets start as "arraybuffer", unlike a browser's.
    assert.equal(report.binaryType, "arraybuffer", "the server's binaryType");
    assert.equal(report.extensions, "", "no extension was offered");
  },
);

withServer(
  echoServer,
  "deno WebSocket: 400 mixed messages, 16 in flight, echo in order",
  async (server) => {
    const client = await Client.open(wsUrl(server, "/ws"));
    try {
      await echo(client, mixedMessages(400), 16);
    } finally {
      await client.close(1000);
    }
  },
);

withServer(
  echoServer,
  "deno WebSocket: 20 connections at once, 25 messages each",
  async (server) => {
    const clients = await Promise.all(
      Array.from({ length: 20 }, () => Client.open(wsUrl(server, "/ws"))),
    );
    try {
      await Promise.all(
        clients.map((client) => echo(client, mixedMessages(25), 4)),
      );
    } finally {
      await Promise.all(clients.map((client) => client.close(1000)));
    }
  },
);

withServer(
  echoServer,
  "deno WebSocket: the server sends a typed-array view and a Blob whole",
  async (server) => {
    for (const as of ["view", "blob"]) {
      const client = await Client.open(wsUrl(server, `/ws?as=${as}`));
      try {
        await echo(client, SIZES.map(randomBytes));
      } finally {
        await client.close(1000);
      }
    }
  },
);

withServer(
  echoServer,
  "deno WebSocket: a subprotocol offered is chosen, none offered is none",
  async (server) => {
    const offered = await Client.open(wsUrl(server, "/ws"), ["chat", "echo"]);
    try {
      assert.equal(offered.socket.protocol, "echo");
      await echo(offered, ["with a subprotocol"]);
    } finally {
      await offered.close(1000);
    }
    const plain = await Client.open(wsUrl(server, "/ws"));
    try {
      assert.equal(plain.socket.protocol, "");
    } finally {
      await plain.close(1000);
    }
  },
);

withServer(
  echoServer,
  "deno WebSocket: close(4001, reason) reaches the app, cleanly",
  async (server) => {
    const id = crypto.randomUUID();
    const client = await Client.open(wsUrl(server, `/ws?id=${id}`));
    let event;
    try {
      await echo(client, ["before the close"]);
    } finally {
      event = await client.close(4001, "done ✓");
    }
    assert.equal(event.wasClean, true, "wasClean");
    // RFC 6455 §5.5.1: the reply typically echoes the code it received.
    assert.equal(event.code, 4001, "the code of the server's reply");
    const report = await serverReport(server, id);
    assert.deepEqual(report.close, {
      code: 4001,
      reason: "done ✓",
      wasClean: true,
    });
  },
);

withServer(
  echoServer,
  "deno WebSocket: the server's close(4000, reason) reaches the client",
  async (server) => {
    const id = crypto.randomUUID();
    const reason = "the server says bye ✓";
    const client = await Client.open(
      wsUrl(
        server,
        `/ws?id=${id}&close=4000&reason=${encodeURIComponent(reason)}`,
      ),
    );
    let event;
    try {
      event = await within(client.closed, 15_000, "the server's close");
    } finally {
      await client.close();
    }
    assert.deepEqual(
      { code: event.code, reason: event.reason, wasClean: event.wasClean },
      { code: 4000, reason, wasClean: true },
    );
    const report = await serverReport(server, id);
    assert.equal(report.close?.code, 4000, "the app's close event");
    assert.equal(report.close?.wasClean, true, "the app's close event");
  },
);

withServer(
  echoServer,
  "main.ts: a message of 1 MiB + 1 byte is closed with 1009",
  async (server) => {
    for (const message of [randomBytes(MAX + 1), repetitiveText(MAX + 1)]) {
      const client = await Client.open(wsUrl(server, "/ws"));
      let event;
      try {
        // Taken whole, it would echo: then "echo" is what fails.
        client.socket.send(message);
        await client.next().then(
          (data) => assert.fail(`echo: ${describe(data)}`),
          () => {},
        );
      } finally {
        event = await client.close();
      }
      assert.equal(event.code, 1009, `${describe(message)}: close code`);
    }
  },
  !ours,
);

// ---------------------------------------------------------------------------
// Node.js: its own WebSocket (undici's) and the ws package, in a subprocess
// (.ci/ws_node_client.mjs prints what it saw)
// ---------------------------------------------------------------------------

interface NodeResult {
  echoed: number;
  bytes: number;
  errors: string[];
  extensions?: string;
  protocol?: string;
  pong?: string;
  close?: { code: number; reason: string; wasClean: boolean };
}

/** The 36 messages of .ci/ws_node_client.mjs, 37 with ws's fragments. */
const NODE_MESSAGES = SIZES.length * 4;

/** Node 20 has WebSocket behind a flag; 22 and later have it anyway. */
let nodeFlags: Promise<string[]> | undefined;
function nodeWebSocketFlags(): Promise<string[]> {
  nodeFlags ??= new Deno.Command(node!, {
    args: ["-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"],
    stdout: "null",
    stderr: "null",
  }).output().then(({ success }) =>
    success ? [] : ["--experimental-websocket"]
  );
  return nodeFlags;
}

async function runNode(url: string, args: string[]): Promise<NodeResult> {
  const script = `${import.meta.dirname}/ws_node_client.mjs`;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 90_000);
  try {
    const { stdout, stderr } = await new Deno.Command(node!, {
      args: [...await nodeWebSocketFlags(), script, url, ...args],
      env: {
        ...wsPackage ? { WS_PACKAGE_DIR: wsPackage } : {},
        ...ca ? { WS_CA: ca, NODE_EXTRA_CA_CERTS: ca } : {},
      },
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      signal: abort.signal,
    }).output();
    const lines = new TextDecoder().decode(stdout).trim().split("\n");
    try {
      return JSON.parse(lines.at(-1)!);
    } catch {
      assert.fail(
        `node printed no result: ${lines.join("\n")}\n` +
          new TextDecoder().decode(stderr).slice(-2000),
      );
    }
  } finally {
    clearTimeout(timer);
  }
}

/**
 * The echo went through, all of it, and the client's close(4001, "bye ✓")
 * too: the app saw it, and the server's reply echoed the code (a reply's
 * reason is the server's to choose).
 */
async function assertNodeEcho(
  result: NodeResult,
  messages: number,
  server: URL,
  id?: string,
) {
  const what = `node printed ${JSON.stringify(result)}`;
  assert.deepEqual(result.errors, [], what);
  assert.equal(result.echoed, messages, `messages echoed; ${what}`);
  assert.equal(result.protocol, "echo", `subprotocol; ${what}`);
  assert.equal(result.close?.code, 4001, `the server's reply; ${what}`);
  assert.equal(result.close?.wasClean, true, `wasClean; ${what}`);
  if (id === undefined) return;
  const report = await serverReport(server, id);
  assert.deepEqual(report.close, {
    code: 4001,
    reason: "bye ✓",
    wasClean: true,
  });
  assert.equal(report.messages, messages, "messages the app got");
}

const DEFLATE = /^permessage-deflate(;|$)/;

withServer(
  echoServer,
  "node WebSocket (built in): text and binary, 0 B to 1 MiB, echo",
  async (server) => {
    const id = crypto.randomUUID();
    const result = await runNode(wsUrl(server, `/ws?id=${id}`), ["builtin"]);
    await assertNodeEcho(result, NODE_MESSAGES, server, id);
  },
  !node,
);

withServer(
  echoServer,
  "ws (npm), perMessageDeflate off: echo, fragments, ping",
  async (server) => {
    const id = crypto.randomUUID();
    const result = await runNode(wsUrl(server, `/ws?id=${id}`), ["ws"]);
    await assertNodeEcho(result, NODE_MESSAGES + 1, server, id);
    assert.equal(result.pong, "same", "the pong's payload");
    assert.equal(result.extensions, "", "Sec-WebSocket-Extensions");
    assert.equal((await serverReport(server, id)).extensions, "");
  },
  !node || !wsPackage,
);

withServer(
  echoServer,
  "ws (npm), permessage-deflate offered: echo, fragments, ping",
  async (server) => {
    const id = crypto.randomUUID();
    const result = await runNode(wsUrl(server, `/ws?id=${id}`), [
      "ws-deflate",
    ]);
    await assertNodeEcho(result, NODE_MESSAGES + 1, server, id);
    assert.equal(result.pong, "same", "the pong's payload");
    if (ours) {
      // Our answer to ws's offer, and what the app's socket says of it.
      const header = result.extensions ?? "";
      assert.match(header, DEFLATE, "Sec-WebSocket-Extensions");
      assert.match(header, /; *server_no_context_takeover\b/, header);
      assert.match(header, /; *client_no_context_takeover\b/, header);
      const report = await serverReport(server, id);
      assert.match(report.extensions, DEFLATE, "the app's extensions");
    }
  },
  !node || !wsPackage,
);

withServer(
  echoServer,
  "main.ts: a compressed message inflating past 1 MiB is closed with 1009",
  async (server) => {
    const result = await runNode(wsUrl(server, "/ws"), [
      "ws-deflate",
      "oversize",
    ]);
    assert.match(result.extensions ?? "", DEFLATE, "extensions");
    assert.deepEqual(result.errors, [], "errors");
    assert.equal(result.close?.code, 1009, "close code");
    assert.equal(result.echoed, 0, "echoes");
  },
  !ours || !node || !wsPackage,
);

withServer(
  limitedServer,
  "main.ts --ws-max-message 1000: 1,000 bytes echo, 1,001 close with 1009",
  async (server) => {
    const client = await Client.open(wsUrl(server, "/ws"));
    await echo(client, [randomBytes(1000), "x".repeat(1000)]);
    client.socket.send(randomBytes(1001));
    const event = await within(client.closed, 15_000, "the close");
    assert.equal(event.code, 1009);
  },
);

/**
 * A handshake by hand on a raw connection, so that nothing answers pings
 * and the offer is ours to make.
 * @returns The connection, and the 101's head as text.
 */
async function rawUpgrade(
  server: URL,
  fields: string,
): Promise<{ conn: Deno.TcpConn; head: string }> {
  const conn = await Deno.connect({
    hostname: server.hostname,
    port: Number(server.port),
  });
  const request = `GET /ws HTTP/1.1\r\nHost: ${server.host}\r\n` +
    "Upgrade: websocket\r\nConnection: Upgrade\r\n" +
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" +
    `Sec-WebSocket-Version: 13\r\n${fields}\r\n`;
  await conn.write(encoder.encode(request));
  const buffer = new Uint8Array(4096);
  const count = await within(conn.read(buffer), 15_000, "the 101") ?? 0;
  return { conn, head: new TextDecoder().decode(buffer.subarray(0, count)) };
}

withServer(
  limitedServer,
  "main.ts --no-compress and --ws-idle-timeout 0.5: no permessage-deflate, a ping, then a close for the silent",
  async (server) => {
    const { conn, head } = await rawUpgrade(
      server,
      "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    );
    try {
      assert.match(head, /^HTTP\/1\.1 101 /);
      assert.doesNotMatch(head, /sec-websocket-extensions/i);
      // Unanswered: a ping (opcode 9), then a close frame (opcode 8), then
      // the end, each within a few idle timeouts.
      const seen: number[] = [];
      const buffer = new Uint8Array(256);
      let count: number | null;
      while ((count = await within(conn.read(buffer), 15_000, "frames"))) {
        // Frames this small arrive whole; a read may hold several.
        for (let at = 0; at < count; at += 2 + (buffer[at + 1] & 0x7f)) {
          seen.push(buffer[at] & 0x0f);
        }
      }
      assert.deepEqual(seen, [9, 8]);
    } finally {
      conn.close();
    }
  },
);

// ---------------------------------------------------------------------------
// Chromium: the app's page echoes 1,000 messages and posts its verdict
// ---------------------------------------------------------------------------

interface Verdict {
  ok: boolean;
  error?: string;
  count: number;
  echoed: number;
  bytes: number;
  extensions: string;
  protocol: string;
  close?: { code: number; reason: string; wasClean: boolean };
}

withServer(
  echoServer,
  "chromium: 1,000 messages up to 1 MiB echo byte for byte",
  async (server) => {
    const id = crypto.randomUUID();
    const profile = await Deno.makeTempDir({ dir: work, prefix: "chromium." });
    // timeout: a backstop should this test itself be killed.
    const browser = new Deno.Command("timeout", {
      args: [
        "150",
        chromium!,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        // Without these it keeps trying the (closed) network.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        `--user-data-dir=${profile}`,
        ...spki ? [`--ignore-certificate-errors-spki-list=${spki}`] : [],
        new URL(`/?id=${id}&count=1000`, server).href,
      ],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const output = browser.output();
    let exited = false;
    browser.status.then(() => exited = true);
    let verdict: Verdict | undefined;
    try {
      // Up to 2 minutes: 1,000 messages, about 50 MB each way.
      for (let i = 0; i < 480 && !verdict && !exited; i++) {
        await sleep(250);
        const response = await fetch(new URL(`/result?id=${id}`, server));
        if (response.ok) verdict = await response.json();
        else await response.body?.cancel();
      }
    } finally {
      try {
        browser.kill("SIGTERM");
      } catch {
        // It had exited already.
      }
    }
    const { stderr } = await within(output, 30_000, "chromium's exit");
    const log = new TextDecoder().decode(stderr).slice(-1500);
    assert.ok(verdict, `no verdict from the page; chromium said:\n${log}`);
    assert.equal(verdict.ok, true, `the page said ${JSON.stringify(verdict)}`);
    assert.equal(verdict.echoed, 1000, "messages echoed");
    assert.deepEqual(verdict.close, {
      code: 1000,
      reason: "done",
      wasClean: true,
    });
    assert.equal(verdict.protocol, "echo", "subprotocol");
    if (ours) {
      // Chromium always offers permessage-deflate.
      assert.match(verdict.extensions, DEFLATE, "the page's extensions");
    }
    const report = await serverReport(server, id);
    assert.equal(report.messages, 1000, "messages the app got");
    assert.equal(report.bytes, verdict.bytes, "bytes the app got");
  },
  !chromium || !work,
);

// ---------------------------------------------------------------------------
// Hono's upgradeWebSocket (npm:hono@4/deno), through main.ts's --app
// ---------------------------------------------------------------------------

withServer(
  honoServer,
  "hono upgradeWebSocket via --app: echo 0 B to 1 MiB, close",
  async (server) => {
    const client = await Client.open(wsUrl(server, "/ws"), ["chat", "echo"]);
    let event;
    try {
      // Hono's Deno helper takes the first subprotocol offered.
      assert.equal(client.socket.protocol, "chat", "subprotocol");
      await echo(client, edgeMessages(), 4);
    } finally {
      event = await client.close(4001, "bye");
    }
    assert.equal(event.wasClean, true, "wasClean");
    assert.equal(event.code, 4001, "the code of the server's reply");
  },
);

// ---------------------------------------------------------------------------
// nginx as a WebSocket reverse proxy in front of the echo app
// ---------------------------------------------------------------------------

withServer(
  nginxServer,
  "nginx proxy: deno WebSocket echo, 0 B to 1 MiB",
  async (server) => {
    const client = await Client.open(wsUrl(server, "/ws"));
    try {
      await echo(client, edgeMessages(), 4);
    } finally {
      await client.close(1000);
    }
  },
);

withServer(
  nginxServer,
  "nginx proxy: ws with permessage-deflate, end to end",
  async (server) => {
    const id = crypto.randomUUID();
    const result = await runNode(wsUrl(server, `/ws?id=${id}`), [
      "ws-deflate",
    ]);
    // The report is the app's, behind the proxy, which has the same ids.
    await assertNodeEcho(result, NODE_MESSAGES + 1, echoServer!, id);
    if (ours) {
      assert.match(result.extensions ?? "", DEFLATE, "extensions");
    }
  },
  !node || !wsPackage,
);
