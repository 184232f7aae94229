// tokenseg report: the per-image browser (sort, filter by class, pages), built from data.js.
(function () {
  "use strict";
  const R = window.TOKENSEG_REPORT;
  const root = document.getElementById("images");
  if (!R) { root.textContent = "data.js is missing next to index.html"; return; }
  const runs = R.runs, multi = runs.length > 1;
  R.images.forEach(function (img, i) { img.n = i; });
  const state = {kind: multi ? "best" : "all", sort: "worst", cls: "", page: 0};

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(v) { return v === null || v === undefined ? "n/a" : v.toFixed(2); }
  function kindFor(r) { return state.kind === "all" || state.kind === "best" ? runs[r].best : state.kind; }
  function kindsShown(r) {
    if (state.kind === "all") return runs[r].kinds;
    const k = kindFor(r);
    return runs[r].kinds.indexOf(k) >= 0 ? [k] : [];
  }
  function score(img, r) {
    const run = img.runs[r];
    const v = run ? run.k[kindFor(r)] : undefined;
    return v === undefined ? null : v;
  }
  function diff(img) {
    const a = score(img, 0), b = score(img, runs.length - 1);
    return a === null || b === null ? null : b - a;
  }
  function byValue(f, sign) {
    return function (x, y) {
      const a = f(x), b = f(y);
      if (a === null && b === null) return x.n - y.n;
      if (a === null) return 1;
      if (b === null) return -1;
      return sign * (a - b) || x.n - y.n;
    };
  }
  const sorts = {
    worst: ["mIoU, worst first", byValue(function (i) { return score(i, 0); }, 1)],
    best: ["mIoU, best first", byValue(function (i) { return score(i, 0); }, -1)],
    id: ["image id", function (x, y) { return x.id < y.id ? -1 : x.id > y.id ? 1 : 0; }]
  };
  if (multi) {
    sorts.drop = ["largest drop (last − first run)", byValue(diff, 1)];
    sorts.gain = ["largest gain (last − first run)", byValue(diff, -1)];
  }

  function select(id, label, options, value, onchange) {
    const wrap = el("label", {}, label + " ");
    const s = el("select", {id: id});
    options.forEach(function (o) {
      const opt = el("option", {value: o[0]}, o[1]);
      if (o[0] === value) opt.selected = true;
      s.appendChild(opt);
    });
    s.addEventListener("change", function () { onchange(s.value); state.page = 0; render(); });
    wrap.appendChild(s);
    return wrap;
  }

  function controls() {
    const c = document.getElementById("controls");
    const kinds = [];
    runs.forEach(function (r) { r.kinds.forEach(function (k) { if (kinds.indexOf(k) < 0) kinds.push(k); }); });
    const kindOpts = [["best", "best kind of each run"], ["all", "every kind"]].concat(
      kinds.map(function (k) { return [k, R.titles[k] || k]; }));
    c.appendChild(select("kind", "maps:", kindOpts, state.kind, function (v) { state.kind = v; }));
    c.appendChild(select("sort", "sort:", Object.keys(sorts).map(function (k) { return [k, sorts[k][0]]; }),
      state.sort, function (v) { state.sort = v; }));
    c.appendChild(select("class-filter", "class:", [["", "every class"]].concat(
      R.classes.map(function (n, i) { return [String(i), n]; })), state.cls, function (v) { state.cls = v; }));
    const lg = document.getElementById("legend");
    R.palette.forEach(function (p) {
      const item = el("span", {class: "swatch"});
      const box = el("i", {});
      box.style.background = p.rgb;
      item.appendChild(box);
      item.appendChild(document.createTextNode(p.name));
      lg.appendChild(item);
    });
  }

  function tile(src, caption, wh) {
    const f = el("figure", {});
    const im = el("img", {src: src, loading: "lazy", width: wh[0], height: wh[1], alt: caption});
    f.appendChild(im);
    f.appendChild(el("figcaption", {}, caption));
    return f;
  }

  function row(img) {
    const base = R.tiles + "/" + String(img.n).padStart(6, "0") + "/";
    const d = el("div", {class: "img-row", "data-id": img.id, "data-classes": img.cls.join(" ")});
    const m = score(img, 0);
    d.setAttribute("data-miou", m === null ? "" : String(m));
    const head = el("div", {class: "img-head"});
    head.appendChild(el("b", {}, img.id));
    head.appendChild(el("span", {class: "cls"}, img.cls.map(function (c) { return R.classes[c]; }).join(", ") || "no class"));
    runs.forEach(function (r, k) {
      head.appendChild(el("span", {class: "score"}, (multi ? r.name + ": " : "") + "mIoU " + fmt(score(img, k))));
    });
    if (multi) head.appendChild(el("span", {class: "diff"}, "Δ " + (diff(img) === null ? "n/a" : (diff(img) >= 0 ? "+" : "") + diff(img).toFixed(2))));
    d.appendChild(head);
    const body = el("div", {class: "img-body"});
    const left = el("div", {class: "tiles inputs"});
    left.appendChild(tile(base + "photo.jpg", "photo", img.wh));
    if (img.gt) left.appendChild(tile(base + "gt.png", "ground truth", img.wh));
    body.appendChild(left);
    const right = el("div", {class: "run-groups"});
    runs.forEach(function (r, k) {
      const info = img.runs[k];
      const g = el("div", {class: "run-group"});
      if (multi) g.appendChild(el("div", {class: "run-name"}, r.name + ": mIoU " + fmt(score(img, k))));
      kindsShown(k).forEach(function (kind) {
        if (!(kind in info.k)) return;
        const t = el("div", {class: "tiles kind-row"});
        const title = R.titles[kind] || kind;
        info.ck[kind].forEach(function (c) {
          t.appendChild(tile(base + "r" + k + "-" + kind + "-c" + c + ".jpg", title + ": " + R.classes[c], img.wh));
        });
        t.appendChild(tile(base + "r" + k + "-" + kind + "-am.png",
          "argmax " + title + " (" + r.setting[kind] + ") mIoU " + fmt(info.k[kind]), img.wh));
        g.appendChild(t);
      });
      const extra = el("div", {class: "tiles kind-row"});
      if ("ps" in info) extra.appendChild(tile(base + "r" + k + "-ps.png", "pseudo mask mIoU " + fmt(info.ps), img.wh));
      if ("pr" in info) extra.appendChild(tile(base + "r" + k + "-pr.png", "prediction mIoU " + fmt(info.pr), img.wh));
      if (extra.childNodes.length) g.appendChild(extra);
      right.appendChild(g);
    });
    body.appendChild(right);
    d.appendChild(body);
    return d;
  }

  function render() {
    let list = R.images;
    if (state.cls !== "") {
      const c = Number(state.cls);
      list = list.filter(function (i) { return i.cls.indexOf(c) >= 0; });
    }
    list = list.slice().sort(sorts[state.sort][1]);
    const pages = Math.max(1, Math.ceil(list.length / R.page));
    state.page = Math.min(state.page, pages - 1);
    root.textContent = "";
    list.slice(state.page * R.page, (state.page + 1) * R.page).forEach(function (img) { root.appendChild(row(img)); });
    const p = document.getElementById("pager");
    p.textContent = "";
    const prev = el("button", {id: "prev"}, "← previous");
    const next = el("button", {id: "next"}, "next →");
    prev.disabled = state.page === 0;
    next.disabled = state.page >= pages - 1;
    prev.addEventListener("click", function () { state.page -= 1; render(); window.scrollTo(0, root.offsetTop); });
    next.addEventListener("click", function () { state.page += 1; render(); window.scrollTo(0, root.offsetTop); });
    p.appendChild(prev);
    p.appendChild(el("span", {id: "page-info"}, " page " + (state.page + 1) + " of " + pages + " (" + list.length + " images) "));
    p.appendChild(next);
  }

  controls();
  render();
})();
