"""The results page's inline stylesheet and script (pinned by hash in the page's Content-Security-Policy)."""

STYLE = """
:root { color-scheme: light dark; --fg: #1d232a; --muted: #5b6670; --bg: #f6f7f9; --card: #fff;
  --line: #dde2e7; --accent: #0b63c5; --hl: #fff1b8; --warn-bg: #fff4e5; --warn-fg: #7a4100; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6e9ec; --muted: #9aa5b1; --bg: #15191d; --card: #1e2328;
  --line: #323940; --accent: #6cb2ff; --hl: #4a4020; --warn-bg: #3b2a12; --warn-fg: #ffd59a; } }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
  background: var(--bg); }
header, main, #timeline { max-width: 1200px; margin: 0 auto; padding: 0 20px; }
header { padding-top: 20px; }
h1 { font-size: 1.5rem; margin: 0 0 4px; overflow-wrap: anywhere; }
h2 { font-size: 1.1rem; margin: 0 0 10px; }
.meta { color: var(--muted); margin: 0; display: flex; flex-wrap: wrap; gap: 4px 18px; }
.meta span { overflow-wrap: anywhere; }
.banner { background: var(--warn-bg); color: var(--warn-fg); border: 1px solid currentColor; border-radius: 6px;
  padding: 10px 14px; margin: 14px 0 0; font-weight: 600; }
main { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: 20px; margin-top: 18px; }
@media (max-width: 860px) { main { grid-template-columns: minmax(0, 1fr); } }
section.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px; }
#player { width: 100%; display: block; border-radius: 6px; background: #000; }
audio#player { background: none; }
video#player { max-height: 60vh; }
.note { color: var(--muted); margin: 0; }
.note code { background: var(--bg); padding: 1px 5px; border-radius: 4px; }
#summary-text { white-space: pre-wrap; margin: 0; overflow-wrap: anywhere; }
.side { display: flex; flex-direction: column; gap: 20px; min-width: 0; }
#transcript-list { list-style: none; margin: 0; padding: 0; max-height: 70vh; overflow-y: auto; position: relative; }
.segment { display: flex; align-items: baseline; gap: 10px; padding: 6px 8px; border-radius: 6px; }
.segment + .segment { border-top: 1px solid var(--line); }
.segment .text { flex: 1 1 auto; min-width: 0; overflow-wrap: anywhere; }
.playable .segment, .playable .chunk { cursor: pointer; }
.playable .segment:hover, .playable .chunk:hover { background: var(--bg); }
.segment.current, .chunk.current { background: var(--hl); }
.playable .segment.current:hover, .playable .chunk.current:hover { background: var(--hl); }
button.time { font: 600 13px/1.5 ui-monospace, SFMono-Regular, Menlo, monospace; color: var(--accent);
  background: none; border: 0; padding: 0; cursor: pointer; white-space: nowrap; }
button.time:disabled { color: var(--muted); cursor: default; }
.empty { color: var(--muted); font-style: italic; }
.gap { color: var(--warn-fg); background: var(--warn-bg); border-radius: 6px; font-style: italic; }
li.gap { display: flex; align-items: baseline; gap: 10px; padding: 6px 8px; margin: 2px 0; }
p.gap { padding: 2px 6px; }
#timeline { margin-top: 20px; margin-bottom: 30px; }
#chunk-list { list-style: none; margin: 0; padding: 0; display: grid; gap: 14px;
  grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); }
.chunk { background: var(--card); border: 1px solid var(--line); border-radius: 8px; overflow: hidden;
  display: flex; flex-direction: column; }
.thumb, .no-thumb { width: 100%; aspect-ratio: 16 / 9; object-fit: cover; display: block; background: #222; }
.chunk-body { padding: 8px 12px 12px; }
.chunk-body p { margin: 4px 0 0; overflow-wrap: anywhere; }
#search-form { display: flex; gap: 8px; margin-bottom: 6px; }
#search-box { flex: 1 1 auto; min-width: 0; font: inherit; padding: 6px 10px; border: 1px solid var(--line);
  border-radius: 6px; background: var(--bg); color: var(--fg); }
#search-mode { font: inherit; border: 1px solid var(--line); border-radius: 6px; background: var(--bg);
  color: var(--fg); }
#search-results { list-style: none; margin: 0; padding: 0; max-height: 40vh; overflow-y: auto; }
.hit { display: flex; align-items: baseline; gap: 8px; padding: 6px 8px; border-radius: 6px; cursor: pointer; }
.hit + .hit { border-top: 1px solid var(--line); }
.hit:hover { background: var(--bg); }
.hit .text { flex: 1 1 auto; min-width: 0; overflow-wrap: anywhere; }
mark { background: var(--hl); color: inherit; }
#search-status:empty { display: none; }
.label { font-size: 12px; font-weight: 700; text-transform: uppercase; letter-spacing: .04em; color: var(--muted);
  margin-right: 6px; }
"""

SCRIPT = """
(() => {
  "use strict";
  const player = document.getElementById("player");
  const list = document.getElementById("transcript-list");
  const items = Array.from(document.querySelectorAll(".segment, .chunk"));
  if (player) document.body.classList.add("playable");
  const problem = document.getElementById("player-error");
  if (player) player.addEventListener("error", () => { if (problem) problem.hidden = false; });
  function play(at) {
    if (!player) return;
    const go = () => {
      player.currentTime = at;
      const playing = player.play();
      if (playing && playing.catch) playing.catch(() => {});
    };
    if (player.readyState >= 1) go(); else player.addEventListener("loadedmetadata", go, { once: true });
  }
  document.addEventListener("click", (event) => {
    const hit = event.target.closest(".hit");
    if (hit) { jump(parseFloat(hit.dataset.start)); return; }
    const item = event.target.closest(".segment, .chunk");
    if (item && player) play(parseFloat(item.dataset.start));
  });
  // index.html#t=SECONDS (what omniq search and omniq view --at link to) opens at that moment and plays
  function fromHash() {
    const match = /^#t=([0-9]+(?:[.][0-9]+)?)$/.exec(location.hash);
    if (match) jump(parseFloat(match[1]));
  }
  // a moment: played where there is a player; its transcript segment (or chunk) shown and marked either way
  function jump(at) {
    if (!Number.isFinite(at)) return;
    play(at);
    const here = items.filter((el) => at >= +el.dataset.start && at < +el.dataset.end);
    const shown = here.find((el) => el.classList.contains("segment")) || here[0];
    if (!player) {
      items.forEach((el) => el.classList.remove("current"));
      here.forEach((el) => el.classList.add("current"));
    }
    if (shown) shown.scrollIntoView({ block: "nearest" });
  }
  window.addEventListener("hashchange", fromHash);
  fromHash();
  let current = [];
  if (player) player.addEventListener("timeupdate", () => {
    const now = player.currentTime;
    const found = items.filter((el) => now >= +el.dataset.start && now < +el.dataset.end);
    if (found.length === current.length && found.every((el, i) => el === current[i])) return;
    current.forEach((el) => el.classList.remove("current"));
    current = found;
    current.forEach((el) => el.classList.add("current"));
    const segment = current.find((el) => el.classList.contains("segment"));
    if (segment && list && list.scrollHeight > list.clientHeight) {
      const top = segment.offsetTop;
      if (top < list.scrollTop || top + segment.offsetHeight > list.scrollTop + list.clientHeight) {
        list.scrollTop = top - list.clientHeight / 3;
      }
    }
  });

  // Find a moment: by words in this page; by meaning and both through omniq view --serve's search
  const form = document.getElementById("search-form");
  if (!form) return;
  const box = document.getElementById("search-box");
  const mode = document.getElementById("search-mode");
  const status = document.getElementById("search-status");
  const results = document.getElementById("search-results");
  const served = document.body.dataset.search;
  const LIMIT = 20;
  const fold = (text) => text.normalize("NFD").replace(/[\\u0300-\\u036f]/g, "").toLowerCase();
  const words = (text) => fold(text).match(/[\\p{L}\\p{N}]+/gu) || [];
  const entries = [];
  document.querySelectorAll(".segment").forEach((el) => {
    const text = el.querySelector(".text");
    if (!text) return;
    entries.push({ kind: "transcript", text: text.textContent, start: +el.dataset.start, end: +el.dataset.end });
  });
  document.querySelectorAll(".chunk").forEach((el) => {
    const caption = ["visual", "audio"].map((k) => el.querySelector("p." + k)).filter(Boolean)
      .map((p) => p.lastChild.textContent).join(" | ");
    if (caption) entries.push({ kind: "caption", text: caption, start: +el.dataset.start, end: +el.dataset.end });
    const summary = el.querySelector("p.chunk-summary");
    if (summary) entries.push({ kind: "summary", text: summary.lastChild.textContent, start: +el.dataset.start,
      end: +el.dataset.end });
  });
  entries.forEach((entry) => { entry.words = words(entry.text); });
  // every query word must begin a word of the entry; more occurrences rank higher, then earlier moments
  function byWords(query) {
    const wanted = words(query);
    if (!wanted.length) return [];
    const found = [];
    for (const entry of entries) {
      let score = 0;
      for (const term of wanted) {
        const count = entry.words.filter((word) => word.startsWith(term)).length;
        if (!count) { score = -1; break; }
        score += count;
      }
      if (score > 0) found.push(Object.assign({ score: score, mode: "words" }, entry));
    }
    return found.sort((a, b) => b.score - a.score || a.start - b.start).slice(0, LIMIT);
  }
  function clock(seconds) {
    const whole = Math.max(0, Math.floor(seconds));
    const h = Math.floor(whole / 3600), m = Math.floor((whole % 3600) / 60), s = whole % 60;
    const two = (n) => String(n).padStart(2, "0");
    return h ? h + ":" + two(m) + ":" + two(s) : m + ":" + two(s);
  }
  function marked(text, query) {
    const fragment = document.createDocumentFragment();
    const wanted = words(query);
    const pattern = /[\\p{L}\\p{N}]+/gu;
    let last = 0, match;
    while ((match = pattern.exec(text)) !== null) {
      if (wanted.some((term) => fold(match[0]).startsWith(term))) {
        fragment.append(text.slice(last, match.index));
        const mark = document.createElement("mark");
        mark.textContent = match[0];
        fragment.append(mark);
        last = match.index + match[0].length;
      }
    }
    fragment.append(text.slice(last));
    return fragment;
  }
  function show(hits, query, note) {
    results.replaceChildren(...hits.map((hit) => {
      const li = document.createElement("li");
      li.className = "hit";
      li.dataset.start = hit.start;
      li.dataset.mode = hit.mode;
      const time = document.createElement("button");
      time.type = "button";
      time.className = "time";
      time.textContent = clock(hit.start);
      const kind = document.createElement("span");
      kind.className = "label";
      kind.textContent = hit.kind;
      const text = document.createElement("span");
      text.className = "text";
      text.append(hit.mode === "meaning" ? hit.text : marked(hit.text, query));
      li.append(time, kind, text);
      return li;
    }));
    status.textContent = note || (hits.length ? "" : "No moment matches \\u201c" + query + "\\u201d.");
  }
  let asked = 0;
  async function search() {
    const query = box.value.trim();
    const number = ++asked;
    if (!query) { show([], "", ""); return; }
    if (mode.value === "words" || !served) { show(byWords(query), query, ""); return; }
    status.textContent = "Searching\\u2026";
    try {
      const answer = await fetch(served + "?" + new URLSearchParams({ q: query, mode: mode.value }));
      const body = await answer.json();
      if (number !== asked) return;
      if (!answer.ok) {
        show(byWords(query), query, (body.error || "search failed") + " (showing word matches)");
        return;
      }
      show(body.hits, query, body.notice || "");
    } catch (error) {
      if (number === asked) show(byWords(query), query, "search by meaning is not reachable (showing word matches)");
    }
  }
  let timer = 0;
  box.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(search, 200); });
  mode.addEventListener("change", search);
  form.addEventListener("submit", (event) => { event.preventDefault(); clearTimeout(timer); search(); });
})();
"""
