// Keys in the review grid, as on a manual differential counter: a class's key (1-9, or the layout
// set in the device's [screen] keys), Enter the model's call, x not a cell, b undo. They act on the
// selected cell (click or Tab to it), else the first.
document.addEventListener("keydown", function (event) {
  if (event.target.tagName === "INPUT") { return; }
  var key = event.key === "Backspace" ? "b" : event.key;
  if (key.length !== 1 && key !== "Enter") { return; }
  var cell = document.activeElement && document.activeElement.closest ? document.activeElement.closest(".cell") : null;
  if (!cell) { cell = document.querySelector("#todo .cell"); }
  if (!cell) { return; }
  var button = Array.prototype.find.call(cell.querySelectorAll("button[data-key]"),
                                         function (b) { return b.getAttribute("data-key") === key; });
  if (button) { event.preventDefault(); button.click(); }
});
window.addEventListener("load", function () {
  var first = document.querySelector("#todo .cell");
  if (first) { first.focus(); }
});

// The live page: the running differential, refreshed once a second from /live/state.
function renderState(box, st) {
  var lines = [];
  lines.push("Session " + (st.folder || "—") + ": " + st.state + (st.error ? " (" + st.error + ")" : ""));
  var target = st.target ? " of " + st.target : "";
  lines.push(st.counted + target + " cells counted, " + st.for_review + " set aside for review" +
             (st.unknown ? " (" + st.unknown + " unlike any cell the model knows)" : "") + ", " + st.frames + " frames");
  (st.classes || []).forEach(function (c) { lines.push(c); });
  (st.ratios || []).forEach(function (r) { lines.push(r); });
  box.textContent = "";
  lines.forEach(function (text) { var p = document.createElement("p"); p.textContent = text; box.appendChild(p); });
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
    bar.max = st.target; bar.value = Math.min(st.counted, st.target);
    box.appendChild(bar);
  }
  box.appendChild(strip);
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
