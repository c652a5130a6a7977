// Building the page without innerHTML: everything the server sends (task keys,
// previews, logs, tracebacks) may hold markup, so it only ever becomes text nodes.

/**
 * Make an element. `attrs` keys: `class`, `text` (its textContent), `on<event>`
 * (a listener), booleans (`hidden`, `disabled`: set when true), anything else
 * as an attribute. Children are nodes or strings (strings become text nodes);
 * null, undefined and false are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "text") el.textContent = String(value);
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace the children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";

/** An SVG element; attributes are set as given (no `text`/`on` shortcuts but `text`). */
export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") el.textContent = String(value);
    else if (name === "class") el.setAttribute("class", value);
    else el.setAttribute(name, String(value));
  }
  for (const child of children) if (child) el.append(child);
  return el;
}

// --- formatting ---------------------------------------------------------------------

const pad = (n, width = 2) => String(n).padStart(width, "0");

/** A timestamp (ISO 8601 from the server) in local time: `2024-05-01 14:03:07`. */
export function localTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return (
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`
  );
}

/** Local time with milliseconds, for log records and state histories. */
export function localTimeMs(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return `${localTime(iso)}.${pad(d.getMilliseconds(), 3)}`;
}

/**
 * A `<time>` element showing local time, with the server's value as its title:
 * to the millisecond with `ms`, without the date with `timeOnly`.
 */
export function timeEl(iso, { ms = false, timeOnly = false } = {}) {
  if (!iso) return h("span", { class: "muted", text: "–" });
  let text = ms ? localTimeMs(iso) : localTime(iso);
  if (timeOnly) text = text.slice(11);
  return h("time", { datetime: iso, title: iso, text });
}

/** Seconds as a short human duration: `850 ms`, `12.3 s`, `4 min 05 s`, `2 h 01 min`. */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "";
  if (seconds < 0) seconds = 0;
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const s = Math.floor(seconds);
  if (s < 3600) return `${Math.floor(s / 60)} min ${pad(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${pad(Math.floor((s % 3600) / 60))} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

/** Seconds between two ISO timestamps (the second defaults to now). */
export function secondsBetween(startIso, endIso) {
  if (!startIso) return null;
  const end = endIso ? new Date(endIso).getTime() : Date.now();
  return (end - new Date(startIso).getTime()) / 1000;
}

export const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED", "CRASHED"]);
export const STATES = [
  "SCHEDULED",
  "PENDING",
  "RUNNING",
  "CANCELLING",
  "COMPLETED",
  "FAILED",
  "CANCELLED",
  "CRASHED",
];

/** A state as a coloured badge (the colour comes from the stylesheet, by class). */
export function stateBadge(state) {
  return h("span", { class: `badge state-${String(state).toLowerCase()}`, text: state });
}

/**
 * The last eight hex digits of a run id, which is what people compare by eye
 * (its first digits are the time it was made, the same for a minute's runs).
 */
export const shortId = (id) => String(id).slice(-8);
