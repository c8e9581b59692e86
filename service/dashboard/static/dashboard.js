// trtforge dashboard: progressive enhancement of server-rendered pages (no build step).
// Every page works without this script; with it: charts, live build status over server-sent
// events, rows of the builds list that refresh while their builds run, uploads with a
// progress bar, and fragments swapped in place of full reloads.
"use strict";

(function () {
  const csrf = () => document.body.dataset.csrf || "";
  const charts = new Map();

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
      if (canvas.dataset.scale) options.scales = { y: { type: canvas.dataset.scale } };
      if (data.indexAxis) options.indexAxis = data.indexAxis;
      if (kind === "scatter") {
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
      charts.set(canvas, new Chart(canvas, { type: kind, data: data, options: options }));
      canvas.dataset.drawn = "true";
    });
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
    liveRows();
    liveBuild();
    enhanceFragments(document);
    enhanceUploads();
    autoRefresh(document);
  });
})();
