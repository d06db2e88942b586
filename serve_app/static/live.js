// The ferstream live page: polls the Controller's API with the token from the field (kept in
// sessionStorage, so it goes with the tab) and draws each camera. Polling, not EventSource:
// EventSource cannot send an Authorization header.
"use strict";

const POLL_MS = 1000;
const TOKEN_KEY = "ferstream-token";
const SVG_NS = "http://www.w3.org/2000/svg";
// FER-2013's classes get fixed colours; any other model's classes take the palette in order.
const EMOTION_COLOURS = {
  angry: "#d62728", disgust: "#8c564b", fear: "#9467bd", happy: "#2ca02c",
  neutral: "#98a2b3", sad: "#1f77b4", surprise: "#ff7f0e",
  uncertain: "#e4e7ec", // events.abstain_below: no clear expression
};
const PALETTE = ["#17becf", "#bcbd22", "#e377c2", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a"];

const cards = new Map(); // camera id -> {root, parts, previewUrl}
let polling = false;

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  if (token()) headers.Authorization = "Bearer " + token();
  return headers;
}

async function api(path, options) {
  const init = Object.assign({}, options || {});
  init.headers = authHeaders(init.headers);
  init.cache = "no-store";
  return fetch(path, init);
}

async function errorText(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || body);
  } catch (_) {
    return response.status + " " + response.statusText;
  }
}

function setStatus(text, isError) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.classList.toggle("error", Boolean(isError));
}

function colourOf(emotion, classes) {
  if (EMOTION_COLOURS[emotion]) return EMOTION_COLOURS[emotion];
  const index = Math.max(0, classes.indexOf(emotion));
  return PALETTE[index % PALETTE.length];
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attributes) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}

function createCard(id) {
  const root = element("section", "camera");
  root.dataset.camera = id;
  const head = element("div", "camera-head");
  head.append(element("h2", "name", id));
  const state = element("span", "state", "pending");
  head.append(state);
  const remove = element("button", "remove", "Remove");
  remove.type = "button";
  remove.addEventListener("click", () => removeCamera(id, remove));
  head.append(remove);
  root.append(head);

  const url = element("p", "url");
  const stats = element("div", "stats");
  const fps = element("b", "fps", "–");
  const drops = element("b", "drops", "–");
  const reconnects = element("b", "reconnects", "–");
  const events = element("b", "events", "–");
  for (const [label, value] of [["fps", fps], ["dropped", drops], ["reconnects", reconnects], ["events/min", events]]) {
    const item = element("span", "", label + " ");
    item.append(value);
    stats.append(item);
  }
  const error = element("p", "error-line");
  root.append(url, stats, error);

  const body = element("div", "body");
  const left = element("div", "mix-column");
  left.append(element("p", "caption", "Emotion mix, last minute (face-seconds per 5 s)"));
  const chart = svg("svg", { class: "chart", viewBox: "0 0 240 60", preserveAspectRatio: "none", role: "img" });
  chart.setAttribute("aria-label", "emotion mix of " + id + " over the last minute");
  const mix = element("ul", "mix");
  left.append(chart, mix);
  const right = element("div", "tracks-column");
  right.append(element("p", "caption", "Current tracks"));
  const table = element("table", "tracks");
  const thead = element("thead");
  const headRow = element("tr");
  const columns = [
    ["track", "track id: one face followed across frames"],
    ["emotion", "the top class of the track's latest event"],
    ["conf.", "the model's probability of that class"],
    ["seen", "time since the track's latest event"],
  ];
  for (const [label, help] of columns) {
    const cell = element("th", "", label);
    cell.title = help;
    headRow.append(cell);
  }
  thead.append(headRow);
  const tbody = element("tbody");
  table.append(thead, tbody);
  const previewSlot = element("div", "preview-slot");
  right.append(table, previewSlot);
  body.append(left, right);
  root.append(body);

  document.getElementById("cameras").append(root);
  const card = { root, previewUrl: null, parts: { state, url, fps, drops, reconnects, events, error, chart, mix, tbody, previewSlot } };
  cards.set(id, card);
  return card;
}

function drawStream(card, stream) {
  const parts = card.parts;
  parts.state.textContent = stream.state;
  parts.state.className = "state " + stream.state;
  parts.url.textContent = stream.url;
  parts.fps.textContent = Number(stream.measured_fps || 0).toFixed(1) + " / " + (stream.target_fps === null ? "all" : stream.target_fps);
  parts.drops.textContent = String(stream.frames_dropped);
  parts.reconnects.textContent = String(stream.reconnects);
  parts.error.textContent = stream.last_error ? "last error: " + stream.last_error : "";
}

function drawChart(card, summary) {
  const chart = card.parts.chart;
  chart.replaceChildren();
  const buckets = summary.buckets;
  const slot = 240 / buckets.length;
  // One face in view all the time fills a bar; more faces scale the chart.
  const totals = buckets.map((bucket) => Object.values(bucket).reduce((a, b) => a + b, 0));
  const top = Math.max(summary.bucket_s, ...totals);
  buckets.forEach((bucket, index) => {
    let y = 60;
    for (const emotion of summary.classes) {
      const seconds = bucket[emotion] || 0;
      if (seconds <= 0) continue;
      const height = (seconds / top) * 58;
      y -= height;
      const bar = svg("rect", { class: "bar", x: index * slot + 1, y, width: slot - 2, height, fill: colourOf(emotion, summary.classes) });
      bar.dataset.emotion = emotion;
      const title = svg("title", {});
      const ago = Math.round((buckets.length - index) * summary.bucket_s);
      title.textContent = emotion + ": " + seconds.toFixed(1) + " face-s, " + ago + "–" + Math.round(ago - summary.bucket_s) + " s ago";
      bar.append(title);
      chart.append(bar);
    }
  });
  const mix = card.parts.mix;
  mix.replaceChildren();
  for (const [emotion, share] of Object.entries(summary.mix)) {
    const item = element("li", "share");
    item.dataset.emotion = emotion;
    const swatch = element("span", "swatch");
    swatch.style.background = colourOf(emotion, summary.classes);
    item.append(swatch, document.createTextNode(emotion + " " + Math.round(share * 100) + "%"));
    mix.append(item);
  }
  if (!Object.keys(summary.mix).length) mix.append(element("li", "caption", "no faces in the last minute"));
  card.parts.events.textContent = String(summary.events);
}

function drawTracks(card, summary) {
  const tbody = card.parts.tbody;
  tbody.replaceChildren();
  for (const track of summary.tracks) {
    const row = element("tr", "track");
    row.dataset.track = String(track.track_id);
    row.append(element("td", "track-id", "#" + track.track_id));
    const emotion = element("td", "emotion");
    const swatch = element("span", "swatch");
    swatch.style.background = colourOf(track.emotion, summary.classes);
    emotion.append(swatch, document.createTextNode(track.emotion));
    row.append(emotion, element("td", "confidence", Math.round(track.confidence * 100) + "%"), element("td", "age", track.age_s.toFixed(1) + " s"));
    tbody.append(row);
  }
  if (!summary.tracks.length) {
    const row = element("tr", "no-tracks");
    const cell = element("td", "caption", "no face in view");
    cell.colSpan = 4;
    row.append(cell);
    tbody.append(row);
  }
}

async function drawPreview(card, id, enabled) {
  const slot = card.parts.previewSlot;
  if (!enabled) {
    if (!slot.querySelector(".preview-off")) slot.replaceChildren(element("p", "preview-off", "preview off (add the camera with preview: true to see frames)"));
    if (card.previewUrl) URL.revokeObjectURL(card.previewUrl);
    card.previewUrl = null;
    return;
  }
  const response = await api("/streams/" + encodeURIComponent(id) + "/preview.jpg");
  if (!response.ok) {
    slot.replaceChildren(element("p", "preview-off", "preview: " + (await errorText(response))));
    return;
  }
  // <img src> cannot carry the Authorization header: fetch the JPEG and show it from a blob URL.
  const url = URL.createObjectURL(await response.blob());
  let image = slot.querySelector("img.preview");
  if (!image) {
    image = element("img", "preview");
    image.alt = "annotated preview of " + id;
    slot.replaceChildren(image);
  }
  image.src = url;
  if (card.previewUrl) URL.revokeObjectURL(card.previewUrl);
  card.previewUrl = url;
}

async function refreshCamera(card, stream) {
  drawStream(card, stream);
  const response = await api("/streams/" + encodeURIComponent(stream.camera_id) + "/summary");
  if (!response.ok) return; // removed meanwhile, or a transient error: the next poll tries again
  const summary = await response.json();
  drawChart(card, summary);
  drawTracks(card, summary);
  await drawPreview(card, stream.camera_id, summary.preview);
}

async function poll() {
  if (polling) return;
  polling = true;
  try {
    const response = await api("/streams");
    if (response.status === 401 || response.status === 403) {
      setStatus((token() ? "The token was refused: " : "This service needs an API token: ") + (await errorText(response)), true);
      return;
    }
    if (!response.ok) {
      setStatus("GET /streams failed: " + (await errorText(response)), true);
      return;
    }
    const streams = await response.json();
    const seen = new Set(streams.map((stream) => stream.camera_id));
    for (const [id, card] of cards) {
      if (!seen.has(id)) {
        if (card.previewUrl) URL.revokeObjectURL(card.previewUrl);
        card.root.remove();
        cards.delete(id);
      }
    }
    await Promise.all(streams.map((stream) => refreshCamera(cards.get(stream.camera_id) || createCard(stream.camera_id), stream)));
    document.getElementById("no-cameras").hidden = streams.length > 0;
    setStatus(streams.length + " camera" + (streams.length === 1 ? "" : "s") + ", updated " + new Date().toLocaleTimeString(), false);
  } catch (error) {
    setStatus("The service is unreachable: " + error, true);
  } finally {
    polling = false;
  }
}

async function addCamera(event) {
  event.preventDefault();
  const message = document.getElementById("add-message");
  const fps = document.getElementById("add-fps").value;
  const body = {
    camera_id: document.getElementById("add-id").value.trim(),
    url: document.getElementById("add-url").value.trim(),
    target_fps: fps === "" ? null : Number(fps),
    loop: document.getElementById("add-loop").checked,
    options: document.getElementById("add-preview").checked ? { preview: true } : {},
  };
  const response = await api("/streams", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  if (response.ok) {
    message.textContent = "Added " + body.camera_id + ".";
    message.classList.remove("error");
    document.getElementById("add-id").value = "";
  } else {
    message.textContent = "Not added: " + (await errorText(response));
    message.classList.add("error");
  }
  poll();
}

async function removeCamera(id, button) {
  button.disabled = true;
  const response = await api("/streams/" + encodeURIComponent(id), { method: "DELETE" });
  const message = document.getElementById("add-message");
  if (response.ok || response.status === 404) {
    message.textContent = "Removed " + id + ".";
    message.classList.remove("error");
  } else {
    message.textContent = "Not removed: " + (await errorText(response));
    message.classList.add("error");
    button.disabled = false;
  }
  poll();
}

function start() {
  const field = document.getElementById("token");
  field.value = token();
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, field.value.trim());
    poll();
  });
  document.getElementById("add-form").addEventListener("submit", addCamera);
  poll();
  setInterval(poll, POLL_MS);
}

start();
