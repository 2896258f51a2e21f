// Shared helpers of the dashboard pages (no framework; the server renders, these keep pages live).
"use strict";

async function api(path, options = {}) {
  const init = { credentials: "same-origin", ...options };
  if (init.body !== undefined) {
    init.method = init.method || "POST";
    init.headers = { "Content-Type": "application/json", ...(init.headers || {}) };
    init.body = JSON.stringify(init.body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data;
  try { data = text ? JSON.parse(text) : {}; } catch (e) { data = { detail: text }; }
  if (!response.ok && response.status !== 422) {
    throw new Error(data.detail || `${response.status} ${response.statusText}`);
  }
  return data;
}

function fmt(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "";
  return Number(value).toPrecision(digits).replace(/\.?0+($|e)/, "$1");
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  seconds = Math.round(seconds);
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${fmt(n, 3)} ${units[i]}`;
}

function el(tag, attrs = {}, ...parts) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") element.className = value;
    else if (key.startsWith("data-")) element.setAttribute(key, value);
    else element[key] = value;
  }
  // append() takes elements and strings alike; missing parts become empty text
  element.append(...parts.map((part) => (part === null || part === undefined ? "" : part)));
  return element;
}

// Debiased exponential moving average: TensorBoard's scalar smoothing, as distrib/lossplot.py `smooth`.
function smooth(values, weight) {
  let last = 0, n = 0;
  return values.map((v) => {
    if (v === null || v === undefined) return null;
    n += 1;
    last = last * weight + (1 - weight) * v;
    return last / (1 - Math.pow(weight, n));
  });
}

function statusBadge(status) {
  return el("span", { class: `status ${status}` }, status);
}
