// Ollama Gate status page: polls status.json once a second and redraws. No framework, no build.
// Model and client names come from clients: they only ever go into textContent, never innerHTML.
(function () {
  "use strict";

  var POLL_MS = 1000;
  var SVG = "http://www.w3.org/2000/svg";
  var script = document.currentScript;
  var workers = Number((script && script.dataset.workers) || 1);
  var failures = 0;

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        if (k === "text") node.textContent = attrs[k];
        else if (k === "className") node.className = attrs[k];
        else node.setAttribute(k, attrs[k]);
      });
    }
    (children || []).forEach(function (c) { if (c) node.appendChild(c); });
    return node;
  }

  function svg(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }

  function setText(id, text) {
    var node = $(id);
    if (node && node.textContent !== text) node.textContent = text;
  }

  function num(v, digits) {
    if (v === null || v === undefined) return "–";
    var d = digits === undefined ? 0 : digits;
    return Number(v).toLocaleString("en-US", { maximumFractionDigits: d, minimumFractionDigits: 0 });
  }

  function rate(v) {
    if (v === null || v === undefined) return "–";
    if (v >= 100) return num(v, 0);
    return num(v, 1);
  }

  function secs(v) {
    if (v === null || v === undefined) return "–";
    if (v < 0.001) return "0 s";
    if (v < 10) return v.toFixed(v < 1 ? 2 : 1) + " s";
    if (v < 90) return Math.round(v) + " s";
    var whole = Math.round(v), m = Math.floor(whole / 60), s = whole % 60;
    if (m < 60) return m + "m " + (s < 10 ? "0" : "") + s + "s";
    return Math.floor(m / 60) + "h " + (m % 60) + "m";
  }

  function bytes(v) {
    if (!v && v !== 0) return "–";
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return v.toFixed(i ? 1 : 0) + " " + units[i];
  }

  function sumValues(obj) {
    var total = 0;
    Object.keys(obj || {}).forEach(function (k) { total += obj[k]; });
    return total;
  }

  function cell(text, cls) { return el("td", { text: text, className: cls || "" }); }

  function fill(tableId, rows, columns, emptyText) {
    var tbody = $(tableId).tBodies[0];
    var fresh = document.createElement("tbody");
    if (!rows.length) {
      fresh.appendChild(el("tr", { className: "empty" }, [el("td", { text: emptyText, colspan: String(columns) })]));
    }
    rows.forEach(function (r) { fresh.appendChild(r); });
    tbody.parentNode.replaceChild(fresh, tbody);
  }

  // -- sections -------------------------------------------------------------------------

  function renderTop(doc) {
    var up = doc.upstream || {};
    var pill = $("upstream");
    var fleet = backendsOf(doc);
    if (fleet.length > 1) {
      // Several backends: the upstream probe sees only the first; the fleet's own health counts.
      var live = fleet.filter(function (b) { return b.health === "up"; }).length;
      var down = fleet.filter(function (b) { return b.health === "down"; }).length;
      pill.className = "pill " + (down ? "pill-bad" : live === fleet.length ? "pill-ok" : "pill-unknown");
      pill.textContent = "backends " + live + " of " + fleet.length + " up" + (down ? " · " + down + " down" : "");
      pill.title = fleet.map(function (b) { return b.name + " " + b.health; }).join(", ");
    } else if (up.healthy === true) {
      pill.className = "pill pill-ok";
      pill.textContent = "upstream up" + (up.version ? " · Ollama " + up.version : "") +
        (up.latency !== null && up.latency !== undefined ? " · " + Math.round(up.latency * 1000) + " ms" : "");
    } else if (up.healthy === false) {
      pill.className = "pill pill-bad";
      pill.textContent = "upstream down · " + (up.error || "no answer");
    } else {
      pill.className = "pill pill-unknown";
      pill.textContent = "upstream not probed yet";
    }
    if (fleet.length <= 1) pill.title = up.url || "";
    var w = doc.worker || {};
    setText("worker", "worker pid " + w.pid + (w.workers > 1 ? " (one of " + w.workers + ")" : "") +
      " · up " + secs(w.uptime) + " · access " + w.access);
  }

  function renderBanners(doc) {
    var box = $("banners");
    var items = [];
    var q = doc.queue;
    var w = doc.worker || {};
    if (!q) items.push(["", "The work queue is not installed: running and waiting jobs are not known."]);
    if (q && q.closed) items.push(["bad", "The gate is shutting down: new jobs are turned away."]);
    if (q && q.switch && q.switch.pending) {
      items.push(["", "Switching to " + q.switch.target + " (waited " + secs(q.switch.waited) + "): " +
        ((q.switch.draining || []).join(", ") || "nothing") + " draining."]);
    }
    if (doc.limiter && doc.limiter.storage_fallback) {
      items.push(["bad", "Rate-limit storage " + doc.limiter.storage +
        " does not answer: limits count in this worker's memory until it does."]);
    }
    var guard = doc.limiter && doc.limiter.auth_guard;
    if (guard && guard.blocked > 0) {
      items.push(["bad", guard.blocked + (guard.blocked === 1 ? " address is" : " addresses are") +
        " shut out for presenting wrong API keys (" + guard.limit + "): " + guard.refused +
        " requests refused so far."]);
    }
    if ((w.workers || workers) > 1) {
      items.push(["", "This page shows worker " + w.pid + " only, one of " + w.workers +
        " workers: each keeps its own queue and counts."]);
    }
    if (failures > 2) items.push(["bad", "status.json does not answer: the figures below are stale."]);
    var up = doc.upstream || {};
    var fleet = backendsOf(doc);
    if (fleet.length > 1) {
      // Several backends: each one down gets its own loud banner, first.
      var down = fleet.filter(function (b) { return b.health === "down"; });
      var allDown = down.length === fleet.length;
      down.slice().reverse().forEach(function (b) {
        items.unshift(["down", "Backend " + b.name + " is down: " + (b.url || "it") + " does not answer.",
          (b.last_error || "no answer") + " · " + probed(b) +
          (allDown ? " · jobs cannot run until a backend answers again." : " · it takes no new jobs; they go to the other backends.")]);
      });
    } else if (up.healthy === false) {
      // The one thing an operator must not miss: first, and loud.
      items.unshift(["down", "Ollama is down: " + (up.url || "the upstream") + " does not answer.",
        (up.error || "no answer") + (up.age !== null && up.age !== undefined ? " · checked " + secs(up.age) + " ago" : "") +
        " · jobs cannot run until it answers again."]);
    }
    var key = JSON.stringify(items);
    if (box.dataset.key === key) return;
    box.dataset.key = key;
    box.textContent = "";
    items.forEach(function (it) {
      var p = el("p", { className: "banner " + it[0], text: it[1], "data-kind": it[0] || "note" });
      if (it[2]) p.appendChild(el("span", { className: "detail", text: it[2] }));
      box.appendChild(p);
    });
  }

  function renderCaps(doc) {
    var c = doc.caps;
    if (!c) { setText("caps", ""); return; }
    var over = c.model_concurrency_overrides || {};
    var extra = Object.keys(over).map(function (m) { return m + " " + over[m]; }).join(", ");
    var fleet = backendsOf(doc);
    // Several backends: each holds its own max_models (and vram), from GATE_BACKENDS_FILE.
    var places = fleet.length > 1 ? "backends " + fleet.map(function (b) {
      return b.name + " " + num(b.max_models) + " model(s)" + (b.vram ? " in " + bytes(b.vram) : "");
    }).join(", ") : num(c.model_concurrency) + " job(s) at once per model" +
      (extra ? " (" + extra + ")" : "") + " · " + num(c.max_active_models) + " active model(s)";
    setText("caps", "Configured: " + places +
      " · queue " + num(c.queue_max) + ", " + num(c.queue_max_per_client) + " per client" +
      " · wait at most " + secs(c.queue_timeout) +
      " · switch after " + secs(c.switch_after) +
      " · admin lane " + num(c.admin_concurrency));
    var w = doc.worker || {};
    setText("clients-note", (c.queue_max_per_client ? "· waiting at most " + num(c.queue_max_per_client) + " each" : "") +
      (w.clients_masked === false ? " · full addresses" : " · addresses masked"));
  }

  function renderPriorities(doc) {
    // Jobs per priority class: running, then waiting (docs/STATUS.md).
    var p = doc.queue && doc.queue.priorities;
    if (!p || !Object.keys(p).length) { setText("priorities", ""); return; }
    setText("priorities", "Priority classes: " + ["interactive", "normal", "batch"].map(function (name) {
      var row = p[name] || {};
      return name + " " + num(row.running || 0) + " running, " + num(row.waiting || 0) + " waiting";
    }).join(" · "));
  }

  function renderTiles(doc) {
    var q = doc.queue;
    var models = doc.models || {};
    var slots = 0;
    Object.keys(models).forEach(function (m) { if (models[m].active) slots += models[m].slots || 0; });
    setText("total-running", q ? num(q.running) : "–");
    setText("total-running-sub", q ? (slots ? "of " + slots + " active slots" : "no active model") : "");
    setText("total-waiting", q ? num(q.waiting) : "–");
    var caps = doc.caps || {};
    var queueMax = caps.queue_max || (q && q.queue_max);
    setText("total-waiting-sub", queueMax ? "max " + num(queueMax) +
      (caps.queue_max_per_client ? " · " + num(caps.queue_max_per_client) + "/client" : "") : "");
    var maxActive = caps.max_active_models || (q && q.max_active_models);
    var fleet = backendsOf(doc);
    if (fleet.length > 1) {
      // Several backends: the places are theirs (a model may hold one on each).
      maxActive = 0;
      fleet.forEach(function (b) { maxActive += b.max_models || 0; });
    }
    setText("active-models", q ? num((q.active_models || []).length) + (maxActive ? " / " + num(maxActive) : "") : "–");
    setText("active-models-sub", q && (q.active_models || []).length ? q.active_models.join(", ") : "none running");
    setText("oldest-wait", q && q.waiting ? secs(q.oldest_wait) : "–");
    setText("oldest-wait-sub", caps.queue_timeout ? "timeout " + secs(caps.queue_timeout) : "now");
    setText("jobs-rate", rate(doc.rates.jobs_per_minute));
    setText("tokens-rate", rate(doc.rates.tokens_per_minute));
    var recent = doc.rejections.recent || {};
    var r429 = sumValues(recent["429"]), r503 = sumValues(recent["503"]);
    setText("recent-429", num(r429));
    setText("recent-503", num(r503));
    $("recent-429").parentNode.classList.toggle("alert", r429 > 0);
    $("recent-503").parentNode.classList.toggle("alert", r503 > 0);
    $("total-waiting").parentNode.dataset.waiting = q ? String(q.waiting) : "";
  }

  function renderModels(doc) {
    var models = doc.models || {};
    var fleet = backendsOf(doc);
    // Several backends: "loaded" means in some backend's /api/ps (status.json's own
    // models.*.loaded reads the first backend's only).
    var loadedAnywhere = {};
    fleet.forEach(function (b) { Object.keys(b.loaded || {}).forEach(function (m) { loadedAnywhere[m] = true; }); });
    var rows = Object.keys(models).map(function (name) {
      var m = models[name];
      var loaded = fleet.length > 1 ? !!loadedAnywhere[name] : m.loaded;
      var state = el("td", { className: "state" });
      // state: active, draining, waiting (jobs queued, no place yet) or idle (docs/STATUS.md).
      var st = m.state || (m.draining ? "draining" : m.active ? "active" : m.waiting ? "waiting" : "idle");
      if (st === "draining") state.appendChild(el("span", { className: "badge active", text: "active" }));
      state.appendChild(el("span", { className: "badge " + st, text: st }));
      if (loaded) state.appendChild(el("span", { className: "badge loaded", text: "loaded" }));
      var running = m.running === null ? "–" : num(m.running) + " / " + num(m.slots);
      var refused = sumValues(m.rejected);
      return el("tr", { "data-model": name }, [
        el("td", { className: "name", text: name, title: name }),
        state,
        cell(running, "num"),
        cell(m.waiting === null ? "–" : num(m.waiting), "num" + (m.waiting ? " hot" : "")),
        cell(m.waiting ? secs(m.oldest_wait) : "–", "num"),
        cell(rate(m.jobs_per_minute), "num"),
        cell(rate(m.tokens_per_minute), "num"),
        cell(secs(m.wait_avg), "num opt"),
        cell(secs(m.avg_seconds), "num opt"),
        cell(refused ? num(refused) : "–", "num opt"),
      ]);
    });
    var admin = doc.queue && doc.queue.admin;
    if (admin && (admin.running || admin.waiting)) {
      rows.push(el("tr", {}, [
        el("td", { className: "name", text: "(pull, push, create)" }), cell("admin lane"),
        cell(num(admin.running) + " / " + num(admin.slots), "num"),
        cell(num(admin.waiting), "num" + (admin.waiting ? " hot" : "")),
        cell(admin.waiting ? secs(admin.oldest_wait) : "–", "num"),
        cell("–", "num"), cell("–", "num"), cell("–", "num opt"), cell(secs(admin.avg_seconds), "num opt"),
        cell("–", "num opt"),
      ]));
    }
    fill("models", rows, 10, "no models yet");
  }

  function renderClients(doc) {
    var clients = doc.clients || {};
    var rows = Object.keys(clients).map(function (name) {
      var c = clients[name];
      return el("tr", {}, [
        el("td", { className: "name", text: name, title: name }),
        cell(num(c.waiting), "num" + (c.waiting ? " hot" : "")),
        cell(num(c.running), "num"),
        cell(rate(c.jobs_per_minute), "num"),
        cell(rate(c.tokens_per_minute), "num"),
      ]);
    });
    fill("clients", rows, 5, "no clients in the last minute");
  }

  function renderRejections(doc) {
    var recent = doc.rejections.recent || {}, total = doc.rejections.total || {};
    var rows = [];
    Object.keys(total).sort().forEach(function (status) {
      Object.keys(total[status]).sort().forEach(function (reason) {
        var n = (recent[status] || {})[reason] || 0;
        rows.push(el("tr", {}, [
          cell(status), el("td", { className: "name", text: reason }),
          cell(num(n), "num" + (n ? " hot" : "")), cell(num(total[status][reason]), "num"),
        ]));
      });
    });
    fill("rejections", rows, 4, "none");
  }

  function renderLoaded(doc) {
    var up = doc.upstream || {};
    var now = Date.now();
    var rows = (up.loaded || []).map(function (m) {
      var until = m.expires_at ? Date.parse(m.expires_at) : NaN;
      var unload = isNaN(until) ? "–" : (until - now > 0 ? "in " + secs((until - now) / 1000) : "now");
      if (!isNaN(until) && until - now > 1e9) unload = "never";
      return el("tr", {}, [
        el("td", { className: "name", text: m.name, title: m.name }),
        cell(bytes(m.size_vram), "num"), cell(bytes(m.size), "num"), cell(unload, "num"),
      ]);
    });
    fill("loaded", rows, 4, up.loaded_checked ? "none" : "not polled yet");
    setText("loaded-checked", up.loaded_checked ? "· polled " +
      secs(Math.max(0, doc.generated - up.loaded_checked)) + " ago" : "");
  }

  // -- backends -------------------------------------------------------------------------

  function backendsOf(doc) { return doc.backends || []; }

  function probed(b) {
    if (b.probe_age === null || b.probe_age === undefined) return "not probed yet";
    return "probed " + secs(b.probe_age) + " ago";
  }

  function healthBadge(b) {
    var h = b.health === "up" || b.health === "down" ? b.health : "unknown";
    return el("span", { className: "health health-" + h, text: h });
  }

  function vramUsed(b) {
    if (b.vram_used !== null && b.vram_used !== undefined) return b.vram_used;
    var loaded = b.loaded || {}, total = 0;
    Object.keys(loaded).forEach(function (m) { total += loaded[m].size_vram || 0; });
    return total;
  }

  // The models a backend has loaded or runs jobs of, each with its VRAM and running/slots.
  function backendModels(b) {
    var loaded = b.loaded || {}, models = b.models || {}, seen = {};
    Object.keys(loaded).concat(Object.keys(models)).forEach(function (m) { seen[m] = true; });
    return Object.keys(seen).sort().map(function (m) {
      var l = loaded[m], r = models[m];
      return {
        name: m,
        // Jobs run but /api/ps did not list it at the last poll: Ollama is loading it.
        vram: l ? bytes(l.size_vram) : (r && r.running ? "loading" : "not loaded"),
        running: r ? num(r.running) + " / " + num(r.slots) : "idle",
        busy: !!(r && r.running),
      };
    });
  }

  function modelsCount(b) {
    var n = Object.keys(b.loaded || {}).length;
    return n + (b.max_models ? " of " + b.max_models : "") + " model" + ((b.max_models || n) === 1 ? "" : "s") + " loaded";
  }

  function vramText(b) {
    var used = vramUsed(b);
    return "VRAM " + bytes(used) + (b.vram ? " of " + bytes(b.vram) : " (no budget set)");
  }

  // A fleet of one: a single line.
  function backendLine(b) {
    var parts = backendModels(b).map(function (m) {
      return m.name + " (" + m.vram + (m.busy ? ", " + m.running + " running" : "") + ")";
    });
    return el("div", { className: "backend one health-" + b.health, "data-backend": b.name, "data-health": b.health }, [
      el("span", { className: "backend-name", text: b.name, title: b.url || "" }),
      healthBadge(b),
      el("span", { className: "muted", text: probed(b) + (b.version ? " · Ollama " + b.version : "") }),
      el("span", { className: "backend-loaded", text: modelsCount(b) + (parts.length ? ": " + parts.join(", ") : "") }),
    ]);
  }

  function backendCard(b) {
    var rows = backendModels(b).map(function (m) {
      return el("tr", { "data-model": m.name }, [
        el("td", { className: "name", text: m.name, title: m.name }),
        cell(m.vram, "num"),
        cell(m.running, "num" + (m.busy ? " hot" : "")),
      ]);
    });
    if (!rows.length) {
      rows.push(el("tr", { className: "empty" }, [el("td", { text: "nothing loaded", colspan: "3" })]));
    }
    var meter = null;
    if (b.vram) {
      var pct = Math.min(100, Math.round(100 * vramUsed(b) / b.vram));
      meter = el("div", { className: "meter", title: pct + "% of the VRAM budget" },
        [el("i", { style: "width:" + pct + "%" })]);
    }
    var counts = [];
    [["running", "running"], ["installed", "installed"], ["loads", "loads"], ["evictions", "evictions"]]
      .forEach(function (f) {
        if (b[f[0]] !== undefined && b[f[0]] !== null) counts.push(f[1] + " " + num(b[f[0]]));
      });
    if (b.draining_for) counts.push("making room for " + b.draining_for);
    return el("div", { className: "backend health-" + b.health, "data-backend": b.name, "data-health": b.health }, [
      el("div", { className: "backend-head" }, [
        el("span", { className: "backend-name", text: b.name, title: b.url || "" }),
        healthBadge(b),
        el("span", { className: "muted", text: probed(b) + (b.version ? " · Ollama " + b.version : "") }),
      ]),
      b.health === "down" ? el("p", { className: "backend-down",
        text: "does not answer: " + (b.last_error || "no answer") + " · takes no new jobs" }) : null,
      el("div", { className: "backend-facts" }, [
        el("span", { text: modelsCount(b) + " · " + vramText(b) }), meter,
      ]),
      el("table", { className: "backend-models" }, [
        el("thead", {}, [el("tr", {}, [
          el("th", { text: "Model" }), el("th", { className: "num", text: "VRAM" }),
          el("th", { className: "num", text: "Running" }),
        ])]),
        el("tbody", {}, rows),
      ]),
      counts.length ? el("div", { className: "backend-counts muted", text: counts.join(" · ") }) : null,
    ]);
  }

  function renderBackends(doc) {
    var fleet = backendsOf(doc);
    var section = $("backends-section"), box = $("backends");
    section.hidden = !fleet.length;
    // With several backends the first one's /api/ps says too little: the cards say it all.
    $("loaded-section").hidden = fleet.length > 1;
    var key = JSON.stringify(fleet);
    if (box.dataset.key === key) return;
    box.dataset.key = key;
    box.classList.toggle("several", fleet.length > 1);
    box.textContent = "";
    if (fleet.length === 1) {
      box.appendChild(backendLine(fleet[0]));
      setText("backends-note", "");
      return;
    }
    var live = fleet.filter(function (b) { return b.health === "up"; }).length;
    var loaded = 0, used = 0;
    fleet.forEach(function (b) { loaded += Object.keys(b.loaded || {}).length; used += vramUsed(b); });
    setText("backends-note", "· " + live + " of " + fleet.length + " up · " + loaded + " model" +
      (loaded === 1 ? "" : "s") + " loaded · VRAM " + bytes(used));
    fleet.forEach(function (b) { box.appendChild(backendCard(b)); });
  }

  // -- charts ---------------------------------------------------------------------------

  // A step for four grid lines that is 1, 2, 2.5 or 5 times a power of ten.
  function niceStep(max, whole) {
    var raw = max > 0 ? max / 4 : 0.25;
    if (whole) raw = Math.max(raw, 1);  // counts: whole-number grid lines
    var p = Math.pow(10, Math.floor(Math.log10(raw)));
    var steps = whole ? [1, 2, 3, 5, 10] : [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) if (raw <= steps[i] * p) return steps[i] * p;
    return 10 * p;
  }

  function tickLabel(v) {
    return String(Number(v.toFixed(3)));
  }

  // Draw series (arrays aligned with t; null breaks a line) over the last `window` seconds.
  // A series with `join` draws across its gaps (no job ended in the last seconds).
  function chart(id, t, series, window, now, unit, whole) {
    var box = $(id);
    var W = Math.max(200, Math.round(box.clientWidth || 600));
    var H = Math.max(100, Math.round(box.clientHeight || 170));
    var left = 40, right = 8, top = 8, bottom = 20;
    var pw = W - left - right, ph = H - top - bottom;
    var max = 0;
    series.forEach(function (s) { s.data.forEach(function (v) { if (v !== null && v > max) max = v; }); });
    var step = niceStep(max, whole);
    max = step * 4;
    var x = function (ts) { return left + pw * (1 - (now - ts) / window); };
    var y = function (v) { return top + ph * (1 - v / max); };
    var root = svg("svg", { viewBox: "0 0 " + W + " " + H });
    for (var g = 0; g <= 4; g++) {
      var gy = top + ph * g / 4;
      root.appendChild(svg("line", { x1: left, x2: W - right, y1: gy, y2: gy, "class": "grid" }));
      var label = svg("text", { x: left - 6, y: gy + 4, "text-anchor": "end", "class": "axis" });
      label.textContent = tickLabel(max - step * g) + (g === 0 && unit ? unit : "");
      root.appendChild(label);
    }
    [[window, "-15 min"], [window * 2 / 3, "-10"], [window / 3, "-5"], [0, "now"]].forEach(function (tick) {
      var tx = x(now - tick[0]);
      var text = svg("text", {
        x: tx, y: H - 5, "class": "axis",
        "text-anchor": tick[0] === window ? "start" : (tick[0] === 0 ? "end" : "middle"),
      });
      text.textContent = tick[1];
      root.appendChild(text);
    });
    series.forEach(function (s) {
      var d = "", pen = false, area = "", first = null, lastX = null;
      for (var i = 0; i < t.length; i++) {
        var v = s.data[i];
        if (v === null || v === undefined || now - t[i] > window) {
          if (!s.join) pen = false;
          continue;
        }
        var px = x(t[i]).toFixed(1), py = y(v).toFixed(1);
        d += (pen ? "L" : "M") + px + " " + py;
        if (s.area) {
          if (first === null) first = px;
          area += (area ? "L" : "M" + px + " " + y(0).toFixed(1) + "L") + px + " " + py;
          lastX = px;
        }
        pen = true;
      }
      if (s.area && area) {
        root.appendChild(svg("path", { d: area + "L" + lastX + " " + y(0).toFixed(1) + "Z", "class": "area-" + s.cls }));
      }
      if (d) root.appendChild(svg("path", { d: d, "class": s.cls }));
    });
    // Swap the children in one go, so the chart never flickers empty.
    while (box.firstChild) box.removeChild(box.firstChild);
    while (root.firstChild) box.appendChild(root.firstChild);
    box.setAttribute("viewBox", "0 0 " + W + " " + H);
  }

  function renderCharts(doc) {
    var h = doc.history;
    if (!h) return;
    var now = h.t.length ? Math.max(h.t[h.t.length - 1], doc.generated - 1) : doc.generated;
    chart("chart-depth", h.t, [
      { data: h.waiting, cls: "a", area: true },
      { data: h.running, cls: "b" },
    ], h.window, now, "", true);
    chart("chart-wait", h.t, [
      { data: h.oldest_wait, cls: "a", area: true },
      { data: h.wait, cls: "b", join: true },
    ], h.window, now, " s", false);
  }

  // -- polling --------------------------------------------------------------------------

  function render(doc) {
    renderTop(doc);
    renderBanners(doc);
    renderTiles(doc);
    renderCaps(doc);
    renderPriorities(doc);
    renderBackends(doc);
    renderModels(doc);
    renderClients(doc);
    renderRejections(doc);
    renderLoaded(doc);
    renderCharts(doc);
  }

  function setLive(ok, detail) {
    var live = $("live");
    if (ok) {
      live.className = "pill pill-ok";
      live.textContent = "live · " + new Date().toLocaleTimeString("en-GB");
    } else {
      live.className = "pill pill-bad";
      live.textContent = "no answer · " + detail;
    }
  }

  var latest = null;

  function tick() {
    fetch("status.json", { cache: "no-store", credentials: "same-origin" })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (doc) {
        failures = 0;
        latest = doc;
        render(doc);
        setLive(true);
      })
      .catch(function (err) {
        failures += 1;
        setLive(false, err.message || String(err));
        if (latest) renderBanners(latest);
      })
      .then(function () { setTimeout(tick, POLL_MS); });
  }

  window.addEventListener("resize", function () { if (latest) renderCharts(latest); });
  tick();
})();
