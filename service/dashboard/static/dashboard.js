// trtforge dashboard: progressive enhancement of server-rendered pages (no build step).
// Every page works without this script; with it: charts, live build status over server-sent
// events, rows of the builds list that refresh while their builds run, uploads with a
// progress bar, and fragments swapped in place of full reloads.
"use strict";

(function () {
  const csrf = () => document.body.dataset.csrf || "";
  const charts = new Map();

  // -- accuracy chart: the gate's threshold as a line across the whole chart (a plugin of our
  // own: a line dataset over one category would draw a dash), failing outputs hatched in red
  // (their label says so too: not by colour alone) ---------------------------------------------
  const BAD = "#a3191e";
  const BAR = { fill: "rgba(54, 162, 235, 0.5)", line: "rgb(54, 162, 235)" };

  function hatch() {
    const tile = document.createElement("canvas");
    tile.width = 8; tile.height = 8;
    const g = tile.getContext("2d");
    g.fillStyle = "rgba(163, 25, 30, 0.2)";
    g.fillRect(0, 0, 8, 8);
    g.strokeStyle = BAD; g.lineWidth = 2;
    g.beginPath();
    g.moveTo(0, 8); g.lineTo(8, 0); g.moveTo(-2, 2); g.lineTo(2, -2); g.moveTo(6, 10); g.lineTo(10, 6);
    g.stroke();
    return g.createPattern(tile, "repeat");
  }

  const gateLine = {
    id: "gateLine",
    afterDatasetsDraw(chart) {
      const area = chart.chartArea;
      const scale = chart.scales.y;
      chart.data.datasets.forEach((d, i) => {
        if (typeof d.gateLine !== "number" || !chart.isDatasetVisible(i) || !scale) return;
        const y = Math.round(scale.getPixelForValue(d.gateLine)) + 0.5;
        if (y < area.top - 1 || y > area.bottom + 1) return;
        const ctx = chart.ctx;
        ctx.save();
        ctx.strokeStyle = BAD; ctx.lineWidth = 2; ctx.setLineDash([6, 4]);
        ctx.beginPath(); ctx.moveTo(area.left, y); ctx.lineTo(area.right, y); ctx.stroke();
        ctx.setLineDash([]);
        ctx.font = "600 12px system-ui, sans-serif";
        const text = d.label;
        const width = ctx.measureText(text).width;
        const above = y - area.top > 20;  // room above the line, else write it below
        const top = above ? y - 18 : y + 3;
        ctx.fillStyle = "rgba(255, 255, 255, 0.9)";
        ctx.fillRect(area.right - width - 10, top, width + 8, 16);
        ctx.fillStyle = BAD; ctx.textAlign = "right"; ctx.textBaseline = "top";
        ctx.fillText(text, area.right - 6, top + 2);
        ctx.restore();
        chart.canvas.dataset.gateLine = [area.left, area.right, y].map(Math.round).join(",");
      });
    },
  };

  function gateStyle(data, options) {
    const bars = data.datasets[0];
    const line = data.datasets[1];
    const failing = bars.failing || [];
    const pattern = failing.some(Boolean) ? hatch() : null;
    bars.backgroundColor = failing.map((bad) => (bad ? pattern : BAR.fill));
    bars.borderColor = failing.map((bad) => (bad ? BAD : BAR.line));
    bars.borderWidth = failing.map((bad) => (bad ? 2 : 1));
    bars.maxBarThickness = 140;
    // the line dataset stays for the legend and tooltips; the plugin draws it across
    Object.assign(line, { borderColor: BAD, backgroundColor: BAD, borderWidth: 2, showLine: false, pointRadius: 0, pointHoverRadius: 0, pointHitRadius: 12 });
    const value = data.gate.value;
    if (typeof value === "number") {
      options.scales = { y: { beginAtZero: true, suggestedMin: Math.min(0, value), suggestedMax: value } };
    }
    options.scales = options.scales || {};
    options.scales.x = { ticks: { color: (c) => (failing[c.index] ? BAD : "#5b6270"), font: (c) => ({ weight: failing[c.index] ? "bold" : "normal" }) } };
    options.plugins.legend.labels = {
      generateLabels(chart) {
        const items = Chart.defaults.plugins.legend.labels.generateLabels(chart);
        items.forEach((item) => {
          if (item.datasetIndex === 0) { item.fillStyle = BAR.fill; item.strokeStyle = BAR.line; item.lineWidth = 1; }
          if (item.datasetIndex === 1) { item.lineDash = [6, 4]; item.fillStyle = "#fff"; }
        });
        if (pattern) items.push({ text: "✗ fails the gate (hatched)", fillStyle: pattern, strokeStyle: BAD, lineWidth: 2, hidden: false, datasetIndex: null });
        return items;
      },
    };
    options.plugins.legend.onClick = (event, item, legend) => {
      if (item.datasetIndex === null || item.datasetIndex === undefined) return;
      Chart.defaults.plugins.legend.onClick.call(legend, event, item, legend);
    };
  }

  function drawCharts(root) {
    if (typeof Chart === "undefined") return;
    root.querySelectorAll("canvas[data-chart]").forEach((canvas) => {
      const source = document.getElementById("chart-" + canvas.dataset.chart);
      if (!source) return;
      let data;
      try { data = JSON.parse(source.textContent); } catch (e) { return; }
      if (!data.datasets || data.datasets.length === 0) return;
      if (charts.has(canvas)) charts.get(canvas).destroy();
      const kind = canvas.dataset.kind || "bar";
      const options = {
        responsive: true, maintainAspectRatio: false, animation: false,
        plugins: { legend: { position: "bottom" } },
      };
      if (canvas.dataset.scale === "logarithmic") {
        // labels at 1 and 3 times each power of ten only (Chart.js crowds 5, 7 and 10 together)
        const label = (v) => {
          const m = Math.round((v / 10 ** Math.floor(Math.log10(v) + 1e-9)) * 100) / 100;
          return m === 1 || m === 3 ? String(Number(v.toPrecision(3))) : "";
        };
        options.scales = { y: { type: "logarithmic", ticks: { callback: label } } };
      } else if (canvas.dataset.scale) options.scales = { y: { type: canvas.dataset.scale } };
      if (data.indexAxis) options.indexAxis = data.indexAxis;
      const plugins = [];
      if (data.gate && data.datasets.length > 1) { gateStyle(data, options); plugins.push(gateLine); }
      if (kind === "scatter") {
        options.onHover = (event, elements) => { event.native.target.style.cursor = elements.length ? "pointer" : "default"; };
        options.onClick = (_event, elements, chart) => {
          if (!elements.length) return;
          const e = elements[0];
          const point = chart.data.datasets[e.datasetIndex].data[e.index];
          if (point && point.href) window.location.href = point.href;
        };
        options.scales = {
          x: { title: { display: true, text: data.xLabel || "" } },
          y: { title: { display: true, text: data.yLabel || "" } },
        };
        options.plugins.tooltip = { callbacks: { label: (c) => c.raw.label || "" } };
      }
      charts.set(canvas, new Chart(canvas, { type: kind, data: data, options: options, plugins: plugins }));
      canvas.dataset.drawn = "true";
    });
  }

  // -- scatter charts (a sweep's Pareto chart): the table under the chart lists every point with
  // a link; a link that has the focus (or the mouse) highlights its point, with its tooltip ----
  function highlightPoint(link, on) {
    const table = link.closest("table[id]");
    const canvas = table && document.querySelector('canvas[data-points="' + table.id + '"]');
    const chart = canvas && charts.get(canvas);
    if (!chart) return;
    const active = [];
    if (on) {
      chart.data.datasets.forEach((d, datasetIndex) => d.data.forEach((point, index) => {
        if (point && point.href === link.dataset.point) active.push({ datasetIndex, index });
      }));
    }
    chart.setActiveElements(active);
    const at = active.length ? chart.getDatasetMeta(active[0].datasetIndex).data[active[0].index] : null;
    chart.tooltip.setActiveElements(active, at ? { x: at.x, y: at.y } : { x: 0, y: 0 });
    chart.update("none");
    canvas.dataset.highlighted = active.length ? link.dataset.point : "";
  }

  function linkPoints() {
    for (const [type, on] of [["focusin", true], ["focusout", false], ["mouseover", true], ["mouseout", false]]) {
      document.addEventListener(type, (event) => {
        const link = event.target.closest && event.target.closest("a[data-point]");
        if (link) highlightPoint(link, on);
      });
    }
  }

  async function fetchText(url) {
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } });
    if (!response.ok) throw new Error(url + ": " + response.status);
    return response.text();
  }

  // -- builds list: rows of unfinished builds refresh every 2 s, in one request ----------------
  function liveRows() {
    const table = document.getElementById("builds");
    if (!table) return;
    const pendingRows = () => Array.from(table.querySelectorAll("td[data-terminal=false]")).map((td) => td.closest("tr"));
    async function tick() {
      const rows = pendingRows();
      if (rows.length === 0) return;
      const query = rows.map((row) => "ids=" + encodeURIComponent(row.dataset.build)).join("&");
      try {
        const doc = new DOMParser().parseFromString(await fetchText("/fragments/builds?" + query), "text/html");
        for (const row of rows) {
          const fresh = doc.querySelector('tr[data-build="' + CSS.escape(row.dataset.build) + '"]');
          if (!fresh) continue;
          const oldBox = row.querySelector("input[name=ids]");
          const newBox = fresh.querySelector("input[name=ids]");
          if (newBox && oldBox) newBox.checked = oldBox.checked;
          if (newBox && !oldBox) newBox.closest("td").remove();  // a list without checkboxes
          row.replaceWith(document.importNode(fresh, true));
        }
      } catch (e) { /* the next tick retries */ }
      if (pendingRows().length) setTimeout(tick, 2000);
    }
    if (pendingRows().length) setTimeout(tick, 2000);
  }

  // -- build page: status, timeline and log over server-sent events ----------------------------
  const ICONS = { succeeded: "✓", failed: "✗", cancelled: "■", queued: "…" };
  const ORDER = ["calibrate", "build", "benchmark", "evaluate"];

  function showStatus(build) {
    const holder = document.getElementById("build-status");
    if (holder) {
      const icon = ICONS[build.status] || "▶";
      holder.innerHTML = "";
      const pill = document.createElement("span");
      pill.className = "status st-" + build.status;
      pill.dataset.status = build.status;
      pill.textContent = icon + " " + build.status;
      holder.appendChild(pill);
    }
    const percent = Math.round(build.progress * 100);
    document.querySelectorAll("#build progress").forEach((p) => { p.value = percent; p.textContent = percent + "%"; });
    document.querySelectorAll("#build [data-progress-text]").forEach((s) => { s.textContent = percent + "%"; });
    const terminal = ["succeeded", "failed", "cancelled"].includes(build.status);
    document.querySelectorAll("#timeline li").forEach((li) => {
      const stage = li.dataset.stage;
      const seconds = build.stage_seconds[stage];
      let state;
      if (stage === build.stage && build.status !== "succeeded") state = terminal ? "failed" : "running";
      else if (seconds !== undefined) state = "done";
      else state = terminal ? "skipped" : "pending";
      li.className = state;
      li.querySelector("[data-state]").textContent = state;
      let sec = li.querySelector("[data-seconds]");
      if (seconds !== undefined) {
        if (!sec) { sec = document.createElement("span"); sec.className = "muted"; sec.dataset.seconds = ""; li.appendChild(sec); }
        sec.textContent = " " + seconds.toFixed(1) + " s";
      }
    });
    if (terminal) {
      const cancel = document.getElementById("cancel-form");
      if (cancel) cancel.remove();
    }
  }

  function appendLog(line) {
    const log = document.getElementById("log");
    if (!log) return;
    const seq = Number(log.dataset.after || 0);
    if (line.seq <= seq) return;
    log.dataset.after = line.seq;
    const at = new Date(line.at).toISOString().substring(11, 19);
    const follow = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.append(at + " " + line.level + (line.stage ? " [" + line.stage + "]" : "") + " " + line.message + "\n");
    if (follow) log.scrollTop = log.scrollHeight;
  }

  async function refreshResults(buildId) {
    try {
      const html = await fetchText("/builds/" + encodeURIComponent(buildId) + "/results");
      const results = document.getElementById("results");
      results.innerHTML = html;
      drawCharts(results);
      enhanceFragments(results);
      autoRefresh(results);
      const page = await fetchText("/builds/" + encodeURIComponent(buildId));
      const doc = new DOMParser().parseFromString(page, "text/html");
      const box = doc.getElementById("error-box");
      if (box) document.getElementById("error-box").innerHTML = box.innerHTML;
    } catch (e) { /* the page still shows the final status */ }
  }

  function liveBuild() {
    const root = document.getElementById("build");
    if (!root || root.dataset.terminal === "true" || typeof EventSource === "undefined") return;
    const buildId = root.dataset.build;
    const source = new EventSource(root.dataset.events, { withCredentials: true });
    source.addEventListener("status", (event) => showStatus(JSON.parse(event.data)));
    source.addEventListener("log", (event) => appendLog(JSON.parse(event.data)));
    source.addEventListener("end", () => {
      source.close();
      root.dataset.terminal = "true";
      refreshResults(buildId);
    });
  }

  // -- fragments: search and pages of the calibration table without a reload ------------------
  function enhanceFragments(root) {
    root.querySelectorAll("form[data-fragment]").forEach((form) => {
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        const query = new URLSearchParams(new FormData(form)).toString();
        await swap(form.dataset.fragment + "?" + query, form.dataset.target);
      });
    });
    root.querySelectorAll("a[data-fragment]").forEach((link) => {
      link.addEventListener("click", async (event) => {
        event.preventDefault();
        await swap(link.dataset.fragment, "calibration");
      });
    });
  }

  async function swap(url, targetId) {
    const target = document.getElementById(targetId);
    if (!target) return;
    try {
      const html = await fetchText(url);
      const holder = document.createElement("div");
      holder.innerHTML = html;
      const fresh = holder.querySelector("#" + targetId) || holder;
      target.replaceWith(fresh);
      drawCharts(fresh);
      enhanceFragments(fresh);
      const search = fresh.querySelector("input[type=search]");
      if (search) { search.focus(); search.setSelectionRange(search.value.length, search.value.length); }
    } catch (e) { window.location.href = url.replace("/calibration?", "?"); }
  }

  // -- uploads with a progress bar ------------------------------------------------------------
  function enhanceUploads() {
    document.querySelectorAll("form[data-upload]").forEach((form) => {
      const kind = form.dataset.upload;
      const input = form.querySelector("input[type=file]");
      const bar = form.querySelector("progress");
      const status = form.querySelector(".upload-status");
      const upload = () => {
        if (!input.files.length) return;
        const body = new FormData(form);
        const follows = form.querySelector("[data-follows]");
        if (follows) {
          const select = document.getElementById(follows.dataset.follows);
          body.set(follows.name, select ? select.value : "");
        }
        const xhr = new XMLHttpRequest();
        xhr.open("POST", "/ui/" + kind + "s");
        xhr.setRequestHeader("Accept", "application/json");
        xhr.setRequestHeader("X-CSRF-Token", csrf());
        bar.hidden = false; bar.value = 0;
        status.textContent = "uploading " + input.files[0].name + "…";
        xhr.upload.addEventListener("progress", (e) => { if (e.lengthComputable) bar.value = Math.round((100 * e.loaded) / e.total); });
        xhr.addEventListener("load", () => {
          let answer = {};
          try { answer = JSON.parse(xhr.responseText); } catch (e) { /* shown below */ }
          if (xhr.status >= 200 && xhr.status < 300) {
            bar.value = 100;
            const select = document.getElementById(kind + "_id");
            let option = select.querySelector('option[value="' + answer.id + '"]');
            if (!option) {
              option = document.createElement("option");
              option.value = answer.id;
              option.textContent = (answer.name || answer.filename) + " (" + answer.id.substring(0, 12) + ", just uploaded)";
              select.insertBefore(option, select.options[1] || null);
            }
            select.value = answer.id;
            status.textContent = "uploaded " + answer.filename + " (" + answer.id.substring(0, 12) + ")";
            form.dataset.uploaded = answer.id;
          } else {
            const error = answer.error || {};
            status.textContent = "refused: " + (error.message || xhr.status) + (error.hint ? " " + error.hint : "");
            status.classList.add("error");
          }
        });
        xhr.addEventListener("error", () => { status.textContent = "the upload failed (network)"; });
        xhr.send(body);
      };
      form.addEventListener("submit", (event) => { event.preventDefault(); upload(); });
      input.addEventListener("change", upload);
    });
  }

  // -- parts of pages that refresh themselves (workers, a running sweep, a pending ranking) ---
  function autoRefresh(root) {
    root.querySelectorAll("[data-refresh-s][id]").forEach((part) => {
      const seconds = Number(part.dataset.refreshS) || 5;
      const timer = setInterval(async () => {
        if (!document.body.contains(part)) { clearInterval(timer); return; }
        try {
          const doc = new DOMParser().parseFromString(await fetchText(window.location.pathname), "text/html");
          const fresh = doc.getElementById(part.id);
          if (!fresh) return;
          part.innerHTML = fresh.innerHTML;
          drawCharts(part);
          if (!fresh.hasAttribute("data-refresh-s")) {  // it has ended
            clearInterval(timer);
            part.removeAttribute("data-refresh-s");
          }
        } catch (e) { /* keep the last answer */ }
      }, seconds * 1000);
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    drawCharts(document);
    linkPoints();
    liveRows();
    liveBuild();
    enhanceFragments(document);
    enhanceUploads();
    autoRefresh(document);
  });
})();
