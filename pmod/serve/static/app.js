// The pmod serve page: pick or drop an image, ask, stream the answer (OpenAI's chunk stream from
// /v1/chat/completions) and draw the routing map the server returns with the usage (pmod.routing).
"use strict";
const $ = (id) => document.getElementById(id);
const DIM = 0.18;  // brightness of a skipped patch, as pmod demo draws it
let imageURL = null;  // data: URL of the chosen image
let imageEl = null;

fetch("/v1/models", { headers: authHeaders() }).then((r) => r.json()).then((j) => {
  $("model").textContent = j.data ? j.data[0].id : "";
}).catch(() => {});

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

function useFile(file) {
  if (!file || !file.type.startsWith("image/")) { status("not an image: " + (file ? file.name : "nothing")); return; }
  const reader = new FileReader();
  reader.onload = () => {
    imageURL = reader.result;
    const img = new Image();
    img.onload = () => {
      imageEl = img;
      const c = $("preview");
      c.getContext("2d").drawImage(img, 0, 0, c.width, c.height);
      $("drop").classList.add("has-image");
      status("image: " + file.name + " (" + img.width + "x" + img.height + ")");
    };
    img.src = imageURL;
  };
  reader.readAsDataURL(file);
}

$("image").addEventListener("change", (e) => useFile(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); useFile(e.dataTransfer.files[0]); });
$("ask").addEventListener("click", ask);

function status(text) { $("status").textContent = text; }

async function ask() {
  const question = $("question").value.trim();
  if (!question) { status("type a question"); return; }
  const content = [];
  if (imageURL) content.push({ type: "image_url", image_url: { url: imageURL } });
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
  if (p.routing && imageEl) drawRouting(p.routing);
}

function drawRouting(map) {
  const g = map.grid, box = $("routing");
  for (const layer of map.layers) {
    const fig = document.createElement("figure");
    const c = document.createElement("canvas");
    c.width = c.height = g * 8;
    const ctx = c.getContext("2d");
    ctx.drawImage(imageEl, 0, 0, c.width, c.height);
    const kept = new Set(layer.kept), cell = c.width / g;
    ctx.fillStyle = `rgba(0, 0, 0, ${1 - DIM})`;
    for (let i = 0; i < g * g; i++) if (!kept.has(i)) ctx.fillRect((i % g) * cell, Math.floor(i / g) * cell, cell, cell);
    c.dataset.kept = String(layer.kept.length);
    c.dataset.layer = String(layer.layer);
    const cap = document.createElement("figcaption");
    cap.textContent = `layer ${layer.layer}: ${layer.kept.length}/${g * g} kept`;
    fig.append(c, cap);
    box.append(fig);
  }
  box.dataset.layers = String(map.layers.length);
}
