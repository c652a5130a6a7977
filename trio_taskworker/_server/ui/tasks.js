// The tasks page: GET /tasks, one row per task key, and a chart of the runs
// that ended in each minute of the last hour (all keys together). Pushed run
// and worker events make it load again (at most once a second); a timer keeps
// the chart's minutes moving when nothing happens.

import { api } from "./api.js";
import { throughputChart, sparkline } from "./chart.js";
import { duration, fill, h } from "./dom.js";
import { runsHash } from "./runs.js";
import { View } from "./view.js";

export class TasksView extends View {
  build(root) {
    this.chart = h("div", { class: "chart-wrap", id: "throughput" });
    this.chartNote = h("p", { class: "muted" });
    this.tbody = h("tbody");
    this.empty = h("p", {
      class: "empty",
      hidden: true,
      text: "No task has unfinished runs, runs that ended in the last hour, or a worker.",
    });
    const head = [
      ["Task", ""],
      ["Queued", "num"],
      ["Oldest queued", "num"],
      ["Scheduled", "num"],
      ["Running", "num"],
      ["Completed (1 h)", "num"],
      ["Failed (1 h)", "num"],
      ["Workers", "num"],
      ["Ended per minute (1 h)", ""],
    ];
    fill(
      root,
      h("div", { class: "page-head" }, h("h1", { text: "Tasks" })),
      h(
        "section",
        { class: "panel" },
        h("h2", { text: "Throughput: runs ended per minute, last hour" }),
        this.chart,
        this.chartNote,
      ),
      h(
        "table",
        { class: "tasks", id: "tasks-table" },
        h("thead", {}, h("tr", {}, head.map(([t, cls]) => h("th", { class: cls, text: t })))),
        this.tbody,
      ),
      this.empty,
      h(
        "p",
        { class: "muted" },
        "Running counts PENDING, RUNNING and CANCELLING runs; failed counts FAILED and CRASHED ones.",
      ),
    );
    this.every(30000, () => this.load());
  }

  fetch() {
    return api("/tasks");
  }

  apply(type) {
    if (type === "run" || type === "workers") this.loadSoon(1000);
  }

  show({ tasks }) {
    const minutes = tasks[0]?.ended_per_minute.length ?? 60;
    const total = Array.from({ length: minutes }, (_, i) =>
      tasks.reduce((sum, t) => sum + (t.ended_per_minute[i] ?? 0), 0),
    );
    // Drawn at the width it is shown at, so that its text keeps its size.
    const width = Math.max(360, Math.floor(this.chart.clientWidth || 720));
    fill(this.chart, throughputChart(total, { width, height: 180 }));
    const ended = total.reduce((a, b) => a + b, 0);
    this.chartNote.textContent = `${ended} run${ended === 1 ? "" : "s"} ended in the last hour.`;
    this.empty.hidden = tasks.length > 0;
    fill(
      this.tbody,
      tasks.map((t) =>
        h(
          "tr",
          { "data-task-key": t.task_key },
          h(
            "td",
            { class: "task" },
            h("a", { href: runsHash({ task_key: t.task_key }), class: "task-key", text: t.task_key }),
          ),
          this.count(t.queued, "queued", "SCHEDULED", t.task_key),
          h("td", {
            class: `num oldest${t.oldest_queued_seconds === null ? " muted" : ""}`,
            text: t.oldest_queued_seconds === null ? "–" : duration(t.oldest_queued_seconds),
          }),
          h("td", { class: "num scheduled", text: t.scheduled }),
          this.count(t.running, "running", "RUNNING", t.task_key),
          this.count(t.completed_last_hour, "completed", "COMPLETED", t.task_key),
          this.count(t.failed_last_hour, "failed", "FAILED", t.task_key, t.failed_last_hour > 0),
          h("td", { class: `num workers${t.workers ? "" : " warn"}`, text: t.workers }),
          h("td", {}, sparkline(t.ended_per_minute)),
        ),
      ),
    );
  }

  count(value, cls, state, task_key, alert = false) {
    return h(
      "td",
      { class: `num ${cls}${alert ? " alert" : ""}` },
      value ? h("a", { href: runsHash({ task_key, state }), text: value }) : String(value),
    );
  }
}
