// The demo page's own code: it only uses fetch. The snippet (loaded from the
// gateway) adds the trace and timing headers and reports what it measured.
(function () {
  "use strict";
  var gateway = document.body.getAttribute("data-gateway");
  var rows = document.querySelector("#requests tbody");
  var count = 0;
  var byTrace = {};

  function serverTiming(header) {
    var out = {};
    (header || "").split(",").forEach(function (metric) {
      var parts = metric.trim().split(";");
      var name = parts.shift();
      var entry = {};
      parts.forEach(function (p) {
        var kv = p.trim().split("=");
        entry[kv[0]] = (kv[1] || "").replace(/^"|"$/g, "");
      });
      if (name) out[name] = entry;
    });
    return out;
  }

  function cell(row, text, cls) {
    var td = document.createElement("td");
    td.textContent = text == null ? "" : text;
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  function record(label, response) {
    var st = serverTiming(response.headers.get("Server-Timing"));
    var tp = st.traceparent ? st.traceparent.desc : "";
    var traceId = tp.split("-")[1] || "";
    var verdict = st.uplink ? st.uplink.desc : "absent";
    var row = document.createElement("tr");
    row.setAttribute("data-trace-id", traceId);
    cell(row, ++count);
    cell(row, label);
    cell(row, response.status);
    cell(row, "").innerHTML = "<code>" + traceId + "</code>";
    cell(row, verdict, verdict);
    cell(row, st.uplink && st.uplink.dur ? Number(st.uplink.dur).toFixed(1) : "–", "num uplink");
    cell(row, st.gw ? Number(st.gw.dur).toFixed(1) : "", "num");
    cell(row, "…", "num rtt");
    rows.insertBefore(row, rows.firstChild);
    byTrace[traceId] = row;
  }

  // The snippet tells us the round trip once it has matched the request to
  // its Resource Timing entry.
  window.addEventListener("latency-gateway", function (event) {
    var d = event.detail || {};
    var row = byTrace[d.traceId];
    if (row && d.rtt != null) row.querySelector(".rtt").textContent = Number(d.rtt).toFixed(1);
  });

  function load(path, label) {
    return fetch(gateway + path).then(function (response) {
      record(label || path, response);
      return response;
    });
  }

  function showFeed(activities) {
    var feed = document.getElementById("feed");
    feed.innerHTML = "";
    activities.forEach(function (a) {
      var div = document.createElement("div");
      div.className = "activity";
      var who = document.createElement("b");
      who.textContent = a.display_name + " @" + a.handle;
      var msg = document.createElement("p");
      msg.textContent = a.message;
      div.appendChild(who);
      div.appendChild(msg);
      feed.appendChild(div);
    });
  }

  function reload() {
    return load("/api/activities/home", "home feed")
      .then(function (r) { return r.json(); })
      .then(showFeed)
      .catch(function (e) {
        document.getElementById("feed").textContent = "Could not load the feed: " + e;
      });
  }

  document.getElementById("reload").onclick = reload;
  document.getElementById("slow").onclick = function () {
    load("/api/slow?ms=800", "slow (800 ms)");
  };
  document.getElementById("burst").onclick = function () {
    for (var i = 0; i < 8; i++) load("/api/activities/home", "burst " + (i + 1));
  };
  window.demoReady = reload();
})();
