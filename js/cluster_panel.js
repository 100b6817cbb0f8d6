// ComfyUI Cluster: the cluster panel (a sidebar tab) and the follower banner, as plain DOM.
// It renders whatever view the server last pushed (cluster.status over ComfyUI's websocket);
// it never asks the server by itself. ComfyUI also loads this file as an extension module: it
// only exports functions, so loading it twice does nothing.

const STATE_COLORS = {
  starting: "#6b7280",
  idle: "#16a34a",
  executing: "#2563eb",
  unreachable: "#d97706",
  lost: "#dc2626",
};

const CSS = `
.cluster-panel { padding: 8px 10px; font-size: 12px; display: flex; flex-direction: column; gap: 8px; }
.cluster-panel h3 { margin: 0; font-size: 14px; }
.cluster-panel .cluster-summary { opacity: 0.8; }
.cluster-panel .cluster-controls { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; }
.cluster-panel button { cursor: pointer; padding: 3px 8px; border-radius: 4px;
  border: 1px solid var(--border-color, #555); background: var(--comfy-input-bg, #333);
  color: var(--input-text, #ddd); }
.cluster-panel input { width: 7em; padding: 2px 4px; background: var(--comfy-input-bg, #333);
  color: var(--input-text, #ddd); border: 1px solid var(--border-color, #555); }
.cluster-panel .cluster-rank { border: 1px solid var(--border-color, #444); border-radius: 6px;
  padding: 6px 8px; display: grid; grid-template-columns: max-content 1fr; gap: 2px 10px; }
.cluster-panel .cluster-rank-head { grid-column: 1 / 3; display: flex; gap: 8px; align-items: center; }
.cluster-panel .cluster-state { padding: 1px 8px; border-radius: 10px; color: white; font-weight: 600; }
.cluster-panel .cluster-key { opacity: 0.7; }
.cluster-panel .cluster-rank[data-state="lost"] .cluster-value,
.cluster-panel .cluster-rank[data-state="unreachable"] .cluster-value { opacity: 0.45; }
.cluster-panel .cluster-error { grid-column: 1 / 3; color: #f87171; white-space: pre-wrap; }
.cluster-panel .cluster-fix { grid-column: 1 / 3; color: #fbbf24; }
.cluster-banner { position: fixed; left: 50%; bottom: 12px; transform: translateX(-50%);
  z-index: 10000; background: #1e3a8a; color: white; padding: 6px 14px; border-radius: 6px;
  font-size: 13px; box-shadow: 0 2px 8px rgba(0,0,0,.4); }
.cluster-banner a { color: #bfdbfe; }
`;

export function installStyles() {
  if (document.getElementById("cluster-panel-css")) return;
  const style = document.createElement("style");
  style.id = "cluster-panel-css";
  style.textContent = CSS;
  document.head.appendChild(style);
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k === "style") node.style.cssText = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node[k] = v;
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

export function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function progressText(p) {
  if (!p) return "–";
  const pid = p.prompt_id ? String(p.prompt_id).slice(0, 8) : "?";
  const step = p.max ? ` ${p.value}/${p.max}` : "";
  return `${pid}${p.node ? ` node ${p.node}` : ""}${step}`;
}

// The controls this rank has handled: the panel's only proof that a follower got them.
function commandsText(c) {
  if (!c) return "–";
  return Object.entries(c).map(([action, n]) => `${action} ${n}`).join(" · ");
}

function rankCard(row, leaderRank) {
  const color = STATE_COLORS[row.state] ?? "#6b7280";
  const age = row.heartbeat_age_s == null ? "never" : `${row.heartbeat_age_s.toFixed(1)} s ago`;
  const rates = row.rates ? `in ${bytes(row.rates.in)}/s, out ${bytes(row.rates.out)}/s` : "–";
  const memory = row.mem_free == null ? "–" : `${bytes(row.mem_free)} free of ${bytes(row.mem_total)}`;
  const pairs = [
    ["address", row.url ?? "–"],
    ["backend", `${row.backend ?? "–"}${row.path ? ` · ${row.path}` : ""}`],
    ["link", row.link ?? "–"],
    ["heartbeat", age],
    ["device", row.device ?? "–"],
    ["memory", memory],
    ["queue", row.queue ?? "–"],
    ["progress", progressText(row.progress)],
    ["transfer", rates],
    ["commands", commandsText(row.commands)],
  ];
  const card = el(
    "div",
    { className: "cluster-rank", dataset: { rank: row.rank, state: row.state } },
    el(
      "div",
      { className: "cluster-rank-head" },
      el("b", {}, `rank ${row.rank}${row.rank === leaderRank ? " (leader)" : ""}`),
      el("span", { className: "cluster-state", style: `background:${color}` }, row.state),
    ),
  );
  for (const [k, v] of pairs) {
    card.append(el("span", { className: "cluster-key" }, k), el("span", { className: `cluster-value cluster-${k}`, title: stale(row) }, String(v)));
  }
  if (row.error) {
    const when = row.error_age_s == null ? "" : ` (${row.error_age_s.toFixed(0)} s ago)`;
    card.append(el("div", { className: "cluster-error" }, `last error${when}: ${row.error}`));
    if (row.fix) card.append(el("div", { className: "cluster-fix" }, `fix: ${row.fix}`));
  }
  return card;
}

function stale(row) {
  return row.state === "lost" || row.state === "unreachable" ? "as of its last report" : "";
}

// actions: { queue(), interrupt(), free(), getWeights(), setWeights(value) }
// A status push comes every heartbeat, and each redraws the panel. The panel element and the
// leader's controls (buttons, the weights input) are made once per root and stay in the page
// across redraws: an input that was replaced lost the user's half-typed weights, the caret and
// the focus, and the Enter that followed went to a fresh input with nothing to change.
export function renderPanel(root, view, actions) {
  let panel = root.__clusterPanel;
  if (!panel || panel.parentNode !== root) {
    panel = el("div", { className: "cluster-panel", dataset: { testid: "cluster-panel" } });
    root.replaceChildren(panel);
    root.__clusterPanel = panel;
  }
  const head = [];
  const tail = [];
  let controls = null;
  if (!view) {
    head.push(el("div", {}, "Waiting for the cluster's status…"));
  } else if (view.size <= 1) {
    head.push(el("h3", {}, "Cluster"), el("div", {}, "This ComfyUI is a single instance (no cluster)."));
  } else {
    head.push(
      el("h3", {}, `Cluster · ${view.size} ranks`),
      el(
        "div",
        { className: "cluster-summary" },
        `world ${view.epoch} · ${view.state} · this is rank ${view.rank}` +
          ` · heartbeat ${view.heartbeat_s} s, lost after ${view.heartbeat_timeout_s} s`,
      ),
    );
    if (view.is_leader) controls = leaderControls(root, view, actions);
    else tail.push(followerNotice(view));
    if (view.leader_error) tail.push(el("div", { className: "cluster-error" }, view.leader_error));
    for (const row of view.rows ?? []) tail.push(rankCard(row, 0));
  }
  // Everything but the controls goes; they never leave the page (leaving would blur the input).
  for (const child of [...panel.children]) if (child !== controls) child.remove();
  if (controls && controls.parentNode === panel) {
    controls.before(...head);
    controls.after(...tail);
  } else {
    panel.append(...head, ...(controls ? [controls] : []), ...tail);
  }
}

function leaderControls(root, view, actions) {
  let controls = root.__clusterControls;
  if (!controls) {
    const weights = el("input", {
      title: "Per-rank fan-out weights for the next prompt, e.g. 3,1 (empty: equal, or COMFY_CLUSTER_WEIGHTS)",
      dataset: { testid: "cluster-weights" },
      onchange: (e) => actions.setWeights(e.target.value.trim()),
    });
    controls = el(
      "div",
      { className: "cluster-controls" },
      el("button", { dataset: { testid: "cluster-queue" }, onclick: () => actions.queue() }, "Queue Cluster"),
      el("button", { dataset: { testid: "cluster-interrupt" }, onclick: () => actions.interrupt() }, "Interrupt all"),
      el("button", { dataset: { testid: "cluster-free" }, onclick: () => actions.free() }, "Free memory"),
      el("label", {}, "weights ", weights),
    );
    controls.__weights = weights;
    root.__clusterControls = controls;
  }
  const weights = controls.__weights;
  weights.placeholder = view.weights_env || "equal";
  // The setting may have changed elsewhere (the settings dialog); not under the user's hands.
  if (document.activeElement !== weights) weights.value = actions.getWeights();
  return controls;
}

function followerNotice(view) {
  return el(
    "div",
    {},
    `Follower rank ${view.rank}: the cluster is driven by the leader at `,
    el("a", { href: view.leader_url ?? "#", target: "_blank" }, view.leader_url ?? "(unknown)"),
    ". This UI still runs workflows on this rank alone.",
  );
}

export function showFollowerBanner(view) {
  if (!view || view.is_leader || view.size <= 1) return;
  let banner = document.getElementById("cluster-follower-banner");
  if (!banner) {
    banner = el("div", { id: "cluster-follower-banner", className: "cluster-banner" });
    document.body.append(banner);
  }
  banner.replaceChildren(
    `Cluster follower · rank ${view.rank} of ${view.size} · leader: `,
    el("a", { href: view.leader_url ?? "#", target: "_blank" }, view.leader_url ?? "(unknown)"),
  );
}
