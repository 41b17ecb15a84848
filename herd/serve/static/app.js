// herd's chat page: talks to this server's /v1 API like any client (streamed chat completions over SSE, /v1/models),
// keeps conversations in localStorage and the API key in sessionStorage. It knows nothing of herd's internals.
// NOTE: model output is untrusted text. It only ever reaches the page as text nodes (append(string), textContent)
// inside elements built here; nothing the server sends is parsed as HTML.
"use strict";

const STORE = "herd.conversations";
const SETTINGS = "herd.settings";
const KEY_STORE = "herd.apiKey";
const MAX_IMAGE_BYTES = 20 * 1024 * 1024;
const RENDER_EVERY_MS = 40;          // a streaming answer is re-rendered at most this often

const $ = (id) => document.getElementById(id);
const state = {
  conversations: [], currentId: null, models: [], attachments: [], editing: null,
  busy: null,                        // {conv, msg, controller} while an answer streams
  settings: {model: "", system: "", temperature: "", top_p: "", max_tokens: ""},
};

function el(tag, text) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, onClick, className) {
  const b = el("button", label);
  b.type = "button";
  if (className) b.className = className;
  b.addEventListener("click", onClick);
  return b;
}

// ---- storage ------------------------------------------------------------------------------------------------------
function load() {
  try {
    state.conversations = JSON.parse(localStorage.getItem(STORE) || "[]");
    Object.assign(state.settings, JSON.parse(localStorage.getItem(SETTINGS) || "{}"));
  } catch (e) {
    notice(`Saved conversations could not be read (${e.message}); starting empty.`);
    state.conversations = [];
  }
  const newest = [...state.conversations].sort((a, b) => b.updated - a.updated)[0];
  state.currentId = newest ? newest.id : null;
}

function save() {
  try {
    localStorage.setItem(STORE, JSON.stringify(state.conversations));
    localStorage.setItem(SETTINGS, JSON.stringify(state.settings));
  } catch (e) {
    notice(`This browser's storage is full (${e.name}): the latest changes stay only until the page closes. ` +
           "Images take the most room; delete or export old conversations.");
  }
}

function current() {
  return state.conversations.find((c) => c.id === state.currentId) || null;
}

function newConversation() {
  const now = Date.now();
  const conv = {id: `c${now.toString(36)}${Math.random().toString(36).slice(2, 7)}`, title: "New chat",
                created: now, updated: now, model: $("model").value, system: state.settings.system, messages: []};
  state.conversations.push(conv);
  state.currentId = conv.id;
  return conv;
}

// ---- notices and errors -------------------------------------------------------------------------------------------
function notice(text) {
  const box = $("notice");
  box.replaceChildren(el("span", text), button("Dismiss", () => { box.hidden = true; }, "link"));
  box.hidden = false;
}

async function errorText(r) {
  let raw = "", body = null;
  try {
    raw = await r.text();
    body = JSON.parse(raw);
  } catch (e) { /* not JSON: show the raw text */ }
  const err = (body && body.error) || {};
  const said = err.message || raw || r.statusText;
  if (r.status === 429) return `The server is busy: every batch slot and queue place is taken (HTTP 429). ` +
                               `Try again in a moment. The server said: ${said}`;
  if (err.code === "context_length_exceeded") return `Too long for the model's context (HTTP 400): ${said} ` +
                                                     "Start a new chat, shorten the messages or lower max_tokens.";
  if (r.status === 401) return `The server refused the API key (HTTP 401): ${said}`;
  if (r.status >= 500) return `Server error (HTTP ${r.status}): ${said}`;
  return `The server refused the request (HTTP ${r.status}): ${said}`;
}

const FINISH_NOTES = {
  length: "Cut short: max_tokens or the context was reached (finish_reason: length).",
  content_filter: "Withheld by the server's guard (finish_reason: content_filter).",
  tool_calls: "The model asked to call a tool (finish_reason: tool_calls); this page runs no tools.",
};

// ---- API and the key ----------------------------------------------------------------------------------------------
function api(path, options = {}) {
  const key = sessionStorage.getItem(KEY_STORE);
  const headers = {...(options.headers || {})};
  if (key) headers.Authorization = `Bearer ${key}`;
  return fetch(path, {...options, headers});
}

function askKey(message) {
  const error = $("key-error");
  error.textContent = message || "";
  error.hidden = !message;
  $("key-input").value = "";
  if (!$("key-dialog").open) $("key-dialog").showModal();
}

async function loadModels() {
  let r;
  try {
    r = await api("v1/models");
  } catch (e) {
    notice(`Could not reach the server for its model list: ${e.message}`);
    return;
  }
  if (r.status === 401) {
    const refused = sessionStorage.getItem(KEY_STORE) !== null;
    const text = await errorText(r);
    sessionStorage.removeItem(KEY_STORE);
    askKey(refused ? text : null);
    return;
  }
  if (!r.ok) {
    notice(`The model list could not be loaded. ${await errorText(r)}`);
    return;
  }
  state.models = (await r.json()).data;
  fillModelPicker();
}

function fillModelPicker() {
  const picker = $("model");
  picker.replaceChildren(...state.models.map((m) => {
    const option = el("option", m.vision ? `${m.id} (vision)` : m.id);
    option.value = m.id;
    return option;
  }));
  const conv = current();
  const wanted = (conv && conv.model) || state.settings.model;
  if (state.models.some((m) => m.id === wanted)) picker.value = wanted;
  showModelKind();
}

function pickedModel() {
  return state.models.find((m) => m.id === $("model").value) || null;
}

function showModelKind() {
  const m = pickedModel();
  $("model-kind").textContent = m ? (m.vision ? "reads images" : "text only") : "";
  $("attach").setAttribute("aria-disabled", m && m.vision ? "false" : "true");
}

function textOnlyReason() {
  const m = pickedModel();
  if (!m) return "The model list has not loaded, so this page cannot tell whether the model reads images.";
  if (m.vision) return null;
  return `Model "${m.id}" reads text only, so images cannot be sent to it. Pick a model marked "(vision)" ` +
         "(a Llama 4 model with a vision encoder) to attach images.";
}

// ---- Markdown -> DOM (text nodes only) ----------------------------------------------------------------------------
const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(\s+#+)?\s*$/;
const RULE = /^ {0,3}([-*_])( *\1){2,} *$/;
const QUOTE = /^ {0,3}>/;
const LIST_ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])\s+(.*)$/;
const BLOCK_STARTS = [FENCE, HEADING, RULE, QUOTE, LIST_ITEM];
// code spans | **strong** | __strong__ | *em* | [label](url) | bare http(s) URL
const INLINE = new RegExp([
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source,
  /\*\*([^\s*](?:[\s\S]*?[^\s*])?)\*\*/.source,
  /\b__([^\s_](?:[\s\S]*?[^\s_])?)__\b/.source,
  /\*([^\s*](?:[^*]*?[^\s*])?)\*/.source,
  /\[([^\]\n]+)\]\(\s*([^()\s]+)\s*\)/.source,
  /(https?:\/\/[^\s<>"'`]*[^\s<>"'`.,;:!?)\]])/.source,
].join("|"), "g");

function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      i++;
    } else if ((m = FENCE.exec(line))) {
      const close = new RegExp(`^ {0,3}${m[1][0] === "`" ? "`" : "~"}{${m[1].length},}\\s*$`);
      const body = [];
      for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
      i++;                           // the closing fence (absent while the answer still streams)
      out.append(codeBlock(body.join("\n"), m[2]));
    } else if ((m = HEADING.exec(line))) {
      const h = el(`h${m[1].length}`);
      inline(m[2], h);
      out.append(h);
      i++;
    } else if (RULE.test(line)) {
      out.append(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const quoted = [];
      for (; i < lines.length && QUOTE.test(lines[i]); i++) quoted.push(lines[i].replace(/^ {0,3}> ?/, ""));
      const q = el("blockquote");
      q.append(renderMarkdown(quoted.join("\n")));
      out.append(q);
    } else if (LIST_ITEM.test(line)) {
      i = renderMarkdownList(lines, i, out);
    } else {
      const p = el("p");
      let first = true;
      for (; i < lines.length && lines[i].trim() && (first || !BLOCK_STARTS.some((r) => r.test(lines[i]))); i++) {
        if (!first) p.append(el("br"));
        inline(lines[i], p);
        first = false;
      }
      out.append(p);
    }
  }
  return out;
}

function renderMarkdownList(lines, i, out) {
  const ordered = /\d/.test(LIST_ITEM.exec(lines[i])[2]);
  const list = el(ordered ? "ol" : "ul");
  if (ordered) list.start = parseInt(LIST_ITEM.exec(lines[i])[2], 10);
  let item = null;
  while (i < lines.length) {
    const m = LIST_ITEM.exec(lines[i]);
    if (m && /\d/.test(m[2]) === ordered) {
      item = el("li");
      inline(m[3], item);
      list.append(item);
    } else if (item && /^\s{2,}\S/.test(lines[i]) && !FENCE.test(lines[i])) {
      item.append(el("br"));        // an indented continuation line (or a nested item, shown flat)
      inline(lines[i].trim(), item);
    } else {
      break;
    }
    i++;
  }
  out.append(list);
  return i;
}

function inline(text, parent) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(text.slice(last, m.index));
    if (m[1] !== undefined) {
      parent.append(el("code", m[2]));
    } else if (m[3] !== undefined || m[4] !== undefined) {
      const strong = el("strong");
      inline(m[3] !== undefined ? m[3] : m[4], strong);
      parent.append(strong);
    } else if (m[5] !== undefined) {
      const em = el("em");
      inline(m[5], em);
      parent.append(em);
    } else if (m[6] !== undefined) {
      parent.append(link(m[7], m[6]));
    } else {
      parent.append(link(m[8], m[8]));
    }
    last = m.index + m[0].length;
  }
  if (last < text.length) parent.append(text.slice(last));
}

function link(url, label) {
  // only web and mail links become links: javascript:, data: and the rest stay visible text
  if (!/^(https?:\/\/|mailto:)/i.test(url)) return document.createTextNode(label === url ? url : `${label} (${url})`);
  const a = el("a", label);
  a.href = url;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  return a;
}

function codeBlock(code, lang) {
  const box = el("div");
  box.className = "code";
  const bar = el("div");
  bar.className = "code-bar";
  const copy = button("Copy", () => copyText(code, copy), "copy");
  bar.append(el("span", lang || "code"), copy);
  const pre = el("pre");
  pre.append(el("code", code));
  box.append(bar, pre);
  return box;
}

async function copyText(text, feedback) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {                      // no Clipboard API (plain http on another host): the older way
    const area = el("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    if (!ok) {
      notice(`Copying failed: this browser gave no clipboard access (${e.message}).`);
      return;
    }
  }
  feedback.textContent = "Copied";
  setTimeout(() => { feedback.textContent = "Copy"; }, 1500);
}

// ---- conversation view ----------------------------------------------------------------------------------------------
function renderConversation() {
  const conv = current();
  const box = $("messages");
  if (!conv || conv.messages.length === 0) {
    box.replaceChildren(el("p", "Ask something below. Answers stream from this server's /v1/chat/completions; " +
                                "conversations stay in this browser."));
    box.firstChild.className = "empty";
  } else {
    box.replaceChildren(...conv.messages.map((msg, i) => messageElement(conv, msg, i)));
  }
  $("system").value = conv ? conv.system || "" : state.settings.system;
  renderConversationList();
}

function lastIndex(conv, role) {
  for (let i = conv.messages.length - 1; i >= 0; i--) if (conv.messages[i].role === role) return i;
  return -1;
}

function messageElement(conv, msg, i) {
  const box = el("article");
  box.className = `msg ${msg.role}`;
  box.dataset.index = i;
  box.append(el("div", msg.role === "user" ? "You" : msg.model || "assistant"));
  box.firstChild.className = "msg-head";
  if (state.editing === i) {
    box.append(editor(conv, msg, i));
    return box;
  }
  const body = el("div");
  body.className = "msg-body";
  if (msg.role === "user") body.textContent = msg.content;      // the user's own text, shown as typed
  else body.append(renderMarkdown(msg.content));
  box.append(body);
  if (msg.images && msg.images.length) box.append(thumbnails(msg.images));
  if (msg.role === "assistant") box.append(...statusLines(msg));
  const idle = !state.busy;
  if (idle && msg.role === "user" && i === lastIndex(conv, "user")) {
    box.append(button("Edit", () => { state.editing = i; renderConversation(); }, "action"));
  }
  if (idle && msg.role === "assistant" && i === conv.messages.length - 1) {
    box.append(button("Regenerate", () => regenerate(conv), "action"));
  }
  return box;
}

function statusLines(msg) {
  const note = (text, className) => { const line = el("div", text); line.className = className; return line; };
  const lines = [];
  if (state.busy && state.busy.msg === msg) {
    lines.push(note(msg.content ? "streaming…" : "waiting for the first token…", "msg-note"));
  }
  if (msg.toolCalls) lines.push(note(`tool calls: ${msg.toolCalls}`, "msg-note"));
  if (msg.stats) lines.push(note(statsText(msg.stats), "stats"));
  if (msg.stopped) lines.push(note("Stopped: the connection was closed, which cancels the request on the server.", "msg-note stopped"));
  if (FINISH_NOTES[msg.finish]) lines.push(note(FINISH_NOTES[msg.finish], "msg-note finish"));
  if (msg.error) lines.push(note(msg.error, "msg-note error"));
  return lines;
}

function statsText(s) {
  const parts = [];
  if (s.ttft !== undefined) parts.push(`TTFT ${s.ttft.toFixed(2)} s`);
  if (s.tokensPerS !== undefined) parts.push(`${s.tokensPerS.toFixed(1)} tokens/s`);
  if (s.prompt !== undefined) parts.push(`${s.prompt} prompt + ${s.completion} completion tokens`);
  return parts.join(" · ");
}

function thumbnails(urls, onRemove) {
  const row = el("div");
  row.className = "thumbs";
  urls.forEach((url, k) => {
    const img = el("img");
    img.src = url;                   // data: URLs of the user's own files
    img.alt = `image ${k + 1}`;
    row.append(img);
    if (onRemove) row.append(button("×", () => onRemove(k), "remove"));
  });
  return row;
}

function editor(conv, msg, i) {
  const form = el("div");
  form.className = "editor";
  const area = el("textarea");
  area.value = msg.content;
  area.rows = 3;
  const submit = () => {
    conv.messages.splice(i + 1);
    msg.content = area.value;
    state.editing = null;
    answer(conv);
  };
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
    if (e.key === "Escape") { state.editing = null; renderConversation(); }
  });
  form.append(area, button("Save & send", submit, "action"),
              button("Cancel", () => { state.editing = null; renderConversation(); }, "action"));
  setTimeout(() => area.focus(), 0);
  return form;
}

let renderTimer = null;
function scheduleRender(conv, msg) {
  if (renderTimer) return;
  renderTimer = setTimeout(() => {
    renderTimer = null;
    if (conv !== current()) return;
    const i = conv.messages.indexOf(msg);
    const old = $("messages").querySelector(`article[data-index="${i}"]`);
    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    if (old) old.replaceWith(messageElement(conv, msg, i));
    if (atBottom) box.scrollTop = box.scrollHeight;
  }, RENDER_EVERY_MS);
}

// ---- sending and streaming ------------------------------------------------------------------------------------------
function requestBody(conv) {
  const messages = [];
  if (conv.system && conv.system.trim()) messages.push({role: "system", content: conv.system});
  for (const m of conv.messages) {
    if (m.role === "assistant" && !m.content) continue;          // failed or stopped before any text
    if (m.role === "user" && m.images && m.images.length) {
      messages.push({role: "user", content: [{type: "text", text: m.content},
                                             ...m.images.map((url) => ({type: "image_url", image_url: {url}}))]});
    } else {
      messages.push({role: m.role, content: m.content});
    }
  }
  const body = {messages, stream: true, stream_options: {include_usage: true}};
  if (conv.model) body.model = conv.model;
  for (const [name, parse] of [["temperature", parseFloat], ["top_p", parseFloat], ["max_tokens", Number]]) {
    const raw = String(state.settings[name]).trim();
    if (raw !== "" && Number.isFinite(parse(raw))) body[name] = parse(raw);
  }
  return body;
}

function send() {
  const input = $("input");
  const text = input.value;
  if (state.busy || (!text.trim() && !state.attachments.length)) return;
  const conv = current() || newConversation();
  if (conv.messages.length === 0) conv.title = (text.trim() || "Image").slice(0, 48).trim();
  conv.model = $("model").value;
  const images = state.attachments.splice(0);
  conv.messages.push(images.length ? {role: "user", content: text, images} : {role: "user", content: text});
  input.value = "";
  input.style.height = "";           // back from the auto-grown height of a long message
  renderAttachments();
  answer(conv);
}

function regenerate(conv) {
  conv.messages.splice(lastIndex(conv, "user") + 1);
  conv.model = $("model").value;
  answer(conv);
}

async function answer(conv) {
  const msg = {role: "assistant", content: "", model: conv.model || $("model").value};
  const body = requestBody(conv);
  conv.messages.push(msg);
  conv.updated = Date.now();
  const controller = new AbortController();
  state.busy = {conv, msg, controller};
  showBusy();
  save();
  renderConversation();
  $("messages").scrollTop = $("messages").scrollHeight;
  const times = {start: performance.now(), first: null, last: null};
  try {
    const r = await api("v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
                                                body: JSON.stringify(body), signal: controller.signal});
    if (!r.ok) {
      msg.error = await errorText(r);
      if (r.status === 401) {
        sessionStorage.removeItem(KEY_STORE);
        askKey(msg.error);
      }
    } else if (!(await readStream(r, conv, msg, times))) {
      msg.error = msg.error || "The answer's stream ended without [DONE]: the connection was cut.";
    }
  } catch (e) {
    if (e.name === "AbortError") msg.stopped = true;
    else msg.error = `Could not reach the server: ${e.message}`;
  } finally {
    finishAnswer(conv, msg, times);
  }
}

function finishAnswer(conv, msg, times) {
  const stats = {};
  if (times.first !== null) stats.ttft = (times.first - times.start) / 1000;
  if (msg.usage) {
    stats.prompt = msg.usage.prompt_tokens;
    stats.completion = msg.usage.completion_tokens;
    // decode rate: the tokens after the first over the time after the first
    if (stats.completion > 1 && times.last > times.first) {
      stats.tokensPerS = (stats.completion - 1) / ((times.last - times.first) / 1000);
    }
    delete msg.usage;
  }
  if (Object.keys(stats).length) msg.stats = stats;
  state.busy = null;
  conv.updated = Date.now();
  showBusy();
  save();
  if (conv === current()) renderConversation();
}

// Reads the SSE stream into msg; true when it ended with [DONE].
async function readStream(r, conv, msg, times) {
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return false;
    buffer += decoder.decode(value, {stream: true});
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop();
    for (const event of events) {
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return true;
      takeChunk(JSON.parse(data), msg, times);
      scheduleRender(conv, msg);
    }
  }
}

function takeChunk(chunk, msg, times) {
  if (chunk.error) {
    msg.error = `The server ended the answer with an error: ${chunk.error.message}`;
    return;
  }
  if (chunk.usage) msg.usage = chunk.usage;
  const choice = (chunk.choices || [])[0];
  if (!choice) return;
  const delta = choice.delta || {};
  const now = performance.now();
  if (delta.content) {
    if (times.first === null) times.first = now;
    times.last = now;
    msg.content += delta.content;
  }
  for (const call of delta.tool_calls || []) {
    if (times.first === null) times.first = now;
    times.last = now;
    const name = call.function && call.function.name ? `${call.function.name}(` : "";
    msg.toolCalls = (msg.toolCalls || "") + name + ((call.function && call.function.arguments) || "");
  }
  if (choice.finish_reason) msg.finish = choice.finish_reason;
}

function stop() {
  if (state.busy) state.busy.controller.abort();
}

function showBusy() {
  $("send").hidden = !!state.busy;
  $("stop").hidden = !state.busy;
}

// ---- attachments ----------------------------------------------------------------------------------------------------
function addImages(files) {
  const images = [...files].filter((f) => f.type.startsWith("image/"));
  if (files.length && !images.length) {
    notice("Only image files can be attached.");
    return;
  }
  const refusal = textOnlyReason();
  if (refusal) {
    notice(refusal);
    return;
  }
  for (const file of images) {
    if (file.size > MAX_IMAGE_BYTES) {
      notice(`${file.name} is ${(file.size / 1048576).toFixed(1)} MB; images up to 20 MB can be attached.`);
      continue;
    }
    const reader = new FileReader();
    reader.onload = () => { state.attachments.push(reader.result); renderAttachments(); };
    reader.onerror = () => notice(`${file.name} could not be read: ${reader.error}`);
    reader.readAsDataURL(file);
  }
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  if (state.attachments.length) {
    box.append(thumbnails(state.attachments, (k) => { state.attachments.splice(k, 1); renderAttachments(); }));
  }
}

// ---- conversation list ----------------------------------------------------------------------------------------------
function renderConversationList() {
  const list = $("conversations");
  const sorted = [...state.conversations].sort((a, b) => b.updated - a.updated);
  list.replaceChildren(...sorted.map((conv) => {
    const item = el("li");
    if (conv.id === state.currentId) item.className = "current";
    const title = button(conv.title, () => select(conv.id), "title");
    const rename = button("Rename", () => startRename(item, conv), "small");
    const remove = button("Delete", () => confirmDelete(remove, conv), "small");
    item.append(title, rename, remove);
    return item;
  }));
}

function select(id) {
  state.currentId = id;
  state.editing = null;
  $("app").classList.remove("sidebar-open");
  const conv = current();
  if (conv && state.models.some((m) => m.id === conv.model)) $("model").value = conv.model;
  showModelKind();
  renderConversation();
}

function startRename(item, conv) {
  const input = el("input");
  input.value = conv.title;
  input.setAttribute("aria-label", "Conversation name");
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    if (keep && input.value.trim()) conv.title = input.value.trim().slice(0, 80);
    save();
    renderConversationList();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
  item.replaceChildren(input);
  input.focus();
  input.select();
}

function confirmDelete(control, conv) {
  if (control.dataset.armed !== "yes") {      // a second click within 4 s deletes
    control.dataset.armed = "yes";
    control.textContent = "Really delete?";
    setTimeout(() => { control.dataset.armed = ""; control.textContent = "Delete"; }, 4000);
    return;
  }
  if (state.busy && state.busy.conv === conv) stop();
  state.conversations = state.conversations.filter((c) => c !== conv);
  if (state.currentId === conv.id) state.currentId = null;
  save();
  renderConversation();
}

function exportAll() {
  const data = {exported: new Date().toISOString(), conversations: state.conversations};
  const blob = new Blob([JSON.stringify(data, null, 2)], {type: "application/json"});
  const a = el("a");
  a.href = URL.createObjectURL(blob);
  a.download = "herd-conversations.json";
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

// ---- wiring ---------------------------------------------------------------------------------------------------------
function bindSettings() {
  for (const name of ["temperature", "top_p", "max_tokens"]) {
    $(name).value = state.settings[name];
    $(name).addEventListener("input", () => { state.settings[name] = $(name).value; save(); });
  }
  $("system").addEventListener("input", () => {
    state.settings.system = $("system").value;
    const conv = current();
    if (conv) conv.system = $("system").value;
    save();
  });
  $("model").addEventListener("change", () => {
    state.settings.model = $("model").value;
    const conv = current();
    if (conv) conv.model = $("model").value;
    showModelKind();
    if (state.attachments.length && textOnlyReason()) {
      state.attachments = [];
      renderAttachments();
      notice(`Attached images were removed. ${textOnlyReason()}`);
    }
    save();
  });
}

function toggle(buttonId, onToggle) {
  $(buttonId).addEventListener("click", () => {
    const open = onToggle();
    $(buttonId).setAttribute("aria-expanded", String(open));
  });
}

function bindComposer() {
  const input = $("input");
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  input.addEventListener("input", () => {
    input.style.height = "auto";
    input.style.height = `${Math.min(input.scrollHeight, 200)}px`;
  });
  $("stop").addEventListener("click", stop);
  $("attach").addEventListener("click", () => {
    const refusal = textOnlyReason();
    if (refusal) notice(refusal);
    else $("file").click();
  });
  $("file").addEventListener("change", () => { addImages($("file").files); $("file").value = ""; });
  input.addEventListener("paste", (e) => {
    const files = e.clipboardData ? [...e.clipboardData.files] : [];
    if (files.length) { e.preventDefault(); addImages(files); }
  });
  const main = document.querySelector("main");
  main.addEventListener("dragover", (e) => {
    if (e.dataTransfer && [...e.dataTransfer.types].includes("Files")) { e.preventDefault(); main.classList.add("drop"); }
  });
  main.addEventListener("dragleave", () => main.classList.remove("drop"));
  main.addEventListener("drop", (e) => {
    main.classList.remove("drop");
    if (e.dataTransfer && e.dataTransfer.files.length) { e.preventDefault(); addImages(e.dataTransfer.files); }
  });
}

function bindKeyDialog() {
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("key-input").value.trim());
    $("key-dialog").close();
    loadModels();
  });
  $("key-dialog").addEventListener("cancel", () => {
    notice("Without its API key this server refuses every request. Reload the page to enter it.");
  });
}

function start() {
  load();
  bindSettings();
  bindComposer();
  bindKeyDialog();
  $("new-chat").addEventListener("click", () => {
    if (current() && current().messages.length === 0) return;
    newConversation();
    save();
    select(state.currentId);
    $("input").focus();
  });
  $("export").addEventListener("click", exportAll);
  toggle("toggle-sidebar", () => $("app").classList.toggle("sidebar-open"));
  $("close-sidebar").addEventListener("click", () => {
    $("app").classList.remove("sidebar-open");
    $("toggle-sidebar").setAttribute("aria-expanded", "false");
  });
  toggle("toggle-settings", () => { $("settings").hidden = !$("settings").hidden; return !$("settings").hidden; });
  renderConversation();
  loadModels();
}

start();
