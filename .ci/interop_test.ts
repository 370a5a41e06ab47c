/**
 * Deno's `fetch` as a client of running servers, which .ci/interop.sh starts
 * and names in the environment:
 *
 * - `INTEROP_URL`: main.ts with the book's routes (and `--sleep-delay 0.2`);
 * - `INTEROP_STREAM_URL`: main.ts with `--app .ci/apps/stream_app.ts`;
 * - `INTEROP_HONO_APP_URL`: main.ts with `--app .ci/apps/hono_app.ts`;
 * - `INTEROP_HONO_SERVE_URL`: .ci/apps/hono_serve.ts, the same Hono app
 *   through `serve(app.fetch)`;
 * - `INTEROP_COMPRESS_URL`: main.ts with `--app .ci/apps/compress_app.ts`;
 * - `INTEROP_NO_COMPRESS_URL`: the same with `--no-compress`.
 *
 *   INTEROP_URL=http://127.0.0.1:PORT/ deno test --allow-net=127.0.0.1 \
 *     --allow-env=INTEROP_URL,INTEROP_SS --allow-run=ss .ci/interop_test.ts
 *
 * Black-box on purpose: nothing here imports main.ts, so what is tested is
 * what a real HTTP client sees over a real socket. A test whose server is not
 * named in the environment is ignored, so a plain `deno test` of this file,
 * with no server at all, ignores every test.
 * @module
 */

import assert from "node:assert/strict";

/** An environment variable, if this run may read it (asking never prompts). */
function env(name: string): string | undefined {
  const { state } = Deno.permissions.querySync({ name: "env", variable: name });
  return state === "granted" ? Deno.env.get(name) : undefined;
}

const url = env("INTEROP_URL");
const base = new URL(url ?? "http://127.0.0.1/");

/** The URL in the environment variable `name`; unset or empty: none. */
function serverUrl(name: string): URL | undefined {
  const value = env(name);
  return value ? new URL(value) : undefined;
}

/** `INTEROP_SS=0` when `ss` (iproute2) is missing and that is allowed. */
const haveSs = env("INTEROP_SS") !== "0";

/** `Deno.test`, ignored when there is no server to test. */
function interop(name: string, fn: () => Promise<void>, ignore = false) {
  Deno.test({ name, ignore: ignore || url === undefined, fn });
}

/** `Deno.test` of the server at `server`, ignored when there is none. */
function interopWith(
  server: URL | undefined,
  name: string,
  fn: (server: URL) => Promise<void>,
) {
  Deno.test({ name, ignore: server === undefined, fn: () => fn(server!) });
}

const HELLO = "<h1>Hello!</h1>";

/** A fresh connection pool, so that earlier tests leave nothing in it. */
function freshClient(): Deno.HttpClient {
  return Deno.createHttpClient({});
}

/** Random bytes; `crypto.getRandomValues` fills at most 64 KiB per call. */
function randomBytes(size: number): Uint8Array<ArrayBuffer> {
  const bytes = new Uint8Array(size);
  for (let i = 0; i < size; i += 65536) {
    crypto.getRandomValues(bytes.subarray(i, Math.min(size, i + 65536)));
  }
  return bytes;
}

/**
 * The local ports of this machine's established TCP connections to the
 * server, as `ss` sees them. The client's side of a connection is the one
 * whose peer is the server's port.
 */
async function clientPorts(): Promise<string[]> {
  const { success, stdout } = await new Deno.Command("ss", {
    args: ["-Htn", "state", "established", "dst", base.host],
  }).output();
  assert.ok(success, "ss failed");
  return new TextDecoder().decode(stdout).trim().split("\n")
    .filter((line) => line.length > 0)
    .map((line) => line.trim().split(/\s+/).at(-2)!);
}

interop("deno fetch: GET / is the hello page", async () => {
  const response = await fetch(base);
  const body = await response.text();
  assert.equal(response.status, 200);
  assert.match(response.headers.get("content-type") ?? "", /^text\/html/);
  assert.ok(body.includes(HELLO), body);
  assert.ok(body.includes("Hi from Deno"), body);
});

interop("deno fetch: HEAD / has GET's headers and no body", async () => {
  const client = freshClient();
  try {
    const get = await fetch(base, { client });
    const length = (await get.bytes()).length;
    const head = await fetch(base, { method: "HEAD", client });
    assert.equal(head.status, 200);
    assert.equal(head.headers.get("content-length"), String(length));
    assert.equal((await head.bytes()).length, 0);
    // Had the server sent a body after the HEAD response, this request on
    // the same connection would read it as its status line and fail.
    const after = await fetch(base, { client });
    assert.equal(after.status, 200);
    assert.ok((await after.text()).includes(HELLO));
  } finally {
    client.close();
  }
});

interop("deno fetch: POST /echo returns 300 KiB byte for byte", async () => {
  const sent = randomBytes(300 * 1024);
  const response = await fetch(new URL("/echo", base), {
    method: "POST",
    body: sent,
  });
  assert.equal(response.status, 200);
  assert.deepEqual(await response.bytes(), sent);
});

interop(
  "deno fetch: a streamed (chunked) body echoes byte for byte",
  async () => {
    // A ReadableStream body has no length, so fetch sends it chunked.
    const sent = randomBytes(200 * 1024);
    const body = ReadableStream.from(
      (function* () {
        for (let i = 0; i < sent.length; i += 7000) {
          yield sent.subarray(i, i + 7000);
        }
      })(),
    );
    const response = await fetch(new URL("/echo", base), {
      method: "POST",
      body,
    });
    assert.equal(response.status, 200);
    assert.deepEqual(await response.bytes(), sent);
  },
);

interop("deno fetch: /nope is 404, DELETE / is 405", async () => {
  const missing = await fetch(new URL("/nope", base));
  assert.equal(missing.status, 404);
  assert.ok((await missing.text()).includes("<h1>Oops!</h1>"));
  const wrong = await fetch(base, { method: "DELETE" });
  assert.equal(wrong.status, 405);
  assert.ok(wrong.headers.get("allow")?.includes("GET"));
  await wrong.body?.cancel();
});

interop("deno fetch: /sleep answers after the 0.2 s delay", async () => {
  const started = performance.now();
  const response = await fetch(new URL("/sleep", base));
  const body = await response.text();
  const elapsed = performance.now() - started;
  assert.equal(response.status, 200);
  assert.ok(body.includes(HELLO));
  assert.ok(elapsed >= 180, `answered after ${elapsed} ms`);
  assert.ok(elapsed < 3000, `answered after ${elapsed} ms`);
});

interop("deno fetch: sequential requests reuse one connection", async () => {
  // Two ways this fails: a new connection per request (the local port
  // changes) or connections piling up (more than one at a time).
  const client = freshClient();
  try {
    const seen = new Set<string>();
    // Only successful exchanges: the server ends the connection after
    // any error response (4xx, 5xx) by design.
    const requests: [string, string, string?][] = [
      ["GET", "/"],
      ["POST", "/echo", "ping"],
      ["HEAD", "/"],
      ["GET", "/sleep"],
      ["GET", "/"],
    ];
    for (const [method, path, body] of requests) {
      const target = new URL(path, base);
      const response = await fetch(target, { method, body, client });
      await response.bytes();
      const ports = await clientPorts();
      const what = `${method} ${path}`;
      assert.equal(ports.length, 1, `connections after ${what}: ${ports}`);
      seen.add(ports[0]);
    }
    assert.equal(seen.size, 1, `local ports used: ${[...seen]}`);
  } finally {
    client.close();
  }
}, !haveSs);

// ---------------------------------------------------------------------------
// Streaming both ways, against .ci/apps/stream_app.ts behind main.ts. Each
// test proves that a first part travelled before the rest was sent by
// saying so with a second request; see the app's module doc.
// ---------------------------------------------------------------------------

const stream = serverUrl("INTEROP_STREAM_URL");

function sha256(bytes: Uint8Array<ArrayBuffer>): Promise<string> {
  return crypto.subtle.digest("SHA-256", bytes).then((digest) =>
    Array.from(new Uint8Array(digest), (byte) => byte.toString(16))
      .map((hex) => hex.padStart(2, "0")).join("")
  );
}

interopWith(
  stream,
  "deno fetch: a streamed upload reaches the handler as it is sent",
  async (stream) => {
    const id = `deno-${crypto.randomUUID()}`;
    const chunks = Array.from({ length: 8 }, () => randomBytes(16 * 1024));
    let sent = 0;
    let seen = "";
    // Pulled only when fetch wants the next chunk (highWaterMark 0): the
    // second is not made until the handler has said it has the first.
    const body = new ReadableStream<Uint8Array>({
      async pull(controller) {
        if (sent === 1) {
          const answer = await fetch(new URL(`/seen?id=${id}`, stream));
          seen = `${answer.status} ${await answer.text()}`;
        } else if (sent > 1) {
          await new Promise((resolve) => setTimeout(resolve, 20));
        }
        if (sent === chunks.length) controller.close();
        else controller.enqueue(chunks[sent++]);
      },
    }, { highWaterMark: 0 });
    // The Fetch standard requires `duplex: "half"` with a stream body
    // (Node's fetch throws without it); Deno's RequestInit type lacks it.
    const init: RequestInit & { duplex: "half" } = {
      method: "POST",
      body,
      duplex: "half",
    };
    const response = await fetch(new URL(`/upload?id=${id}`, stream), init);
    const report = await response.json();
    assert.equal(response.status, 200);
    assert.equal(seen, "200 the handler has the first chunk\n");
    const all = new Uint8Array(await new Blob(chunks).arrayBuffer());
    assert.equal(report.bytes, all.length);
    assert.equal(report.sha256, await sha256(all));
    assert.ok(report.chunks >= 2, `the handler saw ${report.chunks} chunk(s)`);
  },
);

/** What a reader yields until `marker` has come (null: until its end). */
async function readUntil(
  reader: ReadableStreamDefaultReader<string>,
  marker: string | null,
): Promise<string> {
  let text = "";
  while (marker === null || !text.includes(marker)) {
    const { done, value } = await reader.read();
    if (done) break;
    text += value;
  }
  return text;
}

interopWith(
  stream,
  "deno fetch: a streamed response arrives chunk by chunk",
  async (stream) => {
    const id = `deno-${crypto.randomUUID()}`;
    const response = await fetch(new URL(`/ticks?id=${id}`, stream));
    assert.equal(response.status, 200);
    const reader = response.body!.pipeThrough(new TextDecoderStream())
      .getReader();
    // The first line must come while the stream waits for our ack; a
    // server that held it back sends it only after the wait, with the rest.
    const first = await readUntil(reader, "\n");
    assert.equal(first, "tick 1\n", "what came before the ack");
    const ack = await fetch(new URL(`/ack?id=${id}`, stream));
    assert.equal(await ack.text(), "acknowledged\n");
    const text = first + await readUntil(reader, null);
    assert.equal(text, "tick 1\ntick 2 after the ack\n");
  },
);

// ---------------------------------------------------------------------------
// A real framework: the Hono app of .ci/apps/hono_app.ts, the same
// assertions through main.ts's `--app` and through `serve(app.fetch)`.
// ---------------------------------------------------------------------------

const BOOKS = [
  { id: 1, title: "The Rust Programming Language", chapter: 21 },
  { id: 2, title: "Building a Multithreaded Web Server", chapter: 21 },
];

for (
  const [how, hono] of [
    ["--app", serverUrl("INTEROP_HONO_APP_URL")],
    ["serve(app.fetch)", serverUrl("INTEROP_HONO_SERVE_URL")],
  ] as const
) {
  interopWith(hono, `hono via ${how}: routes and the middleware`, async () => {
    const home = await fetch(hono!);
    assert.equal(home.status, 200);
    assert.equal(await home.text(), "Hello from Hono!");
    assert.equal(home.headers.get("x-served-by"), "hono");
    const list = await fetch(new URL("/api/books", hono));
    const bytes = await list.bytes();
    assert.equal(list.status, 200);
    assert.match(list.headers.get("content-type") ?? "", /^application\/json/);
    // Known at once, so it has a length (it is not sent chunked).
    assert.equal(list.headers.get("content-length"), String(bytes.length));
    assert.deepEqual(JSON.parse(new TextDecoder().decode(bytes)), BOOKS);
    assert.equal(list.headers.get("x-served-by"), "hono");
  });

  interopWith(hono, `hono via ${how}: a path parameter`, async () => {
    const found = await fetch(new URL("/api/books/2", hono));
    assert.equal(found.status, 200);
    assert.deepEqual(await found.json(), BOOKS[1]);
    const missing = await fetch(new URL("/api/books/9", hono));
    assert.equal(missing.status, 404);
    assert.deepEqual(await missing.json(), { error: "no such book" });
  });

  interopWith(hono, `hono via ${how}: a JSON request body`, async () => {
    const book = { id: 3, title: "Ferris's notes", tags: ["é", "🦀"] };
    const created = await fetch(new URL("/api/books", hono), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(book),
    });
    assert.equal(created.status, 201);
    assert.deepEqual(await created.json(), { created: book });
  });

  interopWith(
    hono,
    `hono via ${how}: a long JSON comes compressed`,
    async () => {
      const catalog = Array.from({ length: 100 }, (_, i) => ({
        id: i + 1,
        title: `Chapter ${i % 21 + 1}, part ${i + 1}`,
      }));
      const url = new URL("/api/catalog", hono);
      const plain = await fetch(url, {
        headers: { "Accept-Encoding": "identity" },
      });
      const bytes = await plain.bytes();
      assert.equal(plain.headers.get("content-encoding"), null);
      assert.equal(plain.headers.get("content-length"), String(bytes.length));
      for (const coding of ["br", "gzip"]) {
        const response = await fetch(url, {
          headers: { "Accept-Encoding": coding },
        });
        assert.equal(response.headers.get("content-encoding"), coding);
        assert.match(response.headers.get("vary") ?? "", /accept-encoding/i);
        assert.ok(
          Number(response.headers.get("content-length")) < bytes.length,
        );
        assert.equal(response.headers.get("x-served-by"), "hono");
        assert.deepEqual(await response.bytes(), bytes);
      }
      assert.deepEqual(JSON.parse(new TextDecoder().decode(bytes)), catalog);
    },
  );

  // Hono answers HEAD with GET's response without its body (no length):
  // the fields must still be GET's (RFC 9110 §9.3.2), coding included.
  interopWith(
    hono,
    `hono via ${how}: HEAD has GET's Content-Encoding and Vary`,
    async () => {
      const url = new URL("/api/catalog", hono);
      for (const coding of ["br", "gzip"]) {
        const headers = { "Accept-Encoding": coding };
        const get = await fetch(url, { headers });
        await get.bytes();
        const head = await fetch(url, { method: "HEAD", headers });
        assert.equal((await head.bytes()).length, 0);
        const fields = (response: Response) => ({
          encoding: response.headers.get("content-encoding"),
          vary: response.headers.get("vary"),
        });
        assert.deepEqual(fields(head), fields(get), `HEAD, ${coding}`);
      }
    },
  );

  interopWith(hono, `hono via ${how}: an unknown path is 404`, async () => {
    const missing = await fetch(new URL("/nope", hono));
    assert.equal(missing.status, 404);
    assert.equal(await missing.text(), "404 Not Found");
    assert.equal(missing.headers.get("x-served-by"), "hono");
  });
}

// ---------------------------------------------------------------------------
// Compression: .ci/apps/compress_app.ts behind main.ts, which compresses its
// responses on the way, and the same app with --no-compress. Deno's fetch
// offers "gzip, br" and decodes either itself, also when the request names
// its own Accept-Encoding; Content-Encoding stays in the headers.
// ---------------------------------------------------------------------------

const compress = serverUrl("INTEROP_COMPRESS_URL");
const noCompress = serverUrl("INTEROP_NO_COMPRESS_URL");

/** What main.ts compresses: three bodies of known length, and a stream. */
const ZIPPED = ["/", "/app.js", "/books.json", "/lines.txt"];

/**
 * What it sends as the app made it: too short, not a compressible type,
 * `Cache-Control: no-transform`, a 206, and a body the app gzipped itself.
 */
const UNZIPPED = ["/small.txt", "/logo.png", "/no-transform", "/part"];

/**
 * `path` fetched with `acceptEncoding` as the request's Accept-Encoding
 * (fetch's own, "gzip, br", when not given), and its decoded bytes.
 */
async function fetchWith(
  server: URL,
  path: string,
  acceptEncoding?: string,
  method = "GET",
): Promise<{ response: Response; bytes: Uint8Array<ArrayBuffer> }> {
  const headers = acceptEncoding === undefined
    ? undefined
    : { "Accept-Encoding": acceptEncoding };
  const response = await fetch(new URL(path, server), { method, headers });
  return { response, bytes: await response.bytes() };
}

/** `path` as a client that accepts no coding gets it: the reference. */
async function identity(
  server: URL,
  path: string,
): Promise<Uint8Array<ArrayBuffer>> {
  const { response, bytes } = await fetchWith(server, path, "identity");
  assert.equal(response.headers.get("content-encoding"), null, path);
  return bytes;
}

function assertVaries(response: Response, what: string) {
  assert.match(
    response.headers.get("vary") ?? "",
    /(^|,)\s*accept-encoding\s*(,|$)/i,
    `${what}: Vary`,
  );
}

interopWith(
  compress,
  "deno fetch: compressed HTML, JS, JSON and a stream decode to the same bytes",
  async (compress) => {
    for (const path of ZIPPED) {
      const plain = await identity(compress, path);
      for (
        const [accept, coding] of [
          [undefined, "br"],
          ["br", "br"],
          ["gzip", "gzip"],
        ] as const
      ) {
        const what = `${path}, Accept-Encoding: ${accept ?? "(fetch's)"}`;
        const { response, bytes } = await fetchWith(compress, path, accept);
        assert.equal(response.status, 200, what);
        assert.equal(response.headers.get("content-encoding"), coding, what);
        assertVaries(response, what);
        const length = response.headers.get("content-length");
        if (path === "/lines.txt") {
          assert.equal(length, null, `${what}: a stream has no length`);
        } else {
          assert.ok(Number(length) < plain.length, `${what}: ${length} bytes`);
        }
        assert.deepEqual(bytes, plain, what);
      }
    }
  },
);

interopWith(
  compress,
  "deno fetch: Accept-Encoding's q-values, * and identity choose the coding",
  async (compress) => {
    const plain = await identity(compress, "/books.json");
    const cases: [string, string | null][] = [
      ["gzip, br", "br"],
      ["br, gzip", "br"],
      ["gzip;q=0.8, br;q=0.8", "br"], // equal weights: br, the smaller
      ["br;q=0.5, gzip", "gzip"],
      ["gzip; q=1.0, br; q=0.999", "gzip"],
      ["*", "br"],
      ["*;q=0.5, gzip", "gzip"],
      ["br;q=0, *", "gzip"],
      ["gzip;q=0, br;q=0", null],
      ["*;q=0", null],
      ["identity", null],
      ["deflate, zstd", null],
      ["identity;q=0, gzip", "gzip"],
      ["GZIP", "gzip"],
      ["x-gzip", "gzip"], // RFC 9110 §8.4.1.3
      ["", null],
    ];
    const wrong: string[] = [];
    for (const [accept, coding] of cases) {
      const { response, bytes } = await fetchWith(
        compress,
        "/books.json",
        accept,
      );
      const got = response.headers.get("content-encoding");
      if (got !== coding) wrong.push(`"${accept}": ${got}, wanted ${coding}`);
      assert.deepEqual(bytes, plain, accept);
    }
    assert.deepEqual(wrong, []);
  },
);

interopWith(
  compress,
  "deno fetch: short, binary, no-transform, 206 and encoded bodies go as made",
  async (compress) => {
    for (const path of UNZIPPED) {
      const plain = await identity(compress, path);
      const { response, bytes } = await fetchWith(compress, path, "br, gzip");
      assert.equal(response.headers.get("content-encoding"), null, path);
      assert.equal(
        response.headers.get("content-length"),
        String(bytes.length),
      );
      assert.deepEqual(bytes, plain, path);
    }
    // The app's own gzip, compressed once: fetch decodes it to the text.
    const { response, bytes } = await fetchWith(compress, "/encoded", "br");
    assert.equal(response.headers.get("content-encoding"), "gzip");
    assert.deepEqual(bytes, await identity(compress, "/no-transform"));
  },
);

interopWith(
  compress,
  "deno fetch: a strong ETag turns weak when the body is compressed",
  async (compress) => {
    const plain = await fetchWith(compress, "/books.json", "identity");
    assert.equal(plain.response.headers.get("etag"), '"books-1"');
    for (const coding of ["br", "gzip"]) {
      const { response } = await fetchWith(compress, "/books.json", coding);
      assert.equal(response.headers.get("etag"), 'W/"books-1"', coding);
    }
  },
);

interopWith(
  compress,
  "deno fetch: HEAD has GET's fields, Content-Encoding and Vary, no length",
  async (compress) => {
    const fields = (response: Response) =>
      [...response.headers].filter(([name]) =>
        !["date", "content-length", "transfer-encoding"].includes(name)
      );
    for (const path of ["/books.json", "/lines.txt"]) {
      for (const coding of ["br", "gzip"]) {
        const what = `HEAD ${path}, Accept-Encoding: ${coding}`;
        const get = await fetchWith(compress, path, coding);
        const head = await fetchWith(compress, path, coding, "HEAD");
        assert.equal(head.response.status, 200, what);
        assert.equal(head.response.headers.get("content-encoding"), coding);
        assert.deepEqual(fields(head.response), fields(get.response), what);
        assert.equal(head.response.headers.get("content-length"), null, what);
        assert.equal(head.bytes.length, 0, what);
      }
    }
    const plain = await identity(compress, "/books.json");
    const head = await fetchWith(compress, "/books.json", "identity", "HEAD");
    assert.equal(head.response.headers.get("content-encoding"), null);
    assert.equal(
      head.response.headers.get("content-length"),
      String(plain.length),
    );
  },
);

interopWith(
  noCompress,
  "deno fetch: --no-compress sends every body as the app made it",
  async (noCompress) => {
    for (const path of ZIPPED) {
      const plain = await identity(noCompress, path);
      const { response, bytes } = await fetchWith(noCompress, path);
      assert.equal(response.headers.get("content-encoding"), null, path);
      assert.deepEqual(bytes, plain, path);
      if (compress) assert.deepEqual(bytes, await identity(compress, path));
    }
  },
);

interopWith(
  stream,
  "deno fetch: compressed Server-Sent Events arrive as they are sent",
  async (stream) => {
    for (const coding of ["gzip", "br"]) {
      const id = `deno-${coding}-${crypto.randomUUID()}`;
      const response = await fetch(new URL(`/events?id=${id}`, stream), {
        headers: { "Accept-Encoding": coding },
      });
      assert.equal(response.status, 200);
      assert.equal(response.headers.get("content-encoding"), coding);
      const reader = response.body!.pipeThrough(new TextDecoderStream())
        .getReader();
      // Event 1 must decode while the stream waits for our ack: a
      // compressor that held it back sends it only after the wait.
      const first = await readUntil(reader, "data: one\n\n");
      assert.equal(
        first,
        ": a comment, which clients ignore\n\nid: 1\ndata: one\n\n",
        `${coding}: what came before the ack`,
      );
      const ack = await fetch(new URL(`/ack?id=${id}`, stream));
      assert.equal(await ack.text(), "acknowledged\n");
      const text = first + await readUntil(reader, null);
      assert.match(text, /data: two, after the ack\n\n/, coding);
      assert.ok(text.endsWith("event: done\ndata: bye\n\n"), coding);
    }
  },
);
