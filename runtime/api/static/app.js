// llmc's chat page: streams from this server's /v1/chat/completions. No dependencies, no build step.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "llmc-ui-api-key"; // sessionStorage: forgotten when the tab closes
  const SETTINGS_STORE = "llmc-ui-settings";
  const SETTING_FIELDS = ["system", "temperature", "top-p", "max-tokens"];

  const state = {
    model: null,
    history: [], // {role, content} of the conversation so far
    controller: null, // AbortController of the generation in flight
    apiKey: sessionStorage.getItem(KEY_STORE) || "",
    image: null, // {name, url}: the image attached to the next message, as a data: URL
  };

  // ---- markdown ---------------------------------------------------------------------------
  // A small renderer for what models write: headings, paragraphs, lists, quotes, rules, fenced
  // code, and inline code, bold, italic and links. Every piece of text is escaped before any
  // tag is added, and only the tags written here are ever produced.

  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => ESCAPES[c]);

  function safeUrl(url) {
    if (/[\u0000-\u001f\u007f\s]/.test(url)) return null;
    const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(url);
    if (scheme && !["http", "https", "mailto"].includes(scheme[1].toLowerCase())) return null;
    return url;
  }

  // Bold and italic on text that is already escaped (so the captured groups hold no markup).
  function emphasis(html) {
    return html
      .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
      .replace(/\*(?=[^\s*])([^*]*?[^\s*])\*/g, "<em>$1</em>")
      .replace(/\*(?=[^\s*])([^*])\*/g, "<em>$1</em>")
      .replace(/(^|[^\w])_(?=[^\s_])([^_]*?[^\s_]|[^\s_])_(?!\w)/g, "$1<em>$2</em>");
  }

  function links(text) {
    const re = /\[([^\]\n]+)\]\(([^()\s]+)(?:\s+"[^"\n]*")?\)/g;
    let out = "";
    let last = 0;
    for (let m = re.exec(text); m; m = re.exec(text)) {
      out += emphasis(escapeHtml(text.slice(last, m.index)));
      const url = safeUrl(m[2]);
      out += url
        ? `<a href="${escapeHtml(url)}" target="_blank" rel="noopener noreferrer">${emphasis(escapeHtml(m[1]))}</a>`
        : emphasis(escapeHtml(m[0]));
      last = m.index + m[0].length;
    }
    return out + emphasis(escapeHtml(text.slice(last)));
  }

  function inline(text) {
    const re = /``([^\n]+?)``|`([^`\n]+)`/g; // code spans first: nothing inside them is markdown
    let out = "";
    let last = 0;
    for (let m = re.exec(text); m; m = re.exec(text)) {
      out += links(text.slice(last, m.index)) + `<code>${escapeHtml(m[1] ?? m[2])}</code>`;
      last = m.index + m[0].length;
    }
    return out + links(text.slice(last));
  }

  function codeBlock(code, lang) {
    return (
      `<div class="code"><div class="code-head"><span>${escapeHtml(lang || "code")}</span>` +
      `<button type="button" class="copy">copy</button></div>` +
      `<pre><code>${escapeHtml(code)}</code></pre></div>`
    );
  }

  function renderMarkdown(source) {
    const lines = source.replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let paragraph = [];
    let list = null; // {type: "ul" | "ol", start, items}
    const flushParagraph = () => {
      if (paragraph.length) out.push(`<p>${paragraph.map(inline).join("<br>")}</p>`);
      paragraph = [];
    };
    const flushList = () => {
      if (!list) return;
      const start = list.type === "ol" && list.start !== 1 ? ` start="${list.start}"` : "";
      out.push(`<${list.type}${start}>${list.items.map((item) => `<li>${inline(item)}</li>`).join("")}</${list.type}>`);
      list = null;
    };
    const flush = () => {
      flushParagraph();
      flushList();
    };
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      const fence = /^\s*(`{3,}|~{3,})\s*([^\s`]*)/.exec(line);
      if (fence) {
        flush();
        const marker = fence[1];
        const closing = new RegExp(`^\\s*${marker[0] === "`" ? "`" : "~"}{${marker.length},}\\s*$`);
        const code = [];
        i++;
        while (i < lines.length && !closing.test(lines[i])) code.push(lines[i++]);
        i++; // the closing fence; an unclosed block (still streaming) runs to the end
        out.push(codeBlock(code.join("\n"), fence[2]));
        continue;
      }
      const heading = /^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/.exec(line);
      if (heading) {
        flush();
        const level = heading[1].length;
        out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
        i++;
        continue;
      }
      if (/^\s{0,3}([-*_])(\s*\1){2,}\s*$/.test(line)) {
        flush();
        out.push("<hr>");
        i++;
        continue;
      }
      const bullet = /^\s*[-*+]\s+(.*)$/.exec(line);
      const numbered = /^\s*(\d{1,9})[.)]\s+(.*)$/.exec(line);
      if (bullet || numbered) {
        flushParagraph();
        const type = bullet ? "ul" : "ol";
        if (list && list.type !== type) flushList();
        if (!list) list = { type, start: numbered ? Number(numbered[1]) : 1, items: [] };
        list.items.push(bullet ? bullet[1] : numbered[2]);
        i++;
        continue;
      }
      if (/^\s*>/.test(line)) {
        flush();
        const quoted = [];
        while (i < lines.length && /^\s*>/.test(lines[i])) quoted.push(lines[i++].replace(/^\s*>\s?/, ""));
        out.push(`<blockquote>${renderMarkdown(quoted.join("\n"))}</blockquote>`);
        continue;
      }
      if (!line.trim()) {
        flush();
        i++;
        continue;
      }
      if (list && /^\s{2,}\S/.test(line)) {
        list.items[list.items.length - 1] += ` ${line.trim()}`; // a wrapped list item
        i++;
        continue;
      }
      flushList();
      paragraph.push(line);
      i++;
    }
    flush();
    return out.join("");
  }

  // ---- server calls -----------------------------------------------------------------------

  function headers() {
    const h = { "Content-Type": "application/json" };
    if (state.apiKey) h.Authorization = `Bearer ${state.apiKey}`;
    return h;
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (_) {
      // not JSON: fall through
    }
    return `HTTP ${response.status}`;
  }

  async function loadModel() {
    let response;
    try {
      response = await fetch("/v1/models", { headers: headers() });
    } catch (e) {
      setStatus(`cannot reach the server: ${e.message}`);
      return;
    }
    if (response.status === 401) {
      $("key-box").hidden = false;
      $("api-key").focus();
      setStatus(state.apiKey ? "that API key was refused" : "this server needs an API key");
      $("model").textContent = "locked";
      return;
    }
    if (!response.ok) {
      setStatus(`cannot list models: ${await errorMessage(response)}`);
      return;
    }
    const body = await response.json();
    state.model = body.data[0].id;
    $("model").textContent = state.model;
    // The attach control only where the server describes images (llmc run --vision-proxy).
    $("attach").hidden = !(body.data[0].input_modalities || []).includes("image");
    $("key-box").hidden = true;
    setStatus("");
    updateButtons();
  }

  // Server-sent events from a fetch body: yields each event's data.
  async function* sseData(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r/g, "");
        for (let end = buffer.indexOf("\n\n"); end >= 0; end = buffer.indexOf("\n\n")) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = event
            .split("\n")
            .filter((line) => line.startsWith("data:"))
            .map((line) => line.slice(5).replace(/^ /, ""))
            .join("\n");
          if (data) yield data;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  function numberSetting(id) {
    const value = $(id).value.trim();
    if (!value) return undefined;
    const number = Number(value);
    return Number.isFinite(number) ? number : undefined;
  }

  // ---- the conversation -------------------------------------------------------------------

  function setStatus(text) {
    $("status").textContent = text;
  }

  function updateButtons() {
    const busy = state.controller !== null;
    $("send").disabled = busy || !state.model;
    $("stop").disabled = !busy;
  }

  function nearBottom() {
    const s = $("scroller");
    return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
  }

  function scrollDown() {
    const s = $("scroller");
    s.scrollTop = s.scrollHeight;
  }

  function addMessage(role) {
    $("empty")?.remove();
    const el = document.createElement("div");
    el.className = `msg ${role}`;
    $("messages").append(el);
    return el;
  }

  function addToolCalls(container, calls) {
    for (const call of calls) {
      const details = document.createElement("details");
      details.className = "tool";
      const summary = document.createElement("summary");
      summary.textContent = `tool ${call.name}(${call.arguments})`;
      const result = document.createElement("pre");
      result.textContent = call.result;
      details.append(summary, result);
      container.append(details);
    }
  }

  // Decode speed in tokens/s: the tokens after the first over the time from the first chunk with
  // output to the last (time to first token is prompt processing, not decoding); with one token,
  // or all of them in one chunk, the whole wait from sending the request. null when unknown.
  function tokensPerSecond(tokens, startedMs, firstMs, lastMs) {
    if (!tokens || lastMs === null) return null;
    const spread = tokens > 1 && firstMs !== null && lastMs > firstMs;
    const seconds = (spread ? lastMs - firstMs : lastMs - startedMs) / 1000;
    if (!(seconds > 0)) return null;
    return (spread ? tokens - 1 : tokens) / seconds;
  }

  function setImage(image) {
    state.image = image;
    $("attachment").hidden = image === null;
    $("attachment-name").textContent = image ? image.name : "";
    if (image === null) $("image").value = "";
  }

  function attachFile(file) {
    if (!file) return;
    const reader = new FileReader(); // a data: URL, sent as an image_url content part
    reader.onload = () => setImage({ name: file.name, url: reader.result });
    reader.onerror = () => setStatus(`cannot read ${file.name}`);
    reader.readAsDataURL(file);
  }

  async function send() {
    const text = $("input").value.trim();
    if ((!text && !state.image) || state.controller || !state.model) return;
    $("input").value = "";
    const userBubble = addMessage("user");
    userBubble.textContent = text;
    let userContent = text;
    if (state.image) {
      const note = document.createElement("div");
      note.className = "image-note";
      note.textContent = `image: ${state.image.name}`;
      userBubble.append(note);
      userContent = [{ type: "image_url", image_url: { url: state.image.url } }];
      if (text) userContent.unshift({ type: "text", text });
      setImage(null);
    }
    state.history.push({ role: "user", content: userContent });

    const bubble = addMessage("assistant");
    bubble.dataset.state = "streaming";
    const tools = document.createElement("div");
    const content = document.createElement("div");
    content.className = "content";
    const meta = document.createElement("div");
    meta.className = "meta";
    bubble.append(tools, content, meta);
    scrollDown();

    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...state.history);
    const request = {
      model: state.model,
      messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: numberSetting("temperature"),
      top_p: numberSetting("top-p"),
      max_tokens: numberSetting("max-tokens"),
    };

    const controller = new AbortController();
    state.controller = controller;
    updateButtons();
    setStatus("generating…");
    let answer = "";
    let finish = null;
    let usage = null;
    let pending = false;
    const startedMs = performance.now();
    let firstMs = null;
    let lastMs = null;
    const render = () => {
      pending = false;
      const follow = nearBottom();
      content.innerHTML = renderMarkdown(answer);
      if (follow) scrollDown();
    };
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify(request),
        signal: controller.signal,
      });
      if (response.status === 401) {
        $("key-box").hidden = false;
      }
      if (!response.ok) throw new Error(await errorMessage(response));
      for await (const data of sseData(response.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "generation failed");
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const delta = choice.delta || {};
          // The last token's time: its chunk, or the finish chunk right after it (a token may
          // decode to no text of its own).
          if (delta.content || delta.tool_calls || choice.finish_reason) lastMs = performance.now();
          if (delta.content && firstMs === null) firstMs = lastMs;
          if (delta.content) {
            answer += delta.content;
            if (!pending) {
              pending = true;
              requestAnimationFrame(render);
            }
          }
          if (delta.mcp_calls) addToolCalls(tools, delta.mcp_calls);
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
      bubble.dataset.state = "done";
    } catch (e) {
      if (e.name === "AbortError") {
        bubble.dataset.state = "stopped";
      } else {
        bubble.dataset.state = "error";
        const error = document.createElement("div");
        error.className = "error";
        error.textContent = e.message;
        bubble.append(error);
      }
    } finally {
      state.controller = null;
      render();
      const notes = [];
      if (bubble.dataset.state === "stopped") notes.push("stopped");
      else if (finish === "length") notes.push("cut off at max tokens");
      if (usage) {
        notes.push(`${usage.completion_tokens} tokens`);
        const rate = tokensPerSecond(usage.completion_tokens, startedMs, firstMs, lastMs);
        if (rate !== null) notes.push(`${rate.toFixed(1)} tokens/s`);
      }
      meta.textContent = notes.join(" · ");
      if (answer) state.history.push({ role: "assistant", content: answer });
      updateButtons();
      setStatus("");
      $("input").focus();
    }
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function newChat() {
    stop();
    state.history = [];
    setImage(null);
    $("messages").replaceChildren();
    const empty = document.createElement("p");
    empty.id = "empty";
    empty.textContent = "Send a message to start.";
    $("messages").append(empty);
    $("input").focus();
  }

  // ---- wiring -----------------------------------------------------------------------------

  function loadSettings() {
    try {
      const saved = JSON.parse(localStorage.getItem(SETTINGS_STORE) || "{}");
      for (const id of SETTING_FIELDS) if (typeof saved[id] === "string") $(id).value = saved[id];
    } catch (_) {
      // unreadable settings: start from the defaults
    }
  }

  function saveSettings() {
    const values = {};
    for (const id of SETTING_FIELDS) values[id] = $(id).value;
    localStorage.setItem(SETTINGS_STORE, JSON.stringify(values));
  }

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    } else if (e.key === "Escape") {
      stop();
    }
  });
  $("stop").addEventListener("click", stop);
  $("attach").addEventListener("click", () => $("image").click());
  $("image").addEventListener("change", () => attachFile($("image").files[0]));
  $("remove-image").addEventListener("click", () => setImage(null));
  $("new-chat").addEventListener("click", newChat);
  $("toggle-settings").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
  });
  for (const id of SETTING_FIELDS) $(id).addEventListener("change", saveSettings);
  $("save-key").addEventListener("click", () => {
    state.apiKey = $("api-key").value.trim();
    sessionStorage.setItem(KEY_STORE, state.apiKey);
    loadModel();
  });
  $("api-key").addEventListener("keydown", (e) => {
    if (e.key === "Enter") $("save-key").click();
  });
  $("messages").addEventListener("click", (e) => {
    const button = e.target.closest("button.copy");
    if (!button) return;
    const code = button.closest(".code").querySelector("code").textContent;
    navigator.clipboard?.writeText(code).then(
      () => {
        button.textContent = "copied";
        setTimeout(() => (button.textContent = "copy"), 1200);
      },
      () => {},
    );
  });

  loadSettings();
  updateButtons();
  loadModel();
  window.llmcRenderMarkdown = renderMarkdown; // for tests and the curious
  window.llmcTokensPerSecond = tokensPerSecond;
})();
