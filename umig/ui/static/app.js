// umig ui: the lineage graph (SVG), node pages, the audit log and forget-set previews.
// Plain JavaScript, no build step, no third-party code; reads the JSON API under /api.
"use strict";

(() => {
  // ------------------------------------------------------------------ constants
  const FRAMEWORK_COLORS = { fl: "#8ecae6", ddp: "#cdb4db", il: "#b7e4c7", tl: "#ffe066", other: "#dddddd" };
  const RELATION_COLORS = {
    aggregate: "#1d4e89", sync: "#7b2cbf", finetune: "#6c757d", increment: "#2a9d8f",
    transfer: "#e76f51", copy: "#9aa5b1", mixed: "#3d4852",
  };
  const NODE_W = 156, NODE_H = 40, GROUP_W = 196, GROUP_H = 54, COL_W = 214, ROW_H = 96;
  const MAX_BANDS = 12;      // a collapsed graph shows at most this many depth bands per framework
  const NODE_LIMIT = 400;    // an expanded group with more members (over several depths) splits into sub-bands
  const SEARCH_SHOWN = 12;
  const query = new URLSearchParams(location.search);
  // Graphs with more nodes than this open collapsed by depth and framework (?collapse=N to change it).
  const COLLAPSE_ABOVE = query.has("collapse") ? Number(query.get("collapse")) : 300;

  const $ = (sel) => document.querySelector(sel);
  const svg = $("#graph"), viewport = $("#viewport"), panel = $("#panel");

  /** Everything the page knows; the graph is loaded once, views come and go. */
  const S = {
    info: null,
    nodes: new Map(),      // name -> node record of /api/graph
    edges: [],
    parents: new Map(),    // name -> [edge]
    children: new Map(),   // name -> [edge]
    depth: new Map(),      // name -> longest-path depth from the roots
    maxDepth: 0,
    frameworks: [],
    relations: [],
    collapsed: false,
    expanded: new Set(),   // keys of expanded groups
    items: [],             // what is drawn: nodes and groups
    itemOf: new Map(),     // node name -> the item that shows it
    itemById: new Map(),   // item id -> item
    pos: new Map(),        // item id -> {x, y} (centre)
    view: { x: 0, y: 0, k: 1 },
    roles: null,           // highlighted nodes: name -> "discovery" | "inherited"
    highlightLabel: "",
    selected: null,
    matches: new Set(),
    methods: null,
    viewToken: 0,
  };

  // ------------------------------------------------------------------ helpers
  const esc = (v) => String(v).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const fmtInt = (n) => Number(n).toLocaleString("en-US");
  const pct = (v) => (v === null || v === undefined ? "-" : (100 * v).toFixed(1));
  const num = (v, d = 2) => (v === null || v === undefined ? "-" : Number(v).toFixed(d));
  const pad2 = (n) => String(n).padStart(2, "0");
  /** A store timestamp (seconds) in local time, as the CLI prints it. */
  const when = (t) => {
    if (!t) return "-";
    const d = new Date(t * 1000);
    return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  };
  const nodeLink = (name) => `<a href="#/node/${encodeURIComponent(name)}">${esc(name)}</a>`;
  const opLink = (op) => `<a href="#/operation/${encodeURIComponent(op)}">${esc(op)}</a>`;
  const short = (text, max) => (text.length <= max ? text : text.slice(0, Math.ceil(max / 2) - 1) + "\u2026" + text.slice(text.length - Math.floor(max / 2)));

  /** Compact label list: 0-4,7 (as the CLI prints it). */
  function ranges(labels) {
    const v = [...new Set(labels.map(Number))].sort((a, b) => a - b);
    const out = [];
    for (let i = 0; i < v.length;) {
      let j = i;
      while (j + 1 < v.length && v[j + 1] === v[j] + 1) j++;
      out.push(i === j ? `${v[i]}` : `${v[i]}-${v[j]}`);
      i = j + 1;
    }
    return out.join(",");
  }

  async function getJSON(url, options) {
    const res = await fetch(url, options);
    let body = null;
    try { body = await res.json(); } catch (e) { body = null; }
    if (!res.ok) throw new Error((body && body.error) || `${res.status} ${res.statusText}`);
    return body;
  }

  function kvTable(obj) {
    const rows = Object.entries(obj || {});
    if (!rows.length) return `<p class="muted">none recorded</p>`;
    return `<table class="kv">${rows.map(([k, v]) => `<tr><th>${esc(k)}</th><td class="mono">${esc(typeof v === "string" ? v : JSON.stringify(v))}</td></tr>`).join("")}</table>`;
  }

  function forgetText(forget, labels) {
    const parts = labels && labels.length ? [`labels ${ranges(labels)}`] : [];
    for (const s of (forget && forget.samples) || []) parts.push(s.client ? `client ${s.client}` : `${fmtInt(s.count)} samples`);
    return parts.join(", ") || "-";
  }

  // ------------------------------------------------------------------ the graph model
  function loadGraph(data) {
    S.nodes = new Map(data.nodes.map((n) => [n.name, n]));
    S.edges = data.edges;
    S.parents = new Map(data.nodes.map((n) => [n.name, []]));
    S.children = new Map(data.nodes.map((n) => [n.name, []]));
    for (const e of data.edges) {
      S.parents.get(e.child).push(e);
      S.children.get(e.parent).push(e);
    }
    // Longest-path depth in topological order (Kahn), as umig.graph.depths computes it.
    const indeg = new Map(data.nodes.map((n) => [n.name, S.parents.get(n.name).length]));
    const queue = data.nodes.filter((n) => indeg.get(n.name) === 0).map((n) => n.name);
    S.depth = new Map(queue.map((n) => [n, 0]));
    for (let i = 0; i < queue.length; i++) {
      const u = queue[i], du = S.depth.get(u);
      for (const e of S.children.get(u)) {
        S.depth.set(e.child, Math.max(S.depth.get(e.child) || 0, du + 1));
        indeg.set(e.child, indeg.get(e.child) - 1);
        if (indeg.get(e.child) === 0) queue.push(e.child);
      }
    }
    S.maxDepth = Math.max(0, ...S.depth.values());
    S.frameworks = [...new Set(data.nodes.map((n) => n.framework || "other"))].sort();
    S.relations = [...new Set(data.edges.map((e) => e.relation || "finetune"))].sort();
    S.collapsed = S.nodes.size > COLLAPSE_ABOVE;
  }

  const groupKey = (lo, hi, fw) => `${lo}-${hi}:${fw}`;

  /** The items to draw: every node, or (large graphs) groups by depth band and framework, expanded on click. */
  function buildItems() {
    const items = [];
    const nodeItem = (name) => ({ id: "n:" + name, kind: "node", name, lo: S.depth.get(name), hi: S.depth.get(name) });
    const byDepthFw = (names, lo, size) => {
      const buckets = new Map();
      for (const n of names) {
        const d = S.depth.get(n), fw = S.nodes.get(n).framework || "other";
        const blo = lo + Math.floor((d - lo) / size) * size;
        const key = `${blo}|${fw}`;
        if (!buckets.has(key)) buckets.set(key, { lo: blo, fw, members: [] });
        buckets.get(key).members.push(n);
      }
      return [...buckets.values()].sort((a, b) => a.lo - b.lo || a.fw.localeCompare(b.fw));
    };
    const add = (lo, hi, fw, members) => {
      const key = groupKey(lo, hi, fw);
      if (!S.expanded.has(key)) {
        items.push({ id: "g:" + key, kind: "group", key, lo, hi, fw, members });
        return;
      }
      if (hi > lo && members.length > NODE_LIMIT) {
        const size = Math.max(1, Math.ceil((hi - lo + 1) / 10));
        for (const b of byDepthFw(members, lo, size)) add(b.lo, Math.min(b.lo + size - 1, hi), fw, b.members);
      } else {
        for (const n of members) items.push(nodeItem(n));
      }
    };
    if (!S.collapsed) {
      for (const n of S.nodes.keys()) items.push(nodeItem(n));
    } else {
      const size = Math.max(1, Math.ceil((S.maxDepth + 1) / MAX_BANDS));
      for (const b of byDepthFw(S.nodes.keys(), 0, size)) add(b.lo, Math.min(b.lo + size - 1, S.maxDepth), b.fw, b.members);
    }
    S.items = items;
    S.itemById = new Map(items.map((it) => [it.id, it]));
    S.itemOf = new Map();
    for (const it of items) {
      if (it.kind === "node") S.itemOf.set(it.name, it);
      else for (const m of it.members) S.itemOf.set(m, it);
    }
  }

  /** Edges between drawn items; edges inside one group disappear, parallel ones merge (with a count). */
  function itemEdges() {
    const agg = new Map();
    for (const e of S.edges) {
      const a = S.itemOf.get(e.parent), b = S.itemOf.get(e.child);
      if (a === b) continue;
      const key = a.id + "\u0000" + b.id;
      let x = agg.get(key);
      if (!x) agg.set(key, (x = { from: a, to: b, count: 0, relations: new Set(), edge: e }));
      x.count++;
      x.relations.add(e.relation || "finetune");
    }
    return [...agg.values()];
  }

  /** Rows by depth (a collapsed band takes one row); within a row, order by the parents' mean x. */
  function layout(edges) {
    const los = [...new Set(S.items.map((i) => i.lo))].sort((a, b) => a - b);
    const rowOf = new Map(los.map((lo, i) => [lo, i]));
    const rows = los.map(() => []);
    for (const it of S.items) rows[rowOf.get(it.lo)].push(it);
    const up = new Map();
    for (const e of edges) {
      if (!up.has(e.to.id)) up.set(e.to.id, []);
      up.get(e.to.id).push(e.from);
    }
    S.pos = new Map();
    rows.forEach((row, r) => {
      const bary = new Map();
      for (const it of row) {
        const xs = (up.get(it.id) || []).map((p) => S.pos.get(p.id)).filter(Boolean).map((p) => p.x);
        bary.set(it.id, xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : Infinity);
      }
      const label = (it) => (it.kind === "node" ? it.name : it.key);
      row.sort((a, b) => bary.get(a.id) - bary.get(b.id) || label(a).localeCompare(label(b)));
      row.forEach((it, i) => S.pos.set(it.id, { x: (i - (row.length - 1) / 2) * COL_W, y: r * ROW_H }));
    });
  }

  const itemSize = (it) => (it.kind === "node" ? [NODE_W, NODE_H] : [GROUP_W, GROUP_H]);

  // ------------------------------------------------------------------ drawing
  function markers() {
    $("#markers").innerHTML = Object.entries(RELATION_COLORS).map(([rel, color]) =>
      `<marker id="arrow-${rel}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="10" markerHeight="10" markerUnits="userSpaceOnUse" orient="auto-start-reverse">` +
      `<path d="M0,1 L9,5 L0,9 z" fill="${color}"/></marker>`).join("");
  }

  function render() {
    buildItems();
    const edges = itemEdges();
    layout(edges);
    const parts = ['<g class="edges">'];
    for (const e of edges) {
      const a = S.pos.get(e.from.id), b = S.pos.get(e.to.id);
      const [, ha] = itemSize(e.from), [, hb] = itemSize(e.to);
      const rel = e.relations.size === 1 ? [...e.relations][0] : "mixed";
      const color = RELATION_COLORS[rel] || RELATION_COLORS.mixed;
      const x1 = a.x, y1 = a.y + ha / 2, x2 = b.x, y2 = b.y - hb / 2 - 2, my = (y1 + y2) / 2;
      const width = e.count > 1 ? Math.min(1.4 + Math.log2(e.count), 7) : 1.4;
      const title = e.count > 1 ? `${fmtInt(e.count)} edges (${[...e.relations].join(", ")})`
        : `${e.edge.parent} \u2192 ${e.edge.child} (${e.edge.relation}${e.edge.weight != null ? ", weight " + Number(e.edge.weight).toFixed(3) : ""})`;
      parts.push(`<path class="edge rel-${esc(rel)}" data-from="${esc(e.from.id)}" data-to="${esc(e.to.id)}" ` +
        `d="M${x1},${y1} C${x1},${my} ${x2},${my} ${x2},${y2}" stroke="${color}" stroke-width="${width}" ` +
        `marker-end="url(#arrow-${RELATION_COLORS[rel] ? rel : "mixed"})"><title>${esc(title)}</title></path>`);
    }
    parts.push('</g><g class="items">');
    for (const it of S.items) {
      const p = S.pos.get(it.id);
      const [w, h] = itemSize(it);
      if (it.kind === "node") {
        const n = S.nodes.get(it.name);
        const fw = n.framework || "other";
        const sub = `${fw} \u00b7 v${n.version}` + (n.data_size ? ` \u00b7 ${fmtInt(n.data_size)} samples` : "");
        parts.push(`<g class="node fw-${esc(fw)}" data-name="${esc(it.name)}" transform="translate(${p.x - w / 2},${p.y - h / 2})">` +
          `<title>${esc(it.name)}\n${esc(sub)}</title><rect class="halo" x="-6" y="-6" width="${w + 12}" height="${h + 12}" rx="10"/>` +
          `<rect class="box" width="${w}" height="${h}" rx="6" fill="${FRAMEWORK_COLORS[fw] || FRAMEWORK_COLORS.other}"/>` +
          `<text class="name" x="${w / 2}" y="16" text-anchor="middle">${esc(short(it.name, 21))}</text>` +
          `<text class="sub" x="${w / 2}" y="31" text-anchor="middle">${esc(sub)}</text></g>`);
      } else {
        const depths = it.lo === it.hi ? `depth ${it.lo}` : `depths ${it.lo}\u2013${it.hi}`;
        parts.push(`<g class="group fw-${esc(it.fw)}" data-key="${esc(it.key)}" data-count="${it.members.length}" transform="translate(${p.x - w / 2},${p.y - h / 2})">` +
          `<title>${esc(it.fw)}, ${depths}: ${fmtInt(it.members.length)} nodes (click to expand)</title>` +
          `<rect class="halo" x="-6" y="-6" width="${w + 12}" height="${h + 12}" rx="12"/>` +
          `<rect class="box" width="${w}" height="${h}" rx="10" fill="${FRAMEWORK_COLORS[it.fw] || FRAMEWORK_COLORS.other}"/>` +
          `<text class="name" x="${w / 2}" y="18" text-anchor="middle">${esc(it.fw)} \u00b7 ${fmtInt(it.members.length)} nodes</text>` +
          `<text class="sub" x="${w / 2}" y="33" text-anchor="middle">${depths} \u00b7 click to expand</text>` +
          `<text class="badge" x="${w / 2}" y="47" text-anchor="middle"></text></g>`);
      }
    }
    parts.push("</g>");
    viewport.innerHTML = parts.join("");
    applyClasses();
    drawLegend();
    const groups = S.items.filter((i) => i.kind === "group").length;
    $("#status").textContent = `${fmtInt(S.nodes.size)} nodes \u00b7 ${fmtInt(S.edges.length)} edges` +
      (groups ? ` \u00b7 ${fmtInt(groups)} groups (click one to expand)` +
        (S.items.length > groups ? `, ${fmtInt(S.items.length - groups)} nodes drawn singly` : "") : "");
    svg.dataset.items = String(S.items.length);
  }

  /** Highlight, selection and search classes, without redrawing. */
  function applyClasses() {
    const roles = S.roles;
    viewport.classList.toggle("highlighting", !!roles);
    for (const el of viewport.querySelectorAll("g.node")) {
      const name = el.dataset.name;
      const role = roles ? roles.get(name) : undefined;
      el.classList.toggle("discovery", role === "discovery");
      el.classList.toggle("inherited", role === "inherited");
      el.classList.toggle("selected", name === S.selected);
      el.classList.toggle("match", S.matches.has(name));
    }
    const counts = new Map();
    for (const it of S.items) {
      if (it.kind !== "group") continue;
      let d = 0, i = 0, m = 0;
      for (const n of it.members) {
        const r = roles && roles.get(n);
        if (r === "discovery") d++;
        else if (r === "inherited") i++;
        if (S.matches.has(n)) m++;
      }
      counts.set(it.key, { d, i, m });
    }
    for (const el of viewport.querySelectorAll("g.group")) {
      const c = counts.get(el.dataset.key) || { d: 0, i: 0, m: 0 };
      el.classList.toggle("has-discovery", c.d > 0);
      el.classList.toggle("has-inherited", c.i > 0 && c.d === 0);
      el.classList.toggle("has-match", c.m > 0);
      const parts = [];
      if (c.d) parts.push(`${fmtInt(c.d)} discovery`);
      if (c.i) parts.push(`${fmtInt(c.i)} inherited`);
      if (c.m) parts.push(`${fmtInt(c.m)} match${c.m > 1 ? "es" : ""}`);
      el.querySelector("text.badge").textContent = parts.join(" \u00b7 ");
    }
    if (roles) {
      const hot = (id) => {
        const it = S.itemById.get(id);
        return it && (it.kind === "node" ? roles.has(it.name) : it.members.some((n) => roles.has(n)));
      };
      const cache = new Map();
      const isHot = (id) => (cache.has(id) ? cache.get(id) : (cache.set(id, hot(id)), cache.get(id)));
      for (const el of viewport.querySelectorAll("path.edge")) el.classList.toggle("hl", isHot(el.dataset.from) && isHot(el.dataset.to));
    }
  }

  function drawLegend() {
    const fws = S.frameworks.map((f) => `<span class="key"><span class="swatch" style="background:${FRAMEWORK_COLORS[f] || FRAMEWORK_COLORS.other}"></span>${esc(f)}</span>`);
    const rels = S.relations.map((r) => `<span class="key"><span class="swatch line" style="background:${RELATION_COLORS[r] || RELATION_COLORS.mixed}"></span>${esc(r)}</span>`);
    let hl = "";
    if (S.roles) {
      hl = `<span class="title">${esc(S.highlightLabel)}</span>` +
        `<span class="key"><span class="swatch ring" style="border-color:var(--discovery)"></span>discovery</span>` +
        `<span class="key"><span class="swatch ring" style="border-color:var(--inherited)"></span>inherited</span>` +
        `<button type="button" data-action="clear">clear highlight</button>`;
    }
    $("#legend").innerHTML = `<span class="title">framework</span>${fws.join("")}<span class="title">relation</span>${rels.join("")}${hl}`;
  }

  function setHighlight(roles, label) {
    S.roles = roles;
    S.highlightLabel = label || "";
    applyClasses();
    drawLegend();
  }

  // ------------------------------------------------------------------ pan and zoom
  function applyView() {
    viewport.setAttribute("transform", `translate(${S.view.x},${S.view.y}) scale(${S.view.k})`);
  }

  function bounds(items) {
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const it of items) {
      const p = S.pos.get(it.id), [w, h] = itemSize(it);
      x0 = Math.min(x0, p.x - w / 2); x1 = Math.max(x1, p.x + w / 2);
      y0 = Math.min(y0, p.y - h / 2); y1 = Math.max(y1, p.y + h / 2);
    }
    return { x0, y0, x1, y1 };
  }

  function fit(items = S.items) {
    if (!items.length) return;
    const b = bounds(items), W = svg.clientWidth, H = svg.clientHeight, pad = 60;
    const k = Math.min((W - 2 * pad) / Math.max(b.x1 - b.x0, 1), (H - 2 * pad) / Math.max(b.y1 - b.y0, 1), 1.4);
    S.view = { k, x: W / 2 - k * (b.x0 + b.x1) / 2, y: H / 2 - k * (b.y0 + b.y1) / 2 };
    applyView();
  }

  function zoomAt(factor, cx, cy) {
    const k = Math.min(4, Math.max(0.01, S.view.k * factor));
    S.view.x = cx - (cx - S.view.x) * (k / S.view.k);
    S.view.y = cy - (cy - S.view.y) * (k / S.view.k);
    S.view.k = k;
    applyView();
  }

  /** Bring an item into view (zooming in if the graph is drawn too small to read). */
  function centerOn(item) {
    const p = S.pos.get(item.id), W = svg.clientWidth, H = svg.clientHeight;
    const sx = S.view.x + p.x * S.view.k, sy = S.view.y + p.y * S.view.k;
    const readable = S.view.k >= 0.45;
    if (readable && sx > 60 && sx < W - 60 && sy > 60 && sy < H - 60) return;
    if (!readable) S.view.k = 0.9;
    S.view.x = W / 2 - p.x * S.view.k;
    S.view.y = H / 2 - p.y * S.view.k;
    applyView();
  }

  let drag = null, dragMoved = false;
  svg.addEventListener("mousedown", (e) => {
    if (e.button !== 0) return;
    drag = { x: e.clientX, y: e.clientY, vx: S.view.x, vy: S.view.y };
    dragMoved = false;
  });
  window.addEventListener("mousemove", (e) => {
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (!dragMoved && Math.hypot(dx, dy) < 4) return;
    dragMoved = true;
    svg.classList.add("dragging");
    S.view.x = drag.vx + dx;
    S.view.y = drag.vy + dy;
    applyView();
  });
  window.addEventListener("mouseup", () => { drag = null; svg.classList.remove("dragging"); });
  svg.addEventListener("wheel", (e) => {
    e.preventDefault();
    const r = svg.getBoundingClientRect();
    zoomAt(Math.exp(-e.deltaY * 0.0015), e.clientX - r.left, e.clientY - r.top);
  }, { passive: false });
  svg.addEventListener("click", (e) => {
    if (dragMoved) return;
    const node = e.target.closest("g.node");
    if (node) {
      location.hash = "#/node/" + encodeURIComponent(node.dataset.name);
      return;
    }
    const group = e.target.closest("g.group");
    if (group) expandGroup(group.dataset.key);
  });

  function expandGroup(key) {
    const it = S.itemById.get("g:" + key);
    S.expanded.add(key);
    render();
    if (it) {
      const members = new Set(it.members);
      const shown = S.items.filter((x) => (x.kind === "node" ? members.has(x.name) : members.has(x.members[0])));
      const b = bounds(shown), W = svg.clientWidth, H = svg.clientHeight;
      // Keep the zoom when the expanded part fits; otherwise fit to it.
      if ((b.x1 - b.x0) * S.view.k > W - 80 || (b.y1 - b.y0) * S.view.k > H - 80 || S.view.k < 0.3) fit(shown);
      else centerOn(shown[Math.floor(shown.length / 2)]);
    }
  }

  /** Expand the groups that hide a node, so it is drawn on its own; returns its item. */
  function reveal(name) {
    for (let guard = 0; guard < 64; guard++) {
      const it = S.itemOf.get(name);
      if (!it || it.kind === "node") return it;
      S.expanded.add(it.key);
      render();
    }
    return S.itemOf.get(name);
  }

  document.addEventListener("click", (e) => {
    const btn = e.target.closest("button[data-action]");
    if (!btn) return;
    const W = svg.clientWidth, H = svg.clientHeight;
    switch (btn.dataset.action) {
      case "zoom-in": zoomAt(1.3, W / 2, H / 2); break;
      case "zoom-out": zoomAt(1 / 1.3, W / 2, H / 2); break;
      case "fit": fit(); break;
      case "collapse": S.expanded.clear(); render(); fit(); break;
      case "clear": setHighlight(null); break;
      default: break;
    }
  });

  // ------------------------------------------------------------------ search
  const search = $("#search"), results = $("#search-results");
  let searchTimer = null;
  function runSearch() {
    const q = search.value.trim().toLowerCase();
    S.matches = new Set();
    if (q) for (const n of S.nodes.keys()) if (n.toLowerCase().includes(q)) S.matches.add(n);
    applyClasses();
    if (!q) { results.hidden = true; return; }
    const first = [...S.matches].slice(0, SEARCH_SHOWN);
    results.innerHTML = first.map((n, i) => `<li data-name="${esc(n)}" class="${i === 0 ? "active" : ""}">${esc(n)}</li>`).join("") +
      (S.matches.size > SEARCH_SHOWN ? `<li class="more">${fmtInt(S.matches.size - SEARCH_SHOWN)} more matches</li>` : "") +
      (S.matches.size === 0 ? `<li class="more">no node matches</li>` : "");
    results.hidden = false;
  }
  search.addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(runSearch, 120); });
  search.addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      clearTimeout(searchTimer);
      runSearch();
      const first = results.querySelector("li[data-name]");
      if (first) { location.hash = "#/node/" + encodeURIComponent(first.dataset.name); results.hidden = true; }
    } else if (e.key === "Escape") {
      search.value = "";
      runSearch();
    }
  });
  results.addEventListener("click", (e) => {
    const li = e.target.closest("li[data-name]");
    if (!li) return;
    location.hash = "#/node/" + encodeURIComponent(li.dataset.name);
    results.hidden = true;
  });
  document.addEventListener("click", (e) => { if (!e.target.closest(".search")) results.hidden = true; });

  // ------------------------------------------------------------------ views
  function setTab(tab) {
    for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.tab === tab);
  }

  function show(html) { panel.innerHTML = html; panel.scrollTop = 0; }

  /** Runs an async view; a view that finishes after the user moved on is dropped. */
  async function view(fn) {
    const token = ++S.viewToken;
    try {
      const html = await fn();
      if (token === S.viewToken && html !== undefined) show(html);
    } catch (err) {
      if (token === S.viewToken) show(`<p class="error">${esc(err.message)}</p>`);
    }
  }

  function route() {
    const [path, qs] = location.hash.slice(1).split("?");
    const params = new URLSearchParams(qs || "");
    if (path.startsWith("/node/")) { setTab(""); return nodeView(decodeURIComponent(path.slice(6))); }
    if (path === "/operations") { setTab("operations"); return operationsView(); }
    if (path.startsWith("/operation/")) { setTab("operations"); return operationView(decodeURIComponent(path.slice(11))); }
    if (path === "/plan") { setTab("plan"); return planView(params); }
    setTab("overview");
    return overview();
  }

  function overview() {
    S.selected = null;
    setHighlight(null);
    const fw = Object.entries(countBy((n) => n.framework || "other"));
    const withData = [...S.nodes.values()].filter((n) => n.data_size > 0).length;
    const roots = [...S.nodes.keys()].filter((n) => !S.parents.get(n).length);
    view(async () => `<h2>Lineage</h2>
      <p>${fmtInt(S.nodes.size)} nodes, ${fmtInt(S.edges.length)} edges, ${fmtInt(S.maxDepth + 1)} depth levels,
      ${fmtInt(roots.length)} root(s); ${fmtInt(withData)} node(s) hold training data of their own.</p>
      <h3>Frameworks</h3><table>${fw.map(([k, v]) => `<tr><td><span class="swatch" style="background:${FRAMEWORK_COLORS[k] || FRAMEWORK_COLORS.other}"></span> ${esc(k)}</td><td class="num">${fmtInt(v)}</td></tr>`).join("")}</table>
      <h3>Roots</h3><ul class="links">${roots.slice(0, 40).map((n) => `<li>${nodeLink(n)}</li>`).join("")}</ul>
      ${roots.length > 40 ? `<p class="muted">and ${fmtInt(roots.length - 40)} more</p>` : ""}
      <h3>How to read it</h3>
      <p>Models are laid out by depth, parents above children; fill colour is the framework, edge colour the relation.
      Drag to pan, scroll to zoom, click a node to open it${S.collapsed ? ", click a group to expand it" : ""}.
      <a href="#/operations">Operations</a> lists what was forgotten; <a href="#/plan">Forget preview</a> shows which models a request would touch, changing nothing.</p>`);
  }

  function countBy(key) {
    const out = {};
    for (const n of S.nodes.values()) out[key(n)] = (out[key(n)] || 0) + 1;
    return out;
  }

  function nodeView(name) {
    S.selected = name;
    if (S.nodes.has(name)) {
      const it = reveal(name);
      applyClasses();
      if (it) centerOn(it);
    }
    view(async () => {
      const [n, ops] = await Promise.all([
        getJSON(`/api/nodes/${encodeURIComponent(name)}`),
        getJSON(`/api/operations?node=${encodeURIComponent(name)}`),
      ]);
      const arch = n.arch || {};
      const data = n.data
        ? `<table class="kv"><tr><th>source</th><td class="mono">${esc(n.data.source)}</td></tr>` +
          (n.data.subset ? `<tr><th>subset</th><td class="mono">${esc(n.data.subset)}</td></tr>` : "") +
          (n.data.only_labels ? `<tr><th>only labels</th><td class="mono">${esc(n.data.only_labels)}</td></tr>` : "") +
          `<tr><th>fingerprint</th><td class="mono" title="${esc(n.data_fingerprint || "")}">${esc((n.data_fingerprint || "-").slice(0, 16))}\u2026</td></tr>` +
          `<tr><th>samples</th><td>${fmtInt(n.data_size)}</td></tr></table>` + labelBars(n.label_counts)
        : `<p class="muted">No training data of its own (its data is its parents').</p>`;
      const fim = n.fim
        ? kvTable({ samples: n.fim.samples, kind: n.fim.kind, temperature: n.fim.temperature, weight: n.fim.weight_shape.join(" x "), classes: ranges(n.fim.classes) })
        : `<p class="muted">No model FIM.</p>`;
      const parents = n.parents.length
        ? `<ul class="links">${n.parents.map((p) => `<li>${nodeLink(p.name)} <span class="chip">${esc(p.relation)}${p.weight != null ? " " + Number(p.weight).toFixed(3) : ""}</span></li>`).join("")}</ul>`
        : `<p class="muted">A root.</p>`;
      const children = n.children.length ? `<ul class="links">${n.children.map((c) => `<li>${nodeLink(c)}</li>`).join("")}</ul>` : `<p class="muted">A leaf.</p>`;
      const versions = `<table><tr><th>version</th><th>created</th><th>made by</th><th></th></tr>${n.versions.map((v) =>
        `<tr class="${v.version === n.version ? "current" : ""}"><td>v${v.version}${v.version === n.version ? " (current)" : ""}</td><td>${when(v.created)}</td>` +
        `<td>${v.operation ? opLink(v.operation) : "recorded"}</td><td>${v.purged ? '<span class="chip">purged</span>' : ""}${v.adapter ? ' <span class="chip">adapter</span>' : ""}</td></tr>`).join("")}</table>`;
      const hasOwnData = !!n.data;
      return `<h2>${esc(n.name)}</h2>
        <div class="badges"><span class="chip">${esc(n.framework)}</span><span class="chip">version ${n.version}</span>
        <span class="chip">${n.classes.length} classes</span>${hasOwnData ? `<a class="chip" href="#/plan?client=${encodeURIComponent(n.name)}">preview forgetting this client</a>` : ""}</div>
        <h3>Model</h3>${kvTable({ architecture: arch.spec || arch, arguments: arch.kwargs || {}, head: n.head, classes: ranges(n.classes), "input shape": n.input_shape ? n.input_shape.join(" x ") : "-", created: when(n.created) })}
        <h3>Data</h3>${data}
        <h3>Recipe</h3>${n.recipe ? kvTable(n.recipe) : '<p class="muted">No recipe recorded (retraining it is not possible).</p>'}
        <h3>Metadata</h3>${kvTable(n.meta)}
        <h3>Parents</h3>${parents}
        <h3>Children</h3>${children}
        <h3>Versions</h3>${versions}
        <h3>Operations and metrics</h3>${nodeOperations(name, ops)}
        <h3>Fisher information (FIM)</h3>${fim}`;
    });
  }

  function labelBars(counts) {
    const entries = Object.entries(counts || {});
    if (!entries.length) return "";
    const max = Math.max(...entries.map(([, v]) => v));
    return `<div class="bars">${entries.map(([k, v]) => `<span>${esc(k)}</span><span class="bar" style="width:${(100 * v / max).toFixed(1)}%"></span><span class="num">${fmtInt(v)}</span>`).join("")}</div>`;
  }

  /** What each operation did to one node: role, versions, metrics, and its verification when there is one. */
  function nodeOperations(name, ops) {
    if (!ops.length) return `<p class="muted">No operation has changed this node.</p>`;
    return ops.slice().reverse().map((op) => {
      const row = op.nodes.find((x) => x.name === name) || {};
      const ver = op.verification && (op.verification.nodes || []).find((x) => x.name === name);
      return `<div class="op"><div>${opLink(op.operation)} <span class="chip ${esc(op.state)}">${esc(op.state)}</span>
        <span class="chip ${esc(row.role || "")}">${esc(row.role || "-")}</span></div>
        <p>forgot ${esc(forgetText(op.forget, op.labels))} with <b>${esc(op.method)}</b>, ${when(op.created)}; v${row.version_before} \u2192 v${row.version_after}</p>
        ${metricsTable([row])}${ver ? verificationNode(ver, op.verification) : ""}</div>`;
    }).join("");
  }

  const METRICS = [["AD_f", "train"], ["AD_r", "train"], ["AD_f", "heldout"], ["AD_r", "heldout"]];

  /** AD_f / AD_r before -> after (percent) per node; only the figures that were measured. A node's
   * role is the colour of the bar left of its name. */
  function metricsTable(rows, withNode = false) {
    const shown = METRICS.filter(([m, s]) => rows.some((r) => r[`${m}_${s}_before`] != null || r[`${m}_${s}_after`] != null));
    const changed = !withNode && rows.some((r) => r.params_changed != null);
    if (!shown.length && !changed && !withNode) return `<p class="muted">No metrics (run with evaluation to measure AD_f / AD_r).</p>`;
    const head = (withNode ? "<th>node</th><th>version</th>" : "") +
      shown.map(([m, s]) => `<th class="num">${m} ${s === "heldout" ? "held-out" : s}</th>`).join("") + (changed ? '<th class="num">params changed</th>' : "");
    const body = rows.map((r) => "<tr>" + (withNode ? `<td class="role-${esc(r.role)}" title="${esc(r.role)}">${nodeLink(r.name)}</td><td>v${r.version_before}\u2192v${r.version_after}</td>` : "") +
      shown.map(([m, s]) => `<td class="num">${pct(r[`${m}_${s}_before`])} \u2192 ${pct(r[`${m}_${s}_after`])}</td>`).join("") +
      (changed ? `<td class="num">${r.params_changed != null ? fmtInt(r.params_changed) + (r.params_total ? " of " + fmtInt(r.params_total) : "") : "-"}</td>` : "") + "</tr>").join("");
    return `<div class="scroll"><table><tr>${head}</tr>${body}</table></div>` +
      (shown.length ? `<p class="muted">percent, before \u2192 after${withNode ? "; the bar left of a name is its role (red: discovery, orange: inherited)" : ""}</p>` : "");
  }

  const VERIFY = [["forget_acc", "forget"], ["retain_acc", "retain"], ["heldout_acc", "held-out"], ["mia_efficacy", "MIA eff."]];

  function verificationNode(v, verification) {
    return `<p>Verified against ${esc(verification.reference_method || "the reference")} on ${when(verification.created)}: Avg. Gap <b>${num(v.avg_gap)}</b> points</p>` +
      `<div class="scroll"><table><tr><th></th>${VERIFY.map(([, t]) => `<th class="num">${t}</th>`).join("")}</tr>` +
      `<tr><td>unlearned</td>${VERIFY.map(([k]) => `<td class="num">${pct((v.unlearned || {})[k])}</td>`).join("")}</tr>` +
      `<tr><td>reference</td>${VERIFY.map(([k]) => `<td class="num">${pct((v.reference || {})[k])}</td>`).join("")}</tr>` +
      `<tr><td>gap (points)</td>${VERIFY.map(([k]) => `<td class="num">${gapText((v.gap || {})[k])}</td>`).join("")}</tr></table></div>`;
  }

  const gapText = (g) => (g === null || g === undefined ? "-" : (g > 0 ? "+" : "") + Number(g).toFixed(1));

  function operationsView() {
    S.selected = null;
    applyClasses();
    view(async () => {
      const ops = await getJSON("/api/operations");
      if (!ops.length) return `<h2>Operations</h2><p class="muted">No unlearning operation yet. <a href="#/plan">Preview one.</a></p>`;
      // Ticket and verification columns only when some operation has them (as `umig history`).
      const tickets = ops.some((o) => o.ticket), verified = ops.some((o) => o.verification);
      const rows = ops.slice().reverse().map((o) => {
        const v = o.verification;
        return `<tr data-op="${esc(o.operation)}"><td>${opLink(o.operation)}<br><span class="muted">${when(o.created)}</span></td>` +
          `<td>${esc(forgetText(o.forget, o.labels))}</td><td>${esc(o.method)}</td><td><span class="chip ${esc(o.state)}">${esc(o.state)}</span></td>` +
          `<td class="num">${o.affected.length}</td>` +
          (verified ? `<td class="num">${v && v.max_avg_gap != null ? num(v.max_avg_gap) : "-"}</td>` : "") +
          (tickets ? `<td>${esc(o.ticket || "")}</td>` : "") + "</tr>";
      }).join("");
      return `<h2>Operations</h2><p class="muted">The audit log, newest first (${ops.length}). Click one to see its forget set, its nodes on the graph, metrics and verification.</p>
        <table class="ops"><tr><th>operation</th><th>forgot</th><th>method</th><th>state</th><th class="num">nodes</th>` +
        `${verified ? '<th class="num" title="worst node\'s Avg. Gap to retraining, points">Avg. Gap</th>' : ""}${tickets ? "<th>ticket</th>" : ""}</tr>${rows}</table>`;
    });
  }

  panel.addEventListener("click", (e) => {
    const tr = e.target.closest("tr[data-op]");
    if (tr && !e.target.closest("a")) location.hash = "#/operation/" + encodeURIComponent(tr.dataset.op);
  });

  function rolesOf(discovery, affected) {
    const roles = new Map();
    for (const n of affected) roles.set(n, "inherited");
    for (const n of discovery) roles.set(n, "discovery");
    return roles;
  }

  function operationView(opId) {
    S.selected = null;
    view(async () => {
      const op = await getJSON(`/api/operations/${encodeURIComponent(opId)}`);
      setHighlight(rolesOf(op.discovery, op.affected), `operation ${op.operation}`);
      const req = ["requester", "reason", "ticket"].filter((k) => op[k]);
      const samples = (op.forget.samples || []).map((s) => `<li>${s.client ? `client ${nodeLink(s.client)}: ` : ""}${fmtInt(s.count)} samples of dataset <span class="mono" title="${esc(s.dataset)}">${esc(s.dataset.slice(0, 12))}\u2026</span></li>`).join("");
      const v = op.verification;
      const verification = v
        ? `<p>Against ${esc(v.reference_method)} (reference ${esc(v.reference)}, ${num(v.reference_s, 1)} s), held-out ${esc(v.heldout || "-")}:
           mean Avg. Gap <b>${num(v.avg_gap)}</b>, worst <b>${num(v.max_avg_gap)}</b> points
           ${v.max_gap != null ? `<span class="chip ${v.passed ? "passed" : "failed"}">--max-gap ${num(v.max_gap, 1)}: ${v.passed ? "passed" : "exceeded"}</span>` : ""}; verified ${when(v.created)}.</p>
           <div class="scroll"><table><tr><th>node</th><th class="num">Avg. Gap</th>${VERIFY.map(([, t]) => `<th class="num">${t}</th>`).join("")}</tr>
           ${(v.nodes || []).map((r) => `<tr><td>${nodeLink(r.name)}</td><td class="num"><b>${num(r.avg_gap)}</b></td>${VERIFY.map(([k]) => `<td class="num" title="unlearned ${pct((r.unlearned || {})[k])}% / reference ${pct((r.reference || {})[k])}%">${gapText((r.gap || {})[k])}</td>`).join("")}</tr>`).join("")}</table></div>
           <p class="muted">Gap to the reference in points (unlearned − reference; hover a figure for both), and each node's Avg. Gap. The node page shows both models' figures.</p>`
        : `<p class="muted">Not verified. <code>umig verify ${esc(op.operation)}</code> compares it with retraining.</p>`;
      const write = S.info.allow_write && op.state === "applied"
        ? `<p><button type="button" class="danger" data-revert="${esc(op.operation)}">Revert this operation</button></p>` : "";
      return `<h2>${esc(op.operation)}</h2>
        <div class="badges"><span class="chip ${esc(op.state)}">${esc(op.state)}</span><span class="chip">${esc(op.method)}</span><span class="chip">${when(op.created)}</span></div>
        ${req.length ? `<h3>Request</h3>${kvTable(Object.fromEntries(req.map((k) => [k, op[k]])))}` : ""}
        <h3>Forget set</h3><p>${op.labels.length ? `labels <b>${esc(ranges(op.labels))}</b>` : "no labels"}</p>${samples ? `<ul>${samples}</ul>` : ""}
        <h3>Plan</h3><p>policy ${esc(op.policy)}: <span class="chip discovery">${op.discovery.length} discovery</span>
          <span class="chip inherited">${op.affected.length - op.discovery.filter((n) => op.affected.includes(n)).length} inherited</span>, highlighted on the graph; ${num(op.wall_s, 3)} s.</p>
        <h3>Nodes and metrics</h3>${metricsTable(op.nodes, true)}
        <h3>Verification</h3>${verification}
        <h3>Method parameters</h3>${kvTable(op.params)}
        ${write}`;
    });
  }

  async function loadMethods() {
    if (!S.methods) S.methods = await getJSON("/api/methods").catch(() => []);
    return S.methods;
  }

  function planView(params) {
    S.selected = null;
    const labels = params.get("labels") || "";
    const client = params.get("client") || "";
    const method = params.get("method") || "";
    const discovery = params.get("discovery") || "first";
    view(async () => {
      const methods = await loadMethods();
      const dataNodes = [...S.nodes.values()].filter((n) => n.data_size > 0).slice(0, 5000);
      const form = `<h2>Forget preview</h2>
        <p class="muted">Type labels and/or pick a client: the plan (discovery and inherited nodes) shows on the graph. Nothing is changed.</p>
        <form class="plan" id="plan-form">
          <label for="plan-labels">Labels</label><input id="plan-labels" name="labels" placeholder="e.g. 1,2 or 0-4" value="${esc(labels)}">
          <label for="plan-client">Client</label><input id="plan-client" name="client" list="client-names" placeholder="a node with its own data" value="${esc(client)}">
          <datalist id="client-names">${dataNodes.map((n) => `<option value="${esc(n.name)}">`).join("")}</datalist>
          <label for="plan-method">Method</label><select id="plan-method" name="method"><option value="">default</option>${methods.filter((m) => !m.error).map((m) => `<option ${m.name === method ? "selected" : ""}>${esc(m.name)}</option>`).join("")}</select>
          <label for="plan-discovery">Discovery</label><select id="plan-discovery" name="discovery"><option ${discovery === "first" ? "selected" : ""}>first</option><option ${discovery === "all" ? "selected" : ""}>all</option></select>
          <div class="actions"><button type="submit" class="primary" id="plan-preview">Preview</button><button type="button" id="plan-clear">Clear</button></div>
        </form><div id="plan-result"></div>`;
      if (!labels && !client) {
        setHighlight(null);
        return form;
      }
      const q = new URLSearchParams();
      if (labels) q.set("labels", labels);
      if (client) q.append("client", client);
      if (method) q.set("method", method);
      if (discovery) q.set("discovery", discovery);
      let result;
      try {
        result = await getJSON(`/api/plan?${q}`);
      } catch (err) {
        setHighlight(null);
        return form.replace('<div id="plan-result"></div>', `<div id="plan-result"><p class="error">${esc(err.message)}</p></div>`);
      }
      const p = result.plan;
      setHighlight(rolesOf(p.discovery, p.affected), "forget preview");
      const holders = Object.entries(p.holders || {});
      const write = S.info.allow_write
        ? `<fieldset><legend>Run this request</legend><form class="plan" id="run-form">
             <label for="run-requester">Requester</label><input id="run-requester" name="requester">
             <label for="run-reason">Reason</label><input id="run-reason" name="reason">
             <label for="run-ticket">Ticket</label><input id="run-ticket" name="ticket">
             <label for="run-eval">Evaluate</label><input id="run-eval" name="eval" type="checkbox" checked>
             <div class="actions"><button type="submit" class="danger" id="run-submit">Run ${esc(result.method)} on ${p.affected.length} node(s)</button></div>
           </form></fieldset>` : "";
      const out = `<div id="plan-result">
        <p class="note">Forget <b>${esc(forgetText(p.forget, p.labels))}</b> with <b>${esc(result.method)}</b>:
        <span class="chip discovery" id="plan-discovery-count">${p.discovery.length} discovery</span>
        <span class="chip inherited" id="plan-inherited-count">${p.inherited.length} inherited</span>. Dry run: nothing was changed.</p>
        <h3>Discovery nodes</h3><ul class="links">${p.discovery.slice(0, 200).map((n) => `<li>${nodeLink(n)}</li>`).join("")}</ul>${p.discovery.length > 200 ? `<p class="muted">and ${fmtInt(p.discovery.length - 200)} more</p>` : ""}
        <h3>Inherited nodes</h3>${p.inherited.length ? `<ul class="links">${p.inherited.slice(0, 200).map((n) => `<li>${nodeLink(n)}</li>`).join("")}</ul>` : '<p class="muted">none</p>'}${p.inherited.length > 200 ? `<p class="muted">and ${fmtInt(p.inherited.length - 200)} more</p>` : ""}
        ${holders.length ? `<h3>Nodes holding forget data</h3><table><tr><th>node</th><th class="num">forgotten</th><th class="num">remaining</th></tr>${holders.slice(0, 200).map(([n, c]) => `<tr><td>${nodeLink(n)}</td><td class="num">${fmtInt(c.forgotten)}</td><td class="num">${fmtInt(c.remaining)}</td></tr>`).join("")}</table>` : ""}
        <h3>Phases</h3><table><tr><th>phase</th><th class="num">tasks</th><th>nodes</th></tr>${result.phases.map((ph) => `<tr><td>${esc(ph.name)}</td><td class="num">${ph.nodes.length}</td><td>${esc(ph.nodes.slice(0, 6).join(", "))}${ph.nodes.length > 6 ? ` \u2026 (+${ph.nodes.length - 6})` : ""}${ph.merge_groups ? ` <span class="muted">${ph.merge_groups} merge group(s)</span>` : ""}</td></tr>`).join("")}</table>
        <h3>Method parameters</h3>${kvTable(result.params)}
        ${write}</div>`;
      return form.replace('<div id="plan-result"></div>', out);
    });
  }

  panel.addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = e.target;
    if (form.id === "plan-form") {
      const q = new URLSearchParams();
      for (const key of ["labels", "client", "method", "discovery"]) {
        const v = form.elements[key].value.trim();
        if (v && !(key === "discovery" && v === "first")) q.set(key, v);
      }
      const target = `#/plan?${q}`;
      if (location.hash === target) route(); else location.hash = target;
    } else if (form.id === "run-form") {
      const params = new URLSearchParams(location.hash.split("?")[1] || "");
      const body = { eval: form.elements.eval.checked };
      if (params.get("labels")) body.labels = params.get("labels");
      if (params.get("client")) body.clients = [params.get("client")];
      if (params.get("method")) body.method = params.get("method");
      if (params.get("discovery")) body.discovery = params.get("discovery");
      for (const k of ["requester", "reason", "ticket"]) if (form.elements[k].value.trim()) body[k] = form.elements[k].value.trim();
      if (!confirm("Run this unlearning operation? It writes new versions of every affected node (revertible).")) return;
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      button.textContent = "Running\u2026";
      try {
        const result = await getJSON("/api/unlearn", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
        await reloadGraph();
        location.hash = "#/operation/" + encodeURIComponent(result.operation);
      } catch (err) {
        button.disabled = false;
        button.textContent = "Run";
        form.insertAdjacentHTML("afterend", `<p class="error">${esc(err.message)}</p>`);
      }
    }
  });

  panel.addEventListener("click", async (e) => {
    if (e.target.id === "plan-clear") { location.hash = "#/plan"; return; }
    const op = e.target.dataset && e.target.dataset.revert;
    if (!op) return;
    if (!confirm(`Revert ${op}? Every node it changed goes back to its previous version.`)) return;
    try {
      await getJSON(`/api/operations/${encodeURIComponent(op)}/revert`, { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
      await reloadGraph();
      route();
    } catch (err) {
      e.target.insertAdjacentHTML("afterend", `<p class="error">${esc(err.message)}</p>`);
    }
  });

  async function reloadGraph() {
    loadGraph(await getJSON("/api/graph"));
    render();
  }

  // ------------------------------------------------------------------ start
  async function main() {
    markers();
    let graph;
    try {
      [S.info, graph] = await Promise.all([getJSON("/api/info"), getJSON("/api/graph")]);
    } catch (err) {
      show(`<p class="error">Cannot load the lineage: ${esc(err.message)}</p>`);
      return;
    }
    $("#store").textContent = S.info.store;
    $("#store").title = S.info.store;
    const mode = $("#mode");
    mode.textContent = S.info.allow_write ? "read-write" : "read-only";
    mode.classList.toggle("write", S.info.allow_write);
    loadGraph(graph);
    render();
    fit();
    window.addEventListener("hashchange", route);
    window.addEventListener("resize", () => applyView());
    route();
    // Drawn and painted: what a test or benchmark waits for.
    requestAnimationFrame(() => requestAnimationFrame(() => {
      window.umigReadyAt = performance.now();
      document.documentElement.dataset.ready = "1";
    }));
  }

  main();
})();
