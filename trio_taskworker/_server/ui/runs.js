// The runs page: a filtered page of GET /runs (newest first), kept current by
// the `run` events the server pushes. The table is never polled.

import { api, withQuery } from "./api.js";
import {
  STATES,
  duration,
  fill,
  h,
  secondsBetween,
  shortId,
  stateBadge,
  timeEl,
} from "./dom.js";
import { View } from "./view.js";

const PAGE_SIZES = [25, 50, 100, 200];
const DEFAULT_LIMIT = 50;

function readFilters(params) {
  const limit = Number.parseInt(params.get("limit") ?? "", 10);
  const offset = Number.parseInt(params.get("offset") ?? "", 10);
  return {
    state: STATES.includes(params.get("state")) ? params.get("state") : "",
    task_key: params.get("task_key") ?? "",
    tag: params.get("tag") ?? "",
    limit: PAGE_SIZES.includes(limit) ? limit : DEFAULT_LIMIT,
    offset: Number.isFinite(offset) && offset > 0 ? offset : 0,
  };
}

/** The hash of the runs page with these filters (defaults left out). */
export function runsHash(filters) {
  const shown = { ...filters };
  if (shown.limit === DEFAULT_LIMIT) delete shown.limit;
  if (!shown.offset) delete shown.offset;
  return `#${withQuery("/runs", shown)}`;
}

// Timestamps as numbers: ISO strings only compare as text when they have the
// same number of fractional digits.
const created = (run) => Date.parse(run.created_at);
const byNewest = (a, b) => created(b) - created(a);

export class RunsView extends View {
  constructor(ctx, params) {
    super(ctx);
    this.filters = readFilters(params);
    this.runs = [];
    this.newAbove = new Set();
  }

  matches(run) {
    const f = this.filters;
    return (
      (!f.state || run.state === f.state) &&
      (!f.task_key || run.task_key === f.task_key) &&
      (!f.tag || (run.tags ?? []).includes(f.tag))
    );
  }

  build(root) {
    const f = this.filters;
    const stateSelect = h(
      "select",
      { name: "state", id: "filter-state" },
      h("option", { value: "", text: "any state" }),
      STATES.map((s) => h("option", { value: s, text: s, selected: s === f.state })),
    );
    const limitSelect = h(
      "select",
      { name: "limit", id: "filter-limit" },
      PAGE_SIZES.map((n) => h("option", { value: n, text: `${n} a page`, selected: n === f.limit })),
    );
    this.taskKeys = h("datalist", { id: "task-key-list" });
    const form = h(
      "form",
      { class: "filters", id: "run-filters" },
      h("label", {}, "State ", stateSelect),
      h(
        "label",
        {},
        "Task ",
        h("input", {
          name: "task_key",
          id: "filter-task",
          list: "task-key-list",
          value: f.task_key,
          placeholder: "task key",
          spellcheck: "false",
        }),
      ),
      h(
        "label",
        {},
        "Tag ",
        h("input", { name: "tag", id: "filter-tag", value: f.tag, placeholder: "tag", spellcheck: "false" }),
      ),
      limitSelect,
      h("button", { type: "submit", text: "Filter" }),
      f.state || f.task_key || f.tag
        ? h("a", { href: runsHash({ limit: f.limit }), class: "clear", text: "clear filters" })
        : null,
      this.taskKeys,
    );
    const apply = (event) => {
      event?.preventDefault();
      const data = new FormData(form);
      this.ctx.navigate(
        runsHash({
          state: data.get("state"),
          task_key: data.get("task_key").trim(),
          tag: data.get("tag").trim(),
          limit: Number(data.get("limit")),
          offset: 0,
        }),
      );
    };
    form.addEventListener("submit", apply);
    stateSelect.addEventListener("change", apply);
    limitSelect.addEventListener("change", apply);

    this.newNote = h("button", { type: "button", class: "new-note", hidden: true });
    this.newNote.addEventListener("click", () => this.ctx.navigate(runsHash({ ...this.filters, offset: 0 })));
    this.summary = h("span", { class: "muted" });
    this.newer = h("button", { type: "button", class: "secondary", text: "← Newer", disabled: true });
    this.older = h("button", { type: "button", class: "secondary", text: "Older →", disabled: true });
    this.newer.addEventListener("click", () =>
      this.ctx.navigate(runsHash({ ...f, offset: Math.max(0, f.offset - f.limit) })),
    );
    this.older.addEventListener("click", () => this.ctx.navigate(runsHash({ ...f, offset: f.offset + f.limit })));

    this.tbody = h("tbody");
    this.empty = h("p", { class: "empty", hidden: true, text: "No runs match." });
    fill(
      root,
      h("div", { class: "page-head" }, h("h1", { text: "Runs" }), h("span", { class: "muted", text: "newest first" })),
      form,
      h("div", { class: "pager" }, this.summary, this.newNote, h("span", { class: "spacer" }), this.newer, this.older),
      h(
        "table",
        { class: "runs", id: "runs-table" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ["State", "Task", "Run", "Attempt", "Created", "Started", "Duration", "Tags"].map((t) =>
              h("th", { text: t }),
            ),
          ),
        ),
        this.tbody,
      ),
      this.empty,
    );
    // A running run's duration grows; only those cells change.
    this.every(1000, () => this.tickDurations());
    this.loadTaskKeys();
  }

  async loadTaskKeys() {
    try {
      const { tasks } = await api("/tasks");
      fill(this.taskKeys, tasks.map((t) => h("option", { value: t.task_key })));
    } catch {
      // Only suggestions for the filter; the runs themselves show their own errors.
    }
  }

  fetch() {
    return api(withQuery("/runs", this.filters));
  }

  show({ runs }) {
    this.runs = runs;
    this.newAbove.clear();
    this.render();
  }

  render() {
    const f = this.filters;
    fill(
      this.tbody,
      this.runs.map((run) => this.row(run)),
    );
    this.empty.hidden = this.runs.length > 0;
    this.summary.textContent = this.runs.length
      ? `runs ${f.offset + 1}–${f.offset + this.runs.length}`
      : f.offset
        ? "no runs on this page"
        : "";
    this.newer.disabled = f.offset === 0;
    this.older.disabled = this.runs.length < f.limit;
    const count = this.newAbove.size;
    this.newNote.hidden = count === 0;
    this.newNote.textContent = `${count} newer run${count === 1 ? "" : "s"}: show`;
  }

  row(run) {
    const href = `#/runs/${encodeURIComponent(run.id)}`;
    const tr = h(
      "tr",
      { "data-run-id": run.id, "data-state": run.state, class: this.matches(run) ? "" : "unmatched" },
      h("td", {}, stateBadge(run.state)),
      h(
        "td",
        { class: "task" },
        h("a", {
          href: runsHash({ ...this.filters, task_key: run.task_key, offset: 0 }),
          class: "task-key",
          title: "Only this task",
          text: run.task_key,
        }),
      ),
      h(
        "td",
        { class: "run-id" },
        h("a", { href, class: "run-link", title: run.id, text: run.name || shortId(run.id) }),
      ),
      h("td", { class: "num", text: run.attempt }),
      h("td", {}, timeEl(run.created_at)),
      h("td", {}, timeEl(run.started_at)),
      h("td", { class: "num duration", text: this.durationText(run) }),
      h(
        "td",
        { class: "tags" },
        (run.tags ?? []).map((tag) =>
          h("a", { class: "tag", href: runsHash({ ...this.filters, tag, offset: 0 }), text: tag }),
        ),
      ),
    );
    tr.run = run;
    return tr;
  }

  durationText(run) {
    if (!run.started_at) return "";
    return duration(secondsBetween(run.started_at, run.finished_at));
  }

  tickDurations() {
    for (const tr of this.tbody.children) {
      const run = tr.run;
      if (run?.started_at && !run.finished_at) {
        tr.querySelector(".duration").textContent = this.durationText(run);
      }
    }
  }

  apply(type, run) {
    if (type !== "run") return;
    const at = this.runs.findIndex((r) => r.id === run.id);
    if (at >= 0) {
      this.runs[at] = run;
      this.tbody.children[at]?.replaceWith(this.row(run));
      return;
    }
    if (!this.matches(run)) return;
    const f = this.filters;
    const newest = this.runs[0];
    const oldest = this.runs[this.runs.length - 1];
    if (f.offset > 0) {
      // Pages after the first keep their rows; say that newer ones exist.
      if (newest && created(run) > created(newest) && !this.newAbove.has(run.id)) {
        this.newAbove.add(run.id);
        this.render();
      }
      return;
    }
    if (this.runs.length >= f.limit && oldest && created(run) < created(oldest)) return;
    this.runs.push(run);
    this.runs.sort(byNewest);
    this.runs.length = Math.min(this.runs.length, f.limit);
    this.render();
  }
}
