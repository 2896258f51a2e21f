// A run's page: summary, live charts, sample grids, checkpoints, recipe and log, refreshed every 2 s.
"use strict";

const runName = document.getElementById("run").dataset.run;
const runPath = `/api/runs/${encodeURIComponent(runName)}`;
const filesPath = `/runs/${encodeURIComponent(runName)}/files/`;
const metrics = { session: "", entries: [] };
const charts = {};
let logOffset = -1, lastStatus = null, lastCheckpoints = "", lastSamples = "";

function chartOptions(title, series, width) {
  return {
    title, width, height: 220,
    scales: { x: { time: false } },
    axes: [{ stroke: "#8b93a1", grid: { stroke: "#2a2f3a" } },
           { stroke: "#8b93a1", grid: { stroke: "#2a2f3a" }, size: 70, values: (u, ticks) => ticks.map(axisLabel) }],
    series: [{ label: "step" }, ...series],
  };
}

function axisLabel(value) {
  if (value === 0) return "0";
  const magnitude = Math.abs(value);
  return magnitude < 1e-2 || magnitude >= 1e5 ? value.toExponential(1) : fmt(value, 3);
}

function chartData() {
  const weight = Number(document.getElementById("smoothing").value);
  const e = metrics.entries;
  const steps = e.map((m) => m.step), loss = e.map((m) => m.loss), rate = e.map((m) => m.samples_per_s);
  return {
    loss: [steps, loss, smooth(loss, weight)],
    lr: [steps, e.map((m) => m.lr)],
    rate: [steps, rate, smooth(rate, weight)],
  };
}

function drawCharts() {
  const data = chartData();
  const specs = {
    loss: ["loss", [{ label: "loss", stroke: "rgba(76,141,255,0.35)", width: 1 },
                    { label: "smoothed", stroke: "#4c8dff", width: 2 }]],
    lr: ["learning rate", [{ label: "lr", stroke: "#d29922", width: 2 }]],
    rate: ["samples/s", [{ label: "samples/s", stroke: "rgba(63,185,80,0.35)", width: 1 },
                         { label: "smoothed", stroke: "#3fb950", width: 2 }]],
  };
  for (const [key, [title, series]] of Object.entries(specs)) {
    const box = document.getElementById(`chart-${key}`);
    if (!charts[key]) {
      if (!data[key][0].length) continue;
      charts[key] = new uPlot(chartOptions(title, series, Math.max(box.clientWidth - 16, 300)), data[key], box);
    } else {
      charts[key].setData(data[key]);
    }
  }
  const n = metrics.entries.length;
  document.getElementById("points").textContent = n ? `${n} steps` : "no steps yet";
  document.getElementById("points").dataset.points = n;
}

async function refreshMetrics() {
  const answer = await api(`${runPath}/metrics?session=${metrics.session}&after=${metrics.entries.length}`);
  if (answer.reset) metrics.entries = [];
  metrics.session = answer.session;
  if (answer.entries.length || answer.reset) {
    metrics.entries.push(...answer.entries);
    drawCharts();
  }
}

function checkpointRow(c) {
  const format = el("select", {}, el("option", { value: "" }, "default format"),
    el("option", { value: "diffusers" }, "diffusers"), el("option", { value: "kohya" }, "kohya"));
  const dtype = el("select", {}, el("option", { value: "" }, "saved dtype"),
    el("option", { value: "float16" }, "float16"), el("option", { value: "bfloat16" }, "bfloat16"),
    el("option", { value: "float32" }, "float32"));
  const result = el("span", { class: "message" });
  const button = el("button", { type: "button", disabled: !c.valid }, "Export");
  button.addEventListener("click", async () => {
    button.disabled = true;
    result.textContent = "exporting…";
    try {
      const done = await api(`${runPath}/checkpoints/${c.name}/export`, { body: { format: format.value, dtype: dtype.value } });
      result.replaceChildren(el("a", { href: done.url, download: "" }, "download " + done.file.split("/").pop()));
    } catch (e) { result.textContent = e.message; }
    button.disabled = false;
  });
  const lora = c.valid ? el("a", { href: `${filesPath}${c.name}/lora.safetensors`, download: "" }, "lora.safetensors") : "";
  return el("tr", { "data-checkpoint": c.name },
    el("td", {}, c.name), el("td", {}, c.step),
    el("td", { class: c.valid ? "" : "error" }, c.valid ? "valid" : `invalid: ${c.reason}`),
    el("td", {}, bytes(c.size_bytes)), el("td", {}, fmt(c.loss)),
    el("td", {}, lora, " ", format, " ", dtype, " ", button, " ", result));
}

function showSamples(samples) {
  const key = samples.map((s) => s.step).join(",");
  if (key === lastSamples) return;
  lastSamples = key;
  const slider = document.getElementById("sample-slider"), image = document.getElementById("sample-image");
  const wasLast = Number(slider.value) >= Number(slider.max);
  document.getElementById("samples-empty").hidden = samples.length > 0;
  document.getElementById("samples-control").hidden = samples.length === 0;
  image.hidden = samples.length === 0;
  if (!samples.length) return;
  slider.max = samples.length - 1;
  if (wasLast) slider.value = samples.length - 1;
  const show = () => {
    const s = samples[Number(slider.value)];
    document.getElementById("sample-step").textContent = `${s.step} (${Number(slider.value) + 1} of ${samples.length})`;
    image.src = filesPath + s.file;
  };
  slider.oninput = show;
  show();
}

async function refreshRun() {
  const run = await api(runPath);
  const status = document.getElementById("status");
  status.textContent = run.status;
  status.className = `status ${run.status}`;
  document.getElementById("reason").textContent = run.reason || "";
  document.getElementById("step").textContent = `${run.step} / ${run.max_steps ?? "?"}`;
  document.getElementById("loss").textContent = fmt(run.last_loss);
  document.getElementById("rate").textContent = fmt(run.samples_per_s, 3);
  document.getElementById("eta").textContent = duration(run.eta_s);
  document.getElementById("workers").textContent = run.workers ?? "";
  document.getElementById("where").textContent = run.where || "";
  const live = run.status === "running" || run.status === "starting";
  document.getElementById("stop").disabled = run.status !== "running";
  document.getElementById("resume").disabled = live || run.status === "finished" || !run.checkpoints.some((c) => c.valid);
  const key = JSON.stringify(run.checkpoints);
  if (key !== lastCheckpoints) {
    lastCheckpoints = key;
    document.querySelector("#checkpoints tbody").replaceChildren(...run.checkpoints.map(checkpointRow));
  }
  showSamples(run.samples);
  document.getElementById("loss-plot").hidden = !run.has_loss_plot;
  document.getElementById("exports").replaceChildren(...run.exports.flatMap((f) =>
    [el("a", { href: filesPath + f, download: "" }, f.split("/").pop()), " "]));
  if (run.status !== lastStatus) {
    lastStatus = run.status;
    const recipe = await api(`${runPath}/recipe`);
    document.getElementById("recipe").textContent = recipe.text || "(no recipe.yaml yet)";
  }
}

async function refreshLog() {
  const answer = await api(`${runPath}/log?offset=${logOffset}`);
  const log = document.getElementById("log");
  const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  if (answer.reset) log.textContent = answer.note || "";
  log.textContent += answer.text;
  if (log.textContent.length > 200000) log.textContent = log.textContent.slice(-100000);
  logOffset = answer.offset;
  if (atBottom) log.scrollTop = log.scrollHeight;
}

async function act(action) {
  const message = document.getElementById("action-message");
  message.textContent = `${action}…`;
  try {
    await api(`${runPath}/${action}`, { body: {} });
    message.textContent = action === "stop" ? "stop sent: the run saves a checkpoint, then exits" : "resuming";
  } catch (e) { message.textContent = e.message; }
  refreshRun();
}

document.getElementById("stop").addEventListener("click", () => act("stop"));
document.getElementById("resume").addEventListener("click", () => act("resume"));
document.getElementById("smoothing").addEventListener("input", (event) => {
  document.getElementById("smoothing-value").textContent = event.target.value;
  drawCharts();
});

async function tick() {
  for (const job of [refreshRun, refreshMetrics, refreshLog]) {
    try { await job(); } catch (e) { console.warn(e); }
  }
}
tick();
setInterval(tick, 2000);
