/**
 * An application whose responses main.ts compresses on the way (brotli or
 * gzip, as the request's Accept-Encoding prefers), for the interop checks
 * of compression (.ci/interop.sh, .ci/interop_test.ts); served through
 * main.ts twice, once as it is and once with `--no-compress`:
 *
 *   deno run --allow-net --allow-read main.ts --port 0 \
 *     --app .ci/apps/compress_app.ts [--no-compress]
 *
 * Every body is the same on every request, so that what a client decodes
 * can be compared with what a request without Accept-Encoding gets.
 *
 * - `GET /` is a page for a browser (HTML, over 1 KiB): its script,
 *   `/app.js`, fetches `/books.json` and shows in the DOM what it got, and
 *   whether the browser received each of the three compressed (from the
 *   Resource Timing sizes, encoded against decoded).
 * - `GET /books.json`: JSON, about 20 KiB, with a strong ETag.
 * - `GET /app.js`: JavaScript, over 1 KiB.
 * - `GET /lines.txt`: text streamed in 100 chunks with a timer between
 *   them, so that its length is not known when it is first sent (chunked).
 * - Never compressed: `GET /small.txt` (text under 1 KiB), `GET /logo.png`
 *   (a type not worth it), `GET /no-transform` (text marked
 *   `Cache-Control: no-transform`), `GET /encoded` (text the app gzipped
 *   itself, sent with its `Content-Encoding: gzip`) and `GET /part` (a 206
 *   with a `Content-Range`).
 * @module
 */

/** 200 books, in a JSON of about 20 KiB. */
export const BOOKS = Array.from({ length: 200 }, (_, i) => ({
  id: i + 1,
  title: `Book ${i + 1}: The Rust Programming Language, chapter ${i % 21 + 1}`,
  tags: ["rust", "http", i % 2 ? "odd" : "even"],
}));

const BOOKS_JSON = JSON.stringify(BOOKS);

/** A text of `lines` lines, `line N: ...` each. */
export function textOf(lines: number, from = 1): string {
  let text = "";
  for (let n = from; n < from + lines; n++) {
    text += `line ${n}: the quick brown fox jumps over the lazy dog\n`;
  }
  return text;
}

/**
 * The page's script: what it shows, element by element, is what
 * .ci/interop.sh looks for in Chromium's DOM.
 */
const SCRIPT = `// Made long enough (over 1 KiB) to be compressed on its own.
"use strict";
const show = (id, text) => {
  document.getElementById(id).textContent = text;
};
// Whether the browser received a resource compressed: Resource Timing's
// encodedBodySize is the size on the wire, decodedBodySize after decoding.
const compressed = (path) => {
  const entry = performance.getEntriesByType("resource")
    .concat(performance.getEntriesByType("navigation"))
    .find((entry) => new URL(entry.name).pathname === path);
  if (!entry) return path + ": no timing entry";
  const smaller = entry.encodedBodySize < entry.decodedBodySize;
  return path + ": " + (smaller ? "compressed" : "not compressed") +
    " (" + entry.encodedBodySize + " of " + entry.decodedBodySize + ")";
};
async function main() {
  const response = await fetch("/books.json");
  const books = await response.json();
  const list = document.getElementById("books");
  for (const book of books) {
    const row = document.createElement("li");
    row.textContent = book.id + ". " + book.title;
    list.append(row);
  }
  show("count", books.length + " books, the last: " + books.at(-1).title);
  show("encoding", "books.json Content-Encoding: " +
    response.headers.get("content-encoding"));
  show("page", compressed("/"));
  show("script", compressed("/app.js"));
  show("json", compressed("/books.json"));
}
main().catch((error) => show("count", "error: " + error));
// ${"-".repeat(200)}
// ${"-".repeat(200)}
// ${"-".repeat(200)}
`;

const PAGE = `<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <title>Books</title>
    <script src="/app.js" defer></script>
  </head>
  <body>
    <h1>Books</h1>
    <p id="count">loading</p>
    <p id="encoding"></p>
    <p id="page"></p>
    <p id="script"></p>
    <p id="json"></p>
    <ol id="books"></ol>
    <!--
${textOf(20)}    -->
  </body>
</html>
`;

/** Eight bytes of PNG signature, then bytes that would compress well. */
const PNG = new Uint8Array(4096);
PNG.set([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

const TEXT = "text/plain; charset=utf-8";

async function* lines(): AsyncGenerator<string> {
  for (let chunk = 0; chunk < 100; chunk++) {
    // A timer, not a microtask: the server cannot read the whole stream
    // ahead at once, so it sends it chunked, compressed chunk by chunk.
    await new Promise((resolve) => setTimeout(resolve, 0));
    yield textOf(10, chunk * 10 + 1);
  }
}

async function gzipped(text: string): Promise<Uint8Array<ArrayBuffer>> {
  const stream = new Blob([text]).stream()
    .pipeThrough(new CompressionStream("gzip"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

export default {
  async fetch(request: Request): Promise<Response> {
    const url = new URL(request.url);
    const reading = request.method === "GET" || request.method === "HEAD";
    if (!reading) return new Response("GET only\n", { status: 405 });
    switch (url.pathname) {
      case "/":
        return new Response(PAGE, {
          headers: { "Content-Type": "text/html; charset=utf-8" },
        });
      case "/app.js":
        return new Response(SCRIPT, {
          headers: { "Content-Type": "text/javascript; charset=utf-8" },
        });
      case "/books.json":
        return new Response(BOOKS_JSON, {
          headers: {
            "Content-Type": "application/json",
            "ETag": '"books-1"',
          },
        });
      case "/lines.txt":
        return new Response(
          ReadableStream.from(lines()).pipeThrough(new TextEncoderStream()),
          { headers: { "Content-Type": TEXT } },
        );
      case "/small.txt":
        return new Response(textOf(5), { headers: { "Content-Type": TEXT } });
      case "/logo.png":
        return new Response(PNG, { headers: { "Content-Type": "image/png" } });
      case "/no-transform":
        return new Response(textOf(100), {
          headers: { "Content-Type": TEXT, "Cache-Control": "no-transform" },
        });
      case "/encoded":
        return new Response(await gzipped(textOf(100)), {
          headers: { "Content-Type": TEXT, "Content-Encoding": "gzip" },
        });
      case "/part": {
        const whole = textOf(100);
        return new Response(whole.slice(0, 2000), {
          status: 206,
          headers: {
            "Content-Type": TEXT,
            "Content-Range": `bytes 0-1999/${whole.length}`,
          },
        });
      }
      default:
        return new Response("not found\n", { status: 404 });
    }
  },
} satisfies Deno.ServeDefaultExport;
