"use strict";
// The renderer of a visattn session file: base64 arrays in, canvases out. No library, no request.
(function () {
  const D = JSON.parse(document.getElementById("visattn-data").textContent);

  function bytes(b64) {
    const s = atob(b64), u = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) u[i] = s.charCodeAt(i);
    return u;
  }
  const floats = (b64) => new Float32Array(bytes(b64).buffer);
  const LUT = bytes(D.colormap);  // 256 × RGB
  const probs = floats(D.probs);
  for (const L of D.layers) L.data = floats(L.rows);
  const roll = D.rollout ? floats(D.rollout.values) : null;
  const state = { y: 0.5, x: 0.5, layer: 0, head: -1, renders: 0 };
  const img = new Image();

  // --------------------------------------------------------------------- maths on the embedded rows
  function cellOf(L, y, x) {  // the grid cell under relative (y, x): visattn.maps.grid_index without the prefix
    const [h, w] = L.grid;
    return Math.min(Math.floor(y * h), h - 1) * w + Math.min(Math.floor(x * w), w - 1);
  }
  function mapOf(li, kind, head, cell) {  // (H·W) values of one query's map; head -1: mean of heads
    const L = D.layers[li], n = L.grid[0] * L.grid[1], k = D.kinds.indexOf(kind);
    const base = (cell * D.kinds.length + k) * L.heads * n;
    if (head >= 0) return L.data.subarray(base + head * n, base + (head + 1) * n);
    const out = new Float32Array(n);
    for (let h = 0; h < L.heads; h++) for (let i = 0; i < n; i++) out[i] += L.data[base + h * n + i];
    for (let i = 0; i < n; i++) out[i] /= L.heads;
    return out;
  }
  const range = (m) => { let lo = Infinity, hi = -Infinity; for (const v of m) { lo = Math.min(lo, v); hi = Math.max(hi, v); } return [lo, hi]; };

  // --------------------------------------------------------------------- drawing
  function canvas(size, title) {
    const box = document.createElement("div"), c = document.createElement("canvas"), t = document.createElement("div");
    box.className = "panel"; c.width = c.height = size; t.textContent = title;
    box.append(c, t);
    return [box, c, t];
  }
  function paint(c, m, h, w, lo, hi, alpha) {  // a map over the image (alpha < 1) or alone (alpha 1)
    const ctx = c.getContext("2d");
    ctx.clearRect(0, 0, c.width, c.height);
    if (alpha < 1) { ctx.imageSmoothingEnabled = false; ctx.drawImage(img, 0, 0, c.width, c.height); }
    const off = document.createElement("canvas");
    off.width = w; off.height = h;
    const o = off.getContext("2d"), px = o.createImageData(w, h), span = hi - lo;
    for (let i = 0; i < h * w; i++) {
      const t = span > 0 ? Math.min(255, Math.max(0, Math.floor((m[i] - lo) * 255 / span + 0.5))) : 0;
      px.data.set([LUT[3 * t], LUT[3 * t + 1], LUT[3 * t + 2], 255], 4 * i);
    }
    o.putImageData(px, 0, 0);
    ctx.globalAlpha = alpha < 1 ? alpha : 1;
    ctx.imageSmoothingEnabled = alpha < 1;  // smooth over the image, crisp cells alone
    ctx.drawImage(off, 0, 0, c.width, c.height);
    ctx.globalAlpha = 1;
  }
  function cross(c, y, x) {
    const ctx = c.getContext("2d"), Y = y * c.height, X = x * c.width, a = Math.max(5, c.width / 25);
    for (const [colour, width] of [["#000", 4], ["#0ff", 2]]) {
      ctx.strokeStyle = colour; ctx.lineWidth = width; ctx.beginPath();
      ctx.moveTo(X - a, Y); ctx.lineTo(X + a, Y); ctx.moveTo(X, Y - a); ctx.lineTo(X, Y + a); ctx.stroke();
    }
  }

  // --------------------------------------------------------------------- the page
  const fmt = (v) => (Math.abs(v) >= 1e-3 || v === 0 ? v.toFixed(4) : v.toExponential(3));
  const $ = (id) => document.getElementById(id);
  $("about").textContent = `model ${D.model}` + (D.accuracy != null ? ` (${(100 * D.accuracy).toFixed(2)}% test accuracy)` : "")
    + ` · ${D.layers.length} attention layer(s) · self-contained file: opens offline, fetches nothing`;
  const order = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a]).slice(0, 5);
  for (const i of order) {
    const tr = $("pred").insertRow();
    tr.insertCell().textContent = D.classes[i];
    tr.insertCell().innerHTML = `<div class="bar" style="width:${Math.round(160 * probs[i])}px"></div>`;
    const p = tr.insertCell(); p.className = "num"; p.textContent = (100 * probs[i]).toFixed(1) + "%";
  }
  const faith = Object.entries(D.faithfulness);
  if (faith.length) {
    $("faith").innerHTML = "<tr><th>method</th><th>deletion AUC ↓</th><th>insertion AUC ↑</th></tr>";
    for (const [, r] of faith) {
      const tr = $("faith").insertRow();
      tr.insertCell().textContent = r.label;
      for (const v of [r.deletion_auc, r.insertion_auc]) { const c = tr.insertCell(); c.className = "num"; c.textContent = v.toFixed(3); }
    }
  } else $("faith").outerHTML = "<p class='muted'>No faithfulness scores in this file.</p>";

  const gridCanvases = D.layers.map((L, li) => {
    const row = document.createElement("div"), label = document.createElement("div");
    label.className = "layer-label"; label.textContent = `${L.name} (${L.grid[0]}×${L.grid[1]} grid, ${L.similarity})`;
    row.append(label); $("grid").append(row);
    return Array.from({ length: L.heads + 1 }, (_, h) => {
      const [box, c] = canvas(112, h < L.heads ? `head ${h}` : "mean");
      row.append(box);
      return c;
    });
  });
  D.layers.forEach((L, i) => $("layer").add(new Option(L.name, i)));
  const simCanvases = D.kinds.map((k) => { const [box, c, t] = canvas(200, k); $("sim").append(box); return [c, t]; });
  let rollCanvas = null;
  if (roll) { const [box, c] = canvas(200, "attention rollout (all layers)"); $("rollout").append(box); rollCanvas = c; }
  else $("rollout").textContent = "This model has no self-attention layers.";

  function fillHeads() {
    const L = D.layers[state.layer];
    $("head").length = 0;
    $("head").add(new Option("mean of heads", -1));
    for (let h = 0; h < L.heads; h++) $("head").add(new Option(`head ${h}`, h));
    if (state.head >= L.heads) state.head = -1;
    $("head").value = state.head;
  }

  function render() {
    const c = $("image"), ctx = c.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(img, 0, 0, c.width, c.height);
    cross(c, state.y, state.x);
    D.layers.forEach((L, li) => {
      const cell = cellOf(L, state.y, state.x), maps = [];
      for (let h = 0; h < L.heads; h++) maps.push(mapOf(li, "attention", h, cell));
      maps.push(mapOf(li, "attention", -1, cell));
      const hi = Math.max(...maps.map((m) => range(m)[1]));
      maps.forEach((m, i) => { paint(gridCanvases[li][i], m, L.grid[0], L.grid[1], 0, hi, 0.5); cross(gridCanvases[li][i], state.y, state.x); });
    });
    if (D.layers.length) {
      const L = D.layers[state.layer], cell = cellOf(L, state.y, state.x);
      $("query").textContent = `Query: row ${Math.floor(cell / L.grid[1])}, column ${cell % L.grid[1]} of ${L.name}'s `
        + `${L.grid[0]}×${L.grid[1]} grid (relative y ${state.y.toFixed(3)}, x ${state.x.toFixed(3)}).`;
      D.kinds.forEach((k, i) => {
        const m = mapOf(state.layer, k, state.head, cell), [lo, hi] = range(m), [c, t] = simCanvases[i];
        paint(c, m, L.grid[0], L.grid[1], lo, hi, 1);
        cross(c, state.y, state.x);
        t.textContent = `${k} · ${fmt(lo)} … ${fmt(hi)}`;
      });
    }
    if (rollCanvas) paint(rollCanvas, roll, D.rollout.grid[0], D.rollout.grid[1], 0, 1, 0.5);
    state.renders += 1;
  }

  function select(y, x) { state.y = Math.min(Math.max(y, 0), 0.999999); state.x = Math.min(Math.max(x, 0), 0.999999); render(); }
  $("image").addEventListener("click", (e) => {
    const r = e.target.getBoundingClientRect();
    select((e.clientY - r.top) / r.height, (e.clientX - r.left) / r.width);
  });
  $("layer").addEventListener("change", (e) => { state.layer = +e.target.value; fillHeads(); render(); });
  $("head").addEventListener("change", (e) => { state.head = +e.target.value; render(); });
  simCanvases.forEach(([c], i) => c.addEventListener("mousemove", (e) => {
    const L = D.layers[state.layer], r = c.getBoundingClientRect();
    const row = Math.min(Math.floor((e.clientY - r.top) / r.height * L.grid[0]), L.grid[0] - 1);
    const col = Math.min(Math.floor((e.clientX - r.left) / r.width * L.grid[1]), L.grid[1] - 1);
    const m = mapOf(state.layer, D.kinds[i], state.head, cellOf(L, state.y, state.x));
    $("readout").textContent = `${D.kinds[i]} at key row ${row}, column ${col}: ${m[row * L.grid[1] + col]}`;
  }));
  window.visattn = { data: D, state, mapOf, cellOf, select, render, probs, rollout: roll };
  if (D.layers.length) fillHeads();
  img.onload = render;
  img.src = "data:image/png;base64," + D.image;
})();
