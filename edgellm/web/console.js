// The box's console: plain JavaScript, no build step, no other origin (the page's CSP says so).
// Keys live in sessionStorage and leave only as Authorization headers; nothing here renders one.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGES = ["status", "models", "import", "chat", "connect"];
const POLL_MS = 2000;
const RATE_SAMPLES = 90; // three minutes of tokens/s at one sample per poll

function key(kind) {
  return sessionStorage.getItem(kind === "admin" ? "edgellm.admin-key" : "edgellm.api-key") || "";
}

function headers(kind, extra) {
  const h = Object.assign({}, extra || {});
  const k = key(kind) || (kind === "admin" ? "" : key("admin"));
  if (k) h.Authorization = "Bearer " + k;
  return h;
}

function say(text, ok) {
  const m = $("message");
  m.textContent = text || "";
  m.className = ok ? "ok" : "";
}

// The error's message, in OpenAI's shape ({"error": {"message"}}) or Ollama's ({"error": "..."}).
async function failure(response) {
  let message = response.status + " " + response.statusText;
  try {
    const body = await response.json();
    message = typeof body.error === "string" ? body.error : (body.error && body.error.message) || message;
  } catch (e) { /* not JSON */ }
  if (response.status === 401) message = "The key was not accepted: " + message;
  return new Error(message);
}

async function api(path, options) {
  const o = options || {};
  const response = await fetch(path, {
    method: o.method || "GET",
    headers: headers(o.admin ? "admin" : "api", o.body ? { "Content-Type": "application/json" } : {}),
    body: o.body ? JSON.stringify(o.body) : undefined,
    signal: o.signal,
  });
  if (!response.ok) throw await failure(response);
  return o.text ? response.text() : response.json();
}

function element(tag, text, attributes) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [name, value] of Object.entries(attributes || {})) e.setAttribute(name, value);
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

// --- pages ---------------------------------------------------------------------------------

function show() {
  const page = PAGES.includes(location.hash.slice(1)) ? location.hash.slice(1) : "status";
  for (const p of PAGES) $("page-" + p).hidden = p !== page;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.getAttribute("href") === "#" + page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (page === "models") refreshModels();
  if (page === "import") refreshImports();
  if (page === "chat") fillModels();
  if (page === "connect") fillConnect();
}

// --- status: /health, /metrics, and (admin) the hardware plan ------------------------------

const rates = [];
let lastTokens = null;
let budget = null; // bytes models may take (/health memory.budget)
let plan = null; // /admin/hardware, once an admin key is given
let ollamaPort = 0;

function metric(text, name) {
  let sum = null;
  for (const line of text.split("\n")) {
    if (line.startsWith(name + " ") || line.startsWith(name + "{")) {
      sum = (sum || 0) + Number(line.slice(line.lastIndexOf(" ") + 1));
    }
  }
  return sum;
}

function figures(pairs) {
  const dl = $("status-figures");
  dl.replaceChildren();
  for (const [name, value] of pairs) {
    dl.append(element("dt", name), element("dd", value, { "data-figure": name }));
  }
}

async function pollStatus() {
  if ($("page-status").hidden) return;
  const pairs = [];
  try {
    const response = await fetch("/health", { headers: headers("api") });
    const health = await response.json();
    pairs.push(["Health", response.ok ? "ok" : (health.error && health.error.message) || health.status]);
    if (health.version === undefined) { // /health tells more only to whoever could use the API
      pairs.push(["More", key("api") || key("admin") ? "the key was not accepted" : "enter the API key above"]);
      if (key("api") || key("admin")) say("The key was not accepted: check the API key.");
      figures(pairs);
      return;
    }
    if (health.uptime_seconds !== undefined) pairs.push(["Up", Math.round(health.uptime_seconds) + " s"]);
    if (health.version) pairs.push(["Version", health.version]);
    if (health.update) pairs.push(["Last update", health.update.state + ": " + health.update.message + " (" + health.update.at + ")"]);
    if (health.memory) pairs.push(["Memory", bytes(health.memory.used) + " used, " + bytes(health.memory.available) + " available"]);
    if (health.temperature_celsius !== undefined) pairs.push(["Temperature", health.temperature_celsius.toFixed(1) + " °C"]);
    if (health.throttled !== undefined) pairs.push(["Throttling", health.throttled ? "yes: " + (health.throttle_flags || []).join(", ") : "no"]);
    if (health.memory) budget = health.memory.budget;
    if (health.ollama_port !== undefined) ollamaPort = health.ollama_port;
    if (key("admin") && !plan) {
      plan = await api("/admin/hardware", { admin: true }).catch(() => null);
    }
    if (plan) {
      const hw = plan.hardware;
      const cores = hw.cpu.clusters.map((c) => c.cores + " × " + c.core).join(", ");
      pairs.push(["CPU", hw.cpu.arch + ", " + (cores || hw.cpu.logical + " CPUs")]);
      pairs.push(["GPU", hw.gpus.length ? hw.gpus.map((g) => g.name + " (" + g.api + ")").join(", ") : "none"]);
      pairs.push(["Backend", plan.plan.steps.map((step) => step.backend).join(", then ") + ", " + plan.plan.threads + " threads"]);
      pairs.push(["Why", plan.plan.reasons.join("; ")]);
    }
    const text = await api("/metrics", { text: true });
    const tokens = metric(text, "edgellm_generated_tokens_total") || 0;
    const now = performance.now();
    if (lastTokens) rates.push((tokens - lastTokens.tokens) / ((now - lastTokens.at) / 1000));
    lastTokens = { tokens, at: now };
    while (rates.length > RATE_SAMPLES) rates.shift();
    pairs.push(["Requests running", metric(text, "edgellm_running_sequences") || 0]);
    pairs.push(["Requests queued", metric(text, "edgellm_queue_depth") || 0]);
    pairs.push(["Tokens/s", rates.length ? rates[rates.length - 1].toFixed(1) : "–"]);
    pairs.push(["Tokens generated", tokens]);
    drawRates();
    say("");
  } catch (e) {
    say(e.message);
  }
  figures(pairs);
}

function drawRates() {
  const top = Math.max(1, ...rates);
  const step = 300 / Math.max(1, RATE_SAMPLES - 1);
  $("rate-line").setAttribute("points", rates.map((r, i) => (i * step).toFixed(1) + "," + (78 - (r / top) * 74).toFixed(1)).join(" "));
  $("rate-span").textContent = String(Math.round(rates.length * POLL_MS / 1000));
}

// --- models: /admin/models, and its actions --------------------------------------------------

async function refreshModels() {
  const list = $("models-list");
  try {
    const { data } = await api("/admin/models", { admin: true });
    const scale = budget || Math.max(1, ...data.map((m) => m.estimate_bytes || 0));
    const table = element("table");
    const head = element("tr");
    for (const h of ["Model", "Size", "State", "Memory", "Last use", "Expires", "Tool calls", ""]) head.append(element("th", h));
    table.append(head);
    for (const m of data) {
      const row = element("tr", null, { "data-model": m.id });
      row.append(element("td", m.id + (m.aliases && m.aliases.length ? " (" + m.aliases.join(", ") + ")" : "")));
      row.append(element("td", bytes(m.size)));
      row.append(element("td", m.state + (m.failure ? ": " + m.failure : ""), { "data-state": m.state }));
      const memory = element("td", bytes(m.estimate_bytes) + " estimated" +
                             (m.rss_delta_bytes ? ", " + bytes(m.rss_delta_bytes) + " measured" : ""));
      const bar = element("div", null, { class: "bar", role: "img", "aria-label": "memory against the budget" });
      const fill = element("span");
      fill.style.width = Math.min(100, Math.round(100 * (m.rss_delta_bytes || m.estimate_bytes || 0) / scale)) + "%";
      bar.append(fill);
      memory.append(bar);
      row.append(memory, element("td", m.last_used || "–"), element("td", m.expires_at || "–"),
                 element("td", m.tool_call_format || "–"));
      const actions = element("td");
      for (const [label, method, path] of [["Load", "POST", "/load"], ["Unload", "POST", "/unload"], ["Remove", "DELETE", ""]]) {
        const b = element("button", label, { type: "button", class: "secondary" });
        b.addEventListener("click", () => modelAction(m.id, label, method, path));
        actions.append(b);
      }
      row.append(actions);
      table.append(row);
    }
    list.replaceChildren(table);
  } catch (e) {
    list.replaceChildren(element("p", e.message));
  }
}

async function modelAction(id, label, method, path) {
  if (label === "Remove" && !confirm("Remove " + id + " from this box?")) return;
  try {
    await api("/admin/models/" + encodeURIComponent(id) + path, { method, admin: true });
    say(label + ": " + id, true);
  } catch (e) {
    say(e.message);
  }
  refreshModels();
}

// --- import: POST /admin/bundles, progress from its server-sent events ---------------------------

async function refreshImports() {
  const list = $("import-history");
  try {
    const { data } = await api("/admin/imports", { admin: true });
    list.replaceChildren(...data.map((i) => element("li", i.time + " " + i.source + ": " + i.outcome +
      (i.models.length ? " (" + i.models.map((m) => m.id + " " + m.status).join(", ") + ")" : ""))));
    if (!data.length) list.replaceChildren(element("li", "No imports yet."));
  } catch (e) {
    list.replaceChildren(element("li", e.message));
  }
}

function importBundle(event) {
  event.preventDefault();
  const file = $("bundle-file").files[0];
  const result = $("import-result");
  const bar = $("import-progress");
  if (!file) { result.textContent = "Choose a bundle file first."; return; }
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/admin/bundles");
  const h = headers("admin", { "Content-Type": "application/x-tar" });
  for (const [name, value] of Object.entries(h)) xhr.setRequestHeader(name, value);
  let seen = 0;
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) { bar.max = e.total; bar.value = e.loaded; } };
  xhr.onprogress = () => {
    const text = xhr.responseText;
    const end = text.lastIndexOf("\n\n");
    if (end < seen) return;
    for (const block of text.slice(seen, end).split("\n\n")) {
      const name = (block.match(/^event: (.*)$/m) || [])[1];
      const data = (block.match(/^data: (.*)$/m) || [])[1];
      if (!data) continue;
      const value = JSON.parse(data);
      if (name === "progress") { bar.max = value.total || 1; bar.value = value.done; result.textContent = "Checking " + value.file + "…"; }
      if (name === "done") result.textContent = "Imported: " + value.models.map((m) => m.id + " (" + m.status + ")").join(", ");
      if (name === "error") result.textContent = "Refused: " + (value.error.message || value.error);
    }
    seen = end + 2;
  };
  xhr.onloadend = refreshImports;
  xhr.onload = () => {
    if (xhr.status !== 200) {
      try { result.textContent = "Refused: " + JSON.parse(xhr.responseText).error.message; }
      catch (e) { result.textContent = "Refused: " + xhr.status; }
    } else {
      xhr.onprogress();
    }
  };
  xhr.onerror = () => { result.textContent = "The upload failed: the connection ended."; };
  result.textContent = "Uploading…";
  xhr.send(file);
}

// --- chat: streamed /v1/chat/completions (or /v1/completions for base models) ---------------------

let controller = null;

async function fillModels() {
  try {
    const { data } = await api("/v1/models");
    const select = $("chat-model");
    const current = select.value;
    select.replaceChildren(...data.map((m) => element("option", m.id, { value: m.id })));
    if (current) select.value = current;
  } catch (e) {
    say(e.message);
  }
}

async function chat(event) {
  event.preventDefault();
  const input = $("chat-input");
  const plain = $("chat-plain").checked;
  const log = $("chat-log");
  log.append(element("p", input.value, { class: "you" }));
  const out = element("p", "", { class: "reply" });
  log.append(out);
  const common = { model: $("chat-model").value, stream: true, temperature: Number($("chat-temperature").value),
                   max_tokens: Number($("chat-max").value), stream_options: { include_usage: true } };
  const messages = [];
  if ($("chat-system").value) messages.push({ role: "system", content: $("chat-system").value });
  messages.push({ role: "user", content: input.value });
  const body = plain ? Object.assign({ prompt: input.value }, common) : Object.assign({ messages }, common);
  controller = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  const sent = performance.now();
  let first = null;
  let tokens = 0; // the usage's count when the reply ends; until then, the pieces seen
  let pieces = 0;
  try {
    const response = await fetch(plain ? "/v1/completions" : "/v1/chat/completions", {
      method: "POST", headers: headers("api", { "Content-Type": "application/json" }), body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw await failure(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: {")) continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        const choice = chunk.choices && chunk.choices[0];
        const text = choice && (plain ? choice.text : choice.delta && choice.delta.content);
        if (text) { first = first || performance.now(); out.textContent += text; pieces++; }
      }
      stats(sent, first, tokens || pieces);
    }
    stats(sent, first, tokens || pieces);
  } catch (e) {
    if (e.name === "AbortError") out.append(element("em", " (stopped)"));
    else say(e.message);
  } finally {
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
    controller = null;
  }
}

function stats(sent, first, tokens) {
  if (!first) return;
  const ttft = ((first - sent) / 1000).toFixed(2);
  const seconds = (performance.now() - first) / 1000;
  $("chat-stats").textContent = "First token after " + ttft + " s" +
    (tokens && seconds > 0 ? ", " + (tokens / seconds).toFixed(1) + " tokens/s" : "");
}

// --- connect ---------------------------------------------------------------------------------

async function fillConnect() {
  const base = location.origin + "/v1";
  $("connect-url").textContent = base;
  // /health tells its details to whoever could use the API: with none asked for, no key is needed.
  const open = (await (await fetch("/health")).json()).version !== undefined;
  $("connect-key").textContent = open ? "not needed" : "needed: the API key (Authorization: Bearer KEY)";
  const keyArg = open ? '"unused"' : '"YOUR-API-KEY"';
  $("snippet-openai").textContent = 'from openai import OpenAI\n\nclient = OpenAI(base_url="' + base + '", api_key=' +
    keyArg + ')\nprint(client.chat.completions.create(model="MODEL", messages=[{"role": "user", "content": "Hello"}])' +
    '.choices[0].message.content)';
  $("snippet-curl").textContent = "curl " + base + "/chat/completions" + (open ? "" : " -H 'Authorization: Bearer YOUR-API-KEY'") +
    " -H 'Content-Type: application/json' -d '{\"model\": \"MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'";
  const ollamaHost = ollamaPort ? location.protocol + "//" + location.hostname + ":" + ollamaPort : location.origin;
  $("snippet-ollama").textContent = 'from ollama import Client\n\nbox = Client(host="' + ollamaHost + '"' +
    (open ? "" : ', headers={"Authorization": "Bearer YOUR-API-KEY"}') + ')\nprint(box.chat(model="MODEL", messages=' +
    '[{"role": "user", "content": "Hello"}]).message.content)';
}

// --- wiring ------------------------------------------------------------------------------------

function start() {
  $("keys").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("edgellm.api-key", $("api-key").value);
    sessionStorage.setItem("edgellm.admin-key", $("admin-key").value);
    $("api-key").value = "";
    $("admin-key").value = "";
    say("Keys kept for this tab.", true);
    show();
  });
  $("import-form").addEventListener("submit", importBundle);
  $("chat-form").addEventListener("submit", chat);
  $("chat-stop").addEventListener("click", () => controller && controller.abort());
  window.addEventListener("hashchange", show);
  show();
  pollStatus();
  setInterval(pollStatus, POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);
