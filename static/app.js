/*
 * gpt2-instruct chat page. Vanilla JS, no framework, no network besides this server.
 *
 * How a conversation reaches the model
 * ------------------------------------
 * Chat mode posts the whole conversation to POST /v1/chat/completions with "stream": true
 * (OpenAI's chat format: `messages` plus temperature, top_p, max_tokens, and top_k, which the
 * server accepts as a vLLM-style extension). Why not /generate with the last message only:
 * the model was tuned on single-turn instructions, but follow-ups ("make it shorter") need the
 * earlier turns, and the server already folds them into the one template (prompt.py): the last
 * user message becomes the instruction, earlier turns a transcript in the Input block, oldest
 * turns dropped first when the context is full. So the template and the context budget stay in
 * one place, the server, and the page never re-implements either. The reply streams as OpenAI
 * chunks, `data: {"choices":[{"delta":{"content":…}}]}`, then a usage chunk, then `data: [DONE]`.
 *
 * With "JSON output" on, chat requests carry response_format: json_schema with the schema box's
 * object, or json_object when the box is empty; the server decodes the answer under it.
 *
 * Raw completion mode (for base models, which know no template) posts only the last message
 * to POST /generate with "raw": true and "stream": true: the model continues that text as is.
 * Its events are `data: {"token": …}` then `data: {"done": true, "finish_reason": …, "usage": …}`.
 *
 * The stream is read with fetch + ReadableStream (so the Authorization header can be sent and
 * the request aborted); the SSE parser below survives any chunk boundary, even inside a UTF-8
 * character or between "\r" and "\n". Stop aborts the fetch; the server notices the closed
 * connection and stops generating.
 *
 * The sliders take their ranges and defaults from GET /params (the page's own default: a mild
 * repetition penalty), the model's name comes from GET /v1/models, and /health is polled. A failed
 * request leaves a note and Retry under the message it belongs to, never an empty answer.
 *
 * Model output is only ever inserted with textContent, never as HTML.
 */
"use strict";

(() => {
  const KEYS = {
    settings: "gpt2i.settings.v1",
    chats: "gpt2i.chats.v1",
    current: "gpt2i.current.v1",
    panel: "gpt2i.settingsPanel.v1",
  };

  const ENDPOINTS = { chat: "/v1/chat/completions", raw: "/generate", health: "/health", params: "/params", models: "/v1/models" };

  /* Parameter ranges used until (or unless) the server publishes its own at GET /params.
   * They match inference.py's validation. `step` is the slider step only. */
  const FALLBACK_RANGES = {
    temperature: { min: 0, max: 2, step: 0.05 },
    top_k: { min: 0, max: 200, step: 1 },
    top_p: { min: 0.01, max: 1, step: 0.01 },
    repetition_penalty: { min: 1, max: 2, step: 0.01 },
    max_new_tokens: { min: 1, max: 1024, step: 1 },
  };
  const DEFAULTS = { temperature: 0.8, top_k: 50, top_p: 1.0, repetition_penalty: 1.15, max_new_tokens: 128, raw: false,
                     json: false, json_schema: "", api_key: "" };
  // The page's own defaults win over the server's: small models fall into loops ("The The The")
  // without a mild repetition penalty.
  const PAGE_DEFAULTS = { repetition_penalty: 1.15 };
  const PARAMS = ["temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens"];
  const UI_MAX_TOP_K = 200;  // the top-k slider's end; the server accepts up to the vocabulary size
  const HEALTH_EVERY_MS = { ready: 10000, loading: 2000, busy: 4000, down: 4000 };
  const NARROW_SETTINGS = window.matchMedia("(max-width: 1099px)");
  const NARROW_SIDEBAR = window.matchMedia("(max-width: 759px)");

  const $ = (id) => document.getElementById(id);
  const el = {
    app: $("app"), main: $("main"), sidebar: $("sidebar"), settings: $("settings"), scrim: $("scrim"),
    openSidebar: $("open-sidebar"), closeSidebar: $("close-sidebar"),
    openSettings: $("open-settings"), closeSettings: $("close-settings"),
    newChat: $("new-chat"), chatList: $("chat-list"), chatListEmpty: $("chat-list-empty"),
    health: $("health"), healthLabel: $("health-label"), healthMini: $("health-mini"), modelInfo: $("model-info"),
    title: $("chat-title"), modeTag: $("mode-tag"),
    banner: $("banner"), bannerText: $("banner-text"), bannerClose: $("banner-close"),
    scroller: $("scroller"), empty: $("empty"), messages: $("messages"), jump: $("jump"),
    suggestions: $("suggestions"),
    composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
    form: $("settings-form"), reset: $("reset-settings"),
    raw: $("raw"), apiKey: $("api_key"), template: $("message-template"),
    json: $("json"), jsonSchema: $("json_schema"), jsonSchemaField: $("json-schema-field"),
    jsonSchemaError: $("json_schema-error"),
  };

  const state = {
    ranges: structuredClone(FALLBACK_RANGES),
    settings: { ...DEFAULTS },
    chats: [],           // [{id, title, created, updated, messages: [{id, role, content, meta}]}]
    currentId: null,
    busy: null,          // {controller, chatId, messageId} while a reply streams
    stick: true,         // keep the view pinned to the newest text
    health: "loading",
    healthTimer: null,
    paramsLoaded: false,
    serverDefaults: {},  // defaults from /params, used by "Reset to defaults"
    userSettings: false, // the user has saved settings (else the server's defaults apply)
    bannerTimer: null,
    failureTimer: null,
    saveTimer: null,
  };

  /* ---------- storage ---------- */

  function readJSON(key, fallback) {
    try {
      const text = localStorage.getItem(key);
      return text == null ? fallback : JSON.parse(text);
    } catch {
      return fallback;
    }
  }

  function writeJSON(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
      return true;
    } catch {
      showBanner("This browser would not save the conversation (storage full or disabled).", "warn");
      return false;
    }
  }

  function saveChats() {
    clearTimeout(state.saveTimer);
    state.saveTimer = null;
    writeJSON(KEYS.chats, state.chats);
    writeJSON(KEYS.current, state.currentId);
  }

  /** Save at most about once a second while tokens stream in. */
  function saveChatsSoon() {
    if (!state.saveTimer) state.saveTimer = setTimeout(saveChats, 800);
  }

  function loadChats() {
    const chats = readJSON(KEYS.chats, []);
    state.chats = Array.isArray(chats)
      ? chats.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages))
      : [];
    for (const chat of state.chats) {
      chat.messages = chat.messages.filter((m) => m && (m.role === "user" || m.role === "assistant"));
      for (const m of chat.messages) {
        m.content = String(m.content ?? "");
        if (m.meta && m.meta.streaming) { m.meta.streaming = false; m.meta.stopped = true; }
      }
    }
    const current = readJSON(KEYS.current, null);
    state.currentId = state.chats.some((c) => c.id === current) ? current : null;
  }

  const newId = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  const currentChat = () => state.chats.find((c) => c.id === state.currentId) || null;

  /* ---------- settings ---------- */

  function clamp(value, range) {
    const n = Number(value);
    if (!Number.isFinite(n)) return null;
    return Math.min(range.max, Math.max(range.min, n));
  }

  function formatParam(name, value) {
    if (name === "temperature") return Number(value).toFixed(2);
    if (name === "top_p" || name === "repetition_penalty") return Number(value).toFixed(2);
    if (name === "top_k") return Number(value) === 0 ? "off" : String(value);
    return String(value);
  }

  function loadSettings() {
    const saved = readJSON(KEYS.settings, null);
    state.userSettings = !!saved;
    state.settings = { ...DEFAULTS, ...(saved && typeof saved === "object" ? saved : {}) };
    applyRanges();
    el.raw.checked = !!state.settings.raw;
    el.apiKey.value = String(state.settings.api_key || "");
    el.json.checked = !!state.settings.json;
    el.jsonSchema.value = String(state.settings.json_schema || "");
    updateMode();
    updateJSON();
  }

  /** Put the current ranges on the sliders and clamp the settings into them. */
  function applyRanges() {
    for (const name of PARAMS) {
      const range = state.ranges[name];
      const input = $(name);
      input.min = String(range.min);
      input.max = String(range.max);
      input.step = String(range.step);
      const value = clamp(state.settings[name], range);
      state.settings[name] = value == null ? clamp(DEFAULTS[name], range) : value;
      input.value = String(state.settings[name]);
      input.setAttribute("aria-valuetext", formatParam(name, state.settings[name]));
      $(`${name}-value`).textContent = formatParam(name, state.settings[name]);
    }
  }

  function saveSettings() {
    state.userSettings = true;
    writeJSON(KEYS.settings, state.settings);
  }

  function onSettingInput(event) {
    const input = event.target;
    if (PARAMS.includes(input.name)) {
      const value = clamp(input.value, state.ranges[input.name]);
      if (value == null) return;
      state.settings[input.name] = value;
      $(`${input.name}-value`).textContent = formatParam(input.name, value);
      input.setAttribute("aria-valuetext", formatParam(input.name, value));
    } else if (input === el.raw) {
      state.settings.raw = el.raw.checked;
      updateMode();
    } else if (input === el.apiKey) {
      state.settings.api_key = el.apiKey.value.trim();
    } else if (input === el.json || input === el.jsonSchema) {
      state.settings.json = el.json.checked;
      state.settings.json_schema = el.jsonSchema.value;
      updateJSON();
    }
    saveSettings();
  }

  function updateMode() {
    el.modeTag.hidden = !state.settings.raw;
    el.prompt.placeholder = state.settings.raw ? "Text for the model to continue…" : "Message gpt2-instruct…";
  }

  /**
   * JSON output: chat answers decode under the schema in the box (response_format json_schema), or
   * as any JSON object when the box is empty (json_object). A box that holds no JSON object is shown
   * under it, and a send is refused with a banner: nothing goes to the server.
   */
  function responseFormat(text) {
    if (!text.trim()) return [{ type: "json_object" }, ""];
    let schema;
    try {
      schema = JSON.parse(text);
    } catch (e) {
      return [null, `The JSON schema is not valid JSON: ${e.message}.`];
    }
    if (!schema || typeof schema !== "object" || Array.isArray(schema)) {
      return [null, 'The JSON schema must be a JSON object, such as {"type": "object"}.'];
    }
    return [{ type: "json_schema", json_schema: { name: "answer", schema } }, ""];
  }

  /** Show the schema box while JSON output is on, with what is wrong with it; -> that problem, or "". */
  function updateJSON() {
    const on = !!state.settings.json;
    const problem = on ? responseFormat(el.jsonSchema.value)[1] : "";
    el.jsonSchemaField.hidden = !on;
    el.jsonSchemaError.textContent = problem;
    el.jsonSchemaError.hidden = !problem;
    el.jsonSchema.setAttribute("aria-invalid", String(!!problem));
    return problem;
  }

  /** True (and a banner saying why) when JSON output is on in chat mode with a schema that is no JSON object. */
  function badSchema() {
    const problem = !state.settings.raw && updateJSON();
    if (problem) showBanner(`${problem} Fix it in Settings → JSON schema; nothing was sent.`);
    return !!problem;
  }

  /**
   * Adopt the server's ranges and defaults from GET /params:
   *   {"params": {"temperature": {"type", "min", "max", "default"}, ...}, "context_length": N, ...}
   * Until it answers (or if it fails) FALLBACK_RANGES apply; the server validates every request
   * anyway. One limit is the page's own: top_k stops at UI_MAX_TOP_K (the server allows the whole
   * vocabulary). max_new_tokens goes up to the server's max (the context - 1); when the prompt
   * leaves less room, the server says how much in its 400 and the page asks again for that.
   */
  async function loadServerParams() {
    let body;
    try {
      const res = await fetch(ENDPOINTS.params, { cache: "no-store", signal: AbortSignal.timeout(5000) });
      if (!res.ok) return false;
      body = await res.json();
    } catch {
      return false;
    }
    const table = body && body.params;
    if (!table || typeof table !== "object") return false;
    for (const name of PARAMS) {
      const spec = table[name];
      if (!spec || typeof spec !== "object") continue;
      let min = Number(spec.min);
      let max = Number(spec.max);
      if (!Number.isFinite(min) || !Number.isFinite(max) || max < min) continue;
      const range = state.ranges[name];
      // An open end ("min_exclusive", top_p's (0, 1]) starts the slider one step up.
      if (spec.min_exclusive) min += range.step;
      if (name === "top_k") max = Math.min(max, UI_MAX_TOP_K);
      if (name === "max_new_tokens") min = Math.max(min, 1); // 0 is for echo (scoring a prompt), never a chat answer
      range.min = min;
      range.max = Math.max(min, max);
      const def = Number(spec.default);
      if (spec.default != null && Number.isFinite(def)) state.serverDefaults[name] = def;
    }
    Object.assign(state.serverDefaults, PAGE_DEFAULTS);
    // Until the user changes a setting, the server's defaults are the settings.
    if (!state.userSettings) Object.assign(state.settings, state.serverDefaults);
    applyRanges();
    return true;
  }

  /** The served model's id, from GET /v1/models (the server's --model-name). */
  async function loadModelName() {
    try {
      const res = await fetch(ENDPOINTS.models, { headers: authHeaders(), cache: "no-store", signal: AbortSignal.timeout(5000) });
      const body = res.ok ? await res.json() : null;
      const id = body && Array.isArray(body.data) && body.data[0] ? body.data[0].id : null;
      if (id) state.modelName = String(id);
      return !!id;
    } catch {
      return false;
    }
  }

  /* ---------- banner ---------- */

  function showBanner(text, kind = "error", countdownTo = null) {
    clearInterval(state.bannerTimer);
    el.banner.dataset.kind = kind;
    el.banner.hidden = false;
    if (countdownTo == null) {
      el.bannerText.textContent = text;
      return;
    }
    const tick = () => {
      const left = Math.ceil((countdownTo - Date.now()) / 1000);
      if (left > 0) {
        el.bannerText.textContent = text.replace("{s}", `${left} s`);
      } else {
        clearInterval(state.bannerTimer);
        el.banner.dataset.kind = "info";
        el.bannerText.textContent = "You can send again now.";
      }
    };
    tick();
    state.bannerTimer = setInterval(tick, 1000);
  }

  function hideBanner() {
    clearInterval(state.bannerTimer);
    el.banner.hidden = true;
  }

  /* ---------- HTTP ---------- */

  class HttpError extends Error {
    constructor(status, type, message, retryAfterS, param) {
      super(message || `HTTP ${status}`);
      this.status = status;
      this.type = type || "";
      this.retryAfterS = retryAfterS;
      this.param = param || null;
    }
  }

  function authHeaders() {
    const headers = {};
    if (state.settings.api_key) headers.Authorization = `Bearer ${state.settings.api_key}`;
    return headers;
  }

  /** Retry-After is either seconds or an HTTP date. */
  function parseRetryAfter(value) {
    if (!value) return null;
    const seconds = Number(value);
    if (Number.isFinite(seconds)) return Math.max(0, seconds);
    const when = Date.parse(value);
    return Number.isFinite(when) ? Math.max(0, (when - Date.now()) / 1000) : null;
  }

  async function httpErrorFrom(res) {
    let type = "", message = "", param = null;
    try {
      const body = await res.json();
      const err = body && (body.error ?? body);
      if (typeof err === "string") message = err;
      else if (err) {
        type = String(err.code || err.type || "");
        message = String(err.message || "");
        param = err.param || null;
      }
    } catch { /* not JSON: keep the status line */ }
    return new HttpError(res.status, type, message || res.statusText, parseRetryAfter(res.headers.get("Retry-After")), param);
  }

  /** What the user reads for a failed request. Returns [text, kind, countdownTo]. */
  function describeError(err) {
    if (!(err instanceof HttpError)) {
      return ["Can't reach the server. Check that it is running, then try again.", "error", null];
    }
    const msg = err.message && err.message !== `HTTP ${err.status}` ? err.message : "";
    const until = err.retryAfterS != null ? Date.now() + err.retryAfterS * 1000 : null;
    switch (err.status) {
      case 429:
        return until != null
          ? ["Too many requests. You can try again in {s}.", "warn", until]
          : ["Too many requests. Wait a little, then try again.", "warn", null];
      case 503: {
        if (err.type === "model_error") return [`The model failed to load on the server${msg ? `: ${msg}` : "."}`, "error", null];
        const loading = err.type === "model_loading" || /\bloading\b/i.test(msg);
        const head = loading ? "The model is still loading." : "The server is busy with other requests.";
        if (until != null) return [`${head} Try again in {s}.`, "warn", until];
        return [`${head} Try again in a moment.`, "warn", null];
      }
      case 400:
      case 422:
        return [msg ? `The server refused a setting: ${msg}` : "The server refused a setting.", "error", null];
      case 401:
        return ["This server needs an API key. Enter it in Settings → API key." + (msg ? ` (${msg})` : ""), "error", null];
      case 413:
        return ["The message is too long for the server. Shorten it or start a new chat.", "error", null];
      case 404:
        return [`This server has no ${msg || "such endpoint"}; is it gpt2-instruct's serve.py?`, "error", null];
      default:
        return [msg ? `Error ${err.status}: ${msg}` : `The server answered with error ${err.status}.`, "error", null];
    }
  }

  /**
   * A Server-Sent Events parser fed with decoded text in arbitrary pieces.
   * Calls onEvent(data, eventName) for each complete event that has data lines.
   */
  function createSSEParser(onEvent) {
    let buffer = "";
    function dispatch(block) {
      const data = [];
      let name = "message";
      for (const line of block.split("\n")) {
        if (line === "" || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") data.push(value);
        else if (field === "event") name = value;
      }
      if (data.length) onEvent(data.join("\n"), name);
    }
    return {
      push(text) {
        buffer += text;
        // A trailing "\r" may be half of "\r\n": keep it until the next piece arrives.
        const cut = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
        let body = buffer.slice(0, cut).replace(/\r\n?/g, "\n");
        const rest = buffer.slice(cut);
        let end;
        while ((end = body.indexOf("\n\n")) >= 0) {
          dispatch(body.slice(0, end));
          body = body.slice(end + 2);
        }
        buffer = body + rest;
      },
      end() {
        const last = buffer.replace(/\r\n?/g, "\n");
        buffer = "";
        if (last.trim()) dispatch(last);
      },
    };
  }

  /** Turn one SSE data payload (either API's) into {token}|{done, finish_reason, usage}|{error}. */
  function normalizeEvent(data) {
    if (data.trim() === "[DONE]") return { done: true };
    let obj;
    try {
      obj = JSON.parse(data);
    } catch {
      return null; // not ours; ignore
    }
    if (!obj || typeof obj !== "object") return null;
    if (obj.error) return { error: obj.error };
    if (typeof obj.token === "string") return { token: obj.token };
    if (obj.done) return { done: true, finish_reason: obj.finish_reason, usage: obj.usage };
    if (Array.isArray(obj.choices) && obj.choices.length) {
      const choice = obj.choices[0];
      const piece = choice.delta ? choice.delta.content : choice.text;
      const out = {};
      if (typeof piece === "string" && piece) out.token = piece;
      if (choice.finish_reason) out.finish_reason = choice.finish_reason;
      if (obj.usage) out.usage = obj.usage;
      return out;
    }
    if (obj.usage) return { usage: obj.usage };
    return null;
  }

  /**
   * POST `body` to `url` and feed each normalized event to onEvent until the stream ends.
   * Throws HttpError for an error status, or the fetch's AbortError after Stop.
   */
  async function streamRequest(url, body, signal, onEvent) {
    const res = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
      body: JSON.stringify(body),
      signal,
      cache: "no-store",
    });
    if (!res.ok) throw await httpErrorFrom(res);
    const type = res.headers.get("Content-Type") || "";
    if (!type.includes("text/event-stream") || !res.body) {
      // A server that ignored "stream": one JSON answer.
      const obj = await res.json();
      const choice = obj.choices && obj.choices[0];
      const text = obj.text ?? (choice && (choice.message ? choice.message.content : choice.text)) ?? "";
      onEvent({ token: String(text) });
      onEvent({ done: true, finish_reason: obj.finish_reason ?? (choice && choice.finish_reason), usage: obj.usage });
      return;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    const parser = createSSEParser((data) => {
      const event = normalizeEvent(data);
      if (event) onEvent(event);
    });
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(decoder.decode(value, { stream: true }));
    }
    parser.push(decoder.decode());
    parser.end();
  }

  /** The request for the reply that follows `messages` (the conversation so far). */
  function buildRequest(messages) {
    const s = state.settings;
    const sampling = { temperature: s.temperature, top_k: s.top_k, top_p: s.top_p,
                       repetition_penalty: s.repetition_penalty, stream: true };
    if (s.raw) {
      const last = messages[messages.length - 1];
      return { url: ENDPOINTS.raw, body: { prompt: last.content, raw: true, max_new_tokens: s.max_new_tokens, ...sampling } };
    }
    const history = messages
      .filter((m) => shownText(m))
      .map((m) => ({ role: m.role, content: shownText(m) }));
    return {
      url: ENDPOINTS.chat,
      body: {
        model: state.modelName || "gpt2-instruct",
        messages: history,
        max_tokens: s.max_new_tokens,
        stream_options: { include_usage: true },
        ...sampling,
        ...(s.json ? { response_format: responseFormat(s.json_schema)[0] } : {}),
      },
    };
  }

  /* ---------- health ---------- */

  function setHealth(status, label) {
    state.health = status;
    el.health.dataset.state = status;
    el.healthLabel.textContent = label;
    el.healthMini.dataset.state = status; // the phone layout's dot in the top bar
    el.healthMini.setAttribute("aria-label", `Server: ${label}`);
    el.healthMini.title = label;
  }

  async function pollHealth() {
    clearTimeout(state.healthTimer);
    try {
      const res = await fetch(ENDPOINTS.health, { headers: authHeaders(), cache: "no-store", signal: AbortSignal.timeout(5000) });
      let body = null;
      try { body = await res.json(); } catch { /* empty */ }
      if (res.ok) {
        if (!state.paramsLoaded) state.paramsLoaded = await loadServerParams(); // before "ready" shows
        if (!state.modelName) await loadModelName();
        const waiting = body && body.queue ? Number(body.queue.waiting) || 0 : 0;
        setHealth("ready", `Ready · ${state.modelName || "model loaded"}${waiting ? ` · ${waiting} waiting` : ""}`);
        el.modelInfo.textContent = body && body.device
          ? `Model ${state.modelName || "?"} on ${body.device}${body.dtype ? ` (${body.dtype})` : ""}` : "";
        el.prompt.placeholder = state.settings.raw ? "Text for the model to continue…" : `Message ${state.modelName || "the model"}…`;
      } else if (res.status === 503) {
        if (body && body.status === "error") setHealth("down", "Model failed to load");
        else setHealth("loading", "Loading model…");
      } else {
        setHealth("down", `Server error ${res.status}`);
      }
    } catch {
      setHealth("down", "Server unreachable");
    }
    state.healthTimer = setTimeout(pollHealth, HEALTH_EVERY_MS[state.health] || 5000);
  }

  /* ---------- rendering ---------- */

  function renderChatList() {
    el.chatList.replaceChildren();
    const chats = [...state.chats].sort((a, b) => b.updated - a.updated);
    el.chatListEmpty.hidden = chats.length > 0;
    el.chatList.hidden = chats.length === 0;
    for (const chat of chats) {
      const li = document.createElement("li");
      li.className = "chat-item";
      li.dataset.id = chat.id;
      const open = document.createElement("button");
      open.type = "button";
      open.className = "chat-open";
      open.textContent = chat.title || "New chat";
      open.title = chat.title || "New chat";
      if (chat.id === state.currentId) open.setAttribute("aria-current", "true");
      open.addEventListener("click", () => {
        openChat(chat.id);
        closeDrawers();
        el.prompt.focus();
      });
      const del = document.createElement("button");
      del.type = "button";
      del.className = "chat-delete";
      del.setAttribute("aria-label", `Delete chat: ${chat.title || "New chat"}`);
      del.append(icon("M5 7h14M10 7V5h4v2M7 7l1 12h8l1-12"));
      del.addEventListener("click", () => confirmDelete(del, chat));
      li.append(open, del);
      el.chatList.append(li);
    }
  }

  /** First click arms the button, a second click within 3 s deletes. */
  function confirmDelete(button, chat) {
    if (button.dataset.armed) {
      deleteChat(chat.id);
      return;
    }
    button.dataset.armed = "1";
    button.classList.add("armed");
    const label = document.createElement("span");
    label.textContent = "Delete?";
    button.replaceChildren(label);
    button.setAttribute("aria-label", `Confirm: delete chat ${chat.title || ""}`);
    setTimeout(() => {
      if (!button.isConnected) return;
      delete button.dataset.armed;
      button.classList.remove("armed");
      button.replaceChildren(icon("M5 7h14M10 7V5h4v2M7 7l1 12h8l1-12"));
      button.setAttribute("aria-label", `Delete chat: ${chat.title || "New chat"}`);
    }, 3000);
  }

  function icon(path) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    const p = document.createElementNS(ns, "path");
    p.setAttribute("d", path);
    svg.append(p);
    return svg;
  }

  function renderMessages() {
    const chat = currentChat();
    const messages = chat ? chat.messages : [];
    el.title.textContent = chat && chat.title ? chat.title : "New chat";
    document.title = chat && chat.title ? `${chat.title} · gpt2-instruct` : "gpt2-instruct · chat";
    el.empty.hidden = messages.length > 0;
    el.messages.replaceChildren(...messages.map((m, i) => messageNode(m, i === messages.length - 1)));
    state.stick = true;
    scrollToBottom();
  }

  function messageNode(message, isLast) {
    const node = el.template.content.firstElementChild.cloneNode(true);
    node.dataset.id = message.id;
    node.classList.add(message.role);
    node.querySelector(".msg-role").textContent = message.role === "user" ? "You" : (state.modelName || "gpt2-instruct");
    fillMessage(node, message, isLast);
    return node;
  }

  /** What a message shows: answers without the model's leading space or newline. */
  const shownText = (message) => (message.role === "assistant" ? message.content.replace(/^\s+/, "") : message.content);

  /** Put a message's text, status and actions into its node (text as text only). */
  function fillMessage(node, message, isLast) {
    const meta = message.meta || {};
    const shown = shownText(message);
    node.querySelector(".content").textContent = shown;
    const bubble = node.querySelector(".bubble");
    bubble.classList.toggle("streaming", !!meta.streaming);
    bubble.classList.toggle("waiting", !!meta.streaming && !shown);
    const failure = node.querySelector(".msg-error");
    failure.hidden = !meta.failure;
    failure.textContent = meta.failure ? failureText(meta.failure) : "";
    node.setAttribute("aria-busy", meta.streaming ? "true" : "false");
    node.querySelector(".msg-meta").textContent = metaText(message);
    const actions = node.querySelector(".msg-actions");
    actions.replaceChildren();
    if (message.role === "assistant" && !meta.streaming) {
      if (shown) actions.append(actionButton("Copy", "copy", () => copyText(shown, actions)));
      if (isLast) actions.append(actionButton("Regenerate", "regenerate", regenerate));
    }
    if (message.role === "user" && isLast && !state.busy) {
      const retry = actionButton("Retry", "retry", regenerate);
      retry.disabled = !!(meta.failure && meta.failure.until > Date.now());  // rate limited: wait first
      actions.append(retry);
    }
    node.querySelector(".msg-foot").hidden = !actions.childElementCount && !node.querySelector(".msg-meta").textContent;
  }

  /** A failed request's note under its message; {s} counts down to Retry-After. */
  function failureText(failure) {
    const left = failure.until ? Math.ceil((failure.until - Date.now()) / 1000) : 0;
    if (left > 0) return failure.text.replace("{s}", `${left} s`);
    return failure.text.includes("{s}") ? "You can try again now." : failure.text;
  }

  /** Re-render a failed message every second until its Retry-After has passed. */
  function countDown(chat, message) {
    clearInterval(state.failureTimer);
    if (!message.meta.failure || !message.meta.failure.until) return;
    state.failureTimer = setInterval(() => {
      if (!message.meta.failure || message.meta.failure.until <= Date.now() - 1000) clearInterval(state.failureTimer);
      updateStreamingNode(chat, message);
    }, 1000);
  }

  function metaText(message) {
    const meta = message.meta || {};
    if (message.role !== "assistant" || meta.streaming) return "";
    const parts = [];
    if (meta.stopped) parts.push("stopped");
    else if (meta.finish_reason === "length") parts.push("hit the token limit");
    const tokens = meta.completion_tokens;
    if (tokens) {
      parts.push(`${tokens} token${tokens === 1 ? "" : "s"}`);
      if (meta.ms) parts.push(`${(tokens / (meta.ms / 1000)).toFixed(1)} tok/s`);
    }
    if (meta.raw) parts.push("raw");
    return parts.join(" · ");
  }

  const ACTION_ICONS = {
    copy: "M9 9h10v10H9zM5 15V5h10",
    regenerate: "M20 11a8 8 0 1 0-2.3 5.7M20 5v6h-6",
    retry: "M20 11a8 8 0 1 0-2.3 5.7M20 5v6h-6",
  };

  function actionButton(label, kind, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = `action action-${kind}`;
    b.append(icon(ACTION_ICONS[kind]));
    const text = document.createElement("span");
    text.textContent = label;
    b.append(text);
    b.addEventListener("click", onClick);
    return b;
  }

  async function copyText(text, actions) {
    let ok = false;
    try {
      await navigator.clipboard.writeText(text);
      ok = true;
    } catch {
      const area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.className = "visually-hidden";
      document.body.append(area);
      area.select();
      try { ok = document.execCommand("copy"); } catch { ok = false; }
      area.remove();
    }
    const label = actions.querySelector(".action-copy span");
    if (label) {
      label.textContent = ok ? "Copied" : "Copy failed";
      setTimeout(() => { if (label.isConnected) label.textContent = "Copy"; }, 1500);
    }
  }

  function updateStreamingNode(chat, message) {
    if (chat.id !== state.currentId) return;
    const node = el.messages.querySelector(`li[data-id="${message.id}"]`);
    if (!node) return;
    fillMessage(node, message, chat.messages[chat.messages.length - 1] === message);
    if (state.stick) scrollToBottom();
  }

  /* ---------- scrolling ---------- */

  function scrollToBottom() {
    el.scroller.scrollTop = el.scroller.scrollHeight;
    el.jump.hidden = true;
  }

  function onScroll() {
    const gap = el.scroller.scrollHeight - el.scroller.scrollTop - el.scroller.clientHeight;
    state.stick = gap < 48;
    el.jump.hidden = state.stick;
  }

  /* ---------- chats ---------- */

  function openChat(id) {
    state.currentId = id;
    writeJSON(KEYS.current, id);
    renderChatList();
    renderMessages();
  }

  function newChat() {
    state.currentId = null;
    writeJSON(KEYS.current, null);
    hideBanner();
    renderChatList();
    renderMessages();
    closeDrawers();
    el.prompt.focus();
  }

  function deleteChat(id) {
    if (state.busy && state.busy.chatId === id) state.busy.controller.abort();
    state.chats = state.chats.filter((c) => c.id !== id);
    if (state.currentId === id) state.currentId = null;
    saveChats();
    renderChatList();
    renderMessages();
  }

  function ensureChat(firstText) {
    let chat = currentChat();
    if (!chat) {
      chat = { id: newId(), title: "", created: Date.now(), updated: Date.now(), messages: [] };
      state.chats.push(chat);
      state.currentId = chat.id;
    }
    if (!chat.title) chat.title = titleFrom(firstText);
    return chat;
  }

  function titleFrom(text) {
    const line = text.replace(/\s+/g, " ").trim();
    return line.length > 48 ? `${line.slice(0, 47)}…` : line;
  }

  /* ---------- sending ---------- */

  function setBusy(busy) {
    state.busy = busy;
    el.send.hidden = !!busy;
    el.stop.hidden = !busy;
    el.composer.classList.toggle("busy", !!busy);
    el.app.dataset.busy = busy ? "true" : "false";
    // Screen readers hear the answer once it is complete, not token by token.
    el.messages.setAttribute("aria-busy", busy ? "true" : "false");
    updateSendEnabled();
  }

  function updateSendEnabled() {
    el.send.disabled = !el.prompt.value.trim() || !!state.busy;
  }

  function sendPrompt(text) {
    if (state.busy || badSchema()) return;
    const value = text.replace(/\s+$/, "");
    if (!value.trim()) return;
    const chat = ensureChat(value);
    chat.messages.push({ id: newId(), role: "user", content: value, meta: {} });
    chat.updated = Date.now();
    el.prompt.value = "";
    autosize();
    renderChatList();
    renderMessages();
    generateReply(chat);
  }

  /** Drop the last answer (if any) and ask again for the last user message. */
  function regenerate() {
    if (state.busy) {
      showBanner("An answer is still being written (maybe in another chat): stop it first.", "info");
      return;
    }
    const chat = currentChat();
    if (!chat || !chat.messages.length || badSchema()) return;
    const previous = chat.messages[chat.messages.length - 1].role === "assistant" ? chat.messages.pop() : null;
    if (!chat.messages.length) return;
    renderMessages();
    generateReply(chat, previous);
  }

  /** The room a 400 says max_tokens has for this prompt ("... can be at most N ..."), or null. */
  function roomFrom(err) {
    if (!(err instanceof HttpError) || !["max_tokens", "max_new_tokens"].includes(err.param)) return null;
    const m = /can be at most (\d+)/.exec(err.message);
    return m && Number(m[1]) >= 1 ? Number(m[1]) : null;
  }

  /**
   * Stream the answer to the conversation's last message. A failure leaves a note and Retry on the
   * message it belongs to (the question, or the answer a regenerate would have replaced, which
   * comes back), never an empty answer.
   */
  async function generateReply(chat, previous = null) {
    hideBanner();
    clearInterval(state.failureTimer);
    for (const m of chat.messages) if (m.meta) delete m.meta.failure;
    let { url, body } = buildRequest(chat.messages);
    const message = { id: newId(), role: "assistant", content: "", meta: { streaming: true, raw: !!body.raw } };
    const controller = new AbortController();
    setBusy({ controller, chatId: chat.id, messageId: message.id });
    chat.messages.push(message);
    chat.updated = Date.now();
    renderMessages();
    const sentAt = performance.now(); // the rate covers the whole answer: a one-token reply has one too
    let pieces = 0;
    let failure = null;
    const onEvent = (event) => {
      if (event.error) {
        const e = event.error;
        throw new HttpError(Number(e.status) || 500, e.code || e.type, e.message || String(e));
      }
      if (event.token) {
        message.content += event.token;
        pieces += 1;
        updateStreamingNode(chat, message);
        saveChatsSoon();
      }
      if (event.finish_reason) message.meta.finish_reason = event.finish_reason;
      if (event.usage && event.usage.completion_tokens != null) {
        message.meta.completion_tokens = event.usage.completion_tokens;
      }
    };
    try {
      try {
        await streamRequest(url, body, controller.signal, onEvent);
      } catch (err) {
        // Max new tokens is an upper bound: when the prompt leaves less room, take what there is.
        const room = roomFrom(err);
        if (room == null || pieces) throw err;
        body = { ...body, [body.max_tokens != null ? "max_tokens" : "max_new_tokens"]: room };
        await streamRequest(url, body, controller.signal, onEvent);
      }
    } catch (err) {
      if (err && err.name === "AbortError") {
        message.meta.stopped = true;
      } else {
        controller.abort(); // close the connection so the server stops too
        const [text, , until] = describeError(err);
        failure = { text, until };
      }
    } finally {
      message.meta.streaming = false;
      if (message.meta.completion_tokens == null && pieces) message.meta.completion_tokens = pieces;
      if (pieces) message.meta.ms = Math.max(1, performance.now() - sentAt);
      let failed = message;
      if (!message.content && (failure || message.meta.stopped)) {
        // Nothing to keep: drop the empty answer, and give back the one a regenerate replaced.
        chat.messages = chat.messages.filter((m) => m !== message);
        if (previous) chat.messages.push(previous);
        failed = chat.messages[chat.messages.length - 1];
      }
      if (failure && failed) failed.meta = { ...failed.meta, failure };
      chat.updated = Date.now();
      setBusy(null);
      saveChats();
      if (chat.id === state.currentId) {
        const stick = state.stick;
        renderMessages();
        if (!stick) state.stick = false;
      }
      if (failure && failed) countDown(chat, failed);
    }
  }

  function stopGenerating() {
    if (state.busy) state.busy.controller.abort();
  }

  /* ---------- composer ---------- */

  function autosize() {
    el.prompt.style.height = "auto";
    el.prompt.style.height = `${Math.min(el.prompt.scrollHeight, 220)}px`;
    updateSendEnabled();
  }

  function onPromptKey(event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey && !event.ctrlKey && !event.metaKey) {
      event.preventDefault();
      if (!state.busy) sendPrompt(el.prompt.value);
    }
  }

  /* ---------- drawers ---------- */

  function settingsVisible() {
    return !el.app.classList.contains("settings-closed");
  }

  function setSettingsOpen(open, { remember = true, focus = true } = {}) {
    el.app.classList.toggle("settings-closed", !open);
    el.openSettings.setAttribute("aria-expanded", String(open));
    if (remember && !NARROW_SETTINGS.matches) writeJSON(KEYS.panel, open);
    syncInert();
    if (open && focus) $("temperature").focus();
    if (!open && focus) el.openSettings.focus();
  }

  function setSidebarOpen(open, { focus = true } = {}) {
    el.app.classList.toggle("sidebar-open", open);
    el.openSidebar.setAttribute("aria-expanded", String(open));
    syncInert();
    if (open && focus) el.newChat.focus();
    if (!open && focus && NARROW_SIDEBAR.matches) el.openSidebar.focus();
  }

  function closeDrawers() {
    if (NARROW_SIDEBAR.matches && el.app.classList.contains("sidebar-open")) setSidebarOpen(false, { focus: false });
    if (NARROW_SETTINGS.matches && settingsVisible()) setSettingsOpen(false, { focus: false });
  }

  /** Hidden drawers leave the tab order; an open drawer on a narrow screen shows a scrim. */
  function syncInert() {
    const sidebarHidden = NARROW_SIDEBAR.matches && !el.app.classList.contains("sidebar-open");
    const settingsHidden = !settingsVisible();
    const sidebarOverlay = NARROW_SIDEBAR.matches && !sidebarHidden;
    const settingsOverlay = NARROW_SETTINGS.matches && !settingsHidden;
    // An open drawer is modal: Tab stays inside it, the rest waits behind the scrim.
    el.sidebar.inert = sidebarHidden || settingsOverlay;
    el.settings.inert = settingsHidden;
    el.main.inert = sidebarOverlay || settingsOverlay;
    el.scrim.hidden = !(sidebarOverlay || settingsOverlay);
  }

  function onLayoutChange() {
    if (NARROW_SETTINGS.matches) setSettingsOpen(false, { remember: false, focus: false });
    else setSettingsOpen(readJSON(KEYS.panel, true) !== false, { remember: false, focus: false });
    if (!NARROW_SIDEBAR.matches) el.app.classList.remove("sidebar-open");
    syncInert();
  }

  /* ---------- wiring ---------- */

  function wire() {
    el.composer.addEventListener("submit", (e) => {
      e.preventDefault();
      sendPrompt(el.prompt.value);
    });
    el.prompt.addEventListener("keydown", onPromptKey);
    el.prompt.addEventListener("input", autosize);
    el.stop.addEventListener("click", () => {
      stopGenerating();
      el.prompt.focus();
    });
    el.newChat.addEventListener("click", newChat);
    el.scroller.addEventListener("scroll", onScroll, { passive: true });
    // Keep the newest text in view when the window or the composer changes size.
    new ResizeObserver(() => { if (state.stick) scrollToBottom(); }).observe(el.scroller);
    el.jump.addEventListener("click", () => {
      state.stick = true;
      scrollToBottom();
    });
    el.bannerClose.addEventListener("click", hideBanner);
    el.suggestions.addEventListener("click", (e) => {
      const b = e.target.closest(".suggestion");
      if (b) sendPrompt(b.textContent);
    });
    el.form.addEventListener("input", onSettingInput);
    el.form.addEventListener("change", onSettingInput);
    el.form.addEventListener("submit", (e) => e.preventDefault());
    el.reset.addEventListener("click", () => {
      const key = state.settings.api_key;
      state.settings = { ...DEFAULTS, ...state.serverDefaults, api_key: key };
      el.raw.checked = false;
      el.json.checked = false;
      el.jsonSchema.value = "";
      applyRanges();
      updateMode();
      updateJSON();
      saveSettings();
    });
    el.openSettings.addEventListener("click", () => setSettingsOpen(!settingsVisible()));
    el.closeSettings.addEventListener("click", () => setSettingsOpen(false));
    el.openSidebar.addEventListener("click", () => setSidebarOpen(true));
    el.closeSidebar.addEventListener("click", () => setSidebarOpen(false));
    el.scrim.addEventListener("click", closeDrawers);
    document.addEventListener("keydown", (e) => {
      if (e.key !== "Escape") return;
      if (NARROW_SIDEBAR.matches && el.app.classList.contains("sidebar-open")) setSidebarOpen(false);
      else if (NARROW_SETTINGS.matches && settingsVisible()) setSettingsOpen(false);
      else if (state.busy) stopGenerating();
    });
    NARROW_SETTINGS.addEventListener("change", onLayoutChange);
    NARROW_SIDEBAR.addEventListener("change", onLayoutChange);
    window.addEventListener("storage", (e) => {
      // Another tab changed the chats: show its version unless we are mid-reply.
      if (e.key === KEYS.chats && !state.busy) {
        loadChats();
        renderChatList();
        renderMessages();
      }
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) pollHealth();
    });
    window.addEventListener("pagehide", () => { if (state.saveTimer) saveChats(); });
  }

  function start() {
    loadSettings();
    loadChats();
    wire();
    onLayoutChange();
    renderChatList();
    renderMessages();
    setBusy(null);
    autosize();
    loadServerParams(); // early ranges; asked again once the model is ready (its context is known then)
    pollHealth();
    el.prompt.focus();
  }

  // Exposed for the browser tests and for debugging in the console.
  window.gpt2i = { createSSEParser, normalizeEvent, state };
  start();
})();
