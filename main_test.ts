/**
 * Tests for main.ts: a server on port 0 in this process, spoken to in raw
 * bytes over `Deno.connect` (and `Deno.connectTls`, trusting a test CA whose
 * certificates are kept below as PEM text). Run with
 * `deno test --allow-net --allow-read --allow-write` (`deno task test`): the
 * tests of serveFiles() build files in a temporary directory, and with
 * `--allow-net` alone they are ignored.
 */
import assert from "node:assert/strict";
import {
  brotliDecompressSync,
  constants as zlibConstants,
  deflateRawSync,
  gunzipSync,
  inflateRawSync,
} from "node:zlib";
import {
  FrameHead,
  HELLO_PAGE,
  INCOMPLETE,
  NOT_FOUND_PAGE,
  parseFrameHead,
  parseRequest,
  RequestHead,
  serve,
  serveFiles,
  type ServeFilesOptions,
  type ServeHandler,
  type ServeOptions,
  type Server,
  upgradeWebSocket,
  type UpgradeWebSocketOptions,
} from "./main.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

function start(options: ServeOptions = {}): Server {
  return serve({ port: 0, accessLog: false, ...options });
}

/** A response's status line and fields. */
interface Head {
  status: number;
  /** Fields by lower-case name (for Set-Cookie, its last line). */
  headers: Map<string, string>;
  /** Every field line as received, in order, names in lower case. */
  fields: [string, string][];
}

interface Reply extends Head {
  body: Uint8Array;
  text: string;
}

/**
 * A raw client: writes bytes, reads responses framed as RFC 9112 §6.3 says —
 * by Content-Length, chunked, or until the server closes.
 */
class Client {
  #buffer = new Uint8Array(0);
  /** A read under way, kept: a wait that gives up on it loses nothing. */
  #reading: Promise<Uint8Array | null> | null = null;
  constructor(readonly conn: Deno.Conn) {}

  static async open(server: Server): Promise<Client> {
    return new Client(
      await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port }),
    );
  }

  /** A client over TLS to a server with the test certificate. */
  static async openTls(server: Server): Promise<Client> {
    return new Client(await connectTls(server));
  }

  async send(data: string | Uint8Array): Promise<void> {
    const bytes = typeof data === "string" ? latin1(data) : data;
    let written = 0;
    while (written < bytes.length) {
      written += await this.conn.write(bytes.subarray(written));
    }
  }

  async #read(): Promise<Uint8Array | null> {
    const chunk = new Uint8Array(64 * 1024);
    try {
      const count = await this.conn.read(chunk);
      return count === null ? null : chunk.subarray(0, count);
    } catch {
      return null; // a reset counts as the end
    }
  }

  /** Reads more bytes; false at end of stream. */
  async #more(): Promise<boolean> {
    const chunk = await (this.#reading ??= this.#read());
    this.#reading = null;
    if (chunk === null) return false;
    const joined = new Uint8Array(this.#buffer.length + chunk.length);
    joined.set(this.#buffer);
    joined.set(chunk, this.#buffer.length);
    this.#buffer = joined;
    return true;
  }

  /** Takes `count` bytes off the front of what was read. */
  #take(count: number): Uint8Array {
    const taken = this.#buffer.slice(0, count);
    this.#buffer = this.#buffer.slice(count);
    return taken;
  }

  /**
   * True when nothing arrives for `ms`. It can only be wrong towards true
   * (on a slow machine), so a test using it can never fail spuriously.
   */
  async quietFor(ms: number): Promise<boolean> {
    if (this.#buffer.length > 0) return false;
    const reading = this.#reading ??= this.#read();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const quiet = await Promise.race([
      reading.then(() => false),
      new Promise<boolean>((resolve) => timer = setTimeout(resolve, ms, true)),
    ]);
    clearTimeout(timer);
    if (!quiet) await this.#more();
    return quiet;
  }

  /** The next response's head, or null if the server closed first. */
  async head(): Promise<Head | null> {
    let headEnd: number;
    while ((headEnd = indexOf(this.#buffer, "\r\n\r\n")) < 0) {
      if (!await this.#more()) {
        assert.equal(this.#buffer.length, 0, "a truncated response head");
        return null;
      }
    }
    const lines = decoder.decode(this.#take(headEnd + 4)).slice(0, -4)
      .split("\r\n");
    const match = /^HTTP\/1\.1 (\d{3}) [^\r\n]*$/.exec(lines[0]);
    assert.ok(match, `a well-formed status line: ${JSON.stringify(lines[0])}`);
    const headers = new Map<string, string>();
    const fields: [string, string][] = [];
    for (const line of lines.slice(1)) {
      const colon = line.indexOf(":");
      assert.ok(colon > 0, `a well-formed field line: ${line}`);
      const name = line.slice(0, colon).toLowerCase();
      const value = line.slice(colon + 1).trim();
      // RFC 9110 §5.3: only a list field may repeat, and Set-Cookie, which
      // must (RFC 6265 §3); the server sends no list field twice.
      assert.ok(
        !headers.has(name) || name === "set-cookie",
        `no duplicate ${name}`,
      );
      headers.set(name, value);
      fields.push([name, value]);
    }
    if (headers.has("transfer-encoding")) {
      assert.equal(headers.get("transfer-encoding"), "chunked");
      // RFC 9112 §6.2: never Content-Length beside Transfer-Encoding.
      assert.ok(!headers.has("content-length"), "not both framings");
    }
    return { status: Number(match[1]), headers, fields };
  }

  /**
   * The next chunk of a chunked body (RFC 9112 §7.1), or null after the last
   * chunk, which the server sends with no trailer fields.
   */
  async chunk(): Promise<Uint8Array | null> {
    let lineEnd: number;
    while ((lineEnd = indexOf(this.#buffer, "\r\n")) < 0) {
      assert.ok(await this.#more(), "a truncated chunk-size line");
    }
    const line = decoder.decode(this.#buffer.subarray(0, lineEnd));
    assert.match(line, /^[0-9a-fA-F]+$/, "a chunk size, nothing else");
    const size = parseInt(line, 16);
    const end = lineEnd + 2 + size + 2;
    while (this.#buffer.length < end) {
      assert.ok(await this.#more(), "a truncated chunk");
    }
    const chunk = this.#take(end);
    assert.equal(decoder.decode(chunk.subarray(-2)), "\r\n", "chunk ends");
    return size === 0 ? null : chunk.subarray(lineEnd + 2, -2);
  }

  /** Everything until the server closes. */
  async untilClosed(): Promise<Uint8Array> {
    while (await this.#more()) { /* collect */ }
    return this.#take(this.#buffer.length);
  }

  /** The body of the response with `head`, framed by RFC 9112 §6.3. */
  async body(head: Head, toHead = false): Promise<Uint8Array> {
    const { status, headers } = head;
    if (toHead || status < 200 || status === 204 || status === 304) {
      return new Uint8Array(0);
    }
    if (headers.has("transfer-encoding")) {
      const chunks: Uint8Array[] = [];
      let chunk: Uint8Array | null;
      while ((chunk = await this.chunk()) !== null) chunks.push(chunk);
      return concat(chunks);
    }
    if (!headers.has("content-length")) return await this.untilClosed();
    const length = headers.get("content-length")!;
    assert.match(length, /^\d+$/, "a valid Content-Length");
    while (this.#buffer.length < Number(length)) {
      assert.ok(await this.#more(), "a truncated response body");
    }
    return this.#take(Number(length));
  }

  /** The next response, or null if the server closed first. */
  async response(options: { head?: boolean } = {}): Promise<Reply | null> {
    const head = await this.head();
    if (!head) return null;
    const body = await this.body(head, options.head);
    return { ...head, body, text: decoder.decode(body) };
  }

  /** The next `count` bytes, or null if the server closes before them. */
  async exactly(count: number): Promise<Uint8Array | null> {
    while (this.#buffer.length < count) {
      if (!await this.#more()) return null;
    }
    return this.#take(count);
  }

  /** True when the server closes without sending anything more. */
  async closedByServer(): Promise<boolean> {
    const more = await this.#more();
    return !more && this.#buffer.length === 0;
  }

  close(): void {
    try {
      this.conn.close();
    } catch { /* already closed */ }
  }
}

function latin1(text: string): Uint8Array {
  return Uint8Array.from(text, (char) => char.charCodeAt(0));
}

function concat(parts: Uint8Array[]): Uint8Array {
  const joined = new Uint8Array(parts.reduce((sum, p) => sum + p.length, 0));
  let offset = 0;
  for (const part of parts) {
    joined.set(part, offset);
    offset += part.length;
  }
  return joined;
}

function indexOf(bytes: Uint8Array, text: string): number {
  const pattern = latin1(text);
  outer: for (let i = 0; i + pattern.length <= bytes.length; i++) {
    for (let j = 0; j < pattern.length; j++) {
      if (bytes[i + j] !== pattern[j]) continue outer;
    }
    return i;
  }
  return -1;
}

/** Sends `request` on a fresh connection and returns the one reply. */
async function ask(
  server: Server,
  request: string | Uint8Array,
): Promise<Reply | null> {
  const client = await Client.open(server);
  try {
    await client.send(request);
    return await client.response();
  } finally {
    client.close();
  }
}

/** Asserts the reply is `status`, says Connection: close, and the server closes. */
async function assertRejected(
  server: Server,
  request: string | Uint8Array,
  status: number,
): Promise<void> {
  const client = await Client.open(server);
  try {
    await client.send(request);
    const reply = await client.response();
    assert.equal(reply?.status, status, JSON.stringify(request).slice(0, 200));
    assert.equal(reply.headers.get("connection"), "close");
    assert.ok(
      await client.closedByServer(),
      "the server closes after an error",
    );
  } finally {
    client.close();
  }
}

const GET = "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";

const delay = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

function post(path: string, body: string, fields = ""): string {
  return `POST ${path} HTTP/1.1\r\nHost: localhost\r\n${fields}` +
    `Content-Length: ${latin1(body).length}\r\n\r\n${body}`;
}

async function withServer(
  options: ServeOptions,
  test: (server: Server) => Promise<void>,
): Promise<void> {
  const server = start(options);
  try {
    await test(server);
  } finally {
    await server.shutdown();
  }
}

/** Serves `handler` (serve's second form) on a free port during `test`. */
async function withHandler(
  options: ServeOptions,
  handler: ServeHandler,
  test: (server: Server) => Promise<void>,
): Promise<void> {
  // A short shutdown timeout, so that a test that fails with a handler
  // still waiting does not wait the default 10 s for it.
  const server = serve(
    { port: 0, accessLog: false, shutdownTimeout: 2, ...options },
    handler,
  );
  try {
    await test(server);
  } finally {
    await server.shutdown();
  }
}

/** The promise's value, or a failure naming `what` if it takes over `ms`. */
async function within<T>(
  promise: Promise<T>,
  what: string,
  ms = 5000,
): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not in ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * A test whose code under test writes to `console.error` or stdout on
 * purpose (a handler made to fail, a default access log): what it writes is
 * captured and handed to `check`, not printed, so that a passing run reads
 * clean.
 */
function quietly(
  check: (errors: string[], stdout: string) => void,
  test: () => Promise<void>,
): () => Promise<void> {
  return async () => {
    const errors: string[] = [];
    const written: string[] = [];
    const original = console.error;
    const stdout = Deno.stdout as unknown as {
      write(bytes: Uint8Array): Promise<number>;
    };
    console.error = (...data: unknown[]) => errors.push(data.join(" "));
    stdout.write = (bytes) => {
      written.push(decoder.decode(bytes));
      return Promise.resolve(bytes.length);
    };
    try {
      await test();
    } finally {
      console.error = original;
      delete (stdout as { write?: unknown }).write;
    }
    check(errors, written.join(""));
  };
}

/** Resolves when `signal` aborts. */
function aborted(signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) resolve();
    signal.addEventListener("abort", () => resolve(), { once: true });
  });
}

function pathOf(request: Request): string {
  return new URL(request.url).pathname;
}

// ---------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------

Deno.test("serve() answers GET / with the hello page", async () => {
  await withServer({}, async (server) => {
    const reply = await ask(server, GET);
    assert.equal(reply?.status, 200);
    assert.equal(reply.text, HELLO_PAGE);
    assert.match(reply.text, /<h1>Hello!<\/h1>/);
    assert.match(reply.text, /Hi from Deno/);
    assert.equal(reply.headers.get("content-type"), "text/html; charset=utf-8");
    assert.equal(
      reply.headers.get("content-length"),
      String(encoder.encode(HELLO_PAGE).length),
    );
    assert.match(
      reply.headers.get("date")!,
      /^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT$/,
    );
  });
});

Deno.test("serve() answers unknown paths with the 404 page, keeping the connection", async () => {
  await withServer({}, async (server) => {
    const client = await Client.open(server);
    try {
      // A browser asks for /favicon.ico on every visit: a 404 must not cost
      // it the connection, nor a pipelining client the requests behind it.
      await client.send("GET /nope HTTP/1.1\r\nHost: x\r\n\r\n" + GET);
      const reply = await client.response();
      assert.equal(reply?.status, 404);
      assert.equal(reply.text, NOT_FOUND_PAGE);
      assert.match(reply.text, /<h1>Oops!<\/h1>/);
      assert.equal(reply.headers.get("connection"), undefined);
      assert.equal((await client.response())?.text, HELLO_PAGE);
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() echoes a POST /echo body byte for byte", async () => {
  await withServer({}, async (server) => {
    const body = new Uint8Array(200_000).map((_, i) => (i * 7919) % 256);
    const head = latin1(
      `POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: ${body.length}\r\n\r\n`,
    );
    const reply = await ask(server, new Uint8Array([...head, ...body]));
    assert.equal(reply?.status, 200);
    assert.deepEqual(reply.body, body);
    assert.equal(reply.headers.get("content-length"), String(body.length));
  });
});

Deno.test("serve() counts Content-Length in bytes, not characters", async () => {
  await withServer({}, async (server) => {
    const body = "héllo wörld ☃";
    const bytes = encoder.encode(body);
    const head = latin1(
      `POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: ${bytes.length}\r\n\r\n`,
    );
    const reply = await ask(server, new Uint8Array([...head, ...bytes]));
    assert.equal(reply?.headers.get("content-length"), String(bytes.length));
    assert.equal(reply.text, body);
  });
});

Deno.test("serve() decodes a chunked body with extensions and trailers", async () => {
  await withServer({}, async (server) => {
    const reply = await ask(
      server,
      "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" +
        '5;name=value\r\nhello\r\n1 ; a="b c"\r\n \r\nA\r\n0123456789\r\n' +
        "0\r\nX-Trailer: yes\r\n\r\n",
    );
    assert.equal(reply?.status, 200);
    assert.equal(reply.text, "hello 0123456789");
  });
});

Deno.test("serve() answers HEAD without a body", async () => {
  await withServer({}, async (server) => {
    const client = await Client.open(server);
    try {
      // The GET behind the HEAD would be misread if the HEAD had a body.
      await client.send("HEAD / HTTP/1.1\r\nHost: x\r\n\r\n" + GET);
      const head = await client.response({ head: true });
      assert.equal(head?.status, 200);
      assert.equal(
        head.headers.get("content-length"),
        String(encoder.encode(HELLO_PAGE).length),
      );
      assert.equal(
        head.headers.get("content-type"),
        "text/html; charset=utf-8",
      );
      const get = await client.response();
      assert.equal(get?.status, 200);
      assert.equal(get.text, HELLO_PAGE);
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() sends no body with an error reply to HEAD", async () => {
  await withServer({ maxBody: 1000 }, async (server) => {
    // RFC 9110 §9.3.2: a HEAD client reads no body, so body bytes would be
    // taken for the start of the next response.
    for (
      const [request, status] of [
        ["HEAD / HTTP/1.1\r\n\r\n", 400],
        ["HEAD / HTTP/1.1\r\nHost: x\r\nBad Field: 1\r\n\r\n", 400],
        ["HEAD / HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n", 413],
        ["HEAD / HTTP/1.1\r\nHost: x\r\nExpect: nope\r\n\r\n", 417],
        [
          "HEAD / HTTP/1.1\r\nHost: x\r\n" +
          "Transfer-Encoding: gzip, chunked\r\n\r\n",
          501,
        ],
        ["HEAD / HTTP/2.0\r\nHost: x\r\n\r\n", 505],
        // Refused before the head is parsed: the method is known all the same.
        ["HEAD / HTTP/1.0\r\nConnection: keep-alive7\n\r\n", 400],
        ["HEAD / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", 400],
        [`HEAD /${"a".repeat(9000)} HTTP/1.1\r\nHost: x\r\n\r\n`, 414],
        [`HEAD / HTTP/1.1\r\nHost: x\r\nX: ${"y".repeat(17_000)}`, 431],
      ] as const
    ) {
      const client = await Client.open(server);
      try {
        await client.send(request);
        const reply = await client.response({ head: true });
        assert.equal(reply?.status, status, request);
        assert.equal(reply.headers.get("connection"), "close");
        assert.ok(await client.closedByServer(), `no body after ${status}`);
      } finally {
        client.close();
      }
    }
  });
});

Deno.test("serve() answers 405 with Allow for a known path, keeping the connection", async () => {
  await withServer({}, async (server) => {
    const client = await Client.open(server);
    try {
      await client.send(
        post("/", "x") + "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n" + GET,
      );
      const reply = await client.response();
      assert.equal(reply?.status, 405);
      assert.equal(reply.headers.get("allow"), "GET, HEAD");
      assert.equal(reply.headers.get("connection"), undefined);
      const echo = await client.response();
      assert.equal(echo?.status, 405);
      assert.equal(echo.headers.get("allow"), "POST");
      assert.equal(echo.headers.get("connection"), undefined);
      assert.equal((await client.response())?.text, HELLO_PAGE);
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() answers 501 to a method it does not know", async () => {
  await withServer({}, async (server) => {
    await assertRejected(server, "BREW / HTTP/1.1\r\nHost: x\r\n\r\n", 501);
  });
});

Deno.test("serve() answers OPTIONS * with what it allows", async () => {
  await withServer({}, async (server) => {
    const reply = await ask(server, "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n");
    assert.equal(reply?.status, 200);
    assert.equal(reply.headers.get("allow"), "GET, HEAD, POST");
    await assertRejected(server, "GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400);
  });
});

Deno.test("serve() routes by path: query strings and absolute-form", async () => {
  await withServer({}, async (server) => {
    for (
      const target of [
        "/?a=1",
        "/?",
        "http://example.com/",
        "http://example.com",
        "HTTP://EXAMPLE.COM:80/?q",
      ]
    ) {
      const reply = await ask(
        server,
        `GET ${target} HTTP/1.1\r\nHost: example.com\r\n\r\n`,
      );
      assert.equal(reply?.status, 200, target);
      assert.equal(reply.text, HELLO_PAGE);
    }
    const echo = await ask(server, post("http://h/echo?x=1", "abs"));
    assert.equal(echo?.text, "abs");
    const missing = await ask(
      server,
      "GET /nope?/ HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert.equal(missing?.status, 404);
  });
});

Deno.test("serve() ignores empty lines before a request line", async () => {
  await withServer({}, async (server) => {
    const reply = await ask(server, "\r\n\r\n" + GET);
    assert.equal(reply?.status, 200);
  });
});

Deno.test("serve() answers /sleep after the delay without blocking others", async () => {
  await withServer({ sleepDelay: 1 }, async (server) => {
    const order: string[] = [];
    const sleeper = ask(server, "GET /sleep HTTP/1.1\r\nHost: x\r\n\r\n")
      .then((reply) => {
        order.push("sleep");
        return reply;
      });
    // Give the sleeper a head start, then ask for / on another connection.
    await new Promise((resolve) => setTimeout(resolve, 100));
    const hello = await ask(server, GET);
    order.push("hello");
    assert.equal(hello?.status, 200);
    const slept = await sleeper;
    assert.equal(slept?.status, 200);
    assert.equal(slept.text, HELLO_PAGE);
    assert.deepEqual(order, ["hello", "sleep"]);
  });
});

// ---------------------------------------------------------------------------
// Persistent connections and pipelining
// ---------------------------------------------------------------------------

Deno.test("serve() keeps an HTTP/1.1 connection alive for reuse", async () => {
  await withServer({ idleTimeout: 7 }, async (server) => {
    const client = await Client.open(server);
    try {
      for (let i = 0; i < 3; i++) {
        await client.send(post("/echo", `round ${i}`));
        const reply = await client.response();
        assert.equal(reply?.text, `round ${i}`);
        assert.equal(reply.headers.get("connection"), undefined);
        assert.equal(reply.headers.get("keep-alive"), "timeout=7");
      }
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() honours Connection: close", async () => {
  await withServer({}, async (server) => {
    const client = await Client.open(server);
    try {
      await client.send(
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
      );
      const reply = await client.response();
      assert.equal(reply?.status, 200);
      assert.equal(reply.headers.get("connection"), "close");
      assert.ok(await client.closedByServer());
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() closes HTTP/1.0 unless it asks for keep-alive", async () => {
  await withServer({}, async (server) => {
    const client = await Client.open(server);
    try {
      await client.send("GET / HTTP/1.0\r\n\r\n");
      const reply = await client.response();
      assert.equal(reply?.status, 200);
      assert.equal(reply.headers.get("connection"), "close");
      assert.ok(await client.closedByServer());
    } finally {
      client.close();
    }
    const alive = await Client.open(server);
    try {
      for (let i = 0; i < 2; i++) {
        await alive.send("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        const reply = await alive.response();
        assert.equal(reply?.status, 200);
        assert.equal(reply.headers.get("connection"), "keep-alive");
      }
    } finally {
      alive.close();
    }
  });
});

Deno.test("serve() answers hundreds of pipelined requests in order", async () => {
  await withServer({}, async (server) => {
    const client = await Client.open(server);
    try {
      const count = 500;
      let batch = "";
      for (let i = 0; i < count; i++) {
        batch += i % 5 === 4 ? "HEAD / HTTP/1.1\r\nHost: x\r\n\r\n" : post(
          i % 2 ? "http://x/echo" : "/echo",
          `request ${i}`,
        );
      }
      await client.send(batch);
      for (let i = 0; i < count; i++) {
        const reply = await client.response({ head: i % 5 === 4 });
        assert.equal(reply?.status, 200);
        if (i % 5 !== 4) assert.equal(reply.text, `request ${i}`);
      }
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() serves pipelined requests split at every byte", async () => {
  await withServer({}, async (server) => {
    const client = await Client.open(server);
    try {
      const requests = GET + post("/echo", "split") +
        "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" +
        "3\r\nabc\r\n0\r\n\r\n";
      for (const char of requests) await client.send(char);
      assert.equal((await client.response())?.text, HELLO_PAGE);
      assert.equal((await client.response())?.text, "split");
      assert.equal((await client.response())?.text, "abc");
    } finally {
      client.close();
    }
  });
});

// ---------------------------------------------------------------------------
// The request line and fields (RFC 9112 §3, §5)
// ---------------------------------------------------------------------------

Deno.test("serve() rejects malformed request lines with 400", async () => {
  await withServer({}, async (server) => {
    for (
      const line of [
        "GET  / HTTP/1.1",
        "GET /  HTTP/1.1",
        "GET / HTTP/1.1 ",
        "GET / http/1.1",
        "GET / HTTP/1.10",
        "GET / HTTP/1",
        "GET /\x7f HTTP/1.1",
        "GET /\xe9 HTTP/1.1",
        "GET\t/ HTTP/1.1",
        "G(T / HTTP/1.1",
        " GET / HTTP/1.1",
        "GET example.com HTTP/1.1",
        "GET",
      ]
    ) {
      await assertRejected(server, `${line}\r\nHost: x\r\n\r\n`, 400);
    }
  });
});

Deno.test("serve() rejects a fragment in the request-target with 400", async () => {
  await withServer({}, async (server) => {
    // RFC 9112 §3.2: the target has no fragment; a client strips it before
    // sending, so a "#" on the wire is a malformed target.
    for (const target of ["/#", "/#top", "/a?b#c", "http://x/#f"]) {
      await assertRejected(
        server,
        `GET ${target} HTTP/1.1\r\nHost: x\r\n\r\n`,
        400,
      );
    }
    const encoded = await ask(server, "GET /%23 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert.equal(encoded?.status, 404);
  });
});

Deno.test("serve() answers 505 to other major versions, serves 1.x", async () => {
  await withServer({}, async (server) => {
    await assertRejected(server, "GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505);
    await assertRejected(server, "GET / HTTP/0.9\r\nHost: x\r\n\r\n", 505);
    // RFC 9110 §2.5: a higher minor version is served as HTTP/1.1.
    const reply = await ask(server, "GET / HTTP/1.2\r\nHost: x\r\n\r\n");
    assert.equal(reply?.status, 200);
  });
});

Deno.test("serve() answers 414 to a target over 8 KiB", async () => {
  await withServer({}, async (server) => {
    const long = "/" + "a".repeat(8 * 1024);
    await assertRejected(
      server,
      `GET ${long} HTTP/1.1\r\nHost: x\r\n\r\n`,
      414,
    );
    // Even before the line ends, once the head passes its limit.
    await assertRejected(server, `GET /${"b".repeat(20_000)}`, 414);
    const fits = await ask(
      server,
      `GET /${"a".repeat(8 * 1024 - 1)} HTTP/1.1\r\nHost: x\r\n\r\n`,
    );
    assert.equal(fits?.status, 404);
  });
});

Deno.test("serve() answers 431 to a head over 16 KiB or 100 fields", async () => {
  await withServer({}, async (server) => {
    const big = `X-Big: ${"b".repeat(16 * 1024)}\r\n`;
    await assertRejected(
      server,
      `GET / HTTP/1.1\r\nHost: x\r\n${big}\r\n`,
      431,
    );
    await assertRejected(server, `GET / HTTP/1.1\r\nHost: x\r\n${big}`, 431);
    const fields = (n: number) => "X-F: 1\r\n".repeat(n);
    await assertRejected(
      server,
      `GET / HTTP/1.1\r\nHost: x\r\n${fields(100)}\r\n`,
      431,
    );
    const ok = await ask(
      server,
      `GET / HTTP/1.1\r\nHost: x\r\n${fields(99)}\r\n`,
    );
    assert.equal(ok?.status, 200);
  });
});

Deno.test("serve() rejects malformed field lines with 400", async () => {
  await withServer({}, async (server) => {
    for (
      const field of [
        "X-Space : 1",
        "X-Tab\t: 1",
        "X-Fold: 1\r\n folded",
        "X-Fold: 1\r\n\tfolded",
        " X-Lead: 1",
        "X-Nul: a\x00b",
        "X-Ctl: a\x01b",
        "X-Del: a\x7fb",
        "X-Cr: a\rb",
        ": empty-name",
        "X(Bad): 1",
        "No-Colon",
      ]
    ) {
      await assertRejected(
        server,
        `GET / HTTP/1.1\r\nHost: x\r\n${field}\r\n\r\n`,
        400,
      );
    }
    // A bare LF ends no line here (RFC 9112 §2.2 permits rejecting it).
    await assertRejected(server, "GET / HTTP/1.1\nHost: x\n\n", 400);
    await assertRejected(
      server,
      "GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n",
      400,
    );
  });
});

Deno.test("serve() accepts OWS, obs-text and empty values in fields", async () => {
  await withServer({}, async (server) => {
    const reply = await ask(
      server,
      "GET / HTTP/1.1\r\nHost:x\r\nX-A: \t a b \t\r\nX-B:\r\nX-C: caf\xe9\r\n\r\n",
    );
    assert.equal(reply?.status, 200);
  });
});

Deno.test("serve() requires exactly one valid Host in HTTP/1.1", async () => {
  await withServer({}, async (server) => {
    await assertRejected(server, "GET / HTTP/1.1\r\n\r\n", 400);
    await assertRejected(
      server,
      "GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
      400,
    );
    await assertRejected(server, "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400);
    await assertRejected(server, "GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400);
    await assertRejected(
      server,
      "GET / HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n",
      400,
    );
    for (
      const host of ["localhost:7878", "[::1]:80", "", "xn--bcher-kva.example"]
    ) {
      const reply = await ask(
        server,
        `GET / HTTP/1.1\r\nHost: ${host}\r\n\r\n`,
      );
      assert.equal(reply?.status, 200, host);
    }
    const old = await ask(server, "GET / HTTP/1.0\r\n\r\n");
    assert.equal(old?.status, 200);
  });
});

// ---------------------------------------------------------------------------
// Message framing (RFC 9112 §6)
// ---------------------------------------------------------------------------

Deno.test("serve() rejects invalid or conflicting Content-Length with 400", async () => {
  await withServer({}, async (server) => {
    for (
      const fields of [
        "Content-Length: abc",
        "Content-Length: +5",
        "Content-Length: -1",
        "Content-Length: 5 5",
        "Content-Length: 5, 5",
        "Content-Length: 0x5",
        "Content-Length:",
        "Content-Length: 5\r\nContent-Length: 6",
      ]
    ) {
      await assertRejected(
        server,
        `POST /echo HTTP/1.1\r\nHost: x\r\n${fields}\r\n\r\nhello`,
        400,
      );
    }
    const same = await ask(
      server,
      "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n" +
        "Content-Length: 5\r\n\r\nhello",
    );
    assert.equal(same?.text, "hello");
  });
});

Deno.test("serve() answers 413 to a body over the limit without reading it", async () => {
  await withServer({ maxBody: 1000 }, async (server) => {
    // The body is never sent: the reply must come without waiting for it.
    await assertRejected(
      server,
      "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n",
      413,
    );
    await assertRejected(
      server,
      "POST /echo HTTP/1.1\r\nHost: x\r\n" +
        "Content-Length: 99999999999999999999999999\r\n\r\n",
      413,
    );
    await assertRejected(
      server,
      "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" +
        "3e9\r\n",
      413,
    );
    await assertRejected(
      server,
      "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" +
        "fffffffffffffffffffffffffffffffff\r\n",
      413,
    );
    await assertRejected(
      server,
      "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" +
        `1f4\r\n${"a".repeat(500)}\r\n1f5\r\n`,
      413,
    );
    const fits = await ask(server, post("/echo", "a".repeat(1000)));
    assert.equal(fits?.body.length, 1000);
  });
});

Deno.test("serve() delivers an error reply intact while the client still sends", async () => {
  await withServer({ maxBody: 1000 }, async (server) => {
    const client = await Client.open(server);
    try {
      await client.send(
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4000000\r\n\r\n",
      );
      // Keep sending the body the server refused; the 413 must still be
      // read in full, and the connection end in a clean close, not a reset.
      const sending = client.send(new Uint8Array(4_000_000)).catch(() => {});
      const reply = await client.response();
      assert.equal(reply?.status, 413);
      assert.equal(reply.headers.get("connection"), "close");
      await sending;
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() rejects ambiguous Transfer-Encoding with 400, unknown codings before chunked with 501", async () => {
  await withServer({}, async (server) => {
    const chunked = "5\r\nhello\r\n0\r\n\r\n";
    const cases: [string, number][] = [
      ["Transfer-Encoding: chunked\r\nContent-Length: 5", 400],
      ["Content-Length: 5\r\nTransfer-Encoding: chunked", 400],
      ["Transfer-Encoding: chunked, gzip", 400],
      ["Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip", 400],
      ["Transfer-Encoding: chunked, chunked", 400],
      ["Transfer-Encoding:", 400],
      // RFC 9112 §6.3 item 4: a final coding other than chunked leaves the
      // body's end unknown, so the server MUST answer 400 and close. Only a
      // coding it does not know, before a final chunked, is 501 (§6.1).
      ["Transfer-Encoding: gzip", 400],
      ["Transfer-Encoding: identity", 400],
      ["Transfer-Encoding: chunked;q=1", 400],
      ["Transfer-Encoding: gzip, chunked", 501],
      ["Transfer-Encoding: gzip, deflate, chunked", 501],
      ["Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked", 501],
    ];
    for (const [fields, status] of cases) {
      await assertRejected(
        server,
        `POST /echo HTTP/1.1\r\nHost: x\r\n${fields}\r\n\r\n${chunked}`,
        status,
      );
    }
    await assertRejected(
      server,
      `POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n${chunked}`,
      400,
    );
    const split = await ask(
      server,
      "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: CHUNKED\r\n\r\n" +
        chunked,
    );
    assert.equal(split?.text, "hello");
  });
});

Deno.test("serve() accepts chunk extensions by their grammar only (RFC 9112 §7.1.1)", async () => {
  await withServer({}, async (server) => {
    const head =
      "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    // chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ), and
    // value = token / quoted-string.
    for (
      const line of [
        "5;a",
        "5;a=b",
        "5 ; a = b",
        '5\t;\ta\t=\t"q"',
        '5;a="b c";d',
        '5;a="q\\"x\\\\"',
        '5;a=""',
        '5;a="caf\xe9"',
        "5;a;b;c=d",
        "5;!#$%&'*+-.^_`|~=x",
      ]
    ) {
      const reply = await ask(server, `${head}${line}\r\nhello\r\n0\r\n\r\n`);
      assert.equal(reply?.status, 200, JSON.stringify(line));
      assert.equal(reply.text, "hello");
    }
    for (
      const line of [
        "5;",
        "5; ",
        "5 ;",
        "5;;a",
        "5;=b",
        "5;a=",
        "5;a= ",
        "5;a=b c",
        "5;a=b=c",
        "5;a=(b)",
        "5;a@b",
        "5;a,b",
        '5;a="open',
        '5;a="x\\"',
        '5;a="x"y',
        '5;a="\x7f"',
      ]
    ) {
      await assertRejected(
        server,
        `${head}${line}\r\nhello\r\n0\r\n\r\n`,
        400,
      );
    }
  });
});

Deno.test("serve() decodes chunked bodies strictly", async () => {
  await withServer({}, async (server) => {
    const head =
      "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (
      const body of [
        "g\r\nhello\r\n0\r\n\r\n",
        "\r\nhello\r\n0\r\n\r\n",
        "-5\r\nhello\r\n0\r\n\r\n",
        "0x5\r\nhello\r\n0\r\n\r\n",
        "5 \r\nhello\r\n0\r\n\r\n",
        "5 \r\nhel;o\r\n0\r\n\r\n",
        "5 x;y\r\nhello\r\n0\r\n\r\n",
        "5\r\nhelloX\r\n0\r\n\r\n",
        "5\r\nhello\n0\r\n\r\n",
        "5\nhello\r\n0\r\n\r\n",
        "5\r\nhello\r\n0\r\nBad Trailer\r\n\r\n",
        `5;${"e".repeat(5000)}\r\nhello\r\n0\r\n\r\n`,
      ]
    ) {
      await assertRejected(server, head + body, 400);
    }
  });
});

Deno.test("serve() consumes bodies a route ignores, keeping in sync", async () => {
  await withServer({}, async (server) => {
    const client = await Client.open(server);
    try {
      await client.send(
        "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n" +
          "GET /nope HTTP/1.1\r\n" + // 20 bytes of body that look like a request
          "GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" +
          "14\r\nGET /nope HTTP/1.1\r\n\r\n0\r\n\r\n" + post("/echo", "after"),
      );
      assert.equal((await client.response())?.status, 200);
      assert.equal((await client.response())?.status, 200);
      assert.equal((await client.response())?.text, "after");
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() sends 100 Continue before reading an expected body", async () => {
  await withServer({}, async (server) => {
    const client = await Client.open(server);
    try {
      await client.send(
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n" +
          "Expect: 100-continue\r\n\r\n",
      );
      const interim = await client.response();
      assert.equal(interim?.status, 100);
      await client.send("hello");
      const reply = await client.response();
      assert.equal(reply?.status, 200);
      assert.equal(reply.text, "hello");
    } finally {
      client.close();
    }
    await assertRejected(
      server,
      "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n" +
        "Expect: the-impossible\r\n\r\nhello",
      417,
    );
  });
});

// ---------------------------------------------------------------------------
// The parser on its own
// ---------------------------------------------------------------------------

Deno.test("parseRequest() reports incomplete heads, then the bytes consumed", () => {
  const bytes = latin1(GET + "GET /next");
  const request = new RequestHead();
  for (let end = 0; end < GET.length; end++) {
    assert.equal(parseRequest(bytes, 0, end, request), INCOMPLETE);
  }
  assert.equal(parseRequest(bytes, 0, bytes.length, request), GET.length);
  assert.equal(request.method, "GET");
  assert.equal(request.path, "/");
  assert.equal(request.minor, 1);
  assert.equal(
    parseRequest(bytes, GET.length, bytes.length, request),
    INCOMPLETE,
  );
});

Deno.test("parseRequest() returns minus the status for bad input", () => {
  const request = new RequestHead();
  const parse = (text: string) =>
    parseRequest(latin1(text), 0, text.length, request);
  assert.equal(parse("GET / HTTP/1.1\r\n\r\n"), -400);
  assert.equal(parse("GET / HTTP/3.0\r\nHost: x\r\n\r\n"), -505);
  assert.equal(
    parse("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n"),
    -413,
  );
  assert.equal(
    parse("GET / HTTP/1.1\r\nHost: x\r\nExpect: nope\r\n\r\n"),
    -417,
  );
});

Deno.test("parseRequest() gives one verdict, in one pass or after a scan, reading nothing past the end", () => {
  // A head that ends the bytes is parsed in one pass; any other is first
  // scanned for its end. Both must give the same verdict, whatever stale
  // bytes lie in the buffer beyond `end`.
  const heads = [
    GET,
    "\r\n\r\n" + GET,
    "GET /sleep?x=1 HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
    "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",
    "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET / HTTP/1.1\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: x\r\n",
    "GET / HTTP/1.1\r\nHost: x\r\n\r",
    "GET\r\n\r\n",
    "GET /\r\n\r\n",
    "GET / HTTP/1\r\n\r\n",
    "GET / HTTP/\r\n\r\n",
    "GET / HTTP/1.\r\n\r\n",
    "GET / HTTP/1.1\nHost: x\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: x\r\n\n\r\n\r\n",
    "\n\r\n\r\n",
    "X\r\n\r\n",
    "\r\n\r\n\r\n",
    // Two faults in one head: the scan's verdict (a bare LF is 400) comes
    // first, whichever fault a parser would meet first.
    "GET / HTTP/2.0\r\nHost: a\nX: y\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: x\r\nExpect: nope\r\nX: a\nb\r\n\r\n",
    // Over the small limits below: 431 before the field's own fault.
    `GET / HTTP/1.1\r\nHost: x\r\nExpect: nope\r\nX: ${"a".repeat(80)}\r\n\r\n`,
    `GET /${"a".repeat(80)} HTTP/1.1\r\nHost: x\r\n\r\n`,
  ];
  const small = { maxTarget: 40, maxHead: 64, maxFields: 100, maxBody: 1024 };
  const stale = ["\r\n\r\n", "Host: y\r\n\r\n", " HTTP/1.1\r\n\r\n", "\nX"];
  for (const limits of [undefined, small]) {
    for (const head of heads) {
      // One byte more, and the bytes no longer end with the empty line: the
      // head's end is scanned for first.
      const request = new RequestHead();
      const bytes = latin1(head + "G");
      const scanned = parseRequest(bytes, 0, bytes.length, request, limits);
      const fields = request.fieldCount;
      for (const after of stale) {
        const once = new RequestHead();
        const verdict = parseRequest(
          latin1(head + after),
          0,
          head.length,
          once,
          limits,
        );
        const what = `${JSON.stringify(head + after)}, ${limits?.maxHead}`;
        assert.equal(verdict, scanned, what);
        assert.equal(once.fieldCount, fields, what);
      }
    }
  }
});

// ---------------------------------------------------------------------------
// Robustness
// ---------------------------------------------------------------------------

Deno.test("serve() survives clients that reset, vanish or send garbage", async () => {
  await withServer({}, async (server) => {
    for (let i = 0; i < 20; i++) {
      const conn = await Deno.connect({ port: server.addr.port });
      if (i % 3 === 0) await conn.write(latin1("GET / HT"));
      if (i % 3 === 1) {
        await conn.write(crypto.getRandomValues(new Uint8Array(3000)));
      }
      conn.close();
    }
    const reply = await ask(server, GET);
    assert.equal(reply?.status, 200);
  });
});

Deno.test("serve() shutdown() finishes in-flight requests and closes idle ones", async () => {
  const server = start({ sleepDelay: 0.5 });
  const idle = await Client.open(server);
  const busy = await Client.open(server);
  try {
    await idle.send(GET);
    assert.equal((await idle.response())?.status, 200);
    await busy.send("GET /sleep HTTP/1.1\r\nHost: x\r\n\r\n");
    await new Promise((resolve) => setTimeout(resolve, 100));
    const finished = server.shutdown();
    assert.ok(await idle.closedByServer(), "the idle connection is closed");
    await assert.rejects(Deno.connect({ port: server.addr.port }));
    const reply = await busy.response();
    assert.equal(reply?.status, 200);
    assert.equal(reply.text, HELLO_PAGE);
    assert.equal(reply.headers.get("connection"), "close");
    assert.ok(await busy.closedByServer());
    await finished;
    assert.equal(server.forced, 0);
  } finally {
    idle.close();
    busy.close();
    await server.shutdown();
  }
});

Deno.test("serve() shutdown() still answers a connection opened just before", async () => {
  const server = start();
  const fresh = await Client.open(server);
  try {
    await delay(100);
    const finished = server.shutdown();
    // A proxy's new upstream connection: the request follows the connect.
    await delay(50);
    await fresh.send(GET);
    const reply = await fresh.response();
    assert.equal(reply?.status, 200);
    assert.equal(reply.headers.get("connection"), "close");
    assert.ok(await fresh.closedByServer());
    await finished;
  } finally {
    fresh.close();
    await server.shutdown();
  }
});

Deno.test("serve() shutdown() closes a silent new connection after a grace", async () => {
  const server = start();
  const silent = await Client.open(server);
  try {
    await delay(50);
    const began = performance.now();
    await server.shutdown();
    const after = performance.now() - began;
    assert.ok(
      after < 3000,
      `shut down after ${after} ms, not the header timeout`,
    );
    assert.ok(await silent.closedByServer());
  } finally {
    silent.close();
  }
});

Deno.test("serve() stops on an AbortSignal and reports onListen", async () => {
  const controller = new AbortController();
  let listened: Deno.NetAddr | undefined;
  const server = start({
    signal: controller.signal,
    onListen: (addr) => listened = addr,
  });
  assert.equal(listened?.port, server.addr.port);
  controller.abort();
  await server.finished;
  await assert.rejects(Deno.connect({ port: server.addr.port }));
});

Deno.test("serve() closes connections still busy at the shutdown timeout", async () => {
  const server = start({ sleepDelay: 30, shutdownTimeout: 0.3 });
  const client = await Client.open(server);
  try {
    await client.send("GET /sleep HTTP/1.1\r\nHost: x\r\n\r\n");
    await new Promise((resolve) => setTimeout(resolve, 100));
    await server.shutdown();
    assert.equal(server.forced, 1);
    assert.ok(await client.closedByServer());
  } finally {
    client.close();
  }
});

// ---------------------------------------------------------------------------
// Slow clients, limits and the connection cap
// ---------------------------------------------------------------------------

/**
 * Reads until the server closes; returns what arrived and when, in ms. It
 * stops waiting after `limit` ms, so that a server that never closes fails
 * the test rather than hangs it; the caller closes `conn` either way.
 */
async function readUntilClosed(
  conn: Deno.Conn,
  since: number,
  limit = 10_000,
): Promise<{ text: string; after: number }> {
  const chunks: string[] = [];
  const buffer = new Uint8Array(4096);
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<null>((resolve) => {
    timer = setTimeout(resolve, limit, null);
  });
  try {
    let count: number | null;
    while ((count = await Promise.race([conn.read(buffer), late])) !== null) {
      chunks.push(decoder.decode(buffer.subarray(0, count)));
    }
  } catch { /* a reset ends it too */ }
  clearTimeout(timer);
  return { text: chunks.join(""), after: performance.now() - since };
}

Deno.test("serve() cuts slowloris clients at the header timeout and keeps serving", async () => {
  await withServer({ headerTimeout: 1 }, async (server) => {
    const began = performance.now();
    // 100, within any listen backlog (Linux's was 128 before 5.4): more at
    // once would leave some waiting to connect, silent past the timeout.
    const attackers = await Promise.all(
      Array.from(
        { length: 100 },
        () => Deno.connect({ port: server.addr.port }),
      ),
    );
    const cut = attackers.map((conn) => readUntilClosed(conn, began));
    // Dribble one byte at a time: the clock must not restart with each.
    const dribble = (async () => {
      const head = latin1("GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ");
      for (let i = 0; i < 30; i++) {
        await Promise.all(
          attackers.map((conn) =>
            conn.write(head.subarray(i % head.length, i % head.length + 1))
              .catch(() => 0)
          ),
        );
        await delay(100);
      }
    })();
    // Ordinary requests on fresh connections are answered throughout.
    for (let i = 0; i < 10; i++) {
      const reply = await ask(server, GET);
      assert.equal(reply?.status, 200);
      await delay(150);
    }
    const results = await Promise.all(cut);
    await dribble;
    for (const { text, after } of results) {
      assert.match(text, /^HTTP\/1\.1 408 Request Timeout\r\n/);
      assert.match(text, /\r\nConnection: close\r\n/);
      assert.ok(after >= 900, `cut after ${after} ms, not before the timeout`);
      assert.ok(after < 4000, `cut after ${after} ms, near the 1 s timeout`);
    }
    for (const conn of attackers) conn.close();
  });
});

Deno.test("serve() closes a silent new connection at the header timeout", async () => {
  await withServer({ headerTimeout: 0.5 }, async (server) => {
    const conn = await Deno.connect({ port: server.addr.port });
    const { text, after } = await readUntilClosed(conn, performance.now());
    conn.close();
    assert.equal(text, "", "nothing was asked, so nothing is answered");
    assert.ok(after >= 400 && after < 3000, `closed after ${after} ms`);
  });
});

Deno.test("serve() closes idle keep-alive connections, not busy ones", async () => {
  await withServer({ idleTimeout: 0.5, sleepDelay: 1.5 }, async (server) => {
    const idle = await Client.open(server);
    const busy = await Client.open(server);
    try {
      await idle.send(GET);
      const reply = await idle.response();
      assert.equal(reply?.headers.get("keep-alive"), "timeout=0");
      const began = performance.now();
      await busy.send("GET /sleep HTTP/1.1\r\nHost: x\r\n\r\n");
      assert.ok(await idle.closedByServer());
      const after = performance.now() - began;
      assert.ok(after >= 400 && after < 3000, `closed after ${after} ms`);
      // The sleeper outlives the idle timeout three times over.
      assert.equal((await busy.response())?.status, 200);
    } finally {
      idle.close();
      busy.close();
    }
  });
});

Deno.test("serve() answers 408 to a body that stalls", async () => {
  await withServer({ bodyTimeout: 0.5 }, async (server) => {
    const conn = await Deno.connect({ port: server.addr.port });
    await conn.write(
      latin1("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"),
    );
    const began = performance.now();
    const { text, after } = await readUntilClosed(conn, began);
    conn.close();
    assert.match(text, /^HTTP\/1\.1 408 /);
    assert.ok(after >= 400 && after < 3000, `cut after ${after} ms`);
  });
});

Deno.test("serve() cuts a client that stops reading its responses", async () => {
  await withServer({ bodyTimeout: 0.5 }, async (server) => {
    const conn = await Deno.connect({ port: server.addr.port });
    // Pipeline requests without ever reading: once the socket buffers are
    // full the server stops reading (backpressure), then cuts the stalled
    // writer, and our writes fail. Bounded: at most 20 s of writing.
    const batch = latin1(GET.repeat(1000));
    const began = performance.now();
    let failed = false;
    while (performance.now() - began < 20_000) {
      try {
        await conn.write(batch);
      } catch {
        failed = true;
        break;
      }
    }
    conn.close();
    assert.ok(failed, "the server ended the connection");
    assert.equal(server.connections, 0);
  });
});

Deno.test("serve() never holds more than maxConnections at once", async () => {
  await withServer(
    { maxConnections: 50, sleepDelay: 0.2 },
    async (server) => {
      let most = 0;
      const watching = setInterval(() => {
        most = Math.max(most, server.connections);
      }, 5);
      try {
        const replies = await Promise.all(
          Array.from({ length: 200 }, () =>
            ask(
              server,
              "GET /sleep HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )),
        );
        assert.equal(
          replies.filter((reply) => reply?.status === 200).length,
          200,
        );
      } finally {
        clearInterval(watching);
      }
      assert.ok(most <= 50, `at most 50 at once, saw ${most}`);
      assert.ok(most >= 40, `the cap was reached (${most})`);
    },
  );
});

// ---------------------------------------------------------------------------
// The access log (Common Log Format)
// ---------------------------------------------------------------------------

const MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(" ");

/**
 * `host - - [time] "request line" status bytes`, with only `\"`, `\\` and
 * `\xHH` escapes in the quoted request line.
 */
const LOG_LINE = new RegExp(
  [
    String.raw`^(\S+) - - `,
    String.raw`\[(\d\d)/(\w{3})/(\d{4}):(\d\d):(\d\d):(\d\d) \+0000\] `,
    String.raw`"((?:[^"\\]|\\["\\]|\\x[0-9A-Fa-f]{2})*)" `,
    String.raw`(\d{3}) (\d+|-)$`,
  ].join(""),
);

/** One access log line, parsed. */
interface LogLine {
  time: number;
  request: string;
  status: number;
  /** The body bytes sent (`-` is 0). */
  bytes: number;
}

/** Parses one access log line, failing unless it is Common Log Format. */
function parseLogLine(line: string): LogLine {
  for (const char of line) {
    assert.ok(char >= " " && char !== "\x7f", `a control byte in ${line}`);
  }
  const match = LOG_LINE.exec(line);
  assert.ok(match, `a Common Log Format line: ${JSON.stringify(line)}`);
  const [
    ,
    ,
    day,
    month,
    year,
    hours,
    minutes,
    seconds,
    request,
    status,
    bytes,
  ] = match;
  assert.ok(MONTHS.includes(month), month);
  const time = Date.UTC(
    Number(year),
    MONTHS.indexOf(month),
    Number(day),
    Number(hours),
    Number(minutes),
    Number(seconds),
  );
  return {
    time,
    request,
    status: Number(status),
    bytes: bytes === "-" ? 0 : Number(bytes),
  };
}

function logLines(batches: string[]): string[] {
  return batches.join("").split("\n").filter((line) => line !== "");
}

Deno.test("serve() logs the time a request began, not when it was answered", async () => {
  const batches: string[] = [];
  const server = start({ accessLog: (lines) => batches.push(lines) });
  const client = await Client.open(server);
  let began = 0;
  try {
    began = Date.now();
    await client.send("GET /slowly HTTP/1.1\r\nHost: x\r\n");
    // Common Log Format's time is when the request was received: a head
    // that takes 2.5 s to arrive is logged at the second it began.
    await delay(2500);
    await client.send("\r\n");
    assert.equal((await client.response())?.status, 404);
  } finally {
    client.close();
    await server.shutdown();
  }
  const lines = logLines(batches);
  assert.equal(lines.length, 1);
  const { time, request } = parseLogLine(lines[0]);
  assert.equal(request, "GET /slowly HTTP/1.1");
  // The logged second is the one the head began in (with 1 s of slack for
  // a slow machine), well before the head was complete, 2.5 s later.
  const when = `logged ${new Date(time).toISOString()}, began ${
    new Date(began).toISOString()
  }`;
  assert.ok(time <= began + 1000, when);
  assert.ok(time >= began - 2000, when);
});

Deno.test("serve() escapes quotes, backslashes and control bytes in the access log", async () => {
  const batches: string[] = [];
  await withServer(
    { accessLog: (lines) => batches.push(lines) },
    async (server) => {
      const quoted = await ask(
        server,
        'GET /say"hi"\\now HTTP/1.1\r\nHost: x\r\n\r\n',
      );
      assert.equal(quoted?.status, 404);
      for (const control of ["\x01", "\x1b", "\x7f"]) {
        await assertRejected(
          server,
          `GET /a${control}b HTTP/1.1\r\nHost: x\r\n\r\n`,
          400,
        );
      }
    },
  );
  // Every line must still parse: a raw quote would end the request field
  // early, a raw control byte could forge a line or a terminal escape.
  const lines = logLines(batches);
  assert.equal(lines.length, 4);
  const requests = lines.map((line) => parseLogLine(line).request);
  assert.equal(requests[0], String.raw`GET /say\"hi\"\\now HTTP/1.1`);
});

Deno.test("serve() logs every response of a pipelined batch, repeats included, in order, in batches a pipe holds", async () => {
  const batches: string[] = [];
  // Repeated lines are counted and copied out when a batch is written: runs
  // of them, broken by other lines, across several batches, must all come
  // out, each in its place.
  const runs: [string, number, number][] = [
    ["GET / HTTP/1.1", 3, 200],
    ["GET /x HTTP/1.1", 1, 404],
    ["GET /y HTTP/1.1", 2, 404],
    ["GET / HTTP/1.1", 1500, 200],
    ["GET / HTTP/1.0", 2, 200],
    ["HEAD / HTTP/1.1", 2, 200],
    ["GET /x HTTP/1.1", 700, 404],
    ["GET / HTTP/1.1", 1, 200],
    ["BREW / HTTP/1.1", 1, 501], // refused: the connection closes
  ];
  const expected = runs.flatMap(([line, count, status]) =>
    Array.from({ length: count }, () => ({ request: line, status }))
  );
  await withServer(
    { accessLog: (lines) => batches.push(lines) },
    async (server) => {
      const client = await Client.open(server);
      try {
        await client.send(
          expected.map(({ request }) =>
            `${request}\r\nHost: x\r\nConnection: keep-alive\r\n\r\n`
          ).join(""),
        );
        for (const { request, status } of expected) {
          const reply = await client.response({
            head: request.startsWith("HEAD"),
          });
          assert.equal(reply?.status, status);
        }
      } finally {
        client.close();
      }
      // Another unknown method, on another connection, to the same target.
      await assertRejected(server, "PURR / HTTP/1.1\r\nHost: x\r\n\r\n", 501);
      expected.push({ request: "PURR / HTTP/1.1", status: 501 });
    },
  );
  assert.ok(batches.length > 1, `${batches.length} batch(es)`);
  // A batch is one write to stdout: whole lines, and no more than a Linux pipe
  // holds (64 KiB), or the write waits for the reader partway through.
  for (const batch of batches) {
    assert.ok(batch.endsWith("\n"), JSON.stringify(batch.slice(-80)));
    const bytes = encoder.encode(batch).length;
    assert.ok(bytes <= 64 * 1024, `a batch of ${bytes} bytes`);
  }
  const logged = logLines(batches).map((line) => {
    const { request, status } = parseLogLine(line);
    return { request, status };
  });
  assert.deepEqual(logged, expected);
});

// ---------------------------------------------------------------------------
// Handlers: serve(handler), shaped like Deno.serve
// ---------------------------------------------------------------------------

const hello: ServeHandler = (request) =>
  new Response(`hello ${pathOf(request)}`);

Deno.test("serve() refuses an option value that would turn a defence off, before it listens", () => {
  const cases: [ServeOptions, string][] = [
    [
      { headerTimeout: NaN },
      "serve(): headerTimeout must be a number of seconds above 0, not NaN",
    ],
    [
      { idleTimeout: 0 },
      "serve(): idleTimeout must be a number of seconds above 0, not 0",
    ],
    [
      { bodyTimeout: "30" as unknown as number },
      'serve(): bodyTimeout must be a number of seconds above 0, not "30"',
    ],
    [
      { maxBody: -1 },
      "serve(): maxBody must be a whole number above 0, not -1",
    ],
    [
      { maxConnections: 1.5 },
      "serve(): maxConnections must be a whole number above 0, not 1.5",
    ],
    [
      { maxHead: Infinity },
      "serve(): maxHead must be a whole number above 0, not Infinity",
    ],
    [
      { shutdownTimeout: Infinity },
      "serve(): shutdownTimeout must be a number of seconds above 0, not Infinity",
    ],
    [
      { port: 65536 },
      "serve(): port must be a port number (0-65535), not 65536",
    ],
  ];
  for (const [options, message] of cases) {
    assert.throws(() => serve({ ...options, accessLog: false }), {
      name: "TypeError",
      message,
    });
  }
});

Deno.test(
  "serve() takes a handler in each of Deno.serve's three call forms",
  quietly(
    (_, stdout) =>
      // serve(handler) logs, as Deno.serve would, to stdout.
      assert.match(
        stdout,
        /^127\.0\.0\.1 - - \[[^\]]+\] "GET \/one HTTP\/1\.1" 200 10\n$/,
      ),
    async () => {
      // serve(handler): every option at its default, so the book's port 7878.
      const first = serve(hello);
      try {
        assert.equal(first.addr.port, 7878);
        const reply = await ask(first, "GET /one HTTP/1.1\r\nHost: x\r\n\r\n");
        assert.equal(reply?.text, "hello /one");
      } finally {
        await first.shutdown();
      }
      const forms: [string, () => Server, string][] = [
        [
          "serve(options, handler)",
          () => serve({ port: 0, accessLog: false }, hello),
          "hello /two",
        ],
        [
          "serve({ ...options, handler })",
          () => serve({ port: 0, accessLog: false, handler: hello }),
          "hello /two",
        ],
        // Without a handler, the book's routes: /two is their 404 page.
        [
          "serve(options)",
          () => serve({ port: 0, accessLog: false }),
          NOT_FOUND_PAGE,
        ],
      ];
      for (const [form, open, expected] of forms) {
        const server = open();
        try {
          const reply = await ask(
            server,
            "GET /two HTTP/1.1\r\nHost: x\r\n\r\n",
          );
          assert.equal(reply?.text, expected, form);
        } finally {
          await server.shutdown();
        }
      }
    },
  ),
);

Deno.test("serve() gives the handler a real Request: URL, method, every field", async () => {
  const seen: Record<string, unknown>[] = [];
  const remotes: Deno.NetAddr[] = [];
  await withHandler({}, (request, info) => {
    seen.push({
      isRequest: request instanceof Request,
      method: request.method,
      url: request.url,
      headers: [...request.headers],
      bodyIsNull: request.body === null,
    });
    remotes.push(info.remoteAddr);
    return new Response("seen");
  }, async (server) => {
    const client = await Client.open(server);
    try {
      await client.send(
        "GET /a/b?c=d&e HTTP/1.1\r\nHost: example.com:8080\r\nX-Multi: a\r\n" +
          "Accept: text/html\r\nX-Multi: b\r\nX-Empty:\r\n\r\n" +
          // RFC 9112 §3.2.2: an absolute-form target overrides Host.
          "DELETE http://other.example:81/p?q=1 HTTP/1.1\r\n" +
          "Host: elsewhere.example\r\n\r\n" +
          "POST /no-body HTTP/1.1\r\nHost: x\r\n\r\n",
      );
      for (let i = 0; i < 3; i++) {
        assert.equal((await client.response())?.text, "seen");
      }
      assert.deepEqual(seen, [
        {
          isRequest: true,
          method: "GET",
          url: "http://example.com:8080/a/b?c=d&e",
          headers: [
            ["accept", "text/html"],
            ["host", "example.com:8080"],
            ["x-empty", ""],
            ["x-multi", "a, b"],
          ],
          bodyIsNull: true,
        },
        {
          isRequest: true,
          method: "DELETE",
          url: "http://other.example:81/p?q=1",
          headers: [["host", "elsewhere.example"]],
          bodyIsNull: true,
        },
        {
          isRequest: true,
          method: "POST",
          url: "http://x/no-body",
          headers: [["host", "x"]],
          bodyIsNull: true,
        },
      ]);
      const local = client.conn.localAddr as Deno.NetAddr;
      for (const remote of remotes) {
        assert.equal(remote.transport, "tcp");
        assert.equal(remote.hostname, "127.0.0.1");
        assert.equal(remote.port, local.port);
      }
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() gives the handler its URL and method as the Fetch API spells them, in a request that clones and wraps", async () => {
  const seen: Record<string, unknown>[] = [];
  await withHandler({}, async (request) => {
    const copy = request.clone();
    // Wrapping a request takes its body (Fetch): the clone's, here.
    const wrapped = new Request(copy, { headers: { "x-added": "1" } });
    seen.push({
      method: request.method,
      url: request.url,
      copy: [copy.method, copy.url, copy.headers.get("x-f")],
      wrapped: [wrapped.method, wrapped.url, wrapped.headers.get("x-added")],
      signal: request.signal instanceof AbortSignal && !request.signal.aborted,
      body: [await wrapped.text(), await request.text(), request.bodyUsed],
    });
    return new Response("seen");
  }, async (server) => {
    const client = await Client.open(server);
    try {
      await client.send(
        // WHATWG URL: the host in lower case, no default port, no dot
        // segments; Fetch: a standard method in capitals, in any case.
        "get /a/./b/../c?x HTTP/1.1\r\nHost: EXAMPLE.com:80\r\n" +
          "X-F: 1\r\n\r\n" +
          "patch /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n" +
          "X-F: 2\r\n\r\nhi",
      );
      for (let i = 0; i < 2; i++) {
        assert.equal((await client.response())?.text, "seen");
      }
      // A Host the parser lets through that is no URL's: refused.
      await client.send("GET / HTTP/1.1\r\nHost: x:99999\r\n\r\n");
      assert.equal((await client.response())?.status, 400);
      assert.deepEqual(seen, [
        {
          method: "GET",
          url: "http://example.com/a/c?x",
          copy: ["GET", "http://example.com/a/c?x", "1"],
          wrapped: ["GET", "http://example.com/a/c?x", "1"],
          signal: true,
          body: ["", "", false],
        },
        {
          method: "patch",
          url: "http://x/p",
          copy: ["patch", "http://x/p", "2"],
          wrapped: ["patch", "http://x/p", "1"],
          signal: true,
          body: ["hi", "hi", true],
        },
      ]);
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() gives the handler all 99 fields of a head, then only the next head's own", async () => {
  const counts: number[] = [];
  await withHandler({}, (request) => {
    counts.push([...request.headers].length);
    return new Response(request.headers.get("x-f98") ?? "none");
  }, async (server) => {
    const client = await Client.open(server);
    try {
      const many = Array.from({ length: 98 }, (_, i) => `X-F${i}: v${i}\r\n`)
        .join("");
      await client.send(
        `GET / HTTP/1.1\r\nHost: x\r\n${many}\r\n` +
          "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
      );
      assert.equal((await client.response())?.text, "none");
      assert.equal((await client.response())?.text, "none");
      await client.send(
        `GET / HTTP/1.1\r\nHost: x\r\n${many}X-F98: last\r\n\r\n`,
      );
      assert.equal((await client.response())?.text, "last");
      assert.deepEqual(counts, [99, 1, 100]);
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() streams a request body to the handler as it arrives", async () => {
  let first = Promise.withResolvers<string>();
  await withHandler({}, async (request) => {
    const reader = request.body!.getReader();
    let result = await reader.read();
    first.resolve(decoder.decode(result.value));
    let text = "";
    while (!result.done) {
      text += decoder.decode(result.value);
      result = await reader.read();
    }
    return new Response(text);
  }, async (server) => {
    const uploads = [
      [
        "Transfer-Encoding: chunked",
        "5\r\nhello\r\n",
        "6\r\n world\r\n0\r\n\r\n",
      ],
      ["Content-Length: 11", "hello", " world"],
    ];
    for (const [framing, start, rest] of uploads) {
      first = Promise.withResolvers<string>();
      const client = await Client.open(server);
      try {
        await client.send(
          `POST /upload HTTP/1.1\r\nHost: x\r\n${framing}\r\n\r\n${start}`,
        );
        // The rest is only sent once the handler has the first bytes: a
        // server that read the whole body first would never call it.
        const seen = await within(first.promise, `${framing}: first bytes`);
        assert.ok(seen.length > 0 && "hello".startsWith(seen), seen);
        await client.send(rest);
        assert.equal((await client.response())?.text, "hello world");
      } finally {
        client.close();
      }
    }
  });
});

Deno.test(
  "serve() errors a streamed body that grows past maxBody, and answers 413",
  quietly(
    (errors) =>
      assert.deepEqual(errors, [
        "error: the handler failed: the request body was refused with 413",
      ]),
    async () => {
      const started = Promise.withResolvers<void>();
      const failed = Promise.withResolvers<unknown>();
      await withHandler({ maxBody: 1000 }, async (request) => {
        const reader = request.body!.getReader();
        try {
          await reader.read();
          started.resolve();
          while (!(await reader.read()).done) { /* read on */ }
        } catch (error) {
          failed.resolve(error);
          throw error;
        }
        return new Response("read it all");
      }, async (server) => {
        const client = await Client.open(server);
        try {
          await client.send(
            "POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" +
              `1f4\r\n${"a".repeat(500)}\r\n`,
          );
          await within(started.promise, "the handler reads the first chunk");
          await client.send(`1f5\r\n${"b".repeat(501)}\r\n`);
          await within(failed.promise, "the body stream errors");
          const reply = await client.response();
          assert.equal(reply?.status, 413);
          assert.equal(reply.headers.get("connection"), "close");
          assert.ok(await client.closedByServer());
        } finally {
          client.close();
        }
      });
    },
  ),
);

Deno.test("serve() answers 413 to a declared length over maxBody before the handler runs", async () => {
  let called = false;
  await withHandler({ maxBody: 1000 }, () => {
    called = true;
    return new Response("handled");
  }, async (server) => {
    // The body is never sent: the reply must come without it.
    await assertRejected(
      server,
      "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n",
      413,
    );
    assert.equal(called, false);
  });
});

Deno.test("serve() sends 100 Continue only when the handler reads the body", async () => {
  const entered = Promise.withResolvers<void>();
  const go = Promise.withResolvers<void>();
  await withHandler({}, async (request) => {
    entered.resolve();
    await go.promise;
    return new Response(`got ${await request.text()}`);
  }, async (server) => {
    const client = await Client.open(server);
    try {
      await client.send(
        "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n" +
          "Expect: 100-continue\r\n\r\n",
      );
      await within(entered.promise, "the handler runs before the body comes");
      assert.ok(
        await client.quietFor(200),
        "no 100 Continue before the handler reads",
      );
      go.resolve();
      const interim = await within(client.response(), "100 Continue");
      assert.equal(interim?.status, 100);
      await client.send("hello");
      const reply = await client.response();
      assert.equal(reply?.status, 200);
      assert.equal(reply.text, "got hello");
      await client.send(GET);
      assert.equal((await client.response())?.text, "got ");
    } finally {
      go.resolve();
      client.close();
    }
  });
});

Deno.test("serve() sends no 100 Continue to a handler that answers without reading, and closes", async () => {
  await withHandler(
    {},
    () => new Response("no thanks", { status: 403 }),
    async (server) => {
      const client = await Client.open(server);
      try {
        // The client waits for 100 Continue and never sends the body: the
        // reply must come anyway, and the connection end, since where the
        // next request would start is unknown (RFC 9110 §10.1.1).
        await client.send(
          "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n" +
            "Expect: 100-continue\r\n\r\n",
        );
        const reply = await client.response();
        assert.equal(reply?.status, 403);
        assert.equal(reply.text, "no thanks");
        assert.equal(reply.headers.get("connection"), "close");
        assert.ok(await client.closedByServer());
      } finally {
        client.close();
      }
    },
  );
});

Deno.test("serve() discards a body the handler left unread, keeping in sync", async () => {
  const seen: string[] = [];
  await withHandler({}, (request) => {
    const body = request.body === null ? "no body" : "a body";
    seen.push(`${request.method} ${pathOf(request)}: ${body}`);
    return new Response(pathOf(request));
  }, async (server) => {
    const client = await Client.open(server);
    try {
      // Each body looks like a request: read as one, the replies would
      // come out of step.
      await client.send(
        post("/unread", "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n") +
          "POST /chunked HTTP/1.1\r\nHost: x\r\n" +
          "Transfer-Encoding: chunked\r\n\r\n" +
          "14\r\nGET /nope HTTP/1.1\r\n\r\n0\r\n\r\n" +
          // A GET's body is not the handler's (a GET Request has none),
          // but it is still on the wire.
          "GET /get HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n" +
          "GET /nope HTTP/1.1\r\n" +
          "GET /last HTTP/1.1\r\nHost: x\r\n\r\n",
      );
      for (const path of ["/unread", "/chunked", "/get", "/last"]) {
        const reply = await client.response();
        assert.equal(reply?.text, path);
        assert.equal(reply.headers.get("connection"), undefined, path);
      }
      assert.deepEqual(seen, [
        "POST /unread: a body",
        "POST /chunked: a body",
        "GET /get: no body",
        "GET /last: no body",
      ]);
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() closes after the reply when an unread body is over 256 KiB", async () => {
  await withHandler({}, () => new Response("not read"), async (server) => {
    const client = await Client.open(server);
    try {
      const size = 300 * 1024;
      await client.send(
        `POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: ${size}\r\n\r\n`,
      );
      const sending = client.send(
        concat([new Uint8Array(size).fill(0x61), latin1(GET)]),
      ).catch(() => {});
      const reply = await client.response();
      assert.equal(reply?.status, 200);
      assert.equal(reply.text, "not read");
      assert.equal(reply.headers.get("connection"), "close");
      assert.ok(
        await client.closedByServer(),
        "no reply to the request behind the body",
      );
      await sending;
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() writes a field value's Latin-1 bytes as bytes, before a UTF-8 body", async () => {
  await withHandler({}, () =>
    new Response("ok ☃", {
      headers: { "x-name": "caf\u00e9", "content-type": "text/plain" },
    }), async (server) => {
    const client = await Client.open(server);
    try {
      await client.send(
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
      );
      const bytes = await client.untilClosed();
      // One byte for é in the head (RFC 9110 §5.5: octets), UTF-8 after it.
      assert.ok(indexOf(bytes, "\r\nx-name: caf\u00e9\r\n") > 0);
      assert.ok(indexOf(bytes, "\r\nContent-Length: 6\r\n") > 0);
      assert.deepEqual(bytes.subarray(-6), new TextEncoder().encode("ok ☃"));
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() sends Content-Length, in bytes, for a body of known length", async () => {
  const bodies: Record<string, () => BodyInit | null> = {
    "/string": () => "héllo wörld ☃",
    // Four bytes for a surrogate pair; a lone surrogate is U+FFFD's three.
    "/astral": () => "a😀b",
    "/lone": () => "x\ud800y\udc00",
    "/long": () => "ü☃".repeat(3000),
    "/bytes": () => new Uint8Array([0, 1, 0xfe, 0xff]),
    "/buffer": () => new Uint8Array([1, 2, 3]).buffer,
    "/blob": () => new Blob(["blöb ☃"], { type: "text/x-blob" }),
    "/params": () => new URLSearchParams({ q: "ä b", r: "☃" }),
    "/form": () => {
      const form = new FormData();
      form.append("field", "välue ☃");
      return form;
    },
    "/null": () => null,
  };
  await withHandler(
    {},
    (request) => new Response(bodies[pathOf(request)]()),
    async (server) => {
      const client = await Client.open(server);
      try {
        const paths = Object.keys(bodies);
        await client.send(
          paths.map((path) => `GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`)
            .join(""),
        );
        for (const path of paths) {
          const head = await client.head();
          assert.equal(head?.status, 200, path);
          assert.ok(!head.headers.has("transfer-encoding"), `${path} chunked`);
          assert.ok(head.headers.has("content-length"), path);
          const body = await client.body(head);
          assert.equal(head.headers.get("content-length"), `${body.length}`);
          const type = head.headers.get("content-type");
          if (path === "/form") {
            const boundary = /^multipart\/form-data; boundary=(.+)$/.exec(
              type ?? "",
            )?.[1];
            assert.ok(boundary, type);
            const text = decoder.decode(body);
            assert.ok(text.includes(boundary), "the boundary in the body");
            assert.match(text, /name="field"\r\n\r\nvälue ☃\r\n/);
            continue;
          }
          const expected = new Response(bodies[path]());
          assert.equal(
            type,
            expected.headers.get("content-type") ?? undefined,
            path,
          );
          assert.deepEqual(
            body,
            new Uint8Array(await expected.arrayBuffer()),
            path,
          );
        }
      } finally {
        client.close();
      }
    },
  );
});

Deno.test("serve() sends each chunk of a streamed body as the stream yields it", async () => {
  const next = Promise.withResolvers<void>();
  await withHandler({}, (request) => {
    if (pathOf(request) !== "/events") return new Response("after");
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(encoder.encode("data: one\n\n"));
        next.promise.then(() => {
          controller.enqueue(encoder.encode("data: two\n\n"));
          controller.close();
        });
      },
    });
    return new Response(body, {
      headers: { "content-type": "text/event-stream" },
    });
  }, async (server) => {
    const client = await Client.open(server);
    try {
      await client.send("GET /events HTTP/1.1\r\nHost: x\r\n\r\n");
      const head = await within(client.head(), "the head, before the end");
      assert.equal(head?.status, 200);
      assert.equal(head.headers.get("transfer-encoding"), "chunked");
      assert.equal(head.headers.get("content-type"), "text/event-stream");
      // The second event is only made once the first has been read, as
      // Server-Sent Events are: a server that waited for the stream to end
      // would never send the first.
      let text = "";
      while (!text.endsWith("\n\n")) {
        const chunk = await within(client.chunk(), "the first event");
        assert.ok(chunk, "the stream has not ended yet");
        text += decoder.decode(chunk);
      }
      assert.equal(text, "data: one\n\n");
      next.resolve();
      let chunk: Uint8Array | null;
      while ((chunk = await client.chunk()) !== null) {
        text += decoder.decode(chunk);
      }
      assert.equal(text, "data: one\n\ndata: two\n\n");
      // The last chunk ended the body: the connection goes on.
      await client.send(GET);
      assert.equal((await client.response())?.text, "after");
    } finally {
      next.resolve();
      client.close();
    }
  });
});

Deno.test("serve() sends a streamed body to HTTP/1.0 delimited by the close", async () => {
  await withHandler({}, () => {
    // Its end is not there at once: its length is not known.
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(encoder.encode("one, "));
      },
      async pull(controller) {
        await delay(10);
        controller.enqueue(encoder.encode("two"));
        controller.close();
      },
    });
    return new Response(body);
  }, async (server) => {
    // HTTP/1.0 has no chunked coding (RFC 9112 §6.1): the close ends the
    // body, even when the client asked to keep the connection.
    for (const fields of ["", "Connection: keep-alive\r\n"]) {
      const client = await Client.open(server);
      try {
        await client.send(`GET /stream HTTP/1.0\r\n${fields}\r\n`);
        const head = await client.head();
        assert.equal(head?.status, 200);
        assert.ok(!head.headers.has("transfer-encoding"), fields);
        assert.ok(!head.headers.has("content-length"), fields);
        assert.notEqual(head.headers.get("connection"), "keep-alive");
        assert.equal(decoder.decode(await client.untilClosed()), "one, two");
      } finally {
        client.close();
      }
    }
  });
});

Deno.test(
  "serve() sends no body and no chunked framing for HEAD, 204 and 304",
  quietly(
    (errors) =>
      assert.deepEqual(errors, [
        "error: the handler failed: a HEAD request that fails",
      ]),
    async () => {
      await withHandler({}, (request) => {
        switch (pathOf(request)) {
          case "/text":
            return new Response("hello body");
          case "/stream":
            return new Response(
              new ReadableStream({
                start(controller) {
                  controller.enqueue(encoder.encode("streamed"));
                  controller.close();
                },
              }),
            );
          case "/204":
            return new Response(null, { status: 204 });
          case "/304":
            return new Response(null, {
              status: 304,
              headers: { etag: '"v1"' },
            });
          case "/throw":
            throw new Error("a HEAD request that fails");
        }
        return new Response("last");
      }, async (server) => {
        const client = await Client.open(server);
        try {
          // Any byte of body after these would be read as the next response.
          await client.send(
            "HEAD /text HTTP/1.1\r\nHost: x\r\n\r\n" +
              "HEAD /stream HTTP/1.1\r\nHost: x\r\n\r\n" +
              "GET /204 HTTP/1.1\r\nHost: x\r\n\r\n" +
              "GET /304 HTTP/1.1\r\nHost: x\r\n\r\n" +
              "HEAD /throw HTTP/1.1\r\nHost: x\r\n\r\n" +
              "GET /last HTTP/1.1\r\nHost: x\r\n\r\n",
          );
          const text = await client.response({ head: true });
          assert.equal(text?.status, 200);
          // RFC 9110 §8.6: if sent, the length a GET would have had.
          const length = text.headers.get("content-length");
          assert.ok(length === undefined || length === "10", length);
          assert.equal((await client.response({ head: true }))?.status, 200);
          // RFC 9110 §8.6, RFC 9112 §6.1: no Content-Length, no
          // Transfer-Encoding with a 204.
          const noContent = await client.response();
          assert.equal(noContent?.status, 204);
          assert.ok(!noContent.headers.has("content-length"));
          assert.ok(!noContent.headers.has("transfer-encoding"));
          const notModified = await client.response();
          assert.equal(notModified?.status, 304);
          assert.equal(notModified.headers.get("etag"), '"v1"');
          assert.ok(!notModified.headers.has("transfer-encoding"));
          const failed = await client.response({ head: true });
          assert.equal(failed?.status, 500);
          assert.equal((await client.response())?.text, "last");
        } finally {
          client.close();
        }
      });
    },
  ),
);

Deno.test("serve() sends each Set-Cookie on its own line", async () => {
  const cookies = [
    "a=1; Path=/",
    "b=2; Expires=Wed, 21 Oct 2026 07:28:00 GMT; HttpOnly",
  ];
  await withHandler({}, () => {
    const headers = new Headers();
    for (const cookie of cookies) headers.append("set-cookie", cookie);
    return new Response("cookies", { headers });
  }, async (server) => {
    // RFC 6265 §3: Set-Cookie cannot be folded into one comma-separated
    // line, since its values hold commas themselves.
    const reply = await ask(server, GET);
    assert.deepEqual(
      reply?.fields.filter(([name]) => name === "set-cookie")
        .map(([, value]) => value),
      cookies,
    );
  });
});

Deno.test("serve() adds Date to a handler's response unless it has one", async () => {
  const date = "Tue, 01 Jan 2030 00:00:00 GMT";
  await withHandler(
    {},
    (request) =>
      pathOf(request) === "/dated"
        ? new Response("x", { headers: { date } })
        : new Response("x"),
    async (server) => {
      const added = (await ask(server, GET))?.headers.get("date");
      assert.match(
        added ?? "",
        /^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT$/,
      );
      assert.ok(Math.abs(Date.parse(added!) - Date.now()) < 60_000, added);
      const kept = await ask(server, "GET /dated HTTP/1.1\r\nHost: x\r\n\r\n");
      assert.equal(kept?.headers.get("date"), date);
    },
  );
});

Deno.test("serve() owns the framing: a handler's framing fields never desynchronise", async () => {
  const lies: Record<string, HeadersInit> = {
    "/long": { "content-length": "99" },
    "/short": { "content-length": "2" },
    "/chunked": { "transfer-encoding": "chunked" },
    "/gzip": { "transfer-encoding": "gzip, chunked" },
    "/keep": { connection: "keep-alive", "keep-alive": "timeout=999" },
  };
  await withHandler({}, (request) => {
    const path = pathOf(request);
    return new Response(path === "/end" ? "end" : "hello", {
      headers: lies[path],
    });
  }, async (server) => {
    const client = await Client.open(server);
    try {
      const paths = Object.keys(lies);
      await client.send(
        [...paths, "/end"].map((path) =>
          `GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`
        ).join(""),
      );
      for (const path of paths) {
        const reply = await client.response();
        assert.equal(reply?.text, "hello", path);
        assert.equal(reply.headers.get("content-length"), "5", path);
        assert.equal(reply.headers.get("connection"), undefined, path);
        assert.notEqual(reply.headers.get("keep-alive"), "timeout=999");
      }
      assert.equal((await client.response())?.text, "end");
    } finally {
      client.close();
    }
    // HTTP/1.0 closes unless it asked to keep alive, whatever the handler
    // says (RFC 9112 §9.3).
    const old = await Client.open(server);
    try {
      await old.send("GET /keep HTTP/1.0\r\n\r\n");
      const reply = await old.response();
      assert.equal(reply?.text, "hello");
      assert.notEqual(reply.headers.get("connection"), "keep-alive");
      assert.ok(await old.closedByServer());
    } finally {
      old.close();
    }
  });
});

Deno.test(
  "serve() sends no byte past a length it announced for a stream",
  quietly(
    (errors) =>
      assert.deepEqual(errors, [
        "error: the response body failed: the response body is shorter than announced",
      ]),
    async () => {
      // A stream's length is only known at its end. The server may frame it
      // its own way (chunked), or trust the handler's Content-Length; then a
      // stream that breaks it must end the connection, never spill bytes that
      // the client would read as the next response.
      await withHandler({ idleTimeout: 0.5 }, (request) => {
        if (pathOf(request) === "/end") return new Response("end");
        // Not all there at once, so its length is not known when the head goes.
        const body = new ReadableStream({
          start(controller) {
            controller.enqueue(encoder.encode("hel"));
          },
          async pull(controller) {
            await delay(10);
            controller.enqueue(encoder.encode("lo"));
            controller.close();
          },
        });
        const length = pathOf(request) === "/short" ? "99" : "2";
        return new Response(body, { headers: { "content-length": length } });
      }, async (server) => {
        for (const path of ["/short", "/long"]) {
          const client = await Client.open(server);
          try {
            await client.send(
              `GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n` +
                "GET /end HTTP/1.1\r\nHost: x\r\n\r\n",
            );
            const head = await client.head();
            assert.equal(head?.status, 200, path);
            const length = head.headers.get("content-length");
            if (head.headers.has("transfer-encoding") || length === "5") {
              // Framed by the server: all of it, and the connection goes on.
              assert.equal(decoder.decode(await client.body(head)), "hello");
              assert.equal((await client.response())?.text, "end", path);
              continue;
            }
            assert.ok(length === "99" || length === "2", `${path}: ${length}`);
            // Read to the close (an idle connection closes after 0.5 s): no
            // more than the announced bytes, and no response to /end.
            const rest = decoder.decode(await client.untilClosed());
            assert.ok(rest.length <= Number(length), `${path}: ${rest}`);
            assert.ok("hello".startsWith(rest), `${path}: ${rest}`);
          } finally {
            client.close();
          }
        }
      });
    },
  ),
);

Deno.test("serve() honours a handler's Connection: close", async () => {
  await withHandler(
    {},
    (request) =>
      pathOf(request) === "/close"
        ? new Response("bye", { headers: { connection: "close" } })
        : new Response("more"),
    async (server) => {
      const client = await Client.open(server);
      try {
        await client.send(
          "GET /close HTTP/1.1\r\nHost: x\r\n\r\n" +
            "GET /after HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        const reply = await client.response();
        assert.equal(reply?.text, "bye");
        assert.equal(reply.headers.get("connection"), "close");
        assert.ok(await client.closedByServer(), "/after is not answered");
      } finally {
        client.close();
      }
    },
  );
});

Deno.test("serve() keeps the connection after a handler's 404 or 405", async () => {
  await withHandler({}, (request) => {
    switch (pathOf(request)) {
      case "/":
        return new Response("home");
      case "/post-only":
        return new Response(null, { status: 405, headers: { allow: "POST" } });
    }
    return new Response("not here", { status: 404 });
  }, async (server) => {
    const client = await Client.open(server);
    try {
      await client.send(
        "GET /missing HTTP/1.1\r\nHost: x\r\n\r\n" +
          "GET /post-only HTTP/1.1\r\nHost: x\r\n\r\n" + GET,
      );
      for (const status of [404, 405]) {
        const reply = await client.response();
        assert.equal(reply?.status, status);
        assert.equal(reply.headers.get("connection"), undefined);
      }
      assert.equal((await client.response())?.text, "home");
    } finally {
      client.close();
    }
  });
});

/** An error message that must never reach a client. */
const SECRET = "secret-4242";

/** A handler that fails in each of the ways a handler can. */
const failing: ServeHandler = (request) => {
  switch (pathOf(request)) {
    case "/throw":
      throw new Error(SECRET);
    case "/reject":
      return Promise.reject(new Error(SECRET));
    case "/wrong":
      return SECRET as unknown as Response;
    case "/nothing":
      return undefined as unknown as Response;
  }
  return new Response("fine");
};

/** Each way of failing, then a request that succeeds, on one connection. */
async function askFailures(
  server: Server,
  check: (reply: Reply | null, path: string) => void,
): Promise<void> {
  const client = await Client.open(server);
  try {
    const paths = ["/throw", "/reject", "/wrong", "/nothing"];
    await client.send(
      [...paths, "/fine"].map((path) =>
        `GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`
      ).join(""),
    );
    for (const path of paths) check(await client.response(), path);
    // The server serves on, on the same connection.
    assert.equal((await client.response())?.text, "fine");
  } finally {
    client.close();
  }
}

Deno.test(
  "serve() answers a failing handler with a plain 500, without the error",
  quietly(
    (errors) =>
      assert.deepEqual(errors, [
        "error: the handler failed: secret-4242",
        "error: the handler failed: secret-4242",
        "error: the handler failed: the handler returned no Response",
        "error: the handler failed: the handler returned no Response",
      ]),
    async () => {
      await withHandler({}, failing, async (server) => {
        await askFailures(server, (reply, path) => {
          assert.equal(reply?.status, 500, path);
          assert.equal(
            reply.headers.get("content-type"),
            "text/plain; charset=utf-8",
          );
          assert.equal(reply.text, "500 Internal Server Error\n");
          // The body is fixed above; nor may the error leak into a field: a
          // message or a stack tells an attacker about the application.
          const fields = reply.fields.map(([name, value]) =>
            `${name}: ${value}`
          );
          assert.ok(!fields.some((field) => field.includes(SECRET)), path);
          assert.notEqual(reply.headers.get("connection"), "close", path);
        });
      });
    },
  ),
);

Deno.test(
  "serve() answers a failing handler with onError's response",
  quietly(
    (errors) =>
      assert.deepEqual(errors, [
        "error: the handler failed: secret-4242",
        "error: the handler failed: secret-4242",
        "error: the handler failed: the handler returned no Response",
        "error: the handler failed: the handler returned no Response",
      ]),
    async () => {
      const errors: unknown[] = [];
      await withHandler(
        {
          onError: (error) => {
            errors.push(error);
            return new Response("sorry", { status: 503 });
          },
        },
        failing,
        async (server) => {
          await askFailures(server, (reply, path) => {
            assert.equal(reply?.status, 503, path);
            assert.equal(reply.text, "sorry");
          });
        },
      );
      assert.equal(errors.length, 4);
      for (const error of errors.slice(0, 2)) {
        assert.ok(
          error instanceof Error && error.message === SECRET,
          `${error}`,
        );
      }
    },
  ),
);

Deno.test(
  "serve() answers a plain 500 when onError fails too",
  quietly(
    (errors) => {
      // Each of the four failures, once per way onError fails.
      const failures = errors.filter((line) =>
        line.startsWith("error: the handler failed: ")
      );
      const onErrors = errors.filter((line) =>
        line.startsWith("error: onError failed: ")
      );
      assert.equal(failures.length, 12);
      assert.deepEqual([...new Set(onErrors)], [
        "error: onError failed: onError throws",
        "error: onError failed: onError rejects",
        "error: onError failed: onError returned no Response",
      ]);
      assert.equal(onErrors.length, 12);
    },
    async () => {
      const onErrors: ((error: unknown) => Response | Promise<Response>)[] = [
        () => {
          throw new Error("onError throws");
        },
        () => Promise.reject(new Error("onError rejects")),
        () => "not a response" as unknown as Response,
      ];
      for (const onError of onErrors) {
        await withHandler({ onError }, failing, async (server) => {
          await askFailures(server, (reply, path) => {
            assert.equal(reply?.status, 500, path);
            assert.equal(reply.text, "500 Internal Server Error\n");
          });
        });
      }
    },
  ),
);

Deno.test("serve() aborts request.signal when the client goes away", async () => {
  const entered = Promise.withResolvers<void>();
  const abortSeen = Promise.withResolvers<void>();
  await withHandler({}, async (request) => {
    if (pathOf(request) === "/wait") {
      entered.resolve();
      await aborted(request.signal);
      abortSeen.resolve();
    }
    return new Response("done");
  }, async (server) => {
    const client = await Client.open(server);
    try {
      await client.send("GET /wait HTTP/1.1\r\nHost: x\r\n\r\n");
      await within(entered.promise, "the handler runs");
    } finally {
      client.close();
    }
    await within(abortSeen.promise, "the signal aborts on a disconnect");
    assert.equal((await ask(server, GET))?.text, "done");
  });
});

Deno.test("serve() answers pipelined requests one after another, in order", async () => {
  let running = 0;
  let most = 0;
  await withHandler({}, async (request) => {
    most = Math.max(most, ++running);
    const n = Number(pathOf(request).slice(1));
    // Earlier requests take longer: handled at once, they would finish
    // out of order.
    await delay(60 - n * 20);
    const body = request.body ? await request.text() : "";
    running--;
    return new Response(`${n}:${body}`);
  }, async (server) => {
    const client = await Client.open(server);
    try {
      await client.send(
        "GET /1 HTTP/1.1\r\nHost: x\r\n\r\n" + post("/2", "two") +
          "GET /3 HTTP/1.1\r\nHost: x\r\n\r\n",
      );
      for (const expected of ["1:", "2:two", "3:"]) {
        assert.equal((await client.response())?.text, expected);
      }
      assert.equal(most, 1, "one handler at a time per connection");
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() lets a slow handler hold up no other connection", async () => {
  const entered = Promise.withResolvers<void>();
  const go = Promise.withResolvers<void>();
  await withHandler({}, async (request) => {
    if (pathOf(request) === "/slow") {
      entered.resolve();
      await go.promise;
    }
    return new Response(pathOf(request));
  }, async (server) => {
    const slow = await Client.open(server);
    try {
      await slow.send("GET /slow HTTP/1.1\r\nHost: x\r\n\r\n");
      await within(entered.promise, "the slow handler runs");
      const fast = await ask(server, "GET /fast HTTP/1.1\r\nHost: x\r\n\r\n");
      assert.equal(fast?.text, "/fast");
      go.resolve();
      assert.equal((await slow.response())?.text, "/slow");
    } finally {
      go.resolve();
      slow.close();
    }
  });
});

Deno.test("serve() shutdown() lets a handler in flight finish, then closes", async () => {
  const entered = Promise.withResolvers<void>();
  const go = Promise.withResolvers<void>();
  const server = serve({ port: 0, accessLog: false }, async (request) => {
    entered.resolve();
    await go.promise;
    return new Response(request.signal.aborted ? "aborted" : "finished");
  });
  const client = await Client.open(server);
  try {
    await client.send(GET);
    await within(entered.promise, "the handler runs");
    const finished = server.shutdown();
    await assert.rejects(Deno.connect({ port: server.addr.port }));
    go.resolve();
    const reply = await client.response();
    assert.equal(reply?.text, "finished");
    assert.equal(reply.headers.get("connection"), "close");
    assert.ok(await client.closedByServer());
    await finished;
    assert.equal(server.forced, 0);
  } finally {
    go.resolve();
    client.close();
    await server.shutdown();
  }
});

Deno.test("serve() cuts a handler that never returns at the shutdown timeout", async () => {
  const entered = Promise.withResolvers<void>();
  const server = serve(
    { port: 0, accessLog: false, shutdownTimeout: 0.3 },
    () => {
      entered.resolve();
      return new Promise<Response>(() => {});
    },
  );
  const client = await Client.open(server);
  try {
    await client.send(GET);
    await within(entered.promise, "the handler runs");
    await server.shutdown();
    assert.equal(server.forced, 1);
    assert.ok(await client.closedByServer());
  } finally {
    client.close();
  }
});

Deno.test("serve() aborts request.signal at the shutdown timeout", async () => {
  const entered = Promise.withResolvers<void>();
  const abortSeen = Promise.withResolvers<void>();
  const server = serve(
    { port: 0, accessLog: false, shutdownTimeout: 0.3 },
    async (request) => {
      entered.resolve();
      await aborted(request.signal);
      abortSeen.resolve();
      return new Response("too late");
    },
  );
  const client = await Client.open(server);
  try {
    await client.send(GET);
    await within(entered.promise, "the handler runs");
    await server.shutdown();
    await within(abortSeen.promise, "the signal aborts");
  } finally {
    client.close();
    await server.shutdown();
  }
});

Deno.test("serve() resolves info.completed once the response is written", async () => {
  const completed = Promise.withResolvers<boolean>();
  await withHandler({}, (_request, info) => {
    info.completed.then(
      () => completed.resolve(true),
      () => completed.resolve(false),
    );
    return new Response("x".repeat(200_000));
  }, async (server) => {
    const reply = await ask(server, GET);
    assert.equal(reply?.body.length, 200_000);
    assert.equal(await within(completed.promise, "info.completed"), true);
  });
});

Deno.test("serve() rejects info.completed and cancels the stream when the client goes mid-stream", async () => {
  const completed = Promise.withResolvers<boolean>();
  const go = Promise.withResolvers<void>();
  const cancelled = Promise.withResolvers<void>();
  await withHandler({}, (_request, info) => {
    info.completed.then(
      () => completed.resolve(true),
      () => completed.resolve(false),
    );
    let sent = 0;
    const body = new ReadableStream<Uint8Array>({
      async pull(controller) {
        if (sent === 1) await go.promise;
        // At most 64 MiB, should the server never notice the client left.
        if (sent++ === 1024) return controller.close();
        controller.enqueue(new Uint8Array(64 * 1024));
      },
      cancel() {
        cancelled.resolve();
      },
    });
    return new Response(body);
  }, async (server) => {
    const client = await Client.open(server);
    try {
      await client.send(GET);
      const head = await within(client.head(), "the head");
      assert.equal(head?.headers.get("transfer-encoding"), "chunked");
      assert.ok(await within(client.chunk(), "the first chunk"));
    } finally {
      client.close();
      go.resolve();
    }
    assert.equal(await within(completed.promise, "info.completed"), false);
    await within(cancelled.promise, "the stream is cancelled");
  });
});

Deno.test("serve() survives an info.completed that rejects with nobody waiting", async () => {
  const cancelled = Promise.withResolvers<void>();
  await withHandler({}, (request, info) => {
    if (pathOf(request) === "/") return hello(request, info);
    // Asked for, and then left alone: its rejection must not crash anything.
    void info.completed;
    const body = new ReadableStream<Uint8Array>({
      pull: (controller) => controller.enqueue(new Uint8Array(64 * 1024)),
      cancel: () => cancelled.resolve(),
    }, { highWaterMark: 0 });
    return new Response(body);
  }, async (server) => {
    const client = await Client.open(server);
    try {
      await client.send("GET /forever HTTP/1.1\r\nHost: x\r\n\r\n");
      await within(client.head(), "the head");
      assert.ok(await within(client.chunk(), "the first chunk"));
    } finally {
      client.close();
    }
    await within(cancelled.promise, "the stream is cancelled");
    assert.equal((await ask(server, GET))?.text, "hello /");
  });
});

Deno.test("serve() has ref() and unref(), and shuts down at the end of await using", async () => {
  let port = 0;
  {
    await using server = serve({ port: 0, accessLog: false }, hello);
    port = server.addr.port;
    server.unref();
    server.ref();
    assert.equal((await ask(server, GET))?.text, "hello /");
  }
  // Symbol.asyncDispose shut it down: nothing listens there any more.
  await assert.rejects(Deno.connect({ port }));
});

// ---------------------------------------------------------------------------
// Files: serveFiles(), on fixture trees in a temporary directory
// ---------------------------------------------------------------------------

/** Whether this run may use a permission (without asking for it). */
function granted(name: "read" | "write"): boolean {
  return Deno.permissions.querySync({ name }).state === "granted";
}

/**
 * The options of every file test: they build trees in a temporary directory,
 * so without read and write access (`deno test --allow-net` alone) they are
 * reported as ignored rather than failed, and the reason is printed once.
 */
const FILES = { ignore: !granted("read") || !granted("write") };
if (FILES.ignore) {
  console.warn(
    "main_test.ts: the file tests are ignored: they need --allow-read and " +
      "--allow-write (deno task test)",
  );
}

/** A symbolic link to create, pointing at `link`. */
interface Link {
  link: string;
}

/** Paths (relative to the temporary directory) and what they hold. */
type Tree = Record<string, string | Uint8Array | Link | null>;

/** A temporary directory holding the root `site/` and whatever is beside it. */
interface Fixture extends AsyncDisposable {
  dir: string;
  root: string;
}

/** A fixed modification time, so that validators are predictable. */
const MTIME = new Date("2020-01-02T03:04:05Z");
const LAST_MODIFIED = "Thu, 02 Jan 2020 03:04:05 GMT";

/**
 * Builds a tree: a string or bytes is a file, null a directory, a Link a
 * symbolic link. Files get MTIME. The directory is removed when the fixture
 * is disposed of.
 */
async function fixture(tree: Tree): Promise<Fixture> {
  const dir = await Deno.makeTempDir({ prefix: "main_test_" });
  await Deno.mkdir(`${dir}/site`);
  for (const [path, contents] of Object.entries(tree)) {
    const full = `${dir}/${path}`;
    await Deno.mkdir(full.slice(0, full.lastIndexOf("/")), { recursive: true });
    if (contents === null) await Deno.mkdir(full, { recursive: true });
    else if (typeof contents === "string") {
      await Deno.writeTextFile(full, contents);
    } else if (contents instanceof Uint8Array) {
      await Deno.writeFile(full, contents);
    } else await Deno.symlink(contents.link, full);
    if (typeof contents === "string" || contents instanceof Uint8Array) {
      await Deno.utime(full, MTIME, MTIME);
    }
  }
  return {
    dir,
    root: `${dir}/site`,
    [Symbol.asyncDispose]: () => Deno.remove(dir, { recursive: true }),
  };
}

/** A response of serveFiles(), read whole. */
interface FileReply {
  status: number;
  headers: Headers;
  text: string;
  /** The body was null (as for HEAD and 304). */
  empty: boolean;
}

/** Asks serveFiles() itself for a path (anything after `http://localhost`). */
async function getFile(
  options: ServeFilesOptions,
  path: string,
  init: RequestInit = {},
): Promise<FileReply> {
  const url = path.includes("://") ? path : `http://localhost${path}`;
  const response = await serveFiles(new Request(url, init), options);
  const empty = response.body === null;
  const text = await response.text();
  return { status: response.status, headers: response.headers, text, empty };
}

/** Headers for a GET. */
function withHeaders(fields: Record<string, string>): RequestInit {
  return { headers: fields };
}

/** Serves the files of `options` on a free port during `test`. */
function withFiles(
  options: ServeFilesOptions & ServeOptions,
  test: (server: Server) => Promise<void>,
): Promise<void> {
  const { root, list, dotfiles, ...serveOptions } = options;
  const files = { root, list, dotfiles };
  return withHandler(
    serveOptions,
    (request) => serveFiles(request, files),
    test,
  );
}

/**
 * The number of descriptors this process has open, or null where that cannot
 * be seen: Deno 2 lets only `--allow-all` read `/proc/self/fd`, and only
 * Linux has it.
 */
function openDescriptors(): number | null {
  try {
    return [...Deno.readDirSync("/proc/self/fd")].length;
  } catch (error) {
    if (error instanceof Deno.errors.NotCapable) return null;
    if (error instanceof Deno.errors.NotFound) return null; // not Linux
    throw error;
  }
}

/** Files opened through `Deno.open` while tracked. */
interface OpenFiles extends Disposable {
  /** How many were opened. */
  readonly opened: number;
  /** How many of those are not closed yet. */
  readonly count: number;
}

/**
 * Counts the files opened and not closed while it is in use, by wrapping
 * `Deno.open`: this works with `--allow-read` alone, where the descriptor
 * count cannot be read (and Deno's resource sanitizer does not report open
 * files).
 */
function trackOpenFiles(): OpenFiles {
  const original = Deno.open;
  let opened = 0;
  let count = 0;
  Deno.open = async (...args: Parameters<typeof Deno.open>) => {
    const file = await original(...args);
    opened++;
    count++;
    const close = file.close.bind(file);
    let closed = false;
    file.close = () => {
      if (!closed) count--;
      closed = true;
      close();
    };
    return file;
  };
  return {
    get opened() {
      return opened;
    },
    get count() {
      return count;
    },
    [Symbol.dispose]() {
      Deno.open = original;
    },
  };
}

/**
 * Waits (at most 5 s) for every tracked file to be closed and the descriptor
 * count to come back down: a read in flight when its stream is cancelled
 * lets go of its descriptor when it ends, and a server notices a client
 * that went away only at its next write.
 */
async function settleFiles(
  files: OpenFiles,
  before: number | null,
): Promise<void> {
  for (let wait = 0; wait < 250; wait++) {
    const now = openDescriptors();
    const descriptorsBack = now === null || before === null || now <= before;
    if (files.count === 0 && descriptorsBack) return;
    await delay(20);
  }
}

/** An ASCII file of `lines` numbered lines of 16 bytes each. */
function numberedLines(lines: number): string {
  const parts: string[] = [];
  for (let line = 0; line < lines; line++) {
    parts.push(`${String(line).padStart(15, "0")}\n`);
  }
  return parts.join("");
}

/** A file of well over 64 KiB: streamed rather than read whole. */
const BIG = numberedLines(70_000);

const MIB = 1024 * 1024;

const NOT_FOUND_STATUSES = [400, 404];

// ---------------------------------------------------------------------------
// The book's pages
// ---------------------------------------------------------------------------

Deno.test("serveFiles() serves index.html for /", FILES, async () => {
  await using site = await fixture({
    "site/index.html": "<h1>Hello from disk</h1>",
  });
  const reply = await getFile({ root: site.root }, "/");
  assert.equal(reply.status, 200);
  assert.equal(reply.text, "<h1>Hello from disk</h1>");
  assert.equal(reply.headers.get("content-type"), "text/html; charset=utf-8");
});

Deno.test(
  "serveFiles() answers a missing file with the Oops page",
  FILES,
  async () => {
    await using site = await fixture({ "site/a.txt": "A" });
    const reply = await getFile({ root: site.root }, "/nothing.html");
    assert.equal(reply.status, 404);
    assert.match(reply.text, /<h1>Oops!<\/h1>/);
    assert.equal(reply.headers.get("content-type"), "text/html; charset=utf-8");
    // No index.html: / is a 404 too.
    assert.equal((await getFile({ root: site.root }, "/")).status, 404);
  },
);

Deno.test(
  "serveFiles() sends the root's 404.html with every 404",
  FILES,
  async () => {
    await using site = await fixture({
      "site/404.html": "<p>Custom 404</p>",
      "site/sub/b.txt": "B",
      "site/.env": "ENV",
    });
    const options = { root: site.root };
    for (
      const path of ["/nothing", "/sub/", "/.env", "/sub/b.txt/", "/x/y/z"]
    ) {
      const reply = await getFile(options, path);
      assert.equal(reply.status, 404, path);
      assert.equal(reply.text, "<p>Custom 404</p>", path);
    }
    const head = await getFile(options, "/nothing", { method: "HEAD" });
    assert.equal(head.status, 404);
    assert.ok(head.empty);
    assert.equal(head.headers.get("content-length"), "17");
  },
);

// ---------------------------------------------------------------------------
// Methods
// ---------------------------------------------------------------------------

Deno.test(
  "serveFiles() answers other methods with 405 and Allow",
  FILES,
  async () => {
    await using site = await fixture({ "site/a.txt": "A" });
    for (const method of ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"]) {
      const reply = await getFile({ root: site.root }, "/a.txt", { method });
      assert.equal(reply.status, 405, method);
      assert.equal(reply.headers.get("allow"), "GET, HEAD");
    }
  },
);

Deno.test(
  "serveFiles() answers HEAD with GET's fields and no body",
  FILES,
  async () => {
    await using site = await fixture({
      "site/a.txt": "hello",
      "site/big.txt": BIG,
    });
    for (const path of ["/a.txt", "/big.txt"]) {
      const full = await getFile({ root: site.root }, path);
      const head = await getFile({ root: site.root }, path, { method: "HEAD" });
      assert.equal(head.status, 200);
      assert.ok(head.empty);
      assert.equal(
        head.headers.get("content-length"),
        String(full.text.length),
      );
      const fields = [
        "content-type",
        "content-length",
        "etag",
        "last-modified",
      ];
      for (const name of fields) {
        assert.equal(head.headers.get(name), full.headers.get(name), name);
      }
    }
  },
);

// ---------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------

Deno.test(
  "serveFiles() decodes paths as UTF-8 and ignores queries",
  FILES,
  async () => {
    await using site = await fixture({
      "site/café.txt": "coffee",
      "site/a b+c.txt": "spaced",
      "site/%41.txt": "percent",
    });
    const options = { root: site.root };
    assert.equal((await getFile(options, "/caf%C3%A9.txt")).text, "coffee");
    assert.equal((await getFile(options, "/café.txt")).text, "coffee");
    assert.equal(
      (await getFile(options, "/a%20b+c.txt?x=1&y=%zz")).text,
      "spaced",
    );
    assert.equal((await getFile(options, "/%2541.txt")).text, "percent");
    assert.equal((await getFile(options, "/./sub/../café.txt")).text, "coffee");
  },
);

Deno.test("serveFiles() answers malformed paths with 400", FILES, async () => {
  await using site = await fixture({ "site/a.txt": "A" });
  for (
    const path of [
      "/%zz",
      "/a%2",
      "/%e9.txt", // Latin-1, not UTF-8
      "/%c3", // a truncated sequence
      "/%c0%ae", // an overlong "."
      "/%ed%a0%80", // a surrogate
      "/a.txt%00",
      "/a%2fb",
      "/a%5cb",
    ]
  ) {
    assert.equal((await getFile({ root: site.root }, path)).status, 400, path);
  }
});

Deno.test("serveFiles() serves nothing outside the root", FILES, async (t) => {
  await using site = await fixture({
    "secret.txt": "SECRET",
    "outside/secret.txt": "SECRET",
    "site-evil/secret.txt": "SECRET",
    "site/a.txt": "A",
    "site/sub/b.txt": "B",
  });
  const options = { root: site.root, list: true, dotfiles: true };
  const spellings = [
    "/../secret.txt",
    "/../../../../../../../../etc/passwd",
    "/%2e%2e/secret.txt",
    "/%2E%2E/secret.txt",
    "/.%2e/secret.txt",
    "/%2e./secret.txt",
    "/sub/../../secret.txt",
    "/sub/%2e%2e/%2e%2e/secret.txt",
    "/..%2fsecret.txt",
    "/..%2Fsecret.txt",
    "/sub/..%2f..%2fsecret.txt",
    "/..%5csecret.txt",
    "/..%5Csecret.txt",
    "/..\\secret.txt",
    "/sub\\..\\..\\secret.txt",
    "/%252e%252e/secret.txt",
    "/%252e%252e%252fsecret.txt",
    "/%25252e%25252e/secret.txt",
    "/%c0%ae%c0%ae/secret.txt",
    "/%c0%2e%c0%2e/secret.txt",
    "/%e0%80%ae%e0%80%ae/secret.txt",
    "/..%c0%afsecret.txt",
    "/..%c1%9csecret.txt",
    "/%f0%80%80%ae%f0%80%80%ae/secret.txt",
    "/secret.txt%00",
    "/%00/../secret.txt",
    "/..%00/secret.txt",
    "//../secret.txt",
    "//secret.txt",
    "///..//..//secret.txt",
    `/${site.dir}/secret.txt`,
    `${site.dir}/secret.txt`,
    `/${encodeURIComponent(`${site.dir}/secret.txt`)}`,
    "/%2f..%2fsecret.txt",
    "/../site-evil/secret.txt",
    "/../outside/secret.txt",
    "/../outside/",
    "http://localhost/../secret.txt",
    "http://evil.example/../secret.txt",
    "https://localhost:8443/%2e%2e/secret.txt",
  ];
  for (const spelling of spellings) {
    await t.step(spelling, async () => {
      const reply = await getFile(options, spelling);
      assert.ok(
        NOT_FOUND_STATUSES.includes(reply.status),
        String(reply.status),
      );
      assert.doesNotMatch(reply.text, /SECRET|root:/);
    });
  }
});

Deno.test(
  "serveFiles() follows links only to inside the root",
  FILES,
  async () => {
    await using site = await fixture({
      "secret.txt": "SECRET",
      "outside/secret.txt": "SECRET",
      "site-evil/secret.txt": "SECRET",
      "site/a.txt": "A",
      "site/sub/b.txt": "B",
      "site/in-link": { link: "a.txt" },
      "site/chain": { link: "in-link" },
      "site/dir-in": { link: "sub" },
      "site/sub/up": { link: "../a.txt" },
      "site/out-link": { link: "../secret.txt" },
      "site/chain-out": { link: "out-link" },
      "site/dir-out": { link: "../outside" },
      "site/sibling": { link: "../site-evil/secret.txt" },
      "site/loop": { link: "loop" },
      "site/dangling": { link: "nowhere" },
    });
    await Deno.symlink(`${site.dir}/secret.txt`, `${site.root}/absolute-link`);
    const options = { root: site.root, list: true };
    assert.equal((await getFile(options, "/in-link")).text, "A");
    assert.equal((await getFile(options, "/chain")).text, "A");
    assert.equal((await getFile(options, "/dir-in/b.txt")).text, "B");
    assert.equal((await getFile(options, "/sub/up")).text, "A");
    for (
      const path of [
        "/out-link",
        "/chain-out",
        "/dir-out",
        "/dir-out/",
        "/dir-out/secret.txt",
        "/sibling",
        "/absolute-link",
        "/loop",
        "/dangling",
      ]
    ) {
      const reply = await getFile(options, path);
      assert.equal(reply.status, 404, path);
      assert.doesNotMatch(reply.text, /SECRET/);
    }
    // A listing shows the links that can be followed, and no other.
    const listing = (await getFile(options, "/")).text;
    for (const name of ["in-link", "chain", "dir-in/"]) {
      assert.match(listing, new RegExp(`href="${name}"`), name);
    }
    for (const name of ["out-link", "dir-out", "sibling", "absolute", "loop"]) {
      assert.doesNotMatch(listing, new RegExp(name), name);
    }
  },
);

Deno.test(
  "serveFiles() hides dotfiles except /.well-known/",
  FILES,
  async () => {
    await using site = await fixture({
      "site/.env": "ENV",
      "site/.git/config": "GIT",
      "site/sub/.hidden": "HIDDEN",
      "site/.well-known/security.txt": "SECURITY",
      "site/dot-link": { link: ".env" },
      "site/visible.txt": "VISIBLE",
    });
    const hidden = [
      "/.env",
      "/%2eenv",
      "/.git/config",
      "/.git/",
      "/.git",
      "/sub/.hidden",
      "/dot-link",
    ];
    for (const path of hidden) {
      const reply = await getFile({ root: site.root }, path);
      assert.equal(reply.status, 404, path);
    }
    const wellKnown = await getFile(
      { root: site.root },
      "/.well-known/security.txt",
    );
    assert.equal(wellKnown.text, "SECURITY");
    const options = { root: site.root, dotfiles: true };
    assert.equal((await getFile(options, "/.env")).text, "ENV");
    assert.equal((await getFile(options, "/.git/config")).text, "GIT");
    assert.equal((await getFile(options, "/sub/.hidden")).text, "HIDDEN");
    assert.equal((await getFile(options, "/dot-link")).text, "ENV");
  },
);

// ---------------------------------------------------------------------------
// Directories
// ---------------------------------------------------------------------------

Deno.test(
  "serveFiles() redirects /dir to /dir/ keeping the query",
  FILES,
  async () => {
    await using site = await fixture({
      "site/docs/index.html": "DOCS",
      "site/café/index.html": "CAFE",
    });
    const options = { root: site.root };
    const plain = await getFile(options, "/docs");
    assert.equal(plain.status, 301);
    assert.equal(plain.headers.get("location"), "/docs/");
    const query = await getFile(options, "/docs?x=1&y=%20");
    assert.equal(query.headers.get("location"), "/docs/?x=1&y=%20");
    const encoded = await getFile(options, "/caf%C3%A9");
    assert.equal(encoded.headers.get("location"), "/caf%C3%A9/");
    // `//docs` must not become a redirect to another host.
    const doubled = await getFile(options, "//docs");
    assert.equal(doubled.headers.get("location"), "/docs/");
  },
);

Deno.test(
  "serveFiles() serves a directory's index.html or a 404",
  FILES,
  async () => {
    await using site = await fixture({
      "site/docs/index.html": "DOCS",
      "site/empty/": null,
      "site/a.txt": "A",
    });
    const options = { root: site.root };
    assert.equal((await getFile(options, "/docs/")).text, "DOCS");
    assert.equal((await getFile(options, "/docs/.")).text, "DOCS");
    assert.equal((await getFile(options, "/empty/")).status, 404);
    assert.equal((await getFile(options, "/a.txt/")).status, 404);
  },
);

Deno.test("serveFiles() lists a directory with list", FILES, async () => {
  await using site = await fixture({
    "site/list/<b>x&.txt": "12345",
    "site/list/b.txt": "B",
    "site/list/é.txt": "E",
    "site/list/a dir/": null,
    "site/list/.hidden": "H",
  });
  const options = { root: site.root, list: true };
  const reply = await getFile(options, "/list/");
  assert.equal(reply.status, 200);
  assert.equal(reply.headers.get("content-type"), "text/html; charset=utf-8");
  const page = reply.text;
  assert.ok(page.includes("&lt;b&gt;x&amp;.txt"));
  assert.ok(!page.includes("<b>x"));
  const hrefs = [...page.matchAll(/href="([^"]*)"/g)].map((match) => match[1]);
  assert.deepEqual(hrefs, [
    "../",
    "a%20dir/",
    "%3Cb%3Ex%26.txt",
    "b.txt",
    "%C3%A9.txt",
  ]);
  assert.match(
    page,
    /%3Cb%3Ex%26\.txt.*<td>5<\/td><td>2020-01-02 03:04:05 UTC/,
  );
  // Each link leads to its file.
  assert.equal((await getFile(options, "/list/%3Cb%3Ex%26.txt")).text, "12345");
  // Dotfiles are listed only when they are served.
  const dotted = await getFile({ ...options, dotfiles: true }, "/list/");
  assert.ok(dotted.text.includes('href=".hidden"'));
  // The root has no parent.
  assert.ok(!(await getFile(options, "/")).text.includes('href="../"'));
  // Without list, a directory without index.html is a 404.
  assert.equal((await getFile({ root: site.root }, "/list/")).status, 404);
});

// ---------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------

Deno.test(
  "serveFiles() types files by extension, with nosniff",
  FILES,
  async () => {
    const types: Record<string, string> = {
      "x.html": "text/html; charset=utf-8",
      "x.css": "text/css; charset=utf-8",
      "x.js": "text/javascript; charset=utf-8",
      "x.mjs": "text/javascript; charset=utf-8",
      "x.json": "application/json; charset=utf-8",
      "x.md": "text/markdown; charset=utf-8",
      "x.svg": "image/svg+xml; charset=utf-8",
      "x.png": "image/png",
      "X.JPG": "image/jpeg",
      "x.woff2": "font/woff2",
      "x.wasm": "application/wasm",
      "x.mp4": "video/mp4",
      "x.gz": "application/gzip",
      "x.unknown": "application/octet-stream",
      "x.constructor": "application/octet-stream",
      "Makefile": "application/octet-stream",
    };
    const tree: Tree = {};
    for (const name of Object.keys(types)) tree[`site/${name}`] = name;
    await using site = await fixture(tree);
    for (const [name, type] of Object.entries(types)) {
      const reply = await getFile({ root: site.root }, `/${name}`);
      assert.equal(reply.headers.get("content-type"), type, name);
      assert.equal(reply.headers.get("x-content-type-options"), "nosniff");
    }
  },
);

// ---------------------------------------------------------------------------
// Validators and conditional requests (RFC 9110 §8.8, §13)
// ---------------------------------------------------------------------------

/** The status of a conditional GET of /a.txt. */
async function conditional(
  site: Fixture,
  fields: Record<string, string>,
  method = "GET",
): Promise<number> {
  const init = { method, headers: fields };
  return (await getFile({ root: site.root }, "/a.txt", init)).status;
}

Deno.test(
  "serveFiles() sends validators and honours If-None-Match",
  FILES,
  async () => {
    await using site = await fixture({ "site/a.txt": "hello" });
    const first = await getFile({ root: site.root }, "/a.txt");
    const etag = first.headers.get("etag")!;
    assert.match(etag, /^"[0-9a-f-]+"$/);
    assert.equal(first.headers.get("last-modified"), LAST_MODIFIED);
    const notModified = await getFile(
      { root: site.root },
      "/a.txt",
      withHeaders({ "if-none-match": etag }),
    );
    assert.equal(notModified.status, 304);
    assert.ok(notModified.empty);
    assert.equal(notModified.headers.get("etag"), etag);
    assert.equal(
      await conditional(site, { "if-none-match": `W/${etag}` }),
      304,
    );
    assert.equal(
      await conditional(site, { "if-none-match": `"x", ${etag}, "y"` }),
      304,
    );
    assert.equal(await conditional(site, { "if-none-match": "*" }), 304);
    assert.equal(await conditional(site, { "if-none-match": '"x"' }), 200);
    const head = { "if-none-match": etag };
    assert.equal(await conditional(site, head, "HEAD"), 304);
  },
);

Deno.test(
  "serveFiles() honours If-Modified-Since without If-None-Match",
  FILES,
  async () => {
    await using site = await fixture({ "site/a.txt": "hello" });
    const since = (date: string) =>
      conditional(site, { "if-modified-since": date });
    assert.equal(await since(LAST_MODIFIED), 304);
    assert.equal(await since("Fri, 03 Jan 2020 00:00:00 GMT"), 304);
    assert.equal(await since("Thu, 02 Jan 2020 03:04:04 GMT"), 200);
    // The obsolete forms (RFC 9110 §5.6.7).
    assert.equal(await since("Thursday, 02-Jan-20 03:04:05 GMT"), 304);
    assert.equal(await since("Thu Jan  2 03:04:05 2020"), 304);
    // Invalid dates, and lists of dates, are ignored.
    assert.equal(await since("yesterday"), 200);
    assert.equal(await since("Thu, 31 Feb 2020 03:04:05 GMT"), 200);
    assert.equal(await since(`${LAST_MODIFIED}, ${LAST_MODIFIED}`), 200);
    // With If-None-Match, If-Modified-Since is not looked at.
    assert.equal(
      await conditional(site, {
        "if-none-match": '"other"',
        "if-modified-since": LAST_MODIFIED,
      }),
      200,
    );
  },
);

Deno.test(
  "serveFiles() answers failed If-Match and If-Unmodified-Since with 412",
  FILES,
  async () => {
    await using site = await fixture({ "site/a.txt": "hello" });
    const etag = (await getFile({ root: site.root }, "/a.txt")).headers.get(
      "etag",
    )!;
    assert.equal(await conditional(site, { "if-match": '"other"' }), 412);
    assert.equal(await conditional(site, { "if-match": `W/${etag}` }), 412);
    assert.equal(await conditional(site, { "if-match": etag }), 200);
    assert.equal(await conditional(site, { "if-match": `"x", ${etag}` }), 200);
    assert.equal(await conditional(site, { "if-match": "*" }), 200);
    const before = "Wed, 01 Jan 2020 00:00:00 GMT";
    assert.equal(
      await conditional(site, { "if-unmodified-since": before }),
      412,
    );
    const at = { "if-unmodified-since": LAST_MODIFIED };
    assert.equal(await conditional(site, at), 200);
    // If-Match decides alone when present (RFC 9110 §13.2.2 step 2).
    const both = { "if-match": etag, "if-unmodified-since": before };
    assert.equal(await conditional(site, both), 200);
    // 412 comes before 304 (step 1 before step 3).
    const order = { "if-match": '"other"', "if-none-match": etag };
    assert.equal(await conditional(site, order), 412);
  },
);

// ---------------------------------------------------------------------------
// Ranges (RFC 9110 §14)
// ---------------------------------------------------------------------------

/** GETs /digits.txt ("0123456789") with a Range field and more. */
function ranged(
  site: Fixture,
  range: string,
  fields: Record<string, string> = {},
): Promise<FileReply> {
  const headers = { range, ...fields };
  return getFile({ root: site.root }, "/digits.txt", { headers });
}

Deno.test(
  "serveFiles() answers one range with 206 and Content-Range",
  FILES,
  async () => {
    await using site = await fixture({ "site/digits.txt": "0123456789" });
    const full = await getFile({ root: site.root }, "/digits.txt");
    assert.equal(full.headers.get("accept-ranges"), "bytes");
    const cases: [string, string, string][] = [
      ["bytes=0-4", "01234", "bytes 0-4/10"],
      ["bytes=5-", "56789", "bytes 5-9/10"],
      ["bytes=-3", "789", "bytes 7-9/10"],
      ["bytes=8-100", "89", "bytes 8-9/10"],
      ["bytes=-100", "0123456789", "bytes 0-9/10"],
      ["BYTES=0-0", "0", "bytes 0-0/10"],
      ["bytes= 3-3 ", "3", "bytes 3-3/10"],
      ["bytes=20-30, 2-2", "2", "bytes 2-2/10"],
    ];
    for (const [range, text, contentRange] of cases) {
      const reply = await ranged(site, range);
      assert.equal(reply.status, 206, range);
      assert.equal(reply.text, text, range);
      assert.equal(reply.headers.get("content-range"), contentRange, range);
      assert.equal(
        reply.headers.get("content-type"),
        "text/plain; charset=utf-8",
      );
    }
  },
);

Deno.test(
  "serveFiles() answers unsatisfiable ranges with 416",
  FILES,
  async () => {
    await using site = await fixture({
      "site/digits.txt": "0123456789",
      "site/empty.txt": "",
    });
    for (
      const range of ["bytes=10-", "bytes=100-200", "bytes=-0", "bytes=10-,20-"]
    ) {
      const reply = await ranged(site, range);
      assert.equal(reply.status, 416, range);
      assert.equal(reply.headers.get("content-range"), "bytes */10", range);
    }
    const empty = await getFile({ root: site.root }, "/empty.txt", {
      headers: { range: "bytes=0-" },
    });
    assert.equal(empty.status, 416);
    assert.equal(empty.headers.get("content-range"), "bytes */0");
  },
);

Deno.test(
  "serveFiles() ignores malformed or abusive Range fields",
  FILES,
  async () => {
    await using site = await fixture({ "site/digits.txt": "0123456789" });
    for (
      const range of [
        "bytes=abc",
        "items=0-1",
        "bytes=5-1",
        "bytes=",
        "bytes=--1",
        "bytes=1-2-3",
        "bytes 0-1",
        "bytes=0-1,x",
        "bytes=+1-2",
        "bytes=0-9,0-9", // more bytes than the file (RFC 9110 §14.3)
        Array.from({ length: 40 }, (_, at) => `${at % 10}-${at % 10}`).join(",")
          .replace(/^/, "bytes="),
      ]
    ) {
      const reply = await ranged(site, range);
      assert.equal(reply.status, 200, range);
      assert.equal(reply.text, "0123456789", range);
    }
    // HEAD does not take ranges (RFC 9110 §14.2).
    const head = await getFile({ root: site.root }, "/digits.txt", {
      method: "HEAD",
      headers: { range: "bytes=0-1" },
    });
    assert.equal(head.status, 200);
    assert.equal(head.headers.get("content-length"), "10");
  },
);

/** One part of a multipart/byteranges body. */
interface Part {
  type: string | null;
  range: string | null;
  data: string;
}

/** Splits a multipart/byteranges body (RFC 2046 §5.1, RFC 9110 §14.6). */
function parseMultipart(reply: FileReply): Part[] {
  const type = reply.headers.get("content-type") ?? "";
  const boundary = /^multipart\/byteranges; boundary=(\S+)$/.exec(type)?.[1];
  assert.ok(boundary, type);
  assert.ok(reply.text.endsWith(`\r\n--${boundary}--\r\n`));
  const sections = reply.text.split(`--${boundary}`);
  assert.equal(sections.shift()?.trim(), "");
  assert.equal(sections.pop(), "--\r\n");
  return sections.map((section) => {
    assert.ok(section.startsWith("\r\n") && section.endsWith("\r\n"));
    const inner = section.slice(2, -2);
    const split = inner.indexOf("\r\n\r\n");
    const fields = new Headers(
      inner.slice(0, split).split("\r\n").map((line) => {
        const colon = line.indexOf(":");
        return [line.slice(0, colon), line.slice(colon + 1).trim()];
      }),
    );
    return {
      type: fields.get("content-type"),
      range: fields.get("content-range"),
      data: inner.slice(split + 4),
    };
  });
}

Deno.test(
  "serveFiles() sends several ranges as multipart/byteranges",
  FILES,
  async () => {
    await using site = await fixture({
      "site/digits.txt": "0123456789",
      "site/big.txt": BIG,
    });
    const reply = await ranged(site, "bytes=0-1, 4-5,-2");
    assert.equal(reply.status, 206);
    const text = "text/plain; charset=utf-8";
    assert.deepEqual(parseMultipart(reply), [
      { type: text, range: "bytes 0-1/10", data: "01" },
      { type: text, range: "bytes 4-5/10", data: "45" },
      { type: text, range: "bytes 8-9/10", data: "89" },
    ]);
    // A big file is streamed from disk, range by range.
    const size = BIG.length;
    const big = await getFile({ root: site.root }, "/big.txt", {
      headers: { range: "bytes=100000-100031,16-31,-16" },
    });
    assert.equal(big.status, 206);
    assert.deepEqual(parseMultipart(big), [
      {
        type: text,
        range: `bytes 100000-100031/${size}`,
        data: BIG.slice(100000, 100032),
      },
      { type: text, range: `bytes 16-31/${size}`, data: BIG.slice(16, 32) },
      {
        type: text,
        range: `bytes ${size - 16}-${size - 1}/${size}`,
        data: BIG.slice(-16),
      },
    ]);
  },
);

Deno.test(
  "serveFiles() lets If-Range decide between 206 and 200",
  FILES,
  async () => {
    await using site = await fixture({ "site/digits.txt": "0123456789" });
    const etag = (await ranged(site, "bytes=0-0")).headers.get("etag")!;
    const status = async (ifRange: string) =>
      (await ranged(site, "bytes=0-0", { "if-range": ifRange })).status;
    assert.equal(await status(etag), 206);
    assert.equal(await status('"other"'), 200);
    assert.equal(await status(`W/${etag}`), 200); // strong comparison only
    assert.equal(await status(LAST_MODIFIED), 206);
    assert.equal(await status("Fri, 03 Jan 2020 00:00:00 GMT"), 200);
    assert.equal(await status("not a date"), 200);
  },
);

// ---------------------------------------------------------------------------
// Precompressed variants
// ---------------------------------------------------------------------------

Deno.test(
  "serveFiles() sends precompressed variants to clients that accept them",
  FILES,
  async () => {
    await using site = await fixture({
      "site/app.js": "PLAIN",
      "site/app.js.br": "BROTLI",
      "site/app.js.gz": "GZIP",
      "site/only.css": "PLAIN",
      "site/only.css.gz": "GZIP",
      "site/none.js": "PLAIN",
    });
    const options = { root: site.root };
    const fetchWith = (path: string, encodings: string | null) =>
      getFile(
        options,
        path,
        withHeaders(encodings === null ? {} : { "accept-encoding": encodings }),
      );
    const cases: [string, string | null, string, string | null][] = [
      ["/app.js", "gzip, deflate, br", "BROTLI", "br"],
      ["/app.js", "gzip", "GZIP", "gzip"],
      ["/app.js", "x-gzip", "GZIP", "gzip"],
      ["/app.js", "br;q=0, gzip", "GZIP", "gzip"],
      ["/app.js", "br;q=0.000, gzip;q=0", "PLAIN", null],
      ["/app.js", "*", "BROTLI", "br"],
      ["/app.js", "*, br;q=0", "GZIP", "gzip"],
      ["/app.js", "identity", "PLAIN", null],
      ["/app.js", null, "PLAIN", null],
      ["/only.css", "br", "PLAIN", null],
      ["/only.css", "br, gzip", "GZIP", "gzip"],
    ];
    const etags = new Set<string>();
    for (const [path, encodings, text, coding] of cases) {
      const reply = await fetchWith(path, encodings);
      const label = `${path} ${encodings}`;
      assert.equal(reply.status, 200, label);
      assert.equal(reply.text, text, label);
      assert.equal(reply.headers.get("content-encoding"), coding, label);
      assert.equal(reply.headers.get("vary"), "Accept-Encoding", label);
      assert.match(reply.headers.get("content-type")!, /^text\//, label);
      if (path === "/app.js") etags.add(reply.headers.get("etag")!);
    }
    assert.equal(etags.size, 3, "each variant has its own ETag");
    const none = await fetchWith("/none.js", "br, gzip");
    assert.equal(none.headers.get("vary"), null);
    assert.equal(none.headers.get("content-encoding"), null);
    // The variant's own validator and bytes.
    const br = await fetchWith("/app.js", "br");
    const revalidated = await getFile(options, "/app.js", {
      headers: {
        "accept-encoding": "br",
        "if-none-match": br.headers.get("etag")!,
      },
    });
    assert.equal(revalidated.status, 304);
    assert.equal(revalidated.headers.get("vary"), "Accept-Encoding");
    const part = await getFile(options, "/app.js", {
      headers: { "accept-encoding": "gzip", range: "bytes=0-1" },
    });
    assert.equal(part.status, 206);
    assert.equal(part.text, "GZ");
    assert.equal(part.headers.get("content-range"), "bytes 0-1/4");
    // Asked for by name, a .gz file is just a file.
    const direct = await fetchWith("/app.js.gz", "gzip");
    assert.equal(direct.headers.get("content-type"), "application/gzip");
    assert.equal(direct.headers.get("content-encoding"), null);
  },
);

// ---------------------------------------------------------------------------
// Changes, big files, and descriptors
// ---------------------------------------------------------------------------

Deno.test(
  "serveFiles() serves a changed file fresh with a new ETag",
  FILES,
  async () => {
    await using site = await fixture({
      "site/a.txt": "version 1",
      "site/gone.txt": "soon gone",
    });
    const options = { root: site.root };
    const first = await getFile(options, "/a.txt");
    assert.equal(first.text, "version 1");
    assert.equal((await getFile(options, "/gone.txt")).status, 200);
    assert.equal((await getFile(options, "/new.txt")).status, 404);
    // A file changed, one removed, one added: each is seen once the cache's
    // trust in what it saw (at most a second) has run out.
    await Deno.writeTextFile(`${site.root}/a.txt`, "version 2, longer");
    await Deno.remove(`${site.root}/gone.txt`);
    await Deno.writeTextFile(`${site.root}/new.txt`, "new");
    await delay(1100);
    const second = await getFile(options, "/a.txt");
    assert.equal(second.text, "version 2, longer");
    assert.notEqual(second.headers.get("etag"), first.headers.get("etag"));
    const stale = withHeaders({ "if-none-match": first.headers.get("etag")! });
    assert.equal((await getFile(options, "/a.txt", stale)).status, 200);
    assert.equal((await getFile(options, "/gone.txt")).status, 404);
    assert.equal((await getFile(options, "/new.txt")).text, "new");
  },
);

Deno.test(
  "serveFiles() streams a big file in bounded chunks",
  FILES,
  async () => {
    await using site = await fixture({ "site/big.txt": BIG });
    const response = await serveFiles(
      new Request("http://localhost/big.txt"),
      { root: site.root },
    );
    assert.equal(response.status, 200);
    const chunks: Uint8Array[] = [];
    for await (const chunk of response.body!) chunks.push(chunk);
    assert.ok(chunks.length > 1);
    assert.ok(chunks.every((chunk) => chunk.length <= 64 * 1024));
    assert.equal(decoder.decode(concat(chunks)), BIG);
  },
);

Deno.test(
  "serveFiles() releases the file of 200 aborted downloads",
  FILES,
  async () => {
    await using site = await fixture({ "site/big.txt": BIG });
    const options = { root: site.root };
    await getFile(options, "/big.txt"); // warm up: lazily opened descriptors
    const before = openDescriptors();
    using files = trackOpenFiles();
    for (let download = 0; download < 200; download++) {
      const request = new Request("http://localhost/big.txt");
      const response = await serveFiles(request, options);
      const reader = response.body!.getReader();
      const first = await reader.read();
      assert.equal(first.value?.length, 64 * 1024);
      await reader.cancel();
    }
    await settleFiles(files, before);
    assert.equal(files.count, 0);
    assert.equal(openDescriptors(), before);
  },
);

Deno.test("serveFiles() closes big files it does not send", FILES, async () => {
  await using site = await fixture({ "site/big.txt": BIG });
  const options = { root: site.root };
  const etag = (await getFile(options, "/big.txt")).headers.get("etag")!;
  const before = openDescriptors();
  using files = trackOpenFiles();
  const cases: [RequestInit, number][] = [
    [{ method: "HEAD" }, 200],
    [withHeaders({ "if-none-match": etag }), 304],
    [withHeaders({ "if-match": '"other"' }), 412],
    [withHeaders({ range: `bytes=${BIG.length}-` }), 416],
  ];
  for (let round = 0; round < 20; round++) {
    for (const [init, status] of cases) {
      assert.equal((await getFile(options, "/big.txt", init)).status, status);
    }
  }
  assert.equal(files.count, 0);
  assert.equal(openDescriptors(), before);
});

Deno.test(
  "serveFiles() ends only the response of a file that shrinks",
  FILES,
  async () => {
    await using site = await fixture({ "site/big.txt": BIG });
    const options = { root: site.root };
    using files = trackOpenFiles();
    const response = await serveFiles(
      new Request("http://localhost/big.txt"),
      options,
    );
    const reader = response.body!.getReader();
    await reader.read();
    await Deno.truncate(`${site.root}/big.txt`, 100_000);
    await assert.rejects(async () => {
      while (!(await reader.read()).done) {
        // Read until the stream fails.
      }
    }, /shrank/);
    assert.equal(files.count, 0);
    // The next request is served, from the file as it is now.
    const after = await getFile(options, "/big.txt");
    assert.equal(after.status, 200);
    assert.equal(after.text, BIG.slice(0, 100_000));
  },
);

Deno.test(
  "serveFiles() rejects when the root is not a directory",
  FILES,
  async () => {
    await using site = await fixture({ "site/a.txt": "A" });
    for (const root of [`${site.root}/a.txt`, `${site.dir}/missing`]) {
      await assert.rejects(
        serveFiles(new Request("http://localhost/"), { root }),
        /not a readable directory/,
      );
    }
  },
);

// ---------------------------------------------------------------------------
// Files behind the real server: raw targets, the access log, descriptors
// ---------------------------------------------------------------------------

/** What the file beside the root holds: no request may ever get it. */
const SECRET_TEXT = "TOP SECRET, beside the root";

/** A line of `/etc/passwd`: the first file every traversal attempt wants. */
const PASSWD_LINE = /root:[^:\n]*:0:0:/;

/**
 * Sends `GET target` as is, with `Connection: close`, and returns the
 * status and every byte the server sent until it closed (as Latin-1 text),
 * so that nothing it sends — head, body, or anything after — escapes a check.
 */
async function getRaw(
  server: Server,
  target: string,
): Promise<{ status: number; raw: string }> {
  const client = await Client.open(server);
  try {
    await client.send(
      `GET ${target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`,
    );
    const bytes = await within(client.untilClosed(), `a reply to ${target}`);
    const raw = String.fromCharCode(...bytes);
    const status = /^HTTP\/1\.1 (\d{3}) /.exec(raw);
    assert.ok(status, `a status line for ${target}: ${raw.slice(0, 80)}`);
    return { status: Number(status[1]), raw };
  } finally {
    client.close();
  }
}

Deno.test(
  "serve() with serveFiles() sends nothing from outside the root, however the target is spelled",
  FILES,
  async () => {
    await using site = await fixture({
      "secret": SECRET_TEXT,
      "outside/secret": SECRET_TEXT,
      // A sibling whose name begins with the root's: a prefix is not a parent.
      "site-evil/secret": SECRET_TEXT,
      "site/inside.txt": "INSIDE",
      "site/sub/b.txt": "B",
      "site/in-link": { link: "inside.txt" },
      "site/sub/up-link": { link: "../inside.txt" },
      "site/out-link": { link: "../secret" },
      "site/out-dir": { link: "../outside" },
      "site/evil-link": { link: "../site-evil/secret" },
    });
    await Deno.symlink(`${site.dir}/secret`, `${site.root}/absolute-link`);
    // Request targets as they go on the wire: the server's parser and URL
    // handling come before serveFiles() sees anything.
    const targets = [
      "/../secret",
      "/../../../../../../../../etc/passwd",
      "/sub/../../secret",
      "/..%2fsecret",
      "/..%2Fsecret",
      "/%2e%2e/secret",
      "/%2E%2E/secret",
      "/.%2e/secret",
      "/%2e%2e%2fsecret",
      "/sub/..%2f..%2fsecret",
      "/%252e%252e/secret", // double encoding
      "/%252e%252e%252fsecret",
      "/..%5csecret",
      "/..%5Csecret",
      "/%c0%ae%c0%ae/secret", // overlong UTF-8 for "."
      "/%c0%ae%c0%ae%c0%afsecret", // ... and for "/"
      "/%e0%80%ae%e0%80%ae/secret",
      "/..%c1%9csecret", // an overlong "\"
      "/a%00b",
      "/secret%00",
      "/%00/../secret",
      "//secret",
      "//../secret",
      "//etc/passwd",
      "///etc/passwd",
      `/${site.dir}/secret`,
      `/${encodeURIComponent(`${site.dir}/secret`)}`,
      "\\..\\secret",
      "/..\\secret",
      "/sub\\..\\..\\secret",
      "http://x/../secret", // absolute-form (RFC 9112 §3.2.2)
      "http://x/%2e%2e/secret",
      "http://x/..%2fsecret",
      "http://x//etc/passwd",
      "/../site-evil/secret",
      "/out-link",
      "/out-dir",
      "/out-dir/",
      "/out-dir/secret",
      "/absolute-link",
      "/evil-link",
    ];
    // The defaults, and the most permissive options.
    for (
      const options of [
        { root: site.root },
        { root: site.root, list: true, dotfiles: true },
      ]
    ) {
      await withFiles(options, async (server) => {
        // What is inside is served, links within the root included: a
        // server that served nothing would pass the rest.
        for (const target of ["/inside.txt", "/in-link", "/sub/up-link"]) {
          const { status, raw } = await getRaw(server, target);
          assert.equal(status, 200, target);
          assert.ok(raw.endsWith("\r\n\r\nINSIDE"), target);
        }
        for (const target of targets) {
          const { status, raw } = await getRaw(server, target);
          const what = `${target} (${JSON.stringify(options)}): ${status}`;
          assert.ok([301, 400, 404].includes(status), what);
          assert.ok(!raw.includes(SECRET_TEXT), `the secret was sent: ${what}`);
          assert.doesNotMatch(
            raw,
            PASSWD_LINE,
            `/etc/passwd was sent: ${what}`,
          );
          if (status === 301) {
            // A redirect stays on this server, inside the root.
            const location = /\r\nlocation: ([^\r]*)\r\n/i.exec(raw)?.[1] ?? "";
            assert.match(location, /^\/[^/]/, what);
          }
        }
      });
    }
  },
);

Deno.test(
  "serve() with serveFiles() logs the status and the bytes sent of a file and of a range",
  FILES,
  async () => {
    await using site = await fixture({
      "site/small.txt": "hello, file",
      "site/big.txt": BIG,
      "site/huge.bin": new Uint8Array(32 * MIB),
    });
    const batches: string[] = [];
    // Request line, extra fields, status, and the body bytes the client
    // receives (-1: whatever that is, filled in as it arrives).
    const exchanges: [string, string, number, number][] = [
      ["GET /small.txt", "", 200, 11],
      ["GET /big.txt", "", 200, BIG.length],
      ["GET /big.txt", "Range: bytes=100-1099\r\n", 206, 1000],
      ["GET /big.txt", "Range: bytes=100000-299999\r\n", 206, 200_000],
      ["GET /big.txt", "Range: bytes=0-9,-10\r\n", 206, -1], // multipart
      ["GET /big.txt", `If-Modified-Since: ${LAST_MODIFIED}\r\n`, 304, 0],
      ["HEAD /big.txt", "", 200, 0],
      ["GET /nothing", "", 404, -1],
    ];
    const accessLog = (lines: string) => batches.push(lines);
    await withFiles({ root: site.root, accessLog }, async (server) => {
      const client = await Client.open(server);
      try {
        for (const exchange of exchanges) {
          const [line, fields, status] = exchange;
          await client.send(`${line} HTTP/1.1\r\nHost: x\r\n${fields}\r\n`);
          const reply = await within(
            client.response({ head: line.startsWith("HEAD") }),
            line,
          );
          assert.equal(reply?.status, status, `${line} ${fields}`);
          if (exchange[3] < 0) exchange[3] = reply.body.length;
          assert.equal(reply.body.length, exchange[3], `${line} ${fields}`);
        }
      } finally {
        client.close();
      }
      // A download cut short: what went out before the cut, not the size.
      const cut = await Client.open(server);
      try {
        await cut.send("GET /huge.bin HTTP/1.1\r\nHost: x\r\n\r\n");
        assert.equal((await within(cut.head(), "huge.bin"))?.status, 200);
      } finally {
        cut.close();
      }
    });
    const logged = logLines(batches).map(parseLogLine);
    assert.equal(logged.length, exchanges.length + 1, logLines(batches).join());
    for (const [at, [line, fields, status, bytes]] of exchanges.entries()) {
      assert.equal(logged[at].request, `${line} HTTP/1.1`);
      assert.equal(logged[at].status, status, `${line} ${fields}`);
      assert.equal(logged[at].bytes, bytes, `${line} ${fields}: bytes logged`);
    }
    const last = logged[exchanges.length];
    assert.equal(last.request, "GET /huge.bin HTTP/1.1");
    assert.equal(last.status, 200);
    assert.ok(last.bytes < 32 * MIB, `${last.bytes} bytes logged for a cut`);
  },
);

Deno.test(
  "serve() with serveFiles() closes the file of each of 200 aborted downloads",
  FILES,
  async () => {
    await using site = await fixture({
      "site/big.bin": new Uint8Array(8 * MIB),
    });
    const request = "GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n";
    await withFiles({ root: site.root }, async (server) => {
      // Warm up: descriptors the runtime opens lazily are opened now.
      assert.equal((await getRaw(server, "/nothing")).status, 404);
      const before = openDescriptors();
      using files = trackOpenFiles();
      let headsRead = 0;
      // 10 batches of 20 clients at once, each gone at one of three moments:
      // right after asking, after the head, after the first body bytes.
      for (let batch = 0; batch < 10; batch++) {
        const downloads = Array.from({ length: 20 }, async (_, at) => {
          const client = await Client.open(server);
          try {
            await client.send(request);
            if (at % 3 === 0) return;
            assert.equal((await client.head())?.status, 200);
            headsRead++;
            if (at % 3 === 2) await client.conn.read(new Uint8Array(4096));
          } finally {
            client.close();
          }
        });
        await within(
          Promise.all(downloads),
          `aborted downloads, batch ${batch}`,
        );
      }
      await settleFiles(files, before);
      assert.ok(files.opened >= headsRead, `${files.opened} files opened`);
      assert.equal(files.count, 0, `${files.count} of ${files.opened} open`);
      assert.equal(openDescriptors(), before);
      // And the server is still serving that file.
      const reply = await ask(
        server,
        "GET /big.bin HTTP/1.1\r\nHost: x\r\nRange: bytes=-4\r\n\r\n",
      );
      assert.equal(reply?.status, 206);
      assert.equal(reply.body.length, 4);
    });
  },
);

// ---------------------------------------------------------------------------
// Fuzzing: mutated requests never crash, desynchronise or 500 the server
// ---------------------------------------------------------------------------

/** A small seeded generator (mulberry32), so a failure can be replayed. */
function random(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * A fuzz test: `test` draws from a random source seeded by FUZZ_SEED (read
 * where --allow-env grants it) or else by the clock, and a failure names
 * the seed that replays it.
 */
function fuzzTest(
  name: string,
  test: (next: () => number) => Promise<void>,
): void {
  Deno.test(name, async () => {
    const granted =
      Deno.permissions.querySync({ name: "env", variable: "FUZZ_SEED" })
        .state === "granted";
    const seed = Number(
      (granted && Deno.env.get("FUZZ_SEED")) || Date.now() % 2 ** 31,
    );
    try {
      await test(random(seed));
    } catch (error) {
      if (error instanceof Error) {
        error.message +=
          `\n(fuzz seed ${seed}: replay with FUZZ_SEED=${seed} ` +
          "deno test --allow-net --allow-read --allow-write --allow-env)";
      }
      throw error;
    }
  });
}

const SEEDS = [
  GET,
  post("/echo", "hello fuzz"),
  "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" +
  "5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\nTrailer: t\r\n\r\n",
  "HEAD /sleep?x=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
  "GET http://example.com/nope HTTP/1.1\r\nHost: example.com\r\n" +
  "Expect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
];

function mutate(next: () => number): Uint8Array {
  const pick = <T>(items: T[]) => items[Math.floor(next() * items.length)];
  let bytes = [...latin1(pick(SEEDS))];
  const rounds = 1 + Math.floor(next() * 4);
  for (let round = 0; round < rounds; round++) {
    const at = Math.floor(next() * bytes.length);
    switch (
      pick(["flip", "insert", "delete", "truncate", "duplicate", "splice"])
    ) {
      case "flip":
        bytes[at] ^= 1 << Math.floor(next() * 8);
        break;
      case "insert":
        bytes.splice(
          at,
          0,
          pick([0, 9, 10, 13, 32, 44, 58, 59, 0x7f, 0xff, 48]),
        );
        break;
      case "delete":
        bytes.splice(at, 1 + Math.floor(next() * 4));
        break;
      case "truncate":
        bytes = bytes.slice(0, at);
        break;
      case "duplicate": {
        const length = Math.floor(next() * 20);
        bytes.splice(at, 0, ...bytes.slice(at, at + length));
        break;
      }
      case "splice":
        bytes.splice(
          at,
          0,
          ...latin1(pick(SEEDS)).slice(0, Math.floor(next() * 40)),
        );
        break;
    }
  }
  return Uint8Array.from(bytes);
}

/**
 * Splits a stream of responses, checking each head's form. A body is skipped
 * by its Content-Length, unless the input may hold a HEAD request and no
 * body follows.
 */
function responseStatuses(text: string, mayBeHead: boolean): number[] {
  const statuses: number[] = [];
  let rest = text;
  while (rest.length > 0) {
    const headEnd = rest.indexOf("\r\n\r\n");
    assert.ok(headEnd > 0, `a complete head: ${JSON.stringify(rest)}`);
    const [line, ...fields] = rest.slice(0, headEnd).split("\r\n");
    const match = /^HTTP\/1\.1 (\d{3}) [A-Za-z -]+$/.exec(line);
    assert.ok(match, `a status line: ${JSON.stringify(line)}`);
    assert.ok(fields.every((field) => /^[A-Za-z-]+: [ -~]*$/.test(field)));
    const length = Number(
      /\r\ncontent-length: (\d+)/i.exec(rest.slice(0, headEnd + 2))?.[1] ?? 0,
    );
    rest = rest.slice(headEnd + 4);
    const bodiless = mayBeHead &&
      (rest.length === 0 || rest.startsWith("HTTP/1.1 "));
    if (!bodiless) {
      assert.ok(rest.length >= length, "a complete body");
      rest = rest.slice(length);
    }
    statuses.push(Number(match[1]));
  }
  return statuses;
}

const ALLOWED = new Set([
  100,
  200,
  400,
  404,
  405,
  408,
  413,
  414,
  417,
  431,
  501,
  505,
]);

fuzzTest(
  "serve() answers thousands of mutated requests with valid responses",
  async (next) => {
    await withServer(
      { headerTimeout: 0.5, bodyTimeout: 0.5, sleepDelay: 0.01 },
      async (server) => {
        const inputs = Array.from({ length: 3000 }, () => mutate(next));
        let replies = 0;
        let index = 0;
        const worker = async () => {
          while (index < inputs.length) {
            const input = inputs[index++];
            const conn = await Deno.connect({ port: server.addr.port });
            try {
              await conn.write(input);
              // Half-close so that truncated requests end instead of waiting.
              await conn.closeWrite();
              const { text } = await readUntilClosed(conn, 0);
              const mayBeHead = decoder.decode(input).includes("HEAD");
              for (const status of responseStatuses(text, mayBeHead)) {
                assert.ok(ALLOWED.has(status), `status ${status}`);
                replies++;
              }
            } catch (error) {
              throw new Error(
                `input ${JSON.stringify(decoder.decode(input))}: ${error}`,
              );
            } finally {
              conn.close();
            }
          }
        };
        await Promise.all(Array.from({ length: 16 }, worker));
        assert.ok(replies > 1000, `most inputs get a reply (${replies})`);
        const after = await ask(server, GET);
        assert.equal(after?.status, 200);
      },
    );
  },
);

// ---------------------------------------------------------------------------
// TLS: the same server over Deno.listenTls (cert and key options, issue 10)
// ---------------------------------------------------------------------------

/*
 * A test certificate authority and a certificate for `localhost` signed by
 * it, kept here as PEM text so that `deno test --allow-net` needs no file
 * and no subprocess. Both keys are ECDSA P-256 (small, quick to handshake
 * with). Both certificates are valid from 2025-01-01 to 2045-01-01: fixed
 * dates rather than "now", so that a machine whose clock lags the day they
 * were made still accepts them. The leaf names `localhost` and `127.0.0.1`
 * in subjectAltName, which clients check (RFC 6125 §6.4), and is not a CA
 * (rustls refuses a CA certificate as a server's own). Made once with
 * OpenSSL 3.0 (`openssl ca`, because only it sets a start date before
 * today); the CA's key was thrown away:
 *
 * ```sh
 * cat >ca.cnf <<'CNF'
 * [ca]
 * default_ca = test_ca
 * [test_ca]
 * database = index.txt
 * new_certs_dir = .
 * serial = serial
 * default_md = sha256
 * policy = any_name
 * [any_name]
 * commonName = supplied
 * [ca_ext]
 * basicConstraints = critical, CA:TRUE
 * keyUsage = critical, keyCertSign, cRLSign
 * subjectKeyIdentifier = hash
 * [leaf_ext]
 * subjectAltName = DNS:localhost, IP:127.0.0.1
 * basicConstraints = critical, CA:FALSE
 * keyUsage = critical, digitalSignature
 * extendedKeyUsage = serverAuth
 * authorityKeyIdentifier = keyid
 * CNF
 * touch index.txt
 * openssl rand -hex 16 >serial
 * openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key
 * openssl req -new -key ca.key -subj "/CN=hello-server test CA" -out ca.csr
 * openssl ca -batch -config ca.cnf -selfsign -keyfile ca.key -in ca.csr \
 *   -startdate 20250101000000Z -enddate 20450101000000Z -extensions ca_ext \
 *   -notext -out ca.crt
 * openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
 *   -out localhost.key
 * openssl req -new -key localhost.key -subj "/CN=localhost" \
 *   -out localhost.csr
 * openssl ca -batch -config ca.cnf -cert ca.crt -keyfile ca.key \
 *   -in localhost.csr -startdate 20250101000000Z -enddate 20450101000000Z \
 *   -extensions leaf_ext -notext -out localhost.crt
 * openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
 *   -out other.key
 * openssl verify -CAfile ca.crt localhost.crt   # localhost.crt: OK
 * ```
 *
 * TEST_CA is ca.crt, TEST_CERT localhost.crt, TEST_KEY localhost.key (PKCS
 * #8), OTHER_KEY other.key.
 */

/** The test CA's certificate: what the clients are told to trust. */
const TEST_CA = `-----BEGIN CERTIFICATE-----
MIIBfzCCASWgAwIBAgIRAMKf2a8ysxjnoq7WlS/p9x0wCgYIKoZIzj0EAwIwHzEd
MBsGA1UEAwwUaGVsbG8tc2VydmVyIHRlc3QgQ0EwHhcNMjUwMTAxMDAwMDAwWhcN
NDUwMTAxMDAwMDAwWjAfMR0wGwYDVQQDDBRoZWxsby1zZXJ2ZXIgdGVzdCBDQTBZ
MBMGByqGSM49AgEGCCqGSM49AwEHA0IABGVSuyYje3A15cK+looUQCRrD5uL83rH
LoJZ0NrTh8+yn12dCSYbCoY3XcCyT1BD4zi7okuxqoBDcrsgJFqvEwKjQjBAMA8G
A1UdEwEB/wQFMAMBAf8wDgYDVR0PAQH/BAQDAgEGMB0GA1UdDgQWBBT6CXMajtlE
9Z3f8kuOXzDiE1WvhDAKBggqhkjOPQQDAgNIADBFAiEA1/pPPdk/V/m32UnyJc1B
rOGyghf2KPxQ49EcDIj8UDcCIGx9zSRmX/8K5xXcZMKAir96Wu7mPlyj1GQqqnaS
gpqi
-----END CERTIFICATE-----
`;

/** The server's certificate for `localhost` and `127.0.0.1`, signed by TEST_CA. */
const TEST_CERT = `-----BEGIN CERTIFICATE-----
MIIBxjCCAWugAwIBAgIRAMKf2a8ysxjnoq7WlS/p9x4wCgYIKoZIzj0EAwIwHzEd
MBsGA1UEAwwUaGVsbG8tc2VydmVyIHRlc3QgQ0EwHhcNMjUwMTAxMDAwMDAwWhcN
NDUwMTAxMDAwMDAwWjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAAQPtjTRt8KiHSgj7NRGvbU5CNCZH0htFn4N3kHGhC1B4Mmw
w0xd27n5875vbqRMcyxr+VoQFtC+6W2rsxfVi/qIo4GSMIGPMBoGA1UdEQQTMBGC
CWxvY2FsaG9zdIcEfwAAATAMBgNVHRMBAf8EAjAAMA4GA1UdDwEB/wQEAwIHgDAT
BgNVHSUEDDAKBggrBgEFBQcDATAfBgNVHSMEGDAWgBT6CXMajtlE9Z3f8kuOXzDi
E1WvhDAdBgNVHQ4EFgQU8pZ19kh/42Ygb/mnuub2TW736hAwCgYIKoZIzj0EAwID
SQAwRgIhAKk4Hb5rdR4412McqCk/XYtT7wqR1PLQhUw8WoXXCKrqAiEA7uM7RoQI
RnPvsn83Lp0W2nQSd+3hqKukPbsmAokwvKo=
-----END CERTIFICATE-----
`;

/** TEST_CERT's private key: a test key, public by design. */
const TEST_KEY = `-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg/APijRHkJHv8h+WQ
wcbb8FicrbjjlnDC7Enq6JCJvPShRANCAAQPtjTRt8KiHSgj7NRGvbU5CNCZH0ht
Fn4N3kHGhC1B4Mmww0xd27n5875vbqRMcyxr+VoQFtC+6W2rsxfVi/qI
-----END PRIVATE KEY-----
`;

/** A key that does not match TEST_CERT. */
const OTHER_KEY = `-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgIxfcTxVddr4jIzKb
VypM969Ls0+V2fbgjJhbSXjNskehRANCAASLYhO01TMYUEOgnf0cT3+c3kelNh5X
b1zH4WtBSSowJHDzxjCyLt2ODTc5ME7b8+fo1DPWwCO34zEV0DNu369B
-----END PRIVATE KEY-----
`;

/** The options that turn TLS on, with the test certificate. */
const TLS: ServeOptions = { cert: TEST_CERT, key: TEST_KEY };

/** A TLS connection to `server` that trusts the test CA. */
function connectTls(
  server: Server,
  options: { alpnProtocols?: string[] } = { alpnProtocols: ["http/1.1"] },
): Promise<Deno.TlsConn> {
  return Deno.connectTls({
    hostname: "localhost",
    port: server.addr.port,
    caCerts: [TEST_CA],
    ...options,
  });
}

/** GET / on a fresh TLS connection: the server still serves. */
async function assertServesTls(server: Server): Promise<void> {
  const client = await Client.openTls(server);
  try {
    await client.send(GET);
    const reply = await client.response();
    assert.equal(reply?.status, 200);
    assert.equal(reply.text, HELLO_PAGE);
  } finally {
    client.close();
  }
}

/** Waits until `condition` holds, looking every 10 ms; fails after `ms`. */
async function until(
  condition: () => boolean,
  what: string,
  ms = 5000,
): Promise<void> {
  const began = performance.now();
  while (!condition()) {
    assert.ok(performance.now() - began < ms, `${what}: not in ${ms} ms`);
    await delay(10);
  }
}

/** A TLS record (RFC 8446 §5.1) of `type` around `body`, in TLS 1.0's version. */
function tlsRecord(type: number, body: Uint8Array): Uint8Array {
  const bytes = new Uint8Array(5 + body.length);
  bytes.set([type, 0x03, 0x01, body.length >> 8, body.length & 0xff]);
  bytes.set(body, 5);
  return bytes;
}

/** `length` bytes of seeded noise: the same on every run. */
function noise(seed: number, length: number): Uint8Array {
  const next = random(seed);
  return Uint8Array.from({ length }, () => Math.floor(next() * 256));
}

Deno.test("serve() speaks HTTP/1.1 over TLS, chosen by ALPN", async () => {
  await withServer(TLS, async (server) => {
    // A client offering ALPN gets http/1.1, the only protocol offered back
    // (RFC 7301 §3.2); one offering none is served all the same.
    for (const alpnProtocols of [["h2", "http/1.1"], ["http/1.1"], []]) {
      const conn = await connectTls(server, { alpnProtocols });
      const client = new Client(conn);
      try {
        const { alpnProtocol } = await conn.handshake();
        assert.equal(alpnProtocol, alpnProtocols.length ? "http/1.1" : null);
        await client.send(GET);
        const reply = await client.response();
        assert.equal(reply?.status, 200);
        assert.equal(reply.text, HELLO_PAGE);
        assert.equal(
          reply.headers.get("content-length"),
          String(encoder.encode(HELLO_PAGE).length),
        );
      } finally {
        client.close();
      }
    }
  });
});

Deno.test("serve() keeps a TLS connection alive and answers pipelined requests", async () => {
  await withServer({ ...TLS, idleTimeout: 7 }, async (server) => {
    const client = await Client.openTls(server);
    try {
      for (let i = 0; i < 3; i++) {
        await client.send(post("/echo", `round ${i}`));
        const reply = await client.response();
        assert.equal(reply?.text, `round ${i}`);
        assert.equal(reply.headers.get("connection"), undefined);
        assert.equal(reply.headers.get("keep-alive"), "timeout=7");
      }
      // In one write, which TLS splits into records of 16 KiB at most: the
      // requests straddle record boundaries.
      const count = 300;
      let batch = "";
      for (let i = 0; i < count; i++) {
        batch += i % 5 === 4
          ? "HEAD / HTTP/1.1\r\nHost: localhost\r\n\r\n"
          : post("/echo", `request ${i}`);
      }
      await client.send(batch);
      for (let i = 0; i < count; i++) {
        const reply = await client.response({ head: i % 5 === 4 });
        assert.equal(reply?.status, 200);
        if (i % 5 !== 4) assert.equal(reply.text, `request ${i}`);
      }
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() echoes a POST body over TLS byte for byte", async () => {
  await withServer(TLS, async (server) => {
    const client = await Client.openTls(server);
    try {
      // Larger than a TLS record, with every byte value.
      const body = new Uint8Array(200_000).map((_, i) => (i * 7919) % 256);
      await client.send(
        "POST /echo HTTP/1.1\r\nHost: localhost\r\n" +
          `Content-Length: ${body.length}\r\n\r\n`,
      );
      await client.send(body);
      const reply = await client.response();
      assert.equal(reply?.status, 200);
      assert.deepEqual(reply.body, body);
      // Chunked, on the same connection.
      await client.send(
        "POST /echo HTTP/1.1\r\nHost: localhost\r\n" +
          "Transfer-Encoding: chunked\r\n\r\n" +
          "5\r\nhello\r\n6\r\n, TLS!\r\n0\r\n\r\n",
      );
      assert.equal((await client.response())?.text, "hello, TLS!");
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() runs a handler over TLS, with https URLs", async () => {
  const seen: string[] = [];
  await withHandler(TLS, async (request, info) => {
    const url = new URL(request.url);
    seen.push(`${url.protocol} ${info.remoteAddr.hostname}`);
    return new Response(
      `${request.method} ${url.pathname}${url.search} ` +
        (await request.text()),
    );
  }, async (server) => {
    const client = await Client.openTls(server);
    try {
      await client.send(post("/anything?x=1", "over TLS") + GET);
      assert.equal(
        (await client.response())?.text,
        "POST /anything?x=1 over TLS",
      );
      assert.equal((await client.response())?.text, "GET / ");
      // The request's URL says how it came, as Deno.serve's do.
      assert.deepEqual(seen, ["https: 127.0.0.1", "https: 127.0.0.1"]);
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() cuts a stalled TLS handshake at the header timeout", async () => {
  await withServer({ ...TLS, headerTimeout: 0.5 }, async (server) => {
    const began = performance.now();
    // A client that connects and sends nothing, and one that stops half way
    // through its ClientHello: a record header (RFC 8446 §5.1) announcing
    // 512 bytes of handshake, a ClientHello header (§4), then 60 bytes.
    const silent = await Deno.connect({ port: server.addr.port });
    const half = await Deno.connect({ port: server.addr.port });
    try {
      const hello = new Uint8Array(5 + 4 + 60);
      hello.set([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]);
      await half.write(hello);
      await until(() => server.connections === 2, "both accepted");
      // Meanwhile the handshakes of others go on: a stall holds up no one.
      await assertServesTls(server);
      // What is ours to check is our side: both connections are closed and
      // forgotten. Their clients do not see an end of stream yet: Deno 2.9's
      // TLS layer keeps the socket open after a close during a handshake
      // until the client sends or leaves (a limitation of Deno, recorded in
      // the README), so this test does not wait for one.
      await until(() => server.connections === 0, "the stalls cut", 5000);
      const after = performance.now() - began;
      // Not before the timeout, give or take the server's coarse clock (it
      // ticks every 125 ms at this timeout).
      assert.ok(after >= 350, `cut after ${after} ms, not before 0.5 s`);
      await assertServesTls(server);
    } finally {
      silent.close();
      half.close();
    }
  });
});

Deno.test("serve() answers 408 to a slow head over TLS", async () => {
  await withServer({ ...TLS, headerTimeout: 0.5 }, async (server) => {
    const conn = await connectTls(server);
    try {
      await conn.handshake();
      const began = performance.now();
      await conn.write(latin1("GET / HTTP/1.1\r\nHost: localhost\r\n"));
      const { text, after } = await readUntilClosed(conn, began);
      assert.match(text, /^HTTP\/1\.1 408 Request Timeout\r\n/);
      assert.match(text, /\r\nConnection: close\r\n/);
      assert.ok(after < 5000, `cut after ${after} ms, near the 0.5 s timeout`);
    } finally {
      conn.close();
    }
  });
});

Deno.test("serve() ends junk and plain HTTP on the TLS port quietly", async () => {
  const logged: string[] = [];
  const errors: unknown[][] = [];
  const consoleError = console.error;
  console.error = (...args: unknown[]) => errors.push(args);
  try {
    // The header timeout is long: these connections must end for what they
    // sent, not when the timer runs out. The noise is seeded, so that each
    // run sends the same bytes (some noise, by chance, would be the start
    // of a valid record, and wait for the rest).
    const options = {
      ...TLS,
      headerTimeout: 10,
      accessLog: (lines: string) => logged.push(lines),
    };
    await withServer(options, async (server) => {
      const junk: [string, Uint8Array][] = [
        ["plain HTTP", latin1(GET)],
        ["plain HTTP, pipelined", latin1(GET + post("/echo", "x") + GET)],
        ["noise", noise(1, 3000)],
        // A ClientHello (handshake type 1, RFC 8446 §4) of the length its
        // header says, whose body is noise: malformed, not incomplete.
        [
          "bad ClientHello",
          tlsRecord(0x16, new Uint8Array([1, 0, 0, 196, ...noise(2, 196)])),
        ],
        // Application data before any handshake (§5: unexpected_message).
        ["early data", tlsRecord(0x17, noise(3, 100))],
        ["nothing, then a close", new Uint8Array(0)],
      ];
      for (const [what, bytes] of junk) {
        const conn = await Deno.connect({ port: server.addr.port });
        try {
          const began = performance.now();
          if (bytes.length > 0) {
            await conn.write(bytes);
          } else {
            await conn.closeWrite();
          }
          const { text, after } = await readUntilClosed(conn, began, 5000);
          // A TLS alert may come back; an HTTP response may not.
          assert.doesNotMatch(text, /HTTP\//, what);
          assert.ok(after < 5000, `${what}: ended after ${after} ms`);
        } finally {
          conn.close();
        }
        await assertServesTls(server);
      }
    });
  } finally {
    console.error = consoleError;
  }
  assert.deepEqual(errors, [], "nothing on stderr");
  // The log shows the TLS clients' requests, and nothing of the junk.
  const lines = logLines(logged);
  assert.equal(lines.length, 6);
  for (const line of lines) assert.match(line, /"GET \/ HTTP\/1\.1" 200 /);
});

Deno.test("serve() counts TLS connections toward maxConnections", async () => {
  await withServer({ ...TLS, maxConnections: 2 }, async (server) => {
    // Two clients that never start their handshakes fill the server.
    const first = await Deno.connect({ port: server.addr.port });
    const second = await Deno.connect({ port: server.addr.port });
    const third = await (async () => {
      await until(() => server.connections === 2, "both accepted");
      // A third waits in the kernel's backlog, its handshake unanswered.
      return await connectTls(server);
    })().catch((error) => {
      first.close();
      second.close();
      throw error;
    });
    const client = new Client(third);
    try {
      const handshake = third.handshake();
      const early = await Promise.race([
        handshake.then(() => true),
        delay(300).then(() => false),
      ]);
      assert.ok(!early, "no handshake over the cap");
      assert.equal(server.connections, 2);
      // One of the two leaves: the third is accepted and served.
      first.close();
      await within(handshake, "the handshake once a slot is free");
      await client.send(GET);
      assert.equal((await client.response())?.text, HELLO_PAGE);
    } finally {
      try {
        first.close();
      } catch { /* closed above */ }
      second.close();
      client.close();
    }
  });
});

Deno.test("serve() shutdown() finishes a TLS request in flight", async () => {
  let entered!: () => void;
  const inHandler = new Promise<void>((resolve) => entered = resolve);
  let release!: () => void;
  const released = new Promise<void>((resolve) => release = resolve);
  const server = serve(
    { ...TLS, port: 0, accessLog: false },
    async (request) => {
      if (pathOf(request) === "/slow") {
        entered();
        await released;
      }
      return new Response("done");
    },
  );
  const idle = await Client.openTls(server);
  const busy = await Client.openTls(server);
  try {
    await idle.send(GET);
    assert.equal((await idle.response())?.text, "done");
    await busy.send("GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n");
    await within(inHandler, "the handler called");
    const finished = server.shutdown();
    assert.ok(await idle.closedByServer(), "the idle connection is closed");
    await assert.rejects(connectTls(server).then((conn) => conn.handshake()));
    release();
    const reply = await busy.response();
    assert.equal(reply?.status, 200);
    assert.equal(reply.text, "done");
    assert.equal(reply.headers.get("connection"), "close");
    assert.ok(await busy.closedByServer());
    await finished;
    assert.equal(server.forced, 0);
  } finally {
    release();
    idle.close();
    busy.close();
    await server.shutdown();
  }
});

Deno.test("serve() refuses a certificate without its key", () => {
  const options = { port: 0, accessLog: false };
  assert.throws(() => serve({ ...options, cert: TEST_CERT, key: OTHER_KEY }));
  assert.throws(() => serve({ ...options, cert: TEST_CERT }));
  assert.throws(() => serve({ ...options, key: TEST_KEY }));
  assert.throws(() => serve({ ...options, cert: "junk", key: TEST_KEY }));
});

// ---------------------------------------------------------------------------
// Batches split across reads
// ---------------------------------------------------------------------------

Deno.test("serve() answers a pipelined batch before the 408 of a request left unfinished behind it", async () => {
  await withServer({ headerTimeout: 0.5 }, async (server) => {
    const conn = await Deno.connect({ port: server.addr.port });
    try {
      // Exactly the 256 bytes of a new connection's read buffer, ending
      // mid-request: a read that fills its room and splits a request makes
      // the server read on before it writes — and the rest never comes.
      const batch = latin1(GET.repeat(7) + "GET / HTTP/");
      assert.equal(batch.length, 256);
      await conn.write(batch);
      const { text } = await readUntilClosed(conn, performance.now());
      const statuses = [...text.matchAll(/HTTP\/1\.1 (\d{3}) /g)].map((m) =>
        m[1]
      );
      assert.deepEqual(statuses, [...Array(7).fill("200"), "408"]);
    } finally {
      conn.close();
    }
  });
});

Deno.test("serve() answers earlier pipelined requests before waiting for a handler's body", async () => {
  await withHandler(
    {},
    async (request) =>
      new Response(`${request.method} ${await request.text()}`),
    async (server) => {
      const client = await Client.open(server);
      try {
        await client.send(
          `GET /a HTTP/1.1\r\nHost: x\r\n\r\n` +
            `POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234`,
        );
        const first = await within(client.response(), "the GET's answer");
        assert.equal(first?.text, "GET ");
        await client.send("56789");
        const second = await within(client.response(), "the POST's answer");
        assert.equal(second?.text, "POST 0123456789");
      } finally {
        client.close();
      }
    },
  );
});

// ---------------------------------------------------------------------------
// Handlers: what a review found
// ---------------------------------------------------------------------------

Deno.test("serve() lets a handler take its time after reading its body", async () => {
  await withHandler({ bodyTimeout: 0.5 }, async (request) => {
    const text = await request.text();
    await delay(1200); // past the body timeout, with the body all read
    return new Response(`got ${text}`);
  }, async (server) => {
    const client = await Client.open(server);
    try {
      await client.send(
        "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",
      );
      await delay(100); // so the body takes a read of its own
      await client.send("hello");
      const reply = await within(client.response(), "the reply");
      assert.equal(reply?.status, 200);
      assert.equal(reply.text, "got hello");
    } finally {
      client.close();
    }
  });
});

Deno.test("serve() gives each request its own signal, not aborted once answered", async () => {
  const signals: AbortSignal[] = [];
  await withHandler({}, (request) => {
    signals.push(request.signal);
    return new Response("ok");
  }, async (server) => {
    const client = await Client.open(server);
    await client.send(GET + GET);
    await within(client.response(), "the first reply");
    await within(client.response(), "the second reply");
    client.close();
    await delay(200); // the server sees the close
  });
  assert.equal(signals.length, 2);
  assert.notEqual(signals[0], signals[1]);
  assert.ok(!signals[0].aborted && !signals[1].aborted);
});

for (const answer of ["at once", "through a promise"]) {
  Deno.test(`serve() cancels a stream answered ${answer} when the client hangs up`, async () => {
    const cancelled = Promise.withResolvers<void>();
    const aborted = Promise.withResolvers<void>();
    await withHandler({}, (request) => {
      request.signal.addEventListener("abort", () => aborted.resolve());
      const body = new ReadableStream<Uint8Array>({
        start: (controller) =>
          controller.enqueue(encoder.encode("data: 1\n\n")),
        cancel: () => cancelled.resolve(),
      });
      const response = new Response(body, {
        headers: { "content-type": "text/event-stream" },
      });
      return answer === "at once" ? response : Promise.resolve(response);
    }, async (server) => {
      const client = await Client.open(server);
      await client.send(GET);
      await within(client.head(), "the head");
      assert.ok(await within(client.chunk(), "the first event"));
      client.close();
      await within(cancelled.promise, "the stream is cancelled");
      await within(aborted.promise, "the signal aborts");
      await until(() => server.connections === 0, "the close");
    });
  });
}

Deno.test(
  "serve() cuts loose an onError that never answers at the shutdown timeout",
  quietly(
    (errors) => assert.deepEqual(errors, ["error: the handler failed: boom"]),
    async () => {
      const server = serve({
        port: 0,
        accessLog: false,
        shutdownTimeout: 0.5,
        onError: () => new Promise<Response>(() => {}),
      }, () => {
        throw new Error("boom");
      });
      const client = await Client.open(server);
      try {
        await client.send(GET);
        await delay(100);
        await within(server.shutdown(), "the shutdown");
        assert.equal(server.forced, 1);
      } finally {
        client.close();
      }
    },
  ),
);

Deno.test("serve() answers earlier pipelined requests before a handler that takes its time", async () => {
  const release = Promise.withResolvers<void>();
  await withHandler({}, async (request) => {
    if (pathOf(request) === "/slow") await release.promise;
    return new Response(pathOf(request));
  }, async (server) => {
    const client = await Client.open(server);
    try {
      await client.send(
        "GET /fast HTTP/1.1\r\nHost: x\r\n\r\nGET /slow HTTP/1.1\r\nHost: x\r\n\r\n",
      );
      const fast = await within(client.response(), "/fast before /slow ends");
      assert.equal(fast?.text, "/fast");
      release.resolve();
      assert.equal((await within(client.response(), "/slow"))?.text, "/slow");
    } finally {
      release.resolve();
      client.close();
    }
  });
});

// ---------------------------------------------------------------------------
// WebSockets (RFC 6455, RFC 7692)
// ---------------------------------------------------------------------------

/** RFC 6455 §1.3's example key, and the accept value it must get. */
const WS_KEY = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/** An opening handshake (RFC 6455 §4.1), with `fields` added or replacing. */
function handshake(
  fields: Record<string, string | null> = {},
  line = "GET /chat HTTP/1.1",
): string {
  const all: Record<string, string | null> = {
    host: "localhost",
    upgrade: "websocket",
    connection: "Upgrade",
    "sec-websocket-key": WS_KEY,
    "sec-websocket-version": "13",
    ...fields,
  };
  let text = `${line}\r\n`;
  for (const [name, value] of Object.entries(all)) {
    if (value !== null) text += `${name}: ${value}\r\n`;
  }
  return text + "\r\n";
}

/** A client frame (RFC 6455 §5.2): masked unless told not to. */
function wsFrame(
  opcode: number,
  payload: Uint8Array | string = new Uint8Array(0),
  { fin = true, rsv = 0, masked = true, key = [0x37, 0xfa, 0x21, 0x3d] } = {},
): Uint8Array {
  const data = typeof payload === "string" ? encoder.encode(payload) : payload;
  const length = data.length;
  const head = length < 126 ? 2 : length < 65536 ? 4 : 10;
  const bytes = new Uint8Array(head + (masked ? 4 : 0) + length);
  bytes[0] = (fin ? 0x80 : 0) | rsv << 4 | opcode;
  bytes[1] = (masked ? 0x80 : 0) |
    (head === 2 ? length : head === 4 ? 126 : 127);
  if (head === 4) bytes.set([length >> 8, length & 0xff], 2);
  if (head === 10) new DataView(bytes.buffer).setBigUint64(2, BigInt(length));
  let at = head;
  if (masked) {
    bytes.set(key, at);
    at += 4;
  }
  for (let i = 0; i < length; i++) {
    bytes[at + i] = masked ? data[i] ^ key[i & 3] : data[i];
  }
  return bytes;
}

/** A close frame's payload: the code, then the reason. */
function closePayload(code: number, reason = ""): Uint8Array {
  const text = encoder.encode(reason);
  const bytes = new Uint8Array(2 + text.length);
  bytes.set([code >> 8, code & 0xff]);
  bytes.set(text, 2);
  return bytes;
}

interface Frame {
  fin: boolean;
  rsv: number;
  opcode: number;
  payload: Uint8Array;
}

/** The next frame from the server (never masked, §5.1), or null at the end. */
async function readFrame(client: Client): Promise<Frame | null> {
  const start = await client.exactly(2);
  if (!start) return null;
  assert.equal(start[1] & 0x80, 0, "a server frame is not masked");
  let length = start[1] & 0x7f;
  if (length === 126) {
    const more = (await client.exactly(2))!;
    length = more[0] << 8 | more[1];
  } else if (length === 127) {
    const more = (await client.exactly(8))!;
    length = Number(new DataView(more.buffer).getBigUint64(0));
  }
  const payload = (await client.exactly(length))!;
  assert.ok(payload, "a truncated frame");
  return {
    fin: (start[0] & 0x80) !== 0,
    rsv: (start[0] >> 4) & 7,
    opcode: start[0] & 0x0f,
    payload,
  };
}

/**
 * Reads the server's close frame (skipping what comes before it), checks
 * its code, and that the server then closes the connection.
 */
async function assertClosedWith(
  client: Client,
  code: number | null,
  what = "",
): Promise<string> {
  let frame: Frame | null;
  while ((frame = await readFrame(client)) && frame.opcode !== 0x8) {
    /* earlier frames */
  }
  assert.ok(frame, `${what}: a close frame before the end`);
  const got = frame.payload.length
    ? frame.payload[0] << 8 | frame.payload[1]
    : null;
  assert.equal(got, code, `${what}: the close code`);
  assert.ok(
    await client.closedByServer(),
    `${what}: the server closes the connection`,
  );
  client.close(); // as a client does once the server has
  return decoder.decode(frame.payload.subarray(2));
}

/** What a socket's events were, in order, as a test reads them. */
interface SocketLog {
  events: string[];
  closed: Promise<CloseEvent>;
  socket: WebSocket;
}

/**
 * A server whose handler upgrades every request and echoes what it gets;
 * `onSocket` sees each socket first.
 */
async function withEchoServer(
  options: ServeOptions & { upgrade?: UpgradeWebSocketOptions },
  test: (server: Server, sockets: SocketLog[]) => Promise<void>,
  onSocket: (socket: WebSocket) => void = (socket) => {
    socket.onmessage = (event) => socket.send(event.data);
  },
): Promise<void> {
  const sockets: SocketLog[] = [];
  const { upgrade, ...serveOptions } = options;
  await withHandler(serveOptions, (request) => {
    const { socket, response } = upgradeWebSocket(request, upgrade);
    const events: string[] = [];
    const closed = new Promise<CloseEvent>((resolve) => {
      socket.addEventListener("close", (event) => {
        events.push(`close ${event.code} ${event.wasClean}`);
        resolve(event);
      });
    });
    socket.addEventListener("open", () => events.push("open"));
    socket.addEventListener("error", () => events.push("error"));
    sockets.push({ events, closed, socket });
    onSocket(socket);
    return response;
  }, (server) => test(server, sockets));
}

/** A connection past its handshake: the 101 read and checked. */
async function openSocket(
  server: Server,
  fields: Record<string, string | null> = {},
): Promise<{ client: Client; head: Head }> {
  const client = await Client.open(server);
  await client.send(handshake(fields));
  const head = await client.head();
  assert.equal(head?.status, 101, "101 Switching Protocols");
  return { client, head };
}

Deno.test("upgradeWebSocket() accepts a handshake with a 101 and the accept key", async () => {
  const lines: string[] = [];
  await withEchoServer(
    { accessLog: (text) => lines.push(text) },
    async (server, sockets) => {
      const { client, head } = await openSocket(server);
      assert.equal(head.headers.get("upgrade")?.toLowerCase(), "websocket");
      assert.equal(head.headers.get("connection")?.toLowerCase(), "upgrade");
      assert.equal(head.headers.get("sec-websocket-accept"), WS_ACCEPT);
      assert.ok(!head.headers.has("content-length"), "no framing on a 101");
      assert.ok(!head.headers.has("sec-websocket-protocol"), "none offered");
      await client.send(wsFrame(0x1, "hi"));
      const echo = await readFrame(client);
      assert.equal(decoder.decode(echo!.payload), "hi");
      client.close();
      const [{ socket }] = sockets;
      assert.equal(socket.url, `ws://localhost/chat`);
      assert.equal(socket.protocol, "");
      assert.equal(socket.extensions, "");
    },
  );
  const logged = logLines(lines);
  assert.equal(logged.length, 1);
  assert.match(logged[0], /"GET \/chat HTTP\/1\.1" 101 -$/);
});

Deno.test("upgradeWebSocket() chooses the subprotocol only when the client offers it", async () => {
  await withEchoServer(
    { upgrade: { protocol: "chat.v2" } },
    async (server, sockets) => {
      const offered = await openSocket(server, {
        "sec-websocket-protocol": "chat.v1, chat.v2",
      });
      assert.equal(
        offered.head.headers.get("sec-websocket-protocol"),
        "chat.v2",
      );
      assert.equal(sockets[0].socket.protocol, "chat.v2");
      offered.client.close();
      const other = await openSocket(server, {
        "sec-websocket-protocol": "CHAT.V2",
      });
      assert.ok(!other.head.headers.has("sec-websocket-protocol"));
      assert.equal(sockets[1].socket.protocol, "");
      other.client.close();
    },
  );
});

Deno.test("upgradeWebSocket() refuses a bad handshake with 400, another version with 426, and the connection stays HTTP", async () => {
  const bad: [string, string][] = [
    [handshake({}, "POST /chat HTTP/1.1"), "POST"],
    [
      handshake({ connection: "Upgrade, keep-alive" }, "GET /chat HTTP/1.0"),
      "HTTP/1.0",
    ],
    [handshake({ upgrade: null }), "no Upgrade"],
    [handshake({ upgrade: "h2c" }), "Upgrade: h2c"],
    [handshake({ connection: "keep-alive" }), "no upgrade option"],
    [handshake({ "sec-websocket-key": null }), "no key"],
    [handshake({ "sec-websocket-key": "c2hvcnQ=" }), "a short key"],
    [
      handshake({ "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=!" }),
      "not base64",
    ],
    [handshake({ "content-length": "2" }) + "hi", "a body"],
  ];
  await withEchoServer({}, async (server, sockets) => {
    for (const [request, what] of bad) {
      const client = await Client.open(server);
      await client.send(request + handshake());
      const refusal = await client.response();
      assert.equal(refusal?.status, 400, what);
      const next = await client.response();
      assert.equal(next?.status, 101, `${what}: the next request is served`);
      client.close();
    }
    const client = await Client.open(server);
    await client.send(
      handshake({ "sec-websocket-version": "8" }) + handshake(),
    );
    const refusal = await client.response();
    assert.equal(refusal?.status, 426);
    assert.equal(refusal.headers.get("sec-websocket-version"), "13");
    assert.equal(refusal.headers.get("upgrade"), "websocket");
    assert.match(refusal.headers.get("connection") ?? "", /upgrade/i);
    assert.equal((await client.response())?.status, 101);
    client.close();
    // Only the upgrades that were answered 101 opened a socket.
    await until(
      () =>
        sockets.filter((s) => s.events.length > 1).length === bad.length + 1,
      "every socket closed",
    );
    assert.ok(sockets.every(({ events }) => events[0] === "open"));
  });
});

Deno.test("upgradeWebSocket() throws a TypeError on a request it did not make, or twice", async () => {
  assert.throws(
    () => upgradeWebSocket(new Request("http://localhost/")),
    TypeError,
  );
  let second: unknown;
  await withHandler({}, (request) => {
    const { response } = upgradeWebSocket(request);
    try {
      upgradeWebSocket(request);
    } catch (error) {
      second = error;
    }
    return response;
  }, async (server) => {
    const { client } = await openSocket(server);
    client.close();
  });
  assert.ok(second instanceof TypeError);
});

Deno.test("serve() echoes text and binary messages of every length encoding, byte for byte", async () => {
  await withEchoServer({}, async (server) => {
    const { client } = await openSocket(server);
    const texts = [
      "",
      "a",
      "héllo, wörld ☃ 🦕",
      "x".repeat(125),
      "y".repeat(126),
      "z".repeat(70_000),
    ];
    for (const text of texts) {
      await client.send(wsFrame(0x1, text));
      const echo = await readFrame(client);
      assert.deepEqual([echo!.opcode, echo!.fin, echo!.rsv], [0x1, true, 0]);
      assert.equal(decoder.decode(echo!.payload), text);
    }
    for (const length of [0, 1, 125, 126, 65535, 65536, 300_000]) {
      const data = noise(length, length);
      await client.send(wsFrame(0x2, data, { key: [0, 0xff, 0x80, 0x01] }));
      const echo = await readFrame(client);
      assert.equal(echo!.opcode, 0x2);
      assert.deepEqual(echo!.payload, data, `${length} bytes`);
    }
    await client.send(wsFrame(0x8, closePayload(1000)));
    await assertClosedWith(client, 1000);
  });
});

Deno.test("serve() takes frames sent with the handshake, and frames split at every byte", async () => {
  await withEchoServer({}, async (server) => {
    const client = await Client.open(server);
    await client.send(concat([latin1(handshake()), wsFrame(0x1, "early")]));
    assert.equal((await client.head())?.status, 101);
    assert.equal(decoder.decode((await readFrame(client))!.payload), "early");
    const bytes = concat([
      wsFrame(0x1, "one"),
      wsFrame(0x2, noise(3, 300)),
      wsFrame(0x1, "two"),
    ]);
    for (const byte of bytes) {
      await client.send(new Uint8Array([byte]));
      await delay(0);
    }
    assert.equal(decoder.decode((await readFrame(client))!.payload), "one");
    assert.deepEqual((await readFrame(client))!.payload, noise(3, 300));
    assert.equal(decoder.decode((await readFrame(client))!.payload), "two");
    client.close();
  });
});

Deno.test("serve() closes with 1002 on an unmasked frame, a 126-byte ping, and with 1007 on bad UTF-8", async () => {
  const cases: [Uint8Array, number, string][] = [
    [wsFrame(0x1, "hi", { masked: false }), 1002, "an unmasked frame"],
    [wsFrame(0x9, new Uint8Array(126)), 1002, "a 126-byte ping"],
    [wsFrame(0x1, new Uint8Array([0x68, 0xc3, 0x28])), 1007, "bad UTF-8 text"],
  ];
  await withEchoServer({}, async (server, sockets) => {
    for (const [frame, code, what] of cases) {
      const { client } = await openSocket(server);
      await client.send(frame);
      await assertClosedWith(client, code, what);
      client.close();
    }
    for (const { closed, events } of sockets) {
      const event = await closed;
      assert.equal(event.code, 1006, "no close frame came from the client");
      assert.equal(event.wasClean, false);
      assert.deepEqual(events, ["open", "error", "close 1006 false"]);
    }
  });
});

Deno.test("serve() closes with 1002 on reserved bits, reserved opcodes and broken fragmentation", async () => {
  const cases: [Uint8Array[], string][] = [
    [[wsFrame(0x1, "a", { rsv: 4 })], "RSV1 without an extension"],
    [[wsFrame(0x1, "a", { rsv: 2 })], "RSV2"],
    [[wsFrame(0x1, "a", { rsv: 1 })], "RSV3"],
    [[wsFrame(0x3, "a")], "opcode 3"],
    [[wsFrame(0xb, "a")], "opcode 11"],
    [[wsFrame(0x9, "a", { fin: false })], "a fragmented ping"],
    [[wsFrame(0x8, new Uint8Array([3]))], "a close payload of one byte"],
    [[wsFrame(0x0, "a")], "a continuation with no message"],
    [
      [wsFrame(0x1, "a", { fin: false }), wsFrame(0x1, "b")],
      "a new message inside a message",
    ],
    [
      [
        wsFrame(0x2, new Uint8Array(8 + 4 + 1)).map((byte, i) =>
          i === 1 ? 0x80 | 127 : i === 2 ? 0x80 : byte
        ),
      ],
      "a 64-bit length with its top bit set",
    ],
  ];
  for (
    const code of [
      0,
      999,
      1004,
      1005,
      1006,
      1015,
      1016,
      2000,
      2999,
      5000,
      65535,
    ]
  ) {
    cases.push([[wsFrame(0x8, closePayload(code))], `close code ${code}`]);
  }
  await withEchoServer({}, async (server) => {
    for (const [frames, what] of cases) {
      const { client } = await openSocket(server);
      await client.send(concat(frames));
      await assertClosedWith(client, 1002, what);
      client.close();
    }
  });
});

Deno.test("serve() assembles fragments, with control frames between them", async () => {
  await withEchoServer({}, async (server, sockets) => {
    const { client } = await openSocket(server);
    const text = "snow ☃ and 🦕";
    const bytes = encoder.encode(text);
    // Split inside the snowman's and the dinosaur's bytes: UTF-8 is checked
    // across fragments, not per fragment.
    const cut1 = bytes.indexOf(0xe2) + 1;
    const cut2 = bytes.indexOf(0xf0) + 2;
    await client.send(concat([
      wsFrame(0x1, bytes.subarray(0, cut1), { fin: false }),
      wsFrame(0x9, "are you there?"),
      wsFrame(0x0, bytes.subarray(cut1, cut2), { fin: false }),
      wsFrame(0xa, "unasked"),
      wsFrame(0x0, bytes.subarray(cut2)),
    ]));
    const pong = await readFrame(client);
    assert.equal(pong!.opcode, 0xa, "the ping is answered first");
    assert.equal(decoder.decode(pong!.payload), "are you there?");
    const echo = await readFrame(client);
    assert.deepEqual([echo!.opcode, decoder.decode(echo!.payload)], [
      0x1,
      text,
    ]);
    const data = noise(9, 100_000);
    await client.send(concat([
      wsFrame(0x2, data.subarray(0, 10), { fin: false }),
      wsFrame(0x0, data.subarray(10, 50_000), { fin: false }),
      wsFrame(0x0, new Uint8Array(0), { fin: false }),
      wsFrame(0x0, data.subarray(50_000)),
    ]));
    assert.deepEqual((await readFrame(client))!.payload, data);
    client.close();
    assert.equal((await sockets[0].closed).code, 1006);
  });
});

Deno.test("serve() fails bad UTF-8 in a fragment before the message ends", async () => {
  await withEchoServer({}, async (server) => {
    const { client } = await openSocket(server);
    await client.send(
      wsFrame(0x1, new Uint8Array([0x61, 0xff]), { fin: false }),
    );
    await assertClosedWith(
      client,
      1007,
      "an invalid byte in the first fragment",
    );
    client.close();
    const second = await openSocket(server);
    // Valid so far, but the message ends inside a character.
    await second.client.send(concat([
      wsFrame(0x1, new Uint8Array([0x61, 0xe2]), { fin: false }),
      wsFrame(0x0, new Uint8Array([0x98])),
    ]));
    await assertClosedWith(second.client, 1007, "a character cut by the end");
    second.client.close();
  });
});

Deno.test("serve() answers a ping with a pong of the same payload", async () => {
  await withEchoServer({}, async (server) => {
    const { client } = await openSocket(server);
    for (const payload of [new Uint8Array(0), noise(1, 125)]) {
      await client.send(wsFrame(0x9, payload));
      const pong = await readFrame(client);
      assert.equal(pong!.opcode, 0xa);
      assert.deepEqual(pong!.payload, payload);
    }
    client.close();
  });
});

Deno.test("serve() answers the client's close frame with its code, then closes the connection", async () => {
  await withEchoServer({}, async (server, sockets) => {
    const { client } = await openSocket(server);
    await client.send(wsFrame(0x8, closePayload(4321, "bye ☃")));
    assert.equal(await assertClosedWith(client, 4321), "bye ☃");
    const event = await sockets[0].closed;
    assert.deepEqual([event.code, event.reason, event.wasClean], [
      4321,
      "bye ☃",
      true,
    ]);
    const empty = await openSocket(server);
    await empty.client.send(wsFrame(0x8));
    await assertClosedWith(
      empty.client,
      null,
      "an empty close is answered empty",
    );
    assert.equal((await sockets[1].closed).code, 1005);
    const bad = await openSocket(server);
    await bad.client.send(wsFrame(0x8, new Uint8Array([0x03, 0xe8, 0xff])));
    await assertClosedWith(bad.client, 1007, "a reason that is not UTF-8");
  });
});

Deno.test("socket.close() sends the close frame and waits for the client's", async () => {
  const messages: unknown[] = [];
  await withEchoServer({}, async (server, sockets) => {
    const { client } = await openSocket(server);
    await client.send(wsFrame(0x1, "close, please"));
    const frame = await readFrame(client);
    assert.equal(frame!.opcode, 0x8);
    assert.deepEqual(frame!.payload, closePayload(4000, "as asked"));
    assert.equal(sockets[0].socket.readyState, WebSocket.CLOSING);
    // A message after the close frame is dropped, not dispatched.
    await client.send(wsFrame(0x1, "too late"));
    await client.send(wsFrame(0x8, closePayload(4000)));
    assert.ok(
      await client.closedByServer(),
      "the server closes once both close frames crossed",
    );
    client.close();
    const event = await sockets[0].closed;
    assert.deepEqual([event.code, event.wasClean], [4000, true]);
    assert.equal(sockets[0].socket.readyState, WebSocket.CLOSED);
    assert.deepEqual(messages, ["close, please"]);
  }, (socket) => {
    socket.onmessage = (event) => {
      messages.push(event.data);
      if (event.data === "close, please") socket.close(4000, "as asked");
      else socket.send("unexpected");
    };
  });
});

Deno.test("serve() cuts a closing handshake the client never finishes", async () => {
  await withEchoServer({ wsCloseTimeout: 0.3 }, async (server, sockets) => {
    const { client } = await openSocket(server);
    const frame = await readFrame(client);
    assert.equal(frame!.opcode, 0x8);
    assert.ok(
      await within(client.closedByServer(), "the cut"),
      "the server cuts the connection",
    );
    client.close();
    const event = await sockets[0].closed;
    assert.deepEqual([event.code, event.wasClean], [1006, false]);
  }, (socket) => {
    socket.onopen = () => socket.close(1000);
  });
});

Deno.test("serve() pings a silent client, keeps one that answers, and closes one that does not", async () => {
  await withEchoServer(
    { upgrade: { idleTimeout: 0.3 } },
    async (server, sockets) => {
      const { client } = await openSocket(server);
      for (let i = 0; i < 2; i++) {
        const ping = await within(readFrame(client), "a ping");
        assert.equal(ping!.opcode, 0x9);
        await client.send(wsFrame(0xa, ping!.payload));
      }
      await client.send(wsFrame(0x1, "still here"));
      assert.equal(
        decoder.decode((await readFrame(client))!.payload),
        "still here",
      );
      // Now it stops answering: a ping, then a close frame with 1001.
      assert.equal((await readFrame(client))!.opcode, 0x9);
      const close = await within(readFrame(client), "the close frame");
      assert.equal(close!.opcode, 0x8);
      assert.equal(close!.payload[0] << 8 | close!.payload[1], 1001);
      assert.ok(await client.closedByServer());
      client.close();
      const event = await sockets[0].closed;
      assert.deepEqual([event.code, event.wasClean], [1006, false]);
      assert.ok(sockets[0].events.includes("error"));
    },
  );
});

Deno.test("serve() closes with 1009 a message past the limit, before its payload comes", async () => {
  await withEchoServer({ wsMaxMessage: 1000 }, async (server) => {
    const fits = await openSocket(server);
    await fits.client.send(wsFrame(0x2, noise(1, 1000)));
    assert.deepEqual((await readFrame(fits.client))!.payload, noise(1, 1000));
    fits.client.close();
    const { client } = await openSocket(server);
    // The head alone says too much.
    await client.send(wsFrame(0x2, new Uint8Array(1001)).subarray(0, 8));
    await assertClosedWith(client, 1009, "one frame");
    const fragments = await openSocket(server);
    await fragments.client.send(concat([
      wsFrame(0x1, "a".repeat(600), { fin: false }),
      wsFrame(0x0, "a".repeat(401)),
    ]));
    await assertClosedWith(fragments.client, 1009, "fragments");
  });
});

Deno.test("upgradeWebSocket() takes a maxMessage of its own, and validates its options", async () => {
  await withEchoServer({ upgrade: { maxMessage: 10 } }, async (server) => {
    const { client } = await openSocket(server);
    await client.send(wsFrame(0x1, "x".repeat(11)));
    await assertClosedWith(client, 1009);
  });
  for (
    const options of [{ idleTimeout: -1 }, { idleTimeout: NaN }, {
      maxMessage: 0,
    }, { maxBuffered: 1.5 }]
  ) {
    let thrown: unknown;
    await withHandler({}, (request) => {
      try {
        return upgradeWebSocket(request, options).response;
      } catch (error) {
        thrown = error;
        return new Response("no");
      }
    }, async (server) => {
      const client = await Client.open(server);
      await client.send(handshake());
      assert.equal((await client.response())?.status, 200);
      client.close();
    });
    assert.ok(thrown instanceof TypeError, Deno.inspect(options));
  }
});

Deno.test("serve() cuts a client that reads nothing once the queue passes maxBuffered", async () => {
  let highest = 0;
  await withEchoServer(
    { wsMaxBuffered: 256 * 1024 },
    async (server, sockets) => {
      const { client } = await openSocket(server);
      await client.send(wsFrame(0x1, "flood me"));
      // The client reads nothing; the kernel's buffers fill, then the queue.
      const event = await within(sockets[0].closed, "the cut", 20_000);
      assert.deepEqual([event.code, event.wasClean], [1006, false]);
      assert.ok(sockets[0].events.includes("error"));
      assert.ok(highest > 256 * 1024, `bufferedAmount rose to ${highest}`);
      client.close();
    },
    (socket) => {
      const chunk = new Uint8Array(64 * 1024);
      let timer: ReturnType<typeof setInterval> | undefined;
      socket.onmessage = () => {
        // A chunk a tick: writes complete until the client's buffers are full.
        timer = setInterval(() => {
          socket.send(chunk);
          highest = Math.max(highest, socket.bufferedAmount);
        }, 2);
      };
      socket.onclose = () => clearInterval(timer);
    },
  );
});

Deno.test("serve() counts WebSocket connections toward maxConnections", async () => {
  await withEchoServer({ maxConnections: 2 }, async (server) => {
    const first = await openSocket(server);
    const second = await openSocket(server);
    const third = await Client.open(server);
    await third.send(handshake());
    assert.ok(await third.quietFor(300), "the third waits in the backlog");
    await first.client.send(wsFrame(0x8, closePayload(1000)));
    await assertClosedWith(first.client, 1000);
    assert.equal((await within(third.head(), "the third's turn"))?.status, 101);
    second.client.close();
    third.close();
  });
});

Deno.test("serve() shutdown() sends close 1001 to each socket and waits for the answer", async () => {
  const sockets: SocketLog[] = [];
  const server = serve({ port: 0, accessLog: false }, (request) => {
    const { socket, response } = upgradeWebSocket(request);
    const closed = new Promise<CloseEvent>((resolve) =>
      socket.onclose = resolve
    );
    sockets.push({ socket, closed, events: [] });
    return response;
  });
  const a = await openSocket(server);
  const b = await openSocket(server);
  await until(
    () =>
      sockets.every(({ socket }) => socket.readyState === WebSocket.OPEN) &&
      sockets.length === 2,
    "both open",
  );
  const finished = server.shutdown();
  for (const { client } of [a, b]) {
    const close = await readFrame(client);
    assert.equal(close!.opcode, 0x8);
    assert.equal(close!.payload[0] << 8 | close!.payload[1], 1001);
    await client.send(wsFrame(0x8, close!.payload));
    assert.ok(await client.closedByServer());
    client.close();
  }
  await within(finished, "the shutdown");
  for (const { closed } of sockets) {
    const event = await closed;
    assert.deepEqual([event.code, event.wasClean], [1001, true]);
  }
  assert.equal(server.forced, 0);
});

Deno.test("serve() shutdown() cuts a socket that never answers the close at the shutdown timeout", async () => {
  const server = serve({
    port: 0,
    accessLog: false,
    shutdownTimeout: 0.3,
    wsCloseTimeout: 60,
  }, (request) => upgradeWebSocket(request).response);
  const { client } = await openSocket(server);
  await delay(50);
  const finished = server.shutdown();
  assert.equal((await readFrame(client))!.opcode, 0x8);
  await within(finished, "the shutdown");
  assert.equal(server.forced, 1);
  assert.ok(await client.closedByServer());
  client.close();
});

Deno.test("the socket is a WHATWG WebSocket in shape: states, checks, binaryType, handlers", async () => {
  const seen: unknown[] = [];
  await withEchoServer({}, async (server, sockets) => {
    const { client } = await openSocket(server);
    await client.send(wsFrame(0x2, new Uint8Array([1, 2, 3])));
    const blobEcho = await readFrame(client);
    assert.deepEqual(blobEcho!.payload, new Uint8Array([1, 2, 3]));
    // Sent after the Blob, arrives after it.
    assert.equal(
      decoder.decode((await readFrame(client))!.payload),
      "after the blob",
    );
    client.close();
    await sockets[0].closed;
    assert.ok(seen[0] instanceof Blob, "binaryType blob");
    assert.equal(seen[1], "InvalidStateError");
    assert.deepEqual(seen.slice(2, 4), ["InvalidAccessError", "SyntaxError"]);
    assert.equal(seen[4], 1, "OPEN");
    assert.ok(!seen.includes("first onopen"), "a handler replaced");
    const socket = sockets[0].socket;
    assert.equal(socket.readyState, socket.CLOSED);
    const before = socket.bufferedAmount;
    socket.send("gone");
    assert.equal(socket.bufferedAmount, before + 4, "counted, not sent");
  }, (socket) => {
    try {
      socket.send("too early");
    } catch (error) {
      seen[1] = (error as DOMException).name;
    }
    socket.binaryType = "blob";
    socket.binaryType = "nonsense" as BinaryType;
    socket.onmessage = (event) => {
      seen[0] = event.data;
      for (
        const [code, reason] of [[1001, ""], [1000, "x".repeat(124)]] as const
      ) {
        try {
          socket.close(code, reason);
        } catch (error) {
          seen.push((error as DOMException).name);
        }
      }
      seen[4] = socket.readyState;
      socket.send(event.data);
      socket.send("after the blob");
    };
    // Replaced, not added: only the second one runs.
    socket.onopen = () => seen.push("first onopen");
    socket.onopen = null;
  });
});

Deno.test("serve() closes a socket the handler accepted but did not answer with", async () => {
  await withHandler({}, (request) => {
    const { socket } = upgradeWebSocket(request);
    return new Promise((resolve) => {
      socket.onclose = (event) =>
        resolve(new Response(`closed ${event.code} ${socket.readyState}`));
      // Answered otherwise, so the socket never opens.
      setTimeout(() => resolve(new Response("no socket")), 10);
    });
  }, async (server) => {
    const client = await Client.open(server);
    await client.send(handshake() + handshake());
    for (let i = 0; i < 2; i++) {
      const reply = await client.response();
      assert.equal(reply?.status, 200, "still HTTP");
      assert.equal(reply.text, "no socket");
    }
    client.close();
  });
});

Deno.test("Deno.upgradeWebSocket() works on this server's requests, and on Deno.serve's as before", async () => {
  await withHandler({}, (request) => {
    const { socket, response } = Deno.upgradeWebSocket(request);
    socket.onmessage = (event) => socket.send(`ours: ${event.data}`);
    return response;
  }, async (server) => {
    const { client } = await openSocket(server);
    await client.send(wsFrame(0x1, "hi"));
    assert.equal(
      decoder.decode((await readFrame(client))!.payload),
      "ours: hi",
    );
    client.close();
  });
  const native = Deno.serve({ port: 0, onListen() {} }, (request) => {
    const { socket, response } = Deno.upgradeWebSocket(request);
    socket.onmessage = (event) => socket.send(`deno: ${event.data}`);
    return response;
  });
  try {
    const socket = new WebSocket(`ws://127.0.0.1:${native.addr.port}/`);
    const reply = await new Promise<string>((resolve, reject) => {
      socket.onopen = () => socket.send("hi");
      socket.onmessage = (event) => resolve(event.data);
      socket.onerror = () => reject(new Error("Deno.serve's socket failed"));
    });
    assert.equal(reply, "deno: hi");
    const closed = new Promise((resolve) => socket.onclose = resolve);
    socket.close();
    await closed;
  } finally {
    await native.shutdown();
  }
});

Deno.test("serve() speaks WebSocket over TLS", async () => {
  await withEchoServer(TLS, async (server, sockets) => {
    const client = await Client.openTls(server);
    await client.send(handshake());
    assert.equal((await client.head())?.status, 101);
    await client.send(wsFrame(0x1, "secret"));
    assert.equal(decoder.decode((await readFrame(client))!.payload), "secret");
    await client.send(wsFrame(0x8, closePayload(1000)));
    await assertClosedWith(client, 1000);
    assert.equal(sockets[0].socket.url, "wss://localhost/chat");
  });
});

/** Deflates a message as a client would (RFC 7692 §7.2.1): the tail removed. */
function deflateMessage(data: Uint8Array): Uint8Array {
  const out = deflateRawSync(data, { finishFlush: zlibConstants.Z_SYNC_FLUSH });
  return new Uint8Array(out.subarray(0, out.length - 4));
}

function inflateMessage(data: Uint8Array): Uint8Array {
  const input = concat([data, new Uint8Array([0, 0, 0xff, 0xff])]);
  return new Uint8Array(
    inflateRawSync(input, { finishFlush: zlibConstants.Z_SYNC_FLUSH }),
  );
}

const DEFLATE_REPLY =
  "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

Deno.test("serve() negotiates permessage-deflate as the client offers it", async () => {
  const offers: [string, string | undefined][] = [
    ["permessage-deflate", DEFLATE_REPLY],
    ["permessage-deflate; client_max_window_bits", DEFLATE_REPLY],
    [
      "permessage-deflate; server_max_window_bits=10",
      `${DEFLATE_REPLY}; server_max_window_bits=10`,
    ],
    [
      'permessage-deflate; server_max_window_bits="12"',
      `${DEFLATE_REPLY}; server_max_window_bits=12`,
    ],
    [
      "permessage-deflate; server_max_window_bits=8, permessage-deflate",
      DEFLATE_REPLY,
    ],
    ["permessage-deflate; server_max_window_bits=8", undefined],
    ["permessage-deflate; server_max_window_bits=16", undefined],
    ["permessage-deflate; unknown_parameter", undefined],
    [
      "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
      undefined,
    ],
    ["permessage-deflate; client_no_context_takeover=1", undefined],
    ["x-webkit-deflate-frame", undefined],
  ];
  await withEchoServer({}, async (server) => {
    for (const [offer, reply] of offers) {
      const { client, head } = await openSocket(server, {
        "sec-websocket-extensions": offer,
      });
      assert.equal(head.headers.get("sec-websocket-extensions"), reply, offer);
      client.close();
    }
  });
  await withEchoServer({ compression: false }, async (server) => {
    const { client, head } = await openSocket(server, {
      "sec-websocket-extensions": "permessage-deflate",
    });
    assert.ok(
      !head.headers.has("sec-websocket-extensions"),
      "compression: false",
    );
    client.close();
  });
});

Deno.test("serve() inflates compressed messages and compresses large ones it sends", async () => {
  await withEchoServer({}, async (server, sockets) => {
    const { client } = await openSocket(server, {
      "sec-websocket-extensions": "permessage-deflate",
    });
    const text = "a compressible line of text\n".repeat(200);
    await client.send(
      wsFrame(0x1, deflateMessage(encoder.encode(text)), { rsv: 4 }),
    );
    const echo = await readFrame(client);
    assert.equal(echo!.rsv, 4, "a large message goes compressed");
    assert.ok(echo!.payload.length < text.length / 10);
    assert.equal(decoder.decode(inflateMessage(echo!.payload)), text);
    // A compressed message in fragments: RSV1 on the first only.
    const data = deflateMessage(noise(4, 5000));
    await client.send(concat([
      wsFrame(0x2, data.subarray(0, 100), { rsv: 4, fin: false }),
      wsFrame(0x0, data.subarray(100)),
    ]));
    const binary = await readFrame(client);
    assert.equal(binary!.rsv, 0, "noise does not shrink: sent as it is");
    assert.deepEqual(binary!.payload, noise(4, 5000));
    await client.send(wsFrame(0x1, "short"));
    const short = await readFrame(client);
    assert.deepEqual([short!.rsv, decoder.decode(short!.payload)], [
      0,
      "short",
    ]);
    assert.equal(sockets[0].socket.extensions, DEFLATE_REPLY);
    client.close();
  });
});

Deno.test("serve() closes with 1009 on a compressed message that inflates past the limit, 1007 on bad data, 1002 on RSV1 mid-message", async () => {
  await withEchoServer({ wsMaxMessage: 64 * 1024 }, async (server) => {
    const offer = { "sec-websocket-extensions": "permessage-deflate" };
    const bomb = deflateMessage(new Uint8Array(10 * 1024 * 1024));
    assert.ok(bomb.length < 64 * 1024, "a small payload");
    const first = await openSocket(server, offer);
    await first.client.send(wsFrame(0x2, bomb, { rsv: 4 }));
    await assertClosedWith(first.client, 1009, "a zip bomb");
    const second = await openSocket(server, offer);
    await second.client.send(
      wsFrame(0x2, new Uint8Array([0xff, 0xff, 0xff]), { rsv: 4 }),
    );
    await assertClosedWith(second.client, 1007, "not deflate");
    const third = await openSocket(server, offer);
    await third.client.send(concat([
      wsFrame(0x2, "a", { fin: false }),
      wsFrame(0x0, "b", { rsv: 4 }),
    ]));
    await assertClosedWith(third.client, 1002, "RSV1 on a continuation");
    const invalid = await openSocket(server, offer);
    await invalid.client.send(
      wsFrame(0x1, deflateMessage(new Uint8Array([0xc3, 0x28])), { rsv: 4 }),
    );
    await assertClosedWith(invalid.client, 1007, "bad UTF-8, compressed");
  });
});

Deno.test("serve() takes a compressed message that grew past the limit in deflate, if it inflates within it", async () => {
  await withEchoServer({ wsMaxMessage: 64 * 1024 }, async (server) => {
    const { client } = await openSocket(server, {
      "sec-websocket-extensions": "permessage-deflate",
    });
    // Incompressible bytes come out of deflate a little longer.
    const data = noise(5, 64 * 1024);
    const compressed = deflateMessage(data);
    assert.ok(compressed.length > data.length);
    await client.send(wsFrame(0x2, compressed, { rsv: 4 }));
    assert.deepEqual((await readFrame(client))!.payload, data);
    await client.send(
      wsFrame(0x2, deflateMessage(noise(6, 64 * 1024 + 1)), { rsv: 4 }),
    );
    await assertClosedWith(client, 1009, "one byte past, inflated");
  });
});

Deno.test("parseFrameHead() reports incomplete heads, then the bytes taken, or the close code", () => {
  const rules = {
    deflate: false,
    message: 0,
    received: 0,
    compressed: false,
    maxMessage: 1 << 20,
  };
  const frame = new FrameHead();
  const bytes = wsFrame(0x2, new Uint8Array(300));
  for (let end = 0; end < 8; end++) {
    assert.equal(
      parseFrameHead(bytes, 0, end, frame, rules),
      INCOMPLETE,
      `${end} bytes`,
    );
  }
  assert.equal(parseFrameHead(bytes, 0, 8, frame, rules), 8);
  assert.deepEqual(
    [frame.fin, frame.opcode, frame.length, frame.compressed],
    [true, 2, 300, false],
  );
  // [what, the frame, the receiver's state, the verdict]
  const inMessage = { maxMessage: 10, message: 2, received: 5 };
  const cases: [string, Uint8Array, Partial<typeof rules>, number][] = [
    ["unmasked", wsFrame(0x1, "a", { masked: false }), {}, -1002],
    ["a continuation of nothing", wsFrame(0x0, "a"), {}, -1002],
    ["a continuation", wsFrame(0x0, "a"), { message: 1 }, 6],
    ["too big", wsFrame(0x2, new Uint8Array(11)), { maxMessage: 10 }, -1009],
    [
      "a message in a message",
      wsFrame(0x2, new Uint8Array(6)),
      inMessage,
      -1002,
    ],
    [
      "a continuation too big",
      wsFrame(0x0, new Uint8Array(6)),
      inMessage,
      -1009,
    ],
    ["RSV1 agreed", wsFrame(0x1, "a", { rsv: 4 }), { deflate: true }, 6],
    ["RSV1 not agreed", wsFrame(0x1, "a", { rsv: 4 }), {}, -1002],
  ];
  for (const [what, bytes, state, verdict] of cases) {
    assert.equal(
      parseFrameHead(bytes, 0, bytes.length, frame, { ...rules, ...state }),
      verdict,
      what,
    );
  }
  assert.equal(frame.compressed, true, "RSV1 agreed: compressed");
});

/** A client's frames, some of them broken at random: the fuzzer's input. */
function mutatedFrames(next: () => number): Uint8Array {
  const pick = <T>(items: T[]): T => items[Math.floor(next() * items.length)];
  const frames: Uint8Array[] = [];
  const count = 1 + Math.floor(next() * 6);
  for (let i = 0; i < count; i++) {
    const size = pick([0, 1, 5, 125, 126, 200, 70_000]);
    frames.push(
      pick([
        () => wsFrame(0x1, "é".repeat(size >> 1)),
        () => wsFrame(0x2, noise(i, size)),
        () => wsFrame(0x9, noise(i, Math.min(size, 125))),
        () =>
          concat([
            wsFrame(0x1, "ab", { fin: false }),
            wsFrame(0x0, "cd"),
          ]),
        () => wsFrame(0x8, closePayload(pick([1000, 1001, 3000, 1005, 999]))),
      ])(),
    );
  }
  const bytes = concat(frames);
  const mutations = Math.floor(next() * 4);
  for (let i = 0; i < mutations && bytes.length > 0; i++) {
    bytes[Math.floor(next() * bytes.length)] ^= 1 << Math.floor(next() * 8);
  }
  const cut = next() < 0.2 ? Math.floor(next() * bytes.length) : bytes.length;
  return bytes.subarray(0, cut);
}

fuzzTest(
  "serve() answers hundreds of mutated WebSocket frame sequences with well-formed frames",
  async (next) => {
    await withEchoServer({ wsMaxMessage: 64 * 1024 }, async (server) => {
      for (let i = 0; i < 300; i++) {
        const input = mutatedFrames(next);
        const { client } = await openSocket(server);
        try {
          await client.send(input);
          await client.conn.closeWrite();
          let frame: Frame | null;
          let closed = false;
          while ((frame = await readFrame(client))) {
            assert.ok(!closed, `#${i}: nothing follows a close frame`);
            assert.ok(
              [0x1, 0x2, 0x8, 0xa].includes(frame.opcode) && frame.fin &&
                frame.rsv === 0,
              `#${i}: a frame a server may send (${frame.opcode})`,
            );
            if (frame.opcode === 0x1) {
              assert.doesNotThrow(
                () =>
                  new TextDecoder("utf-8", { fatal: true }).decode(
                    frame!.payload,
                  ),
                `#${i}: text is UTF-8`,
              );
            }
            if (frame.opcode === 0x8) {
              closed = true;
              const { payload } = frame;
              assert.notEqual(
                payload.length,
                1,
                `#${i}: a close code is whole`,
              );
              const code = payload.length ? payload[0] << 8 | payload[1] : 1000;
              assert.ok(
                (code >= 1000 && code <= 1014 &&
                  ![1004, 1005, 1006].includes(code)) ||
                  (code >= 3000 && code <= 4999),
                `#${i}: close code ${code} may be sent`,
              );
            }
          }
        } finally {
          client.close();
        }
      }
      // Still serving.
      const { client } = await openSocket(server);
      await client.send(wsFrame(0x1, "after the fuzz"));
      assert.equal(
        decoder.decode((await readFrame(client))!.payload),
        "after the fuzz",
      );
      client.close();
    });
  },
);

// ---------------------------------------------------------------------------
// Compression on the fly (RFC 9110 §8.4, §12.5.3)
// ---------------------------------------------------------------------------

/** JSON of about 20 KiB: what a compressing server is for. */
const BIG_JSON = JSON.stringify(
  Array.from(
    { length: 250 },
    (_, id) => ({ id, name: `item ${id}`, ok: true }),
  ),
);

/** A response's body decoded from its Content-Encoding. */
function decoded(reply: Reply): string {
  const coding = reply.headers.get("content-encoding");
  const bytes = coding === "gzip"
    ? gunzipSync(reply.body)
    : coding === "br"
    ? brotliDecompressSync(reply.body)
    : reply.body;
  return decoder.decode(bytes);
}

/** GETs `path` with these Accept-Encoding values (null: none) in turn. */
async function askEncoded(
  server: Server,
  path: string,
  accepts: (string | null)[],
  method = "GET",
): Promise<Reply[]> {
  const client = await Client.open(server);
  try {
    await client.send(
      accepts.map((accept) =>
        `${method} ${path} HTTP/1.1\r\nHost: x\r\n` +
        (accept === null ? "" : `Accept-Encoding: ${accept}\r\n`) + "\r\n"
      ).join(""),
    );
    const replies: Reply[] = [];
    for (const _ of accepts) {
      replies.push((await client.response({ head: method === "HEAD" }))!);
    }
    return replies;
  } finally {
    client.close();
  }
}

Deno.test("serve() compresses a large JSON response as the client's Accept-Encoding prefers", async () => {
  await withHandler(
    {},
    () => Response.json(JSON.parse(BIG_JSON)),
    async (server) => {
      const cases: [string | null, string | null][] = [
        ["gzip", "gzip"],
        ["gzip, deflate, br", "br"],
        ["br;q=0.5, gzip", "gzip"],
        ["gzip;q=0.8, br;q=0.9", "br"],
        ["x-gzip", "gzip"],
        ["*", "br"],
        ["*;q=0, gzip", "gzip"],
        ["*, br;q=0", "gzip"],
        ["gzip;q=0, br;q=0", null],
        ["identity;q=0", null],
        ["deflate", null],
        ["", null],
        [null, null],
      ];
      const replies = await askEncoded(
        server,
        "/",
        cases.map(([accept]) => accept),
      );
      for (const [i, [accept, coding]] of cases.entries()) {
        const reply = replies[i];
        assert.equal(reply.status, 200, `${accept}`);
        assert.equal(
          reply.headers.get("content-encoding"),
          coding ?? undefined,
          `${accept}`,
        );
        assert.equal(
          decoded(reply),
          BIG_JSON,
          `${accept}: the bytes decode to the original`,
        );
        assert.equal(
          reply.headers.get("content-length"),
          String(reply.body.length),
        );
        if (coding) {
          assert.equal(reply.headers.get("vary"), "Accept-Encoding");
          assert.ok(
            reply.body.length * 3 < BIG_JSON.length,
            `${coding}: at least 3x smaller`,
          );
        } else {
          assert.equal(reply.headers.get("vary"), undefined, `${accept}`);
        }
      }
    },
  );
});

Deno.test("serve() leaves alone what compression would not help or must not touch", async () => {
  const big = "x".repeat(4096);
  const responses: Record<string, () => Response> = {
    // Compressible, but under 1 KiB: not worth a client's decoding.
    "/short": () => new Response("a".repeat(1000)),
    "/image": () =>
      new Response(big, { headers: { "content-type": "image/png" } }),
    "/untyped": () => new Response(encoder.encode(big)),
    "/coded": () =>
      new Response(big, {
        headers: {
          "content-type": "text/plain",
          "content-encoding": "identity",
        },
      }),
    "/no-transform": () =>
      new Response(big, {
        headers: {
          "content-type": "text/plain",
          "cache-control": "public, no-transform",
        },
      }),
    "/partial": () =>
      new Response(big.slice(0, 2000), {
        status: 206,
        headers: {
          "content-type": "text/plain",
          "content-range": "bytes 0-1999/4096",
        },
      }),
    "/empty": () => new Response(null, { status: 204 }),
  };
  await withHandler(
    {},
    (request) => responses[pathOf(request)](),
    async (server) => {
      for (const path of Object.keys(responses)) {
        const [reply] = await askEncoded(server, path, ["gzip, br"]);
        assert.equal(
          reply.headers.get("content-encoding"),
          path === "/coded" ? "identity" : undefined,
          path,
        );
        assert.equal(reply.headers.get("vary"), undefined, path);
        const expected = await responses[path]().arrayBuffer();
        assert.deepEqual(reply.body, new Uint8Array(expected), path);
      }
    },
  );
  await withHandler(
    { compression: false },
    () => Response.json(JSON.parse(BIG_JSON)),
    async (server) => {
      const [reply] = await askEncoded(server, "/", ["gzip, br"]);
      assert.equal(
        reply.headers.get("content-encoding"),
        undefined,
        "compression: false",
      );
      assert.equal(reply.text, BIG_JSON);
    },
  );
});

Deno.test("serve() weakens a strong ETag, adds to Vary, and answers HEAD with the same fields", async () => {
  await withHandler(
    {},
    (request) =>
      new Response(pathOf(request) === "/star" ? BIG_JSON : BIG_JSON, {
        headers: {
          "content-type": "application/json",
          etag: '"v1"',
          vary: pathOf(request) === "/star" ? "*" : "Origin",
        },
      }),
    async (server) => {
      const [get] = await askEncoded(server, "/", ["gzip"]);
      assert.equal(get.headers.get("etag"), 'W/"v1"');
      assert.equal(get.headers.get("vary"), "Origin, Accept-Encoding");
      const [star] = await askEncoded(server, "/star", ["gzip"]);
      assert.equal(star.headers.get("vary"), "*");
      const [head] = await askEncoded(server, "/", ["gzip"], "HEAD");
      assert.equal(head.body.length, 0);
      for (const name of ["content-encoding", "vary", "etag", "content-type"]) {
        assert.equal(
          head.headers.get(name),
          get.headers.get(name),
          `HEAD's ${name}`,
        );
      }
      const [plain] = await askEncoded(server, "/", [null]);
      assert.equal(
        plain.headers.get("etag"),
        '"v1"',
        "identity keeps the strong tag",
      );
    },
  );
});

Deno.test("serve() compresses a stream chunk by chunk, each event decodable before the next is made", async () => {
  const steps = Array.from({ length: 3 }, () => Promise.withResolvers<void>());
  await withHandler({}, () => {
    let sent = 0;
    return new Response(
      new ReadableStream<Uint8Array>({
        async pull(controller) {
          if (sent === steps.length) return controller.close();
          if (sent > 0) await steps[sent - 1].promise;
          controller.enqueue(
            encoder.encode(`data: event ${sent++} ${"-".repeat(2000)}\n\n`),
          );
        },
      }),
      { headers: { "content-type": "text/event-stream" } },
    );
  }, async (server) => {
    for (const coding of ["gzip", "br"]) {
      const client = await Client.open(server);
      try {
        await client.send(
          `GET /events HTTP/1.1\r\nHost: x\r\nAccept-Encoding: ${coding}\r\n\r\n`,
        );
        const head = await client.head();
        assert.equal(head?.headers.get("content-encoding"), coding);
        assert.equal(head.headers.get("transfer-encoding"), "chunked");
        const received: Uint8Array[] = [];
        for (let i = 0; i < steps.length; i++) {
          received.push((await client.chunk())!);
          // Everything sent so far decodes, with no more to come yet.
          const partial = concat(received);
          const text = decoder.decode(
            coding === "gzip"
              ? gunzipSync(partial, { finishFlush: zlibConstants.Z_SYNC_FLUSH })
              : brotliDecompressSync(partial, {
                finishFlush: zlibConstants.BROTLI_OPERATION_FLUSH,
              }),
          );
          assert.ok(
            text.endsWith(`event ${i} ${"-".repeat(2000)}\n\n`),
            `${coding}: event ${i} whole`,
          );
          steps[i].resolve();
        }
        let chunk: Uint8Array | null;
        while ((chunk = await client.chunk())) received.push(chunk);
        const whole = coding === "gzip"
          ? gunzipSync(concat(received))
          : brotliDecompressSync(concat(received));
        assert.equal(
          decoder.decode(whole).split("\n\n").length,
          steps.length + 1,
        );
      } finally {
        client.close();
      }
      for (let i = 0; i < steps.length; i++) {
        steps[i] = Promise.withResolvers<void>();
      }
    }
  });
});

Deno.test(
  "serve() compresses the files of a folder, unless a precompressed one or a range is asked for",
  FILES,
  async () => {
    const script = "console.log('compress me');\n".repeat(200);
    await using site = await fixture({
      "site/app.js": script,
      "site/style.css": "body { color: red; }\n".repeat(100),
      "site/style.css.gz": "GZIP",
      "site/photo.png": "x".repeat(5000),
    });
    await withFiles({ root: site.root }, async (server) => {
      const [js, css, png] = [
        ...(await askEncoded(server, "/app.js", ["br, gzip"])),
        ...(await askEncoded(server, "/style.css", ["br, gzip"])),
        ...(await askEncoded(server, "/photo.png", ["br, gzip"])),
      ];
      assert.equal(js.headers.get("content-encoding"), "br");
      assert.equal(decoded(js), script);
      assert.match(js.headers.get("etag") ?? "", /^W\//);
      // Ranges are of the identity bytes: not offered on these.
      assert.equal(js.headers.get("accept-ranges"), undefined);
      // HEAD, whose response has no body to measure: GET's fields the same.
      const [head] = await askEncoded(server, "/app.js", ["br, gzip"], "HEAD");
      for (
        const name of ["content-encoding", "vary", "etag", "accept-ranges"]
      ) {
        assert.equal(head.headers.get(name), js.headers.get(name), name);
      }
      assert.equal(head.headers.get("content-length"), undefined);
      assert.equal(css.headers.get("content-encoding"), "gzip");
      assert.equal(css.text, "GZIP", "the precompressed file wins");
      assert.equal(png.headers.get("content-encoding"), undefined);
      const client = await Client.open(server);
      try {
        await client.send(
          "GET /app.js HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nRange: bytes=0-9\r\n\r\n",
        );
        const range = await client.response();
        assert.equal(range?.status, 206);
        assert.equal(range.headers.get("content-encoding"), undefined);
        assert.equal(range.text, script.slice(0, 10));
      } finally {
        client.close();
      }
    });
  },
);

Deno.test("serve() sends a length for a stream whose bytes are all there, and believes no wrong one", async () => {
  await withHandler({}, () =>
    new Response(
      new ReadableStream({
        start(controller) {
          controller.enqueue(encoder.encode("all "));
          controller.enqueue(encoder.encode("here"));
          controller.close();
        },
      }),
      { headers: { "content-length": "99" } },
    ), async (server) => {
    const reply = await ask(server, GET);
    assert.equal(reply?.headers.get("content-length"), "8");
    assert.equal(reply?.headers.get("transfer-encoding"), undefined);
    assert.equal(reply?.text, "all here");
  });
});

fuzzTest(
  "serve() answers a HEAD request it refuses with no body, whatever the failure",
  async (next) => {
    await withServer(
      { headerTimeout: 0.3, bodyTimeout: 0.3, sleepDelay: 0.01, maxBody: 100 },
      async (server) => {
        let refused = 0;
        for (let i = 0; i < 600; i++) {
          // A HEAD request line, then a mutated rest: its answer, the first,
          // is a HEAD's, body or no body.
          const input = concat([latin1("HEAD "), mutate(next).subarray(4)]);
          const conn = await Deno.connect({ port: server.addr.port });
          try {
            await conn.write(input);
            await conn.closeWrite();
            const { text } = await readUntilClosed(conn, 0);
            const headEnd = text.indexOf("\r\n\r\n");
            if (headEnd < 0) continue; // nothing answered: the input ended early
            const rest = text.slice(headEnd + 4);
            const status = Number(text.slice(9, 12));
            if (status >= 400) refused++;
            assert.ok(
              rest === "" || rest.startsWith("HTTP/1.1 "),
              `input ${JSON.stringify(decoder.decode(input))}: ` +
                `a body after the HEAD's ${status}`,
            );
          } finally {
            conn.close();
          }
        }
        assert.ok(refused > 100, `refusals seen: ${refused}`);
      },
    );
    // One stalled mid-head gets its 408 without a body too.
    await withServer({ headerTimeout: 0.3 }, async (server) => {
      const client = await Client.open(server);
      try {
        await client.send("HEAD / HTTP/1.1\r\nHost: x\r\n");
        const reply = await client.response({ head: true });
        assert.equal(reply?.status, 408);
        assert.ok(await client.closedByServer(), "no body after the 408");
      } finally {
        client.close();
      }
    });
  },
);
