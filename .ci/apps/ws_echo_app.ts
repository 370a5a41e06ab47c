/**
 * A WebSocket echo application in the `deno serve` shape, written for
 * `Deno.upgradeWebSocket` as any Deno app is, which .ci/interop.sh and
 * .ci/tls.sh serve through main.ts (`--app`) and .ci/websocket_test.ts
 * checks with real clients. The same module runs unchanged under Deno's own
 * server, the reference:
 *
 *   deno run --allow-net --allow-read main.ts --port 0 \
 *     --app .ci/apps/ws_echo_app.ts
 *   deno serve --allow-net --port 0 .ci/apps/ws_echo_app.ts
 *
 * - `GET /ws?id=ID` upgrades and sends every message back unchanged, text as
 *   text and binary as binary. It accepts the subprotocol `echo` when the
 *   client offers it. `&as=view` sends binary back as a `Uint8Array` view into
 *   a larger buffer, `&as=blob` as a `Blob`: the other shapes `send` takes.
 *   `&close=CODE&reason=TEXT` makes the server close the socket itself, as
 *   soon as it is open.
 * - `GET /report?id=ID`: what the server side of socket ID saw, as JSON
 *   (`binaryType`, `protocol`, `extensions`, `messages`, `bytes`, and `close`
 *   with the close event's `code`, `reason`, `wasClean` once it closed); 404
 *   before the upgrade.
 * - `GET /stats`: `{ upgrades }`, how many upgrades the app answered (the
 *   access log must show as many 101 lines).
 * - `GET /?id=ID&count=N` is the page for a browser: it echoes N messages
 *   (1,000 by default) of mixed kinds and sizes up to 1 MiB through
 *   `/ws?id=ID`, checks each echo byte for byte, and posts its verdict to
 *   `POST /result?id=ID`, which `GET /result?id=ID` then answers (404 until
 *   it came).
 * @module
 */

/** The largest message the checks send: main.ts's default limit. */
const MAX_MESSAGE = 1024 * 1024;

interface Report {
  binaryType: string;
  protocol: string;
  extensions: string;
  messages: number;
  bytes: number;
  close?: { code: number; reason: string; wasClean: boolean };
}

/** By socket id: the tests ask after a socket closed, so they are kept. */
const reports = new Map<string, Report>();
/** The page's verdicts, by id. */
const results = new Map<string, string>();
let upgrades = 0;

function reshape(data: string | ArrayBuffer, as: string | null) {
  if (typeof data === "string") return data;
  if (as === "blob") return new Blob([data]);
  if (as === "view") {
    // A view that neither starts nor ends where its buffer does: a server
    // that sent the whole buffer would send 8 bytes too many.
    const buffer = new Uint8Array(data.byteLength + 8);
    buffer.set(new Uint8Array(data), 3);
    return buffer.subarray(3, 3 + data.byteLength);
  }
  return data;
}

function upgrade(request: Request, url: URL): Response {
  if (request.headers.get("upgrade")?.toLowerCase() !== "websocket") {
    return new Response("a WebSocket endpoint\n", {
      status: 426,
      headers: { Upgrade: "websocket" },
    });
  }
  const id = url.searchParams.get("id") ?? "";
  const as = url.searchParams.get("as");
  const closeCode = url.searchParams.get("close");
  const offered = (request.headers.get("sec-websocket-protocol") ?? "")
    .split(",").map((name) => name.trim());
  const { socket, response } = Deno.upgradeWebSocket(
    request,
    offered.includes("echo") ? { protocol: "echo" } : {},
  );
  upgrades++;
  const report: Report = {
    binaryType: socket.binaryType,
    protocol: "",
    extensions: "",
    messages: 0,
    bytes: 0,
  };
  reports.set(id, report);
  socket.onopen = () => {
    report.protocol = socket.protocol;
    report.extensions = socket.extensions;
    if (closeCode !== null) {
      socket.close(Number(closeCode), url.searchParams.get("reason") ?? "");
    }
  };
  socket.onmessage = (event: MessageEvent<string | ArrayBuffer>) => {
    report.messages++;
    report.bytes += typeof event.data === "string"
      ? new TextEncoder().encode(event.data).length
      : event.data.byteLength;
    socket.send(reshape(event.data, as));
  };
  socket.onclose = (event) => {
    const { code, reason, wasClean } = event;
    report.close = { code, reason, wasClean };
  };
  return response;
}

/**
 * The browser's side. Message i's kind cycles through random binary, random
 * text (code points of 1 to 4 UTF-8 bytes), repetitive binary and
 * repetitive text, so that a deflating client sends both compressed and
 * barely compressible frames. The first messages have the sizes where frame
 * headers change (125/126, 65535/65536) and the limit's edge; the rest are
 * skewed towards the small, up to 1 MiB. A window of messages is in flight
 * at a time, and echoes must come back in order.
 */
const PAGE = `<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <title>WebSocket echo</title>
  </head>
  <body>
    <p id="verdict">running</p>
    <script>
      const params = new URLSearchParams(location.search);
      const id = params.get("id") || "page";
      const count = Number(params.get("count") || 1000);
      const MAX = ${MAX_MESSAGE};
      const EDGES = [0, 1, 125, 126, 127, 65535, 65536, 65537, MAX - 1, MAX];
      const WINDOW = 8;
      const KINDS = ["random binary", "random text", "repetitive binary",
        "repetitive text"];
      const PHRASE = "Grüße, 世界! 🦀 ";
      const PHRASE_BYTES = new TextEncoder().encode(PHRASE).length;

      // xorshift32, seeded: a failure can be replayed message for message.
      let state = 2463534242;
      function random() {
        state ^= state << 13;
        state ^= state >>> 17;
        state ^= state << 5;
        state >>>= 0;
        return state;
      }

      function randomText(size) {
        const points = [];
        let left = size;
        while (left > 0) {
          const width = 1 + (random() % Math.min(4, left));
          const r = random();
          let point;
          if (width === 1) point = 0x20 + (r % 0x5f);
          else if (width === 2) point = 0x80 + (r % 0x780);
          else if (width === 3) {
            point = 0x800 + (r % 0xf000);
            if (point >= 0xd800) point += 0x800; // no surrogates
            // A leading BOM is dropped by UTF-8 decode, rightly.
            if (point === 0xfeff) point = 0xfefe;
          } else point = 0x10000 + (r % 0x100000);
          points.push(point);
          left -= width;
        }
        let text = "";
        for (let i = 0; i < points.length; i += 8192) {
          text += String.fromCodePoint(...points.slice(i, i + 8192));
        }
        return text;
      }

      function message(index) {
        const kind = KINDS[index % 4];
        let size;
        if (index < EDGES.length * 4) size = EDGES[Math.floor(index / 4)];
        else {
          const u = random() / 4294967296;
          size = Math.floor(2 ** (20 * u * u)) - 1;
        }
        let data;
        if (kind === "random binary") {
          const words = new Uint32Array(Math.ceil(size / 4));
          for (let i = 0; i < words.length; i++) words[i] = random();
          data = words.buffer.slice(0, size);
        } else if (kind === "repetitive binary") {
          const bytes = new Uint8Array(size);
          for (let i = 0; i < size; i++) bytes[i] = i % 61;
          data = bytes.buffer;
        } else if (kind === "random text") {
          data = randomText(size);
        } else {
          const times = Math.floor(size / PHRASE_BYTES);
          data = PHRASE.repeat(times) + "x".repeat(size - times * PHRASE_BYTES);
        }
        return { index, kind, size, data };
      }

      function difference(sent, got) {
        if (typeof sent.data === "string") {
          if (typeof got !== "string") return "sent text, got binary";
          if (got === sent.data) return "";
          let at = 0;
          while (got[at] === sent.data[at]) at++;
          return "text differs at UTF-16 index " + at + " (sent " +
            sent.data.length + ", got " + got.length + " code units)";
        }
        if (!(got instanceof ArrayBuffer)) return "sent binary, got text";
        if (got.byteLength !== sent.size) {
          return "sent " + sent.size + " bytes, got " + got.byteLength;
        }
        const a = new Uint8Array(sent.data);
        const b = new Uint8Array(got);
        for (let i = 0; i < a.length; i++) {
          if (a[i] !== b[i]) return "bytes differ at offset " + i;
        }
        return "";
      }

      let done = false;
      let echoed = 0;
      let bytes = 0;
      let extensions = "";
      let protocol = "";
      function finish(verdict) {
        if (done) return;
        done = true;
        Object.assign(verdict, { count, echoed, bytes, extensions, protocol });
        document.getElementById("verdict").textContent =
          JSON.stringify(verdict);
        fetch("/result?id=" + encodeURIComponent(id), {
          method: "POST",
          body: JSON.stringify(verdict),
        });
      }

      const url = new URL("/ws?id=" + encodeURIComponent(id), location.href);
      url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
      const socket = new WebSocket(url, ["echo"]);
      socket.binaryType = "arraybuffer";
      const inFlight = [];
      let next = 0;
      function fill() {
        while (next < count && inFlight.length < WINDOW) {
          const sent = message(next++);
          inFlight.push(sent);
          socket.send(sent.data);
        }
      }
      socket.onopen = () => {
        extensions = socket.extensions;
        protocol = socket.protocol;
        fill();
      };
      socket.onmessage = (event) => {
        const sent = inFlight.shift();
        if (sent === undefined) {
          finish({ ok: false, error: "an echo of nothing sent" });
          socket.close(4000, "unexpected message");
          return;
        }
        const problem = difference(sent, event.data);
        if (problem) {
          finish({
            ok: false,
            error: "message " + sent.index + " (" + sent.kind + ", " +
              sent.size + " bytes): " + problem,
          });
          socket.close(4000, "mismatch");
          return;
        }
        echoed++;
        bytes += sent.size;
        if (echoed === count) socket.close(1000, "done");
        else fill();
      };
      socket.onclose = (event) => {
        const close = {
          code: event.code,
          reason: event.reason,
          wasClean: event.wasClean,
        };
        const ok = echoed === count && event.code === 1000 && event.wasClean;
        finish(ok ? { ok, close } : {
          ok,
          error: "closed after " + echoed + " echoes",
          close,
        });
      };
    </script>
  </body>
</html>
`;

function json(value: unknown): Response {
  return Response.json(value, { headers: { "Cache-Control": "no-store" } });
}

export default {
  async fetch(request: Request): Promise<Response> {
    const url = new URL(request.url);
    const id = url.searchParams.get("id") ?? "";
    switch (`${request.method} ${url.pathname}`) {
      case "GET /ws":
        return upgrade(request, url);
      case "GET /":
        return new Response(PAGE, {
          headers: { "Content-Type": "text/html; charset=utf-8" },
        });
      case "GET /report": {
        const report = reports.get(id);
        return report ? json(report) : new Response(null, { status: 404 });
      }
      case "GET /stats":
        return json({ upgrades });
      case "POST /result":
        results.set(id, await request.text());
        return new Response(null, { status: 204 });
      case "GET /result": {
        const result = results.get(id);
        return result === undefined
          ? new Response(null, { status: 404 })
          : new Response(result, {
            headers: { "Content-Type": "application/json" },
          });
      }
      default:
        return new Response("not found\n", { status: 404 });
    }
  },
} satisfies Deno.ServeDefaultExport;
