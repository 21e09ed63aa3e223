#!/usr/bin/env node
// Runs the built Worker (edge/worker/build/index.js, made by edge/worker/build.sh) under
// Miniflare on 127.0.0.1, for local runs and tests.
//
// stdout carries exactly one line, `READY http://127.0.0.1:PORT`, once Miniflare is ready;
// everything else (Miniflare's log, the Worker's console output) goes to stderr.
// SIGTERM / SIGINT dispose Miniflare (and its workerd) and exit 0.
//
// Options: argv `--name value` (or `--name=value`) or the env var in brackets.
//   --port N              [WORKER_PORT]            default 8787; 0 picks a free port
//   --persist DIR         [WORKER_PERSIST_DIR]     Durable Object storage dir (default: in memory)
//   --script FILE         [WORKER_SCRIPT]          default <this dir>/build/index.js
//   --bindings JSON       [WORKER_BINDINGS_JSON]   {"NAME": "value", ...} vars and secrets
//   --bindings-file FILE  [WORKER_BINDINGS_FILE]   same, read from a JSON file (JSON wins on clashes)
//   --do-class NAME       [WORKER_DO_CLASS]        default EdgeDurableObject (the Rust struct name)
//   --do-binding NAME     [WORKER_DO_BINDING]      default EDGE
//   --do-sqlite 0|1       [WORKER_DO_SQLITE]       default 1 (matches `new_sqlite_classes`)
//   --worker-name NAME    [WORKER_NAME]            default claude-runner-edge (part of the storage path)
//   --compat-date DATE    [WORKER_COMPAT_DATE]     default: the repository's wrangler.toml's
//   --compat-flags a,b    [WORKER_COMPAT_FLAGS]    default: the repository's wrangler.toml's
//                                                  (so tests run the Worker as it deploys)
//   --log-level LEVEL     [WORKER_LOG_LEVEL]       none|error|warn|info|debug (default info)
// Miniflare is loaded from MINIFLARE_PATH (the miniflare package dir, its entry file, or a
// node_modules dir holding it), else $WORKER_TOOLS_DIR/node/node_modules/miniflare
// (default ~/.cache/claude-runner-worker, where build.sh installs wrangler).

import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath, pathToFileURL } from "node:url";

process.env.WRANGLER_SEND_METRICS = "false";
const HERE = path.dirname(fileURLToPath(import.meta.url));

function fail(msg) {
  process.stderr.write(`[miniflare-host] ERROR: ${msg}\n`);
  process.exit(1);
}
function note(msg) {
  process.stderr.write(`[miniflare-host] ${msg}\n`);
}

// ---------------------------------------------------------------- options
const argv = process.argv.slice(2);
const flags = {};
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  if (a === "-h" || a === "--help") {
    const src = fs.readFileSync(fileURLToPath(import.meta.url), "utf8").split("\n");
    const head = [];
    for (const l of src.slice(1)) { if (!l.startsWith("//")) break; head.push(l.replace(/^\/\/ ?/, "")); }
    process.stderr.write(head.join("\n") + "\n");
    process.exit(0);
  }
  if (!a.startsWith("--")) fail(`unexpected argument ${JSON.stringify(a)} (see --help)`);
  const eq = a.indexOf("=");
  if (eq > 0) flags[a.slice(2, eq)] = a.slice(eq + 1);
  else {
    if (i + 1 >= argv.length) fail(`${a} needs a value`);
    flags[a.slice(2)] = argv[++i];
  }
}
const KNOWN = {
  port: "WORKER_PORT", persist: "WORKER_PERSIST_DIR", script: "WORKER_SCRIPT",
  bindings: "WORKER_BINDINGS_JSON", "bindings-file": "WORKER_BINDINGS_FILE",
  "do-class": "WORKER_DO_CLASS", "do-binding": "WORKER_DO_BINDING", "do-sqlite": "WORKER_DO_SQLITE",
  "worker-name": "WORKER_NAME", "compat-date": "WORKER_COMPAT_DATE",
  "compat-flags": "WORKER_COMPAT_FLAGS", "log-level": "WORKER_LOG_LEVEL",
};
for (const k of Object.keys(flags)) if (!(k in KNOWN)) fail(`unknown option --${k} (see --help)`);
const opt = (name, dflt) => {
  const v = flags[name] ?? process.env[KNOWN[name]];
  return v === undefined || v === "" ? dflt : v;
};

const port = Number(opt("port", "8787"));
if (!Number.isInteger(port) || port < 0 || port > 65535) fail(`bad port ${opt("port")}`);
const scriptPath = path.resolve(opt("script", path.join(HERE, "build", "index.js")));
if (!fs.existsSync(scriptPath)) fail(`${scriptPath} not found: run edge/worker/build.sh first`);
const persistDir = opt("persist", undefined);
const doClass = opt("do-class", "EdgeDurableObject");
const doBinding = opt("do-binding", "EDGE");
const doSqlite = !["0", "false", "no"].includes(String(opt("do-sqlite", "1")).toLowerCase());
const workerName = opt("worker-name", "claude-runner-edge");
// What wrangler.toml deploys with (its top-level `compatibility_date` and
// `compatibility_flags`), unless told otherwise.
function deployed() {
  let text = "";
  try { text = fs.readFileSync(path.join(HERE, "..", "..", "wrangler.toml"), "utf8"); } catch { /* none: defaults */ }
  const top = text.split(/^\[/m)[0];
  const date = top.match(/^compatibility_date\s*=\s*"([^"]*)"/m)?.[1] ?? "2025-01-01";
  const list = top.match(/^compatibility_flags\s*=\s*\[([^\]]*)\]/m)?.[1] ?? "";
  const flags = [...list.matchAll(/"([^"]*)"/g)].map((m) => m[1]);
  return { date, flags: flags.join(",") };
}
const compatibilityDate = opt("compat-date", deployed().date);
const compatibilityFlags = opt("compat-flags", deployed().flags).split(",").map((s) => s.trim()).filter(Boolean);

function parseBindings(text, where) {
  let v;
  try { v = JSON.parse(text); } catch (e) { fail(`${where} is not valid JSON: ${e.message}`); }
  if (v === null || typeof v !== "object" || Array.isArray(v)) fail(`${where} must be a JSON object`);
  return v;
}
const bindings = {};
const bindingsFile = opt("bindings-file", undefined);
if (bindingsFile) {
  let text;
  try { text = fs.readFileSync(bindingsFile, "utf8"); } catch (e) { fail(`cannot read ${bindingsFile}: ${e.message}`); }
  Object.assign(bindings, parseBindings(text, bindingsFile));
}
const bindingsJson = opt("bindings", undefined);
if (bindingsJson) Object.assign(bindings, parseBindings(bindingsJson, "WORKER_BINDINGS_JSON/--bindings"));

// ---------------------------------------------------------------- find miniflare
async function loadMiniflare() {
  const tools = process.env.WORKER_TOOLS_DIR || path.join(os.homedir(), ".cache", "claude-runner-worker");
  const candidates = [];
  if (process.env.MINIFLARE_PATH) candidates.push(path.resolve(process.env.MINIFLARE_PATH));
  candidates.push(path.join(tools, "node", "node_modules", "miniflare"));
  for (const c of candidates) {
    let entry;
    try {
      const st = fs.statSync(c);
      if (st.isFile()) entry = c;
      else {
        const pkgDir = fs.existsSync(path.join(c, "package.json")) && !fs.existsSync(path.join(c, "miniflare"))
          ? c
          : path.join(c, "miniflare");
        entry = createRequire(path.join(pkgDir, "package.json")).resolve(pkgDir);
      }
    } catch {
      continue;
    }
    return { mod: await import(pathToFileURL(entry).href), from: entry };
  }
  try {
    return { mod: await import("miniflare"), from: "node resolution" };
  } catch {
    fail(`miniflare not found (tried ${candidates.join(", ")}); run edge/worker/build.sh ` +
      `(it installs wrangler into $WORKER_TOOLS_DIR/node) or set MINIFLARE_PATH`);
  }
}
const { mod, from } = await loadMiniflare();
const { Miniflare, Log, LogLevel } = mod.default?.Miniflare ? mod.default : mod;
if (!Miniflare) fail(`${from} does not export Miniflare`);

const levelName = String(opt("log-level", "info")).toUpperCase();
if (!(levelName in LogLevel)) fail(`bad log level ${levelName}`);
class StderrLog extends Log {
  log(message) { process.stderr.write(`${message}\n`); }
}
const pipeToStderr = (stream) => stream.on("data", (chunk) => process.stderr.write(chunk));

// ---------------------------------------------------------------- start
const options = {
  name: workerName,
  scriptPath,
  modules: true,
  // Module names are paths relative to modulesRoot (default: the cwd); workerd refuses "..".
  modulesRoot: path.dirname(scriptPath),
  modulesRules: [
    { type: "ESModule", include: ["**/*.js", "**/*.mjs"] },
    { type: "CompiledWasm", include: ["**/*.wasm"] },
  ],
  compatibilityDate,
  compatibilityFlags,
  bindings,
  durableObjects: { [doBinding]: { className: doClass, useSQLite: doSqlite } },
  host: "127.0.0.1",
  port,
  cf: false,
  log: new StderrLog(LogLevel[levelName]),
  handleRuntimeStdio(stdout, stderr) { pipeToStderr(stdout); pipeToStderr(stderr); },
};
if (persistDir) {
  fs.mkdirSync(persistDir, { recursive: true });
  options.durableObjectsPersist = path.resolve(persistDir);
}

let mf;
let stopping = false;
async function stop(code, why) {
  if (stopping) {
    if (why) { note(`${why} again: exiting without waiting`); process.exit(code || 1); }
    return;
  }
  stopping = true;
  if (why) note(why);
  // If dispose hangs, exit anyway: Miniflare's process 'exit' hook still kills workerd.
  setTimeout(() => { note("dispose timed out"); process.exit(1); }, 10_000).unref();
  try { await mf?.dispose(); } catch (e) { note(`dispose failed: ${e?.stack ?? e}`); code ||= 1; }
  // dispose() deletes Miniflare's /tmp/miniflare-* dir without awaiting it: let the event
  // loop drain instead of process.exit() at once (the unref'd timer only fires if it doesn't).
  process.exitCode = code;
  setTimeout(() => process.exit(code), 3_000).unref();
}
const onSignal = {
  SIGTERM: () => stop(0, "SIGTERM: stopping"),
  SIGINT: () => stop(0, "SIGINT: stopping"),
  SIGHUP: () => stop(0, "SIGHUP: stopping"),
};
for (const [sig, fn] of Object.entries(onSignal)) process.on(sig, fn);
// Miniflare adds its own SIGINT/SIGTERM listeners when workerd starts; they kill workerd and
// process.exit(128+n) at once, before an async dispose could run. Keep only ours (its
// process 'exit' hook stays, as a last resort).
function ownSignals() {
  for (const [sig, fn] of Object.entries(onSignal)) {
    for (const l of process.listeners(sig)) if (l !== fn) process.removeListener(sig, l);
  }
}
process.on("uncaughtException", (e) => { note(`uncaught: ${e?.stack ?? e}`); stop(1); });
process.on("unhandledRejection", (e) => { note(`unhandled rejection: ${e?.stack ?? e}`); stop(1); });

try {
  mf = new Miniflare(options);
  const url = await mf.ready;
  ownSignals();
  if (stopping) await new Promise(() => {});
  note(`worker ${scriptPath} (DO ${doBinding} -> ${doClass}${doSqlite ? ", sqlite" : ""}` +
    `${persistDir ? `, persist ${options.durableObjectsPersist}` : ", in-memory storage"}; ` +
    `compatibility ${compatibilityDate}${compatibilityFlags.length ? ` + ${compatibilityFlags.join(",")}` : ""}; miniflare from ${from})`);
  process.stdout.write(`READY http://127.0.0.1:${url.port}\n`);
} catch (e) {
  note(`failed to start: ${e?.stack ?? e}`);
  await stop(1);
}
