// Bar charts drawn as SVG by hand: sixty bars need no charting library. Sizes
// are SVG attributes and colours come from the stylesheet (the page's CSP
// allows no inline styles).

import { svg } from "./dom.js";

const pad = (n) => String(n).padStart(2, "0");

function minuteLabel(minutesAgo, now) {
  const t = new Date(now - minutesAgo * 60000);
  return `${pad(t.getHours())}:${pad(t.getMinutes())}`;
}

/**
 * Runs ended per minute over the last hour: `counts` holds one number per
 * minute, oldest first, the last being the 60 s up to now. Each bar has a
 * tooltip with its count and local times.
 */
export function throughputChart(counts, { width = 720, height = 160, now = Date.now() } = {}) {
  const left = 36;
  const right = 8;
  const top = 10;
  const bottom = 22;
  const plotW = width - left - right;
  const plotH = height - top - bottom;
  const max = Math.max(1, ...counts);
  // A round top for the axis: 1, 2, 5, 10, 20, 50, ...
  const step = 10 ** Math.floor(Math.log10(max));
  const ceiling = [1, 2, 5, 10].map((m) => m * step).find((v) => v >= max);
  const slot = plotW / counts.length;
  const chart = svg("svg", {
    class: "chart",
    viewBox: `0 0 ${width} ${height}`,
    width,
    height,
    role: "img",
    "aria-label": `Runs ended per minute over the last ${counts.length} minutes`,
  });
  // Whole runs only: a middle line only where it falls on a whole number.
  for (const fraction of ceiling % 2 === 0 ? [0, 0.5, 1] : [0, 1]) {
    const y = top + plotH * (1 - fraction);
    chart.append(svg("line", { class: "grid", x1: left, x2: width - right, y1: y, y2: y }));
    chart.append(
      svg("text", {
        class: "axis",
        x: left - 6,
        y: y + 4,
        "text-anchor": "end",
        text: ceiling * fraction,
      }),
    );
  }
  counts.forEach((count, i) => {
    const barH = (count / ceiling) * plotH;
    const minutesAgo = counts.length - 1 - i;
    const rect = svg("rect", {
      class: count ? "bar" : "bar empty",
      x: left + i * slot + 1,
      y: top + plotH - barH,
      width: Math.max(1, slot - 2),
      height: barH,
    });
    // A transparent full-height target, so that empty minutes have a tooltip too.
    const hit = svg("rect", { class: "hit", x: left + i * slot, y: top, width: slot, height: plotH });
    const g = svg("g", {}, rect, hit);
    const span = `${minuteLabel(minutesAgo + 1, now)}–${minuteLabel(minutesAgo, now)}`;
    g.append(svg("title", { text: `${count} ended, ${span}` }));
    chart.append(g);
  });
  for (const minutesAgo of [59, 45, 30, 15, 0]) {
    if (minutesAgo >= counts.length) continue;
    const i = counts.length - 1 - minutesAgo;
    chart.append(
      svg("text", {
        class: "axis",
        x: left + (i + 0.5) * slot,
        y: height - 6,
        "text-anchor": "middle",
        text: minutesAgo ? minuteLabel(minutesAgo, now) : "now",
      }),
    );
  }
  return chart;
}

/** The same counts as a small sparkline for a table cell. */
export function sparkline(counts, { width = 120, height = 24 } = {}) {
  const max = Math.max(1, ...counts);
  const slot = width / counts.length;
  const chart = svg("svg", {
    class: "spark",
    viewBox: `0 0 ${width} ${height}`,
    width,
    height,
    role: "img",
    "aria-label": `${counts.reduce((a, b) => a + b, 0)} ended in the last hour`,
  });
  chart.append(svg("line", { class: "baseline", x1: 0, x2: width, y1: height - 0.5, y2: height - 0.5 }));
  counts.forEach((count, i) => {
    if (!count) return;
    const barH = Math.max(1.5, (count / max) * (height - 2));
    chart.append(
      svg("rect", { class: "bar", x: i * slot, y: height - barH, width: Math.max(1, slot - 0.5), height: barH }),
    );
  });
  return chart;
}
