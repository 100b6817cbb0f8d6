// ComfyUI Cluster in the browser, through the frontend's own extension points:
// - the "Queue Cluster" command: a button in the action bar (next to Run), an entry in the menu
//   (Cluster), and Alt+Enter; it sends the workflow to every rank (POST /cluster/queue on the
//   leader). Prompts with cluster nodes are distributed by the ordinary Run button too.
// - a "Cluster" sidebar tab: every rank's state, live from the websocket events the pack pushes
//   (cluster.status, cluster.transition); one GET /cluster/panel when the page loads.
// - the per-rank fan-out weights, a ComfyUI user setting sent with every prompt.
// Errors and rank changes show as ComfyUI toasts. Followers show a banner naming the leader.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { installStyles, renderPanel, showFollowerBanner } from "./cluster_panel.js";

const WEIGHTS_SETTING = "Cluster.Weights";
const QUEUE_TOOLTIP = "Queue this workflow on every rank of the cluster (Alt+Enter)";

let view = null; // the last cluster.status the server pushed
const listeners = new Set();

function setView(next) {
  view = next;
  showFollowerBanner(view);
  for (const listener of listeners) listener(view);
}

function toast(severity, summary, detail, life = 6000) {
  const toasts = app.extensionManager?.toast;
  if (toasts) toasts.add({ severity, summary, detail, life });
  else console.warn(`[cluster] ${summary}: ${detail}`);
}

function getWeights() {
  return String(app.extensionManager?.setting?.get(WEIGHTS_SETTING) ?? "").trim();
}

async function setWeights(value) {
  await app.extensionManager.setting.set(WEIGHTS_SETTING, value);
  toast("info", "Cluster weights", value ? `next prompts split ${value}` : "equal split", 3000);
}

function describe(body) {
  const err = body?.error;
  const text = typeof err === "string" ? err : err?.message ?? JSON.stringify(err ?? body);
  const nodes = Object.entries(body?.node_errors ?? {}).map(
    ([id, e]) => `node ${id} (${e.class_type}): ${(e.errors ?? []).map((x) => x.details || x.message).join("; ")}`,
  );
  return [text, ...nodes].join("\n");
}

async function postJson(route, payload) {
  const res = await api.fetchApi(route, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(payload ?? {}),
  });
  const body = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  return { ok: res.ok, body };
}

function leaderOnly(what) {
  if (view && !view.is_leader && view.size > 1) {
    toast("warn", what, `rank ${view.rank} is a follower: use the leader at ${view.leader_url}`);
    return false;
  }
  return true;
}

async function queueCluster() {
  if (!leaderOnly("Queue Cluster")) return null;
  try {
    const { output, workflow } = await app.graphToPrompt();
    const extra_data = { extra_pnginfo: { workflow } };
    const weights = getWeights();
    if (weights) extra_data.cluster_weights = weights;
    const { ok, body } = await postJson("/cluster/queue", { prompt: output, client_id: api.clientId, extra_data });
    if (!ok) {
      toast("error", "Queue Cluster failed", describe(body), 15000);
      return null;
    }
    toast("success", "Queued on the cluster", `prompt ${body.prompt_id}`, 3000);
    return body;
  } catch (err) {
    toast("error", "Queue Cluster failed", String(err), 15000);
    return null;
  }
}

async function everywhere(route, what) {
  if (!leaderOnly(what)) return;
  try {
    const { ok, body } = await postJson(route);
    // A follower that refused or did not answer did not do it: say so, rank by rank.
    const failed = Object.entries(body?.failed ?? {}).map(([rank, why]) => `rank ${rank}: ${why}`);
    const sent = `sent to rank(s) ${body?.sent_to?.join(", ") || "none"}`;
    if (ok && failed.length) toast("error", `${what}: not on every rank`, [`${body.done}; ${sent}`, ...failed].join("\n"), 15000);
    else if (ok) toast("success", what, `${body.done}; ${sent}`, 4000);
    else toast("error", `${what} failed`, describe(body), 10000);
  } catch (err) {
    toast("error", `${what} failed`, String(err), 10000);
  }
}

const actions = {
  queue: queueCluster,
  interrupt: () => everywhere("/cluster/interrupt", "Interrupt cluster"),
  free: () => everywhere("/cluster/free", "Free memory on all ranks"),
  getWeights,
  setWeights,
};

function onTransition(change) {
  if (change.new === "lost" || change.new === "unreachable") {
    const detail = change.error ? `${change.error}\nfix: ${change.fix}` : `rank ${change.rank} stopped reporting`;
    toast(change.new === "lost" ? "error" : "warn", `Cluster rank ${change.rank} ${change.new}`, detail, 10000);
  } else if (change.new === "restarted") {
    toast("info", `Cluster rank ${change.rank} restarted`, change.fix, 6000);
  } else if (change.old === "lost" || change.old === "unreachable") {
    toast("success", `Cluster rank ${change.rank} is back`, `now ${change.new}`, 5000);
  }
}

// The weights travel with every prompt, also the ones the ordinary Run button queues: the
// frontend builds that request itself, so the setting is added on its way out.
const fetchApi = api.fetchApi.bind(api);
api.fetchApi = (route, options) => {
  const weights = route === "/prompt" && options?.method === "POST" ? getWeights() : "";
  if (weights && typeof options.body === "string") {
    try {
      const body = JSON.parse(options.body);
      body.extra_data = { ...(body.extra_data ?? {}), cluster_weights: weights };
      options = { ...options, body: JSON.stringify(body) };
    } catch {
      // not JSON: not ours to change
    }
  }
  return fetchApi(route, options);
};

// Registered when the module loads, before the frontend opens its websocket: the server pushes
// from its first beat, and the frontend drops (and reports) event types nobody listens to.
api.addEventListener("cluster.status", (e) => setView(e.detail));
api.addEventListener("cluster.transition", (e) => onTransition(e.detail));

let unsubscribe = null;

app.registerExtension({
  name: "ComfyUI.Cluster",
  commands: [
    { id: "Cluster.Queue", label: "Queue Cluster", icon: "pi pi-sitemap", tooltip: QUEUE_TOOLTIP, function: queueCluster },
    { id: "Cluster.Interrupt", label: "Interrupt Cluster", icon: "pi pi-stop-circle", function: actions.interrupt },
    { id: "Cluster.FreeMemory", label: "Free Memory on All Ranks", icon: "pi pi-eraser", function: actions.free },
  ],
  keybindings: [{ combo: { key: "Enter", alt: true }, commandId: "Cluster.Queue" }],
  menuCommands: [{ path: ["Cluster"], commands: ["Cluster.Queue", "Cluster.Interrupt", "Cluster.FreeMemory"] }],
  actionBarButtons: [
    { icon: "pi pi-sitemap", label: "Queue Cluster", tooltip: QUEUE_TOOLTIP, class: "cluster-queue-button", onClick: queueCluster },
  ],
  settings: [
    {
      id: WEIGHTS_SETTING,
      category: ["Cluster", "Fan-out", "Weights"],
      name: "Per-rank fan-out weights (e.g. 3,1; empty: equal, or COMFY_CLUSTER_WEIGHTS)",
      tooltip: "Sent with every prompt; fills the weights input of fan-out nodes that leave it empty",
      type: "text",
      defaultValue: "",
    },
  ],
  async setup() {
    installStyles();
    app.extensionManager.registerSidebarTab({
      id: "cluster",
      icon: "pi pi-sitemap",
      title: "Cluster",
      tooltip: "ComfyUI Cluster: ranks and controls",
      type: "custom",
      render: (root) => {
        const draw = (v) => renderPanel(root, v, actions);
        unsubscribe?.();
        listeners.add(draw);
        unsubscribe = () => listeners.delete(draw);
        draw(view);
      },
      destroy: () => {
        unsubscribe?.();
        unsubscribe = null;
      },
    });
    try {
      const res = await api.fetchApi("/cluster/panel");
      if (res.ok) setView(await res.json());
    } catch (err) {
      toast("error", "Cluster status unavailable", String(err));
    }
  },
});
