// One run: its fields, the state timeline and attempts from its history, the
// parameters and result previews, the error with its traceback, the logs, and
// the cancel and retry buttons.
//
// A `run` event for this run reloads the run, its history and its logs (a
// worker sends a run's last records before it reports the run ended). Logs
// have no event of their own: while a worker has the run they are fetched
// again every few seconds.

import { api } from "./api.js";
import {
  TERMINAL,
  duration,
  fill,
  h,
  secondsBetween,
  stateBadge,
  timeEl,
} from "./dom.js";
import { runsHash } from "./runs.js";
import { View } from "./view.js";

const LOG_REFRESH_MS = 3000;
const RETRYABLE = new Set(["FAILED", "CRASHED", "CANCELLED"]);
// The states in which a worker has the run and may be logging.
const LIVE = new Set(["PENDING", "RUNNING", "CANCELLING"]);

const enc = encodeURIComponent;

function section(title, ...body) {
  return h("section", { class: "panel" }, h("h2", { text: title }), ...body);
}

function pre(text, cls = "") {
  return h("pre", { class: `block ${cls}`.trim(), text });
}

export class RunView extends View {
  constructor(ctx, id) {
    super(ctx);
    this.id = id;
    this.run = null;
  }

  build(root) {
    this.head = h("div", { class: "page-head run-head" });
    this.actions = h("div", { class: "actions" });
    this.actionMessage = h("span", { class: "action-message", role: "status" });
    this.summary = h("dl", { class: "fields" });
    this.outcome = h("div", { class: "outcome", id: "run-outcome" });
    this.timeline = h("ol", { class: "timeline", id: "run-timeline" });
    this.attempts = h("tbody");
    this.params = h("div", { id: "run-parameters" });
    this.logsNote = h("p", { class: "muted", hidden: true });
    this.logs = h("tbody");
    this.logsEmpty = h("p", { class: "empty", text: "No log records." });
    const refreshLogs = h("button", { type: "button", class: "secondary small", text: "Refresh" });
    refreshLogs.addEventListener("click", () => this.loadLogs());
    const attemptsTable = h(
      "table",
      { class: "attempts", id: "run-attempts" },
      h(
        "thead",
        {},
        h("tr", {}, ["Attempt", "Started", "Ended", "Duration", "Outcome"].map((t) => h("th", { text: t }))),
      ),
      this.attempts,
    );
    const logsTable = h(
      "table",
      { class: "logs" },
      h("thead", {}, h("tr", {}, ["Time", "Level", "Attempt", "Message"].map((t) => h("th", { text: t })))),
      this.logs,
    );
    this.body = h(
      "div",
      {},
      h("div", { class: "action-bar" }, this.actions, this.actionMessage),
      h(
        "div",
        { class: "columns" },
        h(
          "div",
          { class: "col" },
          section("Run", this.summary),
          section("Parameters", this.params),
          section("State timeline", this.timeline),
          section("Attempts", attemptsTable),
        ),
        h(
          "div",
          { class: "col" },
          this.outcome,
          h(
            "section",
            { class: "panel", id: "run-logs" },
            h("div", { class: "panel-head" }, h("h2", { text: "Logs" }), refreshLogs),
            this.logsNote,
            logsTable,
            this.logsEmpty,
          ),
        ),
      ),
    );
    fill(
      root,
      h("p", { class: "crumbs" }, h("a", { href: runsHash({}), text: "← Runs" })),
      this.head,
      this.body,
    );
    this.every(LOG_REFRESH_MS, () => {
      if (this.run && LIVE.has(this.run.state)) this.loadLogs();
    });
  }

  async fetch() {
    const base = `/runs/${enc(this.id)}`;
    const [run, history] = await Promise.all([api(base), api(`${base}/history`)]);
    this.loadLogs();
    return { run, history: history.history };
  }

  failed(err) {
    if (err.status === 404) {
      fill(this.head, h("h1", { text: "No such run" }), h("p", { class: "muted", text: this.id }));
      this.body.hidden = true;
    }
  }

  async loadLogs() {
    try {
      const { logs, dropped } = await api(`/runs/${enc(this.id)}/logs`);
      if (this.alive) this.showLogs(logs, dropped);
    } catch (err) {
      if (this.alive) this.ctx.showError(`Logs: ${err.message}`);
    }
  }

  show({ run, history }) {
    this.run = run;
    this.body.hidden = false;
    this.showHead(run);
    this.showActions(run);
    this.showSummary(run);
    this.showOutcome(run);
    this.showParameters(run);
    this.showHistory(history);
  }

  apply(type, run) {
    if (type === "run" && run.id === this.id) this.loadSoon(100);
  }

  showHead(run) {
    fill(
      this.head,
      h("h1", {}, stateBadge(run.state), " ", h("span", { class: "task-title", text: run.task_key })),
      h("span", { class: "muted mono", title: "run id", text: run.name ? `${run.name} · ${run.id}` : run.id }),
    );
  }

  showActions(run) {
    const cancel = h("button", {
      type: "button",
      id: "cancel-run",
      class: "danger",
      text: "Cancel",
      disabled: TERMINAL.has(run.state) || run.state === "CANCELLING",
      title: "POST /runs/{id}/cancel",
    });
    const retry = h("button", {
      type: "button",
      id: "retry-run",
      text: "Retry",
      disabled: !RETRYABLE.has(run.state),
      title: "Back to the queue as a new attempt (FAILED, CRASHED or CANCELLED runs)",
    });
    cancel.addEventListener("click", () => this.act("cancel", cancel));
    retry.addEventListener("click", () => this.act("retry", retry));
    fill(this.actions, cancel, retry);
  }

  async act(action, button) {
    button.disabled = true;
    this.actionMessage.textContent = action === "cancel" ? "cancelling…" : "retrying…";
    this.actionMessage.className = "action-message";
    try {
      const run = await api(`/runs/${enc(this.id)}/${action}`, { method: "POST" });
      this.actionMessage.textContent =
        action === "cancel" ? `cancel sent: ${run.state}` : `back in the queue: ${run.state}`;
      this.load();
    } catch (err) {
      this.actionMessage.textContent = err.message;
      this.actionMessage.className = "action-message failed";
      this.ctx.showError(`${action === "cancel" ? "Cancel" : "Retry"} failed: ${err.message}`);
      this.load();
    }
  }

  showSummary(run) {
    const rows = [
      ["Task key", run.task_key],
      ["Task name", run.task_name],
      ["Run name", run.name],
      ["Run id", run.id],
      ["State", stateBadge(run.state)],
      ["Message", run.message],
      ["Attempt", run.attempt],
      ["Retries used", run.retries ? `${run.retry_count} of ${run.retries}` : null],
      ["Redeliveries", run.redeliveries],
      ["Created", timeEl(run.created_at)],
      ["Scheduled for", timeEl(run.scheduled_time)],
      ["Started", timeEl(run.started_at)],
      ["Finished", timeEl(run.finished_at)],
      ["Duration", run.started_at ? duration(secondsBetween(run.started_at, run.finished_at)) : null],
      ["Timeout", run.timeout_seconds === null ? null : `${run.timeout_seconds} s`],
      ["Retry delay", run.retries ? `${run.retry_delay_seconds} s` : null],
      ["Cache key", run.cache_key],
      [
        "Tags",
        run.tags?.length
          ? run.tags.map((tag) => h("a", { class: "tag", href: runsHash({ tag }), text: tag }))
          : null,
      ],
    ];
    fill(
      this.summary,
      rows
        .filter(([, value]) => value !== null && value !== undefined && value !== "")
        .map(([name, value]) => [
          h("dt", { text: name }),
          h("dd", {}, value instanceof Node || Array.isArray(value) ? value : String(value)),
        ]),
    );
  }

  showOutcome(run) {
    let body = null;
    if (run.error) {
      body = h(
        "section",
        { class: "panel error-panel", id: "run-error" },
        h("h2", { text: run.state === "CRASHED" ? "Crash" : "Error" }),
        h("p", { class: "error-line" }, h("strong", { text: run.error.type }), ": ", run.error.message),
        run.error.traceback
          ? pre(run.error.traceback, "traceback")
          : h("p", { class: "muted", text: "No traceback was recorded." }),
      );
    } else if (run.state === "COMPLETED") {
      body = section(
        "Result",
        run.result_preview !== null && run.result_preview !== undefined
          ? pre(run.result_preview, "result")
          : h("p", { class: "muted", text: "The worker sent no preview of the result." }),
      );
      body.id = "run-result";
    } else if (run.message && TERMINAL.has(run.state)) {
      body = section("Outcome", h("p", { text: run.message }));
    }
    fill(this.outcome, body);
    // The end of a traceback says what went wrong: show that end first.
    const traceback = this.outcome.querySelector("pre.traceback");
    if (traceback) traceback.scrollTop = traceback.scrollHeight;
  }

  showParameters(run) {
    fill(
      this.params,
      run.parameters_preview !== null && run.parameters_preview !== undefined
        ? pre(run.parameters_preview, "parameters")
        : h("p", { class: "muted", text: "The client sent no preview of the parameters." }),
    );
  }

  showHistory(history) {
    const started = history.length ? Date.parse(history[0].timestamp) : 0;
    fill(
      this.timeline,
      history.map((change) =>
        h(
          "li",
          { class: `step state-${change.state.toLowerCase()}`, "data-state": change.state },
          stateBadge(change.state),
          timeEl(change.timestamp, { ms: true }),
          h("span", { class: "muted", text: `+${duration((Date.parse(change.timestamp) - started) / 1000) || "0 ms"}` }),
          change.attempt ? h("span", { class: "muted", text: `attempt ${change.attempt}` }) : null,
          change.message ? h("span", { class: "step-message", text: change.message }) : null,
        ),
      ),
    );
    this.showAttempts(history);
  }

  showAttempts(history) {
    // An attempt starts with a delivery (attempt numbers count deliveries) and
    // ends with the next change that leaves the running states.
    const attempts = new Map();
    for (const change of history) {
      if (!change.attempt) continue;
      const a = attempts.get(change.attempt) ?? { number: change.attempt, start: null, end: null, outcome: null };
      if (change.state === "RUNNING" && !a.start) a.start = change.timestamp;
      if (!["PENDING", "RUNNING", "CANCELLING"].includes(change.state)) {
        a.end = change.timestamp;
        a.outcome = change;
      }
      attempts.set(change.attempt, a);
    }
    const rows = [...attempts.values()].map((a) =>
      h(
        "tr",
        {},
        h("td", { class: "num", text: a.number }),
        h("td", {}, timeEl(a.start)),
        h("td", {}, timeEl(a.end)),
        h("td", { class: "num", text: a.start ? duration(secondsBetween(a.start, a.end)) : "" }),
        h(
          "td",
          {},
          a.outcome ? stateBadge(a.outcome.state) : h("span", { class: "muted", text: "in progress" }),
          a.outcome?.message ? h("span", { class: "muted", text: ` ${a.outcome.message}` }) : null,
        ),
      ),
    );
    fill(this.attempts, rows.length ? rows : h("tr", {}, h("td", { colspan: 5, class: "muted", text: "Not delivered yet." })));
  }

  showLogs(logs, dropped) {
    fill(
      this.logs,
      logs.map((record) =>
        h(
          "tr",
          { class: `level-${record.level.toLowerCase()}` },
          h("td", { class: "nowrap" }, timeEl(record.timestamp, { ms: true, timeOnly: true })),
          h("td", {}, h("span", { class: `level level-${record.level.toLowerCase()}`, text: record.level })),
          h("td", { class: "num", text: record.attempt }),
          h("td", { title: `logger: ${record.logger}` }, h("pre", { class: "log-message", text: record.message })),
        ),
      ),
    );
    this.logsEmpty.hidden = logs.length > 0;
    this.logsNote.hidden = !dropped;
    this.logsNote.textContent = `The server kept the first records only: ${dropped} later record${dropped === 1 ? " was" : "s were"} dropped.`;
  }
}
