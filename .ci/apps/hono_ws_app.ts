/**
 * WebSockets through a real framework: Hono's `upgradeWebSocket` helper for
 * Deno, from npm, written as Hono's documentation writes it. It calls
 * `Deno.upgradeWebSocket` on the request it is given, so under main.ts it
 * runs as it is, with no change for this server:
 *
 *   deno run --allow-net --allow-read main.ts --app .ci/apps/hono_ws_app.ts
 *
 * `GET /ws` echoes every message back; .ci/websocket_test.ts checks it.
 * @module
 */

import { Hono } from "npm:hono@4";
import { upgradeWebSocket } from "npm:hono@4/deno";

const app = new Hono();

app.get("/", (c) => c.text("Hello from Hono!"));

app.get(
  "/ws",
  upgradeWebSocket(() => ({
    onMessage(event, ws) {
      // Hono types data as possibly a Blob, which its send() does not take;
      // a server socket's binaryType is "arraybuffer", so it never is one.
      ws.send(event.data as string | ArrayBuffer);
    },
  })),
);

export default app;
