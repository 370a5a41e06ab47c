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
 * shutdown finishes every response it owes. The same core carries a user's
 * application (`serve(handler)`, `Deno.serve`'s API, or `--app`), a folder of
 * files (`--root`), HTTPS (`--cert`, `--key`) and WebSockets
 * (`upgradeWebSocket()`, or `Deno.upgradeWebSocket` as it is), and compresses
 * what it sends (brotli or gzip, permessage-deflate) where that helps.
 *
 * Run it (the only permission it needs is the network):
 *
 * ```sh
 * deno run --allow-net main.ts --port 7878
 * deno run --allow-net --allow-read main.ts --app ./app.ts
 * deno run --allow-net --allow-read=./public main.ts --root ./public
 * ```
 *
 * Flags (`--help` lists them with their defaults): `--hostname H`,
 * `--port N` (0 for any free port), `--quiet` (no access log), `--app M`,
 * `--root DIR`, `--list`, `--dotfiles`, `--cert F`, `--key F`,
 * `--redirect-http PORT`, `--header-timeout S`, `--idle-timeout S`,
 * `--body-timeout S`, `--shutdown-timeout S`, `--max-connections N`,
 * `--max-body BYTES`, `--ws-idle-timeout S`, `--ws-close-timeout S`,
 * `--ws-max-message BYTES`, `--ws-max-buffered BYTES`, `--no-compress`,
 * `--sleep-delay S`, `--workers N|auto` (needs `--allow-read` and
 * `--unstable-net`), `--version`. SIGINT or SIGTERM shuts down gracefully.
 *
 * Or use it from code, as `Deno.serve`:
 *
 * ```ts
 * import { serve } from "./main.ts";
 * const server = serve({ port: 0, accessLog: false }, (request) => {
 *   return new Response(`Hello from ${new URL(request.url).pathname}\n`);
 * });
 * console.log(server.addr.port);
 * await server.shutdown();
 * ```
 *
 * The sections, in order: the pages; options and limits; `serve()`;
 * `handleConnection()`; `parseRequest()`; request bodies; `route()`; the
 * handler; writing responses (and compression); files; WebSockets (the handshake,
 * permessage-deflate, frames, the sender, the session, the socket); the
 * access log; the command line; the workers.
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

/**
 * A user's application, as `Deno.serve` takes it: a request in, a response
 * out. Its errors become {@linkcode ServeOptions.onError}'s response.
 */
export type ServeHandler = (
  request: Request,
  info: ServeHandlerInfo,
) => Response | Promise<Response>;

/** What a {@linkcode ServeHandler} learns besides the request. */
export interface ServeHandlerInfo {
  /** The client's address. */
  readonly remoteAddr: Deno.NetAddr;
  /**
   * Resolves when the response has been written in full; rejects when it
   * could not be (the client went away, a timeout, a failing body stream).
   */
  readonly completed: Promise<void>;
}

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
  /**
   * A WebSocket silent this long is pinged, and closed if it stays silent
   * as long again; {@linkcode UpgradeWebSocketOptions.idleTimeout} sets one
   * socket's. @default {30}
   */
  wsIdleTimeout?: number;
  /** A WebSocket closing handshake not finished this long after the close frame is cut. @default {5} */
  wsCloseTimeout?: number;
  /** The largest WebSocket message, in bytes once decompressed; larger ones close with 1009. @default {1048576} */
  wsMaxMessage?: number;
  /** The bytes a WebSocket may queue for a client that reads nothing, before it is cut off. @default {16777216} */
  wsMaxBuffered?: number;
  /**
   * Compress: a handler's responses of compressible types, 1 KiB or more,
   * in brotli or gzip as the client's Accept-Encoding prefers; WebSocket
   * messages with permessage-deflate when the client offers it.
   * @default {true}
   */
  compression?: boolean;
  /** Let several listeners share the port (Linux; needs `--unstable-net`). @default {false} */
  reusePort?: boolean;
  /** The certificate chain, in PEM: with {@linkcode ServeOptions.key}, the server speaks HTTPS. */
  cert?: string;
  /** The certificate's private key, in PEM. */
  key?: string;
  /**
   * The response for a handler that throws, rejects or returns no
   * `Response`. @default {a plain 500 that says nothing of the error}
   */
  onError?: (error: unknown) => Response | Promise<Response>;
}

/** {@linkcode ServeOptions} with the handler among them. */
export interface ServeInit extends ServeOptions {
  /** The application; without one, the book's routes are served. */
  handler?: ServeHandler;
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
  wsIdleTimeout: 30,
  wsCloseTimeout: 5,
  wsMaxMessage: 1024 * 1024,
  wsMaxBuffered: 16 * 1024 * 1024,
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
const EMPTY = new Uint8Array(0);
/** The most a connection buffers while reading a body. */
const BODY_BUFFER = 64 * 1024;
/** The largest batch buffer a connection keeps for its next batch. */
const MAX_KEPT_BATCH = 16 * 1024;
/** Responses queued past this many bytes are written before more requests are parsed. */
const MAX_BATCH = 64 * 1024;
/** The longest chunk-size line, extensions included (RFC 9112 §7.1.1 leaves it open). */
const MAX_CHUNK_LINE = 4096;
/**
 * A request body the handler left unread is read and dropped up to this many
 * bytes, so that the next request on the connection starts where it should;
 * past it, closing is cheaper (Go's net/http draws the line at 256 KiB too).
 */
const MAX_DISCARD = 256 * 1024;
/** After an error reply, how long the server drains what the client still sends. */
const LINGER_TIME = 2;
/** On shutdown, how long a new connection may still send its first request. */
const SHUTDOWN_GRACE = 1;
/**
 * A second SIGINT or SIGTERM sooner than this after the first is the same
 * one, delivered twice (to the process and its group: microseconds apart);
 * a person pressing Ctrl-C again takes longer.
 */
const SAME_SIGNAL = 0.05;
/** setTimeout()'s longest delay (ms): a longer one wraps, and fires at once. */
const MAX_DELAY = 2 ** 31 - 1;
/**
 * An access log batch, and the most one write to stdout carries: what a Linux
 * pipe holds. Each write costs Deno a blocking thread's turn (about 11 µs of
 * CPU here, however small the write), so few and large ones. But a write even
 * one line larger than the pipe waits for the reader partway through, and that
 * second turn doubled the log's thread switches when pipelined.
 */
const LOG_BATCH = 64 * 1024;
/** The largest access log buffer kept for the next batch. */
const MAX_KEPT_LOG = 1024 * 1024;
/** Access log bytes held while stdout is blocked, before lines are dropped. */
const MAX_LOG_BACKLOG = 8 * 1024 * 1024;

// ---------------------------------------------------------------------------
// serve(): the book's `main` — bind, accept, hand each stream to a handler
// ---------------------------------------------------------------------------

/** A running server, shaped like the result of `Deno.serve`. */
export interface Server extends AsyncDisposable {
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
   * still busy after the shutdown timeout, aborting its requests' signals.
   * @returns {@linkcode Server.finished}
   */
  shutdown(): Promise<void>;
  /** Keeps the process alive while the server listens (the default). */
  ref(): void;
  /** Lets the process exit even though the server still listens. */
  unref(): void;
}

/**
 * Starts the web server: `Deno.serve`'s three call forms, on our own
 * HTTP/1.1 core. Without a handler it serves the book's routes.
 *
 * @param init Where to listen, the limits, the timeouts and the handler.
 * @returns The running server.
 * @throws {TypeError} An option's value is of the wrong kind or out of
 * range (a timeout of `NaN` or 0, a limit below 1), before it listens.
 * @example Serve the book's pages on a free port, then stop
 * ```ts
 * import { serve } from "./main.ts";
 * const server = serve({ port: 0, accessLog: false });
 * const response = await fetch(`http://127.0.0.1:${server.addr.port}/`);
 * console.log(await response.text());
 * await server.shutdown();
 * ```
 * @example Serve an application, as with `Deno.serve`
 * ```ts
 * import { serve } from "./main.ts";
 * const server = serve({ port: 0, accessLog: false }, (request) => {
 *   return new Response(`You asked for ${new URL(request.url).pathname}`);
 * });
 * await server.shutdown();
 * ```
 */
export function serve(init?: ServeInit): Server;
/**
 * Starts the web server with a handler and the default options.
 * @param handler The application.
 * @returns The running server.
 */
export function serve(handler: ServeHandler): Server;
/**
 * Starts the web server with options and a handler.
 * @param options Where to listen, the limits and the timeouts.
 * @param handler The application.
 * @returns The running server.
 */
export function serve(options: ServeOptions, handler: ServeHandler): Server;
export function serve(
  first: ServeInit | ServeHandler = {},
  second?: ServeHandler,
): Server {
  const options: ServeInit = typeof first === "function"
    ? { handler: first }
    : second
    ? { ...first, handler: second }
    : first;
  const limits = { ...DEFAULTS };
  for (const key of Object.keys(DEFAULTS) as (keyof Limits)[]) {
    const value = options[key];
    if (value === undefined) continue;
    const problem = badOption(key, value);
    if (problem) {
      throw new TypeError(
        `serve(): ${key} ${problem}, not ${Deno.inspect(value)}`,
      );
    }
    (limits as Record<string, unknown>)[key] = value;
  }
  const listener = listen(limits, options);
  const server = new ServerState(listener, limits, options);
  if (options.handler) adoptDenoUpgrade();
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
    ref: () => server.ref(true),
    unref: () => server.ref(false),
    [Symbol.asyncDispose]: () => server.shutdown(),
  };
}

/**
 * What is wrong with an option's value, or "" when nothing is: a timeout of
 * `NaN` or a limit of -1 would silently turn a defence off. The same rules
 * as the command line's flags.
 */
function badOption(key: keyof Limits, value: unknown): string {
  switch (key) {
    case "hostname":
      return typeof value === "string" ? "" : "must be a string";
    case "port":
      return Number.isInteger(value) && (value as number) >= 0 &&
          (value as number) <= 65535
        ? ""
        : "must be a port number (0-65535)";
    case "sleepDelay":
    case "headerTimeout":
    case "idleTimeout":
    case "bodyTimeout":
    case "shutdownTimeout":
    case "wsIdleTimeout":
    case "wsCloseTimeout":
      return Number.isFinite(value) && (value as number) > 0
        ? ""
        : "must be a number of seconds above 0";
    default:
      return Number.isSafeInteger(value) && (value as number) >= 1
        ? ""
        : "must be a whole number above 0";
  }
}

/** A listener, and the connections it accepts: over TCP, or TLS. */
type Listener = Deno.TcpListener | Deno.TlsListener;
type Stream = Deno.TcpConn | Deno.TlsConn;

/**
 * The book's `TcpListener::bind`, or its TLS twin. A TLS listener offers
 * only `http/1.1` by ALPN (RFC 7301), so no client tries anything else.
 */
function listen(limits: Limits, options: ServeOptions): Listener {
  const address = {
    hostname: limits.hostname,
    port: limits.port,
    ...(options.reusePort ? { reusePort: true } : {}),
  };
  if (options.cert === undefined && options.key === undefined) {
    return Deno.listen(address);
  }
  if (!options.cert || !options.key) {
    throw new TypeError("cert and key go together, both as PEM text");
  }
  return Deno.listenTls({
    ...address,
    cert: options.cert,
    key: options.key,
    alpnProtocols: ["http/1.1"],
  });
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
  /** Each way a head can end: see endsOfHead(). */
  readonly endOfHead: string[];
  readonly log: AccessLog | null;
  /** What a handler's request URLs begin with. */
  readonly scheme: string;
  /** The application; null for the book's routes. */
  readonly handler: ServeHandler | null;
  /** Whether to compress responses and WebSocket messages. */
  readonly compression: boolean;
  readonly onError: ((error: unknown) => Response | Promise<Response>) | null;
  #slotFree: (() => void) | null = null;
  #drained: (() => void) | null = null;
  #ticker: ReturnType<typeof setInterval>;
  #forceTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    readonly listener: Listener,
    readonly limits: Limits,
    options: ServeInit,
  ) {
    const accessLog = options.accessLog ?? true;
    this.log = accessLog === false ? null : new AccessLog(accessLog);
    this.endOfHead = endsOfHead(limits.idleTimeout);
    this.handler = options.handler ?? null;
    this.compression = options.compression ?? true;
    this.scheme = options.cert ? "https" : "http";
    this.onError = options.onError ?? null;
    // One timer for every deadline of every connection, rather than a timer
    // per read: a quarter of the shortest timeout, at most 250 ms.
    const shortest = Math.min(
      limits.headerTimeout,
      limits.idleTimeout,
      limits.bodyTimeout,
      limits.wsIdleTimeout,
      limits.wsCloseTimeout,
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
    // A slow reader of the log is waited for, a gone one is not.
    await this.log?.close(this.limits.shutdownTimeout);
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
        } else if (connection.state === SOCKET) {
          // §7.4.1: 1001, going away; the client's answer is awaited until
          // the shutdown timeout.
          connection.session!.close(1001);
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
      }, Math.min(this.limits.shutdownTimeout * 1000, MAX_DELAY));
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

  /** Whether the listener and the ticker keep the process alive. */
  ref(keep: boolean): void {
    if (keep) {
      this.listener.ref();
      Deno.refTimer(this.#ticker);
    } else {
      this.listener.unref();
      Deno.unrefTimer(this.#ticker);
    }
  }

  /** Advances the clock and enforces every connection's deadline. */
  tick(): void {
    this.now = Date.now();
    for (const connection of this.connections) {
      if (connection.deadline <= this.now) expire(this, connection);
      connection.session?.sender.sweep();
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
const BUSY = 3; // handling a request (`/sleep`, a handler): no deadline
const WRITE = 4; // writing responses
const LINGER = 5; // closing after an error: draining what the client sends
const SOCKET = 6; // upgraded to a WebSocket: its deadline pings or closes

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
  /** The room the last read was given, and whether the read filled it. */
  room: Uint8Array = EMPTY;
  filled = false;
  /** Bytes read since the connection was last idle: its batches' size. */
  burst = 0;
  /**
   * A read started while a handler runs, so that a client that hangs up is
   * noticed; the loop takes its result as its own next read.
   */
  watch: Promise<number | null> | null = null;
  /** Where it stands in the server's list of connections. */
  index = 0;
  /** Kept alive past its first response. */
  kept = false;
  /**
   * What follows the last reply cannot be trusted — it refused the request,
   * or left its body unread — so the close lingers.
   */
  lingers = false;
  /** A handler's response is on its way: a timeout can only close. */
  responding = false;
  /** The WebSocket the connection became, once its 101 is written. */
  session: WebSocketSession | null = null;
  /**
   * The last request's target and host, the target and host its URL was
   * made of, that URL, its Accept-Encoding, then its fields' names and
   * values: see recall().
   */
  readonly texts: string[] = [];
  /** Responses parsed from one read, written together, and where. */
  pending: Uint8Array[] = [];
  /** How many of `pending` are queued: the array is reused, not emptied. */
  queued = 0;
  batch: Uint8Array | null = null;
  pendingBytes = 0;
  readonly request = new RequestHead();
  closed = false;
  #remote: Deno.NetAddr | null = null;
  #abort: AbortController | null = null;
  #abandon: ((value: undefined) => void) | null = null;
  #wake: (() => void) | null = null;
  #sleeper: ReturnType<typeof setTimeout> | undefined;

  constructor(readonly stream: Stream, now: number) {
    this.headStarted = now;
    this.deadline = now;
  }

  /** The client's address. */
  get remoteAddr(): Deno.NetAddr {
    return this.#remote ??= this.stream.remoteAddr as Deno.NetAddr;
  }

  /** Nothing of the current request has arrived yet. */
  isSilent(): boolean {
    return this.start === this.end;
  }

  /**
   * The signal of the request about to be handed to a handler: it aborts if
   * the connection ends while that request is in hand.
   */
  newSignal(): AbortSignal {
    return (this.#abort = new AbortController()).signal;
  }

  /** The request in hand is answered: the connection's end is not its own. */
  answered(): void {
    this.#abort = null;
  }

  /** The client left, or a timeout or the shutdown ended the connection. */
  hangUp(): void {
    if (this.#abort?.signal.aborted === false) this.#abort.abort();
  }

  /** Waits `ms`, unless the connection is closed first. */
  sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      this.#wake = resolve;
      this.#sleeper = setTimeout(resolve, Math.min(ms, MAX_DELAY));
    });
  }

  /**
   * What `promised` settles with, or undefined as soon as the connection
   * closes, whichever comes first. (Racing a promise that lives as long as
   * the connection would leave a reaction on it for every request.)
   */
  unlessClosed(promised: unknown): Promise<unknown> {
    return new Promise((resolve, reject) => {
      this.#abandon = resolve;
      Promise.resolve(promised).then((value) => {
        this.#abandon = null;
        // A response that comes after the close goes nowhere: its body,
        // perhaps an open file, is let go.
        if (this.closed && value instanceof Response) {
          value.body?.cancel().catch(() => {});
        }
        resolve(value);
      }, (error) => {
        this.#abandon = null;
        reject(error);
      });
      if (this.closed) resolve(undefined);
    });
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.#sleeper);
    this.#wake?.();
    this.#abandon?.(undefined);
    this.hangUp();
    try {
      this.stream.close();
    } catch { /* already closed by the peer's reset */ }
  }
}

/**
 * Serves one connection: read → parse → application → write → keep alive?,
 * repeated. Pipelined requests already buffered are answered before reading
 * again, and their responses leave in one write. Never throws: a client that
 * vanishes or resets only ends its own connection.
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
        // A read that filled its room and ended mid-request split a batch:
        // the rest is on its way, and its answers leave with these in one
        // write. (Over TLS, where Nagle's algorithm stays on, a second small
        // write would wait for the client's delayed ACK.)
        const split = connection.filled && connection.start < connection.end;
        if (connection.pendingBytes > 0 && !split) {
          await flush(server, connection);
        }
        if (connection.start === connection.end && !connection.headStarted) {
          if (server.closing) return;
          connection.state = IDLE;
          connection.deadline = server.now + limits.idleTimeout * 1000;
          if (!connection.watch) shrink(connection);
          connection.burst = 0;
        } else {
          connection.headStarted ||= server.now;
          connection.state = HEAD;
          connection.deadline = connection.headStarted +
            limits.headerTimeout * 1000;
        }
        // fill(), inline: the hot path awaits the read itself, no wrapper.
        const count = await (connection.watch ??
          connection.stream.read(makeRoom(connection, limits.maxHead)));
        connection.watch = null;
        if (!received(connection, count)) return;
        continue;
      }
      // Common Log Format logs when the request began, not when it ended.
      const began = connection.headStarted || server.now;
      connection.headStarted = 0;
      const line = server.log ? requestLine(connection.buffer, request) : "";
      if (consumed > 0) connection.start += consumed;
      let keepAlive: boolean | null;
      if (consumed > 0 && server.handler && request.path !== "*") {
        keepAlive = await respond(server, connection, line, began);
        connection.answered();
        if (connection.session) {
          return await serveWebSocket(server, connection, connection.session);
        }
      } else {
        // Awaited only when there is something to wait for: the hot path of
        // the book's routes takes no trip through the microtask queue.
        const reply = consumed < 0
          ? errorReply(-consumed)
          : request.chunked || request.contentLength > 0
          ? await readAndRoute(server, connection)
          : ownReply(server, request, EMPTY);
        if (reply?.delayed) await delay(server, connection);
        keepAlive = reply && !connection.closed &&
          answer(server, connection, reply, line, began);
      }
      if (keepAlive === null || connection.closed) return;
      if (!keepAlive) {
        await flush(server, connection);
        // Unread bytes behind a refusal must not turn our close into a reset
        // that destroys the reply in flight.
        if (connection.lingers || connection.start < connection.end) {
          await linger(server, connection);
        }
        return;
      }
      if (!connection.kept) {
        // Nagle's algorithm only delays connections that stay open (a
        // response written after another waits for its ACK); one that closes
        // after its reply flushes at once, and saves the system call.
        connection.kept = true;
        if ("setNoDelay" in connection.stream) {
          connection.stream.setNoDelay(true);
        }
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
  // A whole buffer is its own room: no view to make on the hot path.
  return connection.room = connection.end === 0
    ? connection.buffer
    : connection.buffer.subarray(connection.end);
}

/**
 * Reads more bytes into the connection's buffer.
 * @returns false at end of stream, or when a timeout has ended the connection.
 */
async function fill(connection: Connection, max: number): Promise<boolean> {
  return received(
    connection,
    await connection.stream.read(makeRoom(connection, max)),
  );
}

/**
 * Takes in what a read into the connection's room returned.
 * @returns false at end of stream, or when a timeout has ended the connection.
 */
function received(connection: Connection, count: number | null): boolean {
  if (count === null || connection.state === LINGER) return false;
  connection.end += count;
  connection.burst += count;
  connection.filled = count === connection.room.length;
  return true;
}

/**
 * Starts the connection's next read while a handler's answer is pending or
 * its stream is being sent, so that a client that hangs up aborts
 * `request.signal` and cancels the stream (Go's background read does the
 * same). Only when nothing is buffered: pipelined requests wait their turn.
 */
function watch(server: ServerState, connection: Connection): void {
  if (connection.watch || connection.start !== connection.end) return;
  const room = makeRoom(connection, server.limits.maxHead);
  connection.watch = connection.stream.read(room).then((count) => {
    if (count === null) connection.hangUp();
    return count;
  }, () => {
    connection.hangUp();
    return null;
  });
}

/**
 * An idle connection keeps only a small buffer, unless what it receives
 * between idle times is large: a pipelining client's batch, split over two
 * reads, would otherwise cost a new buffer each time.
 */
function shrink(connection: Connection): void {
  if (
    connection.buffer.length > IDLE_BUFFER &&
    connection.burst * 2 <= connection.buffer.length
  ) {
    connection.buffer = new Uint8Array(IDLE_BUFFER);
  }
}

function queue(connection: Connection, bytes: Uint8Array): void {
  connection.pending[connection.queued++] = bytes;
  connection.pendingBytes += bytes.length;
}

/** Writes every queued response in one write; stalls are cut by the ticker. */
async function flush(server: ServerState, connection: Connection) {
  if (connection.queued === 0) return;
  const bytes = gather(connection);
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
 * Takes the queued responses off the queue as one run of bytes. A batch is
 * gathered in the connection's own buffer, kept for its next batch: a
 * pipelining client, or a stream's chunks, would otherwise cost a new one
 * every time.
 */
function gather(connection: Connection): Uint8Array {
  const { pending, queued, pendingBytes } = connection;
  let bytes = pending[0];
  if (queued > 1) {
    // A streamed response reuses it for every chunk, however large; it is
    // let go when the stream ends.
    if (pendingBytes > MAX_KEPT_BATCH && !connection.responding) {
      bytes = new Uint8Array(pendingBytes);
    } else {
      if ((connection.batch?.length ?? 0) < pendingBytes) {
        connection.batch = new Uint8Array(pendingBytes);
      }
      bytes = connection.batch!.subarray(0, pendingBytes);
    }
    let offset = 0;
    for (let i = 0; i < queued; i++) {
      bytes.set(pending[i], offset);
      offset += pending[i].length;
    }
  }
  // Emptying the array would cost a new one for the next batch; the
  // responses it held are let go all the same.
  for (let i = 0; i < queued; i++) pending[i] = EMPTY;
  connection.queued = 0;
  connection.pendingBytes = 0;
  return bytes;
}

/** Writes all of `bytes`, however many writes it takes. */
async function writeAll(
  writer: { write(bytes: Uint8Array): Promise<number> },
  bytes: Uint8Array,
): Promise<void> {
  let written = 0;
  while (written < bytes.length) {
    written += await writer.write(bytes.subarray(written));
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
  if (connection.watch && await connection.watch === null) return;
  connection.watch = null;
  const scratch = connection.buffer.length >= 4096
    ? connection.buffer
    : new Uint8Array(4096);
  while (await connection.stream.read(scratch) !== null) { /* discard */ }
}

/** The ticker's verdict on a connection whose deadline passed. */
function expire(server: ServerState, connection: Connection): void {
  if (connection.state === SOCKET) return connection.session!.expire();
  const started = !connection.responding && (connection.state === BODY ||
    (connection.state === HEAD && !connection.isSilent()));
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
  connection.hangUp();
  const reply = errorReply(408);
  server.log?.write(
    connection,
    "-",
    reply.status,
    reply.contents.length,
    server.now,
  );
  // Answers already queued for the requests before it go first. A HEAD's
  // 408 has no body either (RFC 9110 §9.3.2).
  const headOnly =
    methodOf(connection.buffer, connection.start, connection.end) === "HEAD";
  queue(connection, responseBytes(server, reply, headOnly, false, 1));
  writeAll(connection.stream, gather(connection))
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
  /** Where the method ends. */
  methodEnd = 0;
  /** Where the request-target begins. */
  targetStart = 0;
  /** Where the request-target ends. */
  targetEnd = 0;
  /** Where the Host field's value begins. */
  hostStart = 0;
  /** Where the Host field's value ends; 0 without one. */
  hostEnd = 0;
  /**
   * Each field line as four offsets: name start and end, value start and end.
   * A plain array, grown as fields arrive: a typed array for the most fields
   * allowed cost every connection an allocation of 1.6 KB (0.8 µs of each
   * `Connection: close` request, in CPU profiles) for the few fields most
   * requests have.
   */
  fields: number[] = [];
  /** How many field lines {@linkcode RequestHead.fields} holds. */
  fieldCount = 0;
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
  /** An Upgrade field was sent (a WebSocket handshake, perhaps). */
  upgrade = false;
  /** How many Accept-Encoding fields there were, and where the last's value is. */
  acceptEncodings = 0;
  /** Where the last Accept-Encoding field's value begins. */
  acceptEncodingStart = 0;
  /** Where it ends. */
  acceptEncodingEnd = 0;
  /** How many Host fields there were. */
  hosts = 0;
  /** The size announced by the last chunk-size line parsed. */
  chunkSize = 0;

  /** Forgets the previous request's facts before parsing the next. */
  reset(): void {
    this.method = null;
    this.lineEnd =
      this.hosts =
      this.hostEnd =
      this.fieldCount =
        0;
    this.minor = 1;
    this.contentLength = -1;
    this.transferEncoding = this.chunked = false;
    this.otherCoding = this.codingOrder = false;
    this.close = this.keepAlive = this.expectContinue = false;
    this.upgrade = false;
    this.acceptEncodings = 0;
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
const EQUALS = 0x3d;
const DQUOTE = 0x22;
const BACKSLASH = 0x5c;

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
/**
 * Request-target bytes: visible ASCII (RFC 3986 characters, leniently), but
 * no `#`: a fragment is never sent (RFC 9112 §3.2.1).
 */
const TARGET = byteTable([[0x21, 0x22], [0x24, 0x7e]]);
/** RFC 9110 §5.5 field-value bytes: VCHAR, obs-text, SP, HTAB. */
const FIELD_VALUE = byteTable([[0x21, 0x7e], [0x80, 0xff]], " \t");
/** RFC 3986 §3.2 `host [":" port]`: reg-name, IP-literal and port bytes. */
const HOST = byteTable([DIGIT, ...ALPHA], "-._~%!$&'()*+,;=:[]");
/** RFC 3986 §3.1 scheme bytes after the first letter. */
const SCHEME = byteTable([DIGIT, ...ALPHA], "+-.");
/** RFC 9110 §5.6.4 `qdtext`: what a quoted-string holds unescaped. */
const QDTEXT = byteTable([[0x21, 0x21], [0x23, 0x5b], [0x5d, 0x7e], [
  0x80,
  0xff,
]], " \t");
/** RFC 9110 §5.6.4: what may follow a backslash in a quoted-string. */
const QUOTABLE = byteTable([[0x21, 0x7e], [0x80, 0xff]], " \t");
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
  // The parsers below stop at every CRLF and never read past an empty line,
  // so when the bytes end with one (a head, or a pipelined batch of them,
  // read whole: the usual case) a complete head is certain and each byte is
  // scanned once. Only a head that parses within the size limit is taken so:
  // any other verdict is the scanning path's, whose checks come first.
  if (endsWithEmptyLine(buf, p, end)) {
    const parsed = parseHead(buf, p, request, limits);
    if (parsed > 0 && parsed - start <= limits.maxHead) return parsed - start;
    request.reset();
  }
  const headEnd = findHeadEnd(buf, p, end);
  if (headEnd === INCOMPLETE) {
    if (end - start < limits.maxHead) return INCOMPLETE;
    request.method = methodOf(buf, p, end);
    return -oversizeStatus(buf, p, end, limits);
  }
  if (headEnd < 0 || headEnd - start > limits.maxHead) {
    // Refused before its head was parsed: still, a HEAD's refusal carries
    // no body (RFC 9110 §9.3.2), so the method must be known.
    request.method = methodOf(buf, p, end);
    return headEnd < 0 ? headEnd : -oversizeStatus(buf, p, end, limits);
  }
  const parsed = parseHead(buf, p, request, limits);
  return parsed < 0 ? parsed : headEnd - start;
}

/**
 * The request line, the fields and the framing they imply.
 * @returns The offset past the head's empty line, or minus an error status.
 */
function parseHead(
  buf: Uint8Array,
  p: number,
  request: RequestHead,
  limits: ParseLimits,
): number {
  p = parseRequestLine(buf, p, request, limits);
  if (p < 0) return p;
  p = parseFields(buf, p, request, limits);
  if (p < 0) return p;
  const status = checkFraming(request, limits);
  return status ? -status : p;
}

/** Whether `buf[p, end)` is more than an empty line, and ends with one. */
function endsWithEmptyLine(buf: Uint8Array, p: number, end: number): boolean {
  return end - p > 4 && buf[end - 1] === LF && buf[end - 2] === CR &&
    buf[end - 3] === LF && buf[end - 4] === CR;
}

/**
 * Finds the empty line that ends a head.
 * @returns The offset just past it, INCOMPLETE, or -400 for a bare LF
 * (RFC 9112 §2.2 lets us reject it; accepting it invites smuggling).
 */
function findHeadEnd(buf: Uint8Array, p: number, end: number): number {
  // A loop bounded by `end`: indexOf() would search the stale bytes past it,
  // all of a large buffer's.
  for (let lf = p; lf < end; lf++) {
    if (buf[lf] !== LF) continue;
    if (lf === p || buf[lf - 1] !== CR) return -400;
    if (lf + 2 >= end) return INCOMPLETE;
    if (buf[lf + 1] === CR && buf[lf + 2] === LF) return lf + 3;
  }
  return INCOMPLETE;
}

/** The method of a request line, if its first token is one we know. */
function methodOf(buf: Uint8Array, p: number, end: number): string | null {
  const start = p;
  while (p < end && TOKEN[buf[p]]) p++;
  return p < end && buf[p] === SP ? intern(buf, start, p, METHODS) : null;
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
  request.methodEnd = p;
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
  request.targetStart = targetStart;
  request.targetEnd = targetEnd;
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
    request.path = pathText(buf, start, pathEnd, request.path);
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
  request.path = p === pathEnd ? "/" : pathText(buf, p, pathEnd, request.path);
  return 0;
}

/**
 * A path as text: a route's own string, the last request's path when the
 * bytes spell it again (a client asks for the same thing again), else new.
 */
function pathText(
  buf: Uint8Array,
  start: number,
  end: number,
  last: string,
): string {
  return intern(buf, start, end, ROUTES) ??
    (spells(buf, start, end, last) ? last : latin1(buf, start, end));
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
      const at = 4 * request.fieldCount++;
      const fields = request.fields;
      fields[at] = nameStart;
      fields[at + 1] = nameEnd;
      fields[at + 2] = valueStart;
      fields[at + 3] = valueEnd;
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
      request.hostStart = valueStart;
      request.hostEnd = valueEnd;
      for (let i = valueStart; i < valueEnd; i++) if (!HOST[buf[i]]) return 400;
      return 0;
    case 6:
      if (!nameIs(buf, nameStart, "expect")) return 0;
      // RFC 9110 §10.1.1: 100-continue is the only expectation there is.
      if (!wordIs(buf, valueStart, valueEnd, "100-continue")) return 417;
      request.expectContinue = true;
      return 0;
    case 7:
      if (nameIs(buf, nameStart, "upgrade")) request.upgrade = true;
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
    case 15:
      if (!nameIs(buf, nameStart, "accept-encoding")) return 0;
      request.acceptEncodings++;
      request.acceptEncodingStart = valueStart;
      request.acceptEncodingEnd = valueEnd;
      return 0;
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
    // Chunked twice or not last (§6.1), or not there at all: the end of the
    // body is unknown, and §6.3 item 4 makes that a 400.
    if (request.codingOrder || !request.chunked) return 400;
    // Codings we do not decode before the chunked one (§6.1): 501.
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
  const q = skipChunkExtensions(buf, p, end);
  if (q === -400) return q;
  if ((q < 0 ? end : q) - start > MAX_CHUNK_LINE) return -400;
  if (q < 0 || q + 1 >= end) return INCOMPLETE;
  if (buf[q] !== CR || buf[q + 1] !== LF) return -400;
  request.chunkSize = size;
  return q + 2 - start;
}

/**
 * RFC 9112 §7.1.1: `chunk-ext = *( BWS ";" BWS chunk-ext-name
 * [ BWS "=" BWS chunk-ext-val ] )`, a name being a token and a value a token
 * or a quoted-string.
 * @returns Where the extensions end, -1 when more bytes are needed, or -400.
 */
function skipChunkExtensions(buf: Uint8Array, p: number, end: number): number {
  while (true) {
    const before = p;
    p = skipWhitespace(buf, p, end);
    if (p === end) return -1;
    // Whitespace is only allowed on the way to a ";".
    if (buf[p] !== SEMICOLON) return before;
    p = skipWhitespace(buf, p + 1, end);
    const name = p;
    while (p < end && TOKEN[buf[p]]) p++;
    if (p === end) return -1;
    if (p === name) return -400;
    const equals = skipWhitespace(buf, p, end);
    if (equals === end) return -1;
    if (buf[equals] !== EQUALS) continue;
    p = skipWhitespace(buf, equals + 1, end);
    if (p === end) return -1;
    if (buf[p] === DQUOTE) {
      p = skipQuotedString(buf, p, end);
      if (p < 0) return p;
    } else {
      const value = p;
      while (p < end && TOKEN[buf[p]]) p++;
      if (p === end) return -1;
      if (p === value) return -400;
    }
  }
}

/** RFC 9110 §5.6.3 BWS. */
function skipWhitespace(buf: Uint8Array, p: number, end: number): number {
  while (p < end && (buf[p] === SP || buf[p] === HTAB)) p++;
  return p;
}

/**
 * RFC 9110 §5.6.4: `DQUOTE *( qdtext / quoted-pair ) DQUOTE`, from the
 * opening quote at `p`.
 * @returns The offset past the closing quote, -1 for more, or -400.
 */
function skipQuotedString(buf: Uint8Array, p: number, end: number): number {
  for (p++; p < end; p++) {
    if (buf[p] === DQUOTE) return p + 1;
    if (buf[p] === BACKSLASH) {
      if (++p === end) return -1;
      if (!QUOTABLE[buf[p]]) return -400;
    } else if (!QDTEXT[buf[p]]) {
      return -400;
    }
  }
  return -1;
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

/** Whether `buf[start, end)` spells `text`. */
function spells(buf: Uint8Array, start: number, end: number, text: string) {
  if (end - start !== text.length) return false;
  for (let i = 0; i < text.length; i++) {
    if (buf[start + i] !== text.charCodeAt(i)) return false;
  }
  return true;
}

/**
 * `buf[start, end)` as text: the string kept in `texts[slot]` when the bytes
 * spell it again — a client sends the same target and fields request after
 * request — else a new one, kept there for next time.
 */
function recall(
  buf: Uint8Array,
  start: number,
  end: number,
  texts: string[],
  slot: number,
): string {
  const known = texts[slot];
  if (known !== undefined && spells(buf, start, end, known)) return known;
  return texts[slot] = latin1(buf, start, end);
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

/** The last request line logged, and what it was made of. */
let lastLine = "-";
let lastMethod: string | null = null;
let lastTarget = "";
let lastVersion = 0;

/**
 * The request line as received, for the access log. Most lines repeat the
 * one before (a client asks for the same thing again), so that string is
 * reused, and a busy log allocates no line at all. A line that parsed is
 * `method SP target SP HTTP/d.d`: with the same known method and the same
 * digits, only the target's bytes need comparing.
 */
function requestLine(buf: Uint8Array, request: RequestHead): string {
  const { method, targetStart, targetEnd, lineEnd: end } = request;
  if (end === 0) return "-";
  const version = buf[end - 3] << 8 | buf[end - 1];
  if (
    method === null || method !== lastMethod || version !== lastVersion ||
    !spells(buf, targetStart, targetEnd, lastTarget)
  ) {
    lastMethod = method;
    lastVersion = version;
    lastTarget = latin1(buf, targetStart, targetEnd);
    lastLine = escapeForLog(latin1(buf, request.methodStart, end));
  }
  return lastLine;
}

/**
 * `"` and `\` as `\"` and `\\`, control bytes as `\xHH` (as nginx logs them),
 * so that a request line cannot break the line it is logged in.
 */
function escapeForLog(text: string): string {
  return text.replace(
    // deno-lint-ignore no-control-regex -- control bytes are what it seeks
    /["\\\x00-\x1f\x7f-\xff]/g,
    (char) =>
      char === '"' || char === "\\"
        ? `\\${char}`
        : `\\x${char.charCodeAt(0).toString(16).padStart(2, "0")}`,
  );
}

// ---------------------------------------------------------------------------
// Request bodies (RFC 9112 §6): Content-Length or chunked, strict and bounded
// ---------------------------------------------------------------------------

/** Reads into the buffer while a body is expected; a stall is the ticker's. */
function fillBody(server: ServerState, connection: Connection) {
  connection.state = BODY;
  connection.deadline = server.now + server.limits.bodyTimeout * 1000;
  return fill(connection, Math.max(BODY_BUFFER, server.limits.maxHead));
}

/**
 * Reads the body the parsed head announced, piece by piece as it arrives:
 * a Content-Length's worth of bytes, or chunks up to the last one and the
 * trailers (RFC 9112 §6.3, §7.1). The book's `/echo` and a handler's
 * `request.body` both take their bytes from here.
 */
class BodyReader {
  /** Bytes delivered so far. */
  total = 0;
  /** The whole body has been read. */
  done: boolean;
  /** Why the body failed: its status (400, 413), or -1 if the client left. */
  failed = 0;
  /** Bytes of the Content-Length or of the current chunk still to come. */
  #left: number;
  /** A chunk's data has been read, and its CRLF is next. */
  #afterData = false;

  constructor(readonly server: ServerState, readonly connection: Connection) {
    const { chunked, contentLength } = connection.request;
    this.#left = chunked ? 0 : Math.max(contentLength, 0);
    this.done = !chunked && this.#left === 0;
  }

  /**
   * The next piece of the body: a view of the connection's buffer, valid
   * until the next read. Null at the end, or when the body failed.
   */
  async next(): Promise<Uint8Array | null> {
    if (this.done || this.failed) return null;
    if (this.#left === 0 && !await this.#nextChunk()) return null;
    const { connection } = this;
    if (connection.start === connection.end) {
      if (!await fillBody(this.server, connection)) return this.#fail(null);
    }
    const take = Math.min(this.#left, connection.end - connection.start);
    const piece = connection.buffer.subarray(
      connection.start,
      connection.start + take,
    );
    connection.start += take;
    this.total += take;
    this.#left -= take;
    if (this.#left === 0 && !connection.request.chunked) this.done = true;
    return piece;
  }

  /**
   * Reads and drops the rest of the body, up to `limit` bytes.
   * @returns Whether the body ended within the limit.
   */
  async skip(limit: number): Promise<boolean> {
    // A declared length past the limit is not worth reading at all.
    if (!this.connection.request.chunked && this.#left > limit) return false;
    const bound = this.total + limit;
    while (!this.done && !this.failed && this.total <= bound) await this.next();
    return this.done;
  }

  /** Reads up to the next chunk's data; false at the end or on failure. */
  async #nextChunk(): Promise<boolean> {
    const { server, connection } = this;
    const request = connection.request;
    let status: number | null;
    if (this.#afterData) {
      status = await parseBuffered(server, connection, parseDataEnd);
      if (status !== 0) return this.#fail(status);
    }
    // Sizes past what maxBody still allows are 413 before any data is read.
    const room = server.limits.maxBody - this.total;
    status = await parseBuffered(
      server,
      connection,
      (buf, start, end) => parseChunkSize(buf, start, end, request, room),
    );
    if (status !== 0) return this.#fail(status);
    this.#left = request.chunkSize;
    this.#afterData = true;
    if (this.#left > 0) return true;
    status = await parseBuffered(
      server,
      connection,
      (buf, start, end) => parseTrailers(buf, start, end, server.limits),
    );
    if (status !== 0) return this.#fail(status);
    this.done = true;
    return false;
  }

  #fail(status: number | null): null & false {
    this.failed = status ?? -1;
    return null as null & false;
  }
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

/**
 * Reads a whole body, for the book's routes.
 * @returns The body, an error status, or null if the client went away.
 */
async function readBody(
  server: ServerState,
  connection: Connection,
): Promise<Uint8Array | number | null> {
  const reader = new BodyReader(server, connection);
  // Grown as bytes arrive, so a head announcing a large body costs nothing
  // until the body actually comes.
  let body = new Uint8Array(
    Math.min(Math.max(connection.request.contentLength, 1024), BODY_BUFFER),
  );
  let piece: Uint8Array | null;
  while ((piece = await reader.next()) !== null) {
    if (reader.total > body.length) {
      const larger = new Uint8Array(Math.max(reader.total, body.length * 2));
      larger.set(body.subarray(0, reader.total - piece.length));
      body = larger;
    }
    body.set(piece, reader.total - piece.length);
  }
  if (reader.failed) return reader.failed > 0 ? reader.failed : null;
  return body.subarray(0, reader.total);
}

/**
 * A handler's `request.body`: a stream pulled from the connection as the
 * handler reads, one piece at a time — while nothing reads it, the socket
 * is not read either. The first read sends `100 Continue` to a client that
 * waits for it (RFC 9110 §10.1.1), and no earlier: a handler that answers
 * without reading the body never makes the client send it.
 */
function bodyStream(
  reader: BodyReader,
  exchange: Exchange,
): ReadableStream<Uint8Array> {
  const { server, connection } = reader;
  return new ReadableStream<Uint8Array>({
    pull: async (controller) => {
      if (!exchange.continued) {
        exchange.continued = true;
        if (connection.request.expectContinue) {
          queue(connection, CONTINUE);
          await flush(server, connection);
        }
      }
      const piece = await reader.next();
      // Between reads the handler is at work, which no timeout limits.
      if (connection.state === BODY) {
        connection.state = BUSY;
        connection.deadline = Infinity;
      }
      if (piece) controller.enqueue(piece.slice());
      if (reader.failed) {
        controller.error(
          new RangeError(
            reader.failed > 0
              ? `the request body was refused with ${reader.failed}`
              : "the client went away before the end of the request body",
          ),
        );
      } else if (reader.done) {
        controller.close();
        watch(server, connection);
      }
    },
  }, { highWaterMark: 0 });
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
const decoder = new TextDecoder();
const HTML = "text/html; charset=utf-8";
const TEXT = "text/plain; charset=utf-8";

/** RFC 9110 §15's reason phrases, for the statuses one meets. */
const REASONS: Record<number, string> = {
  100: "Continue",
  200: "OK",
  201: "Created",
  202: "Accepted",
  204: "No Content",
  206: "Partial Content",
  301: "Moved Permanently",
  302: "Found",
  303: "See Other",
  304: "Not Modified",
  307: "Temporary Redirect",
  308: "Permanent Redirect",
  400: "Bad Request",
  401: "Unauthorized",
  403: "Forbidden",
  404: "Not Found",
  405: "Method Not Allowed",
  406: "Not Acceptable",
  408: "Request Timeout",
  409: "Conflict",
  410: "Gone",
  412: "Precondition Failed",
  413: "Content Too Large",
  414: "URI Too Long",
  415: "Unsupported Media Type",
  416: "Range Not Satisfiable",
  417: "Expectation Failed",
  422: "Unprocessable Content",
  429: "Too Many Requests",
  431: "Request Header Fields Too Large",
  500: "Internal Server Error",
  501: "Not Implemented",
  502: "Bad Gateway",
  503: "Service Unavailable",
  504: "Gateway Timeout",
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
/** `OPTIONS *` to a handler's server: what it allows is the handler's. */
const ANY_OPTIONS: Reply = {
  status: 200,
  contents: EMPTY,
  contentType: TEXT,
  cacheKey: 5,
};

/**
 * The server's own replies — the book's routes, and the refusals of requests
 * that fail to parse or that a handler never sees — queued to be written
 * with the rest of the batch.
 * @returns Whether the connection stays open.
 */
function answer(
  server: ServerState,
  connection: Connection,
  reply: Reply,
  line: string,
  began: number,
): boolean {
  const request = connection.request;
  connection.lingers = REFUSALS.has(reply.status);
  const keepAlive = !connection.lingers && !server.closing &&
    shouldKeepAlive(request);
  // RFC 9110 §9.3.2: no content in a response to HEAD, not even an error's —
  // the client would take those bytes for the next response.
  const headOnly = request.method === "HEAD";
  queue(
    connection,
    responseBytes(server, reply, headOnly, keepAlive, request.minor),
  );
  server.log?.write(
    connection,
    line,
    reply.status,
    headOnly ? 0 : reply.contents.length,
    began,
  );
  return keepAlive;
}

/** `/sleep`: the reply waits, and so does the connection, without a deadline. */
async function delay(server: ServerState, connection: Connection) {
  if (connection.pendingBytes > 0) await flush(server, connection);
  connection.state = BUSY;
  connection.deadline = Infinity;
  await connection.sleep(server.limits.sleepDelay * 1000);
}

/**
 * The replies after which the connection closes: those that refuse a request
 * outright or leave its framing in doubt. A 404 or 405 does not — browsers
 * ask for `/favicon.ico` on every visit, and pipelined requests behind it
 * would be lost.
 */
const REFUSALS = new Set([400, 408, 413, 414, 417, 431, 501, 505]);

/**
 * The server's own answer to a request it parsed: the book's `match`, or,
 * in front of a handler, to `OPTIONS *` (what a handler allows is its own).
 */
function ownReply(
  server: ServerState,
  request: RequestHead,
  body: Uint8Array,
): Reply {
  return server.handler
    ? ANY_OPTIONS
    : route(request.method, request.path, body);
}

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
  return ownReply(server, request, result);
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
// The handler: a user's application behind the same core
// ---------------------------------------------------------------------------

/**
 * One request handed to a handler: its body as read so far, and what the
 * handler was told.
 */
class Exchange implements ServeHandlerInfo {
  /** The request body, null when there is none. */
  readonly reader: BodyReader | null;
  /** The body stream the handler got; null when it got none. */
  stream: ReadableStream<Uint8Array> | null = null;
  /** The handler has asked for the body (so `100 Continue` is spent). */
  continued = false;
  /** The request's signal. */
  signal: AbortSignal | null = null;
  /** The WebSocket the handler accepted, if it called upgradeWebSocket(). */
  session: WebSocketSession | null = null;
  /** The request's Accept-Encoding, if it has one. */
  accepted: string | null = null;
  /** The response body's length, -1 when unknown, and the bytes sent. */
  length = -1;
  sent = 0;
  #outcome: { error: unknown } | null | undefined = undefined;
  #completed: Promise<void> | null = null;
  #settle: ((error?: unknown) => void) | null = null;

  constructor(readonly remoteAddr: Deno.NetAddr, reader: BodyReader | null) {
    this.reader = reader;
  }

  /**
   * Made only when asked for, so that most requests pay nothing for it. A
   * rejection nobody waits for is not a crash: only what is chained to it
   * must handle it.
   */
  get completed(): Promise<void> {
    if (this.#completed) return this.#completed;
    const outcome = this.#outcome;
    let promise: Promise<void>;
    if (outcome !== undefined) {
      promise = outcome ? Promise.reject(outcome.error) : Promise.resolve();
    } else {
      const settled = Promise.withResolvers<void>();
      this.#settle = (error) =>
        error === undefined ? settled.resolve() : settled.reject(error);
      promise = settled.promise;
    }
    promise.catch(() => {});
    return this.#completed = promise;
  }

  /** Someone waits on {@linkcode completed}: settle it as soon as we know. */
  get watched(): boolean {
    return this.#completed !== null;
  }

  /** The response was written in full (no error), or could not be. */
  finish(error?: unknown): void {
    if (this.#outcome !== undefined) return;
    this.#outcome = error === undefined ? null : { error };
    this.#settle?.(error);
  }
}

/**
 * Hands one request to the handler and writes what it returns.
 * @returns Whether the connection stays open, or null when it is gone.
 */
async function respond(
  server: ServerState,
  connection: Connection,
  line: string,
  began: number,
): Promise<boolean | null> {
  const head = connection.request;
  const hasBody = head.chunked || head.contentLength > 0;
  connection.lingers = false;
  const exchange = new Exchange(
    connection.remoteAddr,
    hasBody ? new BodyReader(server, connection) : null,
  );
  const request = toRequest(server, connection, exchange);
  if (typeof request === "number") {
    return answer(server, connection, errorReply(request), line, began);
  }
  // Answers to the requests before this one leave before its body is read:
  // the client may wait for them before it sends the body.
  if (hasBody && connection.pendingBytes > 0) await flush(server, connection);
  connection.state = BUSY;
  connection.deadline = Infinity;
  const called = call(server, connection, request, exchange);
  let response = called instanceof Response ? called : await called;
  if (response?.bodyUsed) {
    response = await connection.unlessClosed(
      recover(server, new TypeError("the handler's Response was already read")),
    ) as Response | null;
  }
  const session = exchange.session;
  if (response === null || connection.state === LINGER) {
    exchange.finish(new Error("the connection closed before the response"));
    session?.closed();
    await response?.body?.cancel().catch(() => {});
    return null;
  }
  if (session) {
    if (response === session.agreed.response) {
      try {
        await acceptUpgrade(server, connection, session, response, line, began);
      } catch (error) {
        session.closed();
        throw error;
      }
      exchange.finish();
      connection.session = session;
      return false;
    }
    // Accepted, then answered otherwise: the socket never opens.
    session.closed();
  }
  const reader = exchange.reader;
  if (reader?.failed) {
    // The body broke its own framing or limit: that answer wins over the
    // handler's, which saw only a failing stream.
    exchange.finish(new Error(`the request body failed (${reader.failed})`));
    await response.body?.cancel().catch(() => {});
    return reader.failed > 0
      ? answer(server, connection, errorReply(reader.failed), line, began)
      : null;
  }
  let keepAlive = !server.closing && shouldKeepAlive(head);
  if (reader && !reader.done) {
    keepAlive = keepAlive && await discardBody(exchange);
    // A body may still be on its way: linger after the reply, so that it
    // does not turn the close into a reset that destroys the reply.
    if (!keepAlive) connection.lingers = true;
  }
  return send(server, connection, response, exchange, keepAlive, line, began);
}

/**
 * A body the handler did not read to the end: dropped up to a bound, so
 * that the next request starts at the right byte.
 * @returns Whether the connection can still be kept alive.
 */
async function discardBody(exchange: Exchange): Promise<boolean> {
  const { reader, stream } = exchange;
  // A body the client was told to wait for never comes unasked; a stream
  // the handler still holds may yet be read. Either way: close after this.
  if (!exchange.continued && reader!.connection.request.expectContinue) {
    return false;
  }
  if (stream?.locked) return false;
  await stream?.cancel().catch(() => {});
  return await reader!.skip(MAX_DISCARD);
}

/**
 * The `Request` a handler gets. Its URL is absolute: `http://`, the Host
 * field, and the target (RFC 9112 §3.3); an absolute-form target as sent.
 * @returns The request, or the status to refuse it with.
 */
function toRequest(
  server: ServerState,
  connection: Connection,
  exchange: Exchange,
): Request | number {
  const head = connection.request;
  const buf = connection.buffer;
  const method = head.method ??
    fetchMethod(latin1(buf, head.methodStart, head.methodEnd));
  // The Fetch API forbids these methods, and a server owes them nothing
  // (RFC 9110 §9.3.6, §9.3.8): not implemented.
  if (method === "CONNECT" || method === "TRACE" || method === "TRACK") {
    return 501;
  }
  const { texts } = connection;
  const target = recall(buf, head.targetStart, head.targetEnd, texts, 0);
  const host = head.hostEnd > 0
    ? recall(buf, head.hostStart, head.hostEnd, texts, 1)
    : hostOf(server.listener.addr);
  // The same target and host as last time (the same strings): the same URL,
  // parsed once (WHATWG URL: the form `request.url` has), or refused.
  if (target !== texts[2] || host !== texts[3]) {
    texts[2] = target;
    texts[3] = host;
    const url = URL.parse(
      buf[head.targetStart] !== SLASH
        ? target
        : `${server.scheme}://${host}${target}`,
    );
    texts[4] = url?.href ?? "";
  }
  const url = texts[4];
  if (url === "") return 400;
  // The Fetch API allows no body on GET or HEAD: one sent anyway is
  // dropped like any body the handler leaves unread.
  const reader = exchange.reader;
  if (reader && method !== "GET" && method !== "HEAD") {
    exchange.stream = bodyStream(reader, exchange);
  }
  const signal = exchange.signal = connection.newSignal();
  const fields = fieldPairs(buf, head, texts, []);
  let request: Request;
  if (REQUEST_SLOTS) {
    request = REQUEST_SLOTS.make(method, url, fields, exchange.stream, signal);
  } else {
    try {
      request = new Request(url, {
        method,
        headers: fields,
        body: exchange.stream,
        signal,
      });
    } catch {
      return 400;
    }
  }
  // Several fields are one list (RFC 9110 §5.3): Headers joins them.
  if (head.acceptEncodings > 0) {
    exchange.accepted = head.acceptEncodings > 1
      ? request.headers.get("accept-encoding")
      : recall(buf, head.acceptEncodingStart, head.acceptEncodingEnd, texts, 5);
  }
  if (head.upgrade) {
    UPGRADES.set(request, {
      server,
      connection,
      exchange,
      minor: head.minor,
      bodiless: reader === null,
    });
  }
  return request;
}

/**
 * A method as the Fetch API spells it (Fetch §2.2.1, "normalize"): in
 * capitals when it is one of these in any case, else as sent.
 */
function fetchMethod(method: string): string {
  const upper = method.toUpperCase();
  return FETCH_METHODS.includes(upper) ? upper : method;
}

const FETCH_METHODS = [
  "DELETE",
  "GET",
  "HEAD",
  "OPTIONS",
  "POST",
  "PUT",
  // Forbidden in any case: capitals, so that they are refused.
  "CONNECT",
  "TRACE",
  "TRACK",
];

/** The head's fields as name and value pairs, appended to `list`. */
function fieldPairs(
  buf: Uint8Array,
  head: RequestHead,
  texts: string[],
  list: [string, string][],
): [string, string][] {
  const { fields, fieldCount } = head;
  for (let at = 0; at < 4 * fieldCount; at += 4) {
    list.push([
      recall(buf, fields[at], fields[at + 1], texts, 6 + at / 2),
      recall(buf, fields[at + 2], fields[at + 3], texts, 7 + at / 2),
    ]);
  }
  return list;
}

/**
 * What a Deno 2.9 `Request` keeps of what it was made of (its method, URL
 * list, field list and body), in the shape the runtime's own requests have.
 */
class RequestRecord {
  redirectMode = "follow";
  redirectCount = 0;
  clientRid = null;
  blobUrlEntry = null;
  readonly urlList: (() => string)[];
  readonly urlListProcessed: string[];

  constructor(
    public method: string,
    url: string,
    readonly headerList: [string, string][],
    readonly body: unknown,
  ) {
    this.urlList = [() => url];
    this.urlListProcessed = [url];
  }

  url(): string {
    return this.urlListProcessed[0];
  }

  currentUrl(): string {
    const last = this.urlList.length - 1;
    return this.urlListProcessed[last] ??= this.urlList[last]();
  }
}

/**
 * `HELLO_SERVER_FETCH_ONLY=1`, read only where `--allow-env` grants it: the
 * runtime's internals below are left alone, and only the Fetch API is used,
 * as on a Deno where the probes find nothing. CI runs the tests both ways.
 */
const FETCH_ONLY = (() => {
  const variable = "HELLO_SERVER_FETCH_ONLY";
  const { state } = Deno.permissions.querySync({ name: "env", variable });
  return state === "granted" && Deno.env.get(variable) === "1";
})();

/**
 * `new Request(url, init)` parses the URL again, builds a record with an
 * accessor per member, validates every field anew — fields the parser has
 * checked byte by byte already (RFC 9110 §5.5) — and ties a signal of its
 * own to the one it is given: about 1.7 µs a request in Deno 2.9. The
 * runtime makes `Deno.serve`'s requests bare (a branded `Request` with
 * nothing in it) and gives them their record, for about 60 ns. Where this
 * Deno has the brand, the record, the field guard and the signal where
 * these probes find them, and a request made that way behaves, ours are
 * made the same way; anywhere else, the Fetch API's way, only slower.
 */
const REQUEST_SLOTS = (() => {
  if (FETCH_ONLY) return null;
  try {
    const stream = new ReadableStream();
    const probe = new Request("http://localhost/", {
      method: "POST",
      body: stream,
    });
    const slots = probe as unknown as Record<symbol, unknown>;
    const symbols = Object.getOwnPropertySymbols(probe);
    const named = (name: string) =>
      symbols.find((symbol) => symbol.description === name);
    // A branded object holds its brand under the brand itself.
    const brand = symbols.find((symbol) => slots[symbol] === symbol);
    const inner = named("request");
    const guard = named("headers guard");
    const signal = named("signalCache");
    if (!brand || !inner || !guard || !signal) return null;
    const Body = (slots[inner] as { body: object }).body.constructor as new (
      stream: ReadableStream<Uint8Array>,
    ) => unknown;
    const Bare = Request as unknown as new (brand: symbol) => Request;
    const make = (
      method: string,
      url: string,
      fields: [string, string][],
      body: ReadableStream<Uint8Array> | null,
      abort: AbortSignal,
    ): Request => {
      const request = new Bare(brand);
      const own = request as unknown as Record<symbol, unknown>;
      own[inner] = new RequestRecord(
        method,
        url,
        fields,
        body ? new Body(body) : null,
      );
      own[guard] = "request";
      own[signal] = abort;
      return request;
    };
    const controller = new AbortController();
    const made = make(
      "POST",
      "http://localhost/a?b",
      [["X-Probe", "1"]],
      stream,
      controller.signal,
    );
    controller.abort();
    const copy = made.clone();
    const works = made instanceof Request && made.method === "POST" &&
      made.url === "http://localhost/a?b" &&
      made.headers.get("x-probe") === "1" && made.signal.aborted &&
      made.body instanceof ReadableStream && !made.bodyUsed &&
      copy.url === made.url && copy.headers.has("x-probe") &&
      copy.method === "POST";
    return works ? { make } : null;
  } catch {
    return null;
  }
})();

/**
 * Calls the handler; a failure becomes the `onError` response.
 * @returns The response, a promise of it, or of null when the connection
 * closed meanwhile.
 */
function call(
  server: ServerState,
  connection: Connection,
  request: Request,
  exchange: Exchange,
): Response | Promise<Response | null> {
  let response: unknown;
  try {
    response = server.handler!(request, exchange);
  } catch (error) {
    response = Promise.reject(error);
  }
  // A handler that answers at once is answered at once: no trip through
  // the microtask queue.
  return response instanceof Response
    ? response
    : awaitResponse(server, connection, response, exchange.reader === null);
}

/** Settled: what waits on it runs after what waited before. */
const SETTLED = Promise.resolve();

/**
 * Waits for the response a handler promised. An `async` handler that had
 * nothing to wait for has answered already; one that is really waiting
 * lets the answers to earlier pipelined requests go out meanwhile, and has
 * the client watched for a hang-up. A handler that never answers is cut
 * loose when the connection closes (the shutdown timeout), so that the
 * server can finish.
 */
async function awaitResponse(
  server: ServerState,
  connection: Connection,
  promised: unknown,
  bodiless: boolean,
): Promise<Response | null> {
  // Whether it has answered already: a promise settled before this one is
  // awaited has run its reaction by then. (Promise.race would tell the
  // same for 0.25 µs more: an array, a promise and two reactions.)
  let settled = false;
  let failed = false;
  let response: unknown;
  Promise.resolve(promised).then((value) => {
    settled = true;
    response = value;
  }, (error) => {
    settled = failed = true;
    response = error;
  });
  await SETTLED;
  try {
    if (failed) throw response;
    if (!settled) {
      if (bodiless) watch(server, connection);
      if (connection.pendingBytes > 0) await flush(server, connection);
      connection.state = BUSY;
      connection.deadline = Infinity;
      response = await connection.unlessClosed(promised);
    }
    if (connection.closed) return null;
    if (!(response instanceof Response)) {
      throw new TypeError("the handler returned no Response");
    }
    return response;
  } catch (error) {
    if (connection.closed) return null;
    // onError may hang too: it is cut loose the same way.
    response = await connection.unlessClosed(recover(server, error));
    return connection.closed ? null : response as Response;
  }
}

/** RFC 9110 §15.6.1: a 500 that tells the client nothing of the error. */
function internalError(): Response {
  return new Response(`500 ${REASONS[500]}\n`, {
    status: 500,
    headers: { "content-type": TEXT },
  });
}

/** The handler failed: one line on stderr, and `onError`'s response. */
async function recover(server: ServerState, error: unknown): Promise<Response> {
  // A client's bad WebSocket handshake is no failure of the handler's.
  if (error instanceof HandshakeError && !server.onError) {
    return handshakeRefusal(error);
  }
  console.error(`error: the handler failed: ${firstLine(error)}`);
  if (!server.onError) return internalError();
  try {
    const response = await server.onError(error);
    if (response instanceof Response) return response;
    throw new TypeError("onError returned no Response");
  } catch (failure) {
    console.error(`error: onError failed: ${firstLine(failure)}`);
    return internalError();
  }
}

function firstLine(error: unknown): string {
  return String(error instanceof Error ? error.message : error).split("\n")[0];
}

function hostOf(addr: Deno.NetAddr): string {
  const host = addr.hostname.includes(":")
    ? `[${addr.hostname}]`
    : addr.hostname;
  return `${host}:${addr.port}`;
}

// ---------------------------------------------------------------------------
// Writing responses: status line, Date, framing, Connection
// ---------------------------------------------------------------------------

const CONTINUE = encoder.encode("HTTP/1.1 100 Continue\r\n\r\n");

// How a response ends the exchange, which decides its Connection fields.
const CLOSE = 0;
const KEEP_ALIVE = 1;
const KEEP_ALIVE_1_0 = 2; // HTTP/1.0 keeps alive only when told so (RFC 9112 §9.3)

/** How a response ends its exchange, for its Connection fields. */
function persistenceOf(keepAlive: boolean, minor: number): number {
  return !keepAlive ? CLOSE : minor === 0 ? KEEP_ALIVE_1_0 : KEEP_ALIVE;
}

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
  const persistence = persistenceOf(keepAlive, minor);
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
    `Date: ${httpDate(server.now)}\r\n`;
  if (contents.length > 0) head += `Content-Type: ${reply.contentType}\r\n`;
  head += `Content-Length: ${contents.length}\r\n`;
  if (reply.allow) head += `Allow: ${reply.allow}\r\n`;
  head += server.endOfHead[persistence];
  return joinBytes(head, headOnly ? EMPTY : contents);
}

/**
 * The `Connection` and `Keep-Alive` fields (RFC 9112 §9.3, §9.6) and the
 * empty line that ends a head, for each way a response ends its exchange;
 * then the same with the `upgrade` option that a response naming an
 * `Upgrade` must carry (RFC 9110 §7.8), at UPGRADE_OPTION past each.
 */
function endsOfHead(idleTimeout: number): string[] {
  const idle = `Keep-Alive: timeout=${Math.floor(idleTimeout)}\r\n`;
  const ends: string[] = [];
  ends[CLOSE] = "Connection: close\r\n\r\n";
  ends[KEEP_ALIVE] = `${idle}\r\n`;
  ends[KEEP_ALIVE_1_0] = `Connection: keep-alive\r\n${idle}\r\n`;
  ends[UPGRADE_OPTION + CLOSE] = "Connection: upgrade, close\r\n\r\n";
  ends[UPGRADE_OPTION + KEEP_ALIVE] = `Connection: upgrade\r\n${idle}\r\n`;
  ends[UPGRADE_OPTION + KEEP_ALIVE_1_0] =
    `Connection: upgrade, keep-alive\r\n${idle}\r\n`;
  return ends;
}

/** Where endsOfHead() keeps the ends with Connection's `upgrade` option. */
const UPGRADE_OPTION = 3;

/**
 * A head (Latin-1 text: field values are bytes, not UTF-8) and a body of
 * `size` bytes. A text body is encoded with the head in one go, where the
 * head is ASCII; a head that is not has each of its bytes written alone.
 */
function joinBytes(
  head: string,
  body: Uint8Array | string,
  size = typeof body === "string" ? utf8Length(body) : body.length,
): Uint8Array {
  const bytes = allocate(head.length + size);
  const isText = typeof body === "string";
  const text = isText ? head + body : head;
  const { read, written } = encoder.encodeInto(text, bytes);
  if (
    read !== text.length || written !== (isText ? bytes.length : head.length)
  ) {
    for (let i = 0; i < head.length; i++) bytes[i] = head.charCodeAt(i);
    if (isText) encoder.encodeInto(body, bytes.subarray(head.length));
  }
  if (!isText) bytes.set(body, head.length);
  return bytes;
}

/**
 * Small responses are cut from one shared `ArrayBuffer`, as Node's `Buffer`
 * pool does: a `Uint8Array` of their own would each cost an allocation
 * outside the heap (about 0.5 µs in Deno 2.9, against 0.1 µs for a view of
 * the pool) and the collector's time. A pool is never written twice: when
 * it is full the next is made, and the last views still in it keep it.
 */
const POOL_SIZE = 64 * 1024;
let pool = new ArrayBuffer(POOL_SIZE);
let pooled = 0;

function allocate(size: number): Uint8Array {
  if (size > POOL_SIZE / 8) return new Uint8Array(size);
  if (pooled + size > POOL_SIZE) {
    pool = new ArrayBuffer(POOL_SIZE);
    pooled = 0;
  }
  const bytes = new Uint8Array(pool, pooled, size);
  pooled += size;
  return bytes;
}

/** A response's content as send() finds it: see contentOf(), readAhead(). */
type Content =
  | string
  | Uint8Array
  | ReadableStream<Uint8Array>
  | ReadAhead
  | null;

/**
 * Writes a handler's response: its status and fields as given, with the
 * framing the server owns (RFC 9112 §6.1–§6.3) — a handler's
 * `Content-Length`, `Transfer-Encoding` or `Keep-Alive` could otherwise
 * desynchronise the connection. Content of known length is sent with a
 * Content-Length, a stream chunked to HTTP/1.1 or until the close to 1.0;
 * either compressed on the way when the client and the content allow it.
 * @returns Whether the connection stays open, or null when it is gone.
 */
function send(
  server: ServerState,
  connection: Connection,
  response: Response,
  exchange: Exchange,
  keepAlive: boolean,
  line: string,
  began: number,
  content: Content = contentOf(response, exchange),
): boolean | null | Promise<boolean | null> {
  const { status } = response;
  const { minor, method } = connection.request;
  if (
    content instanceof ReadableStream && exchange.length < 0 &&
    status !== 204 && status !== 304
  ) {
    // A stream all of whose (few) bytes are there at once has a length.
    return readAhead(content).then((ahead) =>
      send(
        server,
        connection,
        response,
        exchange,
        keepAlive,
        line,
        began,
        ahead.done ? join(ahead.chunks, ahead.size) : ahead,
      )
    );
  }
  // RFC 9110 §6.4.1: no content after HEAD, 204 or 304 (§8.6: and no
  // Content-Length on a 204).
  const noContent = status === 204 || status === 304;
  const headOnly = noContent || method === "HEAD";
  let length = content === null
    ? 0
    : typeof content === "string"
    ? utf8Length(content)
    : content instanceof Uint8Array
    ? content.length
    : exchange.length;
  // A HEAD's answer is judged by what a GET would carry: its length as
  // the handler says it, if it says.
  const judged = method === "HEAD" && content === null
    ? lengthOf(response.headers.get("content-length"))
    : length;
  let coding = noContent
    ? null
    : codingFor(server, exchange.accepted, response, judged);
  if (coding && !zlib) {
    // The scratch buffer of textBody() may be another's by then.
    const kept = content instanceof Uint8Array ? content.slice() : content;
    return loadZlib().then(() =>
      send(
        server,
        connection,
        response,
        exchange,
        keepAlive,
        line,
        began,
        kept,
      )
    );
  }
  if (coding && !headOnly && length >= 0) {
    // Known content: compressed whole, and sent only if that shrank it.
    const bytes = typeof content === "string"
      ? encoder.encode(content)
      : content as Uint8Array;
    const compressed = compressWhole(bytes, coding);
    if (compressed.length < bytes.length) {
      content = compressed;
      length = compressed.length;
    } else {
      coding = null;
    }
  } else if (coding) {
    length = -1; // a stream, or HEAD: the compressed length is not known
  }
  let head = `HTTP/1.1 ${status} ${
    response.statusText || REASONS[status] || ""
  }\r\n`;
  let dated = false;
  let declared = "";
  let upgrade = 0;
  let varied = false;
  for (const [name, field] of fieldsOf(response)) {
    let value = field;
    switch (name.toLowerCase()) {
      case "connection":
        if (hasToken(value, "close")) keepAlive = false;
        if (hasToken(value, "upgrade")) upgrade = UPGRADE_OPTION;
        continue;
      case "content-length":
        declared = value;
        continue;
      case "transfer-encoding":
      case "keep-alive":
        continue;
      case "date":
        dated = true;
        break;
      case "etag":
        // §8.8.3.3: the compressed bytes are not the ones a strong tag names.
        if (coding && value.startsWith('"')) value = `W/${value}`;
        break;
      case "accept-ranges":
        // Ranges are of the identity bytes, never of these (as nginx).
        if (coding) continue;
        break;
      case "vary":
        varied = coding !== null;
        if (coding && !hasToken(value, "accept-encoding")) {
          if (!hasToken(value, "*")) value += ", Accept-Encoding";
        }
    }
    head += `${name}: ${value}\r\n`;
  }
  if (!dated) head += `Date: ${httpDate(server.now)}\r\n`;
  if (coding) {
    head += `Content-Encoding: ${coding}\r\n`;
    if (!varied) head += "Vary: Accept-Encoding\r\n";
  }
  // A stream of unknown length goes by the handler's Content-Length when it
  // gives one; pipe() holds the stream to it, and closes if it is wrong.
  const streamed = typeof content === "object" && content !== null &&
    !(content instanceof Uint8Array);
  if (streamed && length < 0 && !coding) {
    const said = lengthOf(declared);
    // More read ahead than it says: it is wrong, and the server frames it.
    if (said >= 0 && !(isReadAhead(content) && content.size > said)) {
      length = exchange.length = said;
    }
  }
  if (headOnly && streamed) {
    cancel(content as ReadableStream<Uint8Array> | ReadAhead);
    content = EMPTY;
  }
  if (noContent) {
    // No framing at all.
  } else if (length >= 0 && (content !== null || !headOnly)) {
    head += `Content-Length: ${length}\r\n`;
  } else if (headOnly) {
    // A HEAD answer may say what a GET would carry (RFC 9110 §9.3.2).
    if (!coding && /^\d+$/.test(declared)) {
      head += `Content-Length: ${declared}\r\n`;
    }
  } else if (minor >= 1) {
    head += "Transfer-Encoding: chunked\r\n";
  } else {
    keepAlive = false; // RFC 9112 §6.3 item 8: the body ends at the close.
  }
  const persistence = persistenceOf(keepAlive, minor);
  head += server.endOfHead[upgrade + persistence];
  if (streamed && content !== EMPTY) {
    // A stream may take its time: watch for the client to hang up meanwhile.
    if (!exchange.reader || exchange.reader.done) watch(server, connection);
    queue(connection, joinBytes(head, EMPTY));
    const ahead = content instanceof ReadableStream
      ? aheadOf(content)
      : content as ReadAhead;
    const chunked = length < 0 && minor >= 1;
    exchange.length = length;
    return sendStream(
      server,
      connection,
      ahead,
      exchange,
      chunked,
      coding,
      keepAlive,
    ).finally(() =>
      server.log?.write(connection, line, status, exchange.sent, began)
    );
  }
  const body = headOnly || content === null ? EMPTY : content as
    | string
    | Uint8Array;
  exchange.sent = body === EMPTY ? 0 : length;
  queue(connection, joinBytes(head, body, exchange.sent));
  server.log?.write(connection, line, status, exchange.sent, began);
  if (exchange.watched) {
    return settleCompleted(server, connection, exchange, keepAlive);
  }
  exchange.finish();
  return keepAlive;
}

/** A response stream, then the connection's fate: see pipe(). */
async function sendStream(
  server: ServerState,
  connection: Connection,
  content: ReadAhead,
  exchange: Exchange,
  chunked: boolean,
  coding: Coding | null,
  keepAlive: boolean,
): Promise<boolean | null> {
  try {
    await pipe(server, connection, content, exchange, chunked, coding);
  } catch (error) {
    if (!exchange.signal?.aborted) {
      console.error(`error: the response body failed: ${firstLine(error)}`);
    }
    exchange.finish(error);
    connection.close();
    return null;
  }
  return settleCompleted(server, connection, exchange, keepAlive);
}

/**
 * Someone waits on `info.completed`: the response is written out now, so
 * that it settles as soon as the client has it all, or could not.
 */
async function settleCompleted(
  server: ServerState,
  connection: Connection,
  exchange: Exchange,
  keepAlive: boolean,
): Promise<boolean> {
  if (exchange.watched) {
    try {
      await flush(server, connection);
    } catch (error) {
      exchange.finish(error);
      throw error;
    }
  }
  exchange.finish();
  return keepAlive;
}

/**
 * A stream's first chunks, read while each came at once, and the reader of
 * the rest: a body whose bytes are all there (a string's or a buffer's,
 * where the runtime's internals do not say so) gets a Content-Length, and
 * a handler's wrong one is not believed.
 */
interface ReadAhead {
  reader: ReadableStreamDefaultReader<Uint8Array>;
  chunks: Uint8Array[];
  size: number;
  /** The stream ended within the chunks: they are all of it. */
  done: boolean;
  /** The read under way when one did not come at once. */
  next: Promise<ReadableStreamReadResult<Uint8Array>> | null;
  /** Why the stream failed while it was read ahead. */
  error?: unknown;
}

/** The most read ahead of a stream before its head is written. */
const MAX_READ_AHEAD = 64 * 1024;

/**
 * Settles after the reads that can settle at once have (see readAhead()): a
 * read of a chunk already queued, or of a closed stream, settles in a tick;
 * a Blob's or a FormData's in a few more. One that takes longer waits for
 * its source: an event, a file, the network.
 */
async function readsSettled(): Promise<null> {
  for (let tick = 0; tick < READ_AHEAD_TICKS; tick++) await SETTLED;
  return null;
}

/** How many turns of the microtask queue a read may take to count as at once. */
const READ_AHEAD_TICKS = 16;

async function readAhead(
  stream: ReadableStream<Uint8Array>,
): Promise<ReadAhead> {
  const ahead = aheadOf(stream);
  try {
    while (ahead.size <= MAX_READ_AHEAD) {
      const next = ahead.reader.read();
      const result = await Promise.race([next, readsSettled()]);
      if (result === null) {
        // Awaited by pipe(), unless the content is dropped: never unhandled.
        next.catch(() => {});
        ahead.next = next;
        break;
      }
      if (result.done) {
        ahead.done = true;
        break;
      }
      ahead.chunks.push(chunkOf(result.value));
      ahead.size += result.value.length;
    }
  } catch (error) {
    ahead.error = error;
  }
  return ahead;
}

function isReadAhead(content: Content): content is ReadAhead {
  return content !== null && typeof content === "object" &&
    "reader" in content;
}

function aheadOf(stream: ReadableStream<Uint8Array>): ReadAhead {
  return {
    reader: stream.getReader(),
    chunks: [],
    size: 0,
    done: false,
    next: null,
  };
}

function cancel(content: ReadableStream<Uint8Array> | ReadAhead): void {
  const reader = content instanceof ReadableStream ? content : content.reader;
  reader.cancel().catch(() => {});
}

/** A Content-Length's value, or -1 when there is none or it is not digits. */
function lengthOf(value: string | null): number {
  return value !== null && /^\d{1,15}$/.test(value) ? Number(value) : -1;
}

/** A chunk of a response body, which the Fetch API wants as bytes. */
function chunkOf(value: unknown): Uint8Array {
  if (!(value instanceof Uint8Array)) {
    throw new TypeError("a response body chunk is not a Uint8Array");
  }
  return value;
}

const CRLF = encoder.encode("\r\n");
const LAST_CHUNK = encoder.encode("0\r\n\r\n");

/**
 * Sends a response stream as it yields: each chunk is written before the
 * next is asked for, so the stream is pulled no faster than the client
 * reads, and a stalled write is cut by the body timeout; compressed, each
 * chunk is flushed through the compressor, so that none waits in it. A
 * client that hangs up cancels the stream.
 */
async function pipe(
  server: ServerState,
  connection: Connection,
  ahead: ReadAhead,
  exchange: Exchange,
  chunked: boolean,
  coding: Coding | null,
): Promise<void> {
  const { reader } = ahead;
  const stop = () => reader.cancel().catch(() => {});
  const signal = exchange.signal!;
  signal.addEventListener("abort", stop, { once: true });
  connection.responding = true;
  const compressor = coding && new ChunkCompressor(coding);
  const send = (bytes: Uint8Array) => {
    if (bytes.length === 0) return;
    if (
      exchange.length >= 0 && exchange.sent + bytes.length > exchange.length
    ) {
      throw new Error("the response body is longer than announced");
    }
    if (chunked) {
      queue(connection, encoder.encode(`${bytes.length.toString(16)}\r\n`));
    }
    queue(connection, bytes);
    if (chunked) queue(connection, CRLF);
    exchange.sent += bytes.length;
  };
  try {
    if (ahead.size > 0) {
      const first = join(ahead.chunks, ahead.size);
      send(compressor ? await compressor.push(first) : first);
    }
    if (ahead.error !== undefined) throw ahead.error;
    let next = ahead.next;
    while (true) {
      await flush(server, connection).catch((error) => {
        // The client went away: its business, not an error of ours.
        connection.hangUp();
        throw error;
      });
      connection.state = BUSY;
      connection.deadline = Infinity;
      const { done, value } = await (next ?? reader.read());
      next = null;
      if (signal.aborted) throw new Error("the client went away");
      if (done) break;
      const chunk = chunkOf(value);
      send(compressor && chunk.length ? await compressor.push(chunk) : chunk);
    }
    if (compressor) send(await compressor.end());
    if (exchange.length >= 0 && exchange.sent !== exchange.length) {
      throw new Error("the response body is shorter than announced");
    }
    if (chunked) queue(connection, LAST_CHUNK);
  } catch (error) {
    await reader.cancel(error).catch(() => {});
    throw error;
  } finally {
    compressor?.close();
    connection.responding = false;
    signal.removeEventListener("abort", stop);
    if ((connection.batch?.length ?? 0) > MAX_KEPT_BATCH) {
      connection.batch = null;
    }
  }
}

// ---------------------------------------------------------------------------
// Compression (RFC 9110 §8.4): a transform of the body on its way out
// ---------------------------------------------------------------------------

/** The content codings the server compresses with, in its preference. */
type Coding = "br" | "gzip";

/** Brotli first: smaller than gzip at the settings below (see there). */
const CODINGS: readonly Coding[] = ["br", "gzip"];

/**
 * Content shorter than this goes as it is, a WebSocket message too: under
 * a packet's worth, compressing saves no round trip and costs CPU.
 */
const COMPRESS_FROM = 1024;

/**
 * Compression settings for bytes compressed as they are sent: gzip level 6
 * (zlib's default), and brotli quality 5, the lowest that beats it on size —
 * 3–8% smaller on JSON, HTML and JavaScript of 12–60 KB here, for 1.2–3×
 * its CPU; quality 4 came out no smaller than gzip, and 11, brotli's
 * default, takes ten times the CPU again for a few per cent more. A client
 * that prefers gzip says so with its weights.
 */
const GZIP_LEVEL = 6;
const BROTLI_QUALITY = 5;

/**
 * The content coding to compress a response with (RFC 9110 §8.4), or null:
 * when compression is on, the client accepts a coding (`accepted` is its
 * Accept-Encoding), and the content is worth it — a compressible type, not
 * coded already, not a part of a range, not marked no-transform (§7.7),
 * and not known to be short.
 */
function codingFor(
  server: ServerState,
  accepted: string | null,
  response: Response,
  length: number,
): Coding | null {
  if (!server.compression || accepted === null) return null;
  if (length >= 0 && length < COMPRESS_FROM) return null;
  const { headers, status } = response;
  if (
    status === 206 || headers.has("content-encoding") ||
    headers.has("content-range") ||
    !isCompressible(headers.get("content-type")) ||
    hasToken(headers.get("cache-control"), "no-transform")
  ) return null;
  return preferredCoding(accepted, CODINGS);
}

/**
 * The coding a client prefers among `available` (RFC 9110 §12.5.3): the
 * highest weight, the earlier of `available` at equal weights; `*` stands
 * for any coding not named, and a weight of 0 refuses. Without the field,
 * or with nothing acceptable, null: identity, which §12.5.3 allows (and
 * nginx does without the field).
 */
function preferredCoding(
  header: string | null,
  available: readonly Coding[],
): Coding | null {
  if (!header) return null;
  const weights = new Map<string, number>();
  for (const item of header.split(",")) {
    const [token, ...parameters] = item.split(";");
    let name = token.trim().toLowerCase();
    if (name === "x-gzip") name = "gzip"; // RFC 9110 §8.4.1.3
    let weight = 1;
    for (const parameter of parameters) {
      const q = /^\s*q\s*=\s*([01](?:\.\d{0,3})?)\s*$/i.exec(parameter);
      if (q) weight = Math.min(1, Number(q[1]));
    }
    if (name && !weights.has(name)) weights.set(name, weight);
  }
  let best: Coding | null = null;
  let bestWeight = 0;
  for (const coding of available) {
    const weight = weights.get(coding) ?? weights.get("*") ?? 0;
    if (weight > bestWeight) {
      best = coding;
      bestWeight = weight;
    }
  }
  return best;
}

/**
 * Media types worth compressing: text, and the formats that are text or
 * compress like it (JSON, XML and their `+json`/`+xml` kin, JavaScript,
 * WebAssembly, SVG, uncompressed fonts and images). The files' types
 * (FILE_TYPES) are judged by the same rule as a handler's.
 */
function isCompressible(contentType: string | null): boolean {
  if (contentType === null) return false;
  const type = contentType.split(";", 1)[0].trim().toLowerCase();
  return type.startsWith("text/") || type.endsWith("+json") ||
    type.endsWith("+xml") || COMPRESSIBLE_TYPES.has(type);
}

const COMPRESSIBLE_TYPES = new Set([
  "application/json",
  "application/javascript",
  "application/xml",
  "application/yaml",
  "application/wasm",
  "application/x-ndjson",
  "font/ttf",
  "font/otf",
  "image/bmp",
  "image/vnd.microsoft.icon",
]);

/** Bytes compressed whole, in one go. */
function compressWhole(bytes: Uint8Array, coding: Coding): Uint8Array {
  const out = coding === "br"
    ? zlib!.brotliCompressSync(bytes, {
      params: {
        [zlib!.constants.BROTLI_PARAM_QUALITY]: BROTLI_QUALITY,
        [zlib!.constants.BROTLI_PARAM_SIZE_HINT]: bytes.length,
      },
    })
    : zlib!.gzipSync(bytes, { level: GZIP_LEVEL });
  return new Uint8Array(out.buffer, out.byteOffset, out.length);
}

/**
 * A compressor for a stream, chunk by chunk: each chunk's bytes come out
 * flushed, so that what the client has decodes to all that was sent (a
 * Server-Sent Event is not held back in the compressor's window).
 */
class ChunkCompressor {
  #stream: ReturnType<Zlib["createGzip"] | Zlib["createBrotliCompress"]>;
  #flushKind: number;
  #out: Uint8Array[] = [];
  #size = 0;
  #ended: Promise<void>;

  constructor(coding: Coding) {
    const z = zlib!;
    this.#stream = coding === "br"
      ? z.createBrotliCompress({
        params: { [z.constants.BROTLI_PARAM_QUALITY]: BROTLI_QUALITY },
      })
      : z.createGzip({ level: GZIP_LEVEL });
    this.#flushKind = coding === "br"
      ? z.constants.BROTLI_OPERATION_FLUSH
      : z.constants.Z_SYNC_FLUSH;
    this.#stream.on("data", (chunk: Uint8Array) => {
      this.#out.push(chunk);
      this.#size += chunk.length;
    });
    this.#ended = new Promise((resolve, reject) => {
      this.#stream.once("end", resolve);
      this.#stream.once("error", reject);
    });
    this.#ended.catch(() => {});
  }

  /** The compressed bytes of `chunk`, flushed. */
  async push(chunk: Uint8Array): Promise<Uint8Array> {
    this.#stream.write(chunk);
    await new Promise<void>((resolve) =>
      this.#stream.flush(this.#flushKind, () => resolve())
    );
    return this.#take();
  }

  /** The last bytes: the end of the compressed stream. */
  async end(): Promise<Uint8Array> {
    this.#stream.end();
    await this.#ended;
    return this.#take();
  }

  close(): void {
    this.#stream.destroy();
  }

  #take(): Uint8Array {
    const bytes = join(this.#out, this.#size);
    this.#out = [];
    this.#size = 0;
    return bytes;
  }
}

/** Where a short body is encoded on its way into the response's bytes. */
const SCRATCH = new Uint8Array(64 * 1024);

/**
 * A string body: a short one as it is, encoded with the head in one go by
 * joinBytes(); a longer one as UTF-8 now, into a scratch buffer that
 * joinBytes() copies from at once when it fits — one allocation fewer.
 */
function textBody(text: string): string | Uint8Array {
  if (text.length <= MAX_TEXT_BODY) return text;
  if (text.length * 3 > SCRATCH.length) return encoder.encode(text);
  return SCRATCH.subarray(0, encoder.encodeInto(text, SCRATCH).written);
}

/** The longest string body encoded with its head (its length is counted). */
const MAX_TEXT_BODY = 1024;

/** How many bytes `text` takes in UTF-8, as TextEncoder writes it. */
function utf8Length(text: string): number {
  let length = text.length;
  for (let i = 0; i < text.length; i++) {
    const code = text.charCodeAt(i);
    if (code < 0x80) continue;
    if (code < 0x800) {
      length += 1;
    } else if (
      (code & 0xfc00) === 0xd800 &&
      (text.charCodeAt(i + 1) & 0xfc00) === 0xdc00
    ) {
      length += 2; // a surrogate pair: four bytes for two code units
      i++;
    } else {
      length += 2; // three bytes, a lone surrogate's U+FFFD too
    }
  }
  return length;
}

/** Where Deno keeps a body it holds whole, found once on a probe. */
const BODY_SLOTS = (() => {
  if (FETCH_ONLY) return { lazy: undefined, inner: undefined };
  const symbols = Object.getOwnPropertySymbols(new Response(""));
  const named = (name: string) =>
    symbols.find((symbol) => symbol.description === name);
  return { lazy: named("lazy static body"), inner: named("response") };
})();

interface InnerResponse {
  headerList?: [string, string][];
  body: {
    streamOrStatic?: unknown;
    length?: number | null;
  } | null;
}

/**
 * A response's fields as name and value pairs, in the order given. Where
 * Deno keeps them as a list, the list itself, once `headers` has made sure
 * it holds them all (a content type can wait there until asked for):
 * iterating `Headers` sorts and combines them anew for every response.
 */
function fieldsOf(response: Response): [string, string][] {
  const headers = response.headers;
  const inner = BODY_SLOTS.inner &&
    (response as unknown as Record<symbol, InnerResponse>)[BODY_SLOTS.inner];
  const list = inner?.headerList;
  return Array.isArray(list) ? list : [...headers];
}

/**
 * A response's content: null for none, a short text as it is, its bytes
 * when they are all there (a longer string, a `Uint8Array`,
 * `URLSearchParams`), or its stream — with the length in `exchange.length`
 * when known (a `Blob`, `FormData`), else -1. The Fetch API does not tell a
 * body held whole from a stream, so this looks where Deno keeps it; a body
 * it cannot tell goes as a stream of unknown length — chunked: still
 * correct, only framed differently.
 */
function contentOf(
  response: Response,
  exchange: Exchange,
): string | Uint8Array | ReadableStream<Uint8Array> | null {
  const slots = response as unknown as Record<symbol, unknown>;
  const lazy = BODY_SLOTS.lazy && slots[BODY_SLOTS.lazy];
  if (typeof lazy === "string") return textBody(lazy);
  const inner = BODY_SLOTS.inner &&
    slots[BODY_SLOTS.inner] as InnerResponse | undefined;
  const whole = inner?.body?.streamOrStatic as { body?: unknown } | undefined;
  if (whole && !(whole instanceof ReadableStream)) {
    if (whole.body instanceof Uint8Array) return whole.body;
    if (typeof whole.body === "string") return textBody(whole.body);
  }
  const length = inner?.body?.length;
  exchange.length = typeof length === "number" ? length : -1;
  return response.body;
}

/** Response bytes that stay valid until the second changes. */
class ResponseCache {
  #second = -1;
  #entries: (Uint8Array | null)[] = [];

  get(key: number, now: number): Uint8Array | null {
    const second = Math.floor(now / 1000);
    if (second !== this.#second) {
      this.#second = second;
      this.#entries = new Array(64).fill(null);
    }
    return this.#entries[key];
  }

  set(key: number, bytes: Uint8Array): Uint8Array {
    return this.#entries[key] = bytes;
  }
}

const MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(" ");

/** `format` of a time, worked out once a second. */
function perSecond(format: (time: Date) => string): (ms: number) => string {
  // The second `text` is for, as [from, to) in ms: two comparisons a call.
  let from = 0;
  let to = 0;
  let text = "";
  return (ms) => {
    if (ms < from || ms >= to) {
      from = Math.floor(ms / 1000) * 1000;
      to = from + 1000;
      text = format(new Date(from));
    }
    return text;
  };
}

/** The `Date` field value (RFC 9110 §5.6.7). */
const httpDate = perSecond((time) => time.toUTCString());

const two = (n: number) => String(n).padStart(2, "0");

/** Common Log Format's time: `10/Oct/2000:13:55:36 +0000`. */
const logTime = perSecond((time) =>
  `${two(time.getUTCDate())}/${MONTHS[time.getUTCMonth()]}/` +
  `${time.getUTCFullYear()}:${two(time.getUTCHours())}:` +
  `${two(time.getUTCMinutes())}:${two(time.getUTCSeconds())} +0000`
);

// ---------------------------------------------------------------------------
// Serving a directory (`--root DIR`, `serveFiles`)
//
// A request path is decoded and resolved to names under the root, the names
// are joined onto the root's real path, and the result is served only when
// its own real path (symbolic links resolved) is still inside the root. What
// was found for a path — and the bytes of small files — is kept for at most
// FILE_CACHE_TTL, so that a busy small site does not cost a disk access per
// request.
// ---------------------------------------------------------------------------

/** Options of {@linkcode serveFiles}. */
export interface ServeFilesOptions {
  /** The directory whose files are served; nothing outside it ever is. */
  root: string;
  /**
   * Answer a directory that has no `index.html` with an HTML listing of its
   * entries instead of a 404.
   * @default {false}
   */
  list?: boolean;
  /**
   * Serve files and directories whose name starts with `.`. Without it they
   * are 404s, except under `/.well-known/` (RFC 8615).
   * @default {false}
   */
  dotfiles?: boolean;
}

/** Bytes read from disk for one chunk of a streamed file. */
const FILE_CHUNK = 64 * 1024;
/** Files up to this size are read whole, and may be kept in memory. */
const SMALL_FILE = 64 * 1024;
/** The most bytes of file contents kept in memory, over all files. */
const FILE_CACHE_BYTES = 4 * 1024 * 1024;
/** The most paths whose lookup is remembered (found or not). */
const FILE_CACHE_ENTRIES = 4096;
/**
 * How long (ms) what was found for a path is trusted before the disk is asked
 * again: a file changed, added or removed is seen at most 1 s late, and until
 * then the old contents go out with their old validators.
 */
const FILE_CACHE_TTL = 1000;
/** The most roots whose real path is remembered. */
const FILE_ROOTS = 64;
/** The longest decoded path (in UTF-16 units) looked up on disk. */
const MAX_FILE_PATH = 4096;
/** The most ranges honoured in one request (RFC 9110 §14.3). */
const MAX_RANGES = 32;
/** The most entries shown in a directory listing. */
const MAX_LISTING = 10_000;

/** What a name must not contain once decoded: it would be another path. */
const PATH_SEPARATORS = Deno.build.os === "windows" ? /[/\\:\0]/ : /[/\\\0]/;
const FILE_SEPARATOR = Deno.build.os === "windows" ? "\\" : "/";

/**
 * Answers a GET or HEAD request with a file from the directory
 * `options.root`: `/` and any `/dir/` serve their `index.html`, a missing
 * file the root's `404.html` (or the built-in Oops page) with status 404.
 * It speaks conditional requests (ETag, Last-Modified), byte ranges, and
 * sends `file.br` or `file.gz` in place of `file` to a client that accepts
 * them. Nothing outside the root is served, however the path is spelled and
 * wherever symbolic links point. Other methods get a 405.
 *
 * It rejects only when the root is not a readable directory.
 *
 * @example Serve ./public on http://127.0.0.1:7878/
 * ```ts
 * serve((request) => serveFiles(request, { root: "./public" }));
 * ```
 *
 * @example Serve files under /static/, the book's pages elsewhere
 * ```ts
 * serve(async (request) => {
 *   const url = new URL(request.url);
 *   if (!url.pathname.startsWith("/static/")) return new Response("Hello!");
 *   url.pathname = url.pathname.slice("/static".length);
 *   return await serveFiles(new Request(url, request), { root: "./public" });
 * });
 * ```
 */
export async function serveFiles(
  request: Request,
  options: ServeFilesOptions,
): Promise<Response> {
  // RFC 9110 §15.5.6: a 405 lists the methods the resource supports.
  if (request.method !== "GET" && request.method !== "HEAD") {
    return statusReply(request, 405, { allow: "GET, HEAD" });
  }
  const root = await realRoot(options.root);
  const url = new URL(request.url);
  const path = parseFilePath(url.pathname);
  if (path === null) return statusReply(request, 400);
  const dotfiles = options.dotfiles ?? false;
  if (!dotfiles && isHidden(path.names)) return await notFound(request, root);

  const found = await locate(root, path.names);
  if (!isServable(found, dotfiles)) return await notFound(request, root);
  if (found.kind === "file") {
    // A file named like a directory (`/a.txt/`) is not there.
    if (path.directory) return await notFound(request, root);
    return await serveFile(request, root, path.names, found, dotfiles);
  }
  if (!path.directory) return redirectToDirectory(request, url, path.names);
  const indexNames = [...path.names, "index.html"];
  const index = await locate(root, indexNames);
  if (index.kind === "file" && isServable(index, dotfiles)) {
    return await serveFile(request, root, indexNames, index, dotfiles);
  }
  if (options.list) {
    return await listDirectory(request, root, path.names, found, dotfiles);
  }
  return await notFound(request, root);
}

// ---------------------------------------------------------------------------
// From a request path to names under the root
// ---------------------------------------------------------------------------

/** A request path, decoded into names, its dot segments resolved. */
interface FilePath {
  names: string[];
  /** The path ends with `/` (or a dot segment): it asks for a directory. */
  directory: boolean;
}

/**
 * Decodes a URL's path into names, one per segment: percent-decoded as UTF-8
 * (RFC 3986 §2.1, §2.5), `.` and `..` resolved without ever climbing above
 * the root (RFC 3986 §5.2.4), and empty segments (`//`) skipped. The URL
 * parser has already resolved the dot segments it saw; this resolves again
 * after decoding, so that no spelling of `..` survives.
 * @returns null when a segment is malformed — a bad escape, invalid UTF-8
 * (overlong forms included), a decoded separator or NUL — or the whole is
 * longer than MAX_FILE_PATH.
 */
function parseFilePath(pathname: string): FilePath | null {
  const names: string[] = [];
  let directory = false;
  let length = 0;
  for (const segment of pathname.split("/")) {
    let name: string;
    try {
      name = decodeURIComponent(segment);
    } catch {
      return null;
    }
    if (PATH_SEPARATORS.test(name)) return null;
    directory = name === "" || name === "." || name === "..";
    if (name === "..") names.pop();
    else if (!directory) names.push(name);
    length += name.length + 1;
  }
  if (length > MAX_FILE_PATH) return null;
  return { names, directory };
}

/** Whether a path has a dotfile or dot-directory, `/.well-known/` aside. */
function isHidden(names: string[]): boolean {
  return names.some((name, at) =>
    name.startsWith(".") && !(at === 0 && name === ".well-known")
  );
}

/** RFC 9110 §15.4.2: `/dir` → `/dir/`, the query kept. */
function redirectToDirectory(
  request: Request,
  url: URL,
  names: string[],
): Response {
  // Built from the decoded names, so that `//host` can never come out.
  const path = names.map((name) => `/${encodeURIComponent(name)}`).join("");
  const location = `${path}/${url.search}`;
  return statusReply(request, 301, { location });
}

// ---------------------------------------------------------------------------
// Looking paths up on disk, with a short-lived cache
// ---------------------------------------------------------------------------

/** A root's real path, and when it was found (`performance.now()`). */
interface KnownRoot {
  path: string;
  checked: number;
}

const fileRoots = new Map<string, KnownRoot>();

/**
 * The real path of a root, found again at most once per FILE_CACHE_TTL: a
 * root that is a symbolic link switched to a new release (an atomic deploy)
 * is followed within a second.
 */
async function realRoot(root: string): Promise<string> {
  const now = performance.now();
  const known = fileRoots.get(root);
  if (known && now - known.checked < FILE_CACHE_TTL) return known.path;
  let path: string;
  try {
    path = await Deno.realPath(root);
    if (!(await Deno.stat(path)).isDirectory) {
      throw new Error("not a directory");
    }
  } catch (error) {
    const message = `serveFiles: the root ${root} is not a readable directory`;
    throw new Error(message, { cause: error });
  }
  if (fileRoots.size >= FILE_ROOTS) fileRoots.clear();
  fileRoots.set(root, { path, checked: now });
  return path;
}

/** What was found for a path under a root, as of `checked`. */
interface FileEntry {
  key: string;
  /** "missing" also stands for outside the root, or not a file or directory. */
  kind: "file" | "directory" | "missing";
  /** The real path (symbolic links resolved). */
  path: string;
  /** The real path, relative to the root, has a hidden name in it. */
  hidden: boolean;
  size: number;
  /** The modification time, in milliseconds since the epoch. */
  mtime: number;
  ino: number | null;
  /** The contents of a small file, once read. */
  bytes: Uint8Array<ArrayBuffer> | null;
  checked: number;
}

/** The cache, least recently used first (a Map keeps insertion order). */
const fileCache = new Map<string, FileEntry>();
let fileCacheBytes = 0;

/** Whether an entry may be served with these options. */
function isServable(entry: FileEntry, dotfiles: boolean): boolean {
  return entry.kind !== "missing" && (dotfiles || !entry.hidden);
}

/** Looks up names under a root, through the cache. */
async function locate(root: string, names: string[]): Promise<FileEntry> {
  const key = `${root}\0${names.join("/")}`;
  const now = performance.now();
  const cached = fileCache.get(key);
  if (cached && now - cached.checked < FILE_CACHE_TTL) {
    // Most recently used: to the end.
    fileCache.delete(key);
    fileCache.set(key, cached);
    return cached;
  }
  const entry = await lookUp(root, names, key, now);
  // The same file, unchanged: the bytes read before are still its contents.
  if (cached?.bytes && isSameFile(cached, entry)) entry.bytes = cached.bytes;
  const replaced = fileCache.get(key);
  if (replaced?.bytes) fileCacheBytes -= replaced.bytes.length;
  fileCache.delete(key);
  fileCache.set(key, entry);
  if (entry.bytes) fileCacheBytes += entry.bytes.length;
  evictFiles();
  return entry;
}

/** Whether two looks at a path saw the same, unchanged file. */
function isSameFile(a: FileEntry, b: FileEntry): boolean {
  return a.kind === "file" && b.kind === "file" && a.path === b.path &&
    a.size === b.size && a.mtime === b.mtime && a.ino === b.ino;
}

/** Drops an entry from the cache. */
function forgetEntry(entry: FileEntry): void {
  if (fileCache.get(entry.key) !== entry) return;
  fileCache.delete(entry.key);
  if (entry.bytes) fileCacheBytes -= entry.bytes.length;
}

/** Drops the least recently used entries until the cache is within bounds. */
function evictFiles(): void {
  for (const [key, oldest] of fileCache) {
    if (
      fileCache.size <= FILE_CACHE_ENTRIES && fileCacheBytes <= FILE_CACHE_BYTES
    ) return;
    fileCache.delete(key);
    if (oldest.bytes) fileCacheBytes -= oldest.bytes.length;
  }
}

/**
 * Looks up names under a root on disk. Only a regular file or a directory
 * whose real path is inside the root is found: a symbolic link pointing out
 * of the root is as good as missing.
 */
async function lookUp(
  root: string,
  names: string[],
  key: string,
  now: number,
): Promise<FileEntry> {
  const entry: FileEntry = {
    key,
    kind: "missing",
    path: "",
    hidden: false,
    size: 0,
    mtime: 0,
    ino: null,
    bytes: null,
    checked: now,
  };
  try {
    const path = await Deno.realPath(joinPath(root, names));
    const relative = relativeToRoot(root, path);
    if (relative === null) return entry;
    const info = await Deno.stat(path);
    if (!info.isFile && !info.isDirectory) return entry;
    entry.kind = info.isFile ? "file" : "directory";
    entry.path = path;
    entry.hidden = isHidden(relative);
    entry.size = info.size;
    entry.mtime = info.mtime?.getTime() ?? 0;
    entry.ino = info.ino;
  } catch (error) {
    if (!isMissing(error)) throw error;
  }
  return entry;
}

/** Names under the root, as a file system path. */
function joinPath(root: string, names: string[]): string {
  if (names.length === 0) return root;
  const base = root.endsWith(FILE_SEPARATOR) ? root : root + FILE_SEPARATOR;
  return base + names.join(FILE_SEPARATOR);
}

/**
 * The names of a real path under a real root.
 * @returns null when the path is outside the root.
 */
function relativeToRoot(root: string, path: string): string[] | null {
  if (path === root) return [];
  const base = root.endsWith(FILE_SEPARATOR) ? root : root + FILE_SEPARATOR;
  if (!path.startsWith(base)) return null;
  return path.slice(base.length).split(FILE_SEPARATOR);
}

/** Whether a file system error means "there is nothing to serve here". */
function isMissing(error: unknown): boolean {
  return error instanceof Deno.errors.NotFound ||
    error instanceof Deno.errors.NotADirectory ||
    error instanceof Deno.errors.FilesystemLoop ||
    error instanceof Deno.errors.PermissionDenied ||
    error instanceof Deno.errors.NotCapable ||
    (error as { code?: string })?.code === "ENAMETOOLONG";
}

// ---------------------------------------------------------------------------
// Reading files
// ---------------------------------------------------------------------------

/** The validators of a file's contents. */
interface FileVersion {
  size: number;
  mtime: number;
  ino: number | null;
}

/**
 * A file ready to send: its contents in memory, or (for a big file) open
 * and owned by whoever holds this — they must close it.
 */
interface OpenedFile {
  version: FileVersion;
  bytes: Uint8Array<ArrayBuffer> | null;
  file: Deno.FsFile | null;
}

/**
 * Opens a found file. A small one is read whole (and kept, when its entry is
 * still cached); a big one is left open. The version is that of the open
 * file itself, so validators and contents always agree.
 */
async function openFile(entry: FileEntry): Promise<OpenedFile> {
  if (entry.bytes) return { version: entry, bytes: entry.bytes, file: null };
  const file = await Deno.open(entry.path);
  let owned = false;
  try {
    const info = await file.stat();
    const version = {
      size: info.size,
      mtime: info.mtime?.getTime() ?? 0,
      ino: info.ino,
    };
    if (!info.isFile) throw new Deno.errors.NotFound("no longer a file");
    if (version.size > SMALL_FILE) {
      owned = true;
      return { version, bytes: null, file };
    }
    const bytes = await readWhole(file, version.size);
    keepBytes(entry, version, bytes);
    return { version, bytes, file: null };
  } finally {
    if (!owned) file.close();
  }
}

/** Reads a file of a known size from its start. */
async function readWhole(
  file: Deno.FsFile,
  size: number,
): Promise<Uint8Array<ArrayBuffer>> {
  const bytes = new Uint8Array(size);
  let filled = 0;
  while (filled < size) {
    const read = await file.read(bytes.subarray(filled));
    if (read === null) throw new Error("the file shrank while it was read");
    filled += read;
  }
  return bytes;
}

/** Keeps a small file's contents in its entry, if that is still cached. */
function keepBytes(
  entry: FileEntry,
  version: FileVersion,
  bytes: Uint8Array<ArrayBuffer>,
): void {
  if (fileCache.get(entry.key) !== entry || entry.bytes) return;
  // The entry now describes what was read, even if the file changed since
  // it was looked up.
  entry.size = version.size;
  entry.mtime = version.mtime;
  entry.ino = version.ino;
  entry.bytes = bytes;
  fileCacheBytes += bytes.length;
  evictFiles();
}

/** A part of a response body: bytes, or a range [start, end) of the file. */
type FilePiece = Uint8Array<ArrayBuffer> | ByteRange;

/**
 * Streams pieces of an open file in chunks of at most FILE_CHUNK, reading
 * only when the consumer pulls (backpressure: one chunk is read ahead). The
 * file is closed at the end, on a read error (which errors the stream, so
 * only this response ends) and as soon as the consumer cancels.
 */
function streamFile(
  file: Deno.FsFile,
  pieces: FilePiece[],
): ReadableStream<Uint8Array<ArrayBuffer>> {
  let index = 0;
  let position = 0; // where the file's offset is
  let inPiece = false;
  let open = true;
  const close = () => {
    if (open) {
      open = false;
      file.close();
    }
  };
  const nextChunk = async (): Promise<Uint8Array<ArrayBuffer> | null> => {
    while (index < pieces.length) {
      const piece = pieces[index];
      if (piece instanceof Uint8Array) {
        index++;
        return piece;
      }
      if (!inPiece) {
        if (position !== piece.start) {
          await file.seek(piece.start, Deno.SeekMode.Start);
          position = piece.start;
        }
        inPiece = true;
      }
      if (position >= piece.end) {
        index++;
        inPiece = false;
        continue;
      }
      const chunk = new Uint8Array(Math.min(FILE_CHUNK, piece.end - position));
      const read = await file.read(chunk);
      if (read === null) throw new Error("the file shrank while it was sent");
      position += read;
      return read === chunk.length ? chunk : chunk.subarray(0, read);
    }
    return null;
  };
  return new ReadableStream<Uint8Array<ArrayBuffer>>({
    async pull(controller) {
      try {
        const chunk = await nextChunk();
        if (!open) return; // cancelled meanwhile
        if (chunk) return controller.enqueue(chunk);
        close();
        controller.close();
      } catch (error) {
        if (!open) return;
        close();
        controller.error(error);
      }
    },
    cancel: close,
  }, { highWaterMark: 1 });
}

/**
 * A body made of pieces of a file's contents. A stream takes the open file
 * over: it is no longer the caller's to close.
 */
function bodyOf(
  opened: OpenedFile,
  pieces: FilePiece[],
): Uint8Array<ArrayBuffer> | ReadableStream<Uint8Array<ArrayBuffer>> {
  if (opened.file) {
    const stream = streamFile(opened.file, pieces);
    opened.file = null;
    return stream;
  }
  const bytes = opened.bytes!;
  const parts = pieces.map((piece) =>
    piece instanceof Uint8Array ? piece : bytes.subarray(piece.start, piece.end)
  );
  if (parts.length === 1) return parts[0];
  const body = new Uint8Array(parts.reduce((sum, p) => sum + p.length, 0));
  let offset = 0;
  for (const part of parts) {
    body.set(part, offset);
    offset += part.length;
  }
  return body;
}

// ---------------------------------------------------------------------------
// Answering with a file
// ---------------------------------------------------------------------------

/**
 * Serves a found file, or the precompressed variant the client prefers:
 * validators (RFC 9110 §8.8), preconditions (§13) and ranges (§14).
 */
async function serveFile(
  request: Request,
  root: string,
  names: string[],
  found: FileEntry,
  dotfiles: boolean,
): Promise<Response> {
  const name = names[names.length - 1];
  const headers = new Headers({
    "content-type": contentTypeOf(name),
    "x-content-type-options": "nosniff",
    "accept-ranges": "bytes",
  });
  const variant = await chooseVariant(request, root, names, dotfiles);
  if (variant.vary) headers.set("vary", "Accept-Encoding");
  if (variant.coding) headers.set("content-encoding", variant.coding);
  let opened: OpenedFile;
  try {
    opened = await openFile(variant.entry ?? found);
  } catch (error) {
    if (!isMissing(error)) throw error;
    // Gone since it was looked up: look again next time.
    forgetEntry(variant.entry ?? found);
    return await notFound(request, root);
  }
  try {
    return answerWithFile(request, headers, opened, variant.coding !== null);
  } finally {
    // Unless a stream took it over, an open file is closed here: 304, 412,
    // 416 and HEAD never read it.
    opened.file?.close();
  }
}

/** The precompressed variant chosen for a request, if any. */
interface FileVariant {
  entry: FileEntry | null;
  coding: Coding | null;
  /** A variant exists, so the answer depends on Accept-Encoding. */
  vary: boolean;
}

/**
 * nginx's `gzip_static`: `file.br`, then `file.gz`, beside `file`, sent to a
 * client whose Accept-Encoding allows it (RFC 9110 §12.5.3).
 */
async function chooseVariant(
  request: Request,
  root: string,
  names: string[],
  dotfiles: boolean,
): Promise<FileVariant> {
  const withSuffix = (suffix: string) => [
    ...names.slice(0, -1),
    names[names.length - 1] + suffix,
  ];
  const [br, gz] = await Promise.all([
    locate(root, withSuffix(".br")),
    locate(root, withSuffix(".gz")),
  ]);
  const hasBr = br.kind === "file" && isServable(br, dotfiles);
  const hasGz = gz.kind === "file" && isServable(gz, dotfiles);
  const coding = preferredCoding(
    request.headers.get("accept-encoding"),
    CODINGS.filter((coding) => coding === "br" ? hasBr : hasGz),
  );
  if (coding) return { entry: coding === "br" ? br : gz, coding, vary: true };
  return { entry: null, coding: null, vary: hasBr || hasGz };
}

/** Builds the answer for an opened file; a stream takes over its file. */
function answerWithFile(
  request: Request,
  headers: Headers,
  opened: OpenedFile,
  encoded: boolean,
): Response {
  const { size } = opened.version;
  const etag = entityTagOf(opened.version);
  const modified = wholeSeconds(opened.version.mtime);
  headers.set("etag", etag);
  headers.set("last-modified", new Date(modified).toUTCString());

  const precondition = evaluatePreconditions(request.headers, etag, modified);
  if (precondition === 304) return notModified(headers);
  if (precondition === 412) return statusReply(request, 412);
  if (request.method === "HEAD") return fileReply(request, 200, headers, size);

  let ranges = requestedRanges(request, etag, modified, size);
  // Parts of a multipart body cannot carry a content coding: send it whole.
  if (encoded && ranges && ranges.length > 1) ranges = null;
  if (ranges === null) {
    const body = bodyOf(opened, [{ start: 0, end: size }]);
    return fileReply(request, 200, headers, size, body);
  }
  if (ranges.length === 0) {
    // RFC 9110 §15.5.17: say how long the representation is.
    return statusReply(request, 416, {
      "content-range": `bytes */${size}`,
      "accept-ranges": "bytes",
    });
  }
  if (ranges.length === 1) {
    const [range] = ranges;
    headers.set("content-range", contentRange(range, size));
    const length = range.end - range.start;
    return fileReply(request, 206, headers, length, bodyOf(opened, ranges));
  }
  return multipartReply(request, headers, opened, ranges);
}

/** RFC 9110 §8.8.3: a strong ETag, which changes with the file. */
function entityTagOf(version: FileVersion): string {
  const parts = [version.size, version.mtime];
  if (version.ino !== null) parts.push(version.ino);
  return `"${parts.map((part) => part.toString(16)).join("-")}"`;
}

/** HTTP dates have whole seconds (RFC 9110 §5.6.7). */
function wholeSeconds(milliseconds: number): number {
  return Math.floor(milliseconds / 1000) * 1000;
}

/**
 * RFC 9110 §15.4.5: a 304 carries the validators and Vary a 200 would have,
 * and no other representation metadata.
 */
function notModified(headers: Headers): Response {
  const kept = new Headers({ "etag": headers.get("etag")! });
  const vary = headers.get("vary");
  if (vary) kept.set("vary", vary);
  kept.set("x-content-type-options", "nosniff");
  return new Response(null, { status: 304, headers: kept });
}

// ---------------------------------------------------------------------------
// Preconditions (RFC 9110 §13)
// ---------------------------------------------------------------------------

/**
 * Evaluates the preconditions of a GET or HEAD in the order of RFC 9110
 * §13.2.2.
 * @returns 412, 304, or 0 to go on.
 */
function evaluatePreconditions(
  headers: Headers,
  etag: string,
  modified: number,
): number {
  // Step 1 (§13.1.1): If-Match, strong comparison.
  const ifMatch = headers.get("if-match");
  if (ifMatch !== null) {
    if (!matchesEntityTag(ifMatch, etag, true)) return 412;
  } else {
    // Step 2 (§13.1.4): If-Unmodified-Since, only without If-Match.
    const since = parseHttpDate(headers.get("if-unmodified-since"));
    if (since !== null && modified > since) return 412;
  }
  // Step 3 (§13.1.2): If-None-Match, weak comparison; a match is a 304 for
  // GET and HEAD.
  const ifNoneMatch = headers.get("if-none-match");
  if (ifNoneMatch !== null) {
    if (matchesEntityTag(ifNoneMatch, etag, false)) return 304;
  } else {
    // Step 4 (§13.1.3): If-Modified-Since, only without If-None-Match.
    const since = parseHttpDate(headers.get("if-modified-since"));
    if (since !== null && modified <= since) return 304;
  }
  return 0;
}

/**
 * Whether an If-Match or If-None-Match value (`*` or a list of entity-tags)
 * matches the current ETag (RFC 9110 §8.8.3.2): strongly, both must be
 * strong and equal; weakly, their opaque tags must be equal.
 */
function matchesEntityTag(
  value: string,
  etag: string,
  strong: boolean,
): boolean {
  if (value.trim() === "*") return true;
  const opaque = (tag: string) => tag.startsWith("W/") ? tag.slice(2) : tag;
  for (const tag of entityTags(value)) {
    if (strong ? tag === etag : opaque(tag) === opaque(etag)) return true;
  }
  return false;
}

/** The entity-tags of a list (RFC 9110 §8.8.3), up to a malformed one. */
function entityTags(value: string): string[] {
  const tags: string[] = [];
  const pattern = /[\s,]*((?:W\/)?"[^"]*")\s*(?:,|$)/y;
  let match: RegExpExecArray | null;
  while (pattern.lastIndex < value.length && (match = pattern.exec(value))) {
    tags.push(match[1]);
  }
  return tags;
}

const DATE_DAY = "(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)";
const DATE_CLOCK = String.raw`(\d\d):(\d\d):(\d\d)`;
/** `Sun, 06 Nov 1994 08:49:37 GMT` */
const IMF_FIXDATE = new RegExp(
  String.raw`^${DATE_DAY}, (\d\d) (\w{3}) (\d{4}) ${DATE_CLOCK} GMT$`,
);
/** `Sunday, 06-Nov-94 08:49:37 GMT` */
const RFC850_DATE = new RegExp(
  String.raw`^(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day, ` +
    String.raw`(\d\d)-(\w{3})-(\d\d) ${DATE_CLOCK} GMT$`,
);
/** `Sun Nov  6 08:49:37 1994` */
const ASCTIME_DATE = new RegExp(
  String.raw`^${DATE_DAY} (\w{3}) ([ \d]\d) ${DATE_CLOCK} (\d{4})$`,
);

/**
 * Parses an HTTP-date in any of its three forms (RFC 9110 §5.6.7).
 * @returns milliseconds since the epoch, or null for anything else (which
 * makes the condition that carried it ignored, §13.1.3).
 */
function parseHttpDate(value: string | null): number | null {
  if (value === null) return null;
  let day, month, year, hour, minute, second;
  let match = IMF_FIXDATE.exec(value);
  if (match) [, day, month, year, hour, minute, second] = match;
  else if ((match = RFC850_DATE.exec(value))) {
    [, day, month, year, hour, minute, second] = match;
    // Two-digit years: the nearest century that is not in the future.
    const thisYear = new Date().getUTCFullYear();
    const full = Math.floor(thisYear / 100) * 100 + Number(year);
    year = String(full > thisYear + 50 ? full - 100 : full);
  } else if ((match = ASCTIME_DATE.exec(value))) {
    [, month, day, hour, minute, second, year] = match;
  } else return null;
  const monthIndex = MONTHS.indexOf(month!);
  if (monthIndex < 0) return null;
  const time = Date.UTC(
    Number(year),
    monthIndex,
    Number(day),
    Number(hour),
    Number(minute),
    Number(second),
  );
  // Reject what Date.UTC would roll over (Feb 30, 25:00).
  const date = new Date(time);
  if (
    date.getUTCDate() !== Number(day) || date.getUTCHours() !== Number(hour) ||
    date.getUTCMinutes() !== Number(minute) ||
    date.getUTCSeconds() !== Number(second)
  ) return null;
  return time;
}

// ---------------------------------------------------------------------------
// Ranges (RFC 9110 §14)
// ---------------------------------------------------------------------------

/** A range of bytes: from `start` up to, not including, `end`. */
interface ByteRange {
  start: number;
  end: number;
}

/**
 * The ranges a GET asks for.
 * @returns null to send the whole file; an empty list when none can be
 * satisfied (a 416).
 */
function requestedRanges(
  request: Request,
  etag: string,
  modified: number,
  size: number,
): ByteRange[] | null {
  // §14.2: GET is the only method range requests are defined for.
  const header = request.headers.get("range");
  if (header === null || request.method !== "GET") return null;
  // §13.2.2 step 5, §13.1.5: If-Range decides between 206 and 200.
  const ifRange = request.headers.get("if-range");
  if (ifRange !== null && !ifRangeMatches(ifRange, etag, modified)) return null;
  return parseRanges(header, size);
}

/**
 * RFC 9110 §13.1.5: If-Range holds an entity-tag, compared strongly, or a
 * date, which must equal Last-Modified exactly.
 */
function ifRangeMatches(
  value: string,
  etag: string,
  modified: number,
): boolean {
  const validator = value.trim();
  if (validator.startsWith('"') || validator.startsWith("W/")) {
    return validator === etag;
  }
  return parseHttpDate(validator) === modified;
}

/**
 * Parses a Range field (RFC 9110 §14.1.2): `bytes=a-b`, `a-`, `-n`, in a
 * list. A malformed field is ignored (§14.2), and so is a set of ranges
 * bigger than the file or too many of them, which is an attack or a broken
 * client (§14.3).
 * @returns null to ignore the field; the satisfiable ranges otherwise.
 */
function parseRanges(header: string, size: number): ByteRange[] | null {
  const set = /^bytes=(.*)$/i.exec(header.trim());
  if (!set) return null;
  const specs = set[1].split(",").filter((spec) => spec.trim() !== "");
  if (specs.length === 0 || specs.length > MAX_RANGES) return null;
  const ranges: ByteRange[] = [];
  let total = 0;
  for (const spec of specs) {
    const range = /^\s*(\d*)-(\d*)\s*$/.exec(spec);
    if (!range || (range[1] === "" && range[2] === "")) return null;
    let start: number, end: number;
    if (range[1] === "") {
      // A suffix: the last n bytes.
      start = Math.max(0, size - Number(range[2]));
      end = size;
    } else {
      start = Number(range[1]);
      const last = range[2] === "" ? Infinity : Number(range[2]);
      if (last < start) return null;
      end = Math.min(last + 1, size);
    }
    // §14.1.1: unsatisfiable when it starts past the end (or is empty).
    if (start >= end) continue;
    ranges.push({ start, end });
    total += end - start;
  }
  if (total > size) return null;
  return ranges;
}

/** RFC 9110 §14.4: `bytes first-last/size`. */
function contentRange(range: ByteRange, size: number): string {
  return `bytes ${range.start}-${range.end - 1}/${size}`;
}

/**
 * RFC 9110 §14.6: several ranges go as `multipart/byteranges`, each part with
 * its own Content-Type and Content-Range.
 */
function multipartReply(
  request: Request,
  headers: Headers,
  opened: OpenedFile,
  ranges: ByteRange[],
): Response {
  const type = headers.get("content-type")!;
  const { size } = opened.version;
  const random = crypto.getRandomValues(new Uint8Array(12));
  const boundary = Array.from(
    random,
    (byte) => byte.toString(16).padStart(2, "0"),
  ).join("");
  const pieces: FilePiece[] = [];
  let length = 0;
  for (const range of ranges) {
    const head = encoder.encode(
      `${pieces.length ? "\r\n" : ""}--${boundary}\r\n` +
        `Content-Type: ${type}\r\n` +
        `Content-Range: ${contentRange(range, size)}\r\n\r\n`,
    );
    pieces.push(head, range);
    length += head.length + range.end - range.start;
  }
  const tail = encoder.encode(`\r\n--${boundary}--\r\n`);
  pieces.push(tail);
  length += tail.length;
  headers.set("content-type", `multipart/byteranges; boundary=${boundary}`);
  return fileReply(request, 206, headers, length, bodyOf(opened, pieces));
}

// ---------------------------------------------------------------------------
// Content types
// ---------------------------------------------------------------------------

const UTF8 = "; charset=utf-8";

/** Media types by extension (a Map: a file named `x.constructor` is safe). */
const FILE_TYPES = new Map<string, string>([
  ["html", "text/html" + UTF8],
  ["htm", "text/html" + UTF8],
  ["css", "text/css" + UTF8],
  ["js", "text/javascript" + UTF8],
  ["mjs", "text/javascript" + UTF8],
  ["cjs", "text/javascript" + UTF8],
  ["json", "application/json" + UTF8],
  ["map", "application/json" + UTF8],
  ["webmanifest", "application/manifest+json" + UTF8],
  ["txt", "text/plain" + UTF8],
  ["md", "text/markdown" + UTF8],
  ["csv", "text/csv" + UTF8],
  ["xml", "application/xml" + UTF8],
  ["rss", "application/rss+xml" + UTF8],
  ["atom", "application/atom+xml" + UTF8],
  ["ics", "text/calendar" + UTF8],
  ["vtt", "text/vtt" + UTF8],
  ["yaml", "application/yaml" + UTF8],
  ["yml", "application/yaml" + UTF8],
  ["svg", "image/svg+xml" + UTF8],
  ["png", "image/png"],
  ["apng", "image/apng"],
  ["jpg", "image/jpeg"],
  ["jpeg", "image/jpeg"],
  ["gif", "image/gif"],
  ["webp", "image/webp"],
  ["avif", "image/avif"],
  ["bmp", "image/bmp"],
  ["ico", "image/vnd.microsoft.icon"],
  ["woff", "font/woff"],
  ["woff2", "font/woff2"],
  ["ttf", "font/ttf"],
  ["otf", "font/otf"],
  ["wasm", "application/wasm"],
  ["pdf", "application/pdf"],
  ["mp4", "video/mp4"],
  ["webm", "video/webm"],
  ["ogv", "video/ogg"],
  ["mp3", "audio/mpeg"],
  ["m4a", "audio/mp4"],
  ["ogg", "audio/ogg"],
  ["opus", "audio/ogg"],
  ["oga", "audio/ogg"],
  ["wav", "audio/wav"],
  ["flac", "audio/flac"],
  ["zip", "application/zip"],
  ["gz", "application/gzip"],
  ["tgz", "application/gzip"],
  ["tar", "application/x-tar"],
]);

/** A file's Content-Type (RFC 9110 §8.3), from its extension. */
function contentTypeOf(name: string): string {
  const dot = name.lastIndexOf(".");
  if (dot <= 0) return "application/octet-stream";
  const extension = name.slice(dot + 1).toLowerCase();
  return FILE_TYPES.get(extension) ?? "application/octet-stream";
}

// ---------------------------------------------------------------------------
// Directory listings, 404s and short replies
// ---------------------------------------------------------------------------

/** One line of a directory listing. */
interface ListedEntry {
  name: string;
  directory: boolean;
  size: number;
  mtime: number;
}

/**
 * An HTML listing of a directory: names HTML-escaped, links percent-encoded,
 * directories first, then by name; hidden and out-of-root entries left out.
 */
async function listDirectory(
  request: Request,
  root: string,
  names: string[],
  directory: FileEntry,
  dotfiles: boolean,
): Promise<Response> {
  const listed: ListedEntry[] = [];
  for await (const item of Deno.readDir(directory.path)) {
    if (listed.length >= MAX_LISTING) break;
    if (!dotfiles && item.name.startsWith(".")) continue;
    // Uncached: a listing must not push hot files out of the cache.
    const entry = await lookUp(root, [...names, item.name], "", 0);
    if (!isServable(entry, dotfiles)) continue;
    listed.push({
      name: item.name,
      directory: entry.kind === "directory",
      size: entry.size,
      mtime: entry.mtime,
    });
  }
  listed.sort(compareListed);
  const page = encoder.encode(listingPage(names, listed));
  const headers = new Headers({
    "content-type": "text/html" + UTF8,
    "x-content-type-options": "nosniff",
  });
  return fileReply(request, 200, headers, page.length, page);
}

/** Directories first, then by name (in UTF-16 code unit order). */
function compareListed(a: ListedEntry, b: ListedEntry): number {
  if (a.directory !== b.directory) return a.directory ? -1 : 1;
  return a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
}

/** The HTML of a directory listing. */
function listingPage(names: string[], listed: ListedEntry[]): string {
  const title = escapeHtml(names.map((name) => `/${name}`).join("") + "/");
  const rows = listed.map((entry) => {
    const slash = entry.directory ? "/" : "";
    const href = encodeURIComponent(entry.name) + slash;
    const size = entry.directory ? "-" : String(entry.size);
    const date = new Date(entry.mtime).toISOString().slice(0, 19)
      .replace("T", " ");
    return `<tr><td><a href="${href}">${escapeHtml(entry.name)}${slash}</a>` +
      `</td><td>${size}</td><td>${date} UTC</td></tr>`;
  });
  if (names.length > 0) {
    rows.unshift(`<tr><td><a href="../">../</a></td><td></td><td></td></tr>`);
  }
  return `<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <title>Index of ${title}</title>
  </head>
  <body>
    <h1>Index of ${title}</h1>
    <table>
      <tr><th>Name</th><th>Size</th><th>Modified</th></tr>
      ${rows.join("\n      ")}
    </table>
  </body>
</html>
`;
}

const HTML_ESCAPES: Record<string, string> = {
  "&": "&amp;",
  "<": "&lt;",
  ">": "&gt;",
  '"': "&quot;",
  "'": "&#39;",
};

/** Escapes text for HTML content and quoted attribute values. */
function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (char) => HTML_ESCAPES[char]);
}

const BUILT_IN_NOT_FOUND = encoder.encode(NOT_FOUND_PAGE);

/**
 * A 404 whose body is the root's `404.html`, as GitHub Pages and Netlify do,
 * or else the built-in Oops page.
 */
async function notFound(request: Request, root: string): Promise<Response> {
  const headers = new Headers({
    "content-type": "text/html" + UTF8,
    "x-content-type-options": "nosniff",
  });
  const page = await locate(root, ["404.html"]);
  if (!isServable(page, false) || page.kind !== "file") {
    const body = BUILT_IN_NOT_FOUND;
    return fileReply(request, 404, headers, body.length, body);
  }
  let opened: OpenedFile;
  try {
    opened = await openFile(page);
  } catch (error) {
    if (!isMissing(error)) throw error;
    const body = BUILT_IN_NOT_FOUND;
    return fileReply(request, 404, headers, body.length, body);
  }
  try {
    const { size } = opened.version;
    if (request.method === "HEAD") {
      return fileReply(request, 404, headers, size);
    }
    const body = bodyOf(opened, [{ start: 0, end: size }]);
    return fileReply(request, 404, headers, size, body);
  } finally {
    opened.file?.close();
  }
}

/** A short plain-text reply, such as `405 Method Not Allowed`. */
function statusReply(
  request: Request,
  status: number,
  fields: Record<string, string> = {},
): Response {
  const body = encoder.encode(`${status} ${REASONS[status]}\n`);
  const headers = new Headers(fields);
  headers.set("content-type", "text/plain" + UTF8);
  headers.set("x-content-type-options", "nosniff");
  return fileReply(request, status, headers, body.length, body);
}

/**
 * A reply whose body is `length` bytes, said in Content-Length: a streamed
 * file then goes out framed by its length, not chunked, and a HEAD answer
 * has the same fields as GET's (RFC 9110 §9.3.2) without the body.
 */
function fileReply(
  request: Request,
  status: number,
  headers: Headers,
  length: number,
  body:
    | Uint8Array<ArrayBuffer>
    | ReadableStream<Uint8Array<ArrayBuffer>>
    | null = null,
): Response {
  headers.set("content-length", String(length));
  if (request.method === "HEAD") body = null;
  return new Response(body, { status, headers });
}

// ---------------------------------------------------------------------------
// WebSockets (RFC 6455): a 101 is the last HTTP response on a connection;
// from then on its bytes are frames. As `ws` splits it: a frame parser that
// is a pure function over bytes, one sender that writes, and a WebSocket-
// shaped object that only dispatches events. The connection loop still
// reads, the ticker still keeps the deadlines, the shutdown still closes.
// ---------------------------------------------------------------------------

/**
 * Options of {@linkcode upgradeWebSocket}: `Deno.upgradeWebSocket`'s, and
 * the limits. Those not given are the server's (`ws…` in
 * {@linkcode ServeOptions}).
 */
export interface UpgradeWebSocketOptions {
  /**
   * The subprotocol to accept (RFC 6455 §4.2.2), when the client offers it
   * in `Sec-WebSocket-Protocol`; one it did not offer is not sent, since
   * the client would fail the handshake.
   */
  protocol?: string;
  /**
   * Seconds without a frame from the client before the server pings it; a
   * client that then stays silent as long again is closed. 0 turns pings
   * off, as in Deno.
   * @default {30}
   */
  idleTimeout?: number;
  /** The largest message, in bytes once decompressed; larger ones close with 1009. @default {1048576} */
  maxMessage?: number;
  /** The bytes `send()` may queue for a client that reads nothing, before it is cut off. @default {16777216} */
  maxBuffered?: number;
}

/** What {@linkcode upgradeWebSocket} returns, as `Deno.upgradeWebSocket` does. */
export interface WebSocketUpgrade {
  /** The server's end of the connection: a WHATWG `WebSocket`, in shape. */
  socket: WebSocket;
  /** The `101 Switching Protocols` the handler must return. */
  response: Response;
}

/**
 * Accepts a request's WebSocket opening handshake (RFC 6455 §4.2): the
 * handler returns `response`, and once that is written the connection
 * carries `socket`'s messages. `Deno.upgradeWebSocket` does the same on
 * this server's requests, so an application written for `Deno.serve` needs
 * no change.
 *
 * Beyond Deno's, the socket negotiates permessage-deflate (RFC 7692) when
 * the client offers it, closes with 1009 past the largest message, cuts a
 * client that reads nothing past a bound, and sends close 1001 to every
 * open socket when the server shuts down.
 *
 * @example An echo server
 * ```ts
 * import { serve, upgradeWebSocket } from "./main.ts";
 * serve((request) => {
 *   if (request.headers.get("upgrade") !== "websocket") {
 *     return new Response("a WebSocket echo lives here");
 *   }
 *   const { socket, response } = upgradeWebSocket(request);
 *   socket.onmessage = (event) => socket.send(event.data);
 *   return response;
 * });
 * ```
 *
 * @param request A request this server handed to its handler.
 * @param options The subprotocol, and limits other than the server's.
 * @returns The socket, and the response to return.
 * @throws {TypeError} The request is not a valid opening handshake. A
 * handler that does not catch it has the request answered 400, or 426 with
 * `Sec-WebSocket-Version: 13` for another version, and the connection
 * stays HTTP.
 */
export function upgradeWebSocket(
  request: Request,
  options: UpgradeWebSocketOptions = {},
): WebSocketUpgrade {
  const offer = UPGRADES.get(request);
  if (!offer) {
    // Whoever made it, a request that asks for no upgrade is no handshake.
    if (!hasToken(request.headers.get("upgrade"), "websocket")) {
      throw new HandshakeError("'upgrade' must name websocket", 400);
    }
    throw new TypeError("upgradeWebSocket(): not a request of this server");
  }
  if (offer.exchange.session) {
    throw new TypeError("upgradeWebSocket(): the request is upgraded already");
  }
  const key = handshakeKey(request, offer);
  const settings = socketSettings(offer.server.limits, options);
  const headers = request.headers;
  const protocol = chooseProtocol(
    headers.get("sec-websocket-protocol"),
    options.protocol,
  );
  const deflate = offer.server.compression
    ? negotiateDeflate(headers.get("sec-websocket-extensions"))
    : null;
  const fields: [string, string][] = [
    ["upgrade", "websocket"],
    ["connection", "Upgrade"],
  ];
  if (protocol) fields.push(["sec-websocket-protocol", protocol]);
  if (deflate) fields.push(["sec-websocket-extensions", deflate.extension]);
  const response = switchingProtocols(new Headers(fields));
  const url = request.url.replace(/^http/, "ws");
  const session = new WebSocketSession(
    offer.server,
    offer.connection,
    settings,
    { key, url, protocol, deflate, response },
  );
  offer.exchange.session = session;
  return { socket: session.socket as unknown as WebSocket, response };
}

/** A request that asked to upgrade: where it came from. */
interface UpgradeOffer {
  server: ServerState;
  connection: Connection;
  exchange: Exchange;
  /** The request's minor HTTP version, and whether it has a body. */
  minor: number;
  bodiless: boolean;
}

/**
 * The requests with an `Upgrade` field this server made, so that an upgrade
 * finds its connection. Only those: no other request pays for an entry.
 */
const UPGRADES = new WeakMap<Request, UpgradeOffer>();

/** A handshake the server refuses: 400, or 426 for another version. */
class HandshakeError extends TypeError {
  constructor(message: string, readonly status: 400 | 426) {
    super(`upgradeWebSocket(): ${message}`);
  }
}

/**
 * The opening handshake's checks (RFC 6455 §4.2.1).
 * @returns The client's `Sec-WebSocket-Key`.
 */
function handshakeKey(request: Request, offer: UpgradeOffer): string {
  const headers = request.headers;
  if (request.method !== "GET") {
    throw new HandshakeError("the method must be GET", 400);
  }
  if (offer.minor < 1) {
    throw new HandshakeError("HTTP/1.1 or later is needed", 400);
  }
  if (!offer.bodiless) {
    throw new HandshakeError("an upgrade request has no body", 400);
  }
  if (!hasToken(headers.get("upgrade"), "websocket")) {
    throw new HandshakeError("'upgrade' must name websocket", 400);
  }
  if (!hasToken(headers.get("connection"), "upgrade")) {
    throw new HandshakeError("'connection' must name upgrade", 400);
  }
  // §4.2.2 item 4: another version is answered with the one we speak.
  if (headers.get("sec-websocket-version") !== "13") {
    throw new HandshakeError("'sec-websocket-version' must be 13", 426);
  }
  // §4.1: the key is 16 random bytes in base64.
  const key = headers.get("sec-websocket-key") ?? "";
  if (!/^[A-Za-z0-9+/]{21}[AQgw]==$/.test(key)) {
    throw new HandshakeError("'sec-websocket-key' must be 16 bytes", 400);
  }
  return key;
}

/** Whether a comma-separated list (RFC 9110 §5.6.1) has a token, in any case. */
function hasToken(value: string | null, token: string): boolean {
  if (value === null) return false;
  return value.split(",").some((item) => item.trim().toLowerCase() === token);
}

/** The answer to a refused handshake: the connection stays HTTP. */
function handshakeRefusal(error: HandshakeError): Response {
  const headers = new Headers({ "content-type": TEXT });
  if (error.status === 426) {
    // RFC 6455 §4.4; RFC 9110 §15.5.22 asks for Upgrade, and §7.8 for its
    // Connection option.
    headers.set("sec-websocket-version", "13");
    headers.set("upgrade", "websocket");
    headers.set("connection", "upgrade");
  }
  return new Response(`${error.status} ${REASONS[error.status]}\n`, {
    status: error.status,
    headers,
  });
}

/**
 * A response with status 101: the Fetch API allows no status below 200, so
 * it is made with 200 and, where Deno keeps its status, given 101 there.
 * Elsewhere it says 200, and is still known by who it is.
 */
function switchingProtocols(headers: Headers): Response {
  const response = new Response(null, { headers });
  const inner = BODY_SLOTS.inner &&
    (response as unknown as Record<symbol, { status?: number }>)[
      BODY_SLOTS.inner
    ];
  if (inner && inner.status === 200) inner.status = 101;
  return response;
}

/** The subprotocol to answer with: the one asked for, if the client offered it. */
function chooseProtocol(offered: string | null, wanted?: string): string {
  if (!wanted || offered === null) return "";
  // §4.1: subprotocol names are compared as they are, case and all.
  return offered.split(",").some((name) => name.trim() === wanted)
    ? wanted
    : "";
}

/** The limits of one socket, in ms and bytes. */
interface SocketSettings {
  idleTimeout: number;
  closeTimeout: number;
  maxMessage: number;
  maxBuffered: number;
}

/** The server's limits, with what the upgrade's options say instead. */
function socketSettings(
  limits: Limits,
  options: UpgradeWebSocketOptions,
): SocketSettings {
  const { idleTimeout, maxMessage, maxBuffered } = options;
  // Deno's own option turns pings off with 0; nothing else may be off.
  if (
    idleTimeout !== undefined &&
    !(Number.isFinite(idleTimeout) && idleTimeout >= 0)
  ) {
    throw new TypeError(
      `upgradeWebSocket(): idleTimeout must be a number of seconds, not ${
        Deno.inspect(idleTimeout)
      }`,
    );
  }
  for (
    const [name, value] of [["maxMessage", maxMessage], [
      "maxBuffered",
      maxBuffered,
    ]] as const
  ) {
    if (value !== undefined && !(Number.isSafeInteger(value) && value >= 1)) {
      throw new TypeError(
        `upgradeWebSocket(): ${name} must be a whole number above 0, not ${
          Deno.inspect(value)
        }`,
      );
    }
  }
  return {
    idleTimeout: (idleTimeout ?? limits.wsIdleTimeout) * 1000,
    closeTimeout: limits.wsCloseTimeout * 1000,
    maxMessage: maxMessage ?? limits.wsMaxMessage,
    maxBuffered: maxBuffered ?? limits.wsMaxBuffered,
  };
}

// ---------------------------------------------------------------------------
// permessage-deflate (RFC 7692)
// ---------------------------------------------------------------------------

/** What was agreed for permessage-deflate. */
interface Deflate {
  /** The `Sec-WebSocket-Extensions` value of the 101. */
  extension: string;
  /** The window the server may compress with (§7.1.2.1). */
  windowBits: number;
}

/**
 * The first permessage-deflate offer the server can accept (RFC 7692 §5,
 * §7.1), or null. The server answers that neither side keeps its window
 * between messages (§7.1.1): each message is compressed and decompressed
 * alone, so a socket holds no zlib state at all — the price is a poorer
 * ratio for runs of small, alike messages.
 */
function negotiateDeflate(header: string | null): Deflate | null {
  if (header === null) return null;
  for (const offer of header.split(",")) {
    const [name, ...parameters] = offer.split(";");
    if (name.trim().toLowerCase() !== "permessage-deflate") continue;
    const windowBits = deflateWindow(parameters);
    // zlib cannot keep to an 8-bit window (it makes it 9): decline (§5).
    if (windowBits < 9) continue;
    let extension =
      "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
    if (windowBits < 15) {
      extension += `; server_max_window_bits=${windowBits}`;
    }
    return { extension, windowBits };
  }
  return null;
}

/**
 * An offer's parameters (RFC 7692 §7.1): the server's window bits, or 0 to
 * decline an offer with an unknown, repeated or malformed one (§5.1).
 */
function deflateWindow(parameters: string[]): number {
  const seen = new Set<string>();
  let windowBits = 15;
  for (const parameter of parameters) {
    const [rawName, rawValue] = parameter.split("=");
    const name = rawName.trim().toLowerCase();
    // §7.1: a value may be quoted, and must then be digits all the same.
    const value = rawValue?.trim().replace(/^"(.*)"$/, "$1");
    if (seen.has(name)) return 0;
    seen.add(name);
    const bits = /^(?:8|9|1[0-5])$/.test(value ?? "") ? Number(value) : 0;
    switch (name) {
      case "server_no_context_takeover":
      case "client_no_context_takeover":
        if (value !== undefined) return 0;
        break;
      case "server_max_window_bits":
        if (!bits) return 0;
        windowBits = bits;
        break;
      case "client_max_window_bits":
        if (value !== undefined && !bits) return 0;
        break;
      default:
        return 0;
    }
  }
  return windowBits;
}

type Zlib = typeof import("node:zlib");

/**
 * `node:zlib`, loaded the first time a socket agrees to compress: it costs
 * a server that never does nothing (about 9 MB and 40 ms to load).
 */
let zlib: Zlib | null = null;
let zlibLoading: Promise<Zlib> | null = null;

function loadZlib(): Promise<Zlib> {
  return zlibLoading ??= import("node:zlib").then((module) => zlib = module);
}

/** What a sync flush ends with, and a sender leaves off (RFC 7692 §7.2.1). */
const DEFLATE_TAIL = new Uint8Array([0x00, 0x00, 0xff, 0xff]);

/** A message's payload, compressed, or null when that would not shrink it. */
function compress(payload: Uint8Array, deflate: Deflate): Uint8Array | null {
  if (!zlib || payload.length < COMPRESS_FROM) return null;
  const out = zlib.deflateRawSync(payload, {
    finishFlush: zlib.constants.Z_SYNC_FLUSH,
    windowBits: deflate.windowBits,
  });
  const size = out.length - DEFLATE_TAIL.length;
  if (size >= payload.length || !endsWith(out, DEFLATE_TAIL)) return null;
  return out.subarray(0, size);
}

/**
 * A compressed message's payload, inflated: its bytes, or the close code
 * it earns — 1009 past `max` bytes (a few KiB of deflate can claim
 * gigabytes), 1007 for data that is not deflate.
 */
function decompress(payload: Uint8Array, max: number): Uint8Array | number {
  const input = new Uint8Array(payload.length + DEFLATE_TAIL.length);
  input.set(payload);
  input.set(DEFLATE_TAIL, payload.length);
  try {
    const out = zlib!.inflateRawSync(input, {
      finishFlush: zlib!.constants.Z_SYNC_FLUSH,
      maxOutputLength: max + 1,
    });
    // A plain view: a Buffer's slice() would share its memory, not copy it.
    return out.length > max
      ? 1009
      : new Uint8Array(out.buffer, out.byteOffset, out.length);
  } catch (error) {
    const code = (error as { code?: string }).code;
    return code === "ERR_BUFFER_TOO_LARGE" ? 1009 : 1007;
  }
}

function endsWith(bytes: Uint8Array, tail: Uint8Array): boolean {
  const from = bytes.length - tail.length;
  return from >= 0 && tail.every((byte, i) => bytes[from + i] === byte);
}

// ---------------------------------------------------------------------------
// Frames (RFC 6455 §5): parsed like requests, a pure function over bytes
// ---------------------------------------------------------------------------

const OP_CONTINUATION = 0x0;
const OP_TEXT = 0x1;
const OP_BINARY = 0x2;
const OP_CLOSE = 0x8;
const OP_PING = 0x9;
const OP_PONG = 0xa;

/** A frame's head (RFC 6455 §5.2). One per socket, reused for every frame. */
export class FrameHead {
  /** The last frame of its message. */
  fin = false;
  /** RSV1: the message is compressed (RFC 7692 §6). */
  compressed = false;
  /** What the frame is: continuation, text, binary, close, ping or pong. */
  opcode = 0;
  /** The payload's length, in bytes. */
  length = 0;
  /** The masking key, as four bytes in order (§5.3). */
  mask0 = 0;
  /** The key's second byte. */
  mask1 = 0;
  /** The key's third byte. */
  mask2 = 0;
  /** The key's fourth byte. */
  mask3 = 0;
}

/** What the rules for the next frame depend on: the receiver's state. */
export interface FrameRules {
  /** permessage-deflate was agreed: RSV1 may mark a message compressed. */
  deflate: boolean;
  /** The opcode of the message in progress (text or binary), 0 between messages. */
  message: number;
  /** The bytes of the message in progress so far. */
  received: number;
  /** The message in progress is compressed. */
  compressed: boolean;
  /** The largest message allowed, in bytes. */
  maxMessage: number;
}

/**
 * Parses a frame's head from `buf[start, end)` into `frame`.
 *
 * @param buf The bytes received.
 * @param start Where the frame begins.
 * @param end Where the bytes end.
 * @param frame Receives the head.
 * @param rules The receiver's state that the frame must agree with.
 * @returns The bytes the head took (> 0; its payload follows),
 * {@linkcode INCOMPLETE} (0), or minus the close code the frame earns:
 * 1002 for a protocol error, 1009 for a message too big.
 */
export function parseFrameHead(
  buf: Uint8Array,
  start: number,
  end: number,
  frame: FrameHead,
  rules: FrameRules,
): number {
  if (end - start < 2) return INCOMPLETE;
  const first = buf[start];
  const second = buf[start + 1];
  const opcode = first & 0x0f;
  const fin = (first & 0x80) !== 0;
  const rsv1 = (first & 0x40) !== 0;
  // §5.2: reserved bits only with an extension that gives them a meaning.
  if (first & 0x30) return -1002;
  if (opcode >= OP_CLOSE) {
    // §5.5: control frames are never fragmented, never compressed (RFC 7692
    // §6.1), and the opcodes past pong are reserved.
    if (opcode > OP_PONG || !fin || rsv1) return -1002;
  } else {
    if (opcode > OP_BINARY) return -1002;
    // §5.4: a continuation continues a message; text or binary starts one.
    if ((opcode === OP_CONTINUATION) !== (rules.message !== 0)) return -1002;
    // RFC 7692 §6: RSV1 on the first frame of a message, once agreed.
    if (rsv1 && (!rules.deflate || opcode === OP_CONTINUATION)) return -1002;
  }
  // §5.1: a client masks every frame it sends.
  if (!(second & 0x80)) return -1002;
  let length = second & 0x7f;
  let p = start + 2;
  if (length === 126) {
    if (end - p < 2) return INCOMPLETE;
    length = buf[p] << 8 | buf[p + 1];
    p += 2;
  } else if (length === 127) {
    if (end - p < 8) return INCOMPLETE;
    // §5.2: the most significant bit must be 0.
    if (buf[p] & 0x80) return -1002;
    length = (buf[p] << 24 | buf[p + 1] << 16 | buf[p + 2] << 8 |
          buf[p + 3]) * 2 ** 32 +
      (buf[p + 4] << 24 | buf[p + 5] << 16 | buf[p + 6] << 8 | buf[p + 7]) +
      (buf[p + 4] & 0x80 ? 2 ** 32 : 0);
    p += 8;
  }
  // §5.5: a control frame's payload is at most 125 bytes.
  if (opcode >= OP_CLOSE) {
    if (length > 125) return -1002;
  } else {
    // §7.4.1: too big to process, said before a byte of it is read. The
    // limit is on the message as the application gets it; compressed, a
    // message that would not shrink grows a little (RFC 1951 §3.2.4), up to
    // an eighth in fixed Huffman codes: the inflated size is checked later.
    const compressed = opcode === OP_CONTINUATION ? rules.compressed : rsv1;
    const max = compressed
      ? rules.maxMessage + (rules.maxMessage >> 3) + 1024
      : rules.maxMessage;
    if (rules.received + length > max) return -1009;
  }
  if (end - p < 4) return INCOMPLETE;
  frame.fin = fin;
  frame.compressed = rsv1;
  frame.opcode = opcode;
  frame.length = length;
  frame.mask0 = buf[p];
  frame.mask1 = buf[p + 1];
  frame.mask2 = buf[p + 2];
  frame.mask3 = buf[p + 3];
  return p + 4 - start;
}

/**
 * Unmasks `buf[start, end)` in place (RFC 6455 §5.3), `phase` bytes into
 * the key: four bytes at a time where the buffer is aligned for it.
 */
export function unmask(
  buf: Uint8Array,
  start: number,
  end: number,
  frame: FrameHead,
  phase: number,
): void {
  let p = start;
  if (end - p >= WORDWISE) {
    while (((buf.byteOffset + p) & 3) !== 0) {
      buf[p++] ^= maskByte(frame, phase++);
    }
    // The key as a little-endian word, turned to where the aligned run starts.
    const words = (end - p) >> 2;
    const word = (maskByte(frame, phase) | maskByte(frame, phase + 1) << 8 |
      maskByte(frame, phase + 2) << 16 | maskByte(frame, phase + 3) << 24) >>>
      0;
    const view = new Uint32Array(buf.buffer, buf.byteOffset + p, words);
    for (let i = 0; i < words; i++) view[i] ^= word;
    p += words * 4;
  }
  while (p < end) buf[p++] ^= maskByte(frame, phase++);
}

/** Below this many bytes, a word view costs more than it saves. */
const WORDWISE = 64;

function maskByte(frame: FrameHead, phase: number): number {
  const at = phase & 3;
  return at === 0
    ? frame.mask0
    : at === 1
    ? frame.mask1
    : at === 2
    ? frame.mask2
    : frame.mask3;
}

/**
 * Whether a close code may travel in a close frame (RFC 6455 §7.4): those
 * defined (1004, 1005, 1006 and 1015 never do) and the registered and
 * private ranges.
 */
function isSendableCode(code: number): boolean {
  return (code >= 1000 && code <= 1014 && code !== 1004 && code !== 1005 &&
    code !== 1006) || (code >= 3000 && code <= 4999);
}

/** Text decoding that fails on invalid UTF-8 (§8.1) and keeps a BOM. */
const STRICT_UTF8 = { fatal: true, ignoreBOM: true };
const strictDecoder = new TextDecoder("utf-8", STRICT_UTF8);

/** The bytes of a text, or null when they are not UTF-8. */
function strictText(bytes: Uint8Array): string | null {
  try {
    return strictDecoder.decode(bytes);
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------
// The sender: the one writer of a socket's frames
// ---------------------------------------------------------------------------

/**
 * Frames a socket sends: each written into one batch as it is sent, and
 * the batch of one turn of the event loop leaves in one write, one write at
 * a time. `buffered` is the application's bytes not yet written:
 * `bufferedAmount`.
 */
class WebSocketSender {
  /** Application bytes sent and not yet written. */
  buffered = 0;
  /** A close frame is queued: no data frame may follow it (§5.5.1). */
  closing = false;
  /** The frames queued, one after another, are `#batch[0, #used)`. */
  #batch: Uint8Array | null = null;
  #used = 0;
  /** The last large batch written, kept for the next while the socket is busy. */
  #kept: Uint8Array | null = null;
  /** Whether the socket sent since the ticker last looked (see sweep()). */
  #sent = false;
  /** Application bytes in the batch. */
  #data = 0;
  /** A write is scheduled or under way. */
  #busy = false;
  #flush = () => this.#write();
  /** Sends waiting for a Blob's bytes, so that messages keep their order. */
  #order: Promise<void> | null = null;
  #drained: (() => void)[] = [];

  constructor(
    readonly connection: Connection,
    readonly deflate: Deflate | null,
  ) {}

  /** A text message (§5.6). */
  text(text: string): void {
    if (this.deflate === null && text.length <= MAX_TEXT_BODY) {
      const size = utf8Length(text);
      const at = this.#frame(OP_TEXT, size, false, size);
      encoder.encodeInto(text, this.#batch!.subarray(at, at + size));
      return;
    }
    this.message(OP_TEXT, encoder.encode(text));
  }

  /**
   * A text or binary message of these bytes, copied into the batch at once:
   * the caller may change them afterwards.
   */
  message(opcode: number, payload: Uint8Array): void {
    const compressed = this.deflate && compress(payload, this.deflate);
    const bytes = compressed || payload;
    const at = this.#frame(opcode, bytes.length, !!compressed, payload.length);
    this.#batch!.set(bytes, at);
  }

  /** A Blob's bytes are awaited: later sends wait their turn behind it. */
  get waiting(): boolean {
    return this.#order !== null;
  }

  /**
   * Sends `size` bytes once the sends before it are out: `send` runs then,
   * or once it resolves, when it waits for its bytes too (a Blob's).
   */
  inTurn(size: number, send: (() => void) | Promise<() => void>): void {
    this.buffered += size;
    if (send instanceof Promise) send.catch(() => {}); // handled in its turn
    const turn: Promise<void> = (this.#order ?? SETTLED).then(() => send)
      .then((now) => {
        this.buffered -= size;
        if (!this.closing) now();
      }, () => {
        this.buffered -= size;
      }).finally(() => {
        if (this.#order === turn) this.#order = null;
      });
    this.#order = turn;
  }

  ping(): void {
    this.#frame(OP_PING, 0, false, 0);
  }

  pong(payload: Uint8Array): void {
    const at = this.#frame(OP_PONG, payload.length, false, 0);
    this.#batch!.set(payload, at);
  }

  /** The close frame (§5.5.1): a code and a reason, or nothing at all. */
  close(code?: number, reason: Uint8Array = EMPTY): void {
    if (this.closing) return;
    const length = code === undefined ? 0 : 2 + reason.length;
    const at = this.#frame(OP_CLOSE, length, false, 0);
    if (code !== undefined) {
      const batch = this.#batch!;
      batch[at] = code >> 8;
      batch[at + 1] = code & 0xff;
      batch.set(reason, at + 2);
    }
    this.closing = true;
  }

  /**
   * The ticker's look: a socket that sent nothing since the last one gives
   * its kept batch back, so that an idle socket holds none.
   */
  sweep(): void {
    if (!this.#sent && this.#kept) {
      spare(this.#kept);
      this.#kept = null;
    }
    this.#sent = false;
  }

  /** Resolves when everything queued so far is written (or cannot be). */
  drained(): Promise<void> {
    if (!this.#busy) return Promise.resolve();
    return new Promise((resolve) => this.#drained.push(resolve));
  }

  /**
   * Writes a frame's head (§5.2: final, unmasked) at the end of the batch,
   * with room for `length` bytes of payload, `data` of them the
   * application's; the first frame of a turn schedules the write.
   * @returns Where in the batch the payload goes.
   */
  #frame(
    opcode: number,
    length: number,
    compressed: boolean,
    data: number,
  ): number {
    const head = length < 126 ? 2 : length < 65536 ? 4 : 10;
    const size = head + length;
    let batch = this.#batch;
    if (batch === null) {
      const kept = this.#kept;
      this.#kept = null;
      if (kept && kept.length >= size) {
        batch = this.#batch = kept;
      } else {
        if (kept) spare(kept);
        batch = this.#batch = batchFor(size);
      }
    } else if (this.#used + size > batch.length) {
      const larger = batchFor(Math.max(2 * batch.length, this.#used + size));
      larger.set(batch.subarray(0, this.#used));
      spare(batch);
      batch = this.#batch = larger;
    }
    const at = this.#used;
    batch[at] = 0x80 | (compressed ? 0x40 : 0) | opcode;
    if (head === 2) {
      batch[at + 1] = length;
    } else if (head === 4) {
      batch[at + 1] = 126;
      batch[at + 2] = length >> 8;
      batch[at + 3] = length & 0xff;
    } else {
      batch[at + 1] = 127;
      const high = Math.floor(length / 2 ** 32);
      for (let i = 0; i < 4; i++) {
        batch[at + 5 - i] = (high >>> (8 * i)) & 0xff;
        batch[at + 9 - i] = (length >>> (8 * i)) & 0xff;
      }
    }
    this.#used += size;
    this.#data += data;
    this.buffered += data;
    if (!this.#busy) {
      this.#busy = true;
      queueMicrotask(this.#flush);
    }
    return at + head;
  }

  async #write(): Promise<void> {
    try {
      while (this.#used > 0) {
        const batch = this.#batch!;
        const used = this.#used;
        const data = this.#data;
        this.#batch = null;
        this.#used = this.#data = 0;
        await writeAll(this.connection.stream, batch.subarray(0, used));
        this.buffered -= data;
        this.#sent = true;
        // A large batch is kept while the socket is busy: with many sockets
        // sending large messages at once, the shared ones run out.
        if (this.#kept === null && batch.length > SMALL_BATCH) {
          this.#kept = batch;
        } else {
          spare(batch);
        }
      }
    } catch {
      // The client is gone: the connection loop's read says so too.
      this.connection.close();
    } finally {
      this.#busy = false;
      for (const resolve of this.#drained.splice(0)) resolve();
    }
  }
}

/**
 * Batches of frames are written from buffers of two sizes, kept by a socket
 * while it is busy and else for the next socket that sends: an idle socket
 * holds none. Made anew for each batch, a buffer would be zeroed each time
 * (a quarter of the CPU of an echo of 16 KiB messages), and grown by
 * copying as large messages fill it.
 */
const SMALL_BATCH = 16 * 1024;
const LARGE_BATCH = 256 * 1024;
const SPARE_SMALL: Uint8Array[] = [];
const SPARE_LARGE: Uint8Array[] = [];
/** At most 4 MiB of each size is kept. */
const MAX_SPARE_SMALL = 256;
const MAX_SPARE_LARGE = 16;

/** A buffer with room for at least `size` bytes. */
function batchFor(size: number): Uint8Array {
  if (size <= SMALL_BATCH) {
    return SPARE_SMALL.pop() ?? new Uint8Array(SMALL_BATCH);
  }
  if (size <= LARGE_BATCH) {
    return SPARE_LARGE.pop() ?? new Uint8Array(LARGE_BATCH);
  }
  return new Uint8Array(size);
}

function spare(batch: Uint8Array): void {
  if (batch.length === SMALL_BATCH && SPARE_SMALL.length < MAX_SPARE_SMALL) {
    SPARE_SMALL.push(batch);
  } else if (
    batch.length === LARGE_BATCH && SPARE_LARGE.length < MAX_SPARE_LARGE
  ) SPARE_LARGE.push(batch);
}

/** Parts, one after another, in one array of `size` bytes. */
function join(parts: Uint8Array[], size: number): Uint8Array {
  if (parts.length === 1) return parts[0];
  const joined = new Uint8Array(size);
  let offset = 0;
  for (const part of parts) {
    joined.set(part, offset);
    offset += part.length;
  }
  return joined;
}

// ---------------------------------------------------------------------------
// A socket's session: the receiver's state, its deadlines, its events
// ---------------------------------------------------------------------------

const CONNECTING = 0;
const OPEN = 1;
const CLOSING = 2;
const CLOSED = 3;

/** What an upgrade agreed, for its session. */
interface Agreement {
  key: string;
  url: string;
  protocol: string;
  deflate: Deflate | null;
  response: Response;
}

/**
 * One upgraded connection: takes the frames the connection loop reads,
 * assembles messages (§5.4), answers pings, does the close handshake
 * (§7.1.2), and tells the socket what happened.
 */
class WebSocketSession {
  readyState = CONNECTING;
  readonly socket: ServerWebSocket;
  readonly sender: WebSocketSender;
  readonly frame = new FrameHead();
  readonly rules: FrameRules;
  /** The close frame received, once it is. */
  closeCode = 0;
  closeReason = "";
  /** Why the server failed the connection (§7.1.7), if it did. */
  failure = "";
  /** The bytes a frame that came in part needs in the read buffer, whole. */
  wanted = 0;
  /** Bytes of the current data frame's payload still to come, and the key's phase. */
  #left = 0;
  #phase = 0;
  #inFrame = false;
  /** The message's pieces so far, when it did not come whole. */
  #parts: Uint8Array[] = [];
  /** A text message's text so far, checked as it comes (§8.1). */
  #text = "";
  #decoder: TextDecoder | null = null;
  #pinged = false;

  constructor(
    readonly server: ServerState,
    readonly connection: Connection,
    readonly settings: SocketSettings,
    readonly agreed: Agreement,
  ) {
    this.sender = new WebSocketSender(connection, agreed.deflate);
    this.socket = new ServerWebSocket(this);
    this.rules = {
      deflate: agreed.deflate !== null,
      message: 0,
      received: 0,
      compressed: false,
      maxMessage: settings.maxMessage,
    };
    if (agreed.deflate) loadZlib();
  }

  /** The 101 is out: the connection is a WebSocket connection. */
  open(): void {
    this.heard();
    if (this.readyState !== CONNECTING) return; // closed before it opened
    this.readyState = OPEN;
    this.socket.dispatchEvent(new Event("open"));
  }

  /** Bytes came: the client is alive, and its idle time starts again. */
  heard(): void {
    if (this.sender.closing) return;
    this.#pinged = false;
    const idle = this.settings.idleTimeout;
    this.connection.deadline = idle > 0 ? this.server.now + idle : Infinity;
  }

  /**
   * Takes the frames in `buf[start, end)`: messages are dispatched, pings
   * answered, a close frame answered.
   * @returns The bytes consumed, or minus the close code the client earned.
   */
  receive(buf: Uint8Array, start: number, end: number): number {
    const { frame, rules } = this;
    let p = start;
    while (this.closeCode === 0) {
      if (!this.#inFrame) {
        const head = parseFrameHead(buf, p, end, frame, rules);
        if (head === INCOMPLETE) break;
        if (head < 0) return head;
        const payload = p + head;
        if (frame.opcode >= OP_CLOSE) {
          // A control frame acts on its whole payload (§5.5): wait for it.
          if (end - payload < frame.length) break;
          unmask(buf, payload, payload + frame.length, frame, 0);
          const code = this.#control(
            buf.subarray(payload, payload + frame.length),
          );
          if (code) return -code;
          p = payload + frame.length;
          continue;
        }
        // A frame that fits in the read buffer is waited for whole: taken
        // in pieces, its payload would be copied once more.
        if (
          end - payload < frame.length && head + frame.length <= BODY_BUFFER
        ) {
          this.wanted = head + frame.length;
          break;
        }
        p = payload;
        if (frame.opcode !== OP_CONTINUATION) {
          rules.message = frame.opcode;
          rules.compressed = frame.compressed;
        }
        if (
          frame.fin && frame.opcode !== OP_CONTINUATION &&
          end - p >= frame.length
        ) {
          // The usual case: a whole message in one frame, all here.
          unmask(buf, p, p + frame.length, frame, 0);
          const code = this.#finish(buf.subarray(p, p + frame.length));
          if (code) return -code;
          p += frame.length;
          continue;
        }
        this.#inFrame = true;
        this.#left = frame.length;
        this.#phase = 0;
      }
      const take = Math.min(this.#left, end - p);
      if (take === 0 && this.#left > 0) break;
      unmask(buf, p, p + take, frame, this.#phase);
      this.#phase = (this.#phase + take) & 3;
      const code = this.#append(buf.subarray(p, p + take));
      if (code) return -code;
      p += take;
      this.#left -= take;
      if (this.#left === 0) {
        this.#inFrame = false;
        if (frame.fin) {
          const code = this.#finish(null);
          if (code) return -code;
        }
      }
    }
    return p - start;
  }

  /** A piece of a message that did not come whole: kept, and text checked. */
  #append(piece: Uint8Array): number {
    this.rules.received += piece.length;
    if (this.rules.message === OP_TEXT && !this.rules.compressed) {
      try {
        this.#decoder ??= new TextDecoder("utf-8", STRICT_UTF8);
        // §8.1: invalid UTF-8 fails the connection as soon as it is seen.
        this.#text += this.#decoder.decode(piece, { stream: true });
      } catch {
        return 1007;
      }
    } else if (piece.length > 0) {
      this.#parts.push(piece.slice());
    }
    return 0;
  }

  /**
   * The message is complete: `whole` is all of it, or it is in `#parts`.
   * @returns 0, or the close code it earned.
   */
  #finish(whole: Uint8Array | null): number {
    const { rules } = this;
    const { message: opcode, compressed } = rules;
    let bytes = whole;
    let text: string | null = null;
    if (whole === null && opcode === OP_TEXT && !compressed) {
      try {
        text = this.#text + this.#decoder!.decode();
      } catch {
        return 1007; // it ended inside a character
      }
    } else if (whole === null) {
      bytes = join(this.#parts, rules.received);
    }
    this.#parts = [];
    this.#text = "";
    rules.message = rules.received = 0;
    if (compressed) {
      const inflated = decompress(bytes!, rules.maxMessage);
      if (typeof inflated === "number") return inflated;
      bytes = inflated;
    }
    if (opcode === OP_TEXT && text === null) {
      text = strictText(bytes!);
      if (text === null) return 1007;
    }
    // Only an open socket delivers (WHATWG: a closing one drops messages).
    if (this.readyState !== OPEN) return 0;
    this.socket.dispatchEvent(
      new MessageEvent("message", {
        data: text ??
          this.socket.binaryData(bytes!, whole !== null && !compressed),
      }),
    );
    return 0;
  }

  /** A ping, pong or close frame's whole payload (§5.5). */
  #control(payload: Uint8Array): number {
    switch (this.frame.opcode) {
      case OP_PING:
        if (!this.sender.closing) this.sender.pong(payload);
        return 0;
      case OP_PONG:
        return 0;
    }
    // §5.5.1: a close frame has nothing, or a code and a UTF-8 reason.
    if (payload.length === 1) return 1002;
    const code = payload.length === 0 ? 1005 : payload[0] << 8 | payload[1];
    if (payload.length > 0 && !isSendableCode(code)) return 1002;
    const reason = strictText(payload.subarray(2));
    if (reason === null) return 1007;
    this.closeCode = code;
    this.closeReason = reason;
    // §5.5.1: the answer echoes the code (none for none), and, as Deno's
    // sockets do, the reason; unless it is the answer to ours.
    this.close(code === 1005 ? undefined : code, payload.subarray(2).slice());
    return 0;
  }

  /**
   * Starts the closing handshake (§7.1.2): the close frame, then the
   * client's answer awaited until the close timeout.
   */
  close(code?: number, reason?: Uint8Array): void {
    if (this.readyState === CLOSED || this.sender.closing) return;
    this.readyState = CLOSING;
    this.sender.close(code, reason);
    this.connection.deadline = this.server.now + this.settings.closeTimeout;
  }

  /**
   * The server fails the connection (§7.1.7): the close frame with the
   * code, if none was sent yet; the connection then closes.
   */
  fail(code: number, why: string): void {
    this.failure ||= why;
    this.close(code);
  }

  /** The ticker found the deadline passed: ping, or give up on the client. */
  expire(): void {
    const { connection } = this;
    if (this.sender.closing) {
      connection.close(); // the closing handshake did not finish in time
    } else if (!this.#pinged) {
      this.#pinged = true;
      this.sender.ping();
      connection.deadline = this.server.now + this.settings.idleTimeout;
      if (connection.isSilent()) shrink(connection);
    } else {
      // No answer to the ping: going away (1001), and cut once that is out.
      this.fail(1001, "the client answered no ping");
      this.sender.drained().then(() => connection.close());
    }
  }

  /** `send()` queued past the bound for a client that reads nothing. */
  overflowed(): void {
    this.failure ||= "the client read too slowly: " +
      `more than ${this.settings.maxBuffered} bytes were queued`;
    this.readyState = CLOSING;
    this.connection.close();
  }

  /**
   * The connection is closed: the socket is too (WHATWG "the WebSocket
   * connection is closed"), cleanly only after both close frames.
   */
  closed(): void {
    if (this.readyState === CLOSED) return;
    this.readyState = CLOSED;
    const wasClean = this.closeCode !== 0 && this.sender.closing &&
      !this.failure;
    if (this.failure) {
      this.socket.dispatchEvent(
        new ErrorEvent("error", { message: this.failure }),
      );
    }
    this.socket.dispatchEvent(
      new CloseEvent("close", {
        code: this.closeCode || 1006,
        reason: this.closeReason,
        wasClean,
      }),
    );
  }
}

/**
 * Serves an upgraded connection until it closes: read, take the frames,
 * read again. A frame that breaks the rules fails the connection with its
 * close code; the client's close frame ends it cleanly.
 */
async function serveWebSocket(
  server: ServerState,
  connection: Connection,
  session: WebSocketSession,
): Promise<void> {
  connection.state = SOCKET;
  try {
    if (session.agreed.deflate) await loadZlib();
    session.open();
    // Upgraded while the server shuts down: it goes as the others went.
    if (server.closing) session.close(1001);
    let verdict: number;
    while (true) {
      verdict = session.receive(
        connection.buffer,
        connection.start,
        connection.end,
      );
      if (verdict < 0 || session.closeCode) break;
      connection.start += verdict;
      if (session.wanted > 0) roomFor(connection, session.wanted);
      session.wanted = 0;
      const count = await (connection.watch ??
        connection.stream.read(makeRoom(connection, BODY_BUFFER)));
      connection.watch = null;
      if (!received(connection, count)) return;
      session.heard();
    }
    if (verdict < 0) {
      session.fail(-verdict, `the client broke the protocol (${-verdict})`);
    }
    // §7.1.1: the server closes the TCP connection first, once its close
    // frame is out; lingering keeps unread bytes from resetting it. The
    // socket is closed for the application already: nothing more can come.
    await session.sender.drained();
    session.closed();
    await linger(server, connection);
  } finally {
    session.closed();
  }
}

/** Makes the read buffer hold `wanted` bytes from where the unread ones start. */
function roomFor(connection: Connection, wanted: number): void {
  const { buffer, start, end } = connection;
  if (buffer.length - start >= wanted) return;
  if (buffer.length >= wanted) {
    buffer.copyWithin(0, start, end);
  } else {
    connection.buffer = new Uint8Array(wanted);
    connection.buffer.set(buffer.subarray(start, end));
  }
  connection.start = 0;
  connection.end = end - start;
}

/**
 * Writes the 101 that accepts an upgrade (RFC 6455 §4.2.2), with the
 * handler's other fields, and logs it.
 */
async function acceptUpgrade(
  server: ServerState,
  connection: Connection,
  session: WebSocketSession,
  response: Response,
  line: string,
  began: number,
): Promise<void> {
  const { key, protocol, deflate } = session.agreed;
  const digest = await crypto.subtle.digest(
    "SHA-1",
    encoder.encode(key + WEBSOCKET_GUID),
  );
  let head = "HTTP/1.1 101 Switching Protocols\r\n";
  for (const [name, value] of fieldsOf(response)) {
    if (!HANDSHAKE_FIELDS.has(name.toLowerCase())) {
      head += `${name}: ${value}\r\n`;
    }
  }
  head += "Upgrade: websocket\r\nConnection: Upgrade\r\n" +
    `Sec-WebSocket-Accept: ${
      btoa(String.fromCharCode(...new Uint8Array(digest)))
    }\r\n`;
  if (protocol) head += `Sec-WebSocket-Protocol: ${protocol}\r\n`;
  if (deflate) head += `Sec-WebSocket-Extensions: ${deflate.extension}\r\n`;
  queue(connection, joinBytes(head + "\r\n", EMPTY));
  server.log?.write(connection, line, 101, 0, began);
  await flush(server, connection);
}

/** RFC 6455 §1.3: what the key is hashed with. */
const WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/** The 101's fields the server writes itself, whatever the response says. */
const HANDSHAKE_FIELDS = new Set([
  "upgrade",
  "connection",
  "sec-websocket-accept",
  "sec-websocket-protocol",
  "sec-websocket-extensions",
  "content-length",
  "transfer-encoding",
  "keep-alive",
]);

// ---------------------------------------------------------------------------
// The socket the application holds: the WHATWG WebSocket, in shape
// ---------------------------------------------------------------------------

type EventHandler = ((event: Event) => void) | null;

/**
 * The server's end of a WebSocket, as the WHATWG `WebSocket` is the
 * client's: events, `send()`, `close()`, `bufferedAmount`. It only
 * dispatches and delegates; the session does the work.
 */
class ServerWebSocket extends EventTarget {
  static readonly CONNECTING = CONNECTING;
  static readonly OPEN = OPEN;
  static readonly CLOSING = CLOSING;
  static readonly CLOSED = CLOSED;
  declare readonly CONNECTING: 0;
  declare readonly OPEN: 1;
  declare readonly CLOSING: 2;
  declare readonly CLOSED: 3;
  #session: WebSocketSession;
  #binaryType: BinaryType = "arraybuffer";
  #handlers: Record<string, EventHandler> | null = null;

  constructor(session: WebSocketSession) {
    super();
    this.#session = session;
  }

  /** The URL the client asked for, as `ws:` or `wss:`. */
  get url(): string {
    return this.#session.agreed.url;
  }

  /** The subprotocol agreed, or "". */
  get protocol(): string {
    return this.#session.agreed.protocol;
  }

  /** The extensions agreed (`permessage-deflate; …`), or "". */
  get extensions(): string {
    return this.#session.agreed.deflate?.extension ?? "";
  }

  /** 0 connecting, 1 open, 2 closing, 3 closed. */
  get readyState(): number {
    return this.#session.readyState;
  }

  /** Bytes given to `send()` and not yet written to the connection. */
  get bufferedAmount(): number {
    return this.#session.sender.buffered;
  }

  /**
   * How binary messages arrive: "arraybuffer" (the default, as on Deno's
   * server sockets) or "blob".
   */
  get binaryType(): BinaryType {
    return this.#binaryType;
  }

  set binaryType(type: BinaryType) {
    // A WebIDL enumeration: any other value is ignored.
    if (type === "arraybuffer" || type === "blob") this.#binaryType = type;
  }

  /** A binary message's data as the binary type asks (its bytes are a view to copy when `shared`). */
  binaryData(bytes: Uint8Array, shared: boolean): ArrayBuffer | Blob {
    if (this.#binaryType === "blob") return new Blob([bytes as BufferSource]);
    if (
      !shared && bytes.byteOffset === 0 &&
      bytes.byteLength === bytes.buffer.byteLength
    ) {
      return bytes.buffer as ArrayBuffer;
    }
    return bytes.slice().buffer;
  }

  /**
   * Sends a message: a string as text, binary data (a copy of it, taken
   * now) as binary. While closing or closed it only counts toward
   * `bufferedAmount`, as the standard says.
   * @throws {DOMException} InvalidStateError before the socket is open.
   */
  send(data: string | ArrayBufferLike | ArrayBufferView | Blob): void {
    const session = this.#session;
    if (session.readyState === CONNECTING) {
      throw new DOMException("the socket is not open yet", "InvalidStateError");
    }
    const sender = session.sender;
    if (session.readyState !== OPEN || sender.closing) {
      sender.buffered += sizeOf(data);
    } else if (data instanceof Blob) {
      sender.inTurn(
        data.size,
        data.arrayBuffer().then((bytes) => () =>
          sender.message(OP_BINARY, new Uint8Array(bytes))
        ),
      );
    } else if (sender.waiting) {
      // It waits: its bytes as they are now.
      const now = typeof data === "string" ? data : bytesOf(data).slice();
      sender.inTurn(sizeOf(data), () => sendNow(sender, now));
    } else {
      sendNow(sender, data);
    }
    if (sender.buffered > session.settings.maxBuffered) session.overflowed();
  }

  /**
   * Starts the closing handshake.
   * @throws {DOMException} InvalidAccessError for a code other than 1000
   * or 3000–4999; SyntaxError for a reason over 123 bytes.
   */
  close(code?: number, reason?: string): void {
    if (code !== undefined) {
      code = Math.trunc(Number(code)) & 0xffff;
      if (code !== 1000 && (code < 3000 || code > 4999)) {
        throw new DOMException(
          `close code ${code} is not 1000 or 3000-4999`,
          "InvalidAccessError",
        );
      }
    }
    const bytes = reason === undefined ? EMPTY : encoder.encode(reason);
    if (bytes.length > 123) {
      throw new DOMException(
        "the close reason is over 123 bytes",
        "SyntaxError",
      );
    }
    this.#session.close(code ?? (bytes.length > 0 ? 1000 : undefined), bytes);
  }

  get onopen(): EventHandler {
    return this.#handler("open");
  }
  set onopen(listener: EventHandler) {
    this.#setHandler("open", listener);
  }
  get onmessage(): EventHandler {
    return this.#handler("message");
  }
  set onmessage(listener: EventHandler) {
    this.#setHandler("message", listener);
  }
  get onclose(): EventHandler {
    return this.#handler("close");
  }
  set onclose(listener: EventHandler) {
    this.#setHandler("close", listener);
  }
  get onerror(): EventHandler {
    return this.#handler("error");
  }
  set onerror(listener: EventHandler) {
    this.#setHandler("error", listener);
  }

  #handler(type: string): EventHandler {
    return this.#handlers?.[type] ?? null;
  }

  /**
   * An event handler attribute (HTML §8.1.8.1): one listener, added when
   * it is first set, that calls whatever the attribute holds then.
   */
  #setHandler(type: string, listener: EventHandler): void {
    const handlers = this.#handlers ??= {};
    if (!(type in handlers)) {
      this.addEventListener(type, (event) => handlers[type]?.call(this, event));
    }
    handlers[type] = typeof listener === "function" ? listener : null;
  }
}

for (
  const [name, value] of Object.entries({ CONNECTING, OPEN, CLOSING, CLOSED })
) {
  Object.defineProperty(ServerWebSocket.prototype, name, {
    value,
    enumerable: true,
  });
}

function sendNow(
  sender: WebSocketSender,
  data: string | ArrayBufferLike | ArrayBufferView,
): void {
  if (typeof data === "string") sender.text(data);
  else sender.message(OP_BINARY, bytesOf(data));
}

/** The bytes a message will take: UTF-8 for a string. */
function sizeOf(
  data: string | ArrayBufferLike | ArrayBufferView | Blob,
): number {
  if (typeof data === "string") return utf8Length(data);
  if (data instanceof Blob) return data.size;
  return data.byteLength;
}

/** Binary data's bytes, in place. */
function bytesOf(data: ArrayBufferLike | ArrayBufferView): Uint8Array {
  return ArrayBuffer.isView(data)
    ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
    : new Uint8Array(data);
}

/**
 * Makes `Deno.upgradeWebSocket` upgrade this server's requests too, so that
 * an application written for `Deno.serve` — Hono's `hono/deno` helper among
 * them — runs unchanged: a request of this server goes to
 * upgradeWebSocket(), any other to Deno's own, as before.
 */
function adoptDenoUpgrade(): void {
  const own = Deno.upgradeWebSocket as typeof Deno.upgradeWebSocket & {
    [ADOPTED]?: true;
  };
  if (typeof own !== "function" || own[ADOPTED]) return;
  const upgrade = Object.assign(
    (request: Request, options?: Deno.UpgradeWebSocketOptions) =>
      UPGRADES.has(request)
        ? upgradeWebSocket(request, options)
        : own(request, options),
    { [ADOPTED]: true as const },
  );
  try {
    Object.defineProperty(Deno, "upgradeWebSocket", {
      value: upgrade,
      writable: true,
      configurable: true,
    });
  } catch {
    // A Deno that will not have it: upgradeWebSocket() from here still works.
  }
}

const ADOPTED = Symbol("hello-server upgradeWebSocket");

// ---------------------------------------------------------------------------
// The access log: Common Log Format, buffered
// ---------------------------------------------------------------------------

/**
 * Collects log lines, as bytes, and writes them in batches, one write at a
 * time. A line that repeats the one before (a busy client asking for the
 * same thing within a second) is only counted, and its copies are made in
 * bulk when the batch is written. If stdout blocks, lines wait in memory up
 * to a bound, then are counted and dropped: a stuck log must not take the
 * server down with it.
 */
class AccessLog {
  /** The lines not yet written are `#buffer[0, #used)`... */
  #buffer = new Uint8Array(2 * LOG_BATCH);
  #used = 0;
  /** ...then `#repeats` more copies of the last line, made by settle(). */
  #repeats = 0;
  /** The last line and what it was made of. */
  #last = { bytes: EMPTY, remote: "", time: "", line: "", status: 0, sent: 0 };
  /** The other buffer, while it is not being written. */
  #spare: Uint8Array<ArrayBuffer> | null = null;
  #writing: Promise<void> | null = null;
  #dropped = 0;

  constructor(readonly sink: true | ((lines: string) => void)) {}

  /** Logs one response: `host - - [time] "request line" status bytes`. */
  write(
    connection: Connection,
    line: string,
    status: number,
    sent: number,
    began: number,
  ): void {
    const remote = connection.remoteAddr.hostname;
    const time = logTime(began);
    const last = this.#last;
    if (
      remote !== last.remote || time !== last.time || line !== last.line ||
      status !== last.status || sent !== last.sent
    ) {
      this.#settle();
      const text = `${remote} - - [${time}] "${line}" ${status} ${
        sent || "-"
      }\n`;
      this.#last = {
        bytes: encoder.encode(text),
        remote,
        time,
        line,
        status,
        sent,
      };
    }
    if (this.#noRoom()) this.flush();
    this.#repeats++;
  }

  #pending(): number {
    return this.#used + this.#repeats * this.#last.bytes.length;
  }

  /** Whether one more copy of the last line would not fit in a batch. */
  #noRoom(): boolean {
    return this.#pending() + this.#last.bytes.length > LOG_BATCH;
  }

  /** Copies the repeats owed into the buffer, dropping those past the bound. */
  #settle(): void {
    const { bytes } = this.#last;
    const room = Math.floor((MAX_LOG_BACKLOG - this.#used) / bytes.length);
    const count = Math.min(this.#repeats, room);
    this.#dropped += this.#repeats - count;
    this.#repeats = 0;
    if (count <= 0) return;
    const size = count * bytes.length;
    const start = this.#reserve(size);
    this.#buffer.set(bytes, start);
    // Each copy doubles what is there: log2(count) copies, not count.
    for (let done = bytes.length; done < size;) {
      const more = Math.min(done, size - done);
      this.#buffer.copyWithin(start + done, start, start + more);
      done += more;
    }
  }

  /** Makes room for `size` more bytes; returns where they go. */
  #reserve(size: number): number {
    const start = this.#used;
    if (start + size > this.#buffer.length) {
      const larger = new Uint8Array(
        Math.max(2 * this.#buffer.length, start + size),
      );
      larger.set(this.#buffer.subarray(0, start));
      this.#buffer = larger;
    }
    this.#used += size;
    return start;
  }

  /** Starts writing what is buffered, unless a write is under way. */
  flush(): void {
    if (!this.#writing) this.#send();
  }

  /** Hands what is buffered to the sink, behind any write under way. */
  #send(): void {
    this.#settle();
    const dropped = this.#dropped;
    if (dropped > 0) {
      const note = encoder.encode(dropNote(dropped));
      const at = this.#reserve(note.length); // it may replace the buffer
      this.#buffer.set(note, at);
      this.#dropped = 0;
    }
    if (this.#used === 0) return;
    const buffer = this.#buffer;
    const bytes = buffer.subarray(0, this.#used);
    this.#used = 0;
    if (this.sink !== true) return this.sink(decoder.decode(bytes));
    // The next lines go to the other buffer while this one is written.
    this.#buffer = this.#spare ?? new Uint8Array(2 * LOG_BATCH);
    this.#spare = null;
    this.#writing = writeStdout(bytes, dropped).then(() => {
      // One grown while stdout was slow is kept too, up to a bound: the next
      // slow write would grow another.
      if (buffer.length <= MAX_KEPT_LOG) this.#spare = buffer;
      this.#writing = null;
      if (this.#noRoom()) this.flush();
    });
  }

  /** Hands everything still held to stdout, and waits for it: drainStdout(). */
  async close(patience: number): Promise<void> {
    this.#send();
    if (this.sink === true) await drainStdout(patience);
  }
}

// ---------------------------------------------------------------------------
// stdout: the log's batches and the command line's last lines, in order
// ---------------------------------------------------------------------------

/** Bytes queued for stdout; `dropped` as in writeStdout(). */
interface Queued {
  bytes: Uint8Array;
  written: number;
  dropped: number;
}

/** What stdout has yet to take, oldest first; the first may be part written. */
const stdoutQueue: Queued[] = [];
let stdoutWritten: Promise<void> = Promise.resolve();
/** Bytes queued for stdout and not yet taken: what a stuck reader holds up. */
let stdoutBacklog = 0;
/** Counts completed writes: how a wait tells a slow reader from none. */
let stdoutProgress = 0;
/** Set once stdout took nothing for a whole wait: later waits do not wait. */
let stdoutGone = false;

/**
 * Writes bytes to stdout after everything queued before them, at most a
 * pipe's worth (LOG_BATCH) per write, so that a slow reader is seen to make
 * progress. `dropped` is the count a drop note ending the bytes stands for.
 */
function writeStdout(bytes: Uint8Array, dropped = 0): Promise<void> {
  const entry: Queued = { bytes, written: 0, dropped };
  stdoutQueue.push(entry);
  stdoutBacklog += bytes.length;
  stdoutWritten = stdoutWritten.then(async () => {
    while (entry.written < bytes.length) {
      const end = Math.min(bytes.length, entry.written + LOG_BATCH);
      await writeAll(Deno.stdout, bytes.subarray(entry.written, end));
      entry.written = end;
      stdoutProgress++;
    }
  }).catch(() => {/* stdout closed: the log is lost, the server is not */})
    .then(() => {
      stdoutQueue.shift();
      stdoutBacklog -= bytes.length;
    });
  return stdoutWritten;
}

/** The line that stands in the log for `count` lines it dropped. */
function dropNote(count: number): string {
  return `(access log: ${count} lines dropped, stdout blocked)\n`;
}

/** The workers' log lines dropped while stdout was blocked, not yet noted. */
let workerLinesDropped = 0;

/**
 * Writes the log lines a worker posted (`--workers`). While stdout is
 * blocked they are held up to MAX_LOG_BACKLOG, as a single server's log
 * holds its own, then dropped and counted: the workers' logs cannot tell
 * that this process's stdout is stuck, and would otherwise grow its memory
 * without end.
 */
function forwardLog(lines: string): void {
  if (stdoutBacklog + lines.length > MAX_LOG_BACKLOG) {
    for (let i = 0; i < lines.length; i++) {
      if (lines.charCodeAt(i) === LF) workerLinesDropped++;
    }
    return;
  }
  queueWorkerLines(lines);
}

/** Queues the workers' lines for stdout, then the note of any dropped before. */
function queueWorkerLines(lines: string): void {
  const dropped = workerLinesDropped;
  workerLinesDropped = 0;
  const text = dropped > 0 ? lines + dropNote(dropped) : lines;
  if (text !== "") writeStdout(encoder.encode(text), dropped);
}

/**
 * Waits until stdout has taken everything queued. A reader that is slow but
 * alive is waited for; one that takes nothing for `patience` s (at least
 * SHUTDOWN_GRACE) is taken to be gone (the pipe full, nobody reading), and
 * the lines it never took are counted on stderr instead: a shutdown must not
 * wait for it forever.
 */
async function drainStdout(patience: number): Promise<void> {
  const ms = Math.max(patience, SHUTDOWN_GRACE) * 1000;
  while (!stdoutGone) {
    const progress = stdoutProgress;
    if (await settlesWithin(stdoutWritten, ms)) return;
    if (stdoutProgress !== progress) continue;
    stdoutGone = true;
    // Up to: the write under way may have put some of its lines through.
    let lines = 0;
    for (const { bytes, written, dropped } of stdoutQueue) {
      for (let i = written; i < bytes.length; i++) if (bytes[i] === LF) lines++;
      lines += Math.max(0, dropped - 1);
    }
    const note = `stdout blocked at shutdown: up to ${lines} lines not ` +
      `written\n`;
    await settlesWithin(
      writeAll(Deno.stderr, encoder.encode(note)),
      SHUTDOWN_GRACE * 1000,
    );
  }
}

/** Whether `promise` settles within `ms`: a write to a stuck pipe never does. */
async function settlesWithin(
  promise: Promise<unknown>,
  ms: number,
): Promise<boolean> {
  const settled = promise.then(() => true, () => true);
  if (!(ms <= MAX_DELAY)) return settled; // NaN too: no bound, wait
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<boolean>((resolve) => {
    timer = setTimeout(() => resolve(false), Math.max(0, ms));
  });
  try {
    return await Promise.race([settled, late]);
  } finally {
    clearTimeout(timer);
  }
}

// ---------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------

/** The command line's settings: `serve()`'s options plus the CLI's own. */
interface Settings extends ServeOptions {
  app?: string;
  root?: string;
  list?: boolean;
  dotfiles?: boolean;
  certFile?: string;
  keyFile?: string;
  redirectHttp?: number;
  quiet?: boolean;
  workers?: number;
  help?: boolean;
  version?: boolean;
}

type Kind =
  | "seconds"
  | "count"
  | "port"
  | "text"
  | "switch"
  | "off"
  | "workers";

const FLAGS: Record<string, [keyof Settings, Kind]> = {
  "--hostname": ["hostname", "text"],
  "--port": ["port", "port"],
  "--app": ["app", "text"],
  "--root": ["root", "text"],
  "--list": ["list", "switch"],
  "--dotfiles": ["dotfiles", "switch"],
  "--cert": ["certFile", "text"],
  "--key": ["keyFile", "text"],
  "--redirect-http": ["redirectHttp", "port"],
  "--quiet": ["quiet", "switch"],
  "--workers": ["workers", "workers"],
  "--header-timeout": ["headerTimeout", "seconds"],
  "--idle-timeout": ["idleTimeout", "seconds"],
  "--body-timeout": ["bodyTimeout", "seconds"],
  "--shutdown-timeout": ["shutdownTimeout", "seconds"],
  "--sleep-delay": ["sleepDelay", "seconds"],
  "--max-connections": ["maxConnections", "count"],
  "--max-body": ["maxBody", "count"],
  "--ws-idle-timeout": ["wsIdleTimeout", "seconds"],
  "--ws-close-timeout": ["wsCloseTimeout", "seconds"],
  "--ws-max-message": ["wsMaxMessage", "count"],
  "--ws-max-buffered": ["wsMaxBuffered", "count"],
  "--no-compress": ["compression", "off"],
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
    if (kind === "switch" || kind === "off") {
      if (inline !== undefined) throw new Error(`${flag} takes no value`);
      settings[key] = kind === "switch";
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
(hello, after a delay), POST /echo (the body back), anything else 404 — or
your own application with --app.

Flags (seconds may have fractions):
  --hostname HOST          address to listen on (default 127.0.0.1)
  --port N                 port, 0 for any free one (default 7878; env PORT)
  --app FILE|URL           serve this module's default export's fetch()
                           instead (the deno serve convention; needs
                           --allow-read)
  --root DIR               serve the files under DIR instead (needs
                           --allow-read=DIR)
  --list                   with --root: list directories without index.html
  --dotfiles               with --root: serve names starting with "."
  --cert FILE --key FILE   serve HTTPS with this PEM certificate chain and
                           key (needs --allow-read for both)
  --redirect-http PORT     with --cert: plain HTTP on PORT, answering 308 to
                           the same URL over HTTPS
  --quiet                  no access log (default: Common Log Format on stdout)
  --workers N|auto         isolates sharing the port (default 1); more than 1
                           needs --allow-read and --unstable-net
  --header-timeout S       408 for a head not complete in S (default 10)
  --idle-timeout S         close idle keep-alive connections (default 5)
  --body-timeout S         408 for a body, cut a write, stalled S (default 30)
  --shutdown-timeout S     close what is still busy S after a signal (default 10)
  --max-connections N      stop accepting at N open connections (default 10000)
  --max-body BYTES         413 for larger bodies (default 1048576)
  --ws-idle-timeout S      ping a silent WebSocket, close it if it stays
                           silent as long again (default 30)
  --ws-close-timeout S     cut a WebSocket closing handshake (default 5)
  --ws-max-message BYTES   close 1009 past this message size (default 1048576)
  --ws-max-buffered BYTES  cut a WebSocket client that reads nothing once this
                           much is queued for it (default 16777216)
  --no-compress            compress no response (default: brotli or gzip for
                           text, JSON, JS, XML, SVG, Wasm of 1 KiB or more)
                           and no WebSocket message
  --sleep-delay S          how long GET /sleep sleeps (default 5)
  --version                print the version
  --help                   print this help

PORT is read from the environment only when --allow-env grants it.`);
}

/**
 * `PORT`, when env permission is already granted (never prompts): the PaaS
 * convention. `HOSTNAME` is not read — Docker sets it to the container's id.
 */
function fromEnvironment(): Settings {
  const access = Deno.permissions.querySync({ name: "env", variable: "PORT" });
  const value = access.state === "granted" ? Deno.env.get("PORT") : undefined;
  if (!value) return {};
  try {
    return parseFlags(["--port", value]);
  } catch {
    throw new Error(`PORT must be a port number (0-65535), not "${value}"`);
  }
}

function listeningLine(addr: Deno.NetAddr, tls: boolean): string {
  return `Listening on ${tls ? "https" : "http"}://${hostOf(addr)}/`;
}

const shutdowns: (() => void)[] = [];

/**
 * SIGINT and SIGTERM start a graceful shutdown of every server started
 * here; a second signal exits at once.
 */
function onSignal(shutdown: () => void): void {
  shutdowns.push(shutdown);
  if (shutdowns.length > 1) return;
  let first = -1;
  // One signal may come twice at once: sent to the process and to its group
  // (GNU timeout does so, and a terminal's Ctrl-C reaches a task runner and
  // its child). Only a later one means "now".
  const handler = () => {
    const now = performance.now();
    if (first < 0) {
      first = now;
      for (const each of shutdowns) each();
    } else if (now - first > SAME_SIGNAL * 1000) {
      Deno.exit(130);
    }
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
  if (settings.version) return console.log(versionLine());
  const options: AppInit = { ...settings, accessLog: !settings.quiet };
  // What the user must fix is found before anything listens.
  Object.assign(options, readCertificate(settings));
  if (settings.redirectHttp !== undefined && !options.cert) {
    refuse("--redirect-http needs --cert and --key");
  }
  if (settings.app && settings.root) {
    refuse("--app and --root exclude each other");
  }
  if ((settings.list || settings.dotfiles) && !settings.root) {
    refuse("--list and --dotfiles go with --root");
  }
  if (settings.app) {
    options.app = appUrl(settings.app);
    options.handler = await loadApp(options.app, settings.app);
  }
  if (settings.root) options.handler = filesHandler(settings);
  let redirect: Server | undefined;
  const listening = (addr: Deno.NetAddr) => {
    console.log(listeningLine(addr, options.cert !== undefined));
    if (settings.redirectHttp !== undefined) {
      redirect = serveRedirect(options, settings.redirectHttp, addr.port);
    }
  };
  const forced = (settings.workers ?? 1) > 1
    ? await serveWithWorkers(options, settings.workers!, listening)
    : await serveHere(options, listening);
  await redirect?.finished;
  // The last lines go after the log's, through the same queue: see
  // drainStdout() for how long the exit waits for them.
  const timeout = options.shutdownTimeout ?? DEFAULTS.shutdownTimeout;
  if (forced > 0) {
    writeStdout(encoder.encode(
      `Closed ${forced} busy connection(s) at the ${timeout} s shutdown ` +
        `timeout.\n`,
    ));
  }
  writeStdout(encoder.encode("Shutting down.\n"));
  await drainStdout(timeout);
  Deno.exit(0);
}

/**
 * The version, the runtime's, and which of its internals the probes found:
 * what a handler's requests and responses cost depends on them.
 */
function versionLine(): string {
  const found = [
    REQUEST_SLOTS && "bare requests",
    BODY_SLOTS.lazy && "static response bodies",
    BODY_SLOTS.inner && "response records",
  ].filter(Boolean);
  return `hello-server ${VERSION} (Deno ${Deno.version.deno}; runtime ` +
    `internals: ${found.length ? found.join(", ") : "none, Fetch API only"})`;
}

async function serveHere(
  options: ServeInit,
  listening: (addr: Deno.NetAddr) => void,
): Promise<number> {
  let server: Server;
  try {
    server = serve({ ...options, onListen: listening });
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

/** What the command line serves: the options, and `--app`'s module URL. */
interface AppInit extends ServeInit {
  app?: string;
}

/** The user's to fix, before anything listens: one line, exit 2. */
function refuse(message: string): never {
  console.error(`error: ${message}`);
  Deno.exit(2);
}

// ---------------------------------------------------------------------------
// HTTPS: --cert and --key, and --redirect-http
// ---------------------------------------------------------------------------

/**
 * `--cert` and `--key`: both or neither, each readable PEM, and a pair —
 * checked by a listener that is closed at once, since that is where Deno
 * tells a key from another certificate's.
 * @returns The PEM texts, as `serve()` takes them.
 */
function readCertificate(settings: Settings): ServeOptions {
  const { certFile, keyFile } = settings;
  if (certFile === undefined && keyFile === undefined) return {};
  if (certFile === undefined || keyFile === undefined) {
    refuse("--cert and --key go together");
  }
  const cert = readPem("--cert", certFile);
  const key = readPem("--key", keyFile);
  try {
    Deno.listenTls({ hostname: "127.0.0.1", port: 0, cert, key }).close();
  } catch (error) {
    refuse(`--cert ${certFile} and --key ${keyFile}: ${firstLine(error)}`);
  }
  return { cert, key };
}

function readPem(flag: string, path: string): string {
  const access = Deno.permissions.querySync({ name: "read", path });
  if (access.state !== "granted") {
    refuse(`${flag} needs read access to ${path}: --allow-read=${path}`);
  }
  try {
    return Deno.readTextFileSync(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      refuse(`${flag} ${path}: no such file`);
    }
    refuse(`${flag} ${path}: ${firstLine(error)}`);
  }
}

/**
 * `--redirect-http`: plain HTTP on another port, where every request is
 * answered 308 — which, unlike 301, keeps the method (RFC 9110 §15.4.9) —
 * with the same URL over HTTPS. It is an application like any other, on
 * the same core and with the same limits.
 */
function serveRedirect(
  options: ServeInit,
  port: number,
  httpsPort: number,
): Server {
  const handler = (request: Request) => {
    const url = new URL(request.url);
    url.protocol = "https:";
    url.port = String(httpsPort);
    return new Response(null, {
      status: 308,
      headers: { location: url.href },
    });
  };
  let server: Server;
  try {
    server = serve({
      ...options,
      cert: undefined,
      key: undefined,
      port,
      handler,
      onListen: (addr) =>
        console.log(`Redirecting http://${hostOf(addr)}/ to HTTPS`),
    });
  } catch (error) {
    cannotListen(options, port, (error as Error).message);
  }
  onSignal(() => server.shutdown());
  return server;
}

// ---------------------------------------------------------------------------
// --root: a folder of files
// ---------------------------------------------------------------------------

/**
 * `--root DIR`: a directory that exists and may be read — checked now, so
 * that a typo is one line at start rather than a 500 on every request.
 */
function filesHandler(settings: Settings): ServeHandler {
  const root = settings.root!;
  const access = Deno.permissions.querySync({ name: "read", path: root });
  if (access.state !== "granted") {
    refuse(`--root needs read access to ${root}: --allow-read=${root}`);
  }
  try {
    if (!Deno.statSync(root).isDirectory) {
      refuse(`--root ${root}: not a directory`);
    }
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      refuse(`--root ${root}: no such directory`);
    }
    refuse(`--root ${root}: ${firstLine(error)}`);
  }
  const options = { root, list: settings.list, dotfiles: settings.dotfiles };
  return (request) => serveFiles(request, options);
}

// ---------------------------------------------------------------------------
// --app: any `deno serve`-style module behind the same core
// ---------------------------------------------------------------------------

/**
 * Finds `--app`'s module: a URL as given (deno's own import permissions
 * apply), or a file, which must exist and be readable.
 * @returns Its URL.
 */
function appUrl(specifier: string): string {
  if (/^[a-z][a-z\d+.-]+:/i.test(specifier)) return specifier;
  const fix = `deno run --allow-net --allow-read main.ts --app ${specifier}`;
  const access = Deno.permissions.querySync({ name: "read", path: specifier });
  if (access.state !== "granted") {
    refuse(`--app needs read access to ${specifier}: ${fix}`);
  }
  let path: string;
  try {
    path = Deno.realPathSync(specifier);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      refuse(`--app ${specifier}: no such file`);
    }
    refuse(`--app ${specifier}: ${firstLine(error)} (${fix})`);
  }
  const url = new URL("file:///");
  url.pathname = path;
  return url.href;
}

/**
 * Imports `--app`'s module. Its default export's `fetch(request, info)` is
 * the handler — the `deno serve` convention, which a Hono app, among
 * others, follows as it is.
 */
async function loadApp(url: string, specifier: string): Promise<ServeHandler> {
  let module: { default?: { fetch?: unknown } };
  try {
    module = await import(url);
  } catch (error) {
    refuse(`--app ${specifier} could not be loaded: ${firstLine(error)}`);
  }
  const app = module.default;
  if (typeof app?.fetch !== "function") {
    refuse(
      `--app ${specifier} has no default export with a fetch(request) method`,
    );
  }
  const fetch = app.fetch as ServeHandler;
  return (request, info) => fetch.call(app, request, info);
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
  options: AppInit,
  count: number,
  listening: (addr: Deno.NetAddr) => void,
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
        } else if ("lines" in data) forwardLog(data.lines);
        else {
          forced += data.forced;
          if (++finished === count) allFinished();
        }
      };
      // What cannot be posted to a worker, it makes itself: the handler
      // from --app's URL.
      const { signal: _, onListen: __, handler: ___, ...rest } = options;
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
    listening({
      transport: "tcp",
      hostname: options.hostname ?? DEFAULTS.hostname,
      port: first.port,
    });
  } catch (error) {
    console.error(`error: ${(error as Error).message}`);
    Deno.exit(1);
  }
  onSignal(() => workers.forEach((worker) => worker.postMessage("shutdown")));
  await done;
  queueWorkerLines(""); // the note of the last lines dropped, if any
  return forced;
}

/** A worker's side: serve with the options posted, shut down when told. */
function workerMain(): void {
  const scope = globalThis as unknown as {
    postMessage(message: WorkerMessage): void;
    onmessage: ((event: MessageEvent) => void) | null;
  };
  let server: Server | undefined;
  scope.onmessage = async ({ data }) => {
    if (data === "shutdown") {
      server?.shutdown();
      return;
    }
    const options = data as AppInit & Settings;
    const handler = options.app
      ? await loadApp(options.app, options.app)
      : options.root
      ? filesHandler(options)
      : undefined;
    try {
      server = serve({
        ...options,
        handler,
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
