/**
 * Tests for main.ts: a server on port 0 in this process, spoken to in raw
 * bytes over `Deno.connect`. Run with `deno test --allow-net`.
 */
import assert from "node:assert/strict";
import {
  HELLO_PAGE,
  INCOMPLETE,
  NOT_FOUND_PAGE,
  parseRequest,
  RequestHead,
  serve,
  type ServeHandler,
  type ServeOptions,
  type Server,
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
  constructor(readonly conn: Deno.TcpConn) {}

  static async open(server: Server): Promise<Client> {
    return new Client(
      await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port }),
    );
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

Deno.test("serve() rejects ambiguous or unsupported Transfer-Encoding", async () => {
  await withServer({}, async (server) => {
    const chunked = "5\r\nhello\r\n0\r\n\r\n";
    const cases: [string, number][] = [
      ["Transfer-Encoding: chunked\r\nContent-Length: 5", 400],
      ["Content-Length: 5\r\nTransfer-Encoding: chunked", 400],
      ["Transfer-Encoding: chunked, gzip", 400],
      ["Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip", 400],
      ["Transfer-Encoding: chunked, chunked", 400],
      ["Transfer-Encoding:", 400],
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

Deno.test("serve() answers 400 unless the final coding is chunked, 501 for an unknown one before it", async () => {
  await withServer({}, async (server) => {
    const chunked = "5\r\nhello\r\n0\r\n\r\n";
    // RFC 9112 §6.3 item 4: a final coding other than chunked leaves the
    // body's end unknown, so the server MUST answer 400 and close. Only a
    // coding it does not know, before a final chunked, is 501 (§6.1).
    const cases: [string, number][] = [
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

/** Reads until the server closes; returns what arrived and when, in ms. */
async function readUntilClosed(
  conn: Deno.Conn,
  since: number,
): Promise<{ text: string; after: number }> {
  const chunks: string[] = [];
  const buffer = new Uint8Array(4096);
  try {
    let count: number | null;
    while ((count = await conn.read(buffer)) !== null) {
      chunks.push(decoder.decode(buffer.subarray(0, count)));
    }
  } catch { /* a reset ends it too */ }
  return { text: chunks.join(""), after: performance.now() - since };
}

Deno.test("serve() cuts slowloris clients at the header timeout and keeps serving", async () => {
  await withServer({ headerTimeout: 1 }, async (server) => {
    const began = performance.now();
    const attackers = await Promise.all(
      Array.from(
        { length: 200 },
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

/** Parses one access log line, failing unless it is Common Log Format. */
function parseLogLine(line: string): { time: number; request: string } {
  for (const char of line) {
    assert.ok(char >= " " && char !== "\x7f", `a control byte in ${line}`);
  }
  const match = LOG_LINE.exec(line);
  assert.ok(match, `a Common Log Format line: ${JSON.stringify(line)}`);
  const [, , day, month, year, hours, minutes, seconds, request] = match;
  assert.ok(MONTHS.includes(month), month);
  const time = Date.UTC(
    Number(year),
    MONTHS.indexOf(month),
    Number(day),
    Number(hours),
    Number(minutes),
    Number(seconds),
  );
  return { time, request };
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

// ---------------------------------------------------------------------------
// Handlers: serve(handler), shaped like Deno.serve
// ---------------------------------------------------------------------------

const hello: ServeHandler = (request) =>
  new Response(`hello ${pathOf(request)}`);

Deno.test("serve() takes a handler in each of Deno.serve's three call forms", async () => {
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
      const reply = await ask(server, "GET /two HTTP/1.1\r\nHost: x\r\n\r\n");
      assert.equal(reply?.text, expected, form);
    } finally {
      await server.shutdown();
    }
  }
});

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

Deno.test("serve() errors a streamed body that grows past maxBody, and answers 413", async () => {
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
});

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

Deno.test("serve() sends Content-Length, in bytes, for a body of known length", async () => {
  const bodies: Record<string, () => BodyInit | null> = {
    "/string": () => "héllo wörld ☃",
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
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(encoder.encode("one, "));
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

Deno.test("serve() sends no body and no chunked framing for HEAD, 204 and 304", async () => {
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
        return new Response(null, { status: 304, headers: { etag: '"v1"' } });
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
});

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

Deno.test("serve() sends no byte past a length it announced for a stream", async () => {
  // A stream's length is only known at its end. The server may frame it
  // its own way (chunked), or trust the handler's Content-Length; then a
  // stream that breaks it must end the connection, never spill bytes that
  // the client would read as the next response.
  await withHandler({ idleTimeout: 0.5 }, (request) => {
    if (pathOf(request) === "/end") return new Response("end");
    const body = new ReadableStream({
      start(controller) {
        controller.enqueue(encoder.encode("hello"));
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
});

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

Deno.test("serve() answers a failing handler with a plain 500, without the error", async () => {
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
      const fields = reply.fields.map(([name, value]) => `${name}: ${value}`);
      assert.ok(!fields.some((field) => field.includes(SECRET)), path);
      assert.notEqual(reply.headers.get("connection"), "close", path);
    });
  });
});

Deno.test("serve() answers a failing handler with onError's response", async () => {
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
    assert.ok(error instanceof Error && error.message === SECRET, `${error}`);
  }
});

Deno.test("serve() answers a plain 500 when onError fails too", async () => {
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
});

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

Deno.test("serve() answers thousands of mutated requests with valid responses", async () => {
  const granted =
    Deno.permissions.querySync({ name: "env", variable: "FUZZ_SEED" })
      .state === "granted";
  const seed = Number(
    (granted && Deno.env.get("FUZZ_SEED")) || Date.now() % 2 ** 31,
  );
  console.log(
    `fuzz seed ${seed} (replay: FUZZ_SEED=${seed} deno test --allow-net --allow-env)`,
  );
  const next = random(seed);
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
});
