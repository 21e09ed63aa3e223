#!/usr/bin/env node
// Drives the edge's phone page (GET /) in real headless Chromium, as a person on a phone
// would, for tests/tests/page.rs. Debian's `chromium` is driven by npm's `playwright-core`
// through `executablePath` (no browser download).
//
//   node tests/page/page.mjs SCENARIO
//
// Environment: PAGE_URL (the edge), RUNNER_SECRET, SCREENSHOTS (a folder), CHROMIUM (the
// browser binary), PLAYWRIGHT_CORE (the package's folder), LOGIN_CODE (relogin), PAGE_PATH
// (where to open the page, `/` unless set).
// Scenarios:
//   offline  the page loads under its CSP, takes the secret, and shows the agent offline
//   relogin  the agent needs a login: the page walks through it (URL, code, outcome),
//            then cancels the job that was waiting for it once it runs
//   paused   two agents, `spark2` paused by the operator: each is listed with its state
// Prints one line per step; exits non-zero (with the reason) on the first failure.
// Screenshots are taken at 390×844 (a phone) into SCREENSHOTS.

import { createRequire } from "node:module";
import path from "node:path";
import fs from "node:fs";

const require = createRequire(import.meta.url);
const { chromium } = require(process.env.PLAYWRIGHT_CORE);
const [scenario] = process.argv.slice(2);
const url = process.env.PAGE_URL;
const shots = process.env.SCREENSHOTS;
fs.mkdirSync(shots, { recursive: true });

function fail(msg) { console.error("FAIL: " + msg); process.exit(1); }
function step(msg) { console.log("step: " + msg); }

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM,
  // As root, with this machine's closed network: no sandbox, no background traffic.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const problems = [];
try {
  const context = await browser.newContext({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true });
  const page = await context.newPage();
  // Each wait only bounds a hang: Chromium and the debug edge and agent on a loaded machine
  // (the page refreshes every 5 s) may take longer than Playwright's 30 s default.
  page.setDefaultTimeout(60000);
  const origin = new URL(url).origin;
  // Every console error (a CSP violation shows as one) and every request elsewhere fails.
  // (An HTTP error answer the page handles, such as /health's 503 while offline, is
  // logged by Chromium as "Failed to load resource"; that is not a problem.)
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource: the server responded with a status of")) problems.push("console: " + m.text());
  });
  page.on("response", (r) => { if (r.status() === 404) problems.push("404 for " + r.url()); });
  page.on("pageerror", (e) => problems.push("page error: " + e.message));
  page.on("request", (r) => { if (!r.url().startsWith(origin) && !r.url().startsWith("data:")) problems.push("request elsewhere: " + r.url()); });
  const shot = async (name) => { await page.screenshot({ path: path.join(shots, name + ".png"), fullPage: true }); step("screenshot " + name); };

  // PAGE_PATH: where the page is opened (a link someone sent may name any path that
  // serves it; its requests must still go to this edge).
  const resp = await page.goto(url + (process.env.PAGE_PATH || "/"), { waitUntil: "load" });
  if (resp.status() !== 200) fail("GET / answered " + resp.status());
  const csp = resp.headers()["content-security-policy"] || "";
  if (!csp.startsWith("default-src 'none'")) fail("no strict CSP: " + csp);
  await shot(scenario + "-1-secret");
  // A wrong secret is refused and asked again.
  await page.fill("#secret", "not-the-secret-0000");
  await page.click("#connect");
  await page.waitForSelector("#error:not([hidden])");
  if (!(await page.textContent("#error")).includes("refused")) fail("a wrong secret was not refused");
  await page.fill("#secret", process.env.RUNNER_SECRET);
  await page.click("#connect");
  await page.waitForSelector("#status:not([hidden])");
  // The secret lives in memory only.
  const kept = await page.evaluate(() => [localStorage.length, sessionStorage.length, document.cookie, location.href]);
  if (kept[0] || kept[1] || kept[2] || kept[3].includes(process.env.RUNNER_SECRET)) fail("the secret left the page's memory: " + JSON.stringify(kept));
  if ((await page.inputValue("#secret")) !== "") fail("the secret stayed in the input");

  if (scenario === "offline") {
    await page.waitForFunction(() => document.querySelector("#agent-state").textContent.includes("offline"));
    step("agent shown offline: " + (await page.textContent("#agent-state")));
    await shot("offline-2-status");
  } else if (scenario === "relogin") {
    await page.waitForFunction(() => document.querySelector("#login-state").textContent.includes("needs a new login"));
    await page.waitForFunction(() => document.querySelector("#active .job .state")?.textContent === "queued");
    step("login shown broken, the held job queued");
    await shot("relogin-2-needs-login");
    await page.click("#relogin");
    await page.waitForSelector("#login-steps:not([hidden])");
    const href = await page.getAttribute("#login-url", "href");
    if (!href || !href.startsWith("https://") || !href.includes("/oauth/authorize")) fail("no sign-in URL: " + href);
    const host = await page.textContent("#login-host");
    if (!host.includes(new URL(href).host)) fail("the sign-in page's host is not shown: " + host);
    step("sign-in URL shown, on " + host);
    await page.fill("#code", process.env.LOGIN_CODE);
    await shot("relogin-3-code");
    await page.click("#send-code");
    await page.waitForFunction(() => document.querySelector("#login-result").textContent.startsWith("Logged in"), null, { timeout: 60000 });
    step("logged in: " + (await page.textContent("#login-result")));
    await page.waitForFunction(() => document.querySelector("#login-state").textContent.startsWith("works"), null, { timeout: 60000 });
    // The held job runs now; cancel it from the page.
    await page.waitForFunction(() => document.querySelector("#active .job .state")?.textContent === "running", null, { timeout: 60000 });
    await shot("relogin-4-running");
    await page.click("#active .job .cancel");
    await page.waitForFunction(() => document.querySelector("#finished .job .state")?.textContent === "cancelled", null, { timeout: 60000 });
    step("job cancelled from the page");
    await shot("relogin-5-cancelled");
  } else if (scenario === "paused") {
    await page.waitForFunction(() => {
      const t = document.querySelector("#agent-state").textContent;
      return /\bspark online\b/.test(t) && /\bspark2 paused\b/.test(t);
    }, null, { timeout: 60000 });
    step("agents shown: " + (await page.textContent("#agent-state")));
    await shot("paused-2-agents");
  } else {
    fail("unknown scenario " + scenario);
  }
  if (problems.length) fail(problems.join("\n"));
  console.log("ok");
} catch (e) {
  fail((e && e.stack) || String(e));
} finally {
  await browser.close();
}
