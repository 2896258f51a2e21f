// New run: paste or load a recipe, validate it (errors at their line), start it here or on a Ray cluster.
"use strict";

const text = document.getElementById("recipe-text");
const numbers = document.getElementById("line-numbers");
const message = document.getElementById("form-message");

function renumber() {
  const lines = text.value.split("\n").length;
  numbers.textContent = Array.from({ length: lines }, (_, i) => i + 1).join("\n");
  numbers.scrollTop = text.scrollTop;
}

function goToLine(line) {
  const offsets = text.value.split("\n").slice(0, line - 1).reduce((n, l) => n + l.length + 1, 0);
  const end = text.value.indexOf("\n", offsets);
  text.focus();
  text.setSelectionRange(offsets, end < 0 ? text.value.length : end);
}

function showErrors(errors) {
  const list = document.getElementById("errors");
  list.replaceChildren(...errors.map((e) => {
    const where = e.line ? `line ${e.line}` : "";
    const item = el("li", { "data-field": e.field },
      where ? el("span", { class: "muted" }, `${where} · `) : "", e.field ? el("code", {}, e.field) : "",
      e.field ? ": " : "", e.message);
    if (e.line) item.addEventListener("click", () => goToLine(e.line));
    return item;
  }));
}

function body() {
  return { recipe: text.value, address: document.getElementById("address").value.trim() || null,
           python: document.getElementById("python").value.trim() || "python" };
}

async function validate() {
  message.textContent = "validating…";
  try {
    const answer = await api("/api/recipes/validate", { body: body() });
    showErrors(answer.errors);
    message.textContent = answer.ok ? `valid: ${answer.name} (${answer.summary})${answer.note ? "; " + answer.note : ""}`
                                    : `${answer.errors.length} problem(s)`;
    return answer.ok;
  } catch (e) { message.textContent = e.message; return false; }
}

async function start() {
  message.textContent = "starting…";
  try {
    const answer = await api("/api/runs", { body: body() });
    if (answer.errors) { showErrors(answer.errors); message.textContent = `${answer.errors.length} problem(s)`; return; }
    window.location.href = answer.url;
  } catch (e) { message.textContent = e.message; }
}

document.getElementById("recipe-file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (file) { text.value = await file.text(); renumber(); validate(); }
});
document.getElementById("validate").addEventListener("click", validate);
document.getElementById("start").addEventListener("click", start);
text.addEventListener("input", renumber);
text.addEventListener("scroll", () => { numbers.scrollTop = text.scrollTop; });
renumber();
