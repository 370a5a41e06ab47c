/**
 * A real framework behind the server: a Hono app from npm, written as Hono's
 * own documentation writes one, with a router, a middleware, JSON routes and
 * a path parameter. Its default export is the app, whose `fetch` method is
 * what `deno serve` and main.ts's `--app` call:
 *
 *   deno run --allow-net --allow-read main.ts --app .ci/apps/hono_app.ts
 *
 * .ci/apps/hono_serve.ts serves the same app through `serve(app.fetch)`.
 * (npm imports are for .ci/ only: main.ts itself depends on nothing.)
 * @module
 */

import { Hono } from "npm:hono@4";

/** What the JSON routes serve. */
export const BOOKS = [
  { id: 1, title: "The Rust Programming Language", chapter: 21 },
  { id: 2, title: "Building a Multithreaded Web Server", chapter: 21 },
];

const app = new Hono();

// A middleware around every route, the 404 included: it runs the route,
// then adds a header to whatever the route answered.
app.use(async (c, next) => {
  await next();
  c.header("X-Served-By", "hono");
});

app.get("/", (c) => c.text("Hello from Hono!"));

app.get("/api/books", (c) => c.json(BOOKS));

// Over the 1 KiB from which main.ts compresses a response (about 4 KiB).
app.get("/api/catalog", (c) =>
  c.json(Array.from({ length: 100 }, (_, i) => ({
    id: i + 1,
    title: `Chapter ${i % 21 + 1}, part ${i + 1}`,
  }))));

app.get("/api/books/:id", (c) => {
  const book = BOOKS.find((book) => String(book.id) === c.req.param("id"));
  return book ? c.json(book) : c.json({ error: "no such book" }, 404);
});

app.post("/api/books", async (c) => {
  const book = await c.req.json();
  return c.json({ created: book }, 201);
});

export default app;
