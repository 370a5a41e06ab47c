/**
 * An application for the interop checks of streaming, in the shape that
 * `deno serve` runs (a default export with `fetch`), which .ci/interop.sh
 * serves through main.ts:
 *
 *   deno run --allow-net --allow-read main.ts --port 0 \
 *     --app .ci/apps/stream_app.ts
 *
 * Each stream proves itself without a timed assertion: the other side says,
 * with a second request, that it has the first part, and only then does the
 * rest follow. A server or a client that held the first part back until the
 * end makes that wait run out (after 5 s), and the reply says so.
 *
 * - `POST /upload?id=ID` reads the body as it arrives and answers JSON
 *   `{ chunks, bytes, sha256 }`.
 * - `GET /seen?id=ID` is 200 once the handler of upload ID has its first
 *   chunk, 504 if it has none within the wait.
 * - `GET /ticks?id=ID` streams `tick 1`, then, once `/ack?id=ID` came,
 *   `tick 2 after the ack` (`tick 2 without an ack` when the wait ran out).
 * - `GET /events?id=ID`: Server-Sent Events in the same pattern.
 * - `GET /ack?id=ID` acknowledges.
 * - `GET /sse.html` is a page whose script lists the events of `/events`.
 * @module
 */

/** How long a stream waits for the other side's word. */
const WAIT_MS = 5000;

/** Words not yet waited for, and waits not yet answered, by name. */
const words = new Map<string, PromiseWithResolvers<void>>();

function word(name: string): PromiseWithResolvers<void> {
  let entry = words.get(name);
  if (!entry) {
    entry = Promise.withResolvers<void>();
    words.set(name, entry);
  }
  return entry;
}

/** Says `name`, whether its waiter came already or comes later. */
function say(name: string): void {
  word(name).resolve();
}

/** Waits up to {@linkcode WAIT_MS} for `name`: whether it was said. */
async function waitFor(name: string): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeUp = new Promise<boolean>((resolve) => {
    timer = setTimeout(() => resolve(false), WAIT_MS);
  });
  try {
    return await Promise.race([word(name).promise.then(() => true), timeUp]);
  } finally {
    clearTimeout(timer);
    words.delete(name);
  }
}

/** A response body that sends each string as one chunk, when it is made. */
function streamOf(parts: AsyncIterable<string>): ReadableStream<Uint8Array> {
  return ReadableStream.from(parts).pipeThrough(new TextEncoderStream());
}

async function upload(request: Request, id: string): Promise<Response> {
  if (request.body === null) return new Response("no body\n", { status: 400 });
  const chunks: Uint8Array[] = [];
  let bytes = 0;
  for await (const chunk of request.body) {
    if (chunks.length === 0) say(`first chunk of ${id}`);
    chunks.push(chunk);
    bytes += chunk.length;
  }
  const body = new Uint8Array(bytes);
  let offset = 0;
  for (const chunk of chunks) {
    body.set(chunk, offset);
    offset += chunk.length;
  }
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", body));
  return Response.json({
    chunks: chunks.length,
    bytes,
    sha256: Array.from(digest, (byte) => byte.toString(16).padStart(2, "0"))
      .join(""),
  });
}

async function seen(id: string): Promise<Response> {
  return await waitFor(`first chunk of ${id}`)
    ? new Response("the handler has the first chunk\n")
    : new Response("no chunk yet\n", { status: 504 });
}

async function* ticks(id: string): AsyncGenerator<string> {
  yield "tick 1\n";
  yield await waitFor(`ack of ${id}`)
    ? "tick 2 after the ack\n"
    : "tick 2 without an ack\n";
}

// The event stream format: fields `id`, `event`, `data`, a blank line ends
// an event, a line starting with ":" is a comment (HTML Living Standard
// §9.2.6); several `data` lines are one message joined by "\n".
async function* events(id: string): AsyncGenerator<string> {
  yield ": a comment, which clients ignore\n\n";
  yield "id: 1\ndata: one\n\n";
  const acked = await waitFor(`ack of ${id}`);
  yield `id: 2\ndata: two, ${acked ? "after the ack" : "without an ack"}\n\n`;
  yield "id: 3\ndata: three\ndata: in two lines\n\n";
  yield "event: done\ndata: bye\n\n";
}

/**
 * The page lists each event in the DOM as `id: data`; after the first it
 * acknowledges, and at `done` it closes the source (an EventSource would
 * otherwise reconnect when the stream ends).
 */
const PAGE = `<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <title>Events</title>
  </head>
  <body>
    <ol id="events"></ol>
    <script>
      const list = document.getElementById("events");
      const show = (text) => {
        const item = document.createElement("li");
        item.textContent = text;
        list.append(item);
      };
      const id = "chromium-" + Math.random().toString(36).slice(2);
      const source = new EventSource("/events?id=" + id);
      source.onmessage = (event) => {
        show(event.lastEventId + ": " + event.data.replaceAll("\\n", " / "));
        if (event.lastEventId === "1") fetch("/ack?id=" + id);
      };
      source.addEventListener("done", (event) => {
        show("done: " + event.data);
        source.close();
      });
      source.onerror = () => show("error, readyState " + source.readyState);
    </script>
  </body>
</html>
`;

export default {
  fetch(request: Request): Response | Promise<Response> {
    const url = new URL(request.url);
    const id = url.searchParams.get("id") ?? "";
    const route = `${request.method} ${url.pathname}`;
    switch (route) {
      case "POST /upload":
        return upload(request, id);
      case "GET /seen":
        return seen(id);
      case "GET /ack":
        say(`ack of ${id}`);
        return new Response("acknowledged\n");
      case "GET /ticks":
        return new Response(streamOf(ticks(id)), {
          headers: { "Content-Type": "text/plain; charset=utf-8" },
        });
      case "GET /events":
        return new Response(streamOf(events(id)), {
          headers: {
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
          },
        });
      case "GET /sse.html":
        return new Response(PAGE, {
          headers: { "Content-Type": "text/html; charset=utf-8" },
        });
      default:
        return new Response("not found\n", { status: 404 });
    }
  },
} satisfies Deno.ServeDefaultExport;
