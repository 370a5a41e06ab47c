/**
 * Benchmark: this server (`main.ts`) against `Deno.serve`, against `node:http`
 * when `node` is on the PATH, and against the floor — a bare `Deno.listen`
 * loop that finds request heads and writes a constant reply, the least any
 * server on Deno's TCP can spend. Everything listens on ephemeral loopback
 * ports, and every server is a subprocess of its own.
 *
 * The sections, all run unless `--only` picks some:
 *
 * - `book`: the book's routes, on ours (quiet, and with the access log) and
 *   on an anchor `Deno.serve` server with the same routes and hello page, in
 *   three modes — keep-alive (`GET /` on 50 connections), pipelined (16
 *   requests per write) and `Connection: close`.
 * - `floor`: the floor, in the same three modes, quiet and with a log of
 *   constant lines as long as ours's into the same pipe ("floor (log)").
 * - `handler`: one handler (below, {@linkcode benchHandler}) served by ours
 *   through `serve({ handler })` and by `Deno.serve`: TechEmpower-style
 *   plaintext in the three modes, JSON and a 4 KiB POST echo in keep-alive,
 *   and a streamed 64 MiB response, timed in MB/s. Beside ours, the same
 *   server with `HELLO_SERVER_FETCH_ONLY=1` ("ours (handler, Fetch API
 *   only)"), which leaves Deno's internals alone as on a Deno where main.ts's
 *   probes find nothing: its ratio to ours is what such a Deno costs.
 * - `memory`: the memory each server spends per idle keep-alive connection.
 * - `https`: ours with `--cert` and `--key` (the book's routes) against the
 *   anchor's `Deno.serve` with the same certificate, a throwaway one made
 *   with `openssl` at the start: keep-alive, pipelined, `Connection: close`
 *   (wrk, which resumes the TLS session on each new connection) and a full
 *   handshake per request (ab, which never resumes one); and the memory
 *   each spends per idle TLS connection.
 * - `websocket`: one echo handler served by ours through its
 *   `upgradeWebSocket` and by `Deno.serve` with `Deno.upgradeWebSocket`,
 *   loaded by the bench's own raw-TCP client with 64-byte and 16 KiB
 *   binary messages over 100 connections, 8 in flight on each, and with
 *   64-byte ones in strict ping-pong (messages per second and the server's
 *   CPU time per message); and the memory each spends per idle WebSocket.
 * - `compression`: one handler ({@linkcode compressionHandler}) answering
 *   `GET /json` with the same ~20 KiB JSON array every time, asked for with
 *   `Accept-Encoding: gzip` over keep-alive: ours gzips it (and, asked
 *   for `br`, brotlis it), ours with `compression: false` and `Deno.serve`
 *   send it as it is, and nginx (`gzip_comp_level 6`, as ours) gzips the
 *   same bytes served as a static file, when `nginx` is on the PATH; each
 *   with the bytes one response takes on the wire (head and body, read
 *   raw and decoded to check them).
 *
 * `wrk` drives the servers in turn (A B C, A B C, ...) for several rounds,
 * the two servers of each target's ratio back to back;
 * the median requests per second, p99 latency and the server process's CPU
 * time per request (from `/proc/PID/stat`, steadier than req/s on a shared
 * machine) are reported, with each server's ratio to its base and to the
 * floor, paired within each round. With `--workers N` it also runs ours with
 * N workers against `deno serve --parallel`. The results are markdown tables
 * on stdout, followed by PASS/FAIL lines for the targets; progress goes to
 * stderr. With the defaults a run takes about 23 minutes on a 2-core machine.
 *
 * Needs `wrk` (`apt-get install -y wrk`), and for `https` also `openssl` and
 * `ab` (apache2-utils); `compression` uses `nginx` when there is one
 * (`apt-get install -y nginx-light`); `taskset` (util-linux) pins the load
 * generator to CPU 0 and the servers to the other CPUs.
 *
 * ```sh
 * deno task bench
 * deno task bench --rounds 1 --duration 2 --only book,floor
 * deno task bench --only https
 * deno task bench --only websocket --rounds 3 --duration 3
 * deno task bench --only compression --rounds 3 --duration 3
 * deno task bench --workers 2 --strict
 * ```
 *
 * Flags: `--rounds N` (5), `--duration S` per run (5), `--connections N`
 * (50, wrk's), `--idle-connections N` (2000, HTTP ones and WebSockets),
 * `--only SECTION,...` (all of book, floor, handler, memory, https,
 * websocket, compression), `--workers N` (off), `--strict` (exit 1 when a
 * target fails). Internal: `--serve anchor|floor|floor-log|deno-handler|
 * ours-handler|deno-ws|ours-ws|deno-json|ours-json|ours-json-plain` runs
 * one server (the anchor over TLS with `--cert FILE --key FILE`),
 * `--download PORT` times downloads of `/stream`, and
 * `--ws-load PORT --size BYTES --window N --connections N --duration S`
 * loads a WebSocket echo.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { fileURLToPath } from "node:url";
import process from "node:process";
import { HELLO_PAGE, NOT_FOUND_PAGE, serve, upgradeWebSocket } from "./main.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** The line every server prints once it listens; the bench reads the port. */
function announce(addr: Deno.NetAddr, scheme = "http"): void {
  console.log(`Listening on ${scheme}://${addr.hostname}:${addr.port}/`);
}

// ---------------------------------------------------------------------------
// The anchor: the same routes and pages, in idiomatic `Deno.serve` style
// ---------------------------------------------------------------------------

const HTML = "text/html; charset=utf-8";
const SLEEP_MS = 5_000;

function page(body: string, status = 200): Response {
  return new Response(body, { status, headers: { "content-type": HTML } });
}

function notAllowed(allow: string): Response {
  return new Response("Method Not Allowed\n", {
    status: 405,
    headers: { allow, "content-type": "text/plain; charset=utf-8" },
  });
}

function pathOf(url: string): string {
  const start = url.indexOf("/", url.indexOf("//") + 2);
  const query = url.indexOf("?", start);
  return url.slice(start, query === -1 ? undefined : query);
}

/** The anchor's handler, also served by `deno serve --parallel`. */
export function anchorHandler(request: Request): Response | Promise<Response> {
  const { method } = request;
  switch (pathOf(request.url)) {
    case "/":
      if (method !== "GET" && method !== "HEAD") return notAllowed("GET, HEAD");
      return page(HELLO_PAGE);
    case "/sleep":
      if (method !== "GET" && method !== "HEAD") return notAllowed("GET, HEAD");
      return new Promise((resolve) =>
        setTimeout(() => resolve(page(HELLO_PAGE)), SLEEP_MS)
      );
    case "/echo":
      if (method !== "POST") return notAllowed("POST");
      return new Response(request.body);
    default:
      return page(NOT_FOUND_PAGE, 404);
  }
}

/** The PEM files of the `https` section's certificate, for a server role. */
interface CertificateFiles {
  cert: string;
  key: string;
}

/** The anchor; with `files`, over TLS with that certificate. */
function serveAnchor(files?: CertificateFiles): void {
  if (!files) {
    Deno.serve(
      { hostname: "127.0.0.1", port: 0, onListen: announce },
      anchorHandler,
    );
    return;
  }
  Deno.serve({
    hostname: "127.0.0.1",
    port: 0,
    cert: Deno.readTextFileSync(files.cert),
    key: Deno.readTextFileSync(files.key),
    onListen: (addr) => announce(addr, "https"),
  }, anchorHandler);
}

/** The `node:http` twin of the anchor, written to a file and run by node. */
function nodeServerSource(): string {
  return `import { createServer } from "node:http";
const HELLO = ${JSON.stringify(HELLO_PAGE)};
const NOT_FOUND = ${JSON.stringify(NOT_FOUND_PAGE)};
const HTML = "text/html; charset=utf-8";
function page(res, status, body) {
  res.writeHead(status, {
    "Content-Type": HTML,
    "Content-Length": Buffer.byteLength(body),
  });
  res.end(body);
}
function notAllowed(res, allow) {
  res.writeHead(405, { Allow: allow, "Content-Type": "text/plain" });
  res.end("Method Not Allowed\\n");
}
const server = createServer((req, res) => {
  const path = req.url.split("?")[0];
  const read = req.method === "GET" || req.method === "HEAD";
  if (path === "/") {
    return read ? page(res, 200, HELLO) : notAllowed(res, "GET, HEAD");
  }
  if (path === "/sleep") {
    if (!read) return notAllowed(res, "GET, HEAD");
    return setTimeout(() => page(res, 200, HELLO), ${SLEEP_MS});
  }
  if (path === "/echo") {
    if (req.method !== "POST") return notAllowed(res, "POST");
    res.writeHead(200);
    return req.pipe(res);
  }
  page(res, 404, NOT_FOUND);
});
server.keepAliveTimeout = 60_000;
server.listen(0, "127.0.0.1", () => {
  console.log("Listening on http://127.0.0.1:" + server.address().port + "/");
});
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => process.exit(0));
}
`;
}

// ---------------------------------------------------------------------------
// The handler: one application, served by ours and by `Deno.serve`
// ---------------------------------------------------------------------------

const PLAINTEXT = "Hello, World!";
const ECHO_SIZE = 4 * 1024;
const STREAM_CHUNK = 64 * 1024;
const STREAM_CHUNKS = 1024;
const STREAM_BYTES = STREAM_CHUNK * STREAM_CHUNKS;

/** 64 MiB in 64 KiB chunks, each made when the server asks for it. */
function streamBody(): ReadableStream<Uint8Array> {
  let sent = 0;
  return new ReadableStream({
    pull(controller) {
      // A fresh chunk each time: a server may keep or transfer what it got.
      controller.enqueue(new Uint8Array(STREAM_CHUNK));
      if (++sent === STREAM_CHUNKS) controller.close();
    },
  });
}

/**
 * The handler rows' application, the same on both servers: `GET /plaintext`
 * and `GET /json` as in the TechEmpower benchmarks, `POST /echo` answering
 * the body it read in full, `GET /stream` a 64 MiB streamed response.
 */
export async function benchHandler(request: Request): Promise<Response> {
  switch (pathOf(request.url)) {
    case "/plaintext":
      return new Response(PLAINTEXT, {
        headers: { "content-type": "text/plain", server: "bench" },
      });
    case "/json":
      return Response.json({ message: PLAINTEXT });
    case "/echo":
      return new Response(await request.arrayBuffer(), {
        headers: { "content-type": "application/octet-stream" },
      });
    case "/stream":
      return new Response(streamBody(), {
        headers: { "content-type": "application/octet-stream" },
      });
    default:
      return new Response("Not Found\n", { status: 404 });
  }
}

function serveDenoHandler(): void {
  Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: announce },
    benchHandler,
  );
}

function serveOursHandler(): void {
  serve({
    hostname: "127.0.0.1",
    port: 0,
    accessLog: false,
    onListen: announce,
    handler: benchHandler,
  });
}

// ---------------------------------------------------------------------------
// Compression: one JSON document, served by ours, `Deno.serve` and nginx
// ---------------------------------------------------------------------------

/** The size the `compression` section's JSON document grows to, at least. */
const COMPRESSION_JSON_SIZE = 20 * 1024;

/**
 * An API's list of user records, as JSON: ids, names, e-mail addresses,
 * cities, dates, amounts, flags and tags, drawn by a fixed linear
 * congruential generator, so that every process that builds it builds the
 * same bytes — text with the repetition real JSON has, not a string
 * repeated. Records are added until it is at least COMPRESSION_JSON_SIZE.
 */
function makeCompressionJson(): Uint8Array<ArrayBuffer> {
  let seed = 20261206;
  const next = (n: number) => {
    seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
    // The high bits: the low ones of such a generator repeat with short
    // periods.
    return Math.floor(seed / 2 ** 32 * n);
  };
  const pick = <T>(list: readonly T[]) => list[next(list.length)];
  const first = [
    "Ada",
    "Alan",
    "Grace",
    "Edsger",
    "Barbara",
    "Donald",
    "Frances",
    "Ken",
    "Radia",
    "Niklaus",
    "Margaret",
    "Dennis",
    "Hedy",
    "Linus",
    "Sophie",
    "Tim",
  ];
  const last = [
    "Lovelace",
    "Turing",
    "Hopper",
    "Dijkstra",
    "Liskov",
    "Knuth",
    "Allen",
    "Thompson",
    "Perlman",
    "Wirth",
    "Hamilton",
    "Ritchie",
    "Lamarr",
    "Torvalds",
    "Wilson",
    "Berners-Lee",
  ];
  const cities = [
    "London",
    "Paris",
    "Berlin",
    "Zürich",
    "Amsterdam",
    "Lisbon",
    "Oslo",
    "Vienna",
    "Prague",
    "Dublin",
    "Madrid",
    "Rome",
  ];
  const tags = [
    "admin",
    "beta",
    "billing",
    "support",
    "premium",
    "trial",
    "legacy",
    "mobile",
    "api",
    "newsletter",
  ];
  const records: unknown[] = [];
  let size = 2;
  for (let id = 1; size < COMPRESSION_JSON_SIZE; id++) {
    const given = pick(first);
    const family = pick(last);
    const record = {
      id,
      uuid: Array.from(
        { length: 4 },
        () => next(0x10000).toString(16).padStart(4, "0"),
      ).join("-"),
      name: `${given} ${family}`,
      email: `${given}.${family}${next(100)}@example.com`.toLowerCase(),
      city: pick(cities),
      registered: new Date(Date.UTC(2015, 0, 1) + next(3650) * 86_400_000)
        .toISOString(),
      balance: next(10_000_000) / 100,
      active: next(4) !== 0,
      tags: Array.from({ length: 1 + next(3) }, () => pick(tags)),
    };
    records.push(record);
    size += JSON.stringify(record).length + 1;
  }
  return encoder.encode(JSON.stringify(records));
}

/** The `compression` section's document, built once by every process. */
const COMPRESSION_JSON = makeCompressionJson();

/**
 * The `compression` section's application: `GET /json` answers the same
 * bytes each time, as `application/json`.
 */
export function compressionHandler(request: Request): Response {
  if (pathOf(request.url) !== "/json") {
    return new Response("Not Found\n", { status: 404 });
  }
  return new Response(COMPRESSION_JSON, {
    headers: { "content-type": "application/json" },
  });
}

function serveDenoJson(): void {
  Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: announce },
    compressionHandler,
  );
}

/** Ours, compressing (the default) or not (`compression: false`). */
function serveOursJson(compression: boolean): void {
  serve({
    hostname: "127.0.0.1",
    port: 0,
    accessLog: false,
    compression,
    onListen: announce,
    handler: compressionHandler,
  });
}

// ---------------------------------------------------------------------------
// WebSockets: one echo, served by ours and by `Deno.serve`
// ---------------------------------------------------------------------------

/** What `Deno.upgradeWebSocket` and ours's `upgradeWebSocket` both return. */
interface Upgrade {
  socket: WebSocket;
  response: Response;
}

/**
 * The `websocket` section's application, the same on both servers: every
 * request is upgraded, and every message sent back as it came.
 */
function echoWebSocket(
  upgrade: (request: Request) => Upgrade,
): (request: Request) => Response {
  return (request) => {
    const { socket, response } = upgrade(request);
    socket.onmessage = (event) => socket.send(event.data);
    return response;
  };
}

function serveDenoWebSocket(): void {
  Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: announce },
    echoWebSocket((request) => Deno.upgradeWebSocket(request)),
  );
}

function serveOursWebSocket(): void {
  serve(
    { hostname: "127.0.0.1", port: 0, accessLog: false, onListen: announce },
    echoWebSocket((request) => upgradeWebSocket(request)),
  );
}

// ---------------------------------------------------------------------------
// The floor: one read and one write per batch of requests, nothing else
// ---------------------------------------------------------------------------

const CR = 13;
const LF = 10;
/** Its replies are constant, so their date is too. */
const FLOOR_DATE = "Thu, 26 Nov 2026 00:00:00 GMT";

function floorReply(close: boolean): Uint8Array {
  const body = encoder.encode(HELLO_PAGE);
  const head = `HTTP/1.1 200 OK\r\nDate: ${FLOOR_DATE}\r\n` +
    `Content-Type: ${HTML}\r\nContent-Length: ${body.length}\r\n` +
    (close ? "Connection: close\r\n" : "") + "\r\n";
  return append(encoder.encode(head), body);
}

const FLOOR_KEEP_ALIVE = floorReply(false);
const FLOOR_CLOSE = floorReply(true);
/** The replies to n pipelined requests, made once for each n. */
const floorBatches: Uint8Array[] = [];

function floorBatch(heads: number, close: boolean): Uint8Array {
  if (close) {
    return heads === 1
      ? FLOOR_CLOSE
      : append(floorBatch(heads - 1, false), FLOOR_CLOSE);
  }
  let batch = floorBatches[heads];
  if (!batch) {
    batch = floorBatches[heads] = new Uint8Array(
      heads * FLOOR_KEEP_ALIVE.length,
    );
    for (let i = 0; i < heads; i++) {
      batch.set(FLOOR_KEEP_ALIVE, i * FLOOR_KEEP_ALIVE.length);
    }
  }
  return batch;
}

/**
 * Counts the head ends (CR LF CR LF, RFC 9112 §2.1) whose last byte lies
 * past `from`; the bytes before it are the end of the previous read.
 */
function countHeadEnds(bytes: Uint8Array, from: number): number {
  let count = 0;
  for (
    let i = bytes.indexOf(LF, from);
    i !== -1;
    i = bytes.indexOf(LF, i + 1)
  ) {
    if (bytes[i - 1] === CR && bytes[i - 2] === LF && bytes[i - 3] === CR) {
      count++;
    }
  }
  return count;
}

const CLOSE_TOKEN = encoder.encode("close");

/**
 * Whether the bytes hold `close` anywhere: the floor only ever reads wrk's
 * requests, which say it in `Connection: close` or not at all.
 */
function asksToClose(bytes: Uint8Array): boolean {
  const first = CLOSE_TOKEN[0];
  for (
    let i = bytes.indexOf(first);
    i !== -1;
    i = bytes.indexOf(first, i + 1)
  ) {
    if (CLOSE_TOKEN.every((byte, k) => bytes[i + k] === byte)) return true;
  }
  return false;
}

async function writeAll(
  conn: { write(bytes: Uint8Array): Promise<number> },
  bytes: Uint8Array,
): Promise<void> {
  let written = await conn.write(bytes);
  while (written < bytes.length) {
    written += await conn.write(bytes.subarray(written));
  }
}

/** Read buffers of closed connections: allocating them is not free. */
const floorBuffers: Uint8Array[] = [];

/**
 * The floor's access log (`--serve floor-log`): per head answered, one
 * constant line as long as ours logs for it, in batches of whole lines of at
 * most a pipe's 64 KiB, one write to stdout at a time, like ours — what any
 * log through `Deno.stdout` costs with nothing formatted, the runtime's own
 * price for the bytes. Lines wait while a write is under way; none is
 * dropped.
 */
class FloorLog {
  static readonly LINE = encoder.encode(
    `127.0.0.1 - - [26/Nov/2026:00:00:00 +0000] "GET / HTTP/1.1" 200 ` +
      `${encoder.encode(HELLO_PAGE).length}\n`,
  );
  static readonly BATCH = Math.floor(64 * 1024 / FloorLog.LINE.length) *
    FloorLog.LINE.length;
  /** A batch of lines, made once: n lines are one copy of its first n. */
  static readonly LINES = (() => {
    const lines = new Uint8Array(FloorLog.BATCH);
    for (let at = 0; at < lines.length; at += FloorLog.LINE.length) {
      lines.set(FloorLog.LINE, at);
    }
    return lines;
  })();
  #buffer = new Uint8Array(4 * FloorLog.BATCH);
  /** The other buffer, while it is not being written. */
  #spare = new Uint8Array(4 * FloorLog.BATCH);
  #used = 0;
  #writing = false;

  constructor() {
    // As ours does on its clock: a partial batch waits at most 250 ms.
    setInterval(() => this.#flush(), 250);
  }

  add(lines: number): void {
    const size = lines * FloorLog.LINE.length;
    if (this.#used + size > this.#buffer.length) {
      const larger = new Uint8Array(2 * (this.#used + size));
      larger.set(this.#buffer.subarray(0, this.#used));
      this.#buffer = larger;
    }
    for (let left = size; left > 0;) {
      const part = Math.min(left, FloorLog.BATCH);
      this.#buffer.set(FloorLog.LINES.subarray(0, part), this.#used);
      this.#used += part;
      left -= part;
    }
    if (this.#used >= FloorLog.BATCH) this.#flush();
  }

  /** Writes what is buffered, a batch at a time, while the spare fills. */
  #flush(): void {
    if (this.#writing || this.#used === 0) return;
    const bytes = this.#buffer.subarray(0, this.#used);
    [this.#buffer, this.#spare] = [this.#spare, this.#buffer];
    this.#used = 0;
    this.#writing = true;
    (async () => {
      for (let at = 0; at < bytes.length; at += FloorLog.BATCH) {
        await writeAll(Deno.stdout, bytes.subarray(at, at + FloorLog.BATCH));
      }
    })().finally(() => {
      this.#writing = false;
      if (this.#used >= FloorLog.BATCH) this.#flush();
    });
  }
}

let floorLog: FloorLog | null = null;

/** Answers each request head read with the hello page, one write per read. */
async function floorConnection(conn: Deno.TcpConn): Promise<void> {
  // Three bytes of the previous read stay in front of each new one, so that
  // a head end split between two reads is still found.
  const buffer = floorBuffers.pop()?.fill(0, 0, 3) ??
    new Uint8Array(3 + 64 * 1024);
  const room = buffer.subarray(3);
  let kept = false;
  try {
    for (;;) {
      const n = await conn.read(room);
      if (n === null) return;
      const bytes = buffer.subarray(0, 3 + n);
      const heads = countHeadEnds(bytes, 3);
      if (heads === 0) {
        buffer.copyWithin(0, n, n + 3);
        continue;
      }
      const close = asksToClose(bytes);
      await writeAll(conn, floorBatch(heads, close));
      floorLog?.add(heads);
      if (close) return;
      if (!kept) {
        // As ours does: a kept connection's next small write must not wait
        // for the ACK of the last (Nagle).
        kept = true;
        conn.setNoDelay(true);
      }
      buffer.copyWithin(0, n, n + 3);
    }
  } catch {
    // Reset by the client: nothing to do.
  } finally {
    conn.close();
    floorBuffers.push(buffer);
  }
}

async function serveFloor(log: boolean): Promise<void> {
  if (log) floorLog = new FloorLog();
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  announce(listener.addr);
  for await (const conn of listener) floorConnection(conn);
}

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

const SECTIONS = [
  "book",
  "floor",
  "handler",
  "memory",
  "https",
  "websocket",
  "compression",
] as const;
type Section = typeof SECTIONS[number];

interface Options {
  rounds: number;
  duration: number;
  connections: number;
  idleConnections: number;
  workers: number;
  strict: boolean;
  /** The sections to run. */
  only: Set<Section>;
}

/**
 * The internal flags, which make this file a server, a download client or
 * a WebSocket load generator (`--ws-load PORT --size BYTES --window N`,
 * with `--connections` and `--duration`).
 */
interface Internal {
  serve?: string;
  download?: number;
  wsLoad?: number;
  /** The WebSocket load generator's message size, in bytes. */
  size: number;
  /** The messages it keeps in flight on each connection. */
  window: number;
  /** With `--cert FILE --key FILE`, the anchor serves HTTPS. */
  files?: CertificateFiles;
}

const USAGE =
  `Usage: deno task bench [--rounds N] [--duration S] [--connections N]
                       [--idle-connections N] [--only SECTION,...]
                       [--workers N] [--strict]
Sections: ${SECTIONS.join(", ")} (default: all)`;

function positiveInt(
  name: string,
  value: string | undefined,
  fallback: number,
) {
  if (value === undefined) return fallback;
  const number = Number(value);
  if (!Number.isInteger(number) || number < 1) {
    throw new Error(`--${name} must be a positive integer, not ${value}`);
  }
  return number;
}

function sections(value: string | undefined): Set<Section> {
  if (value === undefined) return new Set(SECTIONS);
  const names = value.split(",").map((name) => name.trim());
  for (const name of names) {
    if (!(SECTIONS as readonly string[]).includes(name)) {
      throw new Error(
        `--only takes sections among ${SECTIONS.join(", ")}, not "${name}"`,
      );
    }
  }
  return new Set(names as Section[]);
}

function parseOptions(args: string[]): Options & Internal {
  const { values } = parseArgs({
    args,
    options: {
      rounds: { type: "string" },
      duration: { type: "string" },
      connections: { type: "string" },
      "idle-connections": { type: "string" },
      only: { type: "string" },
      workers: { type: "string" },
      strict: { type: "boolean", default: false },
      serve: { type: "string" },
      download: { type: "string" },
      "ws-load": { type: "string" },
      size: { type: "string" },
      window: { type: "string" },
      cert: { type: "string" },
      key: { type: "string" },
      help: { type: "boolean", default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    Deno.exit(0);
  }
  return {
    rounds: positiveInt("rounds", values.rounds, 5),
    duration: positiveInt("duration", values.duration, 5),
    connections: positiveInt("connections", values.connections, 50),
    idleConnections: positiveInt(
      "idle-connections",
      values["idle-connections"],
      2000,
    ),
    workers: positiveInt("workers", values.workers, 1),
    strict: values.strict,
    only: sections(values.only),
    serve: values.serve,
    download: values.download === undefined
      ? undefined
      : positiveInt("download", values.download, 0),
    wsLoad: values["ws-load"] === undefined
      ? undefined
      : positiveInt("ws-load", values["ws-load"], 0),
    size: positiveInt("size", values.size, 64),
    window: positiveInt("window", values.window, WS_WINDOW),
    files: values.cert !== undefined && values.key !== undefined
      ? { cert: values.cert, key: values.key }
      : undefined,
  };
}

// ---------------------------------------------------------------------------
// Subprocesses: every one is tracked, and all are killed at the end
// ---------------------------------------------------------------------------

const children = new Set<Deno.ChildProcess>();
/** The directory of the helper files, removed at the end. */
let tempDir: string | undefined;
/** The `https` section's throwaway certificate: its text and its files. */
let certificate: { pem: string; files: CertificateFiles } | undefined;

function spawn(
  command: string[],
  options: Deno.CommandOptions = {},
): Deno.ChildProcess {
  const child = new Deno.Command(command[0], {
    args: command.slice(1),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    ...options,
    // Deno's update check would look names up and open connections.
    env: { DENO_NO_UPDATE_CHECK: "1", ...options.env },
  }).spawn();
  children.add(child);
  child.status.finally(() => children.delete(child));
  return child;
}

function signal(child: Deno.ChildProcess, name: Deno.Signal): void {
  try {
    child.kill(name);
  } catch {
    // It has already exited.
  }
}

/** SIGTERM every child still running, then SIGKILL those that linger. */
async function stop(targets: Iterable<Deno.ChildProcess>): Promise<void> {
  const list = [...targets];
  for (const child of list) signal(child, "SIGTERM");
  const exited = Promise.allSettled(list.map((child) => child.status));
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise((resolve) => timer = setTimeout(resolve, 3_000));
  await Promise.race([exited, late]);
  clearTimeout(timer);
  for (const child of list) {
    if (children.has(child)) signal(child, "SIGKILL");
  }
  await exited;
}

/** Runs a command to completion and returns its stdout, or null if absent. */
async function probe(command: string[]): Promise<string | null> {
  try {
    const { stdout, stderr } = await new Deno.Command(command[0], {
      args: command.slice(1),
      stdin: "null",
    }).output();
    return decoder.decode(stdout) + decoder.decode(stderr);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return null;
    throw error;
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

interface ServerSpec {
  name: string;
  command: string[];
  env?: Record<string, string>;
  /** It serves HTTPS, with the `https` section's certificate. */
  tls?: boolean;
  /**
   * A server that prints no listening line (nginx): the port it was told
   * to listen on, tried until it takes a connection.
   */
  port?: number;
}

interface Server {
  name: string;
  port: number;
  tls: boolean;
  pid: number;
  child: Deno.ChildProcess;
  /** The last lines the server wrote to stderr, for error messages. */
  stderr(): string;
}

const LISTENING = /Listening on https?:\/\/\S*:(\d+)\//;
const HERE = fileURLToPath(new URL(".", import.meta.url));

/**
 * Reads a stream to its end. Until `onText` returns true, the bytes are
 * decoded and handed to it; afterwards they are only drained.
 */
function drain(
  stream: ReadableStream<Uint8Array>,
  onText: (text: string) => boolean,
): Promise<void> {
  const textDecoder = new TextDecoder();
  let done = false;
  return stream.pipeTo(
    new WritableStream({
      write(chunk) {
        if (!done) done = onText(textDecoder.decode(chunk, { stream: true }));
      },
    }),
  ).catch(() => {});
}

async function startServer(spec: ServerSpec, pin: string[]): Promise<Server> {
  const child = spawn([...pin, ...spec.command], { cwd: HERE, env: spec.env });
  let stderrTail = "";
  let seen = "";
  const { promise, resolve } = Promise.withResolvers<number>();
  const look = (text: string) => {
    seen = (seen + text).slice(-4096);
    const match = seen.match(LISTENING);
    if (match) resolve(Number(match[1]));
    return match !== null;
  };
  drain(child.stdout, look);
  drain(child.stderr, (text) => {
    stderrTail = (stderrTail + text).slice(-2048);
    look(text);
    return false;
  });
  let timer: ReturnType<typeof setTimeout> | undefined;
  let waiting = true;
  const failure = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error("no listening line")), 30_000);
    child.status.then(({ code }) => reject(new Error(`exited (${code})`)));
  });
  if (spec.port !== undefined) {
    const port = spec.port;
    (async () => {
      // Every 50 ms while it starts, 30 s at most, as the timer above.
      for (let tries = 0; waiting && tries < 600; tries++) {
        try {
          (await Deno.connect({ hostname: "127.0.0.1", port })).close();
          return resolve(port);
        } catch {
          await delay(50);
        }
      }
    })();
  }
  try {
    const port = await Promise.race([promise, failure]);
    return {
      name: spec.name,
      port,
      tls: spec.tls ?? false,
      pid: child.pid,
      child,
      stderr: () => stderrTail,
    };
  } catch (error) {
    await stop([child]);
    throw new Error(
      `${spec.name} did not start: ${(error as Error).message}\n${stderrTail}`,
    );
  } finally {
    waiting = false;
    clearTimeout(timer);
  }
}

// ---------------------------------------------------------------------------
// A minimal HTTP/1.1 client, for the sanity checks, the idle connections and
// the downloads
// ---------------------------------------------------------------------------

const GET = encoder.encode("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");

interface Reply {
  status: number;
  head: string;
  body: Uint8Array;
}

function indexOfHeadEnd(bytes: Uint8Array): number {
  for (let i = 3; i < bytes.length; i++) {
    if (
      bytes[i] === 10 && bytes[i - 1] === 13 && bytes[i - 2] === 10 &&
      bytes[i - 3] === 13
    ) return i + 1;
  }
  return -1;
}

function append(a: Uint8Array, b: Uint8Array): Uint8Array {
  const joined = new Uint8Array(a.length + b.length);
  joined.set(a);
  joined.set(b, a.length);
  return joined;
}

/** Reads one response framed by Content-Length (all our routes send one). */
async function readReply(conn: Deno.Conn): Promise<Reply> {
  const chunk = new Uint8Array(4096);
  let data: Uint8Array = new Uint8Array(0);
  let headEnd = -1;
  let length = -1;
  let head = "";
  while (length < 0 || data.length < headEnd + length) {
    const n = await conn.read(chunk);
    if (n === null) throw new Error("connection closed mid-response");
    data = append(data, chunk.subarray(0, n));
    if (headEnd < 0 && (headEnd = indexOfHeadEnd(data)) > 0) {
      head = decoder.decode(data.subarray(0, headEnd));
      const match = head.match(/\r\ncontent-length:\s*(\d+)/i);
      if (!match) throw new Error("response without Content-Length");
      length = Number(match[1]);
    }
  }
  const status = Number(head.slice(9, 12));
  return { status, head, body: data.subarray(headEnd, headEnd + length) };
}

/**
 * A connection to a server on `port`; with `tls`, one that trusts the
 * `https` section's certificate (made at the start, see makeCertificate).
 */
function connectTo(port: number, tls: boolean): Promise<Deno.Conn> {
  if (!tls) return Deno.connect({ hostname: "127.0.0.1", port });
  if (!certificate) throw new Error("no certificate was made");
  return Deno.connectTls({
    hostname: "127.0.0.1",
    port,
    caCerts: [certificate.pem],
  });
}

/** A connection that has been answered one `GET /` (over TLS: handshaken). */
async function openKeptAlive(port: number, tls = false): Promise<Deno.Conn> {
  const conn = await connectTo(port, tls);
  try {
    await conn.write(GET);
    const { status } = await readReply(conn);
    if (status !== 200) throw new Error(`status ${status}`);
    return conn;
  } catch (error) {
    conn.close();
    throw error;
  }
}

/** Checks that a server answers `GET /` with exactly the hello page. */
async function checkHello(server: Server): Promise<void> {
  const conn = await openKeptAlive(server.port, server.tls);
  try {
    await conn.write(GET);
    const { body } = await readReply(conn);
    if (decoder.decode(body) !== HELLO_PAGE) {
      throw new Error(`${server.name} does not serve the same hello page`);
    }
  } finally {
    conn.close();
  }
}

/** Sends one request on a new connection and reads the reply. */
async function exchange(port: number, request: Uint8Array): Promise<Reply> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await conn.write(request);
    return await readReply(conn);
  } finally {
    conn.close();
  }
}

function get(path: string): Uint8Array {
  return encoder.encode(`GET ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`);
}

const ECHO_BODY = encoder.encode("x".repeat(ECHO_SIZE));

/** Checks that a server answers the handler's routes as the handler says. */
async function checkHandler(server: Server): Promise<void> {
  const expect = (ok: boolean, what: string) => {
    if (!ok) {
      throw new Error(`${server.name} does not serve the handler: ${what}`);
    }
  };
  const plaintext = await exchange(server.port, get("/plaintext"));
  expect(
    plaintext.status === 200 && decoder.decode(plaintext.body) === PLAINTEXT &&
      /\r\ncontent-type: text\/plain\r\n/i.test(plaintext.head) &&
      /\r\nserver: bench\r\n/i.test(plaintext.head),
    `GET /plaintext is\n${plaintext.head}`,
  );
  const json = await exchange(server.port, get("/json"));
  expect(
    decoder.decode(json.body) === JSON.stringify({ message: PLAINTEXT }),
    `GET /json is\n${json.head}`,
  );
  const post = encoder.encode(
    `POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n` +
      `Content-Length: ${ECHO_SIZE}\r\n\r\n`,
  );
  const echo = await exchange(server.port, append(post, ECHO_BODY));
  expect(
    decoder.decode(echo.body) === decoder.decode(ECHO_BODY),
    `POST /echo is\n${echo.head}`,
  );
}

/** A response read whole, and what it took on the wire. */
interface WholeReply {
  head: string;
  /** The body, without any chunked framing. */
  body: Uint8Array;
  /** The bytes the response took: head, body and any chunk framing. */
  wire: number;
}

/** The largest response readWhole takes. */
const WHOLE_MAX = 16 * 1024 * 1024;

function indexOfCrlf(bytes: Uint8Array, from: number): number {
  for (
    let i = bytes.indexOf(LF, from + 1);
    i !== -1;
    i = bytes.indexOf(LF, i + 1)
  ) {
    if (bytes[i - 1] === CR) return i - 1;
  }
  return -1;
}

/**
 * Reads one whole response, framed by Content-Length or chunked (RFC 9112
 * §6.3, §7.1) — nginx's gzip sends no length — and counts its bytes as they
 * came.
 */
async function readWhole(conn: Deno.Conn): Promise<WholeReply> {
  const chunk = new Uint8Array(64 * 1024);
  let data: Uint8Array = new Uint8Array(0);
  const more = async () => {
    const n = await conn.read(chunk);
    if (n === null) throw new Error("connection closed mid-response");
    data = append(data, chunk.subarray(0, n));
    if (data.length > WHOLE_MAX) throw new Error("response too large");
  };
  let headEnd: number;
  while ((headEnd = indexOfHeadEnd(data)) < 0) await more();
  const head = decoder.decode(data.subarray(0, headEnd));
  const length = head.match(/\r\ncontent-length:\s*(\d+)/i);
  if (length) {
    const end = headEnd + Number(length[1]);
    while (data.length < end) await more();
    return { head, body: data.slice(headEnd, end), wire: end };
  }
  if (!/\r\ntransfer-encoding:[^\r]*chunked/i.test(head)) {
    throw new Error(`response with neither length nor chunks:\n${head}`);
  }
  /** The end of the line that starts at `at`, once it has come. */
  const line = async (at: number) => {
    let end: number;
    while ((end = indexOfCrlf(data, at)) < 0) await more();
    return end;
  };
  const parts: Uint8Array[] = [];
  let at = headEnd;
  // Each chunk is at least one byte of WHOLE_MAX: this many bound them.
  for (let chunks = 0; chunks <= WHOLE_MAX; chunks++) {
    const end = await line(at);
    const size = parseInt(decoder.decode(data.subarray(at, end)), 16);
    if (!Number.isInteger(size) || size < 0) {
      throw new Error(`bad chunk size at byte ${at}`);
    }
    at = end + 2;
    if (size === 0) {
      // Trailer fields, if any, up to an empty line.
      for (let end = await line(at); end !== at; end = await line(at)) {
        at = end + 2;
      }
      let length = 0;
      for (const part of parts) length += part.length;
      const body = new Uint8Array(length);
      length = 0;
      for (const part of parts) {
        body.set(part, length);
        length += part.length;
      }
      return { head, body, wire: at + 2 };
    }
    while (data.length < at + size + 2) await more();
    parts.push(data.slice(at, at + size));
    at += size + 2;
  }
  throw new Error("too many chunks");
}

/** A response's field, the first of that name, or null. */
function fieldOf(head: string, name: string): string | null {
  const match = head.match(new RegExp(`\r\n${name}:[ \t]*([^\r]*)`, "i"));
  return match ? match[1].trim() : null;
}

/** What a response to the `compression` section's request took. */
interface Wire {
  /** Its Content-Encoding, "identity" without one. */
  coding: string;
  /** Its bytes on the wire: head, body and any chunk framing. */
  bytes: number;
}

/** The wire figures, by `workload|server`, measured at the start. */
const wires = new Map<string, Wire>();

/**
 * Sends each of the `compression` section's workloads that the server has
 * one request, as wrk would (keep-alive, its Accept-Encoding), reads the
 * response whole, checks that it decodes to the document, and keeps its
 * coding and size on the wire.
 */
async function checkCompression(
  server: Server,
  workloads: Workload[],
): Promise<void> {
  const zlib = await import("node:zlib");
  for (const workload of workloads) {
    const request = encoder.encode(
      `GET ${workload.path} HTTP/1.1\r\nHost: 127.0.0.1:${server.port}\r\n` +
        (workload.headers ?? []).map((line) => `${line}\r\n`).join("") +
        "\r\n",
    );
    const conn = await Deno.connect({
      hostname: "127.0.0.1",
      port: server.port,
    });
    // A server that stalls must not stall the bench: the read then fails.
    const timer = setTimeout(() => conn.close(), 10_000);
    let reply: WholeReply;
    try {
      await writeAll(conn, request);
      reply = await readWhole(conn);
    } finally {
      clearTimeout(timer);
      try {
        conn.close();
      } catch {
        // Closed by the timer.
      }
    }
    const fail = (what: string) => {
      throw new Error(
        `${server.name}, ${workload.name}: ${what}\n${reply.head}`,
      );
    };
    if (!reply.head.startsWith("HTTP/1.1 200 ")) fail("not a 200");
    if (fieldOf(reply.head, "content-type") !== "application/json") {
      fail("not application/json");
    }
    const coding = fieldOf(reply.head, "content-encoding")?.toLowerCase() ??
      "identity";
    if (coding !== "gzip" && coding !== "br" && coding !== "identity") {
      fail(`unexpected coding ${coding}`);
    }
    let decoded: Uint8Array;
    try {
      decoded = coding === "gzip"
        ? zlib.gunzipSync(reply.body)
        : coding === "br"
        ? zlib.brotliDecompressSync(reply.body)
        : reply.body;
    } catch (error) {
      return fail(`the ${coding} body does not decode: ${error}`);
    }
    if (!sameBytes(decoded, COMPRESSION_JSON)) {
      fail("the body does not decode to the document");
    }
    wires.set(key(workload, server.name), { coding, bytes: reply.wire });
  }
}

/** How many times in a row a sample downloads the streamed response. */
const DOWNLOADS = 8;

/**
 * Downloads `/stream` from `port` DOWNLOADS times, each on a new connection
 * closed by the server at the end, discarding the bytes; prints the body
 * bytes and the seconds taken as JSON. Run pinned, like wrk.
 */
async function download(port: number): Promise<void> {
  const request = encoder.encode(
    "GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
  );
  const buffer = new Uint8Array(256 * 1024);
  let seconds = 0;
  for (let i = 0; i < DOWNLOADS; i++) {
    const started = performance.now();
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    let received = 0;
    let status = "";
    try {
      await conn.write(request);
      for (let n; (n = await conn.read(buffer)) !== null;) {
        if (received === 0) status = decoder.decode(buffer.subarray(0, 12));
        received += n;
      }
    } finally {
      conn.close();
    }
    seconds += (performance.now() - started) / 1000;
    // The framing adds a few bytes per chunk; missing bytes mean a cut.
    if (status !== "HTTP/1.1 200" || received < STREAM_BYTES) {
      throw new Error(`/stream: "${status}", ${received} bytes`);
    }
  }
  console.log(JSON.stringify({ bytes: DOWNLOADS * STREAM_BYTES, seconds }));
}

// ---------------------------------------------------------------------------
// A raw WebSocket client, for the checks, the idle sockets and the load
// ---------------------------------------------------------------------------

/**
 * RFC 6455's example key (§1.3) and its accept value. The key only makes
 * the server prove it read the handshake, so one fixed key does, and the
 * client need not hash anything.
 */
const WS_KEY = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

const WS_UPGRADE = encoder.encode(
  "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n" +
    `Connection: Upgrade\r\nSec-WebSocket-Key: ${WS_KEY}\r\n` +
    "Sec-WebSocket-Version: 13\r\n\r\n",
);

/**
 * The mask of every frame the client sends. RFC 6455 §5.3 asks for a new,
 * unpredictable one per frame, against intermediaries that would take a
 * client's bytes for their own; on loopback to a server that must unmask
 * whatever mask comes, one constant lets each message be masked once,
 * before the clock starts, so that the client spends nothing per byte.
 */
const WS_MASK = new Uint8Array([0x5a, 0xc3, 0x17, 0xe8]);

/** FIN with the binary opcode (RFC 6455 §5.2): a whole binary message. */
const WS_BINARY = 0x82;

/** A message's payload: bytes that vary, so a misplaced one shows. */
function wsPayload(size: number): Uint8Array {
  return Uint8Array.from({ length: size }, (_, i) => (i * 31 + 7) & 0xff);
}

/**
 * The header of a binary frame of `size` bytes (RFC 6455 §5.2), its length
 * in the shortest form, which is the form a server must send; with the
 * mask bit and key when a client sends it.
 */
function wsHead(size: number, masked: boolean): Uint8Array {
  const extra = size < 126 ? 0 : size < 0x10000 ? 2 : 8;
  const head = new Uint8Array(2 + extra + (masked ? 4 : 0));
  const view = new DataView(head.buffer);
  head[0] = WS_BINARY;
  if (extra === 0) head[1] = size;
  else if (extra === 2) {
    head[1] = 126;
    view.setUint16(2, size);
  } else {
    head[1] = 127;
    view.setBigUint64(2, BigInt(size));
  }
  if (masked) {
    head[1] |= 0x80;
    head.set(WS_MASK, 2 + extra);
  }
  return head;
}

/** The frame the client sends for a message of `size` bytes, masked. */
function wsClientFrame(size: number): Uint8Array {
  const payload = wsPayload(size).map((byte, i) => byte ^ WS_MASK[i & 3]);
  return append(wsHead(size, true), payload);
}

/** The frame an echo answers it with: the same payload, unmasked. */
function wsEchoFrame(size: number): Uint8Array {
  return append(wsHead(size, false), wsPayload(size));
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((byte, i) => byte === b[i]);
}

/**
 * A connection upgraded to a WebSocket (the server's 101 carries the right
 * accept value), on which one binary message of `size` bytes has been
 * echoed back intact.
 */
async function openWebSocket(port: number, size: number): Promise<Deno.Conn> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    // Small writes go out at once, not after the ACK of the last (Nagle).
    conn.setNoDelay(true);
    await writeAll(conn, WS_UPGRADE);
    const chunk = new Uint8Array(64 * 1024);
    let data: Uint8Array = new Uint8Array(0);
    let headEnd = -1;
    const more = async () => {
      const n = await conn.read(chunk);
      if (n === null) throw new Error("WebSocket closed during the handshake");
      data = append(data, chunk.subarray(0, n));
    };
    while ((headEnd = indexOfHeadEnd(data)) < 0) {
      if (data.length > 16 * 1024) throw new Error("no end to the 101's head");
      await more();
    }
    const head = decoder.decode(data.subarray(0, headEnd));
    const accept = head.split("\r\n").find((line) =>
      /^sec-websocket-accept:/i.test(line)
    );
    if (
      !head.startsWith("HTTP/1.1 101 ") ||
      accept?.slice(accept.indexOf(":") + 1).trim() !== WS_ACCEPT
    ) {
      throw new Error(`not a WebSocket upgrade:\n${head}`);
    }
    const echo = wsEchoFrame(size);
    await writeAll(conn, wsClientFrame(size));
    while (data.length < headEnd + echo.length) await more();
    if (!sameBytes(data.subarray(headEnd), echo)) {
      throw new Error(`the echo of a ${size}-byte message differs`);
    }
    return conn;
  } catch (error) {
    conn.close();
    throw error;
  }
}

/** Checks that a server echoes a small and a large WebSocket message. */
async function checkWebSocket(server: Server): Promise<void> {
  for (const size of WS_SIZES) {
    const conn = await openWebSocket(server.port, size).catch((error) => {
      throw new Error(`${server.name}: ${error.message}`);
    });
    conn.close();
  }
}

/**
 * Counts the frames a server sends from their headers alone (RFC 6455
 * §5.2), skipping the payloads unread, for a client that needs no more than
 * their number. Every frame must be the echo: an unmasked, whole binary
 * message of the size sent.
 */
class EchoCounter {
  /** Payload bytes of the frame under way still to come. */
  #left = 0;
  /** The header under way, which a read may cut anywhere. */
  #head = new Uint8Array(14);
  #view = new DataView(this.#head.buffer);
  #have = 0;

  constructor(readonly size: number) {}

  /** The frames that end within the first `n` bytes of `bytes`. */
  count(bytes: Uint8Array, n: number): number {
    let frames = 0;
    for (let at = 0; at < n;) {
      if (this.#left > 0) {
        const skipped = Math.min(this.#left, n - at);
        this.#left -= skipped;
        at += skipped;
        if (this.#left === 0) frames++;
        continue;
      }
      const head = this.#head;
      head[this.#have++] = bytes[at++];
      if (this.#have < 2) continue;
      const code = head[1] & 0x7f;
      const extra = code === 127 ? 8 : code === 126 ? 2 : 0;
      if (this.#have < 2 + extra) continue;
      const length = extra === 0
        ? code
        : extra === 2
        ? this.#view.getUint16(2)
        : Number(this.#view.getBigUint64(2));
      if (head[0] !== WS_BINARY || head[1] & 0x80 || length !== this.size) {
        throw new Error(
          `unexpected frame: ${head[0].toString(16)} ` +
            `${head[1].toString(16)}, ${length} bytes`,
        );
      }
      this.#have = 0;
      if (length === 0) frames++;
      else this.#left = length;
    }
    return frames;
  }
}

/** What the WebSocket load generator prints when its time is up. */
interface WebSocketReport {
  /** Echoes received within the timed window. */
  messages: number;
  /** The timed window, from the first message sent. */
  seconds: number;
  /** Connections that failed before the end: closed, or a wrong frame. */
  errors: number;
  /** The generator's own CPU time in the window (user + system). */
  cpuSeconds: number;
}

/**
 * The WebSocket load generator (`--ws-load PORT`): `connections` upgraded
 * connections, each of which keeps `inFlight` messages of `size` bytes in
 * flight for `seconds` — it sends that many at the start, and as many as
 * each read brings echoes of, in one write — and prints the echoes counted
 * as JSON. The frames are made before the clock starts, and the echoes are
 * counted from their headers: what it does per message is a read and a
 * write shared by all the echoes that read brought. Run pinned, like wrk.
 */
async function webSocketLoad(
  port: number,
  connections: number,
  size: number,
  inFlight: number,
  seconds: number,
): Promise<void> {
  const frame = wsClientFrame(size);
  const window = new Uint8Array(inFlight * frame.length);
  for (let i = 0; i < inFlight; i++) window.set(frame, i * frame.length);
  const conns: Deno.Conn[] = [];
  // A hundred at a time, as openIdle does: no burst past a listen backlog.
  while (conns.length < connections) {
    const batch = Math.min(100, connections - conns.length);
    conns.push(
      ...await Promise.all(
        Array.from({ length: batch }, () => openWebSocket(port, size)),
      ),
    );
  }
  let messages = 0;
  let errors = 0;
  let running = true;
  const started = performance.now();
  const cpu = process.cpuUsage();
  const { promise: done, resolve } = Promise.withResolvers<WebSocketReport>();
  setTimeout(() => {
    running = false;
    const used = process.cpuUsage(cpu);
    resolve({
      messages,
      seconds: (performance.now() - started) / 1000,
      errors,
      cpuSeconds: (used.user + used.system) / 1e6,
    });
    // The reads still waiting fail, and their loops end.
    for (const conn of conns) conn.close();
  }, seconds * 1000);
  const loops = conns.map(async (conn) => {
    const counter = new EchoCounter(size);
    const buffer = new Uint8Array(64 * 1024);
    try {
      await writeAll(conn, window);
      while (running) {
        const n = await conn.read(buffer);
        if (n === null) throw new Error("closed by the server");
        const echoed = counter.count(buffer, n);
        if (echoed === 0 || !running) continue;
        messages += echoed;
        await writeAll(conn, window.subarray(0, echoed * frame.length));
      }
    } catch (error) {
      if (running) {
        errors++;
        console.error(`WebSocket load: ${(error as Error).message}`);
      }
    }
  });
  const report = await done;
  await Promise.all(loops);
  console.log(JSON.stringify(report));
}

// ---------------------------------------------------------------------------
// wrk, and the downloads
// ---------------------------------------------------------------------------

type Mode = "keep-alive" | "pipelined" | "close";
const MODES: Mode[] = ["keep-alive", "pipelined", "close"];
const PIPELINE_DEPTH = 16;

/** What the clients ask for, and how; a row of the report. */
interface Workload {
  name: string;
  /**
   * How wrk sends the requests; "stream" times downloads instead,
   * "handshake" has ab make a full TLS handshake for every request, and
   * "websocket" has the bench's own client send messages of `size` bytes to
   * an echo.
   */
  mode: Mode | "stream" | "handshake" | "websocket";
  path: string;
  /** A WebSocket message's size, in bytes. */
  size?: number;
  /** The WebSocket messages in flight on each connection. */
  window?: number;
  /** A wrk script among the helper files, which sets method and body. */
  script?: string;
  /** Header lines wrk adds to every request (`-H`). */
  headers?: string[];
  /** Over HTTPS, to the servers of the `https` section. */
  tls?: boolean;
}

const BOOK: Workload[] = MODES.map((mode) => ({ name: mode, mode, path: "/" }));
const STREAM: Workload = {
  name: "stream 64 MiB",
  mode: "stream",
  path: "/stream",
};
const HANDLER: Workload[] = [
  ...MODES.map((mode) => ({
    name: `plaintext ${mode}`,
    mode,
    path: "/plaintext",
  })),
  { name: "json keep-alive", mode: "keep-alive", path: "/json" },
  {
    name: "echo 4 KiB keep-alive",
    mode: "keep-alive",
    path: "/echo",
    script: "post.lua",
  },
  STREAM,
];
/**
 * The `https` section's rows. wrk keeps the TLS session of a connection it
 * closes and resumes it on the next (`SSL_clear`, then a TLS 1.3 PSK with
 * a fresh key exchange, but no certificate and no signature): its
 * `Connection: close` row is a resumed handshake per request. ab makes a
 * new TLS session for every request (HTTP/1.0, no keep-alive), so the full
 * handshake row is its.
 */
const HTTPS: Workload[] = [
  ...MODES.map((mode) => ({
    name: mode === "close" ? "https close (resumed)" : `https ${mode}`,
    mode,
    path: "/",
    tls: true,
  })),
  {
    name: "https full handshake",
    mode: "handshake",
    path: "/",
    tls: true,
  },
];

/**
 * The `compression` section's rows: the JSON document asked for gzip, the
 * one coding nginx's gzip module speaks, and asked for brotli (ours only).
 */
const COMPRESSION_GZIP: Workload = {
  name: "json 20 KiB gzip keep-alive",
  mode: "keep-alive",
  path: "/json",
  headers: ["Accept-Encoding: gzip"],
};
const COMPRESSION_BR: Workload = {
  name: "json 20 KiB br keep-alive",
  mode: "keep-alive",
  path: "/json",
  headers: ["Accept-Encoding: br"],
};
const COMPRESSION = [COMPRESSION_GZIP, COMPRESSION_BR];

/** The `websocket` section's message sizes, one row each. */
const WS_SIZES = [64, 16 * 1024];
/** The WebSocket connections the load generator keeps busy. */
const WS_CONNECTIONS = 100;
/**
 * The messages each WebSocket connection keeps in flight in the echo rows:
 * some pipelining, as a chatty client has. In strict ping-pong a message
 * costs the client a read and a write, about as much CPU as `Deno.serve`
 * spends on it, so the client, on its one CPU, nears being the bottleneck,
 * and both sides idle while the other wakes up. With 8, a read brings the
 * client one to eight echoes and one write answers them all: it spends
 * about two thirds of what `Deno.serve` does per message, and the server's
 * CPU is the one that fills. At most 800 are in flight over the 100
 * connections: still no bulk transfer.
 */
const WS_WINDOW = 8;
const WS_ECHOES: Workload[] = WS_SIZES.map((size) => ({
  name: `ws echo ${size < 1024 ? `${size} B` : `${size / 1024} KiB`}`,
  mode: "websocket",
  path: "/",
  size,
  window: WS_WINDOW,
}));
/**
 * Strict ping-pong, one message in flight per connection, without a
 * target: a server that answers all the messages of a read in one write
 * gains much from the window, and this row shows what a message costs it
 * without one.
 */
const WS_PING_PONG: Workload = {
  name: "ws echo 64 B ping-pong",
  mode: "websocket",
  path: "/",
  size: 64,
  window: 1,
};
const WEBSOCKET = [...WS_ECHOES, WS_PING_PONG];

// wrk.format() with no arguments takes the path from the URL.
const PIPELINE_LUA = `-- ${PIPELINE_DEPTH} requests per write
local batch
function init(args)
  local requests = {}
  for i = 1, ${PIPELINE_DEPTH} do requests[i] = wrk.format() end
  batch = table.concat(requests)
end
function request()
  return batch
end
`;

const POST_LUA = `-- a POST of ${ECHO_SIZE} bytes
wrk.method = "POST"
wrk.body = string.rep("x", ${ECHO_SIZE})
wrk.headers["Content-Type"] = "application/octet-stream"
`;

interface Sample {
  /** Requests per second; for the stream, MB (10^6 bytes) per second. */
  rate: number;
  p99: number;
  errors: number;
  /** The server's CPU time during the run, in cores (1 = one busy core). */
  cpu: number;
  /**
   * The server's CPU time per request (per download for the stream, per
   * message echoed for WebSockets), µs.
   */
  cpuPerRequest: number;
  /** The WebSocket load generator's CPU time, in cores. */
  clientCpu?: number;
  /** The bytes wrk read per response, head and body (wrk's "read" ÷ count). */
  bytesPerResponse?: number;
}

const UNIT_MS: Record<string, number> = {
  us: 1e-3,
  ms: 1,
  s: 1e3,
  m: 60e3,
  h: 3600e3,
};

interface WrkReport {
  rate: number;
  requests: number;
  p99: number;
  errors: number;
  /** The bytes read, as wrk rounds them (to 2 decimals of KiB, MiB...). */
  bytes?: number;
}

/** wrk's binary units (its `format_binary`): 1 KB = 1024 B. */
const WRK_UNITS: Record<string, number> = {
  "": 1,
  B: 1,
  KB: 2 ** 10,
  MB: 2 ** 20,
  GB: 2 ** 30,
  TB: 2 ** 40,
};

/** Parses wrk's report: requests, p99 in ms, socket and status errors. */
function parseWrk(output: string): WrkReport {
  const rate = output.match(/Requests\/sec:\s+([\d.]+)/);
  const requests = output.match(/(\d+) requests in /);
  const p99 = output.match(/^\s*99(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\b/m);
  if (!rate || !requests || !p99) {
    throw new Error(`unexpected wrk output:\n${output}`);
  }
  let errors = 0;
  const socket = output.match(
    /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/,
  );
  if (socket) errors += socket.slice(1).reduce((sum, n) => sum + Number(n), 0);
  const status = output.match(/Non-2xx or 3xx responses: (\d+)/);
  if (status) errors += Number(status[1]);
  const read = output.match(/requests in [^,]+, ([\d.]+)([KMGT]?B?) read/);
  // wrk sometimes prints 0.00us percentiles (wg/wrk#236, #354), mostly
  // when pipelining: a zero is no measurement.
  const p99ms = Number(p99[1]) * UNIT_MS[p99[2]];
  return {
    rate: Number(rate[1]),
    requests: Number(requests[1]),
    p99: p99ms > 0 ? p99ms : NaN,
    errors,
    bytes: read ? Number(read[1]) * WRK_UNITS[read[2]] : undefined,
  };
}

interface Load {
  pin: string[];
  connections: number;
  duration: number;
  /** The directory of the wrk scripts. */
  dir: string;
}

function wrkArgs(workload: Workload, load: Load): string[] {
  const headers = (workload.headers ?? []).flatMap((line) => ["-H", line]);
  if (workload.script) {
    return [...headers, "-s", `${load.dir}/${workload.script}`];
  }
  if (workload.mode === "pipelined") {
    return [...headers, "-s", `${load.dir}/pipeline.lua`];
  }
  if (workload.mode === "close") {
    return [...headers, "-H", "Connection: close"];
  }
  return headers;
}

/**
 * Runs a command to its end, killed after `seconds`, with `env` added to
 * the environment; returns its stdout.
 */
async function outputOf(
  command: string[],
  seconds: number,
  env: Record<string, string> = {},
): Promise<string> {
  const child = spawn(command, { cwd: HERE, env });
  const timer = setTimeout(() => signal(child, "SIGKILL"), seconds * 1000);
  try {
    const { code, stdout, stderr } = await child.output();
    const output = decoder.decode(stdout);
    if (code !== 0) {
      throw new Error(
        `${command.join(" ")} failed (${code}):\n` +
          output + decoder.decode(stderr),
      );
    }
    return output;
  } finally {
    clearTimeout(timer);
  }
}

function urlOf(server: Server, workload: Workload): string {
  const scheme = server.tls ? "https" : "http";
  return `${scheme}://127.0.0.1:${server.port}${workload.path}`;
}

/** Runs wrk against `server`, timing the server's CPU meanwhile. */
function runWrk(
  server: Server,
  workload: Workload,
  load: Load,
): Promise<Sample> {
  return measured(server, load, [
    ...load.pin,
    "wrk",
    "-t1",
    `-c${load.connections}`,
    `-d${load.duration}s`,
    "--latency",
    ...wrkArgs(workload, load),
    urlOf(server, workload),
  ], parseWrk);
}

/**
 * Runs a load generator's `command` against `server`, and reports what its
 * output says (through `parse`) beside the server's CPU time meanwhile.
 */
async function measured(
  server: Server,
  load: Load,
  command: string[],
  parse: (output: string) => WrkReport,
): Promise<Sample> {
  const ticks = await cpuTicks(server.pid);
  const started = performance.now();
  const output = await outputOf(command, load.duration + 30);
  const seconds = (performance.now() - started) / 1000;
  const cpuSeconds = (await cpuTicks(server.pid) - ticks) / CLOCK_TICKS;
  const { rate, requests, p99, errors, bytes } = parse(output);
  return {
    rate,
    p99,
    errors,
    cpu: cpuSeconds / seconds,
    cpuPerRequest: cpuSeconds * 1e6 / requests,
    bytesPerResponse: bytes === undefined ? undefined : bytes / requests,
  };
}

/**
 * Parses ab's report: completed requests, the rate, p99 in ms (ab rounds it
 * to whole ms) and the failures, counted as errors.
 */
function parseAb(output: string): WrkReport {
  const requests = output.match(/^Complete requests:\s+(\d+)/m);
  const rate = output.match(/^Requests per second:\s+([\d.]+)/m);
  const failed = output.match(/^Failed requests:\s+(\d+)/m);
  if (!requests || !rate || !failed) {
    throw new Error(`unexpected ab output:\n${output}`);
  }
  const p99 = output.match(/^\s*99%\s+(\d+)/m);
  const non2xx = output.match(/^Non-2xx responses:\s+(\d+)/m);
  return {
    rate: Number(rate[1]),
    requests: Number(requests[1]),
    p99: p99 ? Number(p99[1]) : NaN,
    errors: Number(failed[1]) + Number(non2xx?.[1] ?? 0),
  };
}

/**
 * Runs ab against `server` for the run's duration: a new connection and a
 * full TLS handshake for each request. `-r` counts a failed read as an
 * error rather than ending the run.
 */
function runAb(
  server: Server,
  workload: Workload,
  load: Load,
): Promise<Sample> {
  return measured(server, load, [
    ...load.pin,
    "ab",
    "-r",
    "-q",
    "-c",
    String(load.connections),
    "-t",
    String(load.duration),
    urlOf(server, workload),
  ], parseAb);
}

/** Times DOWNLOADS downloads of the streamed response, by a pinned client. */
async function runDownloads(server: Server, load: Load): Promise<Sample> {
  const ticks = await cpuTicks(server.pid);
  const output = await outputOf([
    ...load.pin,
    ...ROLE,
    "--download",
    String(server.port),
  ], 120);
  const cpuSeconds = (await cpuTicks(server.pid) - ticks) / CLOCK_TICKS;
  const { bytes, seconds } = JSON.parse(output);
  return {
    rate: bytes / seconds / 1e6,
    p99: NaN,
    errors: 0,
    cpu: cpuSeconds / seconds,
    cpuPerRequest: cpuSeconds * 1e6 / DOWNLOADS,
  };
}

/**
 * Runs the WebSocket load generator against `server`, pinned like wrk. The
 * server's CPU time is taken around the whole run, handshakes and the last
 * echoes in flight included, and divided by the echoes counted in the timed
 * window; its share of a core is over that window, which is most of it.
 */
async function runWebSocketLoad(
  server: Server,
  workload: Workload,
  load: Load,
): Promise<Sample> {
  const ticks = await cpuTicks(server.pid);
  const output = await outputOf([
    ...load.pin,
    ...ROLE,
    "--ws-load",
    String(server.port),
    "--connections",
    String(WS_CONNECTIONS),
    "--size",
    String(workload.size),
    "--window",
    String(workload.window),
    "--duration",
    String(load.duration),
  ], load.duration + 30);
  const cpuSeconds = (await cpuTicks(server.pid) - ticks) / CLOCK_TICKS;
  const report: WebSocketReport = JSON.parse(output);
  return {
    rate: report.messages / report.seconds,
    p99: NaN,
    errors: report.errors,
    cpu: cpuSeconds / report.seconds,
    cpuPerRequest: cpuSeconds * 1e6 / report.messages,
    clientCpu: report.cpuSeconds / report.seconds,
  };
}

function runWorkload(
  server: Server,
  workload: Workload,
  load: Load,
): Promise<Sample> {
  if (workload.mode === "stream") return runDownloads(server, load);
  if (workload.mode === "websocket") {
    return runWebSocketLoad(server, workload, load);
  }
  if (workload.mode === "handshake") return runAb(server, workload, load);
  return runWrk(server, workload, load);
}

// ---------------------------------------------------------------------------
// Memory per idle keep-alive connection
// ---------------------------------------------------------------------------

interface Memory {
  connections: number;
  beforeKiB: number;
  afterKiB: number;
  /** Connections still established on the server's side when measured. */
  open: number;
  kibPerConnection: number;
}

/** Reads a file under /proc (Deno itself needs --allow-all for that). */
async function readProc(path: string): Promise<string> {
  const { code, stdout } = await new Deno.Command("cat", {
    args: [path],
    stdin: "null",
    stderr: "null",
  }).output();
  if (code !== 0) throw new Error(`cannot read ${path}`);
  return decoder.decode(stdout);
}

/** Linux's USER_HZ, the unit of /proc/PID/stat times, on every arch. */
const CLOCK_TICKS = 100;

/** User plus system CPU time of a process, all threads, in clock ticks. */
async function cpuTicks(pid: number): Promise<number> {
  const stat = await readProc(`/proc/${pid}/stat`);
  // Fields after the parenthesized command name, from field 3 (state) on.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(fields[11]) + Number(fields[12]);
}

async function rssKiB(pid: number): Promise<number> {
  const status = await readProc(`/proc/${pid}/status`);
  const match = status.match(/^VmRSS:\s+(\d+) kB/m);
  if (!match) throw new Error(`no VmRSS for ${pid}`);
  return Number(match[1]);
}

/** Counts the established TCP connections whose local port is `port`. */
async function established(port: number): Promise<number> {
  const table = await readProc("/proc/net/tcp");
  const local = `:${port.toString(16).toUpperCase().padStart(4, "0")}`;
  return table.split("\n").filter((line) => {
    const fields = line.trim().split(/\s+/);
    return fields[1]?.endsWith(local) && fields[3] === "01";
  }).length;
}

/**
 * Opens `count` connections with `open`, 100 at a time: each after one
 * request (over TLS, so each has completed its handshake), or upgraded to a
 * WebSocket that has echoed one message.
 */
async function openIdle(
  count: number,
  open: () => Promise<Deno.Conn>,
): Promise<Deno.Conn[]> {
  const conns: Deno.Conn[] = [];
  try {
    while (conns.length < count) {
      const batch = Math.min(100, count - conns.length);
      const opened = await Promise.allSettled(
        Array.from({ length: batch }, open),
      );
      for (const result of opened) {
        if (result.status === "fulfilled") conns.push(result.value);
      }
      const failed = opened.find((result) => result.status === "rejected");
      if (failed) throw (failed as PromiseRejectedResult).reason;
    }
    return conns;
  } catch (error) {
    for (const conn of conns) conn.close();
    throw error;
  }
}

/**
 * The growth of `server`'s RSS with `count` idle connections: kept-alive
 * HTTP ones, or with `webSocket` WebSockets that have echoed one message
 * of 64 bytes.
 */
async function measureIdle(
  server: Server,
  count: number,
  load: Load,
  webSocket: boolean,
): Promise<Memory> {
  // Warm up (JIT, heap) with a short run, then let it settle.
  const warm = { ...load, duration: 1 };
  if (webSocket) await runWebSocketLoad(server, WEBSOCKET[0], warm);
  else await runWrk(server, server.tls ? HTTPS[0] : BOOK[0], warm);
  await delay(1_000);
  const beforeKiB = await rssKiB(server.pid);
  const conns = await openIdle(
    count,
    webSocket
      ? () => openWebSocket(server.port, WS_SIZES[0])
      : () => openKeptAlive(server.port, server.tls),
  );
  try {
    await delay(1_000);
    const afterKiB = await rssKiB(server.pid);
    const open = await established(server.port);
    return {
      connections: count,
      beforeKiB,
      afterKiB,
      open,
      kibPerConnection: (afterKiB - beforeKiB) / count,
    };
  } finally {
    for (const conn of conns) conn.close();
  }
}

/**
 * Idle connections that fit in the open-file limit this process has (and the
 * servers, which inherit it): `cat` inherits it too, so its "self" will do.
 */
async function idleBudget(wanted: number): Promise<number> {
  const limits = await readProc("/proc/self/limits");
  const match = limits.match(/^Max open files\s+(\d+|unlimited)/m);
  if (!match || match[1] === "unlimited") return wanted;
  return Math.max(1, Math.min(wanted, Number(match[1]) - 256));
}

// ---------------------------------------------------------------------------
// The benchmark
// ---------------------------------------------------------------------------

interface Contender extends ServerSpec {
  workloads: Workload[];
  /** The server whose figures this one's "÷ base" divides by. */
  base?: string;
}

interface Environment {
  date: string;
  deno: string;
  node: string | null;
  cpu: string;
  nproc: number;
  wrkPin: string[];
  serverPin: string[];
  /** nginx's version line, when the `compression` section runs and has it. */
  nginx: string | null;
  /**
   * What main.ts's `--version` says it found of Deno's internals, as ours
   * (handler) runs and with HELLO_SERVER_FETCH_ONLY=1 (the `handler`
   * section).
   */
  internals: { ours: string; fetchOnly: string } | null;
}

/** The variable that makes main.ts use the Fetch API only. */
const FETCH_ONLY_VARIABLE = "HELLO_SERVER_FETCH_ONLY";
/** The permission it is read under; without it, main.ts ignores it. */
const FETCH_ONLY_PERMISSION = `--allow-env=${FETCH_ONLY_VARIABLE}`;

/** main.ts's `--version`, with `extra` flags and environment. */
async function mainVersion(
  extra: string[],
  env: Record<string, string>,
): Promise<string> {
  const output = await outputOf(
    ["deno", "run", ...extra, "main.ts", "--version"],
    30,
    env,
  );
  return output.match(/runtime internals: ([^)]*)/)?.[1] ?? output.trim();
}

async function describeEnvironment(options: Options): Promise<Environment> {
  const wrk = await probe(["wrk", "--version"]);
  if (wrk === null) {
    throw new Error("wrk is not installed: apt-get install -y wrk");
  }
  if (options.only.has("https")) {
    if (await probe(["openssl", "version"]) === null) {
      throw new Error("openssl is not installed: apt-get install -y openssl");
    }
    if (await probe(["ab", "-V"]) === null) {
      throw new Error("ab is not installed: apt-get install -y apache2-utils");
    }
  }
  const nproc = navigator.hardwareConcurrency;
  const taskset = nproc >= 2 && await probe(["taskset", "--version"]) !== null;
  if (taskset) {
    // The bench's own work — draining the servers' output, an access log of
    // a million lines a second included — goes on the load generator's CPU:
    // on the servers' it would be counted against whichever server it
    // happened to interrupt.
    await probe(["taskset", "-a", "-p", "-c", "0", String(Deno.pid)]);
  }
  const cpuinfo = await readProc("/proc/cpuinfo");
  const deno = await probe(["deno", "--version"]);
  const node = await probe(["node", "--version"]);
  const nginx = options.only.has("compression")
    ? await probe(["nginx", "-v"])
    : null;
  const internals = options.only.has("handler")
    ? {
      ours: await mainVersion([], {}),
      fetchOnly: await mainVersion([FETCH_ONLY_PERMISSION], {
        [FETCH_ONLY_VARIABLE]: "1",
      }),
    }
    : null;
  return {
    date: new Date().toISOString().replace(/\.\d+Z$/, "Z"),
    deno: deno?.split("\n")[0] ?? "deno (unknown version)",
    node: node?.trim() ?? null,
    cpu: cpuinfo.match(/^model name\s*:\s*(.+)$/m)?.[1] ?? "unknown CPU",
    nproc,
    wrkPin: taskset ? ["taskset", "-c", "0"] : [],
    serverPin: taskset
      ? ["taskset", "-c", nproc === 2 ? "1" : `1-${nproc - 1}`]
      : [],
    nginx: nginx?.match(/nginx\/\S+/)?.[0] ?? null,
    internals,
  };
}

const OURS = "ours";
const OURS_LOG = "ours (log)";
const ANCHOR = "Deno.serve";
const NODE = "node:http";
const FLOOR = "floor";
const FLOOR_LOG = "floor (log)";
const OURS_HANDLER = "ours (handler)";
const ANCHOR_HANDLER = "Deno.serve (handler)";
const OURS_TLS = "ours (TLS)";
const ANCHOR_TLS = "Deno.serve (TLS)";
const OURS_WS = "ours (WebSocket)";
const ANCHOR_WS = "Deno.serve (WebSocket)";
const OURS_FETCH_ONLY = "ours (handler, Fetch API only)";
const OURS_JSON = "ours (json)";
const OURS_JSON_PLAIN = "ours (json, compression: false)";
const ANCHOR_JSON = "Deno.serve (json)";
const NGINX = "nginx (gzip 6)";

/**
 * This file, run in one of its internal roles (`--serve`, `--download`,
 * `--ws-load`).
 */
const ROLE = ["deno", "run", "--allow-net=127.0.0.1", "bench.ts"];

/** The servers of the book's routes. */
function bookContenders(env: Environment, dir: string): Contender[] {
  const main = ["deno", "run", "--allow-net", "main.ts", "--port", "0"];
  const list: Contender[] = [
    {
      name: OURS,
      command: [...main, "--quiet"],
      workloads: BOOK,
      base: ANCHOR,
    },
    { name: ANCHOR, command: [...ROLE, "--serve", "anchor"], workloads: BOOK },
  ];
  if (env.node) {
    list.push({
      name: NODE,
      command: ["node", `${dir}/node_server.mjs`],
      workloads: BOOK,
      base: ANCHOR,
    });
  }
  list.push({ name: OURS_LOG, command: main, workloads: BOOK, base: OURS });
  return list;
}

/**
 * The servers of the `https` section: ours with --cert and --key, without a
 * handler (the book's routes), and the anchor's `Deno.serve` with the same
 * certificate. Each may read the certificate's files and nothing else.
 */
function httpsContenders(files: CertificateFiles): Contender[] {
  const read = `--allow-read=${files.cert},${files.key}`;
  return [
    {
      name: OURS_TLS,
      command: [
        "deno",
        "run",
        "--allow-net",
        read,
        "main.ts",
        "--port",
        "0",
        "--quiet",
        "--cert",
        files.cert,
        "--key",
        files.key,
      ],
      workloads: HTTPS,
      base: ANCHOR_TLS,
      tls: true,
    },
    {
      name: ANCHOR_TLS,
      command: [
        ...ROLE.slice(0, 3),
        read,
        ...ROLE.slice(3),
        "--serve",
        "anchor",
        "--cert",
        files.cert,
        "--key",
        files.key,
      ],
      workloads: HTTPS,
      tls: true,
    },
  ];
}

/** The echo servers of the `websocket` section. */
const webSocketContenders = (): Contender[] => [
  {
    name: OURS_WS,
    command: [...ROLE, "--serve", "ours-ws"],
    workloads: WEBSOCKET,
    base: ANCHOR_WS,
  },
  {
    name: ANCHOR_WS,
    command: [...ROLE, "--serve", "deno-ws"],
    workloads: WEBSOCKET,
  },
];

/** A port free on loopback a moment ago, for a server that cannot take 0. */
function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr;
  listener.close();
  return port;
}

/**
 * nginx's configuration for the `compression` section: the document as a
 * static file, gzipped at level 6 (zlib's default, and ours's — the same
 * work per byte; nginx's own default is 1). One process, no master: the
 * process whose CPU time /proc/PID/stat gives is then the one that serves
 * (a master's own excludes its workers'), and as root it keeps its user,
 * so it can read the bench's 0700 temporary directory. In the foreground,
 * every path under its prefix, no access log (ours and `Deno.serve` keep
 * none either), keep-alive connections never closed after 1000 requests
 * (nginx's default), and the file's descriptor kept open between requests
 * (ours and `Deno.serve` answer from memory).
 */
function nginxConf(port: number): string {
  return `daemon off;
master_process off;
worker_processes 1;
pid nginx.pid;
error_log stderr warn;

events {
    worker_connections 1024;
}

http {
    access_log off;
    client_body_temp_path client_body;
    proxy_temp_path proxy;
    fastcgi_temp_path fastcgi;
    uwsgi_temp_path uwsgi;
    scgi_temp_path scgi;
    keepalive_requests 1000000;
    open_file_cache max=16;

    gzip on;
    gzip_types application/json;
    gzip_comp_level 6;
    gzip_min_length 1024;

    server {
        listen 127.0.0.1:${port};
        root html;

        location = /json {
            default_type application/json;
        }
    }
}
`;
}

/** nginx, serving the document from `dir`/nginx/html/json. */
async function nginxContender(dir: string): Promise<Contender> {
  const prefix = `${dir}/nginx`;
  await Deno.mkdir(`${prefix}/html`, { recursive: true });
  await Deno.writeFile(`${prefix}/html/json`, COMPRESSION_JSON);
  const port = freePort();
  await Deno.writeTextFile(`${prefix}/nginx.conf`, nginxConf(port));
  return {
    name: NGINX,
    command: [
      "nginx",
      "-p",
      prefix,
      "-c",
      `${prefix}/nginx.conf`,
      "-e",
      "stderr",
    ],
    port,
    workloads: [COMPRESSION_GZIP],
    base: ANCHOR_JSON,
  };
}

async function contenders(
  options: Options,
  env: Environment,
  dir: string,
): Promise<Contender[]> {
  const list: Contender[] = [];
  if (options.only.has("book")) list.push(...bookContenders(env, dir));
  if (options.only.has("floor")) {
    list.push({
      name: FLOOR,
      command: [...ROLE, "--serve", "floor"],
      workloads: BOOK,
      base: ANCHOR,
    }, {
      name: FLOOR_LOG,
      command: [...ROLE, "--serve", "floor-log"],
      workloads: BOOK,
      base: FLOOR,
    });
  }
  if (options.only.has("handler")) {
    list.push({
      name: OURS_HANDLER,
      command: [...ROLE, "--serve", "ours-handler"],
      workloads: HANDLER,
      base: ANCHOR_HANDLER,
    }, {
      // The same role, told to leave Deno's internals alone.
      name: OURS_FETCH_ONLY,
      command: [
        ...ROLE.slice(0, 3),
        FETCH_ONLY_PERMISSION,
        ...ROLE.slice(3),
        "--serve",
        "ours-handler",
      ],
      env: { [FETCH_ONLY_VARIABLE]: "1" },
      workloads: HANDLER,
      base: OURS_HANDLER,
    }, {
      name: ANCHOR_HANDLER,
      command: [...ROLE, "--serve", "deno-handler"],
      workloads: HANDLER,
    });
  }
  if (options.only.has("https") && certificate) {
    list.push(...httpsContenders(certificate.files));
  }
  if (options.only.has("websocket")) list.push(...webSocketContenders());
  if (options.only.has("compression")) {
    list.push({
      name: OURS_JSON,
      command: [...ROLE, "--serve", "ours-json"],
      workloads: COMPRESSION,
      base: ANCHOR_JSON,
    }, {
      name: ANCHOR_JSON,
      command: [...ROLE, "--serve", "deno-json"],
      workloads: [COMPRESSION_GZIP],
    }, {
      name: OURS_JSON_PLAIN,
      command: [...ROLE, "--serve", "ours-json-plain"],
      workloads: [COMPRESSION_GZIP],
      base: ANCHOR_JSON,
    });
    if (env.nginx) list.push(await nginxContender(dir));
  }
  if (options.workers > 1) {
    const n = options.workers;
    list.push({
      name: workersName(n),
      command: [
        "deno",
        "run",
        "--allow-net",
        "--allow-read",
        "--unstable-net",
        "main.ts",
        "--port",
        "0",
        "--quiet",
        "--workers",
        String(n),
      ],
      workloads: BOOK,
      base: parallelName(n),
    }, {
      name: parallelName(n),
      command: [
        "deno",
        "serve",
        "--parallel",
        "--allow-net",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        `${dir}/anchor_serve.ts`,
      ],
      env: { DENO_JOBS: String(n) },
      workloads: BOOK,
      base: ANCHOR,
    });
  }
  return list;
}

const workersName = (n: number) => `ours --workers ${n}`;
const parallelName = (n: number) => `deno serve --parallel (${n})`;

/**
 * Makes the `https` section's certificate in `dir`: self-signed, for
 * `localhost` and 127.0.0.1, with an ECDSA P-256 key (small and quick to
 * handshake with), valid for two days. It is no CA (basicConstraints
 * CA:FALSE), or the bench's own client (rustls) would refuse it as a
 * server's certificate; wrk and ab check none.
 */
async function makeCertificate(dir: string): Promise<void> {
  const files = { cert: `${dir}/cert.pem`, key: `${dir}/key.pem` };
  // Without -out, the certificate comes on stdout.
  const pem = await outputOf([
    "openssl",
    "req",
    "-x509",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
    "-keyout",
    files.key,
    "-days",
    "2",
    "-subj",
    "/CN=localhost",
    "-addext",
    "subjectAltName=DNS:localhost,IP:127.0.0.1",
    "-addext",
    "basicConstraints=critical,CA:FALSE",
    "-addext",
    "extendedKeyUsage=serverAuth",
  ], 30);
  await Deno.writeTextFile(files.cert, pem);
  certificate = { pem, files };
}

/**
 * What OpenSSL's client (wrk's and ab's) negotiates with `server`: the
 * protocol version, cipher suite and key exchange group.
 */
async function describeTls(server: Server): Promise<string> {
  const output = await probe([
    "openssl",
    "s_client",
    "-connect",
    `127.0.0.1:${server.port}`,
    "-brief",
  ]) ?? "";
  const field = (name: string) =>
    output.match(new RegExp(`^${name}: (.+)$`, "m"))?.[1] ?? "?";
  return `${server.name}: ${field("Protocol version")}, ` +
    `${field("Ciphersuite")}, ${field("Server Temp Key")}`;
}

async function writeHelpers(dir: string): Promise<void> {
  const benchUrl = new URL("./bench.ts", import.meta.url).href;
  await Deno.writeTextFile(`${dir}/pipeline.lua`, PIPELINE_LUA);
  await Deno.writeTextFile(`${dir}/post.lua`, POST_LUA);
  await Deno.writeTextFile(`${dir}/node_server.mjs`, nodeServerSource());
  await Deno.writeTextFile(
    `${dir}/anchor_serve.ts`,
    `import { anchorHandler } from ${JSON.stringify(benchUrl)};\n` +
      `export default { fetch: anchorHandler };\n`,
  );
}

/** Samples by `workload|server`, one per round, in round order. */
type Results = Map<string, Sample[]>;

const key = (workload: Workload | string, name: string) =>
  `${typeof workload === "string" ? workload : workload.name}|${name}`;

/** Every workload in report order, each once. */
function workloadsOf(list: Contender[]): Workload[] {
  return [...new Set(list.flatMap((c) => c.workloads))]
    .sort((a, b) => ALL.indexOf(a) - ALL.indexOf(b));
}

const ALL = [...BOOK, ...HANDLER, ...HTTPS, ...WEBSOCKET, ...COMPRESSION];

function fmtSample(workload: Workload, sample: Sample): string {
  if (workload.mode === "stream") return `${fmtInt(sample.rate)} MB/s`;
  if (workload.mode === "websocket") {
    return `${fmtInt(sample.rate)} msgs/s, ${sample.errors} errors, ` +
      `${fmtUs(sample.cpuPerRequest)} µs/msg, load generator CPU ` +
      `${fmtPercent(sample.clientCpu ?? NaN)}`;
  }
  return `${fmtInt(sample.rate)} req/s, p99 ${fmtMs(sample.p99)} ms, ` +
    `${sample.errors} errors, ${fmtUs(sample.cpuPerRequest)} µs/req`;
}

/** One uncounted second of every workload on every server: JIT, caches. */
async function warmUp(
  servers: Map<string, Server>,
  list: Contender[],
  load: Load,
): Promise<void> {
  console.error("warming up");
  for (const contender of list) {
    for (const workload of contender.workloads) {
      const server = servers.get(contender.name)!;
      await runWorkload(server, workload, { ...load, duration: 1 });
    }
  }
}

async function runRounds(
  servers: Map<string, Server>,
  list: Contender[],
  options: Options,
  load: Load,
): Promise<Results> {
  const results: Results = new Map();
  // Each server of the book's rows runs just before or after the server its
  // target divides it by, and ours (log) one run from ours: over the 76-80
  // rounds of the day's runs, a ratio's spread from round to round was
  // 0.06-0.08 (in the log of CPU per request) for two servers run back to
  // back, and 0.09-0.10 for two run three or four apart.
  // Likewise ours (handler) between Deno.serve's and its Fetch API only
  // twin, and ours (json) between Deno.serve's and nginx's.
  const order = [
    OURS_LOG,
    ANCHOR,
    OURS,
    FLOOR,
    FLOOR_LOG,
    NODE,
    OURS_FETCH_ONLY,
    OURS_HANDLER,
    ANCHOR_HANDLER,
    OURS_JSON_PLAIN,
    ANCHOR_JSON,
    OURS_JSON,
    NGINX,
  ];
  const place = (name: string) =>
    order.includes(name) ? order.indexOf(name) : order.length;
  const inTurn = list.toSorted((a, b) => place(a.name) - place(b.name));
  for (let round = 1; round <= options.rounds; round++) {
    for (const workload of workloadsOf(list)) {
      for (const contender of inTurn) {
        if (!contender.workloads.includes(workload)) continue;
        const server = servers.get(contender.name)!;
        const sample = await runWorkload(server, workload, load).catch(
          (error) => {
            throw new Error(
              `${contender.name}, ${workload.name}: ${error.message}\n` +
                `server stderr: ${server.stderr()}`,
            );
          },
        );
        const samples = results.get(key(workload, contender.name)) ?? [];
        results.set(key(workload, contender.name), [...samples, sample]);
        console.error(
          `round ${round}/${options.rounds} ${workload.name.padEnd(21)} ` +
            `${contender.name.padEnd(28)} ${fmtSample(workload, sample)}, ` +
            `server CPU ${fmtPercent(sample.cpu)}`,
        );
      }
    }
  }
  return results;
}

async function measureMemory(
  list: Contender[],
  count: number,
  env: Environment,
  load: Load,
): Promise<Map<string, Memory>> {
  const memory = new Map<string, Memory>();
  for (const contender of list) {
    const spec = contender.name === OURS || contender.name === OURS_TLS
      ? {
        ...contender,
        command: [...contender.command, "--idle-timeout", "60"],
      }
      : contender;
    const server = await startServer(spec, env.serverPin);
    try {
      const result = await measureIdle(
        server,
        count,
        load,
        contender.workloads === WEBSOCKET,
      );
      memory.set(contender.name, result);
      console.error(
        `memory ${contender.name}: ${result.beforeKiB} -> ${result.afterKiB}` +
          ` KiB for ${count} idle connections (${result.open} open)`,
      );
    } finally {
      await stop([server.child]);
    }
  }
  return memory;
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

/** The median of the finite values, NaN if there are none. */
function median(values: number[]): number {
  const sorted = values.filter(Number.isFinite).sort((a, b) => a - b);
  if (sorted.length === 0) return NaN;
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

function fmtMs(ms: number): string {
  return Number.isFinite(ms) ? ms.toFixed(2) : "n/a";
}

function fmtUs(us: number): string {
  return Number.isFinite(us) ? us.toFixed(2) : "n/a";
}

function fmtPercent(fraction: number): string {
  return `${Math.round(fraction * 100)}%`;
}

function fmtInt(n: number): string {
  return Math.round(n).toLocaleString("en-US");
}

interface Summary {
  rate: number;
  p99: number;
  errors: number;
  cpu: number;
  cpuPerRequest: number;
}

function summarize(results: Results, key: string): Summary {
  const samples = results.get(key) ?? [];
  return {
    rate: median(samples.map((s) => s.rate)),
    p99: median(samples.map((s) => s.p99)),
    errors: samples.reduce((sum, s) => sum + s.errors, 0),
    cpu: median(samples.map((s) => s.cpu)),
    cpuPerRequest: median(samples.map((s) => s.cpuPerRequest)),
  };
}

/**
 * The median over rounds of a figure of `key`'s sample divided by the same
 * figure of `base`'s in the same round: the two ran close together, so a
 * round's noise mostly cancels. NaN when either was not measured.
 */
function pairedRatio(
  results: Results,
  key: string,
  base: string,
  figure: (sample: Sample) => number = (sample) => sample.rate,
): number {
  const a = results.get(key) ?? [];
  const b = results.get(base) ?? [];
  return median(a.map((sample, i) => figure(sample) / figure(b[i] ?? NaN)));
}

/** Requests per second of server CPU: the floor's divided by it is ≤ 1. */
const perCpu = (sample: Sample) => 1 / sample.cpuPerRequest;
/** Server CPU per WebSocket message: ours's divided by it should be ≤ 1. */
const perMessage = (sample: Sample) => sample.cpuPerRequest;

/**
 * Where a workload's floor figures are: the floor's run in its mode. The
 * floor speaks no TLS: HTTPS rows have none.
 */
function floorKey(workload: Workload): string {
  return workload.tls ? "" : key(workload.mode, FLOOR);
}

function ratio(value: number): string {
  return Number.isFinite(value) ? `${value.toFixed(2)}×` : "–";
}

interface Target {
  label: string;
  pass: boolean;
}

/**
 * A row of the table of requests: not the stream's, nor a WebSocket's, nor
 * the `compression` section's (a table of its own).
 */
const isRequestRow = (workload: Workload) =>
  workload.mode !== "stream" && workload.mode !== "websocket" &&
  !COMPRESSION.includes(workload);

/** Server CPU time per request (or per download), µs. */
const cpuPerRequest = (sample: Sample) => sample.cpuPerRequest;

/** The median over rounds of a figure of `key`'s minus `base`'s. */
function pairedDifference(
  results: Results,
  key: string,
  base: string,
  figure: (sample: Sample) => number,
): number {
  const b = results.get(base) ?? [];
  return median(
    (results.get(key) ?? []).map((sample, i) =>
      b[i] ? figure(sample) - figure(b[i]) : NaN
    ),
  );
}

function fmtBytes(bytes: number): string {
  return Number.isFinite(bytes) ? fmtInt(bytes) : "n/a";
}

/**
 * The `compression` section's table. Every ratio is to `Deno.serve`'s run
 * of the gzip row in the same round: it sends the same bytes whatever the
 * request accepts.
 */
function compressionTable(results: Results, list: Contender[]): string[] {
  const lines = [
    "| workload | server | coding | B/response | B/response (wrk) | " +
    "req/s | p99 ms | errors | ÷ Deno.serve | server CPU | CPU µs/req | " +
    "CPU/req ÷ Deno.serve |",
    "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | " +
    "---: | ---: |",
  ];
  const base = key(COMPRESSION_GZIP, ANCHOR_JSON);
  for (const workload of COMPRESSION) {
    for (const contender of list) {
      if (!contender.workloads.includes(workload)) continue;
      const at = key(workload, contender.name);
      const s = summarize(results, at);
      const wire = wires.get(at);
      const wrkBytes = median(
        (results.get(at) ?? []).map((sample) => sample.bytesPerResponse ?? NaN),
      );
      const [toBase, cpuToBase] = at === base ? ["–", "–"] : [
        ratio(pairedRatio(results, at, base)),
        ratio(pairedRatio(results, at, base, cpuPerRequest)),
      ];
      lines.push(
        `| ${workload.name} | ${contender.name} | ` +
          `${wire?.coding ?? "?"} | ${fmtBytes(wire?.bytes ?? NaN)} | ` +
          `${fmtBytes(wrkBytes)} | ${fmtInt(s.rate)} | ${fmtMs(s.p99)} | ` +
          `${s.errors} | ${toBase} | ${fmtPercent(s.cpu)} | ` +
          `${fmtUs(s.cpuPerRequest)} | ${cpuToBase} |`,
      );
    }
  }
  return lines;
}

/**
 * What the `compression` section shows without a target: what compressing
 * costs ours per request, and ours against nginx.
 */
function compressionNotes(results: Results, list: Contender[]): string[] {
  const gzip = (name: string) => key(COMPRESSION_GZIP, name);
  const br = key(COMPRESSION_BR, OURS_JSON);
  const us = (value: number) =>
    Number.isFinite(value)
      ? `${value >= 0 ? "+" : "−"}${fmtUs(Math.abs(value))} µs`
      : "n/a";
  const cost = (at: string, base: string) =>
    `${us(pairedDifference(results, at, base, cpuPerRequest))} ` +
    `(${ratio(pairedRatio(results, at, base, cpuPerRequest))})`;
  const lines = [
    `Compressing, server CPU per request (paired medians over rounds): ` +
    `ours gzip − Deno.serve ${cost(gzip(OURS_JSON), gzip(ANCHOR_JSON))}; ` +
    `ours gzip − ours with compression: false ` +
    `${cost(gzip(OURS_JSON), gzip(OURS_JSON_PLAIN))}; ` +
    `ours br − ours with compression: false ` +
    `${cost(br, gzip(OURS_JSON_PLAIN))}; ` +
    `ours with compression: false − Deno.serve ` +
    `${cost(gzip(OURS_JSON_PLAIN), gzip(ANCHOR_JSON))}.`,
  ];
  if (list.some((c) => c.name === NGINX)) {
    lines.push(
      `Ours ÷ nginx, both gzip level 6: req/s ` +
        `${ratio(pairedRatio(results, gzip(OURS_JSON), gzip(NGINX)))}, ` +
        `CPU per request ` +
        `${
          ratio(
            pairedRatio(results, gzip(OURS_JSON), gzip(NGINX), cpuPerRequest),
          )
        } (ours ${fmtUs(summarize(results, gzip(OURS_JSON)).cpuPerRequest)}` +
        ` µs, nginx ${fmtUs(summarize(results, gzip(NGINX)).cpuPerRequest)}` +
        ` µs).`,
    );
  } else {
    lines.push("No nginx row: nginx is not on the PATH.");
  }
  return lines;
}

/**
 * The `handler` section's Fetch API only twin against ours (handler): the
 * speed a Deno where main.ts's probes find nothing costs it.
 */
function fetchOnlyTable(results: Results): string[] {
  const lines = [
    "| workload | ours (handler) | Fetch API only | Fetch API only ÷ ours | " +
    "CPU µs/req ours | CPU µs/req Fetch API only | CPU/req ÷ ours |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  ];
  for (const workload of HANDLER) {
    const at = key(workload, OURS_FETCH_ONLY);
    const base = key(workload, OURS_HANDLER);
    const unit = workload.mode === "stream" ? " MB/s" : " req/s";
    // Per 64 MiB download for the stream, in ms.
    const cpu = (us: number) =>
      workload.mode === "stream" ? `${fmtUs(us / 1000)} ms` : fmtUs(us);
    const ours = summarize(results, base);
    const twin = summarize(results, at);
    lines.push(
      `| ${workload.name} | ${fmtInt(ours.rate)}${unit} | ` +
        `${fmtInt(twin.rate)}${unit} | ${
          ratio(pairedRatio(results, at, base))
        } | ` +
        `${cpu(ours.cpuPerRequest)} | ${cpu(twin.cpuPerRequest)} | ` +
        `${ratio(pairedRatio(results, at, base, cpuPerRequest))} |`,
    );
  }
  return lines;
}

function throughputTable(results: Results, list: Contender[]): string[] {
  const lines = [
    "| workload | server | req/s | p99 ms | errors | ÷ base | ÷ floor | " +
    "server CPU | CPU µs/req | req/CPU-s ÷ floor |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ];
  for (const workload of workloadsOf(list)) {
    if (!isRequestRow(workload)) continue;
    for (const contender of list) {
      if (!contender.workloads.includes(workload)) continue;
      const at = key(workload, contender.name);
      const s = summarize(results, at);
      const base = contender.base
        ? ratio(pairedRatio(results, at, key(workload, contender.base)))
        : "–";
      const floor = floorKey(workload);
      const [toFloor, cpuToFloor] = contender.name === FLOOR ? ["–", "–"] : [
        ratio(pairedRatio(results, at, floor)),
        ratio(pairedRatio(results, at, floor, perCpu)),
      ];
      lines.push(
        `| ${workload.name} | ${contender.name} | ${fmtInt(s.rate)} | ` +
          `${fmtMs(s.p99)} | ${s.errors} | ${base} | ${toFloor} | ` +
          `${fmtPercent(s.cpu)} | ${fmtUs(s.cpuPerRequest)} | ${cpuToFloor} |`,
      );
    }
  }
  return lines;
}

function streamTable(results: Results, list: Contender[]): string[] {
  const lines = [
    "| workload | server | MB/s | ÷ base | server CPU | CPU ms per 64 MiB |",
    "| --- | --- | ---: | ---: | ---: | ---: |",
  ];
  for (const contender of list) {
    if (!contender.workloads.includes(STREAM)) continue;
    const at = key(STREAM, contender.name);
    const s = summarize(results, at);
    const base = contender.base
      ? ratio(pairedRatio(results, at, key(STREAM, contender.base)))
      : "–";
    lines.push(
      `| ${STREAM.name} | ${contender.name} | ${fmtInt(s.rate)} | ${base} | ` +
        `${fmtPercent(s.cpu)} | ${(s.cpuPerRequest / 1000).toFixed(1)} |`,
    );
  }
  return lines;
}

function webSocketTable(results: Results, list: Contender[]): string[] {
  const lines = [
    "| workload | server | msgs/s | errors | ÷ base | server CPU | " +
    "CPU µs/msg | CPU/msg ÷ base | load generator CPU |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ];
  for (const workload of WEBSOCKET) {
    for (const contender of list) {
      if (!contender.workloads.includes(workload)) continue;
      const at = key(workload, contender.name);
      const s = summarize(results, at);
      const client = median(
        (results.get(at) ?? []).map((sample) => sample.clientCpu ?? NaN),
      );
      const [base, cpuToBase] = contender.base
        ? [
          ratio(pairedRatio(results, at, key(workload, contender.base))),
          ratio(
            pairedRatio(
              results,
              at,
              key(workload, contender.base),
              perMessage,
            ),
          ),
        ]
        : ["–", "–"];
      lines.push(
        `| ${workload.name} | ${contender.name} | ${fmtInt(s.rate)} | ` +
          `${s.errors} | ${base} | ${fmtPercent(s.cpu)} | ` +
          `${fmtUs(s.cpuPerRequest)} | ${cpuToBase} | ${fmtPercent(client)} |`,
      );
    }
  }
  return lines;
}

function memoryTable(memory: Map<string, Memory>): string[] {
  const lines = [
    "| server | idle connections | RSS before KiB | RSS after KiB | KiB/conn |",
    "| --- | ---: | ---: | ---: | ---: |",
  ];
  for (const [name, m] of memory) {
    lines.push(
      `| ${name} | ${m.connections} (${m.open} open) | ${m.beforeKiB} | ` +
        `${m.afterKiB} | ${m.kibPerConnection.toFixed(2)} |`,
    );
  }
  return lines;
}

/** A target on a ratio: PASS when it is at least `least`. */
function atLeast(
  label: string,
  value: number,
  least: number,
  note = "",
): Target {
  return {
    label: `${label} ≥ ${least.toFixed(2)}× (${ratio(value)}${note})`,
    pass: value >= least,
  };
}

/** A target on a ratio: PASS when it is at most `most`. */
function atMost(label: string, value: number, most: number): Target {
  return {
    label: `${label} ≤ ${most.toFixed(2)}× (${ratio(value)})`,
    pass: value <= most,
  };
}

/** The targets of the sections that ran (issues 8 and 11). */
function targets(
  results: Results,
  memory: Map<string, Memory>,
  options: Options,
): Target[] {
  const has = (section: Section) => options.only.has(section);
  const vs = (workload: string, name: string, base: string) =>
    pairedRatio(results, key(workload, name), key(workload, base));
  const checks: Target[] = [];
  if (has("book")) {
    const p99 = summarize(results, key("keep-alive", OURS)).p99;
    const anchorP99 = summarize(results, key("keep-alive", ANCHOR)).p99;
    checks.push(
      atLeast(
        "book keep-alive: ours ÷ Deno.serve req/s",
        vs("keep-alive", OURS, ANCHOR),
        1,
      ),
      {
        label: `book keep-alive: ours p99 no worse than Deno.serve ` +
          `(${fmtMs(p99)} vs ${fmtMs(anchorP99)} ms)`,
        pass: p99 <= anchorP99,
      },
      atLeast(
        "book pipelined: ours ÷ Deno.serve req/s",
        vs("pipelined", OURS, ANCHOR),
        5,
      ),
      atLeast(
        "book Connection: close: ours ÷ Deno.serve req/s",
        vs("close", OURS, ANCHOR),
        1,
      ),
      ...MODES.map((mode) => {
        // The same bytes logged by the floor: the runtime's own price.
        const floor = has("floor")
          ? `; the floor's log ${ratio(vs(mode, FLOOR_LOG, FLOOR))}`
          : "";
        return atLeast(
          `book ${mode}: access log on ÷ quiet req/s`,
          vs(mode, OURS_LOG, OURS),
          0.9,
          floor,
        );
      }),
    );
  }
  if (has("book") && has("floor")) {
    const cpu = pairedRatio(
      results,
      key("keep-alive", OURS),
      key("keep-alive", FLOOR),
      perCpu,
    );
    checks.push(
      atLeast(
        "book keep-alive: ours ÷ floor req/s",
        vs("keep-alive", OURS, FLOOR),
        0.97,
      ),
      atLeast("book keep-alive: ours ÷ floor req per CPU-second", cpu, 0.97),
      atLeast(
        "book pipelined: ours ÷ floor req/s",
        vs("pipelined", OURS, FLOOR),
        0.7,
      ),
    );
  }
  if (has("memory")) {
    const kib = memory.get(OURS)?.kibPerConnection ?? NaN;
    checks.push({
      label: `idle memory ≤ 9 KiB per connection (${kib.toFixed(2)} KiB)`,
      pass: kib <= 9,
    });
  }
  if (has("handler")) {
    const handler = (workload: string, least: number) =>
      atLeast(
        `handler ${workload}: ours ÷ Deno.serve`,
        vs(workload, OURS_HANDLER, ANCHOR_HANDLER),
        least,
      );
    checks.push(
      handler("plaintext keep-alive", 0.9),
      handler("plaintext pipelined", 3),
      handler("plaintext close", 1),
      handler("json keep-alive", 0.9),
      handler("echo 4 KiB keep-alive", 0.9),
      handler(STREAM.name, 0.9),
    );
  }
  if (has("https")) {
    const https = (workload: string, least: number) =>
      atLeast(
        `${workload}: ours ÷ Deno.serve req/s`,
        vs(workload, OURS_TLS, ANCHOR_TLS),
        least,
      );
    const fullCpu = pairedRatio(
      results,
      key("https full handshake", OURS_TLS),
      key("https full handshake", ANCHOR_TLS),
      perCpu,
    );
    checks.push(
      https("https keep-alive", 0.9),
      https("https pipelined", 3),
      https("https close (resumed)", 0.9),
      https("https full handshake", 0.9),
      atLeast(
        "https full handshake: ours ÷ Deno.serve req per CPU-second",
        fullCpu,
        0.9,
      ),
    );
  }
  if (has("websocket")) {
    const small = WS_ECHOES[0].name;
    const kib = (name: string) => memory.get(name)?.kibPerConnection ?? NaN;
    const ours = kib(OURS_WS);
    const anchor = kib(ANCHOR_WS);
    checks.push(
      ...WS_ECHOES.map((workload) =>
        atLeast(
          `${workload.name}: ours ÷ Deno.serve msgs/s`,
          vs(workload.name, OURS_WS, ANCHOR_WS),
          1,
        )
      ),
      atMost(
        `${small}: ours ÷ Deno.serve CPU per message`,
        pairedRatio(
          results,
          key(small, OURS_WS),
          key(small, ANCHOR_WS),
          perMessage,
        ),
        1,
      ),
      {
        label: `idle WebSocket memory: ours no more than Deno.serve ` +
          `(${ours.toFixed(2)} vs ${anchor.toFixed(2)} KiB per socket)`,
        pass: ours <= anchor,
      },
    );
  }
  if (has("compression")) {
    const ours = wires.get(key(COMPRESSION_GZIP, OURS_JSON));
    const anchor = wires.get(key(COMPRESSION_GZIP, ANCHOR_JSON));
    const value = (ours?.bytes ?? NaN) / (anchor?.bytes ?? NaN);
    const bytes = (wire?: Wire) =>
      `${fmtBytes(wire?.bytes ?? NaN)} B ${wire?.coding ?? "?"}`;
    checks.push({
      label: `compression gzip: ours ÷ Deno.serve bytes per response ≤ ` +
        `0.33× (${ratio(value)}: ${bytes(ours)} vs ${bytes(anchor)})`,
      pass: value <= 1 / 3,
    });
  }
  let oursErrors = 0;
  for (const [at, samples] of results) {
    if (!at.split("|")[1].startsWith(OURS)) continue;
    for (const sample of samples) oursErrors += sample.errors;
  }
  checks.push({
    label: `zero errors in every run of ours (${oursErrors})`,
    pass: oursErrors === 0,
  });
  return checks;
}

function report(
  env: Environment,
  options: Options,
  results: Results,
  list: Contender[],
  memory: Map<string, Memory>,
  tls: string[],
): Target[] {
  const pinning = env.wrkPin.length
    ? `wrk and the bench on CPU 0, servers on CPU ${env.serverPin[2]}`
    : "no CPU pinning (one CPU, or no taskset)";
  const checks = targets(results, memory, options);
  const lines = [
    `## Benchmark, ${env.date}`,
    "",
    `- ${env.deno}; node ${env.node ?? "not found"}`,
    `- CPU: ${env.cpu}; nproc ${env.nproc}; ${pinning}`,
    `- sections: ${[...options.only].join(", ")}; wrk, 1 thread, ` +
    `${options.connections} connections, ${options.duration} s per run, ` +
    `${options.rounds} rounds, servers alternated; pipelined = ` +
    `${PIPELINE_DEPTH} requests per write`,
    `- medians over rounds of req/s, p99, server CPU (% of one core) and ` +
    `the server process's CPU time per request (/proc/PID/stat, user + ` +
    `system, around each wrk run); "÷ base" and "÷ floor" are the median ` +
    `over rounds of the ratio within each round; "req/CPU-s ÷ floor" is the ` +
    `same for requests per CPU-second (the floor's µs/req over the ` +
    `server's); errors summed; wrk times a pipelined batch as one request ` +
    `and often prints no percentile for it (n/a)`,
    `- base = \`Deno.serve\` with the same routes and hello page; for ` +
    `"ours (log)" (access log into a pipe the bench drains) it is ours ` +
    `(quiet); for "ours (handler)" it is \`Deno.serve\` with the same ` +
    `handler, and for "ours (handler, Fetch API only)" ours (handler); ` +
    `for "ours --workers N" it is \`deno serve --parallel\``,
    `- floor = a bare \`Deno.listen\` loop in bench.ts that counts request ` +
    `heads and writes the hello page with a fixed head per head, one write ` +
    `per read; the handler rows are divided by its run in the same mode; ` +
    `"floor (log)" also logs a constant line as long as ours's per head, ` +
    `in batches of whole lines of at most 64 KiB, one write at a time, into ` +
    `a pipe the bench drains (its base is the floor)`,
    `- handler rows: one handler on every server (\`GET /plaintext\`, ` +
    `\`GET /json\`, \`POST /echo\` of ${ECHO_SIZE} bytes read with ` +
    `\`arrayBuffer()\`); the stream is ${DOWNLOADS} sequential downloads ` +
    `of a ReadableStream of ${STREAM_CHUNKS} × ${STREAM_CHUNK / 1024} KiB ` +
    `per sample (Connection: close), read raw and discarded by a pinned ` +
    `client; MB = 10^6 bytes of body`,
    `- idle memory: growth of the server's VmRSS once it has answered one ` +
    `\`GET /\` on each idle keep-alive connection (ours: --idle-timeout 60)`,
  ];
  if (options.only.has("https")) {
    lines.push(
      `- https: ours (\`--cert --key\`, the book's routes, no handler) and ` +
        `the anchor's \`Deno.serve\` with the same throwaway certificate ` +
        `(self-signed, ECDSA P-256, made by openssl at the start); ` +
        `negotiated with OpenSSL's client: ${tls.join("; ")}; ` +
        `"close (resumed)" is wrk with \`Connection: close\`, which resumes ` +
        `the TLS session on each new connection (a TLS 1.3 PSK with a new ` +
        `key exchange, no certificate or signature); "full handshake" is ` +
        `\`ab -c ${options.connections}\` (HTTP/1.0, a new connection and a ` +
        `new session per request; ab reports p99 in whole ms); both clients ` +
        `have one CPU and can saturate before the server does (see server ` +
        `CPU), so CPU µs/req is the fairer figure there; "(TLS)" memory ` +
        `rows hold connections that completed a handshake`,
    );
  }
  if (env.internals) {
    lines.push(
      `- ours (handler, Fetch API only): the same role as ours (handler), ` +
        `with ${FETCH_ONLY_VARIABLE}=1 in its environment and ` +
        `\`${FETCH_ONLY_PERMISSION}\`, run in the same rounds; main.ts's ` +
        `\`--version\` finds these internals of Deno: ` +
        `"${env.internals.ours}", and so told: ` +
        `"${env.internals.fetchOnly}"`,
    );
  }
  if (options.only.has("compression")) {
    lines.push(
      `- compression: one handler answers \`GET /json\` with the same ` +
        `${fmtInt(COMPRESSION_JSON.length)}-byte JSON array ` +
        `(\`application/json\`), asked for by wrk with \`Accept-Encoding: ` +
        `gzip\` (or \`br\`) on ${options.connections} keep-alive ` +
        `connections; ours compresses (gzip level 6, brotli quality 5), ` +
        `ours with \`compression: false\` and \`Deno.serve\` do not; ` +
        `nginx: ${env.nginx ?? "not found"}, one process (no master), ` +
        `the same bytes as a static file, \`gzip on; gzip_types ` +
        `application/json; gzip_comp_level 6\`, no access log; ` +
        `"B/response" is one response read raw before the rounds (head + ` +
        `body + any chunk framing; the body decoded and checked against ` +
        `the document), "B/response (wrk)" is wrk's bytes read ÷ ` +
        `responses (it rounds to 3 or 4 digits); "÷ Deno.serve" ratios ` +
        `pair each run with \`Deno.serve\`'s gzip run in the same round`,
    );
  }
  if (options.only.has("websocket")) {
    lines.push(
      `- websocket: one echo (\`socket.onmessage = (e) => ` +
        `socket.send(e.data)\`) on ours (\`serve()\` with its ` +
        `\`upgradeWebSocket\`) and on \`Deno.serve\` with ` +
        `\`Deno.upgradeWebSocket\`; the load generator is bench.ts's own ` +
        `raw-TCP client, pinned as wrk is: ${WS_CONNECTIONS} connections, ` +
        `each with ${WS_WINDOW} binary messages in flight (a new one sent ` +
        `for each echo, those of one read in one write; frames masked once ` +
        `in advance, echoes counted from their headers), or 1 in ` +
        `"ping-pong" (no target); msgs/s = echoes ` +
        `received per second; CPU µs/msg = the server's CPU time around ` +
        `the run ÷ echoes; "load generator CPU" is its own, of its one ` +
        `CPU; idle memory rows "(WebSocket)": upgraded sockets that each ` +
        `echoed one 64-byte message`,
    );
  }
  if (list.some((c) => c.workloads.some(isRequestRow))) {
    lines.push("", ...throughputTable(results, list));
  }
  if (list.some((c) => c.workloads.includes(STREAM))) {
    lines.push("", ...streamTable(results, list));
  }
  if (list.some((c) => c.name === OURS_FETCH_ONLY)) {
    lines.push("", ...fetchOnlyTable(results));
  }
  if (list.some((c) => c.workloads.includes(COMPRESSION_GZIP))) {
    lines.push(
      "",
      ...compressionTable(results, list),
      "",
      ...compressionNotes(results, list),
    );
  }
  if (list.some((c) => c.workloads === WEBSOCKET)) {
    lines.push("", ...webSocketTable(results, list));
  }
  if (memory.size > 0) lines.push("", ...memoryTable(memory));
  if (memory.has(OURS_TLS)) {
    // Reported beside Deno.serve's; no target (issue 10).
    const kib = (name: string) =>
      (memory.get(name)?.kibPerConnection ?? NaN).toFixed(2);
    lines.push(
      "",
      `Idle memory per TLS connection: ours ${kib(OURS_TLS)} KiB, ` +
        `Deno.serve ${kib(ANCHOR_TLS)} KiB.`,
    );
  }
  lines.push(
    "",
    ...checks.map((t) => `${t.pass ? "PASS" : "FAIL"} ${t.label}`),
  );
  if (options.workers > 1 && options.workers >= env.nproc) {
    lines.push(
      "",
      `Note: the servers have ${Math.max(1, env.nproc - 1)} CPU(s); ` +
        `--workers ${options.workers} cannot scale here.`,
    );
  }
  console.log(lines.join("\n"));
  return checks;
}

/** Kills every subprocess and removes the helper files. */
async function cleanUp(): Promise<void> {
  await stop(children);
  const dir = tempDir;
  tempDir = undefined;
  if (dir) await Deno.remove(dir, { recursive: true }).catch(() => {});
}

async function bench(options: Options): Promise<boolean> {
  const env = await describeEnvironment(options);
  const dir = tempDir = await Deno.makeTempDir({ prefix: "bench-" });
  const servers = new Map<string, Server>();
  try {
    await writeHelpers(dir);
    if (options.only.has("https")) await makeCertificate(dir);
    const list = await contenders(options, env, dir);
    /** What each HTTPS server negotiates, for the report. */
    const tls: string[] = [];
    const load: Load = {
      pin: env.wrkPin,
      connections: options.connections,
      duration: options.duration,
      dir,
    };
    for (const contender of list) {
      const server = await startServer(contender, env.serverPin);
      servers.set(contender.name, server);
      const check = contender.workloads === HANDLER
        ? checkHandler
        : contender.workloads === WEBSOCKET
        ? checkWebSocket
        : contender.workloads.includes(COMPRESSION_GZIP)
        ? (server: Server) => checkCompression(server, contender.workloads)
        : checkHello;
      await check(server);
      if (server.tls) tls.push(await describeTls(server));
    }
    await warmUp(servers, list, load);
    const results = await runRounds(servers, list, options, load);
    await stop([...servers.values()].map((server) => server.child));
    servers.clear();
    const memoryList: Contender[] = [];
    if (options.only.has("memory")) {
      memoryList.push(
        ...bookContenders(env, dir).filter((c) => c.name !== OURS_LOG),
      );
    }
    if (options.only.has("https") && certificate) {
      memoryList.push(...httpsContenders(certificate.files));
    }
    if (options.only.has("websocket")) {
      memoryList.push(...webSocketContenders());
    }
    let memory = new Map<string, Memory>();
    if (memoryList.length > 0) {
      const idle = await idleBudget(options.idleConnections);
      if (idle < options.idleConnections) {
        console.error(
          `open-file limit: measuring ${idle} idle connections ` +
            `(run \`ulimit -n 65536\` first for ${options.idleConnections})`,
        );
      }
      memory = await measureMemory(memoryList, idle, env, load);
    }
    return report(env, options, results, list, memory, tls)
      .every((t) => t.pass);
  } finally {
    await cleanUp();
  }
}

/** Parses the flags, or exits 2 with the usage. */
function optionsOrExit(args: string[]): Options & Internal {
  try {
    return parseOptions(args);
  } catch (error) {
    console.error(`error: ${(error as Error).message}\n${USAGE}`);
    Deno.exit(2);
  }
}

/** Runs one of the servers the bench starts as subprocesses. */
function serveRole(role: string, files?: CertificateFiles): void {
  switch (role) {
    case "anchor":
      return serveAnchor(files);
    case "floor":
    case "floor-log":
      serveFloor(role === "floor-log");
      return;
    case "deno-handler":
      return serveDenoHandler();
    case "ours-handler":
      return serveOursHandler();
    case "deno-ws":
      return serveDenoWebSocket();
    case "ours-ws":
      return serveOursWebSocket();
    case "deno-json":
      return serveDenoJson();
    case "ours-json":
    case "ours-json-plain":
      return serveOursJson(role === "ours-json");
    default:
      throw new Error(`unknown server: ${role}`);
  }
}

if (import.meta.main) {
  const options = optionsOrExit(Deno.args);
  if (options.serve !== undefined) {
    serveRole(options.serve, options.files);
  } else if (options.download !== undefined) {
    await download(options.download);
  } else if (options.wsLoad !== undefined) {
    await webSocketLoad(
      options.wsLoad,
      options.connections,
      options.size,
      options.window,
      options.duration,
    );
  } else {
    const interrupted = () => {
      cleanUp().finally(() => Deno.exit(130));
    };
    Deno.addSignalListener("SIGINT", interrupted);
    Deno.addSignalListener("SIGTERM", interrupted);
    const passed = await bench(options);
    Deno.removeSignalListener("SIGINT", interrupted);
    Deno.removeSignalListener("SIGTERM", interrupted);
    if (options.strict && !passed) Deno.exit(1);
  }
}
