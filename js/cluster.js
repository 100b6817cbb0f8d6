// ComfyUI Cluster: a "Queue Cluster" button that sends the current workflow to every rank.
// Prompts that use cluster nodes are distributed automatically by the ordinary Queue button too;
// this button forces it (POST /cluster/queue on the leader) and shows the cluster's state.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

async function queueCluster() {
  const { output } = await app.graphToPrompt();
  const res = await api.fetchApi("/cluster/queue", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ prompt: output, client_id: api.clientId }),
  });
  const body = await res.json();
  if (!res.ok) {
    const detail = typeof body.error === "string" ? body.error : JSON.stringify(body.error);
    alert(`Queue Cluster failed: ${detail}`);
  }
  return body;
}

async function clusterStatus() {
  const res = await api.fetchApi("/cluster/status");
  return res.ok ? res.json() : null;
}

app.registerExtension({
  name: "ComfyUI.Cluster",
  async setup() {
    const button = document.createElement("button");
    button.textContent = "Queue Cluster";
    button.title = "Queue this workflow on every rank of the cluster";
    button.style.cssText = "margin: 4px; padding: 4px 10px; cursor: pointer;";
    button.onclick = () => queueCluster().catch((err) => alert(`Queue Cluster failed: ${err}`));
    const menu = document.querySelector(".comfyui-menu-right") || document.querySelector(".comfy-menu");
    (menu || document.body).appendChild(button);
    const status = await clusterStatus();
    if (status) {
      button.title = `rank ${status.rank} of ${status.size}, world ${status.epoch}, ${status.state}`;
    }
  },
});
