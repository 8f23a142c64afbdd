// SAU web extension: shows a SAU Scan node's verdict, ranked trigger candidates and attention heatmap on the
// node itself. Served by ComfyUI from WEB_DIRECTORY at /extensions/<pack>/js/sau_scan.js, so the app's
// modules are three levels up.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE_ID = "SAU_Scan";
const EXTENSION = "sau.scan";

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function imageUrl(img) {
  const q = new URLSearchParams({ filename: img.filename, type: img.type || "temp", subfolder: img.subfolder || "" });
  return api.apiURL(`/view?${q.toString()}`);
}

export function renderScan(container, scan, images) {
  const rows = (scan.candidates || [])
    .map((c) => `<tr><td>${c.rank}</td><td class="sau-trigger">${escapeHtml(c.text)}</td>` +
      `<td>${escapeHtml(c.placement)}</td><td>${c.score ?? ""}</td></tr>`)
    .join("");
  const heat = images && images.length
    ? `<img class="sau-heatmap" alt="SAU heatmap" src="${imageUrl(images[0])}" ` +
      `style="width:128px;height:128px;image-rendering:pixelated;display:block;margin-top:4px">`
    : "";
  const suspicious = scan.verdict === "suspicious";
  container.innerHTML =
    `<div class="sau-verdict" style="font-weight:bold;color:${suspicious ? "#e55" : "#8c8"}">` +
    `${escapeHtml(scan.verdict)} (threshold ${scan.threshold})</div>` +
    `<table class="sau-candidates" style="font-size:11px;border-collapse:collapse;width:100%">` +
    `<tr><th>#</th><th>candidate</th><th>placement</th><th>score</th></tr>${rows}</table>${heat}`;
}

app.registerExtension({
  name: EXTENSION,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_ID) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const scan = message?.sau_scan?.[0];
      if (!scan) return;
      if (!this.sauPanel) {
        const el = document.createElement("div");
        el.className = "sau-scan-panel";
        el.style.cssText = "padding:4px;overflow:auto;color:var(--fg-color,#ddd);font-family:sans-serif";
        this.sauPanel = el;
        if (this.addDOMWidget) {
          this.addDOMWidget("sau_scan", "sau_scan", el, { serialize: false, hideOnZoom: false });
        } else {
          document.body.appendChild(el);
        }
      }
      renderScan(this.sauPanel, scan, message.images);
      this.setSize?.([Math.max(this.size[0], 380), Math.max(this.size[1], 640)]);
      this.setDirtyCanvas?.(true, true);
    };
  },
});
