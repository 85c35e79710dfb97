// medagent hub dashboard: confirmation dialogs, live figures (server-sent events) and two charts.
// Loaded as a file (the CSP forbids inline script); the pages work without it, minus live updates.
"use strict";
(function () {
  var COLORS = ["#1f6feb", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a7ea4", "#57606a"];

  // Forms marked data-confirm ask before they are sent.
  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) { event.preventDefault(); }
  });

  // "agents.<id>.online": walk the snapshot; a key may itself contain dots (channel names), so
  // when a step is missing, the next parts are joined until a key matches.
  function resolve(root, path) {
    var parts = path.split("."), value = root, i = 0;
    while (i < parts.length) {
      if (value === null || typeof value !== "object") { return undefined; }
      var key = parts[i], j = i + 1;
      while (!(key in value) && j < parts.length) { key += "." + parts[j]; j += 1; }
      if (!(key in value)) { return undefined; }
      value = value[key]; i = j;
    }
    return value;
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined) { return "—"; }
    var units = [["d", 86400], ["h", 3600], ["min", 60]];
    for (var k = 0; k < units.length; k++) {
      if (seconds >= units[k][1]) { return Math.floor(seconds / units[k][1]) + " " + units[k][0]; }
    }
    return Math.floor(Math.max(0, seconds)) + " s";
  }

  function show(element, value) {
    var format = element.getAttribute("data-format");
    if (format === "online") {
      var badge = document.createElement("span");
      badge.className = "badge " + (value ? "online" : "offline");
      badge.textContent = value ? "online" : "offline";
      element.replaceChildren(badge);
      return;
    }
    var text;
    if (value === null || value === undefined) { text = "—"; }
    else if (format === "age") { text = age(value); }
    else if (format === "ms") { text = value + " ms"; }
    else if (format === "json") { text = Object.keys(value).map(function (k) { return k + ": " + value[k]; }).join(", ") || "—"; }
    else { text = String(value); }
    if (element.textContent !== text) { element.textContent = text; }
  }

  function drawLines(canvas, series, labels) {
    var ctx = canvas.getContext("2d"), w = canvas.width, h = canvas.height, pad = 28;
    ctx.clearRect(0, 0, w, h);
    var max = 1;
    series.forEach(function (s) { s.forEach(function (v) { if (v !== null && v > max) { max = v; } }); });
    ctx.strokeStyle = "#d9dee7"; ctx.fillStyle = "#5b6475"; ctx.font = "11px sans-serif"; ctx.lineWidth = 1;
    for (var g = 0; g <= 4; g++) {
      var y = h - pad + 4 - (h - pad) * g / 4;
      ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(w, y); ctx.stroke();
      var label = max * g / 4;
      ctx.fillText(max >= 8 ? String(Math.round(label)) : label.toFixed(1), 0, y + 3);
    }
    series.forEach(function (s, index) {
      if (!s.length) { return; }
      ctx.strokeStyle = COLORS[index % COLORS.length]; ctx.lineWidth = 2; ctx.beginPath();
      var started = false;
      s.forEach(function (v, x) {
        if (v === null) { return; }
        var px = pad + (w - pad) * (s.length === 1 ? 1 : x / (s.length - 1));
        var py = h - pad + 4 - (h - pad) * v / max;
        if (started) { ctx.lineTo(px, py); } else { ctx.moveTo(px, py); started = true; }
      });
      ctx.stroke();
      ctx.fillStyle = COLORS[index % COLORS.length];
      ctx.fillText(labels[index], pad + 4 + index * 110, h - 6);
    });
  }

  function updateCharts(snapshot) {
    var rate = document.querySelector("canvas[data-chart=rate]");
    var ack = document.querySelector("canvas[data-chart=ack]");
    if (rate && snapshot.channels) {
      var names = Object.keys(snapshot.channels).sort();
      drawLines(rate, names.map(function (n) { return snapshot.channels[n].perMinute; }), names);
    }
    if (ack && snapshot.ackHistory) {
      drawLines(ack, [snapshot.ackHistory.map(function (p) { return p[1]; }),
                      snapshot.ackHistory.map(function (p) { return p[2]; })], ["p50", "p99"]);
      ack.setAttribute("data-points", String(snapshot.ackHistory.length));
    }
  }

  var main = document.querySelector("main[data-stream]");
  var url = main && main.getAttribute("data-stream");
  if (url && window.EventSource) {
    var source = new EventSource(url);
    source.addEventListener("snapshot", function (event) {
      var snapshot = JSON.parse(event.data);
      document.querySelectorAll("[data-live]").forEach(function (element) {
        show(element, resolve(snapshot, element.getAttribute("data-live")));
      });
      updateCharts(snapshot);
      main.classList.remove("live-off");
      main.setAttribute("data-updated", String(snapshot.at));
    });
    source.addEventListener("error", function () { main.classList.add("live-off"); });
  }
}());
