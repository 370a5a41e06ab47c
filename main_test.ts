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
  type ServeOptions,
  type Server,
} from "./main.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

function start(options: ServeOptions = {}): Server {
  return serve({ port: 0, accessLog: false, ...options });
}

interface Reply {
  status: number;
  headers: Map<string, string>;
  body: Uint8Array;
  text: string;
}

/** A raw client: writes bytes, reads responses framed by Content-Length. */
class Client {
  #buffer = new Uint8Array(0);
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

  /** Reads more bytes; false at end of stream (a reset counts as the end). */
  async #more(): Promise<boolean> {
    const chunk = new Uint8Array(64 * 1024);
    let count: number | null;
    try {
      count = await this.conn.read(chunk);
    } catch {
      count = null;
    }
    if (count === null) return false;
    const joined = new Uint8Array(this.#buffer.length + count);
    joined.set(this.#buffer);
    joined.set(chunk.subarray(0, count), this.#buffer.length);
    this.#buffer = joined;
    return true;
  }

  /** The next response, or null if the server closed first. */
  async response(options: { head?: boolean } = {}): Promise<Reply | null> {
    let headEnd: number;
    while ((headEnd = indexOf(this.#buffer, "\r\n\r\n")) < 0) {
      if (!await this.#more()) {
        assert.equal(this.#buffer.length, 0, "a truncated response head");
        return null;
      }
    }
    const lines = decoder.decode(this.#buffer.subarray(0, headEnd)).split(
      "\r\n",
    );
    const match = /^HTTP\/1\.1 (\d{3}) [^\r\n]*$/.exec(lines[0]);
    assert.ok(match, `a well-formed status line: ${JSON.stringify(lines[0])}`);
    const headers = new Map<string, string>();
    for (const line of lines.slice(1)) {
      const colon = line.indexOf(":");
      assert.ok(colon > 0, `a well-formed field line: ${line}`);
      const name = line.slice(0, colon).toLowerCase();
      assert.ok(!headers.has(name), `no duplicate ${name}`);
      headers.set(name, line.slice(colon + 1).trim());
    }
    const status = Number(match[1]);
    const length = status === 100 || options.head
      ? 0
      : Number(headers.get("content-length"));
    assert.ok(Number.isInteger(length), "Content-Length on every response");
    while (this.#buffer.length < headEnd + 4 + length) {
      assert.ok(await this.#more(), "a truncated response body");
    }
    const body = this.#buffer.slice(headEnd + 4, headEnd + 4 + length);
    this.#buffer = this.#buffer.slice(headEnd + 4 + length);
    return { status, headers, body, text: decoder.decode(body) };
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

Deno.test("serve() answers unknown paths with the 404 page", async () => {
  await withServer({}, async (server) => {
    const reply = await ask(server, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
    assert.equal(reply?.status, 404);
    assert.equal(reply.text, NOT_FOUND_PAGE);
    assert.match(reply.text, /<h1>Oops!<\/h1>/);
    assert.equal(reply.headers.get("connection"), "close");
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

Deno.test("serve() answers 405 with Allow for a known path", async () => {
  await withServer({}, async (server) => {
    const reply = await ask(server, post("/", "x"));
    assert.equal(reply?.status, 405);
    assert.equal(reply.headers.get("allow"), "GET, HEAD");
    const echo = await ask(server, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n");
    assert.equal(echo?.status, 405);
    assert.equal(echo.headers.get("allow"), "POST");
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
      ["Transfer-Encoding: gzip", 501],
      ["Transfer-Encoding: gzip, chunked", 501],
      ["Transfer-Encoding: chunked, gzip", 400],
      ["Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip", 400],
      ["Transfer-Encoding: chunked, chunked", 400],
      ["Transfer-Encoding: chunked;q=1", 501],
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
