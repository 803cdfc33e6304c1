// The query-key atlas drawn on canvases: one panel per head, colour chosen here (no
// server round trip), the image patch of the point under the pointer in a tooltip, and
// a click that reports the point (Streamlit) or pins it (the offline file). No library,
// nothing fetched: the data (visattn.atlas_view.atlas_payload) is base64 inside.
"use strict";

function drawAtlas(root, d, pick) {
  const f32 = (s) => { const b = atob(s), u = new Uint8Array(b.length); for (let i = 0; i < b.length; i++) u[i] = b.charCodeAt(i); return new Float32Array(u.buffer); };
  const i32 = (s) => { const b = atob(s), u = new Uint8Array(b.length); for (let i = 0; i < b.length; i++) u[i] = b.charCodeAt(i); return new Int32Array(u.buffer); };
  const el = (tag, attrs, parent) => { const e = document.createElement(tag); Object.assign(e, attrs || {}); if (parent) parent.appendChild(e); return e; };
  const VIRIDIS = [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142], [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]];
  const viridis = (t) => { t = Math.min(1, Math.max(0, t)) * 9; const i = Math.min(8, Math.floor(t)), f = t - i, a = VIRIDIS[i], b = VIRIDIS[i + 1];
    return `rgb(${a.map((v, j) => Math.round(v + f * (b[j] - v))).join(",")})`; };

  const old = root.querySelector(".va-atlas"); if (old) old.remove();
  const box = el("div", { className: "va-atlas" }, root);
  const bar = el("div", { className: "va-bar" }, box);
  el("span", { textContent: "Colour by " }, bar);
  const select = el("select", { className: "va-colour" }, bar);
  for (const c of d.colour_by) el("option", { value: c, textContent: c === "kind" ? "query / key" : c }, select);
  select.value = d.colour;
  const legend = el("span", { className: "va-legend" }, bar);
  const grid = el("div", { className: "va-grid" }, box);
  const tip = el("div", { className: "va-tip" }, box);
  const tipCanvas = el("canvas", { width: 2 * d.tip, height: d.tip }, tip);
  const tipText = el("div", {}, tip);
  const pinned = el("div", { className: "va-pinned" }, box);

  const sprite = new Image();
  const labels = i32(d.labels), indices = i32(d.indices);
  const layers = {};
  for (const [name, lay] of Object.entries(d.layers)) layers[name] = { ...lay, image: i32(lay.image), token: i32(lay.token) };
  const panels = d.heads.map((h) => {
    const xy = f32(h.xy), norm = f32(h.norm), n = norm.length;
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (let i = 0; i < n; i++) { x0 = Math.min(x0, xy[2 * i]); x1 = Math.max(x1, xy[2 * i]); y0 = Math.min(y0, xy[2 * i + 1]); y1 = Math.max(y1, xy[2 * i + 1]); }
    const wrap = el("div", { className: "va-panel" }, grid);
    el("div", { className: "va-title", textContent: `${h.layer} · head ${h.head} · corr ${h.corr.toFixed(2)}` }, wrap);
    const canvas = el("canvas", { width: d.panel, height: d.panel, className: "va-plot" }, wrap);
    canvas.dataset.layer = h.layer; canvas.dataset.head = h.head;
    const s = (d.panel - 12) / Math.max(x1 - x0, y1 - y0, 1e-9), cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;  // one scale, centred
    const px = new Float32Array(2 * n);
    for (let i = 0; i < n; i++) { px[2 * i] = d.panel / 2 + (xy[2 * i] - cx) * s; px[2 * i + 1] = d.panel / 2 - (xy[2 * i + 1] - cy) * s; }
    return { h, n, px, norm, canvas, lay: layers[h.layer] };
  });

  function attribute(p, i, by) {  // the value colour encodes, per point (queries first, then keys)
    const m = p.n / 2, t = i % m, tok = p.lay.token[t] - p.lay.prefix, w = p.lay.grid[1];
    if (by === "kind") return i < m ? 0 : 1;
    if (by === "row") return tok < 0 ? -1 : Math.floor(tok / w);
    if (by === "column") return tok < 0 ? -1 : tok % w;
    if (by === "class") return labels[p.lay.image[t]];
    return p.norm[i];
  }
  function draw() {
    const by = select.value;
    legend.textContent = by === "kind" ? "  ● query  ● key" : by === "class" ? "" : `  dark: low ${by}, yellow: high (CLS grey)`;
    if (by === "kind") { legend.innerHTML = `&nbsp; <b style="color:${d.kind_colours[0]}">● query</b> <b style="color:${d.kind_colours[1]}">● key</b>`; }
    if (by === "class") legend.innerHTML = "&nbsp; " + d.classes.map((c, j) => `<b style="color:${d.class_colours[j % d.class_colours.length]}">●</b> ${c}`).join(" ");
    for (const p of panels) {
      const ctx = p.canvas.getContext("2d"), vals = new Float32Array(p.n);
      let lo = Infinity, hi = -Infinity;
      for (let i = 0; i < p.n; i++) { vals[i] = attribute(p, i, by); if (vals[i] >= 0 || by === "norm") { lo = Math.min(lo, vals[i]); hi = Math.max(hi, vals[i]); } }
      ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, d.panel, d.panel);
      ctx.globalAlpha = 0.65;
      for (let i = 0; i < p.n; i++) {
        const v = vals[i];
        ctx.fillStyle = by === "kind" ? d.kind_colours[v] : by === "class" ? d.class_colours[v % d.class_colours.length]
          : v < 0 && by !== "norm" ? "#bbb" : viridis((v - lo) / Math.max(hi - lo, 1e-9));
        ctx.fillRect(p.px[2 * i] - 1.5, p.px[2 * i + 1] - 1.5, 3, 3);
      }
      ctx.globalAlpha = 1;
    }
  }
  function nearest(p, x, y) {
    let best = -1, bd = 49;  // within 7 px
    for (let i = 0; i < p.n; i++) { const dx = p.px[2 * i] - x, dy = p.px[2 * i + 1] - y, dd = dx * dx + dy * dy; if (dd < bd) { bd = dd; best = i; } }
    return best;
  }
  function describe(p, i) {  // the point's image, token and cell; same words as point_target's caption
    const m = p.n / 2, t = i % m, img = p.lay.image[t], tok = p.lay.token[t] - p.lay.prefix, w = p.lay.grid[1];
    const cell = tok < 0 ? null : [Math.floor(tok / w), tok % w];
    const where = cell ? `row ${cell[0]}, column ${cell[1]}` : "the CLS token";
    return { img, cell, text: `${i < m ? "query" : "key"} of ${d.image_word} ${indices[img]} (${d.classes[labels[img]]}), ${where} of ` +
      `${p.h.layer}'s ${p.lay.grid[0]}×${p.lay.grid[1]} grid, head ${p.h.head}, norm ${p.norm[i].toFixed(2)}` };
  }
  function paintPatch(canvas, p, info) {  // left: the token's patch enlarged; right: the image, the cell outlined
    const ctx = canvas.getContext("2d"), side = d.tip, sx = (info.img % d.sprite_cols) * d.thumb, sy = Math.floor(info.img / d.sprite_cols) * d.thumb;
    ctx.imageSmoothingEnabled = false; ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, 2 * side, side);
    const [gh, gw] = p.lay.grid, ch = d.thumb / gh, cw = d.thumb / gw;
    if (info.cell) ctx.drawImage(sprite, sx + info.cell[1] * cw, sy + info.cell[0] * ch, cw, ch, 0, 0, side - 4, side - 4);
    else { ctx.fillStyle = "#444"; ctx.fillText("CLS token: no patch", 6, side / 2); }
    ctx.drawImage(sprite, sx, sy, d.thumb, d.thumb, side, 0, side, side);
    if (info.cell) { ctx.strokeStyle = "#00e5ff"; ctx.lineWidth = 2; ctx.strokeRect(side + info.cell[1] * side / gw, info.cell[0] * side / gh, side / gw, side / gh); }
  }
  for (const p of panels) {
    p.canvas.addEventListener("mousemove", (e) => {
      const r = p.canvas.getBoundingClientRect(), i = nearest(p, e.clientX - r.left, e.clientY - r.top);
      if (i < 0) { tip.style.display = "none"; return; }
      const info = describe(p, i), br = box.getBoundingClientRect();
      paintPatch(tipCanvas, p, info); tipText.textContent = info.text;
      tip.style.display = "block"; tip.dataset.point = i;
      tip.style.left = `${Math.min(e.clientX - br.left + 14, br.width - 2 * d.tip - 20)}px`; tip.style.top = `${e.clientY - br.top + 14}px`;
    });
    p.canvas.addEventListener("mouseleave", () => { tip.style.display = "none"; });
    p.canvas.addEventListener("click", (e) => {
      const r = p.canvas.getBoundingClientRect(), i = nearest(p, e.clientX - r.left, e.clientY - r.top);
      if (i < 0) return;
      if (pick) { pick({ layer: p.h.layer, head: p.h.head, point: i }); return; }
      const info = describe(p, i);
      pinned.replaceChildren(); const c = el("canvas", { width: 2 * d.tip, height: d.tip }, pinned); el("div", { textContent: info.text }, pinned);
      paintPatch(c, p, info);
    });
  }
  select.addEventListener("change", draw);
  sprite.onload = draw;
  sprite.src = `data:image/${d.sprite_format};base64,${d.sprite}`;
  draw();
}
