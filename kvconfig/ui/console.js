// The kvconfig web console.  Plain JavaScript, no build step, no library:
// it talks only to the JSON API under /v1/ of the server that served it
// (kvconfig/http.py documents the API), and follows changes live over its
// server-sent events (/v1/watch).
"use strict";

const state = {
  prefix: "",
  items: new Map(),     // key -> the key as the API shows it
  revision: 0,          // the revision the listing and the watch are at
  selected: null,       // the key shown in the editor
  base: null,           // the key as the editor was loaded: its mod_revision is the CAS
  source: null,         // the EventSource of the watch
  credentials: null,    // set by the login dialog, once kvconfig has users
  historyAvailable: false,
  renderQueued: false,
};

const $ = (id) => document.getElementById(id);

// Every request goes through here: the one place to add credentials.
async function api(method, path, body) {
  const options = { method, headers: {}, cache: "no-store" };
  if (body !== undefined) {
    options.body = body;
    options.headers["Content-Type"] = "application/json";
  }
  if (state.credentials) options.headers["Authorization"] = state.credentials;
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    return { status: 0, ok: false, data: { error: "unreachable", message: String(e) } };
  }
  if (response.status === 401) showLogin();
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  return { status: response.status, ok: response.ok, data };
}

function kvPath(key) {
  return "/v1/kv/" + key.split("/").map(encodeURIComponent).join("/");
}

function pretty(value) { return JSON.stringify(value, null, 2); }

function errorText(result) {
  const data = result.data || {};
  return `${data.error || "HTTP " + result.status}: ${data.message || ""}`;
}

// The key listing, and the live watch after it

async function loadKeys() {
  const items = new Map();
  let after = null, revision = 0, first = true;
  for (;;) {
    let query = "?recurse&limit=1000";
    if (after !== null) query += "&after=" + encodeURIComponent(after);
    const result = await api("GET", kvPath(state.prefix) + query);
    if (!result.ok) { $("key-count").textContent = errorText(result); return; }
    if (first) { revision = result.data.revision; first = false; }
    for (const item of result.data.items) items.set(item.key, item);
    if (!result.data.more || !result.data.items.length) break;
    after = result.data.items[result.data.items.length - 1].key;
  }
  state.items = items;
  state.revision = revision;
  renderTree();
  watch(revision + 1);
}

function watch(from) {
  if (state.source) state.source.close();
  const url = `/v1/watch?prefix=${encodeURIComponent(state.prefix)}&from=${from}`;
  const source = new EventSource(url);
  state.source = source;
  source.addEventListener("watching", () => setLive(true));
  source.addEventListener("put", (message) => changed(JSON.parse(message.data)));
  source.addEventListener("delete", (message) => changed(JSON.parse(message.data)));
  source.addEventListener("error", (message) => {
    setLive(false);
    if (message.data) {   // the server ended the watch (slow consumer): start afresh
      source.close();
      setTimeout(loadKeys, 1000);
    } else if (source.readyState === EventSource.CLOSED) {
      // Refused (history compacted, a limit): list again, then watch from there.
      setTimeout(loadKeys, 2000);
    }
  });
}

function setLive(on) {
  const badge = $("live");
  badge.textContent = on ? "live" : "offline";
  badge.className = "badge " + (on ? "on" : "off");
}

function changed(event) {
  state.revision = Math.max(state.revision, event.revision);
  if (event.type === "put") state.items.set(event.key, event);
  else state.items.delete(event.key);
  queueRender(event.key);
  if (event.key === state.selected) remoteChange(event);
}

function queueRender(flashKey) {
  if (flashKey) (state.flash = state.flash || new Set()).add(flashKey);
  if (state.renderQueued) return;
  state.renderQueued = true;
  requestAnimationFrame(() => { state.renderQueued = false; renderTree(); });
}

// The tree: keys split at "/"

function renderTree() {
  const root = { children: new Map(), key: null };
  for (const key of [...state.items.keys()].sort()) {
    const parts = key.split("/");
    let node = root;
    parts.forEach((part, i) => {
      const name = i < parts.length - 1 ? part + "/" : part;
      if (!node.children.has(name)) node.children.set(name, { children: new Map(), key: null });
      node = node.children.get(name);
    });
    node.key = key;
  }
  const tree = $("tree");
  tree.replaceChildren(...renderNodes(root));
  $("key-count").textContent =
    `${state.items.size} key${state.items.size === 1 ? "" : "s"} at revision ${state.revision}`;
  state.flash = null;
}

function renderNodes(node) {
  const elements = [];
  for (const [name, child] of node.children) {
    const li = document.createElement("li");
    if (child.key !== null) {
      const a = document.createElement("a");
      a.href = "#" + encodeURIComponent(child.key);
      a.textContent = name;
      a.dataset.key = child.key;
      if (child.key === state.selected) a.classList.add("selected");
      if (state.flash && state.flash.has(child.key)) a.classList.add("flash");
      a.addEventListener("click", (e) => { e.preventDefault(); select(child.key); });
      li.append(a);
    }
    if (child.children.size) {
      li.classList.add("folder");
      if (child.key === null) {
        const span = document.createElement("span");
        span.textContent = name;
        li.append(span);
      }
      const ul = document.createElement("ul");
      ul.append(...renderNodes(child));
      li.append(ul);
    }
    elements.push(li);
  }
  return elements;
}

// The editor

async function select(key) {
  state.selected = key;
  renderTree();
  const result = await api("GET", kvPath(key));
  $("key-title").textContent = key;
  $("key-view").hidden = false;
  $("remote-change").hidden = true;
  message("key-message", "", "");
  if (result.status === 404) {
    state.base = null;
    $("meta").replaceChildren();
    $("value").value = "";
    message("key-message", "This key does not exist (any more).", "warn");
    return;
  }
  if (!result.ok) { message("key-message", errorText(result), "error"); return; }
  show(result.data);
  if (state.historyAvailable) loadHistory(key);
}

function show(kv) {
  state.base = kv;
  $("value").value = pretty(kv.value);
  const fields = [["key", kv.key], ["version", kv.version],
                  ["create_revision", kv.create_revision], ["mod_revision", kv.mod_revision]];
  if (kv.expires_at !== undefined) {
    fields.push(["expires_at", new Date(kv.expires_at * 1000).toISOString()]);
  }
  $("meta").replaceChildren(...fields.flatMap(([name, value]) => {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = String(value);
    dd.id = "meta-" + name;
    return [dt, dd];
  }));
}

function dirty() {
  return state.base !== null && $("value").value !== pretty(state.base.value);
}

// A change to the key being shown: shown at once unless it is being edited;
// then the edit stays, and saving it will meet the conflict.
function remoteChange(event) {
  if (!dirty()) {
    if (event.type === "put") { show(event); $("remote-change").hidden = true; }
    else { $("remote-change").hidden = false;
           $("remote-change").textContent = `Deleted at revision ${event.revision}.`; }
    return;
  }
  const note = $("remote-change");
  note.hidden = false;
  note.textContent = event.type === "put"
    ? `Changed on the server at revision ${event.revision} while you edit ` +
      `(your edit is of mod_revision ${state.base.mod_revision}).`
    : `Deleted on the server at revision ${event.revision} while you edit.`;
}

async function save() {
  const key = state.selected;
  const text = $("value").value;
  try { JSON.parse(text); } catch (e) {
    message("key-message", "The value is not valid JSON: " + e.message, "error");
    return;
  }
  const cas = state.base ? state.base.mod_revision : 0;
  const result = await api("PUT", `${kvPath(key)}?cas=${cas}`, text);
  if (result.ok) {
    message("key-message", `Saved at revision ${result.data.revision}.`, "ok");
    const fresh = await api("GET", kvPath(key));
    if (fresh.ok) show(fresh.data);
    $("remote-change").hidden = true;
  } else if (result.status === 409) {
    conflict(key, result);
  } else {
    message("key-message", errorText(result), "error");
  }
}

async function conflict(key, result) {
  const current = await api("GET", kvPath(key));
  const now = current.ok ? `mod_revision ${current.data.mod_revision}` : "deleted";
  const box = $("key-message");
  box.className = "message conflict";
  box.textContent = `Conflict: ${key} changed since you opened it (it is now at ${now}; ` +
    `your edit was of mod_revision ${state.base ? state.base.mod_revision : 0}). ` +
    "Your edit was not saved. ";
  const reload = document.createElement("button");
  reload.id = "load-current";
  reload.textContent = "Load the current value";
  reload.addEventListener("click", () => select(key));
  box.append(reload);
}

async function remove() {
  const button = $("delete");
  if (button.dataset.armed !== "yes") {
    button.dataset.armed = "yes";
    button.textContent = "Really delete?";
    setTimeout(() => { button.dataset.armed = ""; button.textContent = "Delete"; }, 4000);
    return;
  }
  button.dataset.armed = "";
  button.textContent = "Delete";
  const key = state.selected;
  const cas = state.base ? state.base.mod_revision : 0;
  const result = await api("DELETE", `${kvPath(key)}?cas=${cas}`);
  if (result.ok) message("key-message", `Deleted at revision ${result.data.revision}.`, "ok");
  else if (result.status === 409) conflict(key, result);
  else message("key-message", errorText(result), "error");
}

async function create(e) {
  e.preventDefault();
  const key = $("new-key").value.trim();
  const text = $("new-value").value.trim() || "null";
  try { JSON.parse(text); } catch (err) {
    message("new-message", "The value is not valid JSON: " + err.message, "error");
    return;
  }
  const result = await api("PUT", `${kvPath(key)}?cas=0`, text);
  if (result.ok) {
    message("new-message", `Created at revision ${result.data.revision}.`, "ok");
    select(key);
  } else if (result.status === 409) {
    message("new-message", `${key} already exists: it was not overwritten.`, "conflict");
  } else {
    message("new-message", errorText(result), "error");
  }
}

function message(id, text, kind) {
  const box = $(id);
  box.className = "message " + kind;
  box.textContent = text;
}

// History, where the server has it (GET /v1/history/KEY); hidden otherwise

async function probeHistory() {
  const result = await api("GET", "/v1/history/");
  state.historyAvailable = result.ok;
  $("history-panel").hidden = !result.ok;
}

async function loadHistory(key) {
  const result = await api("GET", "/v1/history/" + key.split("/").map(encodeURIComponent).join("/"));
  if (!result.ok) return;
  const entries = result.data.history || result.data.events || [];
  let previous = null;
  $("history").replaceChildren(...entries.map((entry) => {
    const li = document.createElement("li");
    const text = entry.type === "delete" ? "(deleted)" : pretty(entry.value);
    li.append(`revision ${entry.revision} ${entry.type || "put"}` +
              (entry.who ? ` by ${entry.who}` : "") + "\n");
    li.append(...diff(previous, text));
    previous = text;
    return li;
  }));
}

function diff(before, after) {
  if (before === null) return [after];
  const old = new Set(before.split("\n")), fresh = new Set(after.split("\n"));
  const lines = [];
  for (const line of before.split("\n")) if (!fresh.has(line)) lines.push(["del", "- " + line]);
  for (const line of after.split("\n")) if (!old.has(line)) lines.push(["add", "+ " + line]);
  return lines.map(([kind, text]) => {
    const span = document.createElement("span");
    span.className = kind;
    span.textContent = text + "\n";
    return span;
  });
}

// Subscriptions and status, polled

function ago(seconds) {
  if (seconds < 1) return "now";
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  return `${Math.round(seconds / 60)} min ago`;
}

async function loadSubscriptions() {
  const result = await api("GET", "/v1/subscriptions");
  if (!result.ok) return;
  const now = Date.now() / 1000;
  const rows = result.data.subscriptions.map((s) => {
    const tr = document.createElement("tr");
    tr.dataset.address = s.address;
    tr.dataset.prefix = s.prefix;
    const cells = [
      [s.address, "address"], [s.prefix === "" ? "(every key)" : s.prefix, "prefix"],
      [s.owner, "owner"], [s.applied === null ? "—" : s.applied, "applied number"],
      [s.lag === null ? "—" : s.lag, "lag number" + (s.lag ? " behind" : "")],
      [ago(now - s.last_heard), "heard"], [`${Math.round(s.expires_in)} s`, "expires"],
    ];
    tr.append(...cells.map(([text, kind]) => {
      const td = document.createElement("td");
      td.className = kind;
      td.textContent = String(text);
      return td;
    }));
    return tr;
  });
  document.querySelector("#subscriptions tbody").replaceChildren(...rows);
  $("sub-count").textContent = `(${rows.length})`;
}

const STATUS_FIELDS = ["version", "backend", "revision", "keys", "stale", "etcd_state",
  "udp_subscriptions", "subscriptions_max_lag", "xmlrpc_connections", "line_connections",
  "http_connections", "writes_in_flight", "commits", "udp_datagrams_sent"];

async function loadStatus() {
  const result = await api("GET", "/v1/status");
  if (!result.ok) { $("summary").textContent = errorText(result); return; }
  const stats = result.data;
  $("summary").textContent =
    `${stats.backend} · revision ${stats.revision} · ${stats.keys} keys` +
    (stats.stale ? " · STALE" : "");
  $("status").replaceChildren(...STATUS_FIELDS.filter((name) => name in stats)
    .flatMap((name) => {
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = name;
      dd.textContent = String(stats[name]);
      dd.id = "status-" + name;
      return [dt, dd];
    }));
}

// Login: kvconfig has no users yet; once it does, a 401 opens this dialog.

function showLogin() {
  const dialog = $("login");
  if (dialog.open) return;
  dialog.showModal();
  dialog.addEventListener("close", () => {
    const form = dialog.querySelector("form");
    state.credentials = "Basic " + btoa(`${form.user.value}:${form.password.value}`);
    loadKeys();
  }, { once: true });
}

// Start

$("filter-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.prefix = $("prefix").value.trim();
  loadKeys();
});
$("save").addEventListener("click", save);
$("revert").addEventListener("click", () => { if (state.selected) select(state.selected); });
$("delete").addEventListener("click", remove);
$("new-form").addEventListener("submit", create);

probeHistory();
loadKeys();
loadStatus();
loadSubscriptions();
setInterval(loadStatus, 3000);
setInterval(loadSubscriptions, 2000);
