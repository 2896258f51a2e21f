// Runs page: the table refreshes every 2 s from /api/runs.
"use strict";

function runRow(r) {
  return el("tr", { "data-run": r.name },
    el("td", {}, el("a", { href: `/runs/${encodeURIComponent(r.name)}` }, r.name)),
    el("td", {}, r.family || ""),
    el("td", {}, statusBadge(r.status), " ", el("span", { class: "reason" }, r.reason || "")),
    el("td", {}, `${r.step} / ${r.max_steps ?? "?"}`),
    el("td", {}, fmt(r.last_loss)),
    el("td", {}, fmt(r.samples_per_s, 3)),
    el("td", {}, duration(r.eta_s)),
    el("td", {}, r.workers ?? ""),
    el("td", {}, r.where || ""));
}

async function refreshRuns() {
  try {
    const runs = await api("/api/runs");
    const body = document.querySelector("#runs tbody");
    body.replaceChildren(...(runs.length ? runs.map(runRow)
      : [el("tr", { class: "empty" }, el("td", { colSpan: 9 }, "No runs yet: ", el("a", { href: "/new" }, "start one"), "."))]));
  } catch (e) { console.warn(e); }
}

refreshRuns();
setInterval(refreshRuns, 2000);
