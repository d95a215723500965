// medsam-rt's page: open an image, draw boxes, see masks. The decoder runs in the browser (onnxruntime-web on the
// server's embedding, the library's postprocessing in upscale.js) when it can, else on the server (/segment).
import { makeChain, scaleBoxes, upscaleMask } from "./upscale.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const COLORS = ["#ff5a5f", "#4fb3ff", "#ffd23f", "#3ddc97", "#c77dff", "#ff9f1c", "#2ec4b6", "#f15bb5", "#9ef01a", "#00bbf9"];
const MIN_BOX = 2; // pixels: smaller boxes are not decoded

const state = {
  model: null,
  image: null, // {id, width, height, slices, kind, name}
  slice: 0,
  boxes: new Map(), // slice -> [box]
  selected: null,
  mode: "server",
  modeDetail: "",
  session: null,
  embeddings: new Map(), // slice -> Promise<{tensor, meta, chain}>
  bitmaps: new Map(), // slice -> Promise<ImageBitmap>
  pending: false,
  idleWaiters: [],
  timings: [], // {mode, ms, boxId}
  nextId: 1,
  drag: null,
};
let token = new URLSearchParams(location.hash.slice(1)).get("token") || sessionStorage.getItem("medsam-token") || "";

// -- API --------------------------------------------------------------------------------------------------------

async function api(path, opts = {}) {
  const headers = new Headers(opts.headers || {});
  if (token) headers.set("Authorization", `Bearer ${token}`);
  const r = await fetch(path, { ...opts, headers });
  if (r.status === 401) {
    $("token").hidden = false;
    throw new Error("this server needs a token: enter it above (or open the page as /#token=...)");
  }
  if (!r.ok) {
    let msg = `${r.status} ${r.statusText}`;
    try {
      const e = (await r.json()).error;
      msg = `${e.field ? e.field + ": " : ""}${e.message}`;
    } catch (_) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}

function status(text) {
  $("status").textContent = text;
}

// -- the decoder --------------------------------------------------------------------------------------------------

function setMode(mode, detail) {
  state.mode = mode;
  state.modeDetail = detail;
  const el = $("mode");
  el.className = mode;
  el.textContent = mode === "browser" ? `decoder: in browser (${detail})` : `decoder: server /segment (${detail})`;
}

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const s = document.createElement("script");
    s.src = src;
    s.onload = resolve;
    s.onerror = () => reject(new Error(`cannot load ${src}`));
    document.head.appendChild(s);
  });
}

async function initDecoder() {
  const want = params.get("decoder") || $("decoder").value;
  state.session = null;
  if (want === "server") return setMode("server", "chosen");
  const dec = state.model.browser_decoder;
  if (!dec) return setMode("server", "the model has no fp32 decoder to send");
  if (!dec.vendor_ready) return setMode("server", "onnxruntime-web is not vendored: make -C web");
  if (typeof WebAssembly !== "object") return setMode("server", "no WebAssembly in this browser");
  try {
    status("loading the in-browser decoder…");
    if (!window.ort) await loadScript("/static/vendor/ort.wasm.min.js");
    const threads = self.crossOriginIsolated ? Math.max(1, Math.min(4, navigator.hardwareConcurrency || 1)) : 1;
    ort.env.wasm.wasmPaths = "/static/vendor/";
    ort.env.wasm.numThreads = threads;
    const bytes = new Uint8Array(await (await api(dec.url)).arrayBuffer());
    state.session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
    const version = (ort.env.versions && ort.env.versions.web) || "";
    setMode("browser", `onnxruntime-web ${version}, wasm, ${threads} thread${threads > 1 ? "s" : ""}`);
    status("");
  } catch (e) {
    state.session = null;
    setMode("server", `in-browser decoder failed: ${e.message}`);
  }
}

function embeddingOf(k) {
  if (!state.embeddings.has(k)) {
    const p = (async () => {
      status(`fetching the embedding of slice ${k}…`);
      const r = await api(`/v1/images/${state.image.id}/embedding?slice=${k}&dtype=float32`);
      const meta = JSON.parse(r.headers.get("X-MedSAM-Embedding"));
      const data = new Float32Array(await r.arrayBuffer());
      status("");
      return { tensor: new ort.Tensor("float32", data, meta.shape), meta, chain: makeChain(meta) };
    })();
    p.catch(() => state.embeddings.delete(k));
    state.embeddings.set(k, p);
  }
  return state.embeddings.get(k);
}

async function decodeInBrowser(box, k) {
  const { tensor, meta, chain } = await embeddingOf(k);
  const t0 = performance.now();
  const boxes = new ort.Tensor("float32", scaleBoxes([[box.x0, box.y0, box.x1, box.y1]], meta), [1, 4]);
  const out = await state.session.run({ image_embeddings: tensor, boxes });
  const mask = upscaleMask(chain, out.low_res_logits.data);
  return { mask, score: out.iou_scores.data[0], t0 };
}

async function decodeOnServer(box, k) {
  const t0 = performance.now();
  const r = await api(`/v1/images/${state.image.id}/segment`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ boxes: [[box.x0, box.y0, box.x1, box.y1]], slice: k }),
  });
  const res = await r.json();
  const png = Uint8Array.from(atob(res.labels_png), (c) => c.charCodeAt(0));
  const bmp = await createImageBitmap(new Blob([png], { type: "image/png" }), {
    colorSpaceConversion: "none",
    premultiplyAlpha: "none",
  });
  const c = new OffscreenCanvas(bmp.width, bmp.height);
  const g = c.getContext("2d", { willReadFrequently: true });
  g.drawImage(bmp, 0, 0);
  const px = g.getImageData(0, 0, bmp.width, bmp.height).data;
  const mask = new Uint8Array(bmp.width * bmp.height);
  for (let i = 0; i < mask.length; i++) mask[i] = px[4 * i] === 1 ? 1 : 0;
  return { mask, score: res.scores[0], t0, server: res.ms };
}

// One decode at a time; while a box is dragged, each finished decode picks up its latest shape.
async function pump() {
  if (state.pending) return;
  state.pending = true;
  try {
    for (;;) {
      const k = state.slice;
      const box = (state.boxes.get(k) || []).find((b) => b.version !== b.decoded && b.x1 - b.x0 >= MIN_BOX && b.y1 - b.y0 >= MIN_BOX);
      if (!box) break;
      const version = box.version;
      const mode = state.session ? "browser" : "server";
      try {
        const res = mode === "browser" ? await decodeInBrowser(box, k) : await decodeOnServer(box, k);
        if (box.version === version) box.mask = res.mask;
        box.decoded = version;
        box.score = res.score;
        drawMasks();
        box.ms = performance.now() - res.t0;
        box.mode = mode;
        state.timings.push({ mode, ms: box.ms, box: box.id, server: res.server || null });
        $("latency").textContent = `box → mask ${box.ms.toFixed(1)} ms (${mode === "browser" ? "in browser" : "server round trip"})`;
        renderList();
      } catch (e) {
        box.decoded = version;
        status(`box ${box.id}: ${e.message}`);
      }
    }
  } finally {
    state.pending = false;
    if (!hasWork()) state.idleWaiters.splice(0).forEach((f) => f());
  }
}

function hasWork() {
  return (state.boxes.get(state.slice) || []).some((b) => b.version !== b.decoded && b.x1 - b.x0 >= MIN_BOX && b.y1 - b.y0 >= MIN_BOX);
}

// -- drawing ------------------------------------------------------------------------------------------------------

function rgb(hex) {
  return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
}

function drawMasks() {
  const { width, height } = state.image;
  const g = $("masks").getContext("2d");
  const img = g.createImageData(width, height);
  for (const box of state.boxes.get(state.slice) || []) {
    if (!box.mask) continue;
    const [r, gg, b] = rgb(box.color);
    const m = box.mask;
    for (let i = 0; i < m.length; i++) {
      if (m[i]) {
        img.data[4 * i] = r;
        img.data[4 * i + 1] = gg;
        img.data[4 * i + 2] = b;
        img.data[4 * i + 3] = 115;
      }
    }
  }
  g.putImageData(img, 0, 0);
}

function drawBoxes() {
  // drawn at the screen's resolution (crisp lines whatever the image size); f: canvas pixels per image pixel
  const c = $("boxes");
  const g = c.getContext("2d");
  const f = c.width / state.image.width;
  const dpr = window.devicePixelRatio || 1;
  g.clearRect(0, 0, c.width, c.height);
  for (const box of state.boxes.get(state.slice) || []) {
    g.strokeStyle = box.color;
    g.lineWidth = (box === state.selected ? 2.5 : 1.5) * dpr;
    g.strokeRect(box.x0 * f, box.y0 * f, (box.x1 - box.x0) * f, (box.y1 - box.y0) * f);
    if (box === state.selected) {
      const h = 4 * dpr;
      g.fillStyle = box.color;
      for (const [x, y] of corners(box)) g.fillRect(x * f - h, y * f - h, 2 * h, 2 * h);
    }
  }
}

function corners(b) {
  return [[b.x0, b.y0], [b.x1, b.y0], [b.x0, b.y1], [b.x1, b.y1]];
}

function renderList() {
  const list = $("list");
  list.innerHTML = "";
  const boxes = state.boxes.get(state.slice) || [];
  $("hint").textContent = boxes.length ? "" : "drag on the image to draw a box";
  for (const box of boxes) {
    const li = document.createElement("li");
    li.className = box === state.selected ? "selected" : "";
    li.dataset.box = box.id;
    const score = box.score == null ? "" : ` iou ${box.score.toFixed(2)}`;
    const ms = box.ms == null ? "…" : `${box.ms.toFixed(1)} ms${box.mode === "server" ? " (server)" : ""}`;
    li.innerHTML = `<span class="swatch" style="background:${box.color}"></span>
      <span class="coords">${box.x0},${box.y0} – ${box.x1},${box.y1}${score}</span><span class="ms">${ms}</span>
      <button title="delete this box">✕</button>`;
    li.onclick = () => select(box);
    li.querySelector("button").onclick = (e) => {
      e.stopPropagation();
      removeBox(box);
    };
    list.appendChild(li);
  }
  $("download").disabled = ![...state.boxes.values()].some((b) => b.length);
}

function select(box) {
  state.selected = box;
  drawBoxes();
  renderList();
}

function removeBox(box) {
  const boxes = state.boxes.get(state.slice) || [];
  const i = boxes.indexOf(box);
  if (i >= 0) boxes.splice(i, 1);
  if (state.selected === box) state.selected = null;
  drawMasks();
  drawBoxes();
  renderList();
}

function bitmapOf(k) {
  if (!state.bitmaps.has(k)) {
    const p = (async () => {
      const blob = await (await api(`/v1/images/${state.image.id}/slices/${k}.png`)).blob();
      return createImageBitmap(blob);
    })();
    p.catch(() => state.bitmaps.delete(k));
    state.bitmaps.set(k, p);
  }
  return state.bitmaps.get(k);
}

async function showSlice(k) {
  k = Math.max(0, Math.min(state.image.slices - 1, k));
  state.slice = k;
  state.selected = null;
  $("slice").value = k;
  $("sliceno").textContent = `${k + 1} / ${state.image.slices}`;
  const bmp = await bitmapOf(k);
  if (state.slice !== k) return;
  $("image").getContext("2d").drawImage(bmp, 0, 0);
  drawMasks();
  drawBoxes();
  renderList();
  pump();
}

function layout() {
  if (!state.image) return;
  const { width, height } = state.image;
  const maxW = Math.max(200, window.innerWidth - 390);
  const maxH = Math.max(200, window.innerHeight - 90);
  const scale = Math.min(maxW / width, maxH / height, 4);
  const stage = $("stage");
  stage.style.width = `${Math.round(width * scale)}px`;
  stage.style.height = `${Math.round(height * scale)}px`;
  $("image").style.width = stage.style.width;
  $("image").style.height = stage.style.height;
  const dpr = window.devicePixelRatio || 1;
  $("boxes").width = Math.round(width * scale * dpr);
  $("boxes").height = Math.round(height * scale * dpr);
  drawBoxes();
}

// -- opening a file -----------------------------------------------------------------------------------------------

async function open(file) {
  status(`uploading ${file.name} and embedding it…`);
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("window", $("window").value);
  const info = await (await api("/v1/images", { method: "POST", body: form })).json();
  state.image = info;
  state.boxes = new Map();
  state.embeddings = new Map();
  state.bitmaps = new Map();
  for (const id of ["image", "masks"]) {
    $(id).width = info.width;
    $(id).height = info.height;
  }
  $("stage").hidden = false;
  $("empty").hidden = true;
  $("slicebar").hidden = info.slices < 2;
  $("slice").max = info.slices - 1;
  layout();
  await showSlice(info.slice);
  status(`${info.name}: ${info.width}×${info.height}${info.slices > 1 ? `, ${info.slices} slices` : ""} (${info.kind}), embedded in ${info.ms.embed.toFixed(0)} ms`);
}

// -- mouse and keys -----------------------------------------------------------------------------------------------

function toImage(e) {
  const c = $("boxes");
  const r = c.getBoundingClientRect();
  const x = Math.round(((e.clientX - r.left) * state.image.width) / r.width);
  const y = Math.round(((e.clientY - r.top) * state.image.height) / r.height);
  return [Math.max(0, Math.min(state.image.width, x)), Math.max(0, Math.min(state.image.height, y))];
}

function setCorners(box, [ax, ay], [x, y]) {
  box.x0 = Math.min(ax, x);
  box.x1 = Math.max(ax, x);
  box.y0 = Math.min(ay, y);
  box.y1 = Math.max(ay, y);
  box.version += 1;
}

function onDown(e) {
  if (!state.image || e.button !== 0) return;
  const p = toImage(e);
  const c = $("boxes");
  const tol = (8 * state.image.width) / c.getBoundingClientRect().width;
  const boxes = state.boxes.get(state.slice) || [];
  state.boxes.set(state.slice, boxes);
  for (const box of [...boxes].reverse()) {
    const cs = corners(box);
    const i = cs.findIndex(([x, y]) => Math.abs(x - p[0]) <= tol && Math.abs(y - p[1]) <= tol);
    if (i >= 0) {
      state.drag = { box, anchor: cs[3 - i] };
      select(box);
      c.setPointerCapture(e.pointerId);
      return;
    }
  }
  const inside = [...boxes].reverse().find((b) => p[0] >= b.x0 && p[0] <= b.x1 && p[1] >= b.y0 && p[1] <= b.y1);
  if (inside && !e.shiftKey) return select(inside);
  const box = { id: state.nextId++, x0: p[0], y0: p[1], x1: p[0], y1: p[1], version: 0, decoded: -1, mask: null, score: null, ms: null };
  box.color = COLORS[(box.id - 1) % COLORS.length];
  boxes.push(box);
  state.drag = { box, anchor: p, created: true };
  select(box);
  c.setPointerCapture(e.pointerId);
}

function onMove(e) {
  if (!state.drag) return;
  setCorners(state.drag.box, state.drag.anchor, toImage(e));
  drawBoxes();
  pump();
}

function onUp(e) {
  if (!state.drag) return;
  const { box } = state.drag;
  setCorners(box, state.drag.anchor, toImage(e));
  state.drag = null;
  if (box.x1 - box.x0 < MIN_BOX || box.y1 - box.y0 < MIN_BOX) return removeBox(box);
  drawBoxes();
  renderList();
  pump();
}

async function download() {
  const boxes = {};
  for (const [k, list] of state.boxes) if (list.length) boxes[k] = list.map((b) => [b.x0, b.y0, b.x1, b.y1]);
  const slices = Object.keys(boxes).length;
  const volume = state.image.slices > 1;
  const format = volume ? (state.image.kind === "nifti" || state.image.slices === 1 ? "nii.gz" : slices === 1 ? "png" : "npz") : "png";
  status(`writing the label ${format === "png" ? "image" : "file"}…`);
  const r = await api(`/v1/images/${state.image.id}/labels`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ boxes, format }),
  });
  const name = (r.headers.get("Content-Disposition") || "").match(/filename="([^"]+)"/);
  const a = document.createElement("a");
  a.href = URL.createObjectURL(await r.blob());
  a.download = name ? name[1] : `labels.${format}`;
  a.click();
  status(`downloaded ${a.download}`);
}

function wire() {
  const c = $("boxes");
  c.addEventListener("pointerdown", onDown);
  c.addEventListener("pointermove", onMove);
  c.addEventListener("pointerup", onUp);
  $("stage").addEventListener("wheel", (e) => {
    if (!state.image || state.image.slices < 2) return;
    e.preventDefault();
    showSlice(state.slice + Math.sign(e.deltaY));
  }, { passive: false });
  window.addEventListener("keydown", (e) => {
    if (!state.image || e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
    if ((e.key === "Delete" || e.key === "Backspace") && state.selected) removeBox(state.selected);
    else if (e.key === "ArrowUp" || e.key === "PageUp") showSlice(state.slice - 1);
    else if (e.key === "ArrowDown" || e.key === "PageDown") showSlice(state.slice + 1);
  });
  $("slice").addEventListener("input", (e) => showSlice(Number(e.target.value)));
  $("file").addEventListener("change", (e) => e.target.files[0] && open(e.target.files[0]).catch((err) => status(err.message)));
  $("download").addEventListener("click", () => download().catch((err) => status(err.message)));
  $("decoder").addEventListener("change", async () => {
    await initDecoder();
    for (const list of state.boxes.values()) for (const b of list) b.version += 1;
    pump();
  });
  $("token").addEventListener("change", (e) => {
    token = e.target.value;
    sessionStorage.setItem("medsam-token", token);
    start();
  });
  window.addEventListener("resize", layout);
  if (params.get("decoder")) $("decoder").value = params.get("decoder");
}

// -- hooks for tests and scripts (window.medsam) -----------------------------------------------------------------

function packBits(mask) {
  const bytes = new Uint8Array(Math.ceil(mask.length / 8));
  for (let i = 0; i < mask.length; i++) if (mask[i]) bytes[i >> 3] |= 128 >> (i & 7);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

let readyResolve;
window.medsam = {
  ready: new Promise((r) => (readyResolve = r)),
  state,
  mode: () => state.mode,
  idle: () => (state.pending || hasWork() ? new Promise((r) => state.idleWaiters.push(r)) : Promise.resolve()),
  boxes: () => (state.boxes.get(state.slice) || []).map((b) => [b.x0, b.y0, b.x1, b.y1]),
  // the mask layer as drawn: 1 where its alpha is set, packed bits (row-major, MSB first), base64
  overlayMask: () => {
    const { width, height } = state.image;
    const px = $("masks").getContext("2d").getImageData(0, 0, width, height).data;
    const m = new Uint8Array(width * height);
    for (let i = 0; i < m.length; i++) m[i] = px[4 * i + 3] > 0 ? 1 : 0;
    return packBits(m);
  },
  timings: () => state.timings,
};

async function start() {
  try {
    state.model = await (await api("/v1/model")).json();
    await initDecoder();
    $("token").hidden = true;
  } catch (e) {
    setMode("server", e.message);
    status(e.message);
  }
  readyResolve(state.mode);
}

wire();
start();
