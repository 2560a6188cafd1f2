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
.label { font-size: 12px; font-weight: 700; text-transform: uppercase; letter-spacing: .04em; color: var(--muted);
  margin-right: 6px; }
"""

SCRIPT = """
(() => {
  "use strict";
  const player = document.getElementById("player");
  const list = document.getElementById("transcript-list");
  const items = Array.from(document.querySelectorAll(".segment, .chunk"));
  if (!player) return;
  document.body.classList.add("playable");
  const problem = document.getElementById("player-error");
  player.addEventListener("error", () => { if (problem) problem.hidden = false; });
  function seek(element) {
    const start = parseFloat(element.dataset.start);
    if (!Number.isFinite(start)) return;
    player.currentTime = start;
    const playing = player.play();
    if (playing && playing.catch) playing.catch(() => {});
  }
  document.addEventListener("click", (event) => {
    const item = event.target.closest(".segment, .chunk");
    if (item) seek(item);
  });
  // index.html#t=SECONDS (what omniq search and omniq view --at link to) opens at that moment and plays
  function fromHash() {
    const match = /^#t=([0-9]+(?:[.][0-9]+)?)$/.exec(location.hash);
    if (!match) return;
    const at = parseFloat(match[1]);
    const go = () => {
      player.currentTime = at;
      const playing = player.play();
      if (playing && playing.catch) playing.catch(() => {});
    };
    if (player.readyState >= 1) go(); else player.addEventListener("loadedmetadata", go, { once: true });
  }
  window.addEventListener("hashchange", fromHash);
  fromHash();
  let current = [];
  player.addEventListener("timeupdate", () => {
    const now = player.currentTime;
    const found = items.filter((el) => now >= +el.dataset.start && now < +el.dataset.end);
    if (found.length === current.length && found.every((el, i) => el === current[i])) return;
    current.forEach((el) => el.classList.remove("current"));
    current = found;
    current.forEach((el) => el.classList.add("current"));
    const segment = current.find((el) => el.classList.contains("segment"));
    if (segment && list.scrollHeight > list.clientHeight) {
      const top = segment.offsetTop;
      if (top < list.scrollTop || top + segment.offsetHeight > list.scrollTop + list.clientHeight) {
        list.scrollTop = top - list.clientHeight / 3;
      }
    }
  });
})();
"""
