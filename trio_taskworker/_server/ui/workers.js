// The workers page: GET /workers, loaded again when a worker connects or
// leaves (the `workers` event) and when runs change (in-flight counts), and
// every 15 s for the last-seen times.

import { api } from "./api.js";
import { duration, fill, h, secondsBetween, timeEl } from "./dom.js";
import { runsHash } from "./runs.js";
import { View } from "./view.js";

export class WorkersView extends View {
  build(root) {
    this.count = h("span", { class: "muted" });
    this.tbody = h("tbody");
    this.empty = h("p", { class: "empty", hidden: true, text: "No worker is connected." });
    fill(
      root,
      h("div", { class: "page-head" }, h("h1", { text: "Workers" }), this.count),
      h(
        "table",
        { class: "workers", id: "workers-table" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            h("th", { text: "Worker" }),
            h("th", { text: "Task keys" }),
            h("th", { class: "num", text: "In flight" }),
            h("th", { class: "num", text: "Limit" }),
            h("th", { text: "Connected" }),
            h("th", { text: "Last seen" }),
            h("th", { text: "Status" }),
          ),
        ),
        this.tbody,
      ),
      this.empty,
    );
    this.every(15000, () => this.load());
  }

  fetch() {
    return api("/workers");
  }

  apply(type) {
    if (type === "workers") this.loadSoon(100);
    else if (type === "run") this.loadSoon(1000);
  }

  show({ workers }) {
    this.count.textContent = `${workers.length} connected`;
    this.empty.hidden = workers.length > 0;
    fill(
      this.tbody,
      workers.map((w) =>
        h(
          "tr",
          { "data-connection-id": w.connection_id },
          h(
            "td",
            {},
            h("div", { class: "mono", text: w.client_id }),
            h("div", { class: "muted small", title: "connection id", text: w.connection_id }),
          ),
          h(
            "td",
            { class: "keys" },
            w.task_keys.map((key) =>
              h("a", { class: "task-key chip", href: runsHash({ task_key: key }), text: key }),
            ),
          ),
          h("td", { class: "num in-flight", text: w.in_flight }),
          h("td", { class: "num limit", text: w.limit }),
          h("td", {}, timeEl(w.connected_at)),
          h(
            "td",
            {},
            timeEl(w.last_seen),
            h("span", { class: "muted", text: ` (${duration(secondsBetween(w.last_seen))} ago)` }),
          ),
          h("td", {}, w.draining ? h("span", { class: "badge state-cancelling", text: "draining" }) : "serving"),
        ),
      ),
    );
  }
}
