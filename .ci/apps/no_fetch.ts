/**
 * A module that main.ts's `--app` must refuse: its default export has no
 * `fetch` method (a handler under another name, a common slip).
 * @module
 */

export default {
  handle(_request: Request): Response {
    return new Response("never served\n");
  },
};
