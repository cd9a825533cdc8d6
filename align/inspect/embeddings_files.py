"""The files `align inspect embeddings` writes: embeddings.json, one self-contained HTML page (SVG maps with the word
on hover, the tables; no script or style from outside) and a PNG map per space; and the summary it prints.
"""

from __future__ import annotations

import html
import io
import json
import re
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from align.io import atomic_write_bytes, atomic_write_json, atomic_write_text

CLASS_COLORS = {"name": "#1f77b4", "color": "#d62728", "place": "#2ca02c", "object": "#ff7f0e",
                "feeling": "#9467bd", "other": "#b0b0b0"}  # fmt: skip
SCORES = (("nn_agreement", "1-NN class agreement"), ("knn5_agreement", "5-NN class agreement"),
          ("kmeans_purity", "k-means purity"), ("silhouette", "silhouette (cosine)"))  # fmt: skip


def file_stem(name: str) -> str:
    """A space's name as a file-name part: `random init` -> `random_init`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "space"


def map_png(space: dict[str, Any], title: str) -> bytes:
    """A PNG of one space's 2-D map: words colored by class, the words asked about (and, in a small vocabulary, every
    word) labeled (Agg canvas, no pyplot)."""
    points = space["map"]["points"]
    fig = Figure(figsize=(9, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for cls in dict.fromkeys(p["class"] for p in points):
        pts = [p for p in points if p["class"] == cls]
        ax.scatter([p["x"] for p in pts], [p["y"] for p in pts], s=22, c=CLASS_COLORS.get(cls, "#555"), label=cls,
                   alpha=0.85, edgecolors="none")  # fmt: skip
    label_all = len(points) <= 160
    for p in points:
        if label_all or p["asked"]:
            ax.annotate(p["word"].replace("$", r"\$"), (p["x"], p["y"]), fontsize=7 if not p["asked"] else 9,
                        fontweight="bold" if p["asked"] else "normal", xytext=(2, 2),
                        textcoords="offset points")  # fmt: skip
    share = space["map"]["explained_variance"]
    ax.set_xlabel(f"PC 1 ({share[0]:.1%} of the variance)")
    ax.set_ylabel(f"PC 2 ({share[1]:.1%})" if len(share) > 1 else "PC 2")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{title}: {space['name']} ({space['vocabulary']}, dim {space['dim']})", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _svg(space: dict[str, Any], width: int = 440, height: int = 380, pad: int = 24) -> str:
    points = space["map"]["points"]
    xs, ys = [p["x"] for p in points], [p["y"] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (width - 2 * pad) / ((x1 - x0) or 1.0)
    sy = (height - 2 * pad) / ((y1 - y0) or 1.0)
    e = html.escape
    out = [f'<svg class="map" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           'role="img">']  # fmt: skip
    for p in points:
        cx, cy = pad + (p["x"] - x0) * sx, height - pad - (p["y"] - y0) * sy
        label = f"{p['word']} ({p['class']})"
        out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{5 if p["asked"] else 4}" '
                   f'fill="{CLASS_COLORS.get(p["class"], "#555")}" data-word="{e(label)}">'
                   f"<title>{e(label)}</title></circle>")  # fmt: skip
        if p["asked"]:
            word = e(p["word"])
            out.append(f'<text x="{cx + 6:.1f}" y="{cy - 4:.1f}" font-size="12" font-weight="bold">{word}</text>')
    out.append("</svg>")
    return "".join(out)


_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #ccc;padding:.25em .5em;font-size:13px;text-align:left;vertical-align:top}th{background:#f3f3f3}
.maps{display:flex;flex-wrap:wrap;gap:1.2em}.maps figure{margin:0}svg.map{border:1px solid #ccc;background:#fff}
svg.map circle:hover{stroke:#000;stroke-width:2}#hover{min-height:1.3em;font-weight:bold}.legend span{margin-right:1em}
.dot{display:inline-block;width:.8em;height:.8em;border-radius:50%;margin-right:.3em}.note{color:#666;font-size:13px}"""

_SCRIPT = """for (const c of document.querySelectorAll("svg.map circle")) {
  c.addEventListener("mouseenter", () => { document.getElementById("hover").textContent = c.dataset.word; });
}"""


def report_html(report: dict[str, Any], title: str) -> str:
    """One self-contained page: a map per space side by side, then class scores, neighbours and analogies."""
    e = html.escape
    spaces = report["spaces"]
    out = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>embeddings: {e(title)}</title>",
           f"<style>{_STYLE}</style></head><body>", f"<h1>Embeddings: <code>{e(title)}</code></h1>"]  # fmt: skip
    used = list(dict.fromkeys(p["class"] for s in spaces for p in s["map"]["points"]))
    out.append("<p class='legend'>" + "".join(
        f"<span><i class='dot' style='background:{CLASS_COLORS.get(c, '#555')}'></i>{e(c)}</span>" for c in used
    ) + "</p><p id='hover'>&nbsp;</p><div class='maps'>")  # fmt: skip
    for s in spaces:
        share = s["map"]["explained_variance"]
        cap = f"{s['name']}: PCA, {sum(share):.1%} of the variance in 2-D; {s['vocabulary']}, dim {s['dim']}"
        out.append(f"<figure>{_svg(s)}<figcaption class='note'>{e(cap)}</figcaption></figure>")
    out.append("</div>")
    grouped = [s for s in spaces if s.get("class_grouping")]
    if grouped:
        g0 = grouped[0]["class_grouping"]
        classes = ", ".join(f"{c} {n}" for c, n in g0["classes"].items())
        out.append(f"<h2>Grouping by grammar class</h2><p class='note'>{g0['words']} words ({e(classes)}); chance in "
                   "brackets.</p><table><tr><th>space</th>" + "".join(f"<th>{e(label)}</th>" for _, label in SCORES)
                   + "</tr>")  # fmt: skip
        for s in grouped:
            g = s["class_grouping"]
            cells = [
                f"{g['nn_agreement']:.3f} ({g['nn_agreement_chance']:.3f})",
                f"{g['knn5_agreement']:.3f}",
                f"{g['kmeans_purity']:.3f} ({g['kmeans_purity_chance']:.3f})",
                f"{g['silhouette']:+.3f}",
            ]
            out.append(f"<tr><td>{e(s['name'])}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        out.append("</table>")
    out.append(f"<h2>Nearest neighbours (cosine, top {report['top_k']})</h2><table><tr><th>word</th>"
               + "".join(f"<th>{e(s['name'])}</th>" for s in spaces) + "</tr>")  # fmt: skip
    for w in report["words"]:
        cells = []
        for s in spaces:
            n = s["neighbours"][w]
            split = " + ".join(repr(p) for p in n["pieces"])  # repr: a piece's leading space shows
            pieces = f"<br><span class='note'>mean of {e(split)}</span>" if len(n["pieces"]) > 1 else ""
            cells.append("<td>" + e(", ".join(f"{x} {c:.2f}" for x, c in n["top"])) + pieces + "</td>")
        out.append(f"<tr><th>{e(w)}</th>{''.join(cells)}</tr>")
    out.append("</table>")
    if report["analogies"]:
        out.append("<h2>Analogies (3CosAdd; rank of the expected word among all candidates)</h2><table><tr>"
                   "<th>analogy</th>" + "".join(f"<th>{e(s['name'])}</th>" for s in spaces) + "</tr>")  # fmt: skip
        for i, _ in enumerate(report["analogies"]):
            a0 = spaces[0]["analogies"][i]
            head = a0["query"] + (f" = {a0['expected']}" if a0["expected"] else "")
            cells = []
            for s in spaces:
                a = s["analogies"][i]
                rank = "" if a["expected"] is None else f"rank {a['rank'] or 'n/a'} of {a['candidates']}: "
                cells.append(f"<td>{e(rank)}{e(', '.join(f'{x} {c:.2f}' for x, c in a['top']))}</td>")
            out.append(f"<tr><th>{e(head)}</th>{''.join(cells)}</tr>")
        out.append("</table>")
    notes = [f"{s['name']}: {s['source']}" + (f" ({'; '.join(s['notes'])})" if s["notes"] else "") for s in spaces]
    out.append("<p class='note'>" + "<br>".join(e(n) for n in notes) + "</p>")
    out.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(out) + "\n"


def write_outputs(report: dict[str, Any], output_dir: Path) -> list[Path]:
    """embeddings.json, embeddings.html and a PNG per space in `output_dir`; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for s in report["spaces"]:
        path = output_dir / f"embeddings_{file_stem(s['name'])}.png"
        s["png"] = path.name
        atomic_write_bytes(path, map_png(s, report["model"]))
        written.append(path)
    atomic_write_text(output_dir / "embeddings.html", report_html(report, report["model"]))
    atomic_write_json(output_dir / "embeddings.json", json.loads(json.dumps(report)))
    return [*written, output_dir / "embeddings.html", output_dir / "embeddings.json"]


def summary_text(report: dict[str, Any], output_dir: Path, written: list[Path]) -> str:
    """What the command prints: per space its class scores, neighbours and analogies; then the files."""
    lines = []
    for s in report["spaces"]:
        lines.append(f"== {s['name']} ({s['source']}; {s['vocabulary']}, dim {s['dim']})")
        g = s.get("class_grouping")
        if g:
            lines.append(f"class grouping over {g['words']} words: 1-NN agreement {g['nn_agreement']:.3f} (chance "
                         f"{g['nn_agreement_chance']:.3f}), 5-NN {g['knn5_agreement']:.3f}, k-means purity "
                         f"{g['kmeans_purity']:.3f} (chance {g['kmeans_purity_chance']:.3f}), silhouette "
                         f"{g['silhouette']:+.3f}")  # fmt: skip
        for w, n in s["neighbours"].items():
            lines.append(f"  {w}: " + ", ".join(f"{x} {c:.2f}" for x, c in n["top"][:5]))
        for a in s["analogies"]:
            rank = "" if a["expected"] is None else f" = {a['expected']}? rank {a['rank'] or 'n/a'}; "
            lines.append(f"  {a['query']}{rank or ': '}" + ", ".join(f"{x} {c:.2f}" for x, c in a["top"][:3]))
    lines.append(f"wrote {output_dir}/: " + ", ".join(p.name for p in written))
    return "\n".join(lines)
