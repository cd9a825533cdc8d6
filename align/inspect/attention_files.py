"""The files `align inspect attention` writes: a PNG per layer (a grid of heads), one self-contained HTML page that
switches layer and head, attention.json (entropy, Spearman, attribution, summary) and attention.safetensors.
"""

from __future__ import annotations

import html
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from safetensors.torch import save

from align.io import atomic_write_bytes, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from align.inspect.attention import AttentionResult

CAVEAT = (
    "Attention is one view of the computation, not the explanation (Jain & Wallace 2019, "
    "https://arxiv.org/abs/1902.10186): it leaves out value vectors, MLPs and the residual stream."
)
# Above this many tokens the PNG's axes carry no token labels: they would overlap into a black band.
MAX_LABELED_TOKENS = 64


def _label(token: str) -> str:
    # matplotlib reads "$...$" as mathtext; newlines would break the tick layout
    return token.replace("\n", "\\n").replace("$", r"\$")


def layer_png(result: AttentionResult, layer: int, stats: dict[str, Any], title: str) -> bytes:
    """A PNG of one layer: a grid of heads, each key tokens across and query tokens down (Agg canvas, no pyplot)."""
    attn = result.attentions[layer].numpy()
    n_heads, length = attn.shape[0], attn.shape[-1]
    ncols = min(4, n_heads)
    nrows = math.ceil(n_heads / ncols)
    side = min(12.0, max(3.0, 0.22 * length + 1.5))
    fig = Figure(figsize=(side * ncols, side * nrows + 0.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    labels = [_label(t) for t in result.tokens] if length <= MAX_LABELED_TOKENS else None
    by_head = {h["head"]: h for h in stats["heads"] if h["layer"] == layer}
    image = None
    for head in range(n_heads):
        ax = fig.add_subplot(nrows, ncols, head + 1)
        image = ax.imshow(attn[head], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        rho = by_head[head]["spearman"]
        rho_text = "n/a" if rho is None else f"{rho:+.2f}"
        ax.set_title(f"head {head}: entropy {by_head[head]['entropy']:.2f} nats, rho {rho_text}", fontsize=8)
        if labels is None:
            ax.set_xlabel("key position", fontsize=7)
            ax.set_ylabel("query position", fontsize=7)
        else:
            ax.set_xticks(range(length), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(length), labels, fontsize=6)
        ax.tick_params(length=0)
    fig.colorbar(image, ax=fig.axes, shrink=0.6, label="attention weight")
    fig.suptitle(f"{title}: layer {layer} (rows: query, columns: key; rows sum to 1)", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _r(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(float(x), digits)


def report_json(result: AttentionResult, stats: dict[str, Any], *, model: str, text: str) -> dict[str, Any]:
    """The content of attention.json."""
    n_layers, n_heads = result.attentions.shape[:2]
    grid = {(h["layer"], h["head"]): h for h in stats["heads"]}
    return {
        "model": model,
        "text": text,
        "tokens": result.tokens,
        "token_ids": result.token_ids,
        "layers": n_layers,
        "heads": n_heads,
        "causal": result.causal,
        "query_position": result.query,
        "target": result.target,
        "attribution": {
            "method": "input x gradient of the target on the input embeddings, summed over the hidden dim",
            "signed": result.attribution.tolist(),  # unrounded: small values keep their ranks
            "correlated_with": "abs (attention weights carry no sign)",
        },
        "entropy_nats": [[_r(grid[(layer, h)]["entropy"]) for h in range(n_heads)] for layer in range(n_layers)],
        "spearman": [[_r(grid[(layer, h)]["spearman"]) for h in range(n_heads)] for layer in range(n_layers)],
        "per_head": [{**h, "entropy": _r(h["entropy"]), "spearman": _r(h["spearman"])} for h in stats["heads"]],
        "summary": stats["summary"],
        "notes": result.notes,
        "caveat": CAVEAT,
    }


HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>attention: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }} canvas {{ border: 1px solid #ccc; }}
table.cmp td, table.cmp th {{ padding: 2px 5px; font-size: 12px; text-align: center; border: 1px solid #eee; }}
.caveat {{ color: #555; max-width: 60em; }}
</style></head>
<body>
<h1>Attention: {title}</h1>
<p>{target}</p>
<p>Spearman rho between the attention the query position ({query}) pays to each token and |input x gradient|:
mean {mean} over heads, max {best}, min {worst}.</p>
<label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label>
<span id="stats"></span>
<div><canvas id="heatmap" width="10" height="10"></canvas></div>
<p id="hover">&nbsp;</p>
<h2>From the query position: attention vs |attribution|</h2>
<table class="cmp" id="compare"></table>
<p class="caveat">{caveat}</p>
<script type="application/json" id="attention-data">{data}</script>
<script>
const D = JSON.parse(document.getElementById("attention-data").textContent);
const layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
for (let l = 0; l < D.layers; l++) layerSel.add(new Option("layer " + l, l));
for (let h = 0; h < D.heads; h++) headSel.add(new Option("head " + h, h));
const T = D.tokens.length, cell = Math.max(4, Math.min(28, Math.floor(720 / T))), pad = 120;
const canvas = document.getElementById("heatmap"), ctx = canvas.getContext("2d");
function color(w) {{ const v = Math.round(255 * (1 - Math.max(0, Math.min(1, w)))); return `rgb(${{v}},${{v}},255)`; }}
function current() {{ return D.attentions[+layerSel.value][+headSel.value]; }}
function draw() {{
  const l = +layerSel.value, h = +headSel.value, A = current();
  canvas.width = pad + cell * T; canvas.height = pad + cell * T;
  for (let i = 0; i < T; i++) for (let j = 0; j < T; j++) {{
    ctx.fillStyle = color(A[i][j]); ctx.fillRect(pad + j * cell, pad + i * cell, cell, cell);
  }}
  ctx.strokeStyle = "#d00"; ctx.strokeRect(pad, pad + D.query * cell, cell * T, cell);
  if (cell >= 8) {{
    ctx.fillStyle = "#000"; ctx.font = Math.min(12, cell - 1) + "px sans-serif"; ctx.textBaseline = "middle";
    for (let i = 0; i < T; i++) {{
      ctx.textAlign = "right"; ctx.fillText(D.tokens[i], pad - 4, pad + i * cell + cell / 2);
      ctx.save(); ctx.translate(pad + i * cell + cell / 2, pad - 4); ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left"; ctx.fillText(D.tokens[i], 0, 0); ctx.restore();
    }}
  }}
  const rho = D.spearman[l][h];
  document.getElementById("stats").textContent = ` entropy ${{D.entropy[l][h].toFixed(3)}} nats, Spearman rho ` +
    (rho === null ? "n/a" : rho.toFixed(3));
  const imp = D.positions.map(p => Math.abs(D.attribution[p])), top = Math.max(...imp, 1e-12);
  const rows = [["token", p => D.tokens[p], null], ["attention", p => A[D.query][p], 1],
                ["|attribution|", p => Math.abs(D.attribution[p]), top]];
  const table = document.getElementById("compare"); table.replaceChildren();
  for (const [name, get, scale] of rows) {{
    const tr = table.insertRow(); const th = document.createElement("th"); th.textContent = name; tr.appendChild(th);
    for (const p of D.positions) {{
      const td = tr.insertCell(), v = get(p);
      if (scale === null) {{ td.textContent = v; continue; }}
      td.textContent = v.toFixed(3); td.style.background = color(v / scale);
    }}
  }}
}}
canvas.addEventListener("mousemove", e => {{
  const r = canvas.getBoundingClientRect(), j = Math.floor((e.clientX - r.left - pad) / cell),
        i = Math.floor((e.clientY - r.top - pad) / cell);
  if (i >= 0 && j >= 0 && i < T && j < T)
    document.getElementById("hover").textContent = `query ${{i}} ${{D.tokens[i]}} -> key ${{j}} ${{D.tokens[j]}}: ` +
      current()[i][j].toFixed(4);
}});
layerSel.onchange = draw; headSel.onchange = draw; draw();
</script>
</body></html>
"""


def report_html(result: AttentionResult, report: dict[str, Any], *, title: str) -> str:
    """One self-contained page: the weights as JSON in a <script> element, drawn on a canvas by inline code."""
    s = report["summary"]

    def fmt(h):
        return "n/a" if not h else f"{h['spearman']:+.3f} (layer {h['layer']} head {h['head']})"

    data = {
        "tokens": result.tokens,
        "layers": report["layers"],
        "heads": report["heads"],
        "query": result.query,
        "positions": s["compared_positions"],
        "attribution": report["attribution"]["signed"],
        "entropy": report["entropy_nats"],
        "spearman": report["spearman"],
        "attentions": [
            [[[round(w, 4) for w in row] for row in head] for head in layer] for layer in result.attentions.tolist()
        ],
    }
    # "</" inside the JSON (e.g. the token "</s>") would end the <script> element early.
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    mean = "n/a" if s["spearman_mean"] is None else f"{s['spearman_mean']:+.3f}"
    return HTML.format(
        title=html.escape(title),
        target=html.escape(describe_target(result)),
        query=result.query,
        mean=mean,
        best=html.escape(fmt(s["best"])),
        worst=html.escape(fmt(s["worst"])),
        caveat=html.escape(CAVEAT),
        data=blob,
    )


def describe_target(result: AttentionResult) -> str:
    t = result.target
    if t["kind"] == "next_token_logit":
        return (
            f"Target: the logit of the next token {t['token']!r} (p = {t['prob']:.3f}, {t['chosen']}) at "
            f"position {result.query}."
        )
    if t["kind"] == "score":
        return f"Target: the score {t['value']:+.4f} (raw), read at position {result.query}."
    return f"Target: the logit of label {t['label']} ({t['logit']:+.4f}), read at position {result.query}."


def write_outputs(
    result: AttentionResult, stats: dict[str, Any], output_dir: Path, *, model: str, text: str
) -> list[Path]:
    """Write the PNGs, attention.html, attention.json and attention.safetensors; return their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    report = report_json(result, stats, model=model, text=text)
    written = []
    for layer in range(report["layers"]):
        path = output_dir / f"attention_layer_{layer:02d}.png"
        atomic_write_bytes(path, layer_png(result, layer, stats, title=model))
        written.append(path)
    for name, write, content in (
        ("attention.html", atomic_write_text, report_html(result, report, title=model)),
        ("attention.safetensors", atomic_write_bytes, save({"attentions": result.attentions.contiguous()})),
        ("attention.json", atomic_write_json, report),
    ):
        write(output_dir / name, content)
        written.append(output_dir / name)
    return written
