// Classifier playground: plain browser JavaScript over the server's public REST API.
//
// Everything goes through the same endpoints any client uses (V2 metadata and infer, the
// feedback API) plus the two UI helpers (/preprocess, /card). All text from the server is
// inserted with textContent, never as HTML. The API key lives in sessionStorage: it is sent
// only to this origin and is gone when the tab closes.
"use strict";

(() => {
  const KEY_STORAGE = "kcp-ui-api-key";
  const POLL_MS = 5000;
  const API_ROOT = new URL("../", window.location.href); // works under a path prefix too

  const $ = (id) => document.getElementById(id);
  const el = (tag, props = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name in node && !name.startsWith("aria") && !name.startsWith("data")) node[name] = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) node.append(child);
    return node;
  };

  const state = {
    key: readStoredKey(),
    models: [],          // [{name, metadata, ready, error}]
    model: null,         // {name, metadata, card}
    prediction: null,    // {id, label, modelName}
    requestSerial: 0,    // to drop answers to superseded requests
    metricsTimer: null,
    metricsSerial: 0,
    authBlocked: false,
  };

  // ---------------------------------------------------------------- API access

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function readStoredKey() {
    try { return window.sessionStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
  }

  function storeKey(value) {
    try {
      if (value) window.sessionStorage.setItem(KEY_STORAGE, value);
      else window.sessionStorage.removeItem(KEY_STORAGE);
    } catch { /* storage disabled: the key still lives in this page's memory */ }
  }

  async function api(path, { method = "GET", body } = {}) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (state.key) headers["X-API-Key"] = state.key;
    let response;
    try {
      response = await fetch(new URL(path, API_ROOT), {
        method, headers, cache: "no-store", credentials: "same-origin",
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      throw new ApiError(0, `could not reach the server (${err.message}); is it running?`);
    }
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = null; }
    if (!response.ok) {
      let message = response.statusText || "request failed";
      if (data && typeof data.error === "string") message = data.error;
      else if (data && data.detail !== undefined) message = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
      else if (text) message = text.slice(0, 300);
      const error = new ApiError(response.status, message);
      if (response.status === 401) onUnauthorized(error);
      throw error;
    }
    return data;
  }

  /** "what failed: the server's reason (HTTP 400)" — the API's own words, with context. */
  function describeError(what, error) {
    if (!(error instanceof ApiError)) return `${what}: ${error && error.message ? error.message : error}`;
    if (error.status === 401) {
      return state.key
        ? `${what}: the server refused this API key (${error.message}). Enter the right key above.`
        : `${what}: this server needs an API key (${error.message}). Enter it above.`;
    }
    const status = error.status ? ` (HTTP ${error.status})` : "";
    return `${what}: ${error.message}${status}`;
  }

  const modelPath = (name, rest = "") => `v2/models/${encodeURIComponent(name)}${rest}`;

  // ---------------------------------------------------------------- API key

  function renderKeyState() {
    $("key-state").textContent = state.key
      ? "A key is set; it is kept in this tab only."
      : "No key set (needed only if the server asks for one).";
  }

  function onUnauthorized() {
    if (state.authBlocked) return;
    state.authBlocked = true;
    stopMetrics();
    showNotice(state.key
      ? "The server refused the API key. Enter the right key in the API key field at the top and choose “Use key”."
      : "This server needs an API key. Enter it in the API key field at the top and choose “Use key”.");
    $("api-key").setAttribute("aria-invalid", "true");
    $("key-state").textContent = state.key ? "The server refused this key." : "The server needs a key.";
    $("api-key").focus();
  }

  function setupKeyForm() {
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("api-key").value.trim();
      if (!value) {
        showNotice("Type the API key first.");
        $("api-key").focus();
        return;
      }
      state.key = value;
      storeKey(value);
      $("api-key").value = "";
      afterKeyChange();
    });
    $("key-forget").addEventListener("click", () => {
      state.key = "";
      storeKey("");
      $("api-key").value = "";
      afterKeyChange();
    });
    renderKeyState();
  }

  function afterKeyChange() {
    state.authBlocked = false;
    $("api-key").removeAttribute("aria-invalid");
    hideNotice();
    renderKeyState();
    loadModels();
  }

  // ---------------------------------------------------------------- notices

  function showNotice(text) {
    const notice = $("notice");
    notice.textContent = text;
    notice.hidden = false;
  }

  function hideNotice() {
    $("notice").hidden = true;
    $("notice").textContent = "";
  }

  function showError(id, text) {
    const box = $(id);
    box.textContent = text;
    box.hidden = !text;
  }

  // ---------------------------------------------------------------- models

  function formatSpec(tensor) {
    return `${tensor.name} ${tensor.datatype} [${(tensor.shape || []).join(", ")}]`;
  }

  async function loadModels() {
    const status = $("models-status");
    status.textContent = "Loading models…";
    let names;
    try {
      names = (await api("v2/models")).models || [];
    } catch (error) {
      status.textContent = describeError("Could not list the models", error);
      state.models = [];
      renderModels();
      return;
    }
    state.models = await Promise.all(names.map(async (name) => {
      const entry = { name, metadata: null, ready: false, error: "" };
      const [metadata, ready] = await Promise.allSettled([api(modelPath(name)), api(modelPath(name, "/ready"))]);
      if (metadata.status === "fulfilled") entry.metadata = metadata.value;
      else entry.error = describeError("metadata", metadata.reason);
      if (ready.status === "fulfilled") entry.ready = Boolean(ready.value && ready.value.ready);
      else entry.error = entry.error || describeError("status", ready.reason);
      return entry;
    }));
    status.textContent = names.length
      ? `${names.length} model${names.length === 1 ? "" : "s"} served.`
      : "This server serves no models.";
    renderModels();
    const wanted = modelFromHash() || (state.model && state.model.name);
    const pick = state.models.find((m) => m.name === wanted) || state.models.find((m) => m.ready);
    if (pick) selectModel(pick.name, { focus: false });
  }

  function renderModels() {
    const body = $("models-table").tBodies[0];
    body.replaceChildren();
    for (const entry of state.models) {
      const meta = entry.metadata || {};
      const current = state.model && state.model.name === entry.name;
      const button = el("button", {
        type: "button", class: current ? "" : "secondary", text: `Try ${entry.name}`,
        "aria-pressed": String(Boolean(current)),
      });
      button.addEventListener("click", () => { window.location.hash = `model=${encodeURIComponent(entry.name)}`; });
      const inputs = el("td", { "data-label": "Inputs" });
      for (const tensor of meta.inputs || []) {
        inputs.append(el("span", { class: "spec", text: formatSpec(tensor) + (tensor.name === "ids" ? " (optional)" : "") }));
      }
      const statusCell = el("td", { "data-label": "Status" }, el("span", {
        class: `status ${entry.ready ? "ready" : "not-ready"}`, text: entry.ready ? "Ready" : "Not ready",
      }));
      if (entry.error) statusCell.append(el("span", { class: "hint", text: ` ${entry.error}` }));
      const row = el("tr", { "aria-current": String(Boolean(current)), "data-model": entry.name },
        el("th", { scope: "row" }, button),
        statusCell,
        el("td", { "data-label": "Version", text: (meta.versions || []).join(", ") || "–" }),
        el("td", { "data-label": "Framework", text: meta.platform || "–" }),
        inputs);
      body.append(row);
    }
  }

  function modelFromHash() {
    const match = /(?:^#|&)model=([^&]+)/.exec(window.location.hash);
    if (!match) return null;
    try { return decodeURIComponent(match[1]); } catch { return null; }
  }

  async function selectModel(name, { focus = true } = {}) {
    const entry = state.models.find((m) => m.name === name);
    if (!entry) {
      showNotice(`No model called “${name}” is served here.`);
      return;
    }
    let card;
    try {
      card = await api(modelPath(name, "/card"));
    } catch (error) {
      showNotice(describeError(`Could not load model ${name}`, error));
      return;
    }
    state.model = { name, metadata: entry.metadata, card };
    state.prediction = null;
    renderModels();
    renderTryPanel();
    clearResult();
    $("result").hidden = true;
    startMetrics();
    if (focus) $("try-title").focus();
  }

  // ---------------------------------------------------------------- trying a model

  function renderTryPanel() {
    const { card } = state.model;
    $("try").hidden = false;
    $("try-title").textContent = `Try ${card.name} (version ${card.version})`;
    $("model-description").textContent = card.description || "";
    const isImage = card.task === "image_classification";
    $("image-input").hidden = !isImage;
    $("tabular-form").hidden = isImage;
    if (isImage) {
      const [height, width, channels] = card.image_shape;
      const colour = channels === 3 ? "colour" : "grayscale";
      $("preview-caption").textContent = `The model saw (${width}×${height} ${colour}, after preprocessing)`;
      $("preview-canvas").setAttribute("aria-label",
        `The ${width} by ${height} ${colour} input the model saw after preprocessing`);
    } else {
      renderTabularFields(card);
    }
    const select = $("feedback-true");
    select.replaceChildren(el("option", { value: "", text: "choose…" }));
    for (const { label, name } of card.labels) {
      select.append(el("option", { value: String(label), text: name === String(label) ? name : `${name} (${label})` }));
    }
  }

  function renderTabularFields(card) {
    if (card.row_format === "json_object") {
      renderRowFields(card);
      return;
    }
    if (card.row_format === "columns") {
      renderColumnFields(card);
      return;
    }
    $("tabular-form").dataset.mode = "tensor";
    const count = card.input.shape[card.input.shape.length - 1];
    const names = card.feature_names || Array.from({ length: count }, (_, i) => `feature ${i + 1}`);
    const fields = $("tabular-fields");
    fields.replaceChildren();
    names.forEach((featureName, i) => {
      const id = `feature-${i}`;
      fields.append(el("div", { class: "field" },
        el("label", { htmlFor: id, text: featureName }),
        el("input", { id, name: id, type: "number", step: "any", inputMode: "decimal", required: true })));
    });
  }

  // A model that takes one tensor per column (a data frame): a number field per numeric column, a choice
  // of the learned categories (or free text) per string column.
  function renderColumnFields(card) {
    $("tabular-form").dataset.mode = "columns";
    const fields = $("tabular-fields");
    fields.replaceChildren();
    card.columns.forEach((column, i) => {
      const id = `feature-${i}`;
      const common = { id, name: id, required: true, "data-column": column.name, "data-datatype": column.datatype };
      let input;
      if (column.datatype === "BYTES" && column.categories && column.categories.length) {
        input = el("select", common, ...column.categories.map((c) => el("option", { value: c, text: c })));
      } else if (column.datatype === "BYTES") {
        input = el("input", { ...common, type: "text" });
      } else {
        const whole = /INT/.test(column.datatype);
        input = el("input", { ...common, type: "number", step: whole ? "1" : "any", inputMode: "decimal" });
      }
      fields.append(el("div", { class: "field" }, el("label", { htmlFor: id, text: column.name }), input));
    });
  }

  // The V2 inputs of the column form (one tensor per column), or null after showing what is wrong.
  function readColumns() {
    const inputs = [];
    for (const input of $("tabular-fields").querySelectorAll("input, select")) {
      const datatype = input.dataset.datatype;
      const text = input.value.trim();
      input.removeAttribute("aria-invalid");
      let value = text;
      if (datatype !== "BYTES") {
        value = text === "" ? NaN : Number(text);
        const whole = /INT/.test(datatype);
        if (!Number.isFinite(value) || (whole && !Number.isInteger(value))) {
          input.setAttribute("aria-invalid", "true");
          clearResult();
          $("result").hidden = false;
          showError("result-error", `Enter ${whole ? "a whole number" : "a number"} for ${input.dataset.column}.`);
          input.focus();
          return null;
        }
      }
      inputs.push({ name: input.dataset.column, datatype, shape: [1], data: [value] });
    }
    return inputs;
  }

  // A model whose rows are JSON objects (Katonic): one field per field of its row schema, or one JSON
  // text area when it has no schema. Its input tensor (BYTES [-1]) says nothing about what to type.
  function renderRowFields(card) {
    $("tabular-form").dataset.mode = "row";
    const fields = $("tabular-fields");
    fields.replaceChildren();
    const rowFields = card.row_fields || [];
    if (!rowFields.length) {
      const id = "feature-json";
      fields.append(el("div", { class: "field wide" },
        el("label", { htmlFor: id, text: "Row (a JSON object)" }),
        el("textarea", { id, name: id, rows: 4, required: true, "data-kind": "object", placeholder: '{"name": 1.0}' })));
      return;
    }
    rowFields.forEach((field, i) => {
      const id = `feature-${i}`;
      const common = { id, name: id, required: field.required, "data-field": field.name, "data-kind": field.type };
      let input;
      if (field.type === "boolean") {
        input = el("select", common, el("option", { value: "true", text: "true" }),
          el("option", { value: "false", text: "false" }));
      } else if (field.type === "number" || field.type === "integer") {
        input = el("input", { ...common, type: "number", step: field.type === "integer" ? "1" : "any", inputMode: "decimal" });
      } else {
        input = el("input", { ...common, type: "text" });
      }
      if (field.description) input.title = field.description;
      fields.append(el("div", { class: "field" }, el("label", { htmlFor: id, text: field.title || field.name }), input));
    });
  }

  // The row the form describes, or null after showing what is wrong with it.
  function readRow() {
    const invalid = (input, message) => {
      input.setAttribute("aria-invalid", "true");
      clearResult();
      $("result").hidden = false;
      showError("result-error", message);
      input.focus();
      return null;
    };
    const row = {};
    for (const input of $("tabular-fields").querySelectorAll("input, select, textarea")) {
      const label = input.labels && input.labels[0] ? input.labels[0].textContent : input.name;
      const kind = input.dataset.kind;
      const text = input.value.trim();
      input.removeAttribute("aria-invalid");
      if (kind === "object") {
        let value;
        try { value = JSON.parse(text); } catch { value = null; }
        if (value === null || typeof value !== "object" || Array.isArray(value)) {
          return invalid(input, `Enter the row as a JSON object, like {"name": 1.0}.`);
        }
        return value;
      }
      if (text === "" && !input.required) continue;
      if (kind === "number" || kind === "integer") {
        const value = text === "" ? NaN : Number(text);
        if (!Number.isFinite(value) || (kind === "integer" && !Number.isInteger(value))) {
          return invalid(input, `Enter ${kind === "integer" ? "a whole number" : "a number"} for ${label}.`);
        }
        row[input.dataset.field] = value;
      } else if (kind === "boolean") {
        row[input.dataset.field] = text === "true";
      } else if (kind === "json") {
        try { row[input.dataset.field] = JSON.parse(text); } catch {
          return invalid(input, `Enter JSON for ${label}.`);
        }
      } else {
        if (text === "") return invalid(input, `Enter a value for ${label}.`);
        row[input.dataset.field] = input.value;
      }
    }
    return row;
  }

  function requestBody(data, shape, datatype) {
    return { inputs: [{ name: state.model.card.input.name, shape, datatype, data }] };
  }

  async function classify(body, { original = null, preview = false, what = "input" } = {}) {
    const model = state.model;
    const serial = ++state.requestSerial;
    clearResult();
    $("result").hidden = false;
    $("result-status").textContent = `Classifying the ${what} with ${model.name}…`;
    const calls = [api(modelPath(model.name, "/infer"), { method: "POST", body })];
    if (preview) calls.push(api(modelPath(model.name, "/preprocess"), { method: "POST", body }));
    const [inferred, preprocessed] = await Promise.allSettled(calls);
    if (serial !== state.requestSerial) return; // a newer request has started
    if (inferred.status === "rejected") {
      if (original && original.startsWith("blob:")) URL.revokeObjectURL(original);
      $("result-status").textContent = "";
      showError("result-error", describeError("The model could not classify this", inferred.reason));
      return;
    }
    renderPrediction(model, inferred.value, original);
    if (preview) {
      if (preprocessed.status === "fulfilled") drawPreview(preprocessed.value.outputs[0]);
      else {
        $("preview-note").hidden = false;
        $("preview-note").textContent = describeError("No preview of the preprocessed input", preprocessed.reason);
      }
    }
  }

  function output(response, name) {
    return (response.outputs || []).find((o) => o.name === name) || null;
  }

  function renderPrediction(model, response, original) {
    const names = new Map(model.card.labels.map((l) => [l.label, l.name]));
    const label = Number(output(response, "label").data[0]);
    const labelName = output(response, "label_name");
    const shown = labelName ? String(labelName.data[0]) : names.get(label) ?? String(label);
    const idOutput = output(response, "prediction_id");
    const predictionId = idOutput ? String(idOutput.data[0]) : response.id;
    state.prediction = { id: predictionId, label, modelName: model.name };

    $("result-body").hidden = false;
    $("predicted-label").textContent = shown;
    $("prediction-id").textContent = predictionId;
    const bars = $("topk");
    bars.replaceChildren();
    const topLabels = output(response, "top_k_labels");
    const topProbs = output(response, "top_k_probabilities");
    let summary = "";
    if (topLabels && topProbs) {
      topLabels.data.forEach((value, i) => {
        const p = Number(topProbs.data[i]);
        const fill = el("span", { class: "bar-fill" });
        fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
        bars.append(el("li", { "data-label": String(value) },
          el("span", { class: "bar-label", text: names.get(Number(value)) ?? String(value) }),
          el("span", { class: "bar-track", "aria-hidden": "true" }, fill),
          el("span", { class: "bar-value", text: percent(p) })));
      });
      summary = ` with probability ${percent(Number(topProbs.data[0]))}`;
    } else {
      bars.append(el("li", { text: "This model does not report probabilities." }));
    }
    if (original) {
      $("original-img").src = original;
      $("original-figure").hidden = false;
    }
    $("result-status").textContent = `Predicted ${shown}${summary}.`;
    $("feedback-status").textContent = "";
    $("feedback-true").value = "";
    setFeedbackEnabled(true);
  }

  function drawPreview(tensor) {
    const [, height, width] = tensor.shape;
    const canvas = $("preview-canvas");
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(width, height);
    const channels = tensor.shape.length === 4 ? tensor.shape[3] : 1;
    const level = (x) => Math.round(Math.max(0, Math.min(1, Number(x))) * 255);
    for (let i = 0; i < width * height; i += 1) {
      const at = i * channels;
      const [r, g, b] = channels === 3 ? [tensor.data[at], tensor.data[at + 1], tensor.data[at + 2]]
        : [tensor.data[at], tensor.data[at], tensor.data[at]];
      image.data.set([level(r), level(g), level(b), 255], i * 4);
    }
    ctx.putImageData(image, 0, 0);
    $("preview-figure").hidden = false;
  }

  function clearResult() {
    showError("result-error", "");
    $("result-status").textContent = "";
    $("result-body").hidden = true;
    $("original-figure").hidden = true;
    $("preview-figure").hidden = true;
    $("preview-note").hidden = true;
    $("topk").replaceChildren();
    $("feedback-status").textContent = "";
    const img = $("original-img");
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.removeAttribute("src");
  }

  const percent = (p) => `${(p * 100).toFixed(1)}%`;

  // ---------------------------------------------------------------- image sources

  function setupTabs() {
    const tabs = Array.from(document.querySelectorAll('[role="tab"]'));
    const activate = (tab, focus) => {
      for (const other of tabs) {
        const selected = other === tab;
        other.setAttribute("aria-selected", String(selected));
        other.tabIndex = selected ? 0 : -1;
        $(other.getAttribute("aria-controls")).hidden = !selected;
      }
      if (focus) tab.focus();
    };
    tabs.forEach((tab, i) => {
      tab.addEventListener("click", () => activate(tab, false));
      tab.addEventListener("keydown", (event) => {
        const moves = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 };
        if (!(event.key in moves)) return;
        event.preventDefault();
        activate(tabs[(moves[event.key] + tabs.length) % tabs.length], true);
      });
    });
  }

  function readAsBase64(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result).replace(/^data:[^,]*,/, ""));
      reader.onerror = () => reject(reader.error || new Error("could not read the file"));
      reader.readAsDataURL(blob);
    });
  }

  async function classifyFile(file) {
    if (!state.model) return;
    let data;
    try {
      data = await readAsBase64(file);
    } catch (error) {
      clearResult();
      $("result").hidden = false;
      showError("result-error", `Could not read ${file.name}: ${error.message}`);
      return;
    }
    // Sent whatever its type: the server decides what is an image and says why not.
    await classify(requestBody([data], [1], "BYTES"), {
      original: URL.createObjectURL(file), preview: true, what: `file ${file.name}`,
    });
  }

  function setupUpload() {
    const input = $("file-input");
    input.addEventListener("change", () => {
      if (input.files && input.files[0]) classifyFile(input.files[0]);
    });
    const zone = $("drop-zone");
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("dragging");
      const file = event.dataTransfer && event.dataTransfer.files[0];
      if (file) classifyFile(file);
    });
  }

  function setupUrl() {
    $("url-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const url = $("image-url").value.trim();
      if (!/^https?:\/\//i.test(url)) {
        clearResult();
        $("result").hidden = false;
        showError("result-error", "Enter an http:// or https:// image URL.");
        $("image-url").focus();
        return;
      }
      classify(requestBody([url], [1], "BYTES"), { preview: true, what: "image at the URL" });
    });
  }

  function setupDrawing() {
    const canvas = $("draw-canvas");
    const ctx = canvas.getContext("2d");
    let drawing = false;
    let last = null;
    let inked = false;
    const clear = () => {
      ctx.fillStyle = "#ffffff";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      inked = false;
    };
    const point = (event) => {
      const rect = canvas.getBoundingClientRect();
      return {
        x: (event.clientX - rect.left) * (canvas.width / rect.width),
        y: (event.clientY - rect.top) * (canvas.height / rect.height),
      };
    };
    const stroke = (from, to) => {
      ctx.strokeStyle = "#000000";
      ctx.lineWidth = canvas.width / 14;
      ctx.lineCap = "round";
      ctx.lineJoin = "round";
      ctx.beginPath();
      ctx.moveTo(from.x, from.y);
      ctx.lineTo(to.x, to.y);
      ctx.stroke();
      inked = true;
    };
    canvas.addEventListener("pointerdown", (event) => {
      event.preventDefault();
      drawing = true;
      canvas.setPointerCapture(event.pointerId);
      last = point(event);
      stroke(last, last);
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!drawing) return;
      const next = point(event);
      stroke(last, next);
      last = next;
    });
    const stop = () => { drawing = false; };
    canvas.addEventListener("pointerup", stop);
    canvas.addEventListener("pointercancel", stop);
    $("draw-clear").addEventListener("click", () => { clear(); clearResult(); $("result").hidden = true; });
    $("draw-classify").addEventListener("click", () => {
      if (!state.model) return;
      if (!inked) {
        clearResult();
        $("result").hidden = false;
        showError("result-error", "Draw a digit on the white square first.");
        return;
      }
      const png = canvas.toDataURL("image/png");
      classify(requestBody([png.replace(/^data:[^,]*,/, "")], [1], "BYTES"),
        { original: png, preview: true, what: "drawing" });
    });
    clear();
  }

  function setupTabular() {
    $("tabular-form").addEventListener("submit", (event) => {
      event.preventDefault();
      if ($("tabular-form").dataset.mode === "row") {
        const row = readRow();
        if (row !== null) classify(requestBody([JSON.stringify(row)], [1], "BYTES"), { what: "row" });
        return;
      }
      if ($("tabular-form").dataset.mode === "columns") {
        const inputs = readColumns();
        if (inputs !== null) classify({ inputs }, { what: "row" });
        return;
      }
      const inputs = Array.from($("tabular-fields").querySelectorAll("input"));
      const values = [];
      for (const input of inputs) {
        const label = input.labels && input.labels[0] ? input.labels[0].textContent : input.name;
        const value = input.value.trim() === "" ? NaN : Number(input.value);
        if (!Number.isFinite(value)) {
          input.setAttribute("aria-invalid", "true");
          clearResult();
          $("result").hidden = false;
          showError("result-error", `Enter a number for ${label}.`);
          input.focus();
          return;
        }
        input.removeAttribute("aria-invalid");
        values.push(value);
      }
      const datatype = state.model.card.input.datatype;
      classify(requestBody(values, [1, values.length], datatype), { what: "features" });
    });
  }

  // ---------------------------------------------------------------- feedback

  function setFeedbackEnabled(enabled) {
    for (const id of ["feedback-right", "feedback-true", "feedback-send"]) $(id).disabled = !enabled;
  }

  async function sendFeedback(trueLabel) {
    const prediction = state.prediction;
    if (!prediction) return;
    const status = $("feedback-status");
    status.className = "";
    status.textContent = "Sending feedback…";
    setFeedbackEnabled(false);
    try {
      const answer = await api(modelPath(prediction.modelName, "/feedback"), {
        // Marked as the page's: a trial click is not production feedback, and reports can leave it out.
        method: "POST", body: { items: [{ id: prediction.id, true_label: trueLabel }], source: "ui" },
      });
      const accuracy = answer.cumulative.accuracy;
      status.className = "ok";
      status.textContent = `Thank you: recorded as ${labelName(trueLabel)}. ` +
        `Accuracy over ${answer.cumulative.count} feedback so far: ${accuracy === null ? "–" : percent(accuracy)}.`;
      if (state.model && state.model.name === prediction.modelName) refreshMetrics();
    } catch (error) {
      status.className = "error";
      status.textContent = describeError("Feedback was not recorded", error);
      if (!(error instanceof ApiError) || error.status === 0 || error.status === 401 || error.status >= 500) {
        setFeedbackEnabled(true); // worth retrying; a 4xx about this prediction is not
      }
    }
  }

  function labelName(label) {
    const found = state.model && state.model.card.labels.find((l) => l.label === label);
    return found ? found.name : String(label);
  }

  function setupFeedback() {
    $("feedback-right").addEventListener("click", () => {
      if (state.prediction) sendFeedback(state.prediction.label);
    });
    $("feedback-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("feedback-true").value;
      if (value === "") {
        $("feedback-status").className = "error";
        $("feedback-status").textContent = "Choose the true label first.";
        $("feedback-true").focus();
        return;
      }
      sendFeedback(Number(value));
    });
  }

  // ---------------------------------------------------------------- metrics

  function startMetrics() {
    stopMetrics();
    $("metrics").hidden = false;
    $("metrics-title").textContent = `Feedback metrics: ${state.model.name}`;
    $("metrics-body").hidden = true;
    showError("metrics-error", "");
    $("metrics-updated").textContent = "Loading…";
    refreshMetrics();
  }

  function stopMetrics() {
    if (state.metricsTimer !== null) window.clearTimeout(state.metricsTimer);
    state.metricsTimer = null;
  }

  function scheduleMetrics() {
    stopMetrics();
    if ($("metrics-live").checked && !document.hidden && !state.authBlocked) {
      state.metricsTimer = window.setTimeout(refreshMetrics, POLL_MS);
    }
  }

  async function refreshMetrics() {
    if (!state.model) return;
    const name = state.model.name;
    const serial = ++state.metricsSerial;
    stopMetrics();
    try {
      const filter = $("metrics-production").checked ? "?exclude_source=ui" : "";
      const report = await api(modelPath(name, `/feedback${filter}`));
      if (serial !== state.metricsSerial || !state.model || state.model.name !== name) return;
      renderMetrics(report);
      showError("metrics-error", "");
      $("metrics-updated").textContent = `Updated ${new Date().toLocaleTimeString()}` +
        ($("metrics-live").checked ? `; refreshing every ${POLL_MS / 1000} s.` : ".");
    } catch (error) {
      if (serial !== state.metricsSerial) return;
      const reason = error instanceof ApiError && error.status === 404 && !/model/i.test(error.message)
        ? "this server does not collect feedback" : null;
      showError("metrics-error", reason ? `No metrics: ${reason}.` : describeError("Could not load the metrics", error));
      $("metrics-updated").textContent = "";
    }
    scheduleMetrics();
  }

  const fixed = (x) => (x === null || x === undefined ? "–" : x.toFixed(3));

  function renderMetrics(report) {
    const { cumulative, recent } = report;
    $("metrics-body").hidden = false;
    $("metric-count").textContent = String(cumulative.count);
    $("metric-accuracy").textContent = cumulative.accuracy === null ? "–" : percent(cumulative.accuracy);
    $("metric-recent-label").textContent = `Accuracy, last ${formatWindow(recent.window_seconds)}`;
    $("metric-recent").textContent = recent.accuracy === null
      ? "–" : `${percent(recent.accuracy)} (${recent.count})`;
    $("metric-macro-f1").textContent = cumulative.count ? fixed(cumulative.macro_avg.f1) : "–";

    const table = $("per-class");
    const matrix = cumulative.confusion_matrix.matrix;
    const predictedAs = matrix.length ? matrix[0].map((_, j) => matrix.reduce((sum, row) => sum + row[j], 0)) : [];
    table.tBodies[0].replaceChildren(...cumulative.per_class.map((c, i) => {
      // A class nobody has given feedback on and the model never predicted has no score yet, not 0.
      const seen = c.support > 0 || predictedAs[i] > 0;
      const score = (x) => (seen ? fixed(x) : "–");
      return el("tr", {},
        el("th", { scope: "row", text: c.name === String(c.label) ? c.name : `${c.name} (${c.label})` }),
        el("td", { class: "num", text: score(c.precision) }),
        el("td", { class: "num", text: score(c.recall) }),
        el("td", { class: "num", text: score(c.f1) }),
        el("td", { class: "num", text: String(c.support) }));
    }));
    table.tFoot.replaceChildren(...[["Macro average (classes seen)", cumulative.macro_avg],
      ["Macro average (all labels)", cumulative.macro_avg_all_labels], ["Weighted average", cumulative.weighted_avg]]
      .map(([title, avg]) => el("tr", {},
        el("th", { scope: "row", text: title }),
        el("td", { class: "num", text: cumulative.count ? fixed(avg.precision) : "–" }),
        el("td", { class: "num", text: cumulative.count ? fixed(avg.recall) : "–" }),
        el("td", { class: "num", text: cumulative.count ? fixed(avg.f1) : "–" }),
        el("td", { class: "num", text: String(avg.support) }))));
    renderConfusion(cumulative.confusion_matrix);
    renderVersions(report.versions || []);
  }

  function renderVersions(versions) {
    $("versions-wrap").hidden = versions.length === 0;
    $("versions").tBodies[0].replaceChildren(...versions.map((v) => el("tr", { "data-version": v.version },
      el("th", { scope: "row", text: v.version || "unknown" }),
      el("td", { class: "num", text: String(v.count) }),
      el("td", { class: "num", text: v.accuracy === null ? "–" : percent(v.accuracy) }),
      el("td", { class: "num", text: v.count ? fixed(v.macro_f1) : "–" }),
      el("td", { class: "num", text: v.count ? fixed(v.macro_f1_all_labels) : "–" }))));
  }

  function formatWindow(seconds) {
    if (seconds % 86400 === 0) return seconds === 86400 ? "day" : `${seconds / 86400} days`;
    if (seconds % 3600 === 0) return seconds === 3600 ? "hour" : `${seconds / 3600} hours`;
    if (seconds % 60 === 0) return `${seconds / 60} min`;
    return `${seconds} s`;
  }

  function renderConfusion(cm) {
    const table = $("confusion");
    const header = el("tr", {}, el("th", { scope: "col", class: "corner", text: "true \\ predicted" }));
    cm.names.forEach((name) => header.append(el("th", { scope: "col", text: name })));
    table.tHead.replaceChildren(header);
    const rows = cm.matrix.map((row, i) => {
      const total = row.reduce((a, b) => a + b, 0);
      const tr = el("tr", {}, el("th", { scope: "row", text: cm.names[i] }));
      row.forEach((count, j) => {
        const share = total ? count / total : 0;
        const cell = el("td", {
          text: String(count), "data-true": String(cm.labels[i]), "data-predicted": String(cm.labels[j]),
          title: `true ${cm.names[i]}, predicted ${cm.names[j]}: ${count}` + (total ? ` (${percent(share)} of the row)` : ""),
        });
        if (count === 0) cell.classList.add("zero");
        else {
          const hue = i === j ? 212 : 4;
          const lightness = 94 - share * 58; // 94% (a few) .. 36% (the whole row)
          cell.style.backgroundColor = `hsl(${hue} 70% ${lightness}%)`;
          if (lightness < 60) cell.classList.add("dark");
        }
        tr.append(cell);
      });
      return tr;
    });
    table.tBodies[0].replaceChildren(...rows);
  }

  function setupMetrics() {
    $("metrics-live").addEventListener("change", () => (
      $("metrics-live").checked ? refreshMetrics() : stopMetrics()));
    $("metrics-production").addEventListener("change", () => refreshMetrics());
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && state.model && $("metrics-live").checked) refreshMetrics();
    });
  }

  // ---------------------------------------------------------------- start

  function start() {
    setupKeyForm();
    setupTabs();
    setupUpload();
    setupUrl();
    setupDrawing();
    setupTabular();
    setupFeedback();
    setupMetrics();
    $("refresh-models").addEventListener("click", loadModels);
    window.addEventListener("hashchange", () => {
      const name = modelFromHash();
      if (name && (!state.model || state.model.name !== name)) selectModel(name);
    });
    loadModels();
  }

  start();
})();
