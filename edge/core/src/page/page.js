"use strict";
// The runner's phone page. The secret lives in `secret` below and nowhere else: it goes
// out only as the X-Runner-Secret header of requests to this same edge.
(function () {
  let secret = "";
  let loginId = null;
  let timer = null;
  // The page may sit under a pool prefix (/pool/NAME/); every route is relative to it.
  // One leading slash, always: opened at `//` the base would make `//health` a request to
  // a host named `health`, secret and all.
  const path = location.pathname.split("/").filter(Boolean).join("/");
  const base = path ? "/" + path + "/" : "/";
  const $ = (id) => document.getElementById(id);

  function show(id, on) { $(id).hidden = !on; }
  function say(id, text, cls) { const el = $(id); el.textContent = text; el.className = cls || ""; }
  function fail(text) { $("error").textContent = text; show("error", !!text); }

  async function call(method, path, body) {
    const init = { method, headers: { "X-Runner-Secret": secret }, cache: "no-store", credentials: "omit" };
    if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
    const resp = await fetch(base + path, init);
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    return { status: resp.status, data };
  }

  function hours(h) { return h === null || h === undefined ? "" : (h >= 1 ? Math.floor(h) + " h" : Math.round(h * 60) + " min"); }
  function when(iso) { return iso ? new Date(iso).toLocaleString([], { hour: "2-digit", minute: "2-digit", day: "numeric", month: "short" }) : "?"; }

  function renderStatus(health, oauth) {
    const agent = health.agent;
    const agents = health.agents || [];
    if (agents.length > 1 || agents.some((a) => a.paused || a.stopping || !a.connected)) {
      // Many agents: each with its state and load; paused, stopping and down ones say so.
      const line = (a) => a.agent_id + " " + (!a.connected ? "down" : a.paused ? "paused" : a.stopping ? "stopping" : a.takes_work ? "online" : "cannot work")
        + (a.connected ? " (" + a.running_jobs + "/" + a.capacity + " running)" : "");
      say("agent-state", agents.map(line).join("; "), agents.some((a) => a.takes_work) ? "ok" : "bad");
    } else if (agent) say("agent-state", "online: " + agent.agent_id + " (" + agent.running_jobs + "/" + agent.capacity + " running)", "ok");
    else say("agent-state", "offline: no agent is connected", "bad");
    const o = oauth || health.oauth;
    if (!o) say("login-state", "unknown (no agent has reported yet)", "warn");
    else if (o.needs_login) say("login-state", "needs a new login", "bad");
    else if (health.status === "degraded" && !health.usage) say("login-state", "works, needs attention soon" + (o.hours_remaining != null ? " (" + hours(o.hours_remaining) + " left)" : ""), "warn");
    else say("login-state", "works" + (o.hours_remaining != null ? (o.refreshable ? " (refreshes itself)" : " (" + hours(o.hours_remaining) + " left)") : ""), "ok");
    const u = health.usage;
    if (!u) say("usage-state", "no limit reported", "ok");
    else if (u.status === "rejected") say("usage-state", "used up until " + when(u.resets_at) + (u.type ? " (" + u.type + ")" : ""), "bad");
    else if (u.status === "allowed_warning") say("usage-state", "nearly used up" + (u.utilization != null ? " (" + Math.round(u.utilization * 100) + " %)" : "") + ", resets " + when(u.resets_at), "warn");
    else say("usage-state", "available", "ok");
    const next = o && o.next_step;
    $("next-step").textContent = next || "";
    show("next-step", !!next);
  }

  function jobItem(job, cancellable) {
    const li = document.createElement("li");
    li.className = "job";
    li.dataset.job = job.job_id;
    const state = document.createElement("span");
    state.className = "state " + ({ succeeded: "ok", running: "ok", queued: "warn", dispatched: "warn" }[job.state] || "bad");
    state.textContent = job.state;
    const prompt = document.createElement("span");
    prompt.className = "prompt";
    prompt.textContent = job.prompt || job.job_id;
    prompt.title = (job.result && job.result.error) || job.prompt || "";
    li.append(state, prompt);
    if (cancellable) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "cancel secondary";
      b.textContent = "Cancel";
      b.addEventListener("click", async () => {
        b.disabled = true;
        const r = await call("DELETE", "jobs/" + encodeURIComponent(job.job_id));
        if (r.status >= 400) fail((r.data && r.data.error) || "cancel failed (" + r.status + ")");
        await refresh();
      });
      li.append(b);
    }
    return li;
  }

  function renderJobs(list) {
    $("active").replaceChildren(...list.active.map((j) => jobItem(j, true)));
    $("finished").replaceChildren(...list.finished.map((j) => jobItem(j, false)));
    if (!list.active.length) { const li = document.createElement("li"); li.textContent = "nothing running or waiting"; $("active").append(li); }
  }

  async function refresh() {
    try {
      // With the secret, /health answers its full body (without it an edge may say only
      // the status).
      const health = (await call("GET", "health")).data || {};
      const oauth = await call("GET", "oauth/status");
      if (oauth.status === 403) { secret = ""; show("unlock", true); fail("That secret was refused; enter the runner secret again."); return false; }
      renderStatus(health, oauth.status === 200 ? oauth.data : null);
      const jobs = await call("GET", "jobs");
      if (jobs.status === 200) renderJobs(jobs.data);
      fail("");
      return true;
    } catch (e) {
      fail("The edge could not be reached (" + e.message + "); retrying.");
      return false;
    }
  }

  $("connect").addEventListener("click", async () => {
    secret = $("secret").value.trim();
    $("secret").value = "";
    if (!secret) { fail("Enter the runner secret."); return; }
    if (await refresh()) {
      show("unlock", false);
      ["status", "login", "jobs", "refresh"].forEach((id) => show(id, true));
      clearInterval(timer);
      timer = setInterval(refresh, 5000);
    }
  });
  $("secret").addEventListener("keydown", (e) => { if (e.key === "Enter") $("connect").click(); });
  $("refresh").addEventListener("click", refresh);

  $("relogin").addEventListener("click", async () => {
    $("relogin").disabled = true;
    say("login-result", "Starting the login on the runner…");
    try {
      const r = await call("POST", "oauth/login", {});
      // The edge passes on only a sign-in page of Anthropic's, and names its host: shown
      // plainly, so the person sees where the link goes before opening it.
      if (r.status === 200 && r.data && r.data.url && r.data.host) {
        loginId = r.data.login_id;
        $("login-url").href = r.data.url;
        $("login-url").textContent = "Open the sign-in page";
        $("login-host").textContent = " on " + r.data.host + " (Anthropic's)";
        show("login-steps", true);
        say("login-result", "Waiting for the code (the login is given up at " + when(r.data.expires_at) + ").");
      } else {
        say("login-result", (r.data && r.data.error) || "The login could not start (" + r.status + ").", "bad");
      }
    } finally { $("relogin").disabled = false; }
  });

  $("send-code").addEventListener("click", async () => {
    const code = $("code").value.trim();
    if (!code || !loginId) { say("login-result", "Paste the code the sign-in page showed.", "bad"); return; }
    $("send-code").disabled = true;
    say("login-result", "Checking the code…");
    try {
      const r = await call("POST", "oauth/login/code", { login_id: loginId, code });
      if (r.status === 200 && r.data && r.data.state === "logged_in") {
        $("code").value = "";
        show("login-steps", false);
        loginId = null;
        say("login-result", "Logged in" + (r.data.oauth && r.data.oauth.subscription_type ? " (" + r.data.oauth.subscription_type + ")" : "") + ". Work runs again.", "ok");
        await refresh();
      } else {
        say("login-result", (r.data && r.data.error) || "The login failed (" + r.status + ").", "bad");
        show("login-steps", false);
        loginId = null;
      }
    } finally { $("send-code").disabled = false; }
  });
})();
