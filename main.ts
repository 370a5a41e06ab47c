#!/usr/bin/env -S deno run --allow-net
/**
 * The final project of *The Rust Programming Language* — "Building a
 * Multithreaded Web Server" — in Deno, on raw TCP, grown into a real
 * HTTP/1.1 server: one file, no dependencies, no `Deno.serve`.
 *
 * It answers `GET /` with a hello page, `GET /sleep` with the same page after
 * a delay, `POST /echo` with the request body, and anything else with a 404
 * page. Requests are parsed from bytes (RFC 9112), connections are kept alive
 * and pipelined, slow or hostile clients are cut by timeouts and limits, and a
 * shutdown finishes every response it owes.
 *
 * Run it (the only permission it needs is the network):
 *
 * ```sh
 * deno run --allow-net main.ts --port 7878
 * ```
 *
 * Flags (`--help` lists them with their defaults): `--hostname H`,
 * `--port N` (0 for any free port), `--quiet` (no access log),
 * `--header-timeout S`, `--idle-timeout S`, `--body-timeout S`,
 * `--shutdown-timeout S`, `--max-connections N`, `--max-body BYTES`,
 * `--sleep-delay S`, `--workers N|auto` (needs `--allow-read` and
 * `--unstable-net`), `--version`. SIGINT or SIGTERM shuts down gracefully.
 *
 * Or use it from code:
 *
 * ```ts
 * import { serve } from "./main.ts";
 * const server = serve({ port: 0, accessLog: false });
 * console.log(server.addr.port);
 * await server.shutdown();
 * ```
 *
 * @module
 */

/** The program's version, printed by `--version`. */
export const VERSION = "1.0.0";

// ---------------------------------------------------------------------------
// The pages: the book's hello.html and 404.html, embedded so that the server
// needs no file access and `deno compile` yields one self-contained binary.
// ---------------------------------------------------------------------------

/** The page for `GET /` and `GET /sleep` (the book's `hello.html`). */
export const HELLO_PAGE = `<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <title>Hello!</title>
  </head>
  <body>
    <h1>Hello!</h1>
    <p>Hi from Deno</p>
  </body>
</html>
`;

/** The page for any unknown path (the book's `404.html`). */
export const NOT_FOUND_PAGE = `<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <title>Hello!</title>
  </head>
  <body>
    <h1>Oops!</h1>
    <p>Sorry, I don't know what you're asking for.</p>
  </body>
</html>
`;

// ---------------------------------------------------------------------------
// Limits and defaults
// ---------------------------------------------------------------------------

/** Options of {@linkcode serve}. Durations are in seconds. */
export interface ServeOptions {
  /** The address to listen on. @default {"127.0.0.1"} */
  hostname?: string;
  /** The port to listen on; 0 picks any free port. @default {7878} */
  port?: number;
  /** Aborting it shuts the server down, as {@linkcode Server.shutdown}. */
  signal?: AbortSignal;
  /** Called once with the address the server listens on. */
  onListen?: (addr: Deno.NetAddr) => void;
  /**
   * Where the Common Log Format access log goes: `true` writes it to stdout,
   * `false` turns it off, a function receives it in batches of whole lines.
   * @default {true}
   */
  accessLog?: boolean | ((lines: string) => void);
  /** How long `GET /sleep` sleeps before answering. @default {5} */
  sleepDelay?: number;
  /** A request head not complete this long after it began is answered 408. @default {10} */
  headerTimeout?: number;
  /** A keep-alive connection with no request in progress is closed after this long. @default {5} */
  idleTimeout?: number;
  /** A request body, or a response write, making no progress this long ends the connection. @default {30} */
  bodyTimeout?: number;
  /** On shutdown, connections still busy after this long are closed. @default {10} */
  shutdownTimeout?: number;
  /** At this many open connections the server stops accepting until one closes. @default {10000} */
  maxConnections?: number;
  /** The largest request body, in bytes; larger ones are answered 413. @default {1048576} */
  maxBody?: number;
  /** The longest request target, in bytes; longer ones are answered 414. @default {8192} */
  maxTarget?: number;
  /** The largest request head (request line and fields), in bytes; larger ones are answered 431. @default {16384} */
  maxHead?: number;
  /** The most header fields in one request; more are answered 431. @default {100} */
  maxFields?: number;
  /** Let several listeners share the port (Linux; needs `--unstable-net`). @default {false} */
  reusePort?: boolean;
}

const DEFAULTS = {
  hostname: "127.0.0.1",
  port: 7878,
  sleepDelay: 5,
  headerTimeout: 10,
  idleTimeout: 5,
  bodyTimeout: 30,
  shutdownTimeout: 10,
  maxConnections: 10_000,
  maxBody: 1024 * 1024,
  maxTarget: 8 * 1024,
  maxHead: 16 * 1024,
  maxFields: 100,
};

type Limits = typeof DEFAULTS;

/** The size limits {@linkcode parseRequest} enforces, in bytes or fields. */
export interface ParseLimits {
  /** The longest request target (414 past it). */
  maxTarget: number;
  /** The largest head (431 past it). */
  maxHead: number;
  /** The most fields (431 past it). */
  maxFields: number;
  /** The largest announced body (413 past it). */
  maxBody: number;
}

/** An idle connection's read buffer: small, because every idle connection holds one. */
const IDLE_BUFFER = 256;
/** Read buffers of closed connections, reused: allocating them is not free. */
const SPARE_BUFFERS: Uint8Array[] = [];
const MAX_SPARE_BUFFERS = 256;
/** The most a connection buffers while reading a body. */
const BODY_BUFFER = 64 * 1024;
/** Responses queued past this many bytes are written before more requests are parsed. */
const MAX_BATCH = 64 * 1024;
/** The longest chunk-size line, extensions included (RFC 9112 §7.1.1 leaves it open). */
const MAX_CHUNK_LINE = 4096;
/** After an error reply, how long the server drains what the client still sends. */
const LINGER_TIME = 2;
/** On shutdown, how long a new connection may still send its first request. */
const SHUTDOWN_GRACE = 1;
/** Access log lines buffered before a write is forced. */
const LOG_BATCH = 512;
/** Access log lines held while stdout is blocked, before lines are dropped. */
const MAX_LOG_BACKLOG = 100_000;

// ---------------------------------------------------------------------------
// serve(): the book's `main` — bind, accept, hand each stream to a handler
// ---------------------------------------------------------------------------

/** A running server, shaped like the result of `Deno.serve`. */
export interface Server {
  /** The address the server listens on. */
  readonly addr: Deno.NetAddr;
  /** Settles when the server has shut down and every connection is closed. */
  readonly finished: Promise<void>;
  /** The number of connections open right now. */
  readonly connections: number;
  /** How many busy connections the shutdown timeout closed. */
  readonly forced: number;
  /**
   * Stops accepting, closes idle connections, lets requests in progress
   * finish (their responses say `Connection: close`), and closes what is
   * still busy after the shutdown timeout.
   * @returns {@linkcode Server.finished}
   */
  shutdown(): Promise<void>;
}

/**
 * Starts the web server.
 *
 * @param options Where to listen, the limits and the timeouts.
 * @returns The running server.
 * @example Serve on a free port, then stop
 * ```ts
 * import { serve } from "./main.ts";
 * const server = serve({ port: 0, accessLog: false });
 * const response = await fetch(`http://127.0.0.1:${server.addr.port}/`);
 * console.log(await response.text());
 * await server.shutdown();
 * ```
 */
export function serve(options: ServeOptions = {}): Server {
  const limits = { ...DEFAULTS };
  for (const key of Object.keys(DEFAULTS) as (keyof Limits)[]) {
    const value = options[key];
    if (value !== undefined) (limits as Record<string, unknown>)[key] = value;
  }
  const listener = Deno.listen({
    hostname: limits.hostname,
    port: limits.port,
    ...(options.reusePort ? { reusePort: true } : {}),
  });
  const server = new ServerState(listener, limits, options.accessLog ?? true);
  options.signal?.addEventListener("abort", () => server.shutdown(), {
    once: true,
  });
  options.onListen?.(listener.addr);
  return {
    addr: listener.addr,
    finished: server.finished,
    get connections() {
      return server.connections.length;
    },
    get forced() {
      return server.forced;
    },
    shutdown: () => server.shutdown(),
  };
}

/** The server's side of things: its listener, live connections, clock and log. */
class ServerState {
  /** Live connections; each knows its index, so removal is a swap. */
  readonly connections: Connection[] = [];
  readonly finished: Promise<void>;
  closing = false;
  forced = 0;
  /** A coarse clock (ms), advanced by the ticker: deadlines need no more. */
  now = Date.now();
  readonly cache = new ResponseCache();
  readonly log: AccessLog | null;
  #slotFree: (() => void) | null = null;
  #drained: (() => void) | null = null;
  #ticker: ReturnType<typeof setInterval>;
  #forceTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    readonly listener: Deno.TcpListener,
    readonly limits: Limits,
    accessLog: boolean | ((lines: string) => void),
  ) {
    this.log = accessLog === false ? null : new AccessLog(accessLog, this);
    // One timer for every deadline of every connection, rather than a timer
    // per read: a quarter of the shortest timeout, at most 250 ms.
    const shortest = Math.min(
      limits.headerTimeout,
      limits.idleTimeout,
      limits.bodyTimeout,
    );
    const period = Math.max(10, Math.min(250, shortest * 250));
    this.#ticker = setInterval(() => this.tick(), period);
    this.finished = this.run();
  }

  /** The book's `for stream in listener.incoming()`, with a connection cap. */
  async run(): Promise<void> {
    while (!this.closing) {
      try {
        for await (const stream of this.listener) {
          const connection = new Connection(stream, this.now);
          connection.index = this.connections.push(connection) - 1;
          handleConnection(this, connection);
          if (this.connections.length >= this.limits.maxConnections) {
            // At the cap, stop accepting: new clients wait in the kernel's
            // backlog instead of being accepted and dropped.
            await new Promise<void>((resolve) => this.#slotFree = resolve);
          }
        }
      } catch (error) {
        // Accept can fail for reasons that pass (EMFILE, a reset in the
        // backlog); back off briefly rather than stop serving.
        if (this.closing) break;
        console.error(`accept failed: ${error}`);
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
    if (this.connections.length > 0) {
      await new Promise<void>((resolve) => this.#drained = resolve);
    }
    clearInterval(this.#ticker);
    clearTimeout(this.#forceTimer);
    await this.log?.close();
  }

  /** The pool's `Drop`: stop accepting, close the idle, wait for the busy. */
  shutdown(): Promise<void> {
    if (!this.closing) {
      this.closing = true;
      try {
        this.listener.close();
      } catch { /* already closed */ }
      this.#slotFree?.();
      for (const connection of this.connections) {
        if (connection.state === IDLE) {
          connection.close();
        } else if (connection.state === HEAD && connection.isSilent()) {
          // Just accepted, its first request may be on the way (a proxy
          // sends it right after connecting): a short grace, as Go gives,
          // rather than a close that would lose it.
          connection.deadline = Math.min(
            connection.deadline,
            this.now + SHUTDOWN_GRACE * 1000,
          );
        }
      }
      this.#forceTimer = setTimeout(() => {
        for (const connection of this.connections) {
          this.forced++;
          connection.close();
        }
      }, this.limits.shutdownTimeout * 1000);
    }
    return this.finished;
  }

  forget(connection: Connection): void {
    connection.close();
    if (
      connection.buffer.length === IDLE_BUFFER &&
      SPARE_BUFFERS.length < MAX_SPARE_BUFFERS
    ) SPARE_BUFFERS.push(connection.buffer);
    const last = this.connections.pop()!;
    if (last !== connection) {
      this.connections[connection.index] = last;
      last.index = connection.index;
    }
    if (this.connections.length < this.limits.maxConnections) {
      this.#slotFree?.();
      this.#slotFree = null;
    }
    if (this.closing && this.connections.length === 0) this.#drained?.();
  }

  /** Advances the clock and enforces every connection's deadline. */
  tick(): void {
    this.now = Date.now();
    for (const connection of this.connections) {
      if (connection.deadline <= this.now) expire(this, connection);
    }
    this.log?.flush();
  }
}

// ---------------------------------------------------------------------------
// handleConnection(): the book's `handle_connection`, grown up
// ---------------------------------------------------------------------------

// What a connection is doing, which decides what its deadline means.
const HEAD = 0; // reading a request head (or waiting for a first one)
const IDLE = 1; // kept alive between requests
const BODY = 2; // reading a request body
const BUSY = 3; // handling a request (`/sleep`): no deadline
const WRITE = 4; // writing responses
const LINGER = 5; // closing after an error: draining what the client sends

/** One client connection: its stream, its read buffer and its deadline. */
class Connection {
  state = HEAD;
  /** When the current state's timeout fires (ms on the server's clock). */
  deadline: number;
  /** When the request head being read began; 0 between requests. */
  headStarted: number;
  buffer = SPARE_BUFFERS.pop() ?? new Uint8Array(IDLE_BUFFER);
  /** The unparsed bytes are `buffer[start, end)`. */
  start = 0;
  end = 0;
  /** The size of the last read, and whether it filled all the room it had. */
  lastRead = 0;
  filled = false;
  /** Where it stands in the server's list of connections. */
  index = 0;
  /** Kept alive past its first response. */
  kept = false;
  /** Responses parsed from one read, written together. */
  pending: Uint8Array[] = [];
  pendingBytes = 0;
  readonly request = new RequestHead();
  closed = false;
  #remote = "";
  #wake: (() => void) | null = null;
  #sleeper: ReturnType<typeof setTimeout> | undefined;

  constructor(readonly stream: Deno.TcpConn, now: number) {
    this.headStarted = now;
    this.deadline = now;
  }

  /** The client's address, for the access log. */
  remote(): string {
    return this.#remote ||= (this.stream.remoteAddr as Deno.NetAddr).hostname;
  }

  /** Nothing of the current request has arrived yet. */
  isSilent(): boolean {
    return this.start === this.end;
  }

  /** Waits `ms`, unless the connection is closed first. */
  sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      this.#wake = resolve;
      this.#sleeper = setTimeout(resolve, ms);
    });
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.#sleeper);
    this.#wake?.();
    try {
      this.stream.close();
    } catch { /* already closed by the peer's reset */ }
  }
}

/**
 * Serves one connection: read → parse → route → write → keep alive?, repeated.
 * Pipelined requests already buffered are answered before reading again, and
 * their responses leave in one write. Never throws: a client that vanishes
 * or resets only ends its own connection.
 */
async function handleConnection(
  server: ServerState,
  connection: Connection,
): Promise<void> {
  const { limits } = server;
  const request = connection.request;
  try {
    while (true) {
      const consumed = parseRequest(
        connection.buffer,
        connection.start,
        connection.end,
        request,
        limits,
      );
      if (consumed === INCOMPLETE) {
        if (connection.pendingBytes > 0) await flush(server, connection);
        if (connection.start === connection.end && !connection.headStarted) {
          if (server.closing) return;
          connection.state = IDLE;
          connection.deadline = server.now + limits.idleTimeout * 1000;
          shrink(connection);
        } else {
          connection.headStarted ||= server.now;
          connection.state = HEAD;
          connection.deadline = connection.headStarted +
            limits.headerTimeout * 1000;
        }
        // fill(), inline: the hot path awaits the read itself, no wrapper.
        const room = makeRoom(connection, limits.maxHead);
        if (!received(connection, room, await connection.stream.read(room))) {
          return;
        }
        continue;
      }
      connection.headStarted = 0;
      const line = server.log ? requestLine(connection.buffer, request) : "";
      let reply: Reply | null;
      if (consumed < 0) {
        reply = errorReply(-consumed);
      } else {
        connection.start += consumed;
        reply = request.chunked || request.contentLength > 0
          ? await readAndRoute(server, connection)
          : route(request.method, request.path, EMPTY);
        if (reply === null) return;
      }
      if (reply.delayed) {
        if (connection.pendingBytes > 0) await flush(server, connection);
        connection.state = BUSY;
        connection.deadline = Infinity;
        await connection.sleep(limits.sleepDelay * 1000);
        if (connection.closed) return;
      }
      const keepAlive = reply.status < 400 && !server.closing &&
        shouldKeepAlive(request);
      // A request that failed to parse is no HEAD request we can trust.
      const headOnly = consumed > 0 && request.method === "HEAD";
      queue(
        connection,
        responseBytes(server, reply, headOnly, keepAlive, request.minor),
      );
      server.log?.write(
        connection,
        line,
        reply.status,
        headOnly ? 0 : reply.contents.length,
      );
      if (!keepAlive) {
        await flush(server, connection);
        // Every error ends the connection; unread bytes behind it must not
        // turn our close into a reset that destroys the reply in flight.
        if (reply.status >= 400 || connection.start < connection.end) {
          await linger(server, connection);
        }
        return;
      }
      if (!connection.kept) {
        // Nagle's algorithm only delays connections that stay open (a
        // response written after another waits for its ACK); one that closes
        // after its reply flushes at once, and saves the system call.
        connection.kept = true;
        connection.stream.setNoDelay(true);
      }
      connection.state = IDLE;
      if (connection.pendingBytes >= MAX_BATCH) {
        await flush(server, connection);
      }
    }
  } catch {
    // The client reset, vanished, or was cut by a timeout: nothing is owed.
  } finally {
    if (connection.state === LINGER && !connection.closed) {
      await drain(connection).catch(() => {});
    }
    server.forget(connection);
  }
}

/** Go's `shouldKeepAlive`: RFC 9112 §9.3 persistence rules. */
function shouldKeepAlive(request: RequestHead): boolean {
  if (request.close) return false;
  return request.minor >= 1 || request.keepAlive;
}

/**
 * Makes room at the end of the connection's buffer for a read: resets it
 * when all is consumed, compacts it when full, and grows it (up to `max`)
 * when the last read filled all the room it had — more is waiting, and one
 * read should take in a whole pipelined batch.
 * @returns The room to read into.
 */
function makeRoom(connection: Connection, max: number): Uint8Array {
  const { buffer, start, end } = connection;
  const full = end === buffer.length;
  const size = connection.filled || (full && start === 0)
    ? Math.min(max, buffer.length * 2)
    : buffer.length;
  if (size > buffer.length) {
    const larger = new Uint8Array(size);
    larger.set(buffer.subarray(start, end));
    connection.buffer = larger;
  } else if (full) {
    // The parsers reject a head or chunk line before it needs more than `max`.
    if (start === 0) throw new Error("read buffer limit");
    buffer.copyWithin(0, start, end);
  }
  if (size > buffer.length || full || start === end) {
    connection.start = 0;
    connection.end = end - start;
  }
  return connection.buffer.subarray(connection.end);
}

/**
 * Reads more bytes into the connection's buffer.
 * @returns false at end of stream, or when a timeout has ended the connection.
 */
async function fill(connection: Connection, max: number): Promise<boolean> {
  const room = makeRoom(connection, max);
  return received(connection, room, await connection.stream.read(room));
}

/**
 * Takes in what a read into `room` returned.
 * @returns false at end of stream, or when a timeout has ended the connection.
 */
function received(
  connection: Connection,
  room: Uint8Array,
  count: number | null,
): boolean {
  if (count === null || connection.state === LINGER) return false;
  connection.end += count;
  connection.lastRead = count;
  connection.filled = count === room.length;
  return true;
}

/** An idle connection keeps only a small buffer, unless reads are large. */
function shrink(connection: Connection): void {
  if (
    connection.buffer.length > IDLE_BUFFER &&
    connection.lastRead * 2 <= connection.buffer.length
  ) {
    connection.buffer = new Uint8Array(IDLE_BUFFER);
  }
}

function queue(connection: Connection, bytes: Uint8Array): void {
  connection.pending.push(bytes);
  connection.pendingBytes += bytes.length;
}

/** Writes every queued response in one write; stalls are cut by the ticker. */
async function flush(server: ServerState, connection: Connection) {
  const { pending } = connection;
  let bytes = pending[0];
  if (pending.length > 1) {
    bytes = new Uint8Array(connection.pendingBytes);
    let offset = 0;
    for (const part of pending) {
      bytes.set(part, offset);
      offset += part.length;
    }
  }
  pending.length = 0;
  connection.pendingBytes = 0;
  connection.state = WRITE;
  let written = 0;
  while (written < bytes.length) {
    connection.deadline = server.now + server.limits.bodyTimeout * 1000;
    written += await connection.stream.write(
      written === 0 ? bytes : bytes.subarray(written),
    );
  }
}

/**
 * Half-closes, then reads and discards until the client closes too (or the
 * linger time ends): a close with unread input would reset the connection
 * and could destroy the reply before the client reads it.
 */
async function linger(server: ServerState, connection: Connection) {
  connection.state = LINGER;
  connection.deadline = server.now + LINGER_TIME * 1000;
  await connection.stream.closeWrite();
  await drain(connection);
}

async function drain(connection: Connection): Promise<void> {
  const scratch = connection.buffer.length >= 4096
    ? connection.buffer
    : new Uint8Array(4096);
  while (await connection.stream.read(scratch) !== null) { /* discard */ }
}

/** The ticker's verdict on a connection whose deadline passed. */
function expire(server: ServerState, connection: Connection): void {
  const started = connection.state === BODY ||
    (connection.state === HEAD && !connection.isSilent());
  if (!started) {
    // Idle, silent since it opened, stuck writing, or done lingering.
    connection.close();
    return;
  }
  // RFC 9110 §15.5.9: 408 for a request that did not arrive in time. The
  // connection loop is blocked in a read, so the ticker writes the reply and
  // the loop, when its read returns, drains until the client closes.
  connection.state = LINGER;
  connection.deadline = server.now + LINGER_TIME * 1000;
  const reply = errorReply(408);
  server.log?.write(connection, "-", reply.status, reply.contents.length);
  connection.stream.write(responseBytes(server, reply, false, false, 1))
    .then(() => connection.stream.closeWrite())
    .catch(() => connection.close());
}

// ---------------------------------------------------------------------------
// parseRequest(): picohttpparser's shape — a pure function over bytes
// ---------------------------------------------------------------------------

/** What {@linkcode parseRequest} returns when the head is not all there yet. */
export const INCOMPLETE = 0;

/**
 * A parsed request head: offsets into the buffer it was parsed from, and the
 * facts the server acts on. One per connection, reused for every request.
 */
export class RequestHead {
  /** Where the method begins in the buffer. */
  methodStart = 0;
  /** Where the request line ends (before its CRLF); 0 until it has parsed. */
  lineEnd = 0;
  /** One of {@linkcode METHODS}, or null for a method we do not know. */
  method: string | null = null;
  /** The path to route by: one of the routes' own strings, or decoded text. */
  path = "/";
  /** The minor version: 0 for HTTP/1.0, 1 for HTTP/1.1 (and later 1.x). */
  minor = 1;
  /** The Content-Length, or -1 when there is none. */
  contentLength: number = -1;
  /** Transfer-Encoding was given. */
  transferEncoding = false;
  /** Transfer-Encoding ends in chunked. */
  chunked = false;
  /** Transfer-Encoding names a coding other than chunked. */
  otherCoding = false;
  /** Transfer-Encoding has chunked twice, or not last. */
  codingOrder = false;
  /** Connection: close. */
  close = false;
  /** Connection: keep-alive (what keeps HTTP/1.0 open). */
  keepAlive = false;
  /** Expect: 100-continue, for a request with a body. */
  expectContinue = false;
  /** How many Host fields there were. */
  hosts = 0;
  /** The size announced by the last chunk-size line parsed. */
  chunkSize = 0;

  /** Forgets the previous request's facts before parsing the next. */
  reset(): void {
    this.lineEnd = this.hosts = 0;
    this.minor = 1;
    this.contentLength = -1;
    this.transferEncoding = this.chunked = false;
    this.otherCoding = this.codingOrder = false;
    this.close = this.keepAlive = this.expectContinue = false;
  }
}

const CR = 0x0d;
const LF = 0x0a;
const SP = 0x20;
const HTAB = 0x09;
const COLON = 0x3a;
const SLASH = 0x2f;
const QUESTION = 0x3f;
const SEMICOLON = 0x3b;
const COMMA = 0x2c;

function byteTable(ranges: [number, number][], chars = ""): Uint8Array {
  const table = new Uint8Array(256);
  for (const [from, to] of ranges) table.fill(1, from, to + 1);
  for (const char of chars) table[char.charCodeAt(0)] = 1;
  return table;
}

const DIGIT: [number, number] = [0x30, 0x39];
const ALPHA: [number, number][] = [[0x41, 0x5a], [0x61, 0x7a]];
/** RFC 9110 §5.6.2 `tchar`. */
const TOKEN = byteTable([DIGIT, ...ALPHA], "!#$%&'*+-.^_`|~");
/** Request-target bytes: visible ASCII (RFC 3986 characters, leniently). */
const TARGET = byteTable([[0x21, 0x7e]]);
/** RFC 9110 §5.5 field-value bytes: VCHAR, obs-text, SP, HTAB. */
const FIELD_VALUE = byteTable([[0x21, 0x7e], [0x80, 0xff]], " \t");
/** RFC 3986 §3.2 `host [":" port]`: reg-name, IP-literal and port bytes. */
const HOST = byteTable([DIGIT, ...ALPHA], "-._~%!$&'()*+,;=:[]");
/** RFC 3986 §3.1 scheme bytes after the first letter. */
const SCHEME = byteTable([DIGIT, ...ALPHA], "+-.");
/** Chunk extension bytes (RFC 9112 §7.1.1), checked loosely, bounded in length. */
const CHUNK_EXT = byteTable([[0x21, 0x7e], [0x80, 0xff]], " \t");
const HEX = new Int8Array(256).fill(-1);
for (let i = 0; i < 16; i++) {
  HEX["0123456789abcdef".charCodeAt(i)] = i;
  HEX["0123456789ABCDEF".charCodeAt(i)] = i;
}

/**
 * Parses one request head from `buf[start, end)` into `request`.
 *
 * @param buf The bytes received.
 * @param start Where the unparsed bytes begin.
 * @param end Where they end.
 * @param request Receives the offsets and facts of the head.
 * @param limits The size limits.
 * @returns The bytes the head took (> 0), {@linkcode INCOMPLETE} (0), or
 * minus the status to reject it with (< 0).
 */
export function parseRequest(
  buf: Uint8Array,
  start: number,
  end: number,
  request: RequestHead,
  limits: ParseLimits = DEFAULTS,
): number {
  request.reset();
  let p = start;
  // RFC 9112 §2.2: ignore empty lines received before the request line.
  while (p + 1 < end && buf[p] === CR && buf[p + 1] === LF) p += 2;
  const headEnd = findHeadEnd(buf, p, end);
  if (headEnd === INCOMPLETE) {
    return end - start >= limits.maxHead
      ? -oversizeStatus(buf, p, end, limits)
      : INCOMPLETE;
  }
  if (headEnd < 0) return headEnd;
  if (headEnd - start > limits.maxHead) {
    return -oversizeStatus(buf, p, end, limits);
  }
  p = parseRequestLine(buf, p, request, limits);
  if (p < 0) return p;
  p = parseFields(buf, p, request, limits);
  if (p < 0) return p;
  const status = checkFraming(request, limits);
  return status ? -status : headEnd - start;
}

/**
 * Finds the empty line that ends a head.
 * @returns The offset just past it, INCOMPLETE, or -400 for a bare LF
 * (RFC 9112 §2.2 lets us reject it; accepting it invites smuggling).
 */
function findHeadEnd(buf: Uint8Array, p: number, end: number): number {
  let lf = buf.indexOf(LF, p);
  while (lf >= 0 && lf < end) {
    if (lf === p || buf[lf - 1] !== CR) return -400;
    if (lf + 2 >= end) return INCOMPLETE;
    if (buf[lf + 1] === CR && buf[lf + 2] === LF) return lf + 3;
    lf = buf.indexOf(LF, lf + 1);
  }
  return INCOMPLETE;
}

/** 414 when the request line's target is what made the head too big. */
function oversizeStatus(
  buf: Uint8Array,
  p: number,
  end: number,
  limits: Pick<Limits, "maxTarget">,
): number {
  const targetStart = buf.indexOf(SP, p) + 1;
  if (targetStart === 0 || targetStart >= end) return 431;
  let targetEnd = buf.indexOf(SP, targetStart);
  const lineEnd = buf.indexOf(CR, targetStart);
  if (targetEnd < 0 || (lineEnd >= 0 && lineEnd < targetEnd)) {
    targetEnd = lineEnd < 0 ? end : lineEnd;
  }
  return Math.min(targetEnd, end) - targetStart > limits.maxTarget ? 414 : 431;
}

/** RFC 9112 §3: `method SP request-target SP HTTP-version CRLF`. */
function parseRequestLine(
  buf: Uint8Array,
  p: number,
  request: RequestHead,
  limits: Pick<Limits, "maxTarget">,
): number {
  const methodStart = p;
  while (TOKEN[buf[p]]) p++;
  if (p === methodStart || buf[p] !== SP) return -400;
  request.methodStart = methodStart;
  request.method = intern(buf, methodStart, p++, METHODS);
  const targetStart = p;
  let query = -1;
  while (TARGET[buf[p]]) {
    if (buf[p] === QUESTION && query < 0) query = p;
    p++;
  }
  if (p - targetStart > limits.maxTarget) return -414;
  if (p === targetStart || buf[p] !== SP) return -400;
  const targetEnd = p++;
  // HTTP-version = "HTTP/" DIGIT "." DIGIT, case-sensitive (RFC 9112 §2.3).
  if (
    buf[p] !== 0x48 || buf[p + 1] !== 0x54 || buf[p + 2] !== 0x54 ||
    buf[p + 3] !== 0x50 || buf[p + 4] !== SLASH || buf[p + 6] !== 0x2e ||
    buf[p + 8] !== CR || buf[p + 9] !== LF
  ) return -400;
  const major = buf[p + 5] - 0x30;
  const minor = buf[p + 7] - 0x30;
  if (major < 0 || major > 9 || minor < 0 || minor > 9) return -400;
  request.lineEnd = p + 8;
  // RFC 9110 §2.5: a higher minor version is served as the highest we know.
  if (major !== 1) return -505;
  request.minor = minor;
  const status = parseTarget(buf, targetStart, targetEnd, query, request);
  return status ? -status : p + 10;
}

/**
 * RFC 9112 §3.2: origin-form routes by its path; absolute-form by the path
 * after its authority; asterisk-form is for OPTIONS only.
 */
function parseTarget(
  buf: Uint8Array,
  start: number,
  end: number,
  query: number,
  request: RequestHead,
): number {
  const pathEnd = query < 0 ? end : query;
  if (buf[start] === SLASH) {
    request.path = intern(buf, start, pathEnd, ROUTES) ??
      latin1(buf, start, pathEnd);
    return 0;
  }
  if (end - start === 1 && buf[start] === 0x2a) {
    request.path = "*";
    return request.method === "OPTIONS" ? 0 : 400;
  }
  let p = start;
  const letter = buf[p] | 0x20;
  if (letter < 0x61 || letter > 0x7a) return 400; // a scheme starts with ALPHA
  while (SCHEME[buf[p]]) p++;
  if (buf[p] !== COLON || buf[p + 1] !== SLASH || buf[p + 2] !== SLASH) {
    return 400;
  }
  p += 3;
  while (p < pathEnd && buf[p] !== SLASH) p++;
  request.path = p === pathEnd
    ? "/"
    : intern(buf, p, pathEnd, ROUTES) ?? latin1(buf, p, pathEnd);
  return 0;
}

/**
 * RFC 9112 §5: `field-name ":" OWS field-value OWS CRLF`, until an empty
 * line. With a request, records the fields that matter; without one (a
 * trailer section), only checks them.
 * @returns The offset past the empty line, or minus an error status.
 */
function parseFields(
  buf: Uint8Array,
  p: number,
  request: RequestHead | null,
  limits: Pick<Limits, "maxFields">,
): number {
  let count = 0;
  while (buf[p] !== CR) {
    if (++count > limits.maxFields) return -431;
    const nameStart = p;
    while (TOKEN[buf[p]]) p++;
    // No whitespace before the colon (§5.1), no obs-fold (§5.2): both 400.
    if (p === nameStart || buf[p] !== COLON) return -400;
    const nameEnd = p++;
    while (buf[p] === SP || buf[p] === HTAB) p++;
    const valueStart = p;
    while (FIELD_VALUE[buf[p]]) p++;
    // A CTL, NUL or bare CR in a value (§5.5).
    if (buf[p] !== CR || buf[p + 1] !== LF) return -400;
    let valueEnd = p;
    while (
      valueEnd > valueStart &&
      (buf[valueEnd - 1] === SP || buf[valueEnd - 1] === HTAB)
    ) valueEnd--;
    if (request) {
      const status = recordField(
        buf,
        nameStart,
        nameEnd,
        valueStart,
        valueEnd,
        request,
      );
      if (status) return -status;
    }
    p += 2;
  }
  return buf[p + 1] === LF ? p + 2 : -400;
}

/** Records a field the server acts on; returns an error status, or 0. */
function recordField(
  buf: Uint8Array,
  nameStart: number,
  nameEnd: number,
  valueStart: number,
  valueEnd: number,
  request: RequestHead,
): number {
  switch (nameEnd - nameStart) {
    case 4:
      if (!nameIs(buf, nameStart, "host")) return 0;
      request.hosts++;
      for (let i = valueStart; i < valueEnd; i++) if (!HOST[buf[i]]) return 400;
      return 0;
    case 6:
      if (!nameIs(buf, nameStart, "expect")) return 0;
      // RFC 9110 §10.1.1: 100-continue is the only expectation there is.
      if (!wordIs(buf, valueStart, valueEnd, "100-continue")) return 417;
      request.expectContinue = true;
      return 0;
    case 10:
      if (!nameIs(buf, nameStart, "connection")) return 0;
      forEachListItem(buf, valueStart, valueEnd, (from, to) => {
        if (wordIs(buf, from, to, "close")) request.close = true;
        else if (wordIs(buf, from, to, "keep-alive")) request.keepAlive = true;
      });
      return 0;
    case 14:
      if (!nameIs(buf, nameStart, "content-length")) return 0;
      return recordContentLength(buf, valueStart, valueEnd, request);
    case 17:
      if (!nameIs(buf, nameStart, "transfer-encoding")) return 0;
      request.transferEncoding = true;
      forEachListItem(buf, valueStart, valueEnd, (from, to) => {
        // RFC 9112 §6.1: chunked is applied once, and last.
        if (request.chunked) request.codingOrder = true;
        if (wordIs(buf, from, to, "chunked")) request.chunked = true;
        else request.otherCoding = true;
      });
      return 0;
  }
  return 0;
}

/** RFC 9110 §8.6: digits only; copies of one value are tolerated. */
function recordContentLength(
  buf: Uint8Array,
  start: number,
  end: number,
  request: RequestHead,
): number {
  if (start === end) return 400;
  let length = 0;
  for (let i = start; i < end; i++) {
    const digit = buf[i] - 0x30;
    if (digit < 0 || digit > 9) return 400;
    // Past 2^53 every value is simply "too large": no overflow, no wrap.
    length = Math.min(length * 10 + digit, Number.MAX_SAFE_INTEGER);
  }
  if (request.contentLength >= 0 && request.contentLength !== length) {
    return 400;
  }
  request.contentLength = length;
  return 0;
}

/** RFC 9112 §6.3: one unambiguous way to find where the body ends. */
function checkFraming(
  request: RequestHead,
  limits: Pick<Limits, "maxBody">,
): number {
  // RFC 9112 §3.2: HTTP/1.1 needs exactly one Host; 1.0 at most one.
  if (request.minor >= 1 ? request.hosts !== 1 : request.hosts > 1) return 400;
  if (request.transferEncoding) {
    // Both framings at once is how requests are smuggled (§6.1).
    if (request.contentLength >= 0) return 400;
    // §6.1: a 1.0 request with Transfer-Encoding is faulty framing.
    if (request.minor === 0) return 400;
    // Chunked twice or not last (§6.1), or an empty list: the end is unknown.
    if (request.codingOrder) return 400;
    if (!request.chunked && !request.otherCoding) return 400;
    // Codings we do not decode (§6.1): 501, as RFC 9112 §6.1 suggests.
    if (request.otherCoding) return 501;
  }
  if (request.contentLength > limits.maxBody) return 413;
  if (!request.chunked && request.contentLength <= 0) {
    request.expectContinue = false;
  }
  if (request.minor === 0) request.expectContinue = false;
  return 0;
}

/**
 * RFC 9112 §7.1: `1*HEXDIG [chunk-ext] CRLF`; the size goes to
 * `request.chunkSize`. Sizes past `room` are 413 at once, so huge hex
 * numbers never overflow.
 */
function parseChunkSize(
  buf: Uint8Array,
  start: number,
  end: number,
  request: RequestHead,
  room: number,
): number {
  let p = start;
  let size = 0;
  while (p < end && HEX[buf[p]] >= 0) {
    size = size * 16 + HEX[buf[p++]];
    if (size > room) return -413;
  }
  if (p === start && p < end) return -400;
  // chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ): after the size,
  // only whitespace leading to ";", then anything visible, bounded.
  let q = p;
  while (q < end && (buf[q] === SP || buf[q] === HTAB)) q++;
  if (q < end && buf[q] === SEMICOLON) {
    while (q < end && CHUNK_EXT[buf[q]]) q++;
  } else if (q > p && q < end) {
    return -400;
  }
  if (q - start > MAX_CHUNK_LINE) return -400;
  if (q + 1 >= end) return INCOMPLETE;
  if (buf[q] !== CR || buf[q + 1] !== LF) return -400;
  request.chunkSize = size;
  return q + 2 - start;
}

/** RFC 9112 §7.1: chunk data is followed by CRLF, nothing else. */
function parseDataEnd(buf: Uint8Array, start: number, end: number): number {
  if (end - start < 2) return INCOMPLETE;
  return buf[start] === CR && buf[start + 1] === LF ? 2 : -400;
}

/** RFC 9112 §7.1.2: the trailer section after the last chunk, checked and dropped. */
function parseTrailers(
  buf: Uint8Array,
  start: number,
  end: number,
  limits: Pick<Limits, "maxHead" | "maxFields">,
): number {
  if (end - start >= 2 && buf[start] === CR && buf[start + 1] === LF) return 2;
  const trailerEnd = findHeadEnd(buf, start, end);
  if (trailerEnd === INCOMPLETE) {
    return end - start >= limits.maxHead ? -431 : INCOMPLETE;
  }
  if (trailerEnd < 0) return trailerEnd;
  const p = parseFields(buf, start, null, limits);
  return p < 0 ? p : p - start;
}

/** Compares a field name with a lower-case name, ignoring case. */
function nameIs(buf: Uint8Array, start: number, name: string): boolean {
  for (let i = 0; i < name.length; i++) {
    // Field names are tokens: OR-ing 0x20 lower-cases letters and maps no
    // other token byte onto a letter or a hyphen.
    if ((buf[start + i] | 0x20) !== name.charCodeAt(i)) return false;
  }
  return true;
}

function wordIs(buf: Uint8Array, start: number, end: number, word: string) {
  return end - start === word.length && nameIs(buf, start, word);
}

/** Calls `each` for every non-empty item of a comma-separated list (RFC 9110 §5.6.1). */
function forEachListItem(
  buf: Uint8Array,
  start: number,
  end: number,
  each: (from: number, to: number) => void,
): void {
  let p = start;
  while (p < end) {
    let from = p;
    while (p < end && buf[p] !== COMMA) p++;
    let to = p++;
    while (from < to && (buf[from] === SP || buf[from] === HTAB)) from++;
    while (to > from && (buf[to - 1] === SP || buf[to - 1] === HTAB)) to--;
    if (to > from) each(from, to);
  }
}

function latin1(buf: Uint8Array, start: number, end: number): string {
  return String.fromCharCode.apply(null, buf.subarray(start, end) as never);
}

/** The methods RFC 9110 §9 and RFC 5789 define; others are answered 501. */
const METHODS = [
  "GET",
  "HEAD",
  "POST",
  "PUT",
  "DELETE",
  "CONNECT",
  "OPTIONS",
  "TRACE",
  "PATCH",
];

const ROUTES = ["/", "/sleep", "/echo"];

/** Returns the string of `known` spelt by `buf[start, end)`, without allocating. */
function intern(
  buf: Uint8Array,
  start: number,
  end: number,
  known: string[],
): string | null {
  for (const word of known) {
    if (word.length !== end - start) continue;
    let i = 0;
    while (i < word.length && buf[start + i] === word.charCodeAt(i)) i++;
    if (i === word.length) return word;
  }
  return null;
}

let lastLine = "-";

/**
 * The request line as received, for the access log. Most lines repeat the
 * one before (a client asks for the same thing again), so that string is
 * reused when the bytes match, and a busy log allocates no line at all.
 */
function requestLine(buf: Uint8Array, request: RequestHead): string {
  const { methodStart: start, lineEnd: end } = request;
  if (end === 0) return "-";
  if (end - start === lastLine.length) {
    let i = 0;
    while (i < lastLine.length && buf[start + i] === lastLine.charCodeAt(i)) {
      i++;
    }
    if (i === lastLine.length) return lastLine;
  }
  return lastLine = latin1(buf, start, end);
}

// ---------------------------------------------------------------------------
// Request bodies (RFC 9112 §6): Content-Length or chunked, strict and bounded
// ---------------------------------------------------------------------------

const EMPTY = new Uint8Array(0);

/** Reads into the buffer while a body is expected; a stall is the ticker's. */
function fillBody(server: ServerState, connection: Connection) {
  connection.state = BODY;
  connection.deadline = server.now + server.limits.bodyTimeout * 1000;
  return fill(connection, Math.max(BODY_BUFFER, server.limits.maxHead));
}

/**
 * Reads the body the parsed head announced.
 * @returns the body, an error status, or null if the client went away.
 */
function readBody(
  server: ServerState,
  connection: Connection,
): Promise<Uint8Array | number | null> {
  return connection.request.chunked
    ? readChunked(server, connection)
    : readFixed(server, connection, connection.request.contentLength);
}

async function readFixed(
  server: ServerState,
  connection: Connection,
  length: number,
): Promise<Uint8Array | null> {
  // Grown as bytes arrive, so a head announcing a large body costs nothing
  // until the body actually comes.
  let body = new Uint8Array(Math.min(length, BODY_BUFFER));
  let received = Math.min(length, connection.end - connection.start);
  body.set(
    connection.buffer.subarray(connection.start, connection.start + received),
  );
  connection.start += received;
  while (received < length) {
    if (received === body.length) {
      const larger = new Uint8Array(Math.min(length, body.length * 2));
      larger.set(body);
      body = larger;
    }
    connection.state = BODY;
    connection.deadline = server.now + server.limits.bodyTimeout * 1000;
    const count = await connection.stream.read(body.subarray(received));
    if (count === null || connection.state === LINGER) return null;
    received += count;
  }
  return body;
}

async function readChunked(
  server: ServerState,
  connection: Connection,
): Promise<Uint8Array | number | null> {
  const { limits } = server;
  const request = connection.request;
  let body = new Uint8Array(1024);
  let length = 0;
  while (true) {
    const sizeLine = await parseBuffered(
      server,
      connection,
      (buf, start, end) =>
        parseChunkSize(buf, start, end, request, limits.maxBody - length),
    );
    if (sizeLine !== 0) return sizeLine;
    let remaining = request.chunkSize;
    if (remaining === 0) break;
    if (length + remaining > body.length) {
      const larger = new Uint8Array(
        Math.min(limits.maxBody, Math.max(length + remaining, body.length * 2)),
      );
      larger.set(body.subarray(0, length));
      body = larger;
    }
    while (remaining > 0) {
      if (connection.start === connection.end) {
        if (!await fillBody(server, connection)) return null;
      }
      const take = Math.min(remaining, connection.end - connection.start);
      body.set(
        connection.buffer.subarray(connection.start, connection.start + take),
        length,
      );
      length += take;
      connection.start += take;
      remaining -= take;
    }
    const dataEnd = await parseBuffered(server, connection, parseDataEnd);
    if (dataEnd !== 0) return dataEnd;
  }
  const trailers = await parseBuffered(
    server,
    connection,
    (buf, start, end) => parseTrailers(buf, start, end, limits),
  );
  if (trailers !== 0) return trailers;
  return body.subarray(0, length);
}

/**
 * Runs one of the parsers over the buffered body bytes, reading more while
 * it answers INCOMPLETE, and consumes what it parsed.
 * @returns 0 once parsed, the error status, or null at end of stream.
 */
async function parseBuffered(
  server: ServerState,
  connection: Connection,
  parse: (buf: Uint8Array, start: number, end: number) => number,
): Promise<number | null> {
  let consumed: number;
  while (
    (consumed = parse(connection.buffer, connection.start, connection.end)) ===
      INCOMPLETE
  ) {
    if (!await fillBody(server, connection)) return null;
  }
  if (consumed < 0) return -consumed;
  connection.start += consumed;
  return 0;
}

// ---------------------------------------------------------------------------
// route(): the book's `match` — only what differs between responses
// ---------------------------------------------------------------------------

/** What a route answers: the status and contents, and how to frame them. */
interface Reply {
  status: number;
  contents: Uint8Array;
  contentType: string;
  /** The `Allow` field of a 405 (RFC 9110 §15.5.6). */
  allow?: string;
  /** `/sleep`: answer after the sleep delay. */
  delayed?: boolean;
  /** Replies whose bytes only change with the date are built once a second. */
  cacheKey?: number;
}

const encoder = new TextEncoder();
const HTML = "text/html; charset=utf-8";
const TEXT = "text/plain; charset=utf-8";

const REASONS: Record<number, string> = {
  100: "Continue",
  200: "OK",
  400: "Bad Request",
  404: "Not Found",
  405: "Method Not Allowed",
  408: "Request Timeout",
  413: "Content Too Large",
  414: "URI Too Long",
  417: "Expectation Failed",
  431: "Request Header Fields Too Large",
  501: "Not Implemented",
  505: "HTTP Version Not Supported",
};

function statusPage(status: number): Reply {
  return {
    status,
    contents: encoder.encode(`${status} ${REASONS[status]}\n`),
    contentType: TEXT,
  };
}

const ERRORS = new Map<number, Reply>();

/** The reply for a request the server refuses. */
function errorReply(status: number): Reply {
  let reply = ERRORS.get(status);
  if (!reply) ERRORS.set(status, reply = statusPage(status));
  return reply;
}

const HELLO: Reply = {
  status: 200,
  contents: encoder.encode(HELLO_PAGE),
  contentType: HTML,
  cacheKey: 0,
};
const SLEEPY: Reply = { ...HELLO, delayed: true };
const NOT_FOUND: Reply = {
  status: 404,
  contents: encoder.encode(NOT_FOUND_PAGE),
  contentType: HTML,
  cacheKey: 1,
};
const GET_ONLY: Reply = {
  ...statusPage(405),
  allow: "GET, HEAD",
  cacheKey: 2,
};
const POST_ONLY: Reply = { ...statusPage(405), allow: "POST", cacheKey: 3 };
const SERVER_OPTIONS: Reply = {
  status: 200,
  contents: EMPTY,
  contentType: TEXT,
  allow: "GET, HEAD, POST",
  cacheKey: 4,
};

/**
 * Routes a request that has a body, after reading it — even when the route
 * ignores it, so that the next request starts where it should.
 * @returns null when the client went away mid-body.
 */
async function readAndRoute(
  server: ServerState,
  connection: Connection,
): Promise<Reply | null> {
  const request = connection.request;
  if (request.expectContinue && connection.start === connection.end) {
    // RFC 9110 §10.1.1: the client waits for this before sending.
    queue(connection, CONTINUE);
  }
  if (connection.pendingBytes > 0) await flush(server, connection);
  const result = await readBody(server, connection);
  if (result === null) return null;
  if (typeof result === "number") return errorReply(result);
  return route(request.method, request.path, result);
}

/**
 * The book's `match` on the request line.
 *
 * @param method The request method, or null when unknown.
 * @param path The target's path (no query).
 * @param body The request body.
 * @returns The reply.
 */
function route(method: string | null, path: string, body: Uint8Array): Reply {
  // RFC 9110 §9.1: a method the server does not recognize is 501.
  if (method === null) return errorReply(501);
  const reading = method === "GET" || method === "HEAD";
  switch (path) {
    case "/":
      return reading ? HELLO : GET_ONLY;
    case "/sleep":
      return reading ? SLEEPY : GET_ONLY;
    case "/echo":
      return method === "POST"
        ? {
          status: 200,
          contents: body,
          contentType: "application/octet-stream",
        }
        : POST_ONLY;
    case "*":
      return SERVER_OPTIONS;
    default:
      return NOT_FOUND;
  }
}

// ---------------------------------------------------------------------------
// Writing responses: status line, Date, framing, Connection
// ---------------------------------------------------------------------------

const CONTINUE = encoder.encode("HTTP/1.1 100 Continue\r\n\r\n");

// How a response ends the exchange, which decides its Connection fields.
const CLOSE = 0;
const KEEP_ALIVE = 1;
const KEEP_ALIVE_1_0 = 2; // HTTP/1.0 keeps alive only when told so (RFC 9112 §9.3)

/**
 * The bytes of a response. Fixed replies come from a cache rebuilt when the
 * `Date` second changes, so a hello page costs no encoding at all.
 */
function responseBytes(
  server: ServerState,
  reply: Reply,
  headOnly: boolean,
  keepAlive: boolean,
  minor: number,
): Uint8Array {
  const persistence = !keepAlive
    ? CLOSE
    : minor === 0
    ? KEEP_ALIVE_1_0
    : KEEP_ALIVE;
  if (reply.cacheKey === undefined) {
    return buildResponse(server, reply, headOnly, persistence);
  }
  const key = reply.cacheKey * 6 + (headOnly ? 3 : 0) + persistence;
  return server.cache.get(key, server.now) ??
    server.cache.set(key, buildResponse(server, reply, headOnly, persistence));
}

function buildResponse(
  server: ServerState,
  reply: Reply,
  headOnly: boolean,
  persistence: number,
): Uint8Array {
  const { status, contents } = reply;
  let head = `HTTP/1.1 ${status} ${REASONS[status]}\r\n` +
    `Date: ${clock(server.now).date}\r\n`;
  if (contents.length > 0) head += `Content-Type: ${reply.contentType}\r\n`;
  head += `Content-Length: ${contents.length}\r\n`;
  if (reply.allow) head += `Allow: ${reply.allow}\r\n`;
  const idle = Math.floor(server.limits.idleTimeout);
  if (persistence === CLOSE) head += "Connection: close\r\n";
  if (persistence === KEEP_ALIVE_1_0) head += "Connection: keep-alive\r\n";
  if (persistence !== CLOSE) head += `Keep-Alive: timeout=${idle}\r\n`;
  head += "\r\n";
  // The head is ASCII, so its length in bytes is its string length.
  const bytes = new Uint8Array(head.length + (headOnly ? 0 : contents.length));
  encoder.encodeInto(head, bytes);
  if (!headOnly) bytes.set(contents, head.length);
  return bytes;
}

/** Response bytes that stay valid until the second changes. */
class ResponseCache {
  #second = -1;
  #entries: (Uint8Array | null)[] = [];

  get(key: number, now: number): Uint8Array | null {
    const second = Math.floor(now / 1000);
    if (second !== this.#second) {
      this.#second = second;
      this.#entries = new Array(32).fill(null);
    }
    return this.#entries[key];
  }

  set(key: number, bytes: Uint8Array): Uint8Array {
    return this.#entries[key] = bytes;
  }
}

const MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(" ");
let clockSecond = -1;
let clockStrings = { date: "", log: "" };

/** The `Date` field value (RFC 9110 §5.6.7) and the log's time, per second. */
function clock(now: number): { date: string; log: string } {
  const second = Math.floor(now / 1000);
  if (second !== clockSecond) {
    clockSecond = second;
    const time = new Date(second * 1000);
    const two = (n: number) => String(n).padStart(2, "0");
    clockStrings = {
      date: time.toUTCString(),
      log: `${two(time.getUTCDate())}/${MONTHS[time.getUTCMonth()]}/` +
        `${time.getUTCFullYear()}:${two(time.getUTCHours())}:` +
        `${two(time.getUTCMinutes())}:${two(time.getUTCSeconds())} +0000`,
    };
  }
  return clockStrings;
}

// ---------------------------------------------------------------------------
// The access log: Common Log Format, buffered
// ---------------------------------------------------------------------------

/**
 * Collects log lines and writes them in batches, one write at a time. If
 * stdout blocks, lines wait in memory up to a bound, then are counted and
 * dropped: a stuck log must not take the server down with it.
 */
class AccessLog {
  #lines: string[] = [];
  #writing: Promise<void> | null = null;
  #dropped = 0;
  /** The last line and what it was made of: a repeat costs no allocation. */
  #last = { text: "", remote: "", time: "", line: "", status: 0, sent: 0 };

  constructor(
    readonly sink: true | ((lines: string) => void),
    readonly server: ServerState,
  ) {}

  /** Logs one response: `host - - [time] "request line" status bytes`. */
  write(
    connection: Connection,
    line: string,
    status: number,
    sent: number,
  ): void {
    if (this.#lines.length >= MAX_LOG_BACKLOG) {
      this.#dropped++;
      return;
    }
    const remote = connection.remote();
    const time = clock(this.server.now).log;
    const last = this.#last;
    if (
      remote !== last.remote || time !== last.time || line !== last.line ||
      status !== last.status || sent !== last.sent
    ) {
      this.#last = {
        text: `${remote} - - [${time}] "${line}" ${status} ${sent || "-"}\n`,
        remote,
        time,
        line,
        status,
        sent,
      };
    }
    this.#lines.push(this.#last.text);
    if (this.#lines.length >= LOG_BATCH) this.flush();
  }

  /** Starts writing what is buffered, unless a write is under way. */
  flush(): void {
    if (this.#writing || this.#lines.length === 0) return;
    let text = this.#lines.join("");
    this.#lines = [];
    if (this.#dropped > 0) {
      text += `(access log: ${this.#dropped} lines dropped, stdout blocked)\n`;
      this.#dropped = 0;
    }
    if (this.sink !== true) return this.sink(text);
    this.#writing = writeStdout(text).then(() => {
      this.#writing = null;
      if (this.#lines.length >= LOG_BATCH) this.flush();
    });
  }

  /** Writes everything still buffered. */
  async close(): Promise<void> {
    while (this.#writing || this.#lines.length > 0) {
      this.flush();
      await this.#writing;
    }
  }
}

let stdoutWritten: Promise<void> = Promise.resolve();

/** Writes text to stdout after everything written before it. */
function writeStdout(text: string): Promise<void> {
  stdoutWritten = stdoutWritten.then(async () => {
    const bytes = encoder.encode(text);
    let written = 0;
    while (written < bytes.length) {
      written += await Deno.stdout.write(bytes.subarray(written));
    }
  }).catch(() => {/* stdout closed: the log is lost, the server is not */});
  return stdoutWritten;
}

// ---------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------

/** The command line's settings: `serve()`'s options plus the CLI's own. */
interface Settings extends ServeOptions {
  quiet?: boolean;
  workers?: number;
  help?: boolean;
  version?: boolean;
}

type Kind = "seconds" | "count" | "port" | "text" | "switch" | "workers";

const FLAGS: Record<string, [keyof Settings, Kind]> = {
  "--hostname": ["hostname", "text"],
  "--port": ["port", "port"],
  "--quiet": ["quiet", "switch"],
  "--workers": ["workers", "workers"],
  "--header-timeout": ["headerTimeout", "seconds"],
  "--idle-timeout": ["idleTimeout", "seconds"],
  "--body-timeout": ["bodyTimeout", "seconds"],
  "--shutdown-timeout": ["shutdownTimeout", "seconds"],
  "--sleep-delay": ["sleepDelay", "seconds"],
  "--max-connections": ["maxConnections", "count"],
  "--max-body": ["maxBody", "count"],
  "--help": ["help", "switch"],
  "--version": ["version", "switch"],
};

/** Parses `--flag value` and `--flag=value`; throws a one-line message. */
function parseFlags(args: string[]): Settings {
  const settings: Record<string, unknown> = {};
  for (let i = 0; i < args.length; i++) {
    const [flag, inline] = args[i].split(/=(.*)/s, 2);
    const known = FLAGS[flag];
    if (!known) throw new Error(`unknown flag: ${args[i]}`);
    const [key, kind] = known;
    if (kind === "switch") {
      if (inline !== undefined) throw new Error(`${flag} takes no value`);
      settings[key] = true;
      continue;
    }
    const text = inline ?? args[++i];
    if (text === undefined) throw new Error(`${flag} needs a value`);
    settings[key] = flagValue(flag, kind, text);
  }
  return settings as Settings;
}

function flagValue(flag: string, kind: Kind, text: string): string | number {
  const number = Number(text);
  switch (kind) {
    case "text":
      return text;
    case "port":
      if (/^\d+$/.test(text) && number <= 65535) return number;
      throw new Error(`${flag} must be a port number (0-65535), not "${text}"`);
    case "count":
      if (/^\d+$/.test(text) && number >= 1) return number;
      throw new Error(`${flag} must be a whole number above 0, not "${text}"`);
    case "seconds":
      if (/^\d+(\.\d+)?$/.test(text) && number > 0) return number;
      throw new Error(`${flag} must be a number of seconds, not "${text}"`);
    case "workers":
      if (text === "auto") return navigator.hardwareConcurrency;
      if (/^\d+$/.test(text) && number >= 1) return number;
      throw new Error(`${flag} must be a number of workers or "auto"`);
    default:
      throw new Error(`${flag}: unknown kind`);
  }
}

function printUsage(print: (text: string) => void = console.log): void {
  print(`Usage: deno run --allow-net main.ts [flags]

Serves the Rust book's hello page over HTTP/1.1: GET / (hello), GET /sleep
(hello, after a delay), POST /echo (the body back), anything else 404.

Flags (seconds may have fractions):
  --hostname HOST          address to listen on (default 127.0.0.1; env HOSTNAME)
  --port N                 port, 0 for any free one (default 7878; env PORT)
  --quiet                  no access log (default: Common Log Format on stdout)
  --workers N|auto         isolates sharing the port (default 1); more than 1
                           needs --allow-read and --unstable-net
  --header-timeout S       408 for a head not complete in S (default 10)
  --idle-timeout S         close idle keep-alive connections (default 5)
  --body-timeout S         408 for a body, cut a write, stalled S (default 30)
  --shutdown-timeout S     close what is still busy S after a signal (default 10)
  --max-connections N      stop accepting at N open connections (default 10000)
  --max-body BYTES         413 for larger bodies (default 1048576)
  --sleep-delay S          how long GET /sleep sleeps (default 5)
  --version                print the version
  --help                   print this help

Environment variables are read only when --allow-env grants them.`);
}

/** `PORT` and `HOSTNAME`, when env permission is already granted (never prompts). */
function fromEnvironment(): Settings {
  const settings: Settings = {};
  for (
    const [variable, flag] of [["PORT", "--port"], ["HOSTNAME", "--hostname"]]
  ) {
    const access = Deno.permissions.querySync({ name: "env", variable });
    const value = access.state === "granted"
      ? Deno.env.get(variable)
      : undefined;
    if (value) Object.assign(settings, parseFlags([flag, value]));
  }
  return settings;
}

function listeningLine(addr: Deno.NetAddr): string {
  const host = addr.hostname.includes(":")
    ? `[${addr.hostname}]`
    : addr.hostname;
  return `Listening on http://${host}:${addr.port}/`;
}

/** SIGINT and SIGTERM start a graceful shutdown; a second one exits at once. */
function onSignal(shutdown: () => void): void {
  let received = false;
  const handler = () => {
    if (received) Deno.exit(130);
    received = true;
    shutdown();
  };
  Deno.addSignalListener("SIGINT", handler);
  if (Deno.build.os !== "windows") Deno.addSignalListener("SIGTERM", handler);
}

async function main(args: string[] = Deno.args): Promise<void> {
  let settings: Settings;
  try {
    settings = { ...fromEnvironment(), ...parseFlags(args) };
  } catch (error) {
    console.error(`error: ${(error as Error).message}`);
    printUsage(console.error);
    Deno.exit(2);
  }
  if (settings.help) return printUsage();
  if (settings.version) return console.log(`hello-server ${VERSION}`);
  const options: ServeOptions = { ...settings, accessLog: !settings.quiet };
  const forced = (settings.workers ?? 1) > 1
    ? await serveWithWorkers(options, settings.workers!)
    : await serveHere(options);
  await stdoutWritten;
  if (forced > 0) {
    console.log(
      `Closed ${forced} busy connection(s) at the ` +
        `${
          options.shutdownTimeout ?? DEFAULTS.shutdownTimeout
        } s shutdown timeout.`,
    );
  }
  console.log("Shutting down.");
  Deno.exit(0);
}

async function serveHere(options: ServeOptions): Promise<number> {
  let server: Server;
  try {
    server = serve({
      ...options,
      onListen: (addr) => console.log(listeningLine(addr)),
    });
  } catch (error) {
    cannotListen(options, options.port, (error as Error).message);
  }
  onSignal(() => server.shutdown());
  await server.finished;
  return server.forced;
}

/**
 * A port in use or an address that is not this machine's is the user's to
 * fix: one line that names it, rather than a stack trace, and exit 1.
 */
function cannotListen(
  options: ServeOptions,
  port: number | undefined,
  message: string,
): never {
  const host = options.hostname ?? DEFAULTS.hostname;
  console.error(
    `error: cannot listen on ${host}:${port ?? DEFAULTS.port}: ${message}`,
  );
  Deno.exit(1);
}

// ---------------------------------------------------------------------------
// --workers: the book's ThreadPool as isolates sharing one port
// ---------------------------------------------------------------------------

type WorkerMessage =
  | { port: number }
  | { cannotListen: string }
  | { lines: string }
  | { forced: number };

/**
 * Runs `count` copies of the server in Web Workers, each listening on the
 * same port with `reusePort` so that the kernel spreads connections.
 * @returns How many busy connections the shutdown timeout closed.
 */
async function serveWithWorkers(
  options: ServeOptions,
  count: number,
): Promise<number> {
  const fix = "--workers needs --allow-read and --unstable-net: " +
    "deno run --allow-net --allow-read --unstable-net main.ts --workers " +
    count;
  const url = new URL(import.meta.url);
  const read = url.protocol === "file:"
    ? Deno.permissions.querySync({ name: "read", path: url }).state
    : "granted";
  try {
    if (read !== "granted") throw new Error();
    Deno.listen({ hostname: options.hostname, port: 0, reusePort: true })
      .close();
  } catch {
    console.error(`error: ${fix}`);
    Deno.exit(2);
  }
  let forced = 0;
  let finished = 0;
  let allFinished: () => void;
  const done = new Promise<void>((resolve) => allFinished = resolve);
  const start = (port: number | undefined) =>
    new Promise<{ worker: Worker; port: number }>((listening, failed) => {
      const worker = new Worker(import.meta.url, { type: "module" });
      worker.onerror = (event) => {
        event.preventDefault();
        failed(new Error(event.message));
      };
      worker.onmessage = ({ data }: MessageEvent<WorkerMessage>) => {
        if ("port" in data) listening({ worker, port: data.port });
        else if ("cannotListen" in data) {
          cannotListen(options, port ?? options.port, data.cannotListen);
        } else if ("lines" in data) writeStdout(data.lines);
        else {
          forced += data.forced;
          if (++finished === count) allFinished();
        }
      };
      const { signal: _, onListen: __, ...rest } = options;
      worker.postMessage({ ...rest, port: port ?? rest.port, reusePort: true });
    });
  let workers: Worker[];
  try {
    // The first worker picks the port (it may be 0); the rest share it.
    const first = await start(undefined);
    const rest = await Promise.all(
      Array.from({ length: count - 1 }, () => start(first.port)),
    );
    workers = [first.worker, ...rest.map((started) => started.worker)];
    console.log(
      listeningLine({
        transport: "tcp",
        hostname: options.hostname ?? DEFAULTS.hostname,
        port: first.port,
      }),
    );
  } catch (error) {
    console.error(`error: ${(error as Error).message}`);
    Deno.exit(1);
  }
  onSignal(() => workers.forEach((worker) => worker.postMessage("shutdown")));
  await done;
  return forced;
}

/** A worker's side: serve with the options posted, shut down when told. */
function workerMain(): void {
  const scope = globalThis as unknown as {
    postMessage(message: WorkerMessage): void;
    onmessage: ((event: MessageEvent) => void) | null;
  };
  let server: Server | undefined;
  scope.onmessage = ({ data }) => {
    if (data === "shutdown") {
      server?.shutdown();
      return;
    }
    const options = data as ServeOptions;
    try {
      server = serve({
        ...options,
        accessLog: options.accessLog
          ? (lines) => scope.postMessage({ lines })
          : false,
        onListen: (addr) => scope.postMessage({ port: addr.port }),
      });
    } catch (error) {
      scope.postMessage({ cannotListen: (error as Error).message });
      return;
    }
    server.finished.then(() => scope.postMessage({ forced: server!.forced }));
  };
}

function isWorker(): boolean {
  return typeof (globalThis as { WorkerGlobalScope?: unknown })
    .WorkerGlobalScope === "function";
}

if (isWorker()) workerMain();
else if (import.meta.main) main();
