// chargen playground: plain JavaScript, no build step, no network beyond this service.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "chargen.apiKey";
const SESSION_STORAGE = "chargen.sessionId";

const state = {
  model: null, // /v1/models entry of the picked model
  models: [], // every ready /v1/models entry (the picker's choices)
  limits: null, // GET /v1/inspect
  controller: null, // AbortController of the running generation
  sessionId: sessionStorage.getItem(SESSION_STORAGE),
  expiresAt: null, // ms timestamp when the session expires (from expires_in_s)
  inspection: null, // last /v1/inspect response
  inspectedText: "",
};

// ---- HTTP ------------------------------------------------------------------------------------

function headers(json = true) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

class ApiError extends Error {
  constructor(status, body, retryAfter) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || null;
    this.param = err.param || null;
    this.retryAfter = retryAfter;
  }
}

async function api(method, path, body) {
  const init = { method, headers: headers(body !== undefined) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) throw await errorFrom(response);
  if (response.status === 204) return null;
  return response.json();
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = { error: { message: `${response.status} ${response.statusText}` } };
  }
  return new ApiError(response.status, body, response.headers.get("Retry-After"));
}

// ---- errors and status -----------------------------------------------------------------------

const EXPLAIN = {
  400: "The request was refused",
  401: "The API key was refused",
  403: "The API key is not allowed to do this",
  404: "Not found",
  409: "Busy or conflicting",
  413: "The request is too large",
  429: "The service is at capacity",
  501: "Not available for this model",
  503: "The service is unavailable",
};

// an error inside a stream arrives as an event (the status line was already 200)
const STATUS_OF_TYPE = {
  invalid_request_error: 400,
  not_found_error: 404,
  conflict_error: 409,
  rate_limit_error: 429,
  server_error: 500,
  service_unavailable: 503,
};

function showError(err) {
  const box = $("error");
  if (err instanceof ApiError) {
    let text = `${EXPLAIN[err.status] || "Error"} (HTTP ${err.status}${err.code ? ", " + err.code : ""}): ${err.message}`;
    if (err.retryAfter) text += ` Retry after ${err.retryAfter} s.`;
    box.textContent = text;
  } else {
    box.textContent = `Could not reach the service: ${err.message || err}`;
  }
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setStatus(text) {
  $("status").textContent = text;
}

// ---- model -----------------------------------------------------------------------------------

async function loadModel() {
  try {
    const models = await api("GET", "/v1/models");
    state.models = models.data.filter((m) => m.status === "ready");
    const picker = $("model-picker");
    const kept = state.model && state.models.find((m) => m.id === state.model.id);
    const before = state.model && state.model.fingerprint;
    state.model = kept || state.models.find((m) => m.default) || state.models[0] || null;
    const ids = state.models.map((m) => m.id).join("\n");
    if (picker.dataset.ids !== ids) {
      picker.replaceChildren(...state.models.map((m) => new Option(m.id, m.id, false, m === state.model)));
      picker.dataset.ids = ids;
    }
    picker.disabled = state.models.length < 2;
    $("error").hidden = true; // a 401 from before a key was entered is no longer news
    if (state.model && state.model.fingerprint === before) return; // nothing new to show
  } catch (err) {
    $("model-info").textContent = "model: unknown";
    showError(err);
    return;
  }
  await showModel();
}

async function showModel() {
  const m = state.model;
  if (!m) {
    $("model-info").textContent = "no model is served yet";
    return;
  }
  const bpc = m.val_bpc == null ? "" : `, ${m.val_bpc.toFixed(3)} bits/char on validation`;
  $("model-info").textContent = `${m.layers} layers × ${m.hidden} units, ${m.vocab_size} characters${bpc}`;
  $("inspect-unavailable").hidden = true;
  try {
    state.limits = await api("GET", `/v1/inspect?model=${encodeURIComponent(m.id)}`);
  } catch (_) {
    state.limits = null;
  }
  fillLayerPickers();
  if (state.limits && !state.limits.available) {
    const note = $("inspect-unavailable");
    note.textContent =
      "This model was exported before the inspector existed: re-export it from its checkpoint " +
      "with `chargen export CHECKPOINT -o MODEL` to inspect it.";
    note.hidden = false;
  }
}

function fillLayerPickers() {
  const layers = state.model ? state.model.layers : 1;
  const unitLayer = $("unit-layer");
  const patternLayer = $("pattern-layer");
  unitLayer.replaceChildren();
  patternLayer.replaceChildren(new Option("every layer", ""));
  // 0-based, as in the API; the ends are named
  const name = (n) => String(n) + (n === 0 ? " (bottom)" : n === layers - 1 ? " (top)" : "");
  for (let n = 0; n < layers; n++) {
    unitLayer.append(new Option(name(n), String(n)));
    patternLayer.append(new Option(name(n), String(n)));
  }
  $("unit-index").max = String((state.model ? state.model.hidden : 1) - 1);
}

// ---- generation ------------------------------------------------------------------------------

function numberOrNull(id) {
  const raw = $(id).value.trim();
  if (raw === "") return null;
  const value = Number(raw);
  return Number.isFinite(value) ? value : NaN;
}

function generationBody() {
  const body = {
    prompt: $("prompt").value,
    max_new_chars: numberOrNull("max-chars") ?? 200,
    temperature: numberOrNull("temperature") ?? 1.0,
    top_k: numberOrNull("top-k"),
    top_p: numberOrNull("top-p"),
    seed: numberOrNull("seed"),
    stream: true,
  };
  // a session stays on the model it was made with; anything else runs on the picked one
  if (continuing()) body.session_id = state.sessionId;
  else if (state.model) body.model = state.model.id;
  return body;
}

function continuing() {
  return Boolean(state.sessionId) && $("use-session").checked;
}

function showPromptRole() {
  $("prompt").placeholder = continuing() ? "optional: text added to the session before it continues" : "";
}

function appendOutput(text, cls) {
  const out = $("output-text");
  // consecutive pieces of one kind share a text node, so a long stream does not make many nodes
  const last = out.lastChild;
  if (last && last.nodeType === Node.ELEMENT_NODE && last.className === cls) {
    last.firstChild.appendData(text);
  } else {
    const span = document.createElement("span");
    span.className = cls;
    span.append(document.createTextNode(text));
    out.append(span);
  }
  const pre = $("output");
  pre.scrollTop = pre.scrollHeight;
}

function setGenerating(on) {
  $("generate").disabled = on;
  $("stop").disabled = !on;
  $("output").setAttribute("aria-busy", on ? "true" : "false");
  document.body.dataset.generating = on ? "true" : "false";
}

async function generate() {
  clearError();
  const body = generationBody();
  for (const [field, value] of Object.entries(body)) {
    if (Number.isNaN(value)) {
      showError(new ApiError(400, { error: { message: `${field}: not a number` } }));
      return;
    }
  }
  const controller = new AbortController();
  state.controller = controller;
  setGenerating(true);
  setStatus("connecting…");
  let received = 0;
  let finished = null;
  let unpainted = ""; // received, not yet on the page: painted at most once a frame
  const paint = () => {
    if (unpainted) appendOutput(unpainted, "generated");
    unpainted = "";
    setStatus(`generating… ${received} characters`);
  };
  try {
    const response = await fetch("/v1/generate", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw await errorFrom(response); // the text so far stays on the page
    // The session holds the prompt now: sent again, it would be read into the session's text
    // again. The box keeps only what the user types next (nothing: the session just continues).
    if (body.session_id) $("prompt").value = "";
    if (!body.session_id) $("output-text").replaceChildren(); // a session's text grows instead
    if (body.prompt) appendOutput(body.prompt, "prompt");
    setStatus("generating…");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let lastPaint = performance.now();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const payload = line.slice(6);
          if (payload === "[DONE]") continue;
          const data = JSON.parse(payload);
          if (data.error) throw new ApiError(STATUS_OF_TYPE[data.error.type] || 500, data);
          if (typeof data.text === "string") {
            unpainted += data.text;
            received += data.text.length;
          }
          if (data.finish_reason) finished = data;
        }
      }
      // When data is already queued, read() resolves at once (a microtask): without this the loop
      // would never give the browser a turn to paint or to handle the Stop button.
      if (performance.now() - lastPaint > 16) {
        paint();
        await yieldToBrowser();
        lastPaint = performance.now();
      }
    }
    paint();
    if (finished) {
      setStatus(`done: ${finished.usage.completion_chars} characters (${finished.finish_reason})`);
    } else {
      setStatus(`the stream ended early after ${received} characters`);
    }
  } catch (err) {
    if (unpainted) appendOutput(unpainted, "generated"); // what arrived before the stop or error
    unpainted = "";
    if (err.name === "AbortError") {
      setStatus(`stopped after ${received} characters`);
    } else {
      setStatus("failed");
      showError(err);
    }
  } finally {
    state.controller = null;
    setGenerating(false);
    if (body.session_id) {
      // after a Stop the server saves the session just after the disconnect: look twice
      refreshSession();
      setTimeout(refreshSession, 400);
    }
  }
}

// A macrotask turn (not throttled like setTimeout, not paused in a hidden tab like rAF).
function yieldToBrowser() {
  return new Promise((resolve) => {
    const channel = new MessageChannel();
    channel.port1.onmessage = () => resolve();
    channel.port2.postMessage(null);
  });
}

function stop() {
  if (state.controller) state.controller.abort();
}

// ---- sessions --------------------------------------------------------------------------------

function setSession(id) {
  state.sessionId = id;
  if (id) sessionStorage.setItem(SESSION_STORAGE, id);
  else sessionStorage.removeItem(SESSION_STORAGE);
  $("session-id").textContent = id || "none";
  for (const el of ["use-session", "session-fork", "session-delete", "inspect-from-session"]) $(el).disabled = !id;
  $("use-session").checked = Boolean(id);
  showPromptRole();
  if (!id) {
    $("inspect-from-session").checked = false;
    $("session-chars").textContent = "–";
    $("session-ttl").textContent = "–";
    state.expiresAt = null;
  }
}

async function refreshSession() {
  const id = state.sessionId;
  if (!id) return;
  try {
    const info = await api("GET", `/v1/sessions/${encodeURIComponent(id)}`);
    if (state.sessionId !== id) return;
    $("session-chars").textContent = String(info.chars_consumed);
    state.expiresAt = Date.now() + info.expires_in_s * 1000;
    tickTtl();
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      $("session-ttl").textContent = "expired";
      state.expiresAt = null;
    }
    showError(err);
  }
}

function tickTtl() {
  if (state.expiresAt == null) return;
  const left = Math.max(0, Math.round((state.expiresAt - Date.now()) / 1000));
  const m = Math.floor(left / 60);
  const s = String(left % 60).padStart(2, "0");
  $("session-ttl").textContent = left > 0 ? `${m}:${s}` : "expired";
}

async function newSession() {
  clearError();
  try {
    const created = await api("POST", "/v1/sessions", state.model ? { model: state.model.id } : {});
    setSession(created.session_id);
    $("output-text").replaceChildren();
    setStatus("new session: the next generation starts it");
    await refreshSession();
  } catch (err) {
    showError(err);
  }
}

async function forkSession() {
  clearError();
  try {
    const forked = await api("POST", `/v1/sessions/${encodeURIComponent(state.sessionId)}/fork`);
    setSession(forked.session_id);
    setStatus(`forked: now on a copy of ${forked.forked_from.slice(0, 8)}…`);
    await refreshSession();
  } catch (err) {
    showError(err);
  }
}

async function deleteSession() {
  clearError();
  try {
    await api("DELETE", `/v1/sessions/${encodeURIComponent(state.sessionId)}`);
    setSession(null);
    setStatus("session deleted");
  } catch (err) {
    showError(err);
  }
}

// ---- inspector -------------------------------------------------------------------------------

function surprisalColour(bits) {
  const t = Math.min(Math.max(bits / 8, 0), 1);
  return `hsl(8 90% ${100 - 40 * t}%)`; // white to a red light enough for black text
}

function valueColour(v, signal) {
  if (signal !== "cell") v = 2 * v - 1; // gates run 0..1: centre them
  const t = Math.min(Math.abs(v), 1);
  const hue = v >= 0 ? 8 : 215;
  return `hsl(${hue} 90% ${100 - 40 * t}%)`;
}

function printable(ch) {
  if (ch === "\n") return "↵";
  if (ch === "\t") return "⇥";
  return ch;
}

function describeChar(ch) {
  return ch === "\n" ? "newline" : ch === " " ? "space" : `'${ch}'`;
}

// One span per character; a newline shows as ↵ and then breaks the line.
function renderTokens(container, text, colourOf, titleOf, extraClass) {
  const frag = document.createDocumentFragment();
  [...text].forEach((ch, i) => {
    const span = document.createElement("span");
    span.className = "ch" + (extraClass ? extraClass(i) : "");
    span.dataset.i = String(i);
    span.style.background = colourOf(i);
    span.title = titleOf(i);
    span.textContent = printable(ch);
    frag.append(span);
    if (ch === "\n") frag.append(document.createTextNode("\n"));
  });
  container.replaceChildren(frag);
}

function predictionsText(top) {
  return top.map((p) => `${describeChar(p.char)} ${(100 * p.p).toFixed(1)}%`).join(", ");
}

function inspectBody(units) {
  const body = {
    text: $("inspect-text").value,
    layer: Number($("unit-layer").value || 0),
    units,
  };
  if ($("inspect-from-session").checked && state.sessionId) body.session_id = state.sessionId;
  else if (state.model) body.model = state.model.id;
  return body;
}

async function runInspect() {
  clearError();
  const unit = Number($("unit-index").value || 0);
  const body = inspectBody([unit]);
  $("inspect-status").textContent = "inspecting…";
  try {
    const result = await api("POST", "/v1/inspect", body);
    state.inspection = result;
    state.inspectedText = body.text;
    renderSurprisal();
    renderUnit();
    $("inspect-status").textContent = `${result.chars.length} characters`;
  } catch (err) {
    $("inspect-status").textContent = "failed";
    showError(err);
  }
}

function renderSurprisal() {
  const r = state.inspection;
  const chars = [...state.inspectedText];
  renderTokens(
    $("surprisal-view"),
    state.inspectedText,
    (i) => surprisalColour(r.chars[i].surprisal_bits),
    (i) => `${describeChar(chars[i])}: ${r.chars[i].surprisal_bits.toFixed(2)} bits; expected ${predictionsText(r.chars[i].top)}`,
  );
  $("mean-surprisal").textContent = `Mean: ${r.mean_surprisal_bits.toFixed(3)} bits/char; next: ${predictionsText(r.next)}.`;
}

function renderUnit() {
  const r = state.inspection;
  if (!r || !r.units.length) return;
  const trace = r.units[0];
  const signal = $("unit-signal").value;
  const values = trace[signal];
  const chars = [...state.inspectedText];
  renderTokens(
    $("unit-view"),
    state.inspectedText,
    (i) => valueColour(values[i], signal),
    (i) => `${describeChar(chars[i])}: layer ${trace.layer} unit ${trace.unit} ${signal} ${values[i].toFixed(3)}`,
  );
  $("unit-view").dataset.layer = String(trace.layer);
  $("char-details").textContent = "Hover or click a character to see its numbers.";
  $("unit-view").dataset.unit = String(trace.unit);
}

let unitTimer = null;
function unitChanged() {
  // a new unit needs its numbers from the server; wait until the person stops typing
  if (!state.inspection) return;
  clearTimeout(unitTimer);
  unitTimer = setTimeout(runInspect, 250);
}

function showDetails(event) {
  const span = event.target.closest(".ch");
  if (!span || !state.inspection) return;
  const i = Number(span.dataset.i);
  const r = state.inspection;
  const ch = [...state.inspectedText][i];
  const info = r.chars[i];
  let text = `#${i} ${describeChar(ch)}: ${info.surprisal_bits.toFixed(2)} bits; the model expected ${predictionsText(info.top)}.`;
  if (r.units.length) {
    const t = r.units[0];
    text += ` Layer ${t.layer} unit ${t.unit}: cell ${t.cell[i].toFixed(3)}, input ${t.input[i].toFixed(2)}, forget ${t.forget[i].toFixed(2)}, output ${t.output[i].toFixed(2)}.`;
  }
  $("char-details").textContent = text;
}

async function findUnits() {
  clearError();
  const body = {
    text: $("inspect-text").value,
    pattern: $("pattern").value,
    top: Number($("pattern-top").value || 5),
    signal: $("pattern-signal").value,
  };
  if ($("pattern-layer").value !== "") body.layer = Number($("pattern-layer").value);
  if ($("inspect-from-session").checked && state.sessionId) body.session_id = state.sessionId;
  else if (state.model) body.model = state.model.id;
  $("inspect-status").textContent = "searching…";
  try {
    const result = await api("POST", "/v1/inspect/units", body);
    renderUnitResults(body.text, result);
    $("inspect-status").textContent = `${result.matched_chars} of ${[...body.text].length} characters match`;
  } catch (err) {
    $("inspect-status").textContent = "failed";
    showError(err);
  }
}

function renderUnitResults(text, result) {
  const list = $("unit-results");
  list.replaceChildren();
  const chars = [...text];
  for (const unit of result.units) {
    const item = document.createElement("li");
    item.className = "unit-result";
    const head = document.createElement("div");
    head.className = "unit-head";
    const title = document.createElement("strong");
    title.textContent = `layer ${unit.layer}, unit ${unit.unit}`;
    const corr = document.createElement("span");
    corr.textContent = ` r = ${unit.correlation >= 0 ? "+" : ""}${unit.correlation.toFixed(3)}`;
    const show = document.createElement("button");
    show.type = "button";
    show.className = "small";
    show.textContent = "Show in the cell view";
    show.addEventListener("click", () => {
      $("unit-layer").value = String(unit.layer);
      $("unit-index").value = String(unit.unit);
      $("unit-signal").value = result.signal;
      runInspect();
    });
    head.append(title, corr, show);
    const view = document.createElement("div");
    view.className = "tokens compact";
    renderTokens(
      view,
      text,
      (i) => valueColour(unit.values[i], result.signal),
      (i) => `${describeChar(chars[i])}: ${unit.values[i].toFixed(3)}${result.mask[i] ? " (matches)" : ""}`,
      (i) => (result.mask[i] ? " match" : ""),
    );
    item.append(head, view);
    list.append(item);
  }
}

function useOutput() {
  let text = $("output-text").textContent;
  const max = state.limits ? state.limits.max_text_chars : 2000;
  if ([...text].length > max) text = [...text].slice(-max).join(""); // the most recent part
  $("inspect-text").value = text;
}

function toggleInspector() {
  const body = $("inspector-body");
  const open = body.hidden;
  body.hidden = !open;
  $("inspector-toggle").setAttribute("aria-expanded", String(open));
  $("inspector-toggle").textContent = open ? "Close the inspector" : "Open the inspector";
  if (open && !$("inspect-text").value) useOutput();
}

// ---- wiring ----------------------------------------------------------------------------------

function init() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("input", () => {
    if (key.value) sessionStorage.setItem(KEY_STORAGE, key.value);
    else sessionStorage.removeItem(KEY_STORAGE);
  });
  key.addEventListener("change", () => {
    if (!state.model) loadModel(); // the first load may have been refused for want of a key
  });
  $("model-picker").addEventListener("change", () => {
    state.model = state.models.find((m) => m.id === $("model-picker").value) || state.model;
    showModel();
  });
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", stop);
  $("clear-output").addEventListener("click", () => $("output-text").replaceChildren());
  $("session-new").addEventListener("click", newSession);
  $("session-fork").addEventListener("click", forkSession);
  $("session-delete").addEventListener("click", deleteSession);
  $("use-session").addEventListener("change", showPromptRole);
  $("inspector-toggle").addEventListener("click", toggleInspector);
  $("use-output").addEventListener("click", useOutput);
  $("inspect").addEventListener("click", runInspect);
  $("find-units").addEventListener("click", findUnits);
  $("unit-layer").addEventListener("change", unitChanged);
  $("unit-index").addEventListener("input", unitChanged);
  $("unit-signal").addEventListener("change", renderUnit);
  for (const id of ["surprisal-view", "unit-view"]) {
    $(id).addEventListener("mouseover", showDetails);
    $(id).addEventListener("click", showDetails);
  }
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("generate").disabled) generate();
  });
  setGenerating(false);
  setSession(state.sessionId);
  if (state.sessionId) refreshSession();
  setInterval(tickTtl, 1000);
  loadModel();
  setInterval(() => state.model && loadModel(), 10000); // models published since join the picker
}

document.addEventListener("DOMContentLoaded", init);
