/**
 * The README's shell examples (its ```sh blocks), run as a user would run
 * them: from a fresh temporary directory holding a copy of main.ts and
 * deno.json, with the files they need taken from the README itself (`app.ts`
 * is its ```ts block that starts with `// app.ts`; the certificates come from
 * its openssl block) and a small `./public/index.html` written here.
 *
 *   deno test --allow-run=bash --allow-net=127.0.0.1 \
 *     --allow-read=.,"${TMPDIR:-/tmp}" --allow-write="${TMPDIR:-/tmp}" \
 *     .ci/readme_test.ts
 *
 * (bash runs each command line as the user's shell would parse it, so
 * `--allow-run=bash` is in effect permission to run anything.)
 *
 * Each command line is one of:
 *
 * - a command CI runs by itself anyway (`deno task test`, `bash .ci/run`, …):
 *   skipped;
 * - a block of `openssl` and `printf` commands: run as one bash script;
 * - `deno run … main.ts …`: a server, started with `--port 0` (and any fixed
 *   `--redirect-http` port made 0), asked one question that proves what the
 *   README says of it, then sent SIGTERM: "Shutting down." last, exit 0.
 *
 * Anything else fails the first test, so that no new example can go unrun:
 * teach this file how to run it, or list it in `CI_RUNS` if CI runs it.
 * Nothing here imports main.ts: what is tested is what a user gets.
 * @module
 */

import assert from "node:assert/strict";
import { join } from "node:path";

const README = new URL("../README.md", import.meta.url);
const MAIN = new URL("../main.ts", import.meta.url);
const CONFIG = new URL("../deno.json", import.meta.url);

/** What CI runs by itself: the README's mentions of them are not rerun. */
const CI_RUNS = [
  "deno task test",
  "deno task check",
  "deno task bench",
  "deno task compile", // cannot fetch its runtime here; deno info checks it
  "bash .ci/run",
];

/** The server flags this test knows how to check, each with a value. */
const CHECKED_FLAGS = [
  "--port",
  "--app",
  "--root",
  "--cert",
  "--key",
  "--redirect-http",
  "--workers",
];

/** The files this test makes for `--app` and `--root`. */
const FILES: Record<string, string> = {
  "--app": "./app.ts",
  "--root": "./public",
};

/** How long a server may take to say "Listening", or to stop. */
const START_MS = 30_000;
const STOP_MS = 20_000;
/** Each request; and the openssl block as a whole. */
const REQUEST_MS = 10_000;
const SCRIPT_MS = 60_000;

const HELLO = "<h1>Hello!</h1>";
const INDEX_HTML =
  "<!DOCTYPE html>\n<title>public</title>\n<p>index of ./public</p>\n";

// ---------------------------------------------------------------------------
// Reading the README
// ---------------------------------------------------------------------------

/** A fenced block: its info string, first line number (1-based), lines. */
interface Block {
  info: string;
  line: number;
  lines: string[];
}

/** One command line of a ```sh block, as bash would see it. */
interface CommandLine {
  /** The README line it starts on (1-based). */
  line: number;
  /** Continuations joined (bash drops backslash-newline), comment dropped. */
  text: string;
  /** `text` with runs of white space made one space: for matching. */
  words: string;
  /** The block it is in. */
  block: Block;
}

function fencedBlocks(markdown: string): Block[] {
  const blocks: Block[] = [];
  let open: Block | undefined;
  markdown.split("\n").forEach((line, index) => {
    const fence = /^```(.*)$/.exec(line.trimEnd());
    if (open) {
      if (fence && fence[1] === "") {
        blocks.push(open);
        open = undefined;
      } else {
        open.lines.push(line);
      }
    } else if (fence) {
      open = { info: fence[1].trim(), line: index + 2, lines: [] };
    }
  });
  assert.equal(open, undefined, `README.md:${open?.line}: unclosed block`);
  return blocks;
}

/** A line without its `# comment` (a `#` starting a word, not quoted). */
function withoutComment(line: string): string {
  let quote = "";
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (quote) {
      if (c === quote) quote = "";
      else if (c === "\\" && quote === '"') i++;
    } else if (c === "\\") {
      i++;
    } else if (c === "'" || c === '"') {
      quote = c;
    } else if (c === "#" && (i === 0 || /\s/.test(line[i - 1]))) {
      return line.slice(0, i);
    }
  }
  return line;
}

function commandLines(block: Block): CommandLine[] {
  const commands: CommandLine[] = [];
  let text = "";
  let start = -1;
  block.lines.forEach((raw, index) => {
    const line = withoutComment(raw);
    if (start < 0) start = block.line + index;
    if (line.endsWith("\\")) {
      text += line.slice(0, -1);
      return;
    }
    text += line;
    if (text.trim() !== "") {
      const words = text.trim().replace(/\s+/g, " ");
      commands.push({ line: start, text: text.trim(), words, block });
    }
    text = "";
    start = -1;
  });
  return commands;
}

/** The README's ```ts block that starts with `// NAME`, if any. */
function namedTsBlock(blocks: Block[], name: string): string | undefined {
  const block = blocks.find((block) =>
    block.info === "ts" && block.lines[0]?.trim() === `// ${name}`
  );
  return block && block.lines.join("\n") + "\n";
}

// ---------------------------------------------------------------------------
// What each command line is
// ---------------------------------------------------------------------------

/** A server command: the words before main.ts and main.ts's flags. */
interface ServerCommand {
  deno: string[];
  flags: Map<string, string>;
}

type Plan =
  | { kind: "ci" }
  | { kind: "script" }
  | { kind: "server"; server: ServerCommand }
  | { kind: "unknown"; why: string };

const SCRIPT_COMMAND = /^(openssl|printf) /;

function plan(command: CommandLine): Plan {
  if (CI_RUNS.includes(command.words)) return { kind: "ci" };
  if (SCRIPT_COMMAND.test(command.words)) {
    const block = commandLines(command.block);
    if (block.every((each) => SCRIPT_COMMAND.test(each.words))) {
      return { kind: "script" };
    }
    return {
      kind: "unknown",
      why: "openssl/printf in a block with other commands",
    };
  }
  if (/^deno run /.test(command.words)) return planServer(command.words);
  return { kind: "unknown", why: "no way to run it is known here" };
}

function planServer(words: string): Plan {
  const argv = words.split(" ");
  // Plain words only: nothing the shell would expand or redirect.
  const odd = argv.find((word) => !/^[\w.,=/:+@-]+$/.test(word));
  if (odd !== undefined) {
    return { kind: "unknown", why: `the word ${odd} is not a plain word` };
  }
  const main = argv.indexOf("main.ts");
  if (main < 0) return { kind: "unknown", why: "deno run of no main.ts" };
  const deno = argv.slice(0, main + 1);
  if (!deno.slice(2, -1).every((word) => word.startsWith("-"))) {
    return { kind: "unknown", why: "deno run with a script argument" };
  }
  const flags = new Map<string, string>();
  const rest = argv.slice(main + 1);
  for (let i = 0; i < rest.length; i++) {
    const [flag, inline] = rest[i].split(/=(.*)/s, 2);
    if (!CHECKED_FLAGS.includes(flag)) {
      return { kind: "unknown", why: `no check of main.ts's ${flag} here` };
    }
    const value = inline ?? rest[++i];
    if (value === undefined) {
      return { kind: "unknown", why: `${flag} without a value` };
    }
    flags.set(flag, value);
  }
  for (const [flag, file] of Object.entries(FILES)) {
    if (flags.has(flag) && flags.get(flag) !== file) {
      return { kind: "unknown", why: `${flag} of another file than ${file}` };
    }
  }
  return { kind: "server", server: { deno, flags } };
}

const markdown = await Deno.readTextFile(README);
const blocks = fencedBlocks(markdown);
const commands = blocks.filter((block) => block.info === "sh")
  .flatMap(commandLines);
const plans = new Map(commands.map((command) => [command, plan(command)]));

function where(command: CommandLine): string {
  return `README.md:${command.line}: ${command.words}`;
}

// ---------------------------------------------------------------------------
// Running them
// ---------------------------------------------------------------------------

const sleep = (ms: number) => new Promise((done) => setTimeout(done, ms));

/** Waits up to `ms` for `ready()`; says whether it came. */
async function until(ready: () => boolean, ms: number): Promise<boolean> {
  const deadline = performance.now() + ms;
  while (!ready()) {
    if (performance.now() > deadline) return false;
    await sleep(20);
  }
  return true;
}

/** A stream's text as it arrives, split into lines. */
class Lines {
  lines: string[] = [];
  text = "";
  ended = false;
  readonly done: Promise<void>;

  constructor(stream: ReadableStream<Uint8Array>) {
    this.done = (async () => {
      let rest = "";
      for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
        this.text += chunk;
        const parts = (rest + chunk).split("\n");
        rest = parts.pop()!;
        this.lines.push(...parts);
      }
      if (rest !== "") this.lines.push(rest);
      this.ended = true;
    })();
  }

  /** Line `index`, waiting up to `ms` for it; undefined if it never came. */
  async line(index: number, ms: number): Promise<string | undefined> {
    await until(() => this.lines.length > index || this.ended, ms);
    return this.lines[index];
  }
}

const ENV = { DENO_NO_UPDATE_CHECK: "1", NO_COLOR: "1" };

/** The openssl block, as one bash script in `dir`. */
async function runScript(dir: string, lines: CommandLine[]): Promise<void> {
  const script = lines.map((each) => each.text).join("\n");
  const { code, stderr } = await new Deno.Command("bash", {
    args: ["-c", `set -euo pipefail\n${script}`],
    cwd: dir,
    env: ENV,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
    signal: AbortSignal.timeout(SCRIPT_MS),
  }).output();
  const errors = new TextDecoder().decode(stderr);
  assert.equal(code, 0, `the block exited ${code}:\n${errors}`);
}

/** One CLF line of the access log. */
const LOG_LINE =
  /^127\.0\.0\.1 - - \[[^\]]+\] "[A-Z]+ \S+ HTTP\/1\.1" \d{3} (\d+|-)$/;

/**
 * A server command: started in `dir` with `--port 0` appended (the default
 * port, 7878, may be taken on a CI machine) and any fixed `--redirect-http`
 * port (the README's 8080) made 0 as well, so that it never collides: the
 * server names the ports it got on stdout, "Listening on …" first and then
 * "Redirecting http://…/ to HTTPS". `timeout` is
 * the backstop if this test is killed outright; `--foreground` keeps it out
 * of the way of signals, so that the server gets our SIGTERM once, as from a
 * user's `kill`, and its status is the server's.
 */
async function runServer(dir: string, server: ServerCommand): Promise<void> {
  const flags = new Map(server.flags);
  flags.set("--port", "0");
  if (flags.has("--redirect-http")) flags.set("--redirect-http", "0");
  const argv = [...server.deno, ...[...flags].flat()];
  const tls = flags.has("--cert");
  const child = new Deno.Command("bash", {
    args: [
      "-c",
      `exec timeout --foreground -k 5 120 ${argv.join(" ")}`,
    ],
    cwd: dir,
    env: ENV,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stdout = new Lines(child.stdout);
  const stderr = new Lines(child.stderr);
  const ran = `ran as: ${argv.join(" ")}`;
  let exited: Deno.CommandStatus | undefined;
  child.status.then((status) => exited = status);
  let requests = 0;
  try {
    const first = await stdout.line(0, START_MS);
    const listening = /^Listening on (https?):\/\/127\.0\.0\.1:(\d+)\/$/
      .exec(first ?? "");
    assert.ok(
      listening,
      `first line: ${first}` +
        (exited ? ` (exited ${exited.code})` : "") +
        `\n${ran}\nstderr:\n${stderr.text}`,
    );
    assert.equal(listening[1], tls ? "https" : "http", "the scheme");
    const base = new URL(`${listening[1]}://127.0.0.1:${listening[2]}/`);
    const caCerts = tls ? [await Deno.readTextFile(join(dir, "ca.crt"))] : [];
    const client = Deno.createHttpClient({ caCerts });
    const get = async (url: URL, init: RequestInit = {}) => {
      requests++;
      return await fetch(url, {
        client,
        signal: AbortSignal.timeout(REQUEST_MS),
        ...init,
      });
    };
    try {
      if (flags.has("--app")) {
        // README: GET /hello is "Hello!\n"; POST /count counts the bytes.
        const hello = await get(new URL("/hello", base));
        assert.equal(hello.status, 200);
        assert.equal(await hello.text(), "Hello!\n");
        const bytes = crypto.getRandomValues(new Uint8Array(3000));
        const count = await get(new URL("/count", base), {
          method: "POST",
          body: bytes,
        });
        assert.equal(count.status, 200);
        assert.deepEqual(await count.json(), { bytes: 3000 });
      } else if (flags.has("--root")) {
        // README: `/` is the folder's index.html.
        const index = await get(base);
        assert.equal(index.status, 200);
        assert.match(index.headers.get("content-type") ?? "", /^text\/html/);
        assert.equal(await index.text(), INDEX_HTML);
      } else {
        // README: GET / is the hello page, "Hi from Deno" (over TLS too).
        const page = await get(base);
        const body = await page.text();
        assert.equal(page.status, 200);
        assert.ok(body.includes(HELLO) && body.includes("Hi from Deno"), body);
      }
      if (flags.has("--redirect-http")) {
        // README: plain HTTP on that port, 308 to the same URL over HTTPS.
        const line = await until(
          () => stdout.lines.some((line) => line.startsWith("Redirecting ")),
          START_MS,
        ) && stdout.lines.find((line) => line.startsWith("Redirecting "));
        const named = /^Redirecting http:\/\/127\.0\.0\.1:(\d+)\/ to HTTPS$/
          .exec(line || "");
        assert.ok(named, `no "Redirecting" line: ${stdout.lines}`);
        const plain = new URL(`http://127.0.0.1:${named[1]}/a/b?c=d`);
        const moved = await get(plain, { redirect: "manual" });
        await moved.body?.cancel();
        assert.equal(moved.status, 308);
        assert.equal(
          moved.headers.get("location"),
          new URL("/a/b?c=d", base).href,
        );
      }
    } finally {
      client.close();
    }
    child.kill("SIGTERM");
    const stopped = await until(() => exited !== undefined, STOP_MS);
    assert.ok(stopped, `still running ${STOP_MS} ms after SIGTERM`);
    await stdout.done;
    await stderr.done;
    const output = `stdout:\n${stdout.text}\nstderr:\n${stderr.text}\n${ran}`;
    assert.equal(exited!.code, 0, `exit status\n${output}`);
    assert.equal(stdout.lines.at(-1), "Shutting down.", output);
    // In between, one Common Log Format line per response (and the
    // redirect's line): the README's description of stdout.
    const log = stdout.lines.slice(1, -1)
      .filter((line) => !line.startsWith("Redirecting "));
    assert.equal(log.length, requests, `access log lines\n${output}`);
    for (const line of log) assert.match(line, LOG_LINE);
    // A permission missing from the README's command would be a line here.
    assert.equal(stderr.text, "", `stderr\n${output}`);
  } finally {
    if (exited === undefined) {
      child.kill("SIGTERM"); // timeout's -k 5 makes it a SIGKILL if need be
      if (!await until(() => exited !== undefined, STOP_MS)) {
        child.kill("SIGKILL");
      }
    }
    await child.status;
    await stdout.done;
    await stderr.done;
  }
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

Deno.test("README.md: every sh command is run here or by CI", () => {
  const unknown = commands.flatMap((command) => {
    const planned = plans.get(command)!;
    return planned.kind === "unknown"
      ? [`${where(command)}: ${planned.why}`]
      : [];
  });
  assert.deepEqual(unknown, [], "teach .ci/readme_test.ts to run these");
  // A parser that found nothing would pass the line above.
  const kinds = new Set([...plans.values()].map((planned) => planned.kind));
  assert.deepEqual(
    [...kinds].sort(),
    ["ci", "script", "server"],
    "README.md's sh blocks: CI's commands, the openssl block, servers",
  );
});

Deno.test("README.md: its sh examples work", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "readme_test." });
  const passed = new Set<CommandLine>();
  try {
    // What the examples need: main.ts and deno.json (its "unstable"), the
    // README's app.ts, a public folder, and the certificates.
    await Deno.copyFile(MAIN, join(dir, "main.ts"));
    await Deno.copyFile(CONFIG, join(dir, "deno.json"));
    const app = namedTsBlock(blocks, "app.ts");
    if (app !== undefined) await Deno.writeTextFile(join(dir, "app.ts"), app);
    await Deno.mkdir(join(dir, "public"));
    await Deno.writeTextFile(join(dir, "public", "index.html"), INDEX_HTML);
    const scripts = new Set(
      commands.filter((command) => plans.get(command)!.kind === "script")
        .map((command) => command.block),
    );
    for (const block of scripts) {
      const lines = commands.filter((command) => command.block === block);
      const ok = await t.step(
        `README.md:${block.line}: the block of ${lines.length} commands ` +
          `(${lines.map((each) => each.words.split(" ")[0]).join(", ")})`,
        async () => {
          await runScript(dir, lines);
          for (const file of ["ca.crt", "localhost.crt", "localhost.key"]) {
            const info = await Deno.stat(join(dir, file));
            assert.ok(info.size > 0, `${file} is empty`);
          }
        },
      );
      if (ok) lines.forEach((each) => passed.add(each));
    }
    for (const [command, planned] of plans) {
      if (planned.kind !== "server") continue;
      const ok = await t.step(where(command), async () => {
        if (planned.server.flags.has("--app")) {
          assert.ok(app, "README.md has no ```ts block starting // app.ts");
        }
        await runServer(dir, planned.server);
      });
      if (ok) passed.add(command);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  const unrun = commands.filter((command) =>
    plans.get(command)!.kind !== "ci" && !passed.has(command)
  ).map(where);
  assert.deepEqual(unrun, [], "commands not run, or failed");
});
