/**
 * Benchmark: this server (`main.ts`) against an anchor `Deno.serve` server
 * with the same routes and the same hello page, and against `node:http` when
 * `node` is on the PATH. Everything listens on ephemeral loopback ports.
 *
 * For each of three modes — keep-alive (`GET /` on 50 connections),
 * pipelined (16 requests per write) and `Connection: close` — `wrk` drives
 * the servers in turn (A B C, A B C, ...) for several rounds, and the median
 * requests per second and p99 latency of each are reported, with the ratio
 * ours/anchor. It also measures the memory each server spends per idle
 * keep-alive connection, the cost of the access log, and with `--workers N`
 * ours with N workers against `deno serve --parallel`. The results are a
 * markdown table on stdout, followed by PASS/FAIL lines for the targets;
 * progress goes to stderr.
 *
 * Needs `wrk` (`apt-get install -y wrk`); `taskset` (util-linux) pins the
 * load generator to CPU 0 and the servers to the other CPUs.
 *
 * ```sh
 * deno task bench
 * deno task bench --rounds 3 --duration 5
 * deno task bench --workers 2 --strict
 * ```
 *
 * Flags: `--rounds N` (5), `--duration S` per run (5), `--connections N`
 * (50), `--idle-connections N` (2000), `--workers N` (off), `--strict` (exit
 * 1 when a target fails). Internal: `--anchor deno` serves the anchor.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { fileURLToPath } from "node:url";
import { HELLO_PAGE, NOT_FOUND_PAGE } from "./main.ts";

// ---------------------------------------------------------------------------
// The anchor: the same routes and pages, in idiomatic `Deno.serve` style
// ---------------------------------------------------------------------------

const HTML = "text/html; charset=utf-8";
const SLEEP_MS = 5_000;

function page(body: string, status = 200): Response {
  return new Response(body, { status, headers: { "content-type": HTML } });
}

function notAllowed(allow: string): Response {
  return new Response("Method Not Allowed\n", {
    status: 405,
    headers: { allow, "content-type": "text/plain; charset=utf-8" },
  });
}

function pathOf(url: string): string {
  const start = url.indexOf("/", url.indexOf("//") + 2);
  const query = url.indexOf("?", start);
  return url.slice(start, query === -1 ? undefined : query);
}

/** The anchor's handler, also served by `deno serve --parallel`. */
export function anchorHandler(request: Request): Response | Promise<Response> {
  const { method } = request;
  switch (pathOf(request.url)) {
    case "/":
      if (method !== "GET" && method !== "HEAD") return notAllowed("GET, HEAD");
      return page(HELLO_PAGE);
    case "/sleep":
      if (method !== "GET" && method !== "HEAD") return notAllowed("GET, HEAD");
      return new Promise((resolve) =>
        setTimeout(() => resolve(page(HELLO_PAGE)), SLEEP_MS)
      );
    case "/echo":
      if (method !== "POST") return notAllowed("POST");
      return new Response(request.body);
    default:
      return page(NOT_FOUND_PAGE, 404);
  }
}

function serveAnchor(): void {
  Deno.serve({
    hostname: "127.0.0.1",
    port: 0,
    onListen: ({ hostname, port }) =>
      console.log(`Listening on http://${hostname}:${port}/`),
  }, anchorHandler);
}

/** The `node:http` twin of the anchor, written to a file and run by node. */
function nodeServerSource(): string {
  return `import { createServer } from "node:http";
const HELLO = ${JSON.stringify(HELLO_PAGE)};
const NOT_FOUND = ${JSON.stringify(NOT_FOUND_PAGE)};
const HTML = "text/html; charset=utf-8";
function page(res, status, body) {
  res.writeHead(status, {
    "Content-Type": HTML,
    "Content-Length": Buffer.byteLength(body),
  });
  res.end(body);
}
function notAllowed(res, allow) {
  res.writeHead(405, { Allow: allow, "Content-Type": "text/plain" });
  res.end("Method Not Allowed\\n");
}
const server = createServer((req, res) => {
  const path = req.url.split("?")[0];
  const read = req.method === "GET" || req.method === "HEAD";
  if (path === "/") {
    return read ? page(res, 200, HELLO) : notAllowed(res, "GET, HEAD");
  }
  if (path === "/sleep") {
    if (!read) return notAllowed(res, "GET, HEAD");
    return setTimeout(() => page(res, 200, HELLO), ${SLEEP_MS});
  }
  if (path === "/echo") {
    if (req.method !== "POST") return notAllowed(res, "POST");
    res.writeHead(200);
    return req.pipe(res);
  }
  page(res, 404, NOT_FOUND);
});
server.keepAliveTimeout = 60_000;
server.listen(0, "127.0.0.1", () => {
  console.log("Listening on http://127.0.0.1:" + server.address().port + "/");
});
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => process.exit(0));
}
`;
}

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

interface Options {
  rounds: number;
  duration: number;
  connections: number;
  idleConnections: number;
  workers: number;
  strict: boolean;
}

const USAGE =
  `Usage: deno task bench [--rounds N] [--duration S] [--connections N]
                       [--idle-connections N] [--workers N] [--strict]`;

function positiveInt(
  name: string,
  value: string | undefined,
  fallback: number,
) {
  if (value === undefined) return fallback;
  const number = Number(value);
  if (!Number.isInteger(number) || number < 1) {
    throw new Error(`--${name} must be a positive integer, not ${value}`);
  }
  return number;
}

function parseOptions(args: string[]): Options & { anchor?: string } {
  const { values } = parseArgs({
    args,
    options: {
      rounds: { type: "string" },
      duration: { type: "string" },
      connections: { type: "string" },
      "idle-connections": { type: "string" },
      workers: { type: "string" },
      strict: { type: "boolean", default: false },
      anchor: { type: "string" },
      help: { type: "boolean", default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    Deno.exit(0);
  }
  return {
    rounds: positiveInt("rounds", values.rounds, 5),
    duration: positiveInt("duration", values.duration, 5),
    connections: positiveInt("connections", values.connections, 50),
    idleConnections: positiveInt(
      "idle-connections",
      values["idle-connections"],
      2000,
    ),
    workers: positiveInt("workers", values.workers, 1),
    strict: values.strict,
    anchor: values.anchor,
  };
}

// ---------------------------------------------------------------------------
// Subprocesses: every one is tracked, and all are killed at the end
// ---------------------------------------------------------------------------

const children = new Set<Deno.ChildProcess>();
/** The directory of the helper files, removed at the end. */
let tempDir: string | undefined;
const decoder = new TextDecoder();

function spawn(
  command: string[],
  options: Deno.CommandOptions = {},
): Deno.ChildProcess {
  const child = new Deno.Command(command[0], {
    args: command.slice(1),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    ...options,
  }).spawn();
  children.add(child);
  child.status.finally(() => children.delete(child));
  return child;
}

function signal(child: Deno.ChildProcess, name: Deno.Signal): void {
  try {
    child.kill(name);
  } catch {
    // It has already exited.
  }
}

/** SIGTERM every child still running, then SIGKILL those that linger. */
async function stop(targets: Iterable<Deno.ChildProcess>): Promise<void> {
  const list = [...targets];
  for (const child of list) signal(child, "SIGTERM");
  const exited = Promise.allSettled(list.map((child) => child.status));
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise((resolve) => timer = setTimeout(resolve, 3_000));
  await Promise.race([exited, late]);
  clearTimeout(timer);
  for (const child of list) {
    if (children.has(child)) signal(child, "SIGKILL");
  }
  await exited;
}

/** Runs a command to completion and returns its stdout, or null if absent. */
async function probe(command: string[]): Promise<string | null> {
  try {
    const { stdout, stderr } = await new Deno.Command(command[0], {
      args: command.slice(1),
      stdin: "null",
    }).output();
    return decoder.decode(stdout) + decoder.decode(stderr);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return null;
    throw error;
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

interface ServerSpec {
  name: string;
  command: string[];
  env?: Record<string, string>;
}

interface Server {
  name: string;
  port: number;
  pid: number;
  child: Deno.ChildProcess;
  /** The last lines the server wrote to stderr, for error messages. */
  stderr(): string;
}

const LISTENING = /Listening on http:\/\/\S*:(\d+)\//;
const HERE = fileURLToPath(new URL(".", import.meta.url));

/**
 * Reads a stream to its end. Until `onText` returns true, the bytes are
 * decoded and handed to it; afterwards they are only drained.
 */
function drain(
  stream: ReadableStream<Uint8Array>,
  onText: (text: string) => boolean,
): Promise<void> {
  const textDecoder = new TextDecoder();
  let done = false;
  return stream.pipeTo(
    new WritableStream({
      write(chunk) {
        if (!done) done = onText(textDecoder.decode(chunk, { stream: true }));
      },
    }),
  ).catch(() => {});
}

async function startServer(spec: ServerSpec, pin: string[]): Promise<Server> {
  const child = spawn([...pin, ...spec.command], { cwd: HERE, env: spec.env });
  let stderrTail = "";
  let seen = "";
  const { promise, resolve } = Promise.withResolvers<number>();
  const look = (text: string) => {
    seen = (seen + text).slice(-4096);
    const match = seen.match(LISTENING);
    if (match) resolve(Number(match[1]));
    return match !== null;
  };
  drain(child.stdout, look);
  drain(child.stderr, (text) => {
    stderrTail = (stderrTail + text).slice(-2048);
    look(text);
    return false;
  });
  let timer: ReturnType<typeof setTimeout> | undefined;
  const failure = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error("no listening line")), 30_000);
    child.status.then(({ code }) => reject(new Error(`exited (${code})`)));
  });
  try {
    const port = await Promise.race([promise, failure]);
    return {
      name: spec.name,
      port,
      pid: child.pid,
      child,
      stderr: () => stderrTail,
    };
  } catch (error) {
    await stop([child]);
    throw new Error(
      `${spec.name} did not start: ${(error as Error).message}\n${stderrTail}`,
    );
  } finally {
    clearTimeout(timer);
  }
}

// ---------------------------------------------------------------------------
// A minimal HTTP/1.1 client, for the sanity check and the idle connections
// ---------------------------------------------------------------------------

const encoder = new TextEncoder();
const GET = encoder.encode("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");

interface Reply {
  status: number;
  body: Uint8Array;
}

function indexOfHeadEnd(bytes: Uint8Array): number {
  for (let i = 3; i < bytes.length; i++) {
    if (
      bytes[i] === 10 && bytes[i - 1] === 13 && bytes[i - 2] === 10 &&
      bytes[i - 3] === 13
    ) return i + 1;
  }
  return -1;
}

function append(a: Uint8Array, b: Uint8Array): Uint8Array {
  const joined = new Uint8Array(a.length + b.length);
  joined.set(a);
  joined.set(b, a.length);
  return joined;
}

/** Reads one response framed by Content-Length (all our routes send one). */
async function readReply(conn: Deno.Conn): Promise<Reply> {
  const chunk = new Uint8Array(4096);
  let data: Uint8Array = new Uint8Array(0);
  let headEnd = -1;
  let length = -1;
  let status = 0;
  while (length < 0 || data.length < headEnd + length) {
    const n = await conn.read(chunk);
    if (n === null) throw new Error("connection closed mid-response");
    data = append(data, chunk.subarray(0, n));
    if (headEnd < 0 && (headEnd = indexOfHeadEnd(data)) > 0) {
      const head = decoder.decode(data.subarray(0, headEnd));
      status = Number(head.slice(9, 12));
      const match = head.match(/\r\ncontent-length:\s*(\d+)/i);
      if (!match) throw new Error("response without Content-Length");
      length = Number(match[1]);
    }
  }
  return { status, body: data.subarray(headEnd, headEnd + length) };
}

async function openKeptAlive(port: number): Promise<Deno.TcpConn> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await conn.write(GET);
    const { status } = await readReply(conn);
    if (status !== 200) throw new Error(`status ${status}`);
    return conn;
  } catch (error) {
    conn.close();
    throw error;
  }
}

/** Checks that a server answers `GET /` with exactly the hello page. */
async function checkHello(server: Server): Promise<void> {
  const conn = await openKeptAlive(server.port);
  try {
    await conn.write(GET);
    const { body } = await readReply(conn);
    if (decoder.decode(body) !== HELLO_PAGE) {
      throw new Error(`${server.name} does not serve the same hello page`);
    }
  } finally {
    conn.close();
  }
}

// ---------------------------------------------------------------------------
// wrk
// ---------------------------------------------------------------------------

type Mode = "keep-alive" | "pipelined" | "close";
const MODES: Mode[] = ["keep-alive", "pipelined", "close"];
const PIPELINE_DEPTH = 16;

const PIPELINE_LUA = `-- ${PIPELINE_DEPTH} GET / requests per write
local batch
function init(args)
  local requests = {}
  for i = 1, ${PIPELINE_DEPTH} do requests[i] = wrk.format(nil, "/") end
  batch = table.concat(requests)
end
function request()
  return batch
end
`;

interface Sample {
  rps: number;
  p99: number;
  errors: number;
  /** The server's CPU time during the run, in cores (1 = one busy core). */
  cpu: number;
}

const UNIT_MS: Record<string, number> = {
  us: 1e-3,
  ms: 1,
  s: 1e3,
  m: 60e3,
  h: 3600e3,
};

/** Parses wrk's report: requests/s, p99 in ms, socket and status errors. */
function parseWrk(output: string): Omit<Sample, "cpu"> {
  const rps = output.match(/Requests\/sec:\s+([\d.]+)/);
  const p99 = output.match(/^\s*99(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\b/m);
  if (!rps || !p99) throw new Error(`unexpected wrk output:\n${output}`);
  let errors = 0;
  const socket = output.match(
    /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/,
  );
  if (socket) errors += socket.slice(1).reduce((sum, n) => sum + Number(n), 0);
  const status = output.match(/Non-2xx or 3xx responses: (\d+)/);
  if (status) errors += Number(status[1]);
  // wrk sometimes prints 0.00us percentiles (wg/wrk#236, #354), mostly
  // when pipelining: a zero is no measurement.
  const p99ms = Number(p99[1]) * UNIT_MS[p99[2]];
  return { rps: Number(rps[1]), p99: p99ms > 0 ? p99ms : NaN, errors };
}

interface Load {
  pin: string[];
  connections: number;
  duration: number;
  luaPath: string;
}

function modeArgs(mode: Mode, load: Load): string[] {
  if (mode === "pipelined") return ["-s", load.luaPath];
  if (mode === "close") return ["-H", "Connection: close"];
  return [];
}

/** Runs wrk against `server`, timing the server's CPU meanwhile. */
async function runWrk(
  server: Server,
  mode: Mode,
  load: Load,
): Promise<Sample> {
  const ticks = await cpuTicks(server.pid);
  const started = performance.now();
  const child = spawn([
    ...load.pin,
    "wrk",
    "-t1",
    `-c${load.connections}`,
    `-d${load.duration}s`,
    "--latency",
    ...modeArgs(mode, load),
    `http://127.0.0.1:${server.port}/`,
  ]);
  const timer = setTimeout(
    () => signal(child, "SIGKILL"),
    (load.duration + 30) * 1000,
  );
  try {
    const { code, stdout, stderr } = await child.output();
    const output = decoder.decode(stdout) + decoder.decode(stderr);
    if (code !== 0) throw new Error(`wrk failed (${code}):\n${output}`);
    const seconds = (performance.now() - started) / 1000;
    const cpu = (await cpuTicks(server.pid) - ticks) / CLOCK_TICKS / seconds;
    return { ...parseWrk(output), cpu };
  } finally {
    clearTimeout(timer);
  }
}

// ---------------------------------------------------------------------------
// Memory per idle keep-alive connection
// ---------------------------------------------------------------------------

interface Memory {
  connections: number;
  beforeKiB: number;
  afterKiB: number;
  /** Connections still established on the server's side when measured. */
  open: number;
  kibPerConnection: number;
}

/** Reads a file under /proc (Deno itself needs --allow-all for that). */
async function readProc(path: string): Promise<string> {
  const { code, stdout } = await new Deno.Command("cat", {
    args: [path],
    stdin: "null",
    stderr: "null",
  }).output();
  if (code !== 0) throw new Error(`cannot read ${path}`);
  return decoder.decode(stdout);
}

/** Linux's USER_HZ, the unit of /proc/PID/stat times, on every arch. */
const CLOCK_TICKS = 100;

/** User plus system CPU time of a process, all threads, in clock ticks. */
async function cpuTicks(pid: number): Promise<number> {
  const stat = await readProc(`/proc/${pid}/stat`);
  // Fields after the parenthesized command name, from field 3 (state) on.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(fields[11]) + Number(fields[12]);
}

async function rssKiB(pid: number): Promise<number> {
  const status = await readProc(`/proc/${pid}/status`);
  const match = status.match(/^VmRSS:\s+(\d+) kB/m);
  if (!match) throw new Error(`no VmRSS for ${pid}`);
  return Number(match[1]);
}

/** Counts the established TCP connections whose local port is `port`. */
async function established(port: number): Promise<number> {
  const table = await readProc("/proc/net/tcp");
  const local = `:${port.toString(16).toUpperCase().padStart(4, "0")}`;
  return table.split("\n").filter((line) => {
    const fields = line.trim().split(/\s+/);
    return fields[1]?.endsWith(local) && fields[3] === "01";
  }).length;
}

/** Opens `count` connections, 100 at a time, each after one request. */
async function openIdle(port: number, count: number): Promise<Deno.Conn[]> {
  const conns: Deno.Conn[] = [];
  try {
    while (conns.length < count) {
      const batch = Math.min(100, count - conns.length);
      const opened = await Promise.allSettled(
        Array.from({ length: batch }, () => openKeptAlive(port)),
      );
      for (const result of opened) {
        if (result.status === "fulfilled") conns.push(result.value);
      }
      const failed = opened.find((result) => result.status === "rejected");
      if (failed) throw (failed as PromiseRejectedResult).reason;
    }
    return conns;
  } catch (error) {
    for (const conn of conns) conn.close();
    throw error;
  }
}

async function measureIdle(
  server: Server,
  count: number,
  load: Load,
): Promise<Memory> {
  // Warm up (JIT, heap) with a short keep-alive run, then let it settle.
  await runWrk(server, "keep-alive", { ...load, duration: 1 });
  await delay(1_000);
  const beforeKiB = await rssKiB(server.pid);
  const conns = await openIdle(server.port, count);
  try {
    await delay(1_000);
    const afterKiB = await rssKiB(server.pid);
    const open = await established(server.port);
    return {
      connections: count,
      beforeKiB,
      afterKiB,
      open,
      kibPerConnection: (afterKiB - beforeKiB) / count,
    };
  } finally {
    for (const conn of conns) conn.close();
  }
}

/**
 * Idle connections that fit in the open-file limit this process has (and the
 * servers, which inherit it): `cat` inherits it too, so its "self" will do.
 */
async function idleBudget(wanted: number): Promise<number> {
  const limits = await readProc("/proc/self/limits");
  const match = limits.match(/^Max open files\s+(\d+|unlimited)/m);
  if (!match || match[1] === "unlimited") return wanted;
  return Math.max(1, Math.min(wanted, Number(match[1]) - 256));
}

// ---------------------------------------------------------------------------
// The benchmark
// ---------------------------------------------------------------------------

interface Contender extends ServerSpec {
  modes: Mode[];
}

interface Environment {
  date: string;
  deno: string;
  node: string | null;
  cpu: string;
  nproc: number;
  wrkPin: string[];
  serverPin: string[];
}

async function describeEnvironment(): Promise<Environment> {
  const wrk = await probe(["wrk", "--version"]);
  if (wrk === null) {
    throw new Error("wrk is not installed: apt-get install -y wrk");
  }
  const nproc = navigator.hardwareConcurrency;
  const taskset = nproc >= 2 && await probe(["taskset", "--version"]) !== null;
  const cpuinfo = await readProc("/proc/cpuinfo");
  const deno = await probe(["deno", "--version"]);
  const node = await probe(["node", "--version"]);
  return {
    date: new Date().toISOString().replace(/\.\d+Z$/, "Z"),
    deno: deno?.split("\n")[0] ?? "deno (unknown version)",
    node: node?.trim() ?? null,
    cpu: cpuinfo.match(/^model name\s*:\s*(.+)$/m)?.[1] ?? "unknown CPU",
    nproc,
    wrkPin: taskset ? ["taskset", "-c", "0"] : [],
    serverPin: taskset
      ? ["taskset", "-c", nproc === 2 ? "1" : `1-${nproc - 1}`]
      : [],
  };
}

const OURS = "ours";
const OURS_LOG = "ours (log)";
const ANCHOR = "Deno.serve";
const NODE = "node:http";

function contenders(options: Options, env: Environment, dir: string) {
  const main = ["deno", "run", "--allow-net", "main.ts", "--port", "0"];
  const list: Contender[] = [
    { name: OURS, command: [...main, "--quiet"], modes: MODES },
    {
      name: ANCHOR,
      command: ["deno", "run", "--allow-net", "bench.ts", "--anchor", "deno"],
      modes: MODES,
    },
  ];
  if (env.node) {
    list.push({
      name: NODE,
      command: ["node", `${dir}/node_server.mjs`],
      modes: MODES,
    });
  }
  list.push({ name: OURS_LOG, command: main, modes: ["keep-alive"] });
  if (options.workers > 1) {
    const n = options.workers;
    list.push({
      name: workersName(n),
      command: [
        "deno",
        "run",
        "--allow-net",
        "--allow-read",
        "--unstable-net",
        "main.ts",
        "--port",
        "0",
        "--quiet",
        "--workers",
        String(n),
      ],
      modes: MODES,
    }, {
      name: parallelName(n),
      command: [
        "deno",
        "serve",
        "--parallel",
        "--allow-net",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        `${dir}/anchor_serve.ts`,
      ],
      env: { DENO_JOBS: String(n) },
      modes: MODES,
    });
  }
  return list;
}

const workersName = (n: number) => `ours --workers ${n}`;
const parallelName = (n: number) => `deno serve --parallel (${n})`;

async function writeHelpers(dir: string): Promise<void> {
  const benchUrl = new URL("./bench.ts", import.meta.url).href;
  await Deno.writeTextFile(`${dir}/pipeline.lua`, PIPELINE_LUA);
  await Deno.writeTextFile(`${dir}/node_server.mjs`, nodeServerSource());
  await Deno.writeTextFile(
    `${dir}/anchor_serve.ts`,
    `import { anchorHandler } from ${JSON.stringify(benchUrl)};\n` +
      `export default { fetch: anchorHandler };\n`,
  );
}

type Results = Map<string, Sample[]>;

/** One uncounted second of every mode on every server: JIT, caches, heap. */
async function warmUp(
  servers: Map<string, Server>,
  list: Contender[],
  load: Load,
): Promise<void> {
  console.error("warming up");
  for (const contender of list) {
    for (const mode of contender.modes) {
      const server = servers.get(contender.name)!;
      await runWrk(server, mode, { ...load, duration: 1 });
    }
  }
}

async function runRounds(
  servers: Map<string, Server>,
  list: Contender[],
  options: Options,
  load: Load,
): Promise<Results> {
  const results: Results = new Map();
  for (let round = 1; round <= options.rounds; round++) {
    for (const mode of MODES) {
      for (const contender of list.filter((c) => c.modes.includes(mode))) {
        const server = servers.get(contender.name)!;
        const sample = await runWrk(server, mode, load).catch((error) => {
          throw new Error(
            `${contender.name}, ${mode}: ${error.message}\n` +
              `server stderr: ${server.stderr()}`,
          );
        });
        const key = `${mode}|${contender.name}`;
        results.set(key, [...results.get(key) ?? [], sample]);
        console.error(
          `round ${round}/${options.rounds} ${mode.padEnd(10)} ` +
            `${contender.name.padEnd(28)} ${fmtInt(sample.rps)} req/s, ` +
            `p99 ${fmtMs(sample.p99)} ms, ${sample.errors} errors, ` +
            `server CPU ${fmtPercent(sample.cpu)}`,
        );
      }
    }
  }
  return results;
}

async function measureMemory(
  list: Contender[],
  count: number,
  env: Environment,
  load: Load,
): Promise<Map<string, Memory>> {
  const memory = new Map<string, Memory>();
  for (const contender of list) {
    const spec = contender.name === OURS
      ? {
        ...contender,
        command: [...contender.command, "--idle-timeout", "60"],
      }
      : contender;
    const server = await startServer(spec, env.serverPin);
    try {
      const result = await measureIdle(server, count, load);
      memory.set(contender.name, result);
      console.error(
        `memory ${contender.name}: ${result.beforeKiB} -> ${result.afterKiB}` +
          ` KiB for ${count} idle connections (${result.open} open)`,
      );
    } finally {
      await stop([server.child]);
    }
  }
  return memory;
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

/** The median of the finite values, NaN if there are none. */
function median(values: number[]): number {
  const sorted = values.filter(Number.isFinite).sort((a, b) => a - b);
  if (sorted.length === 0) return NaN;
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

function fmtMs(ms: number): string {
  return Number.isFinite(ms) ? ms.toFixed(2) : "n/a";
}

function fmtPercent(fraction: number): string {
  return `${Math.round(fraction * 100)}%`;
}

function fmtInt(n: number): string {
  return Math.round(n).toLocaleString("en-US");
}

interface Summary {
  rps: number;
  p99: number;
  errors: number;
  cpu: number;
  /** Requests per second of server CPU time. */
  perCpu: number;
}

function summarize(results: Results, mode: Mode, name: string): Summary {
  const samples = results.get(`${mode}|${name}`);
  if (!samples) return { rps: NaN, p99: NaN, errors: 0, cpu: NaN, perCpu: NaN };
  return {
    rps: median(samples.map((s) => s.rps)),
    p99: median(samples.map((s) => s.p99)),
    errors: samples.reduce((sum, s) => sum + s.errors, 0),
    cpu: median(samples.map((s) => s.cpu)),
    perCpu: median(samples.map((s) => s.rps / s.cpu)),
  };
}

/**
 * The median over rounds of `name`'s req/s divided by `base`'s in the same
 * round: the two ran back to back, so a round's noise mostly cancels.
 */
function pairedRatio(
  results: Results,
  mode: Mode,
  name: string,
  base: string,
): number {
  const a = results.get(`${mode}|${name}`) ?? [];
  const b = results.get(`${mode}|${base}`) ?? [];
  return median(a.map((sample, i) => sample.rps / (b[i]?.rps ?? NaN)));
}

function ratio(value: number): string {
  return Number.isFinite(value) ? `${value.toFixed(2)}×` : "–";
}

interface Target {
  label: string;
  pass: boolean;
}

function throughputTable(
  results: Results,
  list: Contender[],
  options: Options,
): string[] {
  const lines = [
    "| mode | server | req/s | p99 ms | errors | ÷ base | server CPU | " +
    "req/CPU-s |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  ];
  for (const mode of MODES) {
    for (const contender of list.filter((c) => c.modes.includes(mode))) {
      const s = summarize(results, mode, contender.name);
      const base = contender.name === workersName(options.workers)
        ? parallelName(options.workers)
        : contender.name === OURS_LOG
        ? OURS
        : ANCHOR;
      const shown = contender.name === ANCHOR
        ? "–"
        : ratio(pairedRatio(results, mode, contender.name, base));
      lines.push(
        `| ${mode} | ${contender.name} | ${fmtInt(s.rps)} | ` +
          `${fmtMs(s.p99)} | ${s.errors} | ${shown} | ${fmtPercent(s.cpu)} ` +
          `| ${fmtInt(s.perCpu)} |`,
      );
    }
  }
  return lines;
}

function memoryTable(memory: Map<string, Memory>): string[] {
  const lines = [
    "| server | idle connections | RSS before KiB | RSS after KiB | KiB/conn |",
    "| --- | ---: | ---: | ---: | ---: |",
  ];
  for (const [name, m] of memory) {
    lines.push(
      `| ${name} | ${m.connections} (${m.open} open) | ${m.beforeKiB} | ` +
        `${m.afterKiB} | ${m.kibPerConnection.toFixed(2)} |`,
    );
  }
  return lines;
}

function targets(results: Results, memory: Map<string, Memory>): Target[] {
  const ours = (mode: Mode) => summarize(results, mode, OURS);
  const anchor = (mode: Mode) => summarize(results, mode, ANCHOR);
  const times = (mode: Mode) => pairedRatio(results, mode, OURS, ANCHOR);
  const kib = memory.get(OURS)?.kibPerConnection ?? NaN;
  const log = pairedRatio(results, "keep-alive", OURS_LOG, OURS);
  let oursErrors = 0;
  for (const [key, samples] of results) {
    if (!key.split("|")[1].startsWith(OURS)) continue;
    for (const sample of samples) oursErrors += sample.errors;
  }
  const p99 = ours("keep-alive").p99;
  const anchorP99 = anchor("keep-alive").p99;
  return [
    {
      label: `keep-alive ≥ 1.2× anchor req/s (${
        times("keep-alive").toFixed(2)
      }×)`,
      pass: times("keep-alive") >= 1.2,
    },
    {
      label: `keep-alive p99 no worse than anchor ` +
        `(${fmtMs(p99)} vs ${fmtMs(anchorP99)} ms)`,
      pass: p99 <= anchorP99,
    },
    {
      label: `pipelined ≥ 5× anchor req/s (${times("pipelined").toFixed(2)}×)`,
      pass: times("pipelined") >= 5,
    },
    {
      label: `Connection: close ≥ 1.0× anchor req/s (${
        times("close").toFixed(2)
      }×)`,
      pass: times("close") >= 1,
    },
    {
      label: `idle memory ≤ 9 KiB per connection (${kib.toFixed(2)} KiB)`,
      pass: kib <= 9,
    },
    {
      label: `access log on ≥ 0.9× quiet req/s (${log.toFixed(2)}×)`,
      pass: log >= 0.9,
    },
    {
      label: `zero errors in every run of ours (${oursErrors})`,
      pass: oursErrors === 0,
    },
  ];
}

function report(
  env: Environment,
  options: Options,
  results: Results,
  list: Contender[],
  memory: Map<string, Memory>,
): Target[] {
  const pinning = env.wrkPin.length
    ? `wrk on CPU 0, servers on CPU ${env.serverPin[2]}`
    : "no CPU pinning (one CPU, or no taskset)";
  const checks = targets(results, memory);
  const lines = [
    `## Benchmark, ${env.date}`,
    "",
    `- ${env.deno}; node ${env.node ?? "not found"}`,
    `- CPU: ${env.cpu}; nproc ${env.nproc}; ${pinning}`,
    `- wrk, 1 thread, ${options.connections} connections, ` +
    `${options.duration} s per run, ${options.rounds} rounds, servers ` +
    `alternated; pipelined = ${PIPELINE_DEPTH} requests per write`,
    `- medians over rounds of req/s, p99, server CPU (% of one core) and ` +
    `req/s per core of server CPU; "÷ base" is the median over rounds of ` +
    `the ratio within each round (the two ran back to back); errors ` +
    `summed; wrk times a pipelined ` +
    `batch as one request and often prints no percentile for it (n/a)`,
    `- base = the anchor, \`Deno.serve\` with the same routes and hello ` +
    `page; for "ours (log)" (access log into a pipe the bench drains) it ` +
    `is ours (quiet); for "ours --workers N" it is \`deno serve --parallel\``,
    `- idle memory: growth of the server's VmRSS once it has answered one ` +
    `\`GET /\` on each idle keep-alive connection (ours: --idle-timeout 60)`,
    "",
    ...throughputTable(results, list, options),
    "",
    ...memoryTable(memory),
    "",
    ...checks.map((t) => `${t.pass ? "PASS" : "FAIL"} ${t.label}`),
  ];
  if (options.workers > 1 && options.workers >= env.nproc) {
    lines.push(
      "",
      `Note: the servers have ${Math.max(1, env.nproc - 1)} CPU(s); ` +
        `--workers ${options.workers} cannot scale here.`,
    );
  }
  console.log(lines.join("\n"));
  return checks;
}

/** Kills every subprocess and removes the helper files. */
async function cleanUp(): Promise<void> {
  await stop(children);
  const dir = tempDir;
  tempDir = undefined;
  if (dir) await Deno.remove(dir, { recursive: true }).catch(() => {});
}

async function bench(options: Options): Promise<boolean> {
  const env = await describeEnvironment();
  const dir = tempDir = await Deno.makeTempDir({ prefix: "bench-" });
  const servers = new Map<string, Server>();
  try {
    await writeHelpers(dir);
    const list = contenders(options, env, dir);
    const load: Load = {
      pin: env.wrkPin,
      connections: options.connections,
      duration: options.duration,
      luaPath: `${dir}/pipeline.lua`,
    };
    for (const contender of list) {
      const server = await startServer(contender, env.serverPin);
      servers.set(contender.name, server);
      await checkHello(server);
    }
    await warmUp(servers, list, load);
    const results = await runRounds(servers, list, options, load);
    await stop([...servers.values()].map((server) => server.child));
    servers.clear();
    const idle = await idleBudget(options.idleConnections);
    if (idle < options.idleConnections) {
      console.error(
        `open-file limit: measuring ${idle} idle connections ` +
          `(run \`ulimit -n 65536\` first for ${options.idleConnections})`,
      );
    }
    const memoryList = list.filter((c) =>
      [OURS, ANCHOR, NODE].includes(c.name)
    );
    const memory = await measureMemory(memoryList, idle, env, load);
    return report(env, options, results, list, memory).every((t) => t.pass);
  } finally {
    await cleanUp();
  }
}

/** Parses the flags, or exits 2 with the usage. */
function optionsOrExit(args: string[]): Options & { anchor?: string } {
  try {
    return parseOptions(args);
  } catch (error) {
    console.error(`error: ${(error as Error).message}\n${USAGE}`);
    Deno.exit(2);
  }
}

if (import.meta.main) {
  const options = optionsOrExit(Deno.args);
  if (options.anchor === "deno") {
    serveAnchor();
  } else if (options.anchor !== undefined) {
    throw new Error(`unknown anchor: ${options.anchor}`);
  } else {
    const interrupted = () => {
      cleanUp().finally(() => Deno.exit(130));
    };
    Deno.addSignalListener("SIGINT", interrupted);
    Deno.addSignalListener("SIGTERM", interrupted);
    const passed = await bench(options);
    Deno.removeSignalListener("SIGINT", interrupted);
    Deno.removeSignalListener("SIGTERM", interrupted);
    if (options.strict && !passed) Deno.exit(1);
  }
}
