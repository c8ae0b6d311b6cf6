// Keys in the review grid, as on a manual differential counter: 1-9 a class, Enter the model's
// call, x not a cell, b undo. They act on the selected cell (click or Tab to it), else the first.
document.addEventListener("keydown", function (event) {
  if (event.target.tagName === "INPUT") { return; }
  var key = event.key === "Backspace" ? "b" : event.key;
  if (!/^([1-9]|Enter|x|b)$/.test(key)) { return; }
  var cell = document.activeElement && document.activeElement.closest ? document.activeElement.closest(".cell") : null;
  if (!cell) { cell = document.querySelector("#todo .cell"); }
  if (!cell) { return; }
  var button = cell.querySelector('button[data-key="' + key + '"]');
  if (button) { event.preventDefault(); button.click(); }
});
window.addEventListener("load", function () {
  var first = document.querySelector("#todo .cell");
  if (first) { first.focus(); }
});
