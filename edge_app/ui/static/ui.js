// Keys in the review grid, as on a manual differential counter: a class's key (1-9, or the layout
// set in the device's [screen] keys), Enter the model's call, x not a cell, b (or Backspace) undo.
// They act on the selected cell (click or Tab to it), else the first; a decision never on a cell out
// of view: that one is brought into view and selected, and the next key press decides it.
function inView(el) {
  var r = el.getBoundingClientRect();
  return r.top >= 0 && r.left >= 0 && r.bottom <= window.innerHeight && r.right <= window.innerWidth;
}
document.addEventListener("keydown", function (event) {
  if (event.target.tagName === "INPUT") { return; }
  var key = event.key === "Backspace" ? "b" : event.key;
  if (key.length !== 1 && key !== "Enter") { return; }
  var cell = document.activeElement && document.activeElement.closest ? document.activeElement.closest(".cell") : null;
  // b takes back the latest decision (the first decided cell) unless a decided cell is selected
  if (key === "b" && !(cell && cell.querySelector("button[data-key='b']"))) { cell = document.querySelector("#done .cell"); }
  if (!cell) { cell = document.querySelector("#todo .cell"); }
  if (!cell) { return; }
  var button = Array.prototype.find.call(cell.querySelectorAll("button[data-key]"),
                                         function (b) { return b.getAttribute("data-key") === key; });
  if (!button) { return; }
  event.preventDefault();
  // a decision needs its cell in view; b takes back the latest decision, wherever it is shown
  if (key !== "b" && !inView(cell)) { cell.focus({preventScroll: true}); cell.scrollIntoView({block: "center"}); return; }
  button.click();
});
window.addEventListener("load", function () {
  var first = document.querySelector("#todo .cell");
  if (first) { first.focus(); }
});

// The live page: the running differential, refreshed once a second from /live/state. The rows are
// the session's own differential record (the same figures as the session page, report and FHIR).
function para(box, text) { var p = document.createElement("p"); p.textContent = text; box.appendChild(p); return p; }
function renderState(box, st) {
  box.textContent = "";
  if (!st.state || st.state === "idle") { return; }  // the page says so beside the state box
  var d = st.differential || {rows: [], total: 0, denominator: "cells", waiting: 0, unknown: 0, platelets: 0};
  para(box, "Session " + (st.folder || "—") + ": " + st.state + (st.error ? " (" + st.error + ")" : ""));
  var target = st.target ? " of " + st.target : "";
  para(box, d.total + target + " " + d.denominator + " counted, " + d.waiting + " set aside for review" +
       (d.unknown ? " (" + d.unknown + " unlike any cell the model knows)" : "") + ", " + st.frames + " frames");
  var rows = d.rows;  // every class, zeros too: the rule of every table of the differential
  if (d.total) {
    var table = document.createElement("table");
    var head = table.insertRow();
    ["class", "count", "%", "95% limits"].forEach(function (h) { var th = document.createElement("th"); th.textContent = h; head.appendChild(th); });
    rows.forEach(function (r) {
      var tr = table.insertRow();
      [r.label, String(r.count), r.percent.toFixed(1) + "%", r.low.toFixed(1) + "–" + r.high.toFixed(1) + "%"].forEach(
        function (text) { tr.insertCell().textContent = text; });
    });
    box.appendChild(table);
  }
  if (d.nrbc && d.nrbc.count) { para(box, "nucleated red cells " + d.nrbc.count + " (" + d.nrbc.percent.toFixed(1) + " per 100 leukocytes)"); }
  if (d.platelets) { para(box, "platelets " + d.platelets + " (not in the differential)"); }
  if (d.me_ratio !== null && d.me_ratio !== undefined) { para(box, "M:E " + d.me_ratio.toFixed(2)); }
  var strip = document.createElement("div");
  strip.className = "strip";
  (st.last_cells || []).forEach(function (c) {
    var fig = document.createElement("figure");
    var img = document.createElement("img");
    img.src = "/s/" + encodeURIComponent(st.folder) + "/crop?id=" + c.id;
    img.width = 72; img.height = 72; img.alt = c.label;
    var cap = document.createElement("figcaption");
    cap.textContent = c.label + (c.flag ? " ?" : "");
    fig.appendChild(img); fig.appendChild(cap); strip.appendChild(fig);
  });
  if (st.target) {
    var bar = document.createElement("progress");
    bar.max = st.target; bar.value = Math.min(d.total, st.target);
    box.appendChild(bar);
  }
  box.appendChild(strip);
  if (st.state !== "running" && st.state !== "paused" && document.querySelector("form[action='/live/stop']")) {
    window.location.reload();  // the session ended: the page's controls become Start again
    return;
  }
  if (st.state !== "running" && st.state !== "paused" && st.folder) {
    var a = document.createElement("a");
    a.href = "/s/" + encodeURIComponent(st.folder) + "/";
    a.textContent = "this session's differential and review";
    para(box, "").appendChild(a);
  }
}
window.addEventListener("load", function () {
  var box = document.getElementById("state");
  if (!box || !box.dataset.live) { return; }
  try { renderState(box, JSON.parse(box.textContent)); } catch (e) { /* the server's text stays */ }
  setInterval(function () {
    fetch("/live/state", {credentials: "same-origin"}).then(function (r) { return r.json(); })
      .then(function (st) { renderState(box, st); }).catch(function () {});
  }, 1000);
});
