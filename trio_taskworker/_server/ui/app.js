// The dashboard's entry point: hash routes, the error bar, the API key form and
// the live connection that feeds the page on show.
//
// Routes: #/runs?state=&task_key=&tag=&limit=&offset=   the runs, newest first
//         #/runs/<id>                                    one run
//         #/tasks                                        per task key
//         #/workers                                      connected workers

import { forgetKey, onKeyChange, onKeyNeeded, storedKey } from "./api.js";
import { fill, h } from "./dom.js";
import { LiveEvents } from "./live.js";
import { RunView } from "./run.js";
import { RunsView } from "./runs.js";
import { TasksView } from "./tasks.js";
import { WorkersView } from "./workers.js";

const $ = (id) => document.getElementById(id);

// --- errors: shown on the page, not only in the console --------------------------

const shownErrors = new Map();

/** Show `message` in the error bar until dismissed or the page changes (once per text). */
export function showError(message) {
  if (shownErrors.has(message)) return;
  const close = h("button", { type: "button", class: "close", title: "Dismiss", text: "×" });
  const item = h("div", { class: "error" }, h("span", { class: "error-text", text: message }), close);
  close.addEventListener("click", () => {
    item.remove();
    shownErrors.delete(message);
  });
  shownErrors.set(message, item);
  $("errors").append(item);
}

function clearErrors() {
  shownErrors.clear();
  fill($("errors"));
}

// --- the API key form -------------------------------------------------------------

const KEY_HELP = $("key-message").textContent;

onKeyNeeded(
  ({ refused }) =>
    new Promise((resolve) => {
      const panel = $("key-panel");
      const form = $("key-form");
      const input = $("key-input");
      const message = $("key-message");
      message.classList.toggle("refused", refused);
      message.textContent = refused ? "The server refused that key. Try another." : KEY_HELP;
      panel.hidden = false;
      input.value = "";
      input.focus();
      form.onsubmit = (event) => {
        event.preventDefault();
        const key = input.value.trim();
        if (!key) return;
        panel.hidden = true;
        form.onsubmit = null;
        resolve(key);
      };
    }),
);

function showKeyButton(key) {
  $("forget-key").hidden = !key;
}

$("forget-key").addEventListener("click", () => {
  forgetKey();
  route();
});
onKeyChange(showKeyButton);
showKeyButton(storedKey());

// --- routing ------------------------------------------------------------------------

let current = null;
const context = { showError, clearErrors, navigate: (hash) => (window.location.hash = hash) };

function parseHash() {
  const hash = window.location.hash.replace(/^#/, "") || "/runs";
  const [path, query = ""] = hash.split("?", 2);
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, params: new URLSearchParams(query) };
}

function route() {
  const { parts, params } = parseHash();
  let view;
  let page = parts[0];
  if (page === "runs" && parts.length === 2) view = new RunView(context, parts[1]);
  else if (page === "tasks") view = new TasksView(context);
  else if (page === "workers") view = new WorkersView(context);
  else {
    page = "runs";
    view = new RunsView(context, params);
  }
  current?.unmount();
  clearErrors();
  for (const link of document.querySelectorAll("nav.tabs a")) {
    link.classList.toggle("active", link.dataset.page === page);
  }
  current = view;
  const main = $("view");
  fill(main);
  view.mount(main);
  window.scrollTo(0, 0);
}

window.addEventListener("hashchange", route);

// --- live updates -------------------------------------------------------------------

const live = new LiveEvents({
  onEvent(type, data) {
    if (type === "ready" || type === "reset") {
      // The first ready, a reconnect, or a stream that fell behind: whatever
      // happened meanwhile is only in the server's current state.
      current?.refresh();
    } else {
      current?.onEvent(type, data);
    }
  },
  onStatus(status, text) {
    const badge = $("live");
    badge.className = `live live-${status}`;
    badge.textContent = text;
  },
  onError: showError,
});

route();
live.start();
