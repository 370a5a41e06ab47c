/**
 * Deno's `fetch` as a client of a running server: .ci/interop.sh starts the
 * server (with `--sleep-delay 0.2`) and passes its URL in `INTEROP_URL`.
 *
 *   INTEROP_URL=http://127.0.0.1:PORT/ deno test --allow-net=127.0.0.1 \
 *     --allow-env=INTEROP_URL,INTEROP_SS --allow-run=ss .ci/interop_test.ts
 *
 * Black-box on purpose: nothing here imports main.ts, so what is tested is
 * what a real HTTP client sees over a real socket. A plain `deno test` (as in
 * .ci/run) finds this file too, with no server and no `INTEROP_URL`: then
 * every test here is ignored.
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
/** `INTEROP_SS=0` when `ss` (iproute2) is missing and that is allowed. */
const haveSs = env("INTEROP_SS") !== "0";

/** `Deno.test`, ignored when there is no server to test. */
function interop(name: string, fn: () => Promise<void>, ignore = false) {
  Deno.test({ name, ignore: ignore || url === undefined, fn });
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
