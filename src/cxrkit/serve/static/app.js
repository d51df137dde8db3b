// The page of `cxr serve`: upload an X-ray, show the prediction, its probabilities and the Grad-CAM heatmap.
// No external assets: everything comes from this server.
"use strict";

const $ = (id) => document.getElementById(id);
let apiKey = sessionStorage.getItem("cxr-api-key") || "";
let heatmaps = true;  // the service's /v1/model says whether it offers them (`cxr serve --no-heatmaps`)

function headers() {
  return apiKey ? { "X-API-Key": apiKey } : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModel() {
  const response = await fetch("/v1/model", { headers: headers() });
  if (response.status === 401) {
    $("key-box").hidden = false;
    $("model-line").textContent = "This service needs an API key.";
    return;
  }
  const info = await response.json();
  if (!response.ok) {
    $("model-line").textContent = info.error || "the model description is unavailable";
    return;
  }
  $("key-box").hidden = true;
  heatmaps = info.heatmaps !== false;
  const m = info.model;
  $("model-line").textContent =
    `${m.backbone}, run ${m.run} (${m.checkpoint}), labels: ${info.labels.join(", ")}`;
}

function bar(name, p, threshold, top) {
  const row = document.createElement("div");
  row.className = "bar" + (top ? " top" : "");
  const text = document.createElement("div");
  text.textContent = `${name}: ${(100 * p).toFixed(1)}%`;
  const track = document.createElement("div");
  track.className = "track";
  const fill = document.createElement("div");
  fill.className = "fill";
  fill.style.width = `${(100 * p).toFixed(2)}%`;
  track.appendChild(fill);
  if (threshold !== null && threshold !== undefined) {
    const mark = document.createElement("div");
    mark.className = "mark";
    mark.style.left = `${(100 * threshold).toFixed(2)}%`;
    mark.title = `threshold ${threshold.toFixed(3)}`;
    track.appendChild(mark);
  }
  row.append(text, track);
  return row;
}

// A multi-label image with no label at or over the threshold has the label "" (no label is called that).
function labelText(result) {
  return result.label === "" ? `no label at p \u2265 ${result.threshold}` : result.label.replaceAll("|", ", ");
}

function show(result) {
  const t = result.threshold;
  $("label").textContent = labelText(result);
  $("threshold-line").textContent = t === null ? "most probable class" :
    `operating threshold ${t.toFixed(3)}: ${result.exceeded ? "exceeded" : "not exceeded"}`;
  const bars = $("bars");
  bars.replaceChildren();
  const best = Math.max(...Object.values(result.probabilities));
  for (const [name, p] of Object.entries(result.probabilities)) {
    bars.appendChild(bar(name, p, t, p === best));
  }
  const m = result.model;
  $("model-id").textContent = `${m.backbone} · ${m.run} · weights ${m.weights_sha256.slice(0, 12)} · ${m.engine}`;
  $("timing").textContent = `${result.timing_ms.request.toFixed(0)} ms on the server`;
  $("picture").hidden = !result.heatmap;
  if (result.heatmap) {
    $("image").src = "data:image/png;base64," + result.heatmap.image_png;
    $("map").src = "data:image/png;base64," + result.heatmap.map_png;
    $("cam-line").textContent =
      `${result.heatmap.method} of ${result.heatmap.class} at ${result.heatmap.layer}`;
  }
  $("result").hidden = false;
}

async function predict(file) {
  setStatus(`predicting ${file.name}...`);
  const body = new FormData();
  body.append("file", file, file.name);
  try {
    const url = heatmaps ? "/v1/predict?heatmap=true" : "/v1/predict";
    const response = await fetch(url, { method: "POST", body, headers: headers() });
    const result = await response.json();
    if (!response.ok) {
      setStatus(result.error || `error ${response.status}`, true);
      if (response.status === 401) $("key-box").hidden = false;
      return;
    }
    show(result);
    setStatus(`${file.name}: ${labelText(result)}`);
  } catch (err) {
    setStatus(`the server could not be reached (${err})`, true);
  }
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) predict(e.dataTransfer.files[0]);
});
$("file").addEventListener("change", (e) => { if (e.target.files.length) predict(e.target.files[0]); });
$("opacity").addEventListener("input", (e) => { $("map").style.opacity = e.target.value / 100; });
$("key-save").addEventListener("click", () => {
  apiKey = $("api-key").value.trim();
  sessionStorage.setItem("cxr-api-key", apiKey);
  loadModel();
});
loadModel();
