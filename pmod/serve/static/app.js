// The pmod serve page: pick or drop one or more images, ask, stream the answer (OpenAI's chunk stream from
// /v1/chat/completions) and draw each image's routing map the server returns with the usage (pmod.routing.images).
"use strict";
const $ = (id) => document.getElementById(id);
const DIM = 0.18;  // brightness of a skipped patch, as pmod demo draws it
let imageURLs = [];  // data: URLs of the chosen images, in the order they are sent
let imageEls = [];

fetch("/v1/models", { headers: authHeaders() }).then((r) => r.json()).then((j) => {
  $("model").textContent = j.data ? j.data[0].id : "";
}).catch(() => {});

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

function readImage(file) {
  return new Promise((resolve, reject) => {
    if (!file.type.startsWith("image/")) { reject(new Error("not an image: " + file.name)); return; }
    const reader = new FileReader();
    reader.onload = () => {
      const img = new Image();
      img.onload = () => resolve({ url: reader.result, img: img, name: file.name });
      img.onerror = () => reject(new Error("cannot read " + file.name));
      img.src = reader.result;
    };
    reader.readAsDataURL(file);
  });
}

async function useFiles(files) {
  files = Array.from(files || []);
  if (!files.length) { status("not an image: nothing"); return; }
  let got;
  try { got = await Promise.all(files.map(readImage)); } catch (err) { status(err.message); return; }
  imageURLs = got.map((g) => g.url); imageEls = got.map((g) => g.img);
  const c = $("preview"), w = c.width / got.length;  // side by side
  const ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  got.forEach((g, i) => ctx.drawImage(g.img, i * w, (c.height - w) / 2, w, w));
  $("drop").classList.add("has-image");
  const names = got.map((g) => g.name + " (" + g.img.width + "x" + g.img.height + ")").join(", ");
  status((got.length === 1 ? "image: " : got.length + " images: ") + names);
}

$("image").addEventListener("change", (e) => useFiles(e.target.files));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); useFiles(e.dataTransfer.files); });
$("ask").addEventListener("click", ask);

function status(text) { $("status").textContent = text; }

async function ask() {
  const question = $("question").value.trim();
  if (!question) { status("type a question"); return; }
  const content = [];
  for (const url of imageURLs) content.push({ type: "image_url", image_url: { url: url } });
  content.push({ type: "text", text: question });
  const body = {
    messages: [{ role: "user", content: content }], stream: true, stream_options: { include_usage: true },
    max_tokens: Number($("max-tokens").value) || 64, temperature: Number($("temperature").value) || 0,
    pmod: { routing: true },
  };
  $("answer").textContent = ""; $("efficiency").textContent = ""; $("routing").replaceChildren();
  $("routing").dataset.layers = "0";
  $("ask").disabled = true; status("asking…");
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() }, body: JSON.stringify(body),
    });
    if (!r.ok) { const j = await r.json().catch(() => ({})); throw new Error(r.status + ": " + ((j.error || {}).message || r.statusText)); }
    await readStream(r.body.getReader());
    status("done");
  } catch (err) {
    status("error " + err.message);
  } finally {
    $("ask").disabled = false;
  }
}

async function readStream(reader) {
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const ch of chunk.choices || []) if (ch.delta && ch.delta.content) $("answer").textContent += ch.delta.content;
      if (chunk.usage) showUsage(chunk.usage);
    }
  }
}

function mib(b) { return (b / 2 ** 20).toFixed(2) + " MiB"; }
function pct(x) { return (100 * x).toFixed(1) + " %"; }

function showUsage(u) {
  const p = u.pmod || {};
  const flops = (x) => (x * 1e3).toFixed(3) + " GFLOPs";
  $("efficiency").textContent = `${u.prompt_tokens} prompt tokens (${p.vision_tokens} vision), ${u.completion_tokens} generated; ` +
    `vision tokens kept ${pct(p.kept_ratio)} on average over layers; KV ${mib(p.kv_bytes)} vs dense ${mib(p.kv_bytes_dense)} ` +
    `(${pct(p.kv_bytes / p.kv_bytes_dense)}); prefill ${flops(p.prefill_tflops)} vs dense ${flops(p.prefill_tflops_dense)} ` +
    `(${pct(p.prefill_tflops / p.prefill_tflops_dense)})`;
  if (p.routing && imageEls.length) drawRouting(p.routing);
}

function drawRouting(map) {
  // one row of layer panels per image the server mapped (map.images; an older server: map.layers, the first image)
  const g = map.grid, box = $("routing");
  const images = map.images || [{ image: 0, layers: map.layers }];
  for (const im of images) {
    const el = imageEls[im.image];
    if (!el) continue;
    const row = document.createElement("div");
    row.className = "image-map";
    row.dataset.image = String(im.image);
    const title = document.createElement("h3");
    title.textContent = `image ${im.image + 1}`;
    row.append(title);
    for (const layer of im.layers) row.append(layerPanel(el, g, layer, im.image));
    box.append(row);
  }
  box.dataset.layers = String(map.layers.length);
  box.dataset.images = String(images.length);
}

function layerPanel(el, g, layer, image) {
  const fig = document.createElement("figure");
  const c = document.createElement("canvas");
  c.width = c.height = g * 8;
  const ctx = c.getContext("2d");
  ctx.drawImage(el, 0, 0, c.width, c.height);
  const kept = new Set(layer.kept), cell = c.width / g;
  ctx.fillStyle = `rgba(0, 0, 0, ${1 - DIM})`;
  for (let i = 0; i < g * g; i++) if (!kept.has(i)) ctx.fillRect((i % g) * cell, Math.floor(i / g) * cell, cell, cell);
  c.dataset.kept = String(layer.kept.length);
  c.dataset.layer = String(layer.layer);
  c.dataset.image = String(image);
  const cap = document.createElement("figcaption");
  cap.textContent = `layer ${layer.layer}: ${layer.kept.length}/${g * g} kept`;
  fig.append(c, cap);
  return fig;
}
