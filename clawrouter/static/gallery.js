// The gallery page: header facts, the prompt box, the image grid and the detail dialog.
// Plain DOM, no framework. Every string from the API goes in through textContent or a
// property (never innerHTML): prompts are user text. API paths are relative to the page, so it
// also works under a proxy's path prefix (the page at https://host/claw/).

const PAGE = 24;
const $ = (id) => document.getElementById(id);

const state = {
  models: [],     // GET /v1/models data
  shown: new Set(), // names of stored images in the grid
  offset: 0,      // how many stored images (newest first) the grid holds: the next page's offset
  running: new Set(), // generations in flight
  failed: null,   // the generation whose failure #error shows (a later one's success clears it)
  opener: null,   // the card that opened the detail dialog, to give focus back
};

// --- API ------------------------------------------------------------------------------------

class ApiError extends Error {}

async function api(path, init = {}) {
  let res;
  try {
    res = await fetch(path, { ...init, headers: { accept: "application/json", ...init.headers } });
  } catch {
    throw new ApiError("The gateway did not answer. Is clawrouter still running?");
  }
  let body = null;
  try {
    body = await res.json();
  } catch {
    // Not JSON: fall through to the status line below.
  }
  if (!res.ok) {
    const message = body && body.error && body.error.message;
    throw new ApiError(typeof message === "string" && message ? message : `HTTP ${res.status} ${res.statusText}`);
  }
  return body;
}

// --- Formatting -----------------------------------------------------------------------------

// As the API gives them (micro-dollars): $0.01675 is what is paid, $0.0168 would not be.
const usdFormat = new Intl.NumberFormat("en-US", {
  style: "currency", currency: "USD", minimumFractionDigits: 2, maximumFractionDigits: 6,
});
const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto", style: "short" });

function usd(value) {
  return typeof value === "number" && Number.isFinite(value) ? usdFormat.format(value) : "–";
}

function ago(seconds) {
  if (typeof seconds !== "number") return "";
  const delta = seconds - Date.now() / 1000;
  const steps = [[60, "second"], [60, "minute"], [24, "hour"], [7, "day"], [4.35, "week"],
    [12, "month"], [Infinity, "year"]];
  let amount = delta;
  for (const [size, unit] of steps) {
    if (Math.abs(amount) < size) return relative.format(Math.round(amount), unit);
    amount /= size;
  }
  return "";
}

function fullDate(seconds) {
  return typeof seconds === "number" ? new Date(seconds * 1000).toLocaleString() : "";
}

function isoDate(seconds) {
  return typeof seconds === "number" ? new Date(seconds * 1000).toISOString() : "";
}

function bytes(n) {
  if (typeof n !== "number") return "–";
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 ** 2).toFixed(2)} MB`;
}

function elapsed(ms) {
  const s = Math.floor(ms / 1000);
  return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
}

function shortAddress(address) {
  return address.length > 14 ? `${address.slice(0, 6)}…${address.slice(-4)}` : address;
}

function sizeLabel(size) {
  return String(size || "").replace("x", "×");
}

function shortModel(id) {
  return String(id || "").split("/").pop();
}

/** Only web URLs (and inline images) become links or sources. */
function safeUrl(url) {
  try {
    const parsed = new URL(String(url), location.href);
    return ["http:", "https:", "data:", "blob:"].includes(parsed.protocol) ? parsed.href : "";
  } catch {
    return "";
  }
}

function nameOf(url) {
  try {
    const parsed = new URL(url, location.href);
    return ["http:", "https:"].includes(parsed.protocol) ? parsed.pathname.split("/").pop() : "";
  } catch {
    return "";
  }
}

function dimensions(size) {
  const match = /^(\d+)x(\d+)$/.exec(String(size || ""));
  return match ? [Number(match[1]), Number(match[2])] : [1024, 1024];
}

/** createElement with a class and text; children appended in order. */
function el(tag, className, text, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  node.append(...children);
  return node;
}

// --- Copying --------------------------------------------------------------------------------

async function copyText(text, button) {
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch {
    // No clipboard API (or no permission): the old way, inside the button's own subtree so it
    // also works while the modal dialog makes the rest of the page inert.
    const scratch = el("textarea", "offscreen");
    scratch.value = text;
    scratch.readOnly = true;
    button.parentElement.append(scratch);
    scratch.select();
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    scratch.remove();
  }
  button.classList.toggle("copied", ok);
  const label = button.dataset.label || button.getAttribute("aria-label") || button.textContent;
  button.dataset.label = label;
  const done = ok ? "Copied" : "Copy failed: select and press Ctrl+C";
  if (button.classList.contains("icon-btn")) {
    button.setAttribute("aria-label", done);
    button.title = done;
  } else {
    button.textContent = ok ? "Copied" : "Failed";
  }
  clearTimeout(button._reset);
  button._reset = setTimeout(() => {
    button.classList.remove("copied");
    if (button.classList.contains("icon-btn")) {
      button.setAttribute("aria-label", label);
      button.title = label;
    } else {
      button.textContent = label;
    }
  }, 1600);
}

// --- Header ---------------------------------------------------------------------------------

async function loadHealth() {
  const health = await api("health");
  const wallet = String(health.wallet || "");
  $("wallet").textContent = shortAddress(wallet);
  $("wallet").title = wallet;
  $("copy-wallet").disabled = !wallet;
  $("copy-wallet").onclick = () => copyText(wallet, $("copy-wallet"));
  $("network").textContent = String(health.network || "");
  $("sandbox").hidden = health.sandbox !== true;
  if (health.version) $("version").textContent = `clawrouter ${health.version}`;
}

/** Text in a header fact, hidden when there is none (an empty one would still take a gap). */
function fact(id, text) {
  $(id).textContent = text;
  $(id).hidden = !text;
}

/** Every cent of today: settled, pending (outcome unknown) and held (refused after signing,
 * still counted against the budget), so "left of" adds up on screen. */
async function loadSpend() {
  const spend = await api("v1/spend");
  const today = (spend && spend.today) || {};
  const day = (spend && spend.budget && spend.budget.day) || {};
  $("spend-today").textContent = usd(today.usd);
  const pending = today.pending && today.pending.usd;
  fact("spend-pending", pending > 0 ? `· ${usd(pending)} pending` : "");
  fact("spend-held", day.held_usd > 0 ? `· ${usd(day.held_usd)} held` : "");
  fact("spend-left", day.limit_usd != null && day.remaining_usd != null
    ? `· ${usd(day.remaining_usd)} left of ${usd(day.limit_usd)}` : "");
}

// --- Model and size pickers -----------------------------------------------------------------

function remembered(key) {
  try {
    return localStorage.getItem(`clawrouter.${key}`);
  } catch {
    return null;
  }
}

function remember(key, value) {
  try {
    localStorage.setItem(`clawrouter.${key}`, value);
  } catch {
    // Private mode or storage disabled: the choice simply is not kept.
  }
}

function chosenModel() {
  return state.models.find((m) => m.id === $("model").value);
}

async function loadModels() {
  const body = await api("v1/models");
  state.models = Array.isArray(body && body.data) ? body.data : [];
  const select = $("model");
  select.replaceChildren(...state.models.map((model) => {
    const option = el("option", "", model.slow ? `${model.id} (slow)` : model.id);
    option.value = model.id;
    if (model.status && model.status !== "live") option.textContent += ` – ${model.status}`;
    return option;
  }));
  const saved = remembered("model");
  if (saved && state.models.some((m) => m.id === saved)) select.value = saved;
  select.disabled = state.models.length === 0;
  fillSizes(remembered("size"));
  $("generate").disabled = state.models.length === 0;
}

function fillSizes(preferred) {
  const model = chosenModel();
  const select = $("size");
  const keep = preferred || select.value;
  const sizes = model ? model.sizes : [];
  select.replaceChildren(...sizes.map((size) => {
    const option = el("option", "", sizeLabel(size).replace("×", " × "));
    option.value = size;
    return option;
  }));
  if (sizes.includes(keep)) select.value = keep;
  else if (sizes.includes("1024x1024")) select.value = "1024x1024";
  select.disabled = sizes.length === 0;
  showPrice();
}

function showPrice() {
  const model = chosenModel();
  const size = $("size").value;
  const price = model && model.prices ? model.prices[size] : undefined;
  const fee = model && typeof model.fee_per_request === "number" ? model.fee_per_request : 0;
  $("price").textContent = typeof price === "number" ? `${usd(price + fee)} / image` : "–";
  $("price").title = typeof price === "number"
    ? `${usd(price)} per image + ${usd(fee)} fee per request` : "";
  $("model-note").textContent = model && model.note ? `${model.id}: ${model.note}` : "";
}

// --- Grid -----------------------------------------------------------------------------------

function card(item) {
  const url = safeUrl(item.url);
  const [width, height] = dimensions(item.size);
  const prompt = String(item.prompt || "");

  const img = el("img");
  img.loading = "lazy";
  img.decoding = "async";
  img.width = width;
  img.height = height;
  img.alt = ""; // decorative: the card's text says the prompt, which the link's name then has once
  img.addEventListener("error", () => img.parentElement.classList.add("broken"), { once: true });
  if (url) img.src = url;

  const time = el("time", "", ago(item.created));
  time.dateTime = isoDate(item.created);
  time.title = fullDate(item.created);

  const model = el("span", "model", shortModel(item.model));
  model.title = String(item.model || "");

  const link = el("a", "card", null,
    el("span", "thumb", null, img),
    el("span", "card-body", null,
      el("span", "card-prompt", prompt || "(no prompt)"),
      el("span", "card-meta", null, model, el("span", "", sizeLabel(item.size))),
      el("span", "card-meta", null, el("span", "cost", usd(item.cost_usd)), time)));
  link.href = url || "#";
  link.addEventListener("click", (event) => {
    if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    openDetail(item, link);
  });

  const li = el("li", "grid-item", null, link);
  li.dataset.name = String(item.name || nameOf(item.url));
  return li;
}

function pendingCard(job) {
  const clock = el("span", "clock", "0 s");
  const li = el("li", "grid-item pending", null,
    el("div", "card", null,
      el("span", "thumb", null, el("span", "spinner"), clock),
      el("span", "card-body", null,
        el("span", "card-prompt", job.prompt),
        el("span", "card-meta", null,
          el("span", "model", shortModel(job.model)), el("span", "", sizeLabel(job.size))),
        el("span", "card-meta", null, el("span", "", "Generating…")))));
  li.setAttribute("aria-busy", "true");
  job.clock = clock;
  return li;
}

/** "No images yet" only when the list said so, not when it could not be loaded. */
function updateEmpty() {
  $("empty").hidden = $("grid").children.length > 0 || !$("list-error").hidden;
}

/** Put stored images in the grid: at the end (paging) or at the top (fresh results). */
function addItems(items, { top = false } = {}) {
  const grid = $("grid");
  const firstStored = () => grid.querySelector(".grid-item:not(.pending)");
  for (const item of top ? [...items].reverse() : items) {
    const name = String(item.name || nameOf(item.url));
    const existing = name && [...grid.children].find((li) => li.dataset.name === name);
    if (existing && !top) continue;
    if (existing) existing.remove();
    else if (item.name) {
      state.shown.add(name);
      if (top) state.offset += 1; // everything after it in the store moved down by one
    }
    const node = card(item);
    if (top) grid.insertBefore(node, firstStored());
    else grid.append(node);
  }
  updateEmpty();
}

/** One page of stored images from `offset`, and whether more follow: one image more is asked
 * for, so a store of exactly PAGE images offers no "Load more" that would load nothing. */
async function fetchPage(offset) {
  const body = await api(`v1/images?limit=${PAGE + 1}&offset=${offset}`);
  const items = Array.isArray(body && body.data) ? body.data : [];
  return { items: items.slice(0, PAGE), more: items.length > PAGE };
}

function showListError(error) {
  $("list-error").textContent = error ? `Could not load images: ${error.message}` : "";
  $("list-error").hidden = !error;
}

/** The next page of older images; with `fresh`, the first page in place of the grid's stored
 * cards, which stay until it has arrived (a failed refresh keeps what the user had). */
async function loadPage({ fresh = false } = {}) {
  const more = $("more");
  more.disabled = true;
  try {
    const page = await fetchPage(fresh ? 0 : state.offset);
    if (fresh) {
      for (const li of [...$("grid").querySelectorAll(".grid-item:not(.pending)")]) li.remove();
      state.shown.clear();
      state.offset = 0;
    }
    showListError(null);
    state.offset += page.items.length;
    addItems(page.items.filter((item) => !state.shown.has(String(item.name))));
    more.hidden = !page.more;
  } catch (error) {
    showListError(error);
  } finally {
    more.disabled = false;
    updateEmpty();
  }
}

async function reload() {
  await Promise.allSettled([loadPage({ fresh: true }), loadSpend()]);
}

// --- Generating -----------------------------------------------------------------------------

/** Show an error; `job`: the generation it answers, so a later one's success can clear it. */
function showError(message, job = null) {
  $("error").textContent = message;
  $("error").hidden = !message;
  state.failed = message ? job : null;
}

/** Set the live region's text, only on a change: a screen reader reads each change aloud. */
function say(text) {
  if ($("status").textContent !== text) $("status").textContent = text;
}

function isSlow(job) {
  return state.models.some((m) => m.id === job.model && m.slow);
}

/** What is in progress, without the clock (that ticks in #elapsed, which is not read out). A
 * slow model's paid job is finished and kept by the gateway (CALL_HEADERS) if the page goes. */
function progress(jobs) {
  const what = jobs.length === 1 ? `Generating with ${jobs[0].model}…`
    : `${jobs.length} images in progress…`;
  return jobs.some(isSlow)
    ? `${what} A slow model: you can leave this page, and the image will appear in Recent `
      + "images when it is done."
    : what;
}

function tick() {
  const now = performance.now();
  for (const job of state.running) job.clock.textContent = elapsed(now - job.started);
  const oldest = Math.max(0, ...[...state.running].map((job) => now - job.started));
  $("elapsed").textContent = state.running.size ? elapsed(oldest) : "";
}

let ticker = null;

function track(job, running) {
  if (running) state.running.add(job);
  else state.running.delete(job);
  if (state.running.size && !ticker) ticker = setInterval(tick, 250);
  if (!state.running.size && ticker) {
    clearInterval(ticker);
    ticker = null;
  }
  if (state.running.size) say(progress([...state.running]));
  $("composer").classList.toggle("busy", state.running.size > 0);
  tick();
}

/** Where one result's image is: its URL, or its bytes as a data: URL (a gateway that
 * answered in base64 despite the request). */
function imageSource(item, body) {
  if (item && typeof item.url === "string" && item.url) return item.url;
  if (item && typeof item.b64_json === "string" && item.b64_json) {
    const format = String((body && body.output_format) || "png").replace("jpg", "jpeg");
    return `data:image/${format};base64,${item.b64_json}`;
  }
  return "";
}

/** The stored records of freshly generated URLs (a URL not in the store yet gets a stand-in). */
async function recordsFor(urls, job, created) {
  let listed = [];
  try {
    const body = await api(`v1/images?limit=${Math.max(10, urls.length + state.running.size)}&offset=0`);
    listed = Array.isArray(body && body.data) ? body.data : [];
  } catch {
    // The image itself arrived; its metadata can wait for the next refresh.
  }
  return urls.map((url) => listed.find((item) => item.url === url || item.name === nameOf(url))
    || { url, model: job.model, prompt: job.prompt, size: job.size, created, cost_usd: null });
}

/** Sent with every Generate. Each click is a new call, not a retry of the last one (the
 * OpenAI SDK's marker: the gateway then shares no result already delivered, so the same prompt
 * twice makes two images). And the page may be left (reload, Back) during a slow job: once
 * paid, the gateway polls it to its end and stores the image, so it shows in the gallery. */
const CALL_HEADERS = { "x-stainless-retry-count": "0", "x-clawrouter-keep-paid-job": "true" };

function sameRequest(a, b) {
  return a.model === b.model && a.size === b.size && a.prompt === b.prompt;
}

async function generate(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt) {
    showError("Write a prompt first.");
    $("prompt").focus();
    return;
  }
  showError("");
  const job = { model: $("model").value, size: $("size").value, prompt, started: performance.now() };
  if ([...state.running].some((j) => sameRequest(j, job))) return; // a double-click: one image
  const placeholder = pendingCard(job);
  $("grid").prepend(placeholder);
  updateEmpty();
  track(job, true);
  try {
    const body = await api("v1/images/generations", {
      method: "POST",
      headers: { "content-type": "application/json", ...CALL_HEADERS },
      // Always URLs: the gateway's default may be b64_json (response_format in its config).
      body: JSON.stringify({ model: job.model, prompt, size: job.size, n: 1,
        response_format: "url" }),
    });
    const urls = (Array.isArray(body && body.data) ? body.data : [])
      .map((d) => imageSource(d, body)).filter(Boolean);
    if (!urls.length) {
      throw new ApiError("The gateway's answer had no image: press Refresh to look for it.");
    }
    const items = await recordsFor(urls, job, body && body.created);
    placeholder.remove();
    addItems(items, { top: true });
    track(job, false);
    if (state.failed && state.failed.started < job.started) showError(""); // answered since
    if (!state.running.size) say(`Done in ${elapsed(performance.now() - job.started)}.`);
  } catch (error) {
    placeholder.remove();
    updateEmpty();
    track(job, false);
    if (!state.running.size) say("");
    showError(error.message, job);
  }
  loadSpend().catch(() => {});
}

// --- Detail dialog --------------------------------------------------------------------------

function openDetail(item, opener) {
  const url = safeUrl(item.url);
  const prompt = String(item.prompt || "");
  const img = $("detail-img");
  img.removeAttribute("src");
  img.alt = prompt || "Generated image";
  const [width, height] = dimensions(item.size);
  img.width = width;
  img.height = height;
  if (url) img.src = url;

  $("detail-title").textContent = shortModel(item.model) || "Image";
  $("detail-prompt").textContent = prompt;
  const rows = [
    ["Model", item.model],
    ["Size", sizeLabel(item.size)],
    ["Cost", usd(item.cost_usd)],
    ["Created", fullDate(item.created)],
    ["File", [item.content_type, typeof item.bytes === "number" ? bytes(item.bytes) : ""]
      .filter(Boolean).join(", ")],
    ["Request", item.request_id],
  ].filter(([, value]) => value);
  $("detail-meta").replaceChildren(...rows.flatMap(([term, value]) =>
    [el("dt", "", term), el("dd", "", value)]));

  $("detail-url").value = String(item.url || "");
  $("detail-open").href = url || "#";
  state.opener = opener;
  $("detail").showModal();
  $("detail-close").focus();
}

function setupDetail() {
  const dialog = $("detail");
  $("detail-close").addEventListener("click", () => dialog.close());
  // A click on the backdrop lands on the dialog element itself.
  dialog.addEventListener("click", (event) => {
    if (event.target === dialog) dialog.close();
  });
  dialog.addEventListener("close", () => {
    if (state.opener && state.opener.isConnected) state.opener.focus();
    state.opener = null;
  });
  $("detail-url").addEventListener("focus", (event) => event.target.select());
  $("copy-url").addEventListener("click", () => {
    $("detail-url").select();
    copyText($("detail-url").value, $("copy-url"));
  });
}

// --- Start ----------------------------------------------------------------------------------

function setup() {
  setupDetail();
  $("composer").addEventListener("submit", generate);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.metaKey || event.ctrlKey)) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  // An error answers the last attempt; editing the request starts a new one.
  for (const id of ["prompt", "model", "size"]) {
    $(id).addEventListener("input", () => showError(""));
  }
  $("model").addEventListener("change", () => {
    remember("model", $("model").value);
    fillSizes();
  });
  $("size").addEventListener("change", () => {
    remember("size", $("size").value);
    showPrice();
  });
  $("more").addEventListener("click", loadPage);
  $("refresh").addEventListener("click", reload);
  // Relative times drift; refresh them now and then.
  setInterval(() => {
    for (const time of document.querySelectorAll(".grid time[datetime]")) {
      time.textContent = ago(Date.parse(time.dateTime) / 1000);
    }
  }, 30000);

  const failures = [];
  const step = (promise, what) => promise.catch((error) => failures.push(`${what}: ${error.message}`));
  Promise.all([
    step(loadHealth(), "status"),
    step(loadSpend(), "spend"),
    step(loadModels(), "models"),
    loadPage(),
  ]).then(() => {
    updateEmpty();
    if (failures.length) showError(failures.join(" · "));
    document.body.dataset.ready = "true";
  });
}

setup();
