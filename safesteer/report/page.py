"""The page around the sections: its style, the script that draws Stage 4's answers, and the frame.

One file, nothing fetched: the CSS and the script are inline, the pictures inline SVG, the answers a JSON
block that the script reads and draws a page (20 prompts) at a time, so a report of 10,000 answers opens about
as fast as one of 100. The script only filters, pages and draws; every number it shows was computed in Python.
"""
from __future__ import annotations

import json
from html import escape

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #222; }
header { background: #0b2545; color: #fff; padding: 14px 24px; }
header h1 { margin: 0; font-size: 20px; } header p { margin: 4px 0 0; color: #cfd8e3; }
nav { position: sticky; top: 0; z-index: 2; background: #f3f5f8; border-bottom: 1px solid #dde;
      padding: 6px 24px; }
nav a { margin-right: 18px; color: #0b2545; text-decoration: none; font-weight: 600; }
main { padding: 0 24px 40px; max-width: 1500px; }
section { border-bottom: 1px solid #e3e6ea; padding: 8px 0 18px; }
h2 { font-size: 18px; margin: 18px 0 8px; } h3 { font-size: 15px; margin: 16px 0 6px; }
.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; margin: 6px 0; }
.facts dt { color: #666; } .facts dd { margin: 0; }
.row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
figure { margin: 0; } figcaption { font-weight: 600; margin-bottom: 2px; }
svg text { font-size: 10px; fill: #333; } svg text.title { font-size: 11px; font-weight: 600; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border: 1px solid #dde; padding: 2px 7px; text-align: left; vertical-align: top; }
th { background: #f3f5f8; } table.tokens td:nth-child(n+3) { text-align: right; }
mark.s { background: #ffe08a; border-radius: 2px; padding: 0 1px; color: inherit; }
mark.s.nl::before { content: "↵"; color: #a67c00; }
body.plain mark.s { background: none; } body.plain mark.s.nl::before { content: none; }
.absent, .warning { color: #8a5a00; } .prompt { font-weight: 600; margin: 4px 0; }
.pair, .group { border: 1px solid #dde; border-radius: 6px; padding: 6px 10px; margin: 8px 0; }
.group .meta { color: #666; font-size: 12px; }
.answers { display: grid; grid-template-columns: repeat(var(--n), minmax(0, 1fr)); gap: 8px; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; } .pair .prompt { grid-column: 1 / -1; }
.answer { background: #fafbfc; border: 1px solid #eceef1; border-radius: 4px; padding: 4px 8px; }
.answer .text { white-space: pre-wrap; word-break: break-word; font-size: 13px; }
.tag { display: inline-block; font-size: 11px; border-radius: 8px; padding: 0 6px; margin-left: 4px;
       background: #e8eaed; }
.tag.refuses { background: #cfe8ff; } .tag.complies { background: #ffd9d0; }
.tag.correct { background: #d4f2d4; } .tag.wrong { background: #f6dede; }
.filters { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; margin: 6px 0; }
.filters input[type=search] { min-width: 240px; padding: 3px 6px; } #count { font-weight: 600; }
"""

SCRIPT = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("answers-data").textContent);
  var $ = function (id) { return document.getElementById(id); };
  var selects = Array.prototype.slice.call(document.querySelectorAll(".filters select"));
  var lowered = [], matched = [], page = 0;

  function text(i) {  // a prompt's searchable text, built when first searched
    if (lowered[i] === undefined) {
      var p = data.prompts[i], all = [p.p, p.n];
      p.a.forEach(function (a) { if (a) all.push(a[0].join("")); });
      lowered[i] = all.join("\n").toLowerCase();
    }
    return lowered[i];
  }

  function keep(p, i, query) {
    for (var k = 0; k < selects.length; k++) {
      var s = selects[k], want = s.value;
      if (!want) continue;
      if (s.dataset.key !== undefined && p[s.dataset.key] !== want) return false;
      if (s.dataset.model !== undefined) {
        var a = p.a[+s.dataset.model];
        if (!a || a[1].indexOf(want) < 0) return false;
      }
    }
    return !query || text(i).indexOf(query) >= 0;
  }

  function filter() {
    var query = $("f-search").value.trim().toLowerCase();
    matched = [];
    data.prompts.forEach(function (p, i) { if (keep(p, i, query)) matched.push(i); });
    page = 0;
    draw();
  }

  function el(tag, cls, content) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (content !== undefined) e.textContent = content;
    return e;
  }

  function answer(label, a) {
    var box = el("div", "answer"), head = el("div");
    head.appendChild(el("b", null, label));
    if (!a) { box.appendChild(head); box.appendChild(el("div", "text", "(no answer)")); return box; }
    a[1].forEach(function (t) {
      var tag = el("span", "tag " + t, t);
      if (a[2] !== undefined && t.indexOf("guard") === 0) tag.title = a[2];
      head.appendChild(tag);
    });
    var body = el("div", "text");
    a[0].forEach(function (part, k) {
      if (k % 2 === 0) { body.appendChild(document.createTextNode(part)); return; }
      body.appendChild(el("mark", part.indexOf("\n") >= 0 ? "s nl" : "s", part));
    });
    box.appendChild(head);
    box.appendChild(body);
    return box;
  }

  function draw() {
    var pages = Math.max(1, Math.ceil(matched.length / data.page)), box = $("answers");
    page = Math.min(page, pages - 1);
    $("count").textContent = matched.length + " of " + data.prompts.length + " prompts";
    $("page").textContent = "page " + (page + 1) + " of " + pages;
    $("prev").disabled = page === 0;
    $("next").disabled = page >= pages - 1;
    box.textContent = "";
    matched.slice(page * data.page, (page + 1) * data.page).forEach(function (i) {
      var p = data.prompts[i], g = el("div", "group"), grid = el("div", "answers");
      var where = [p.s, p.y, p.c].filter(function (x) { return x !== "(none)"; });
      g.appendChild(el("div", "meta", where.join(" · ")));
      g.appendChild(el("p", "prompt", p.p));
      if (p.n) g.appendChild(el("div", "meta", p.n));
      grid.style.setProperty("--n", data.models.length);
      p.a.forEach(function (a, k) { grid.appendChild(answer(data.labels[k], a)); });
      g.appendChild(grid);
      box.appendChild(g);
    });
  }

  selects.forEach(function (s) { s.addEventListener("change", filter); });
  var typing;
  $("f-search").addEventListener("input", function () {
    clearTimeout(typing);
    typing = setTimeout(filter, 150);
  });
  $("f-reset").addEventListener("click", function () {
    selects.forEach(function (s) { s.value = ""; });
    $("f-search").value = "";
    filter();
  });
  $("f-marks").addEventListener("change", function () {
    document.body.classList.toggle("plain", !$("f-marks").checked);
  });
  $("prev").addEventListener("click", function () { page -= 1; draw(); });
  $("next").addEventListener("click", function () { page += 1; draw(); });
  filter();
  document.body.dataset.ready = String(performance.now());  // the first page drawn (for the browser test)
})();
"""


def json_block(ident: str, data) -> str:
    """data as a <script type="application/json"> block: '<' is escaped so no text in it can close the tag."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    return f'<script type="application/json" id="{ident}">{text}</script>'


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]], data) -> str:
    """The whole report: sections are (id, heading, html); data, Stage 4's answers (or None)."""
    nav = "".join(f'<a href="#{ident}">{escape(heading)}</a>' for ident, heading, _ in sections)
    body = "".join(f'<section id="{ident}"><h2>{escape(heading)}</h2>{html}</section>'
                   for ident, heading, html in sections)
    script = f"{json_block('answers-data', data)}<script>{SCRIPT}</script>" if data else ""
    return ("<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<header><h1>{escape(title)}</h1><p>{escape(subtitle)}</p></header>"
            f"<nav>{nav}</nav><main>{body}</main>{script}</body></html>\n")
