// The playground: builds a chat request from the form, streams the reply from the dashboard's
// same-origin endpoint (session cookie + CSRF header; the page never holds an API key), and
// shows the same request as curl, Python and JavaScript with the key masked.
"use strict";

(() => {
  const form = document.getElementById("playground");
  if (!form) return;
  const $ = (id) => document.getElementById(id);
  const list = $("messages");
  const template = $("message-template");
  const status = $("status");
  const sendButton = $("send-button");
  const stopButton = $("stop-button");
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const ENDPOINT = "/dashboard/api/chat/completions";
  let controller = null;

  function addMessage(role, content) {
    const node = template.content.firstElementChild.cloneNode(true);
    node.querySelector(".role").value = role;
    node.querySelector(".content").value = content || "";
    list.appendChild(node);
    relabel();
    return node;
  }

  function fit(textarea) {
    // grow with the text (to a limit) instead of scrolling a three-line box
    textarea.style.height = "auto";
    textarea.style.height = `${Math.min(textarea.scrollHeight + 2, 480)}px`;
  }

  function relabel() {
    list.querySelectorAll(".msg").forEach((node, i) => {
      node.querySelector(".role").setAttribute("aria-label", `Message ${i + 1} role`);
      node.querySelector(".content").setAttribute("aria-label", `Message ${i + 1}`);
    });
  }

  function numberField(id) {
    const raw = $(id).value.trim();
    return raw === "" ? null : Number(raw);
  }

  function buildRequest() {
    const messages = [];
    const system = $("system").value;
    if (system.trim()) messages.push({ role: "system", content: system });
    list.querySelectorAll(".msg").forEach((node) => {
      const content = node.querySelector(".content").value;
      if (content.trim()) messages.push({ role: node.querySelector(".role").value, content });
    });
    const body = { model: $("model").value, messages };
    for (const name of ["temperature", "top_p", "max_tokens", "frequency_penalty", "presence_penalty", "seed"]) {
      const value = numberField(name);
      if (value !== null && !Number.isNaN(value)) body[name] = value;
    }
    const stop = $("stop").value.split("\n").filter((s) => s.length > 0).slice(0, 4);
    if (stop.length) body.stop = stop;
    body.stream = true;
    body.stream_options = { include_usage: true };
    return body;
  }

  function setStatus(state, text) {
    status.dataset.state = state;
    status.textContent = text;
  }

  function showStats(usage, started, firstAt, endedAt, chunks) {
    $("stats").hidden = false;
    $("stat-prompt").textContent = usage ? usage.prompt_tokens : "—";
    $("stat-completion").textContent = usage ? usage.completion_tokens : "—";
    $("stat-total").textContent = usage ? usage.total_tokens : "—";
    $("stat-ttft").textContent = firstAt ? `${Math.round(firstAt - started)} ms` : "—";
    $("stat-latency").textContent = `${Math.round(endedAt - started)} ms`;
    const seconds = (endedAt - (firstAt || started)) / 1000;
    const produced = usage ? usage.completion_tokens : chunks;
    $("stat-speed").textContent = seconds > 0 && produced > 1 ? `${(produced / seconds).toFixed(1)} tokens/s` : "—";
  }

  async function send() {
    if (controller) return;
    const body = buildRequest();
    if (!body.messages.length) { setStatus("error", "Write a message first."); return; }
    const reply = addMessage("assistant", "");
    const output = reply.querySelector(".content");
    output.readOnly = true;
    reply.classList.add("streaming");
    controller = new AbortController();
    sendButton.disabled = true;
    stopButton.disabled = false;
    status.dataset.chunks = "0";
    setStatus("streaming", "Waiting for the first token…");
    const started = performance.now();
    let firstAt = 0, chunks = 0, usage = null, finish = null, failure = null;
    try {
      const response = await fetch(ENDPOINT, {
        method: "POST", credentials: "same-origin", signal: controller.signal,
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify(body),
      });
      if (!response.ok) {
        let message = `${response.status} ${response.statusText}`;
        try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
        throw new Error(message);
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const data = line.slice(6);
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) { failure = chunk.error.message; continue; }
            if (chunk.usage) usage = chunk.usage;
            for (const choice of chunk.choices || []) {
              const text = choice.delta && choice.delta.content;
              if (text) {
                if (!firstAt) firstAt = performance.now();
                output.value += text;
                fit(output);
                chunks += 1;
                status.dataset.chunks = String(chunks);
                setStatus("streaming", `Streaming… ${chunks} chunks`);
              }
              if (choice.finish_reason) finish = choice.finish_reason;
            }
          }
        }
      }
      if (failure) throw new Error(failure);
      setStatus("done", `Done (finish reason: ${finish || "unknown"}).`);
    } catch (err) {
      if (err.name === "AbortError") setStatus("stopped", `Stopped after ${chunks} chunks.`);
      else setStatus("error", `Error: ${err.message}`);
      if (!output.value) reply.remove();
    } finally {
      showStats(usage, started, firstAt, performance.now(), chunks);
      output.readOnly = false;
      reply.classList.remove("streaming");
      controller = null;
      sendButton.disabled = false;
      stopButton.disabled = true;
      if (status.dataset.state === "done") addMessage("user", "").querySelector(".content").focus();
      renderCode();
    }
  }

  // ---- view code ----------------------------------------------------------------------------
  function pyValue(value, indent) {
    const pad = " ".repeat(indent);
    if (value === null) return "None";
    if (value === true) return "True";
    if (value === false) return "False";
    if (Array.isArray(value)) {
      if (!value.length) return "[]";
      return "[\n" + value.map((v) => pad + "    " + pyValue(v, indent + 4)).join(",\n") + ",\n" + pad + "]";
    }
    if (typeof value === "object") {
      const items = Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${pyValue(v, indent + 4)}`);
      return "{" + items.join(", ") + "}";
    }
    return JSON.stringify(value);
  }

  function renderCode() {
    const body = buildRequest();
    const base = form.dataset.baseUrl;
    const key = form.dataset.maskedKey;
    const json = JSON.stringify(body, null, 2);
    $("code-curl-text").textContent =
      `curl -N ${base}/chat/completions \\\n` +
      `  -H "Authorization: Bearer ${key}" \\\n` +
      `  -H "Content-Type: application/json" \\\n` +
      `  -d '${json.replace(/'/g, "'\\''")}'`;
    const { model, messages, stream, stream_options, ...rest } = body;
    const pyArgs = [`    model=${JSON.stringify(model)},`, `    messages=${pyValue(messages, 4)},`]
      .concat(Object.entries(rest).map(([k, v]) => `    ${k}=${pyValue(v, 4)},`))
      .concat(["    stream=True,", '    stream_options={"include_usage": True},']);
    $("code-python-text").textContent =
      "# pip install --upgrade openai\nfrom openai import OpenAI\n\n" +
      `client = OpenAI(\n    api_key="${key}",\n    base_url="${base}",\n)\n\n` +
      "stream = client.chat.completions.create(\n" + pyArgs.join("\n") + "\n)\n" +
      "for chunk in stream:\n    if chunk.choices and chunk.choices[0].delta.content:\n" +
      '        print(chunk.choices[0].delta.content, end="", flush=True)\n' +
      "    if chunk.usage:\n        print()\n        print(chunk.usage)\n";
    const jsBody = JSON.stringify(body, null, 2).replace(/\n/g, "\n");
    $("code-javascript-text").textContent =
      '// npm install --save openai\nimport OpenAI from "openai";\n\n' +
      `const openai = new OpenAI({\n  apiKey: "${key}",\n  baseURL: "${base}",\n});\n\n` +
      `const stream = await openai.chat.completions.create(${jsBody});\n` +
      "for await (const chunk of stream) {\n" +
      '  process.stdout.write(chunk.choices[0]?.delta?.content ?? "");\n' +
      "  if (chunk.usage) console.log(\"\\n\", chunk.usage);\n}\n";
  }

  // ---- tabs (arrow keys move between them, as the ARIA tabs pattern asks) ----------------------
  const tabs = Array.from(document.querySelectorAll('[role="tab"]'));
  function select(tab) {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
    tab.focus();
  }
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (e) => {
      if (e.key === "ArrowRight") select(tabs[(i + 1) % tabs.length]);
      if (e.key === "ArrowLeft") select(tabs[(i - 1 + tabs.length) % tabs.length]);
    });
  });

  // ---- wiring -------------------------------------------------------------------------------
  form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  form.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); send(); }
  });
  form.addEventListener("input", (e) => {
    if (e.target.classList.contains("content")) fit(e.target);
    renderCode();
  });
  form.addEventListener("change", renderCode);
  stopButton.addEventListener("click", () => { if (controller) controller.abort(); });
  $("add-message").addEventListener("click", () => {
    const last = list.querySelector(".msg:last-child .role");
    addMessage(last && last.value === "user" ? "assistant" : "user", "").querySelector(".content").focus();
  });
  list.addEventListener("click", (e) => {
    const remove = e.target.closest(".remove");
    if (remove) { remove.closest(".msg").remove(); relabel(); renderCode(); }
  });
  addMessage("user", "");
  renderCode();
})();
