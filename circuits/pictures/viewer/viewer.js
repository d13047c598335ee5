// The circuit page (circuits.viewer): reads the JSON block #circuit-data and builds the view in plain
// SVG / DOM. No library, no network.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("circuit-data").textContent);
  const DX = 78, DY = 92, PAD = 60, LEFT = 96;  // LEFT: room for the layer labels
  const HELPS = "#1f5fbf", HURTS = "#c8372d";
  const DASH = { q: "", k: "7 4", v: "2 3" };

  document.body.insertAdjacentHTML("beforeend", `
    <header><h1 id="title"></h1><p id="stats"></p></header>
    <div id="controls">
      <label>edges shown <input type="range" id="edge-count" min="1"></label>
      <span id="edge-count-label"></span>
      <input type="search" id="search" placeholder="find a node: a3.h1, m5">
      <button id="clear" type="button">clear highlight</button>
    </div>
    <main><div id="canvas"><svg id="graph" role="img"></svg></div><aside id="panel"></aside></main>
    <footer id="legend">
      <span><i style="background:${HELPS}"></i>helps the metric (score &lt; 0)</span>
      <span><i style="background:${HURTS}"></i>hurts it (score &gt; 0)</span>
      <span>width, opacity: |score|</span>
      <span>into q: solid, k: dashed, v: dotted</span>
      <span>head: circle, MLP: square</span>
      <span>click a node: its paths; click the background: clear</span>
    </footer>
    <div id="tooltip" hidden></div>`);

  const $ = (id) => document.getElementById(id);
  const svg = $("graph");
  const NS = svg.namespaceURI;
  const make = (tag, attrs, parent) => {
    const el = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (parent) parent.appendChild(el);
    return el;
  };
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const esc = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);  // edge names hold <q>
  const fmt = (x) => (x === null || x === undefined ? "n/a"
    : Math.abs(x) >= 1e-3 || x === 0 ? x.toFixed(4) : x.toExponential(3));

  // ---------------------------------------------------------------- geometry
  const nodes = new Map(data.nodes.map((n) => [n.id, n]));
  const xs = [...data.nodes.map((n) => n.x), ...(data.columns || []).map((c) => c.x)];
  const ys = data.nodes.map((n) => n.y);
  const minX = Math.min(...xs), maxX = Math.max(...xs), maxY = Math.max(...ys);
  const width = (maxX - minX) * DX + LEFT + PAD, height = maxY * DY + 2 * PAD + (data.columns ? 30 : 0);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const at = (id) => {
    const n = nodes.get(id);
    return [(n.x - minX) * DX + LEFT, (maxY - n.y) * DY + PAD];
  };

  const defs = make("defs", {}, svg);
  for (const [name, colour] of [["helps", HELPS], ["hurts", HURTS]]) {
    const m = make("marker", { id: `arrow-${name}`, viewBox: "0 0 10 10", refX: "9", refY: "5",
      markerWidth: "5", markerHeight: "5", orient: "auto-start-reverse" }, defs);
    make("path", { d: "M0,0 L10,5 L0,10 z", fill: colour }, m);
  }
  const rows = make("g", { class: "rows" }, svg);
  const seenRows = new Map();
  for (const n of data.nodes) if (n.layer !== null && !seenRows.has(n.y)) seenRows.set(n.y, n.layer);
  for (const [y, layer] of seenRows) {
    const t = make("text", { x: 8, y: (maxY - y) * DY + PAD + 4, class: "row-label" }, rows);
    t.textContent = `layer ${layer}`;
  }
  for (const c of data.columns || []) {  // a position-aware circuit: the spans, an example's tokens
    const x = (c.x - minX) * DX + LEFT;
    const name = make("text", { x, y: height - 24, "text-anchor": "middle", class: "row-label" }, rows);
    name.textContent = c.label;
    const words = make("text", { x, y: height - 8, "text-anchor": "middle", class: "row-label" }, rows);
    words.textContent = c.text;
  }

  // ---------------------------------------------------------------- edges and nodes
  const top = Math.max(...data.edges.map((e) => Math.abs(e.score)), 1e-12);
  const edgeLayer = make("g", { class: "edges" }, svg);
  const edgeEls = data.edges.map((e, i) => {
    const w = Math.abs(e.score) / top;
    const colour = e.score < 0 ? HELPS : HURTS;
    const g = make("g", { class: "edge", "data-index": i }, edgeLayer);
    const [x0, y0] = at(e.source);
    for (const t of e.targets) {
      const [x1, y1] = at(t);
      const bend = 0.12 * (x1 - x0) + 10;
      make("path", {
        d: `M${x0},${y0 - 16} Q${(x0 + x1) / 2 + bend},${(y0 + y1) / 2} ${x1},${y1 + 20}`,
        stroke: colour, "stroke-width": (0.7 + 4.5 * w).toFixed(2), "stroke-opacity": (0.3 + 0.7 * w).toFixed(2),
        "stroke-dasharray": DASH[e.input] || "", fill: "none",
        "marker-end": `url(#arrow-${e.score < 0 ? "helps" : "hurts"})`,
      }, g);
    }
    g.addEventListener("mouseover", (ev) => tip(ev, `<b>${esc(e.name)}</b><br>score ${fmt(e.score)}`
      + `<br>rank ${i + 1} of ${data.edges.length} by |score|`
      + (e.input ? `<br>into the ${e.input} input` : "")));
    g.addEventListener("mouseout", untip);
    g.addEventListener("click", (ev) => { ev.stopPropagation(); select({ edge: i }); });
    return g;
  });
  const nodeLayer = make("g", { class: "nodes" }, svg);
  const nodeEls = new Map();
  for (const n of data.nodes) {
    const [x, y] = at(n.id);
    const g = make("g", { class: `node ${n.kind}`, "data-id": n.id, transform: `translate(${x},${y})` }, nodeLayer);
    if (n.kind === "mlp") make("rect", { x: -19, y: -15, width: 38, height: 30, rx: 3 }, g);
    else if (n.kind === "attention" || n.kind === "head") make("circle", { r: 19 }, g);
    else make("rect", { x: -26, y: -13, width: 52, height: 26, rx: 13 }, g);
    const label = make("text", { "text-anchor": "middle", dy: "4" }, g);
    label.textContent = n.label || n.id;
    g.addEventListener("mouseover", (ev) => tip(ev, nodeCard(n)));
    g.addEventListener("mouseout", untip);
    g.addEventListener("click", (ev) => { ev.stopPropagation(); select({ node: n.id }); });
    nodeEls.set(n.id, g);
  }
  svg.addEventListener("click", () => select(null));

  // ---------------------------------------------------------------- state
  let shown = data.shown;
  let selected = null;
  const visible = () => data.edges.slice(0, shown);
  function incident(id) {
    let into = 0, out = 0, total = 0;
    for (const e of visible()) {
      if (e.source === id) { out += 1; total += Math.abs(e.score); }
      if (e.targets.includes(id)) { into += 1; total += Math.abs(e.score); }
    }
    return { into, out, total };
  }
  function nodeCard(n) {
    const c = incident(n.id);
    return `<b>${esc(n.id)}</b> (${n.kind}${n.layer !== null ? `, layer ${n.layer}` : ""})`
      + (n.score !== null ? `<br>node score ${fmt(n.score)}` : "")
      + `<br>${c.into} shown edges in, ${c.out} out; sum |score| ${fmt(c.total)}`;
  }
  function tip(ev, text) {
    const t = $("tooltip");
    t.innerHTML = text;
    t.hidden = false;
    t.style.left = `${ev.clientX + 14}px`;
    t.style.top = `${ev.clientY + 10}px`;
  }
  function untip() { $("tooltip").hidden = true; }

  // the shown edges on some path through `id`: both ends reach it, or both are reached from it
  function through(id) {
    const edges = visible();
    const closure = (step) => {
      const reached = new Set([id]);
      for (let grew = true; grew;) {
        grew = false;
        for (const e of edges) for (const [a, b] of step(e)) {
          if (reached.has(a) && !reached.has(b)) { reached.add(b); grew = true; }
        }
      }
      return reached;
    };
    const down = closure((e) => e.targets.map((t) => [e.source, t]));
    const up = closure((e) => e.targets.map((t) => [t, e.source]));
    const on = new Set();
    edges.forEach((e, i) => {
      if (e.targets.some((t) => (up.has(e.source) && up.has(t)) || (down.has(e.source) && down.has(t)))) on.add(i);
    });
    return { on, nodes: new Set([...up, ...down]) };
  }

  function update() {
    const edges = visible();
    const used = new Set(data.columns ? [] : ["input", "logits"]);  // by span: only the nodes edges touch
    for (const e of edges) { used.add(e.source); e.targets.forEach((t) => used.add(t)); }
    edgeEls.forEach((g, i) => g.classList.toggle("hidden", i >= shown));
    nodeEls.forEach((g, id) => g.classList.toggle("hidden", !used.has(id)));
    let hl = null;
    if (selected && selected.node && used.has(selected.node)) hl = through(selected.node);
    if (selected && selected.edge !== undefined && selected.edge < shown) {
      const e = data.edges[selected.edge];
      hl = { on: new Set([selected.edge]), nodes: new Set([e.source, ...e.targets]) };
    }
    const query = $("search").value.trim().toLowerCase();
    edgeEls.forEach((g, i) => {
      g.classList.toggle("lit", !!hl && hl.on.has(i));
      g.classList.toggle("faded", (!!hl && !hl.on.has(i)) || (!!query && !hl));
    });
    nodeEls.forEach((g, id) => {
      const match = !!query && id.toLowerCase().includes(query);
      g.classList.toggle("match", match);
      g.classList.toggle("lit", !!hl && hl.nodes.has(id));
      g.classList.toggle("faded", (!!hl && !hl.nodes.has(id)) || (!!query && !match));
    });
    const cut = edges.length ? Math.abs(edges[edges.length - 1].score) : 0;
    $("edge-count-label").textContent = `${shown} of ${data.edges.length} (|score| >= ${fmt(cut)})`;
    panel(edges, used);
  }

  function panel(edges, used) {
    const scored = data.nodes.filter((n) => used.has(n.id) && n.kind !== "input" && n.kind !== "logits");
    const key = (n) => (n.score !== null ? Math.abs(n.score) : incident(n.id).total);
    scored.sort((a, b) => key(b) - key(a));
    const by = data.nodes.some((n) => n.score !== null) ? "|node score|" : "sum of |shown edge scores|";
    const rowsOf = (items, line) => items.map(line).join("");
    const p = $("panel");
    p.innerHTML = (data.faithfulness !== null ? `<p>faithfulness of the circuit: <b>${fmt(data.faithfulness)}</b></p>` : "")
      + `<h2>top nodes <small>(${by})</small></h2><ol id="top-nodes">`
      + rowsOf(scored.slice(0, 15), (n) => `<li data-node="${esc(n.id)}">${esc(n.id)} <span>${fmt(key(n))}</span></li>`)
      + `</ol><h2>top edges</h2><ol id="top-edges">`
      + rowsOf(edges.slice(0, 15), (e, i) => `<li data-edge="${i}">${esc(e.name)} <span>${fmt(e.score)}</span></li>`)
      + "</ol>"
      + (data.prompts.length ? `<h2>prompts</h2><ul>${rowsOf(data.prompts.slice(0, 10), (t) => `<li class="prompt">${esc(t)}</li>`)}</ul>` : "");
    p.querySelectorAll("li[data-node]").forEach((li) => li.addEventListener("click", () => select({ node: li.dataset.node })));
    p.querySelectorAll("li[data-edge]").forEach((li) => li.addEventListener("click", () => select({ edge: Number(li.dataset.edge) })));
  }

  function select(what) { selected = what; update(); }

  // ---------------------------------------------------------------- controls
  $("title").textContent = data.title;
  $("stats").textContent = `${data.n_in_graph} edges in the circuit, of ${data.n_edges} in the graph`
    + (data.model ? `; model ${data.model}` : "");
  const slider = $("edge-count");
  slider.max = String(data.edges.length);
  slider.value = String(shown);
  slider.addEventListener("input", () => { shown = Number(slider.value); update(); });
  $("search").addEventListener("input", update);
  $("clear").addEventListener("click", () => { $("search").value = ""; select(null); });
  update();
})();
