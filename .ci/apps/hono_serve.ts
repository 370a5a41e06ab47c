/**
 * The Hono app of hono_app.ts served from code, the way a Deno user moves
 * from `Deno.serve(app.fetch)`: the same call, imported from main.ts.
 *
 *   deno run --allow-net .ci/apps/hono_serve.ts
 *
 * It listens on a free port and prints main.ts's "Listening on" line, which
 * .ci/interop.sh waits for; SIGTERM shuts it down gracefully.
 * @module
 */

import { serve } from "../../main.ts";
import app from "./hono_app.ts";

const server = serve({
  port: 0,
  onListen: ({ hostname, port }) =>
    console.log(`Listening on http://${hostname}:${port}/`),
}, app.fetch);

const shutdown = () => server.shutdown();
Deno.addSignalListener("SIGTERM", shutdown);
await server.finished;
Deno.removeSignalListener("SIGTERM", shutdown);
console.log("Shutting down.");
