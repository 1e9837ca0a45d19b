"""One self-contained ``report.html``: metrics, plots, galleries, explanations and diagnostics.

Every image is embedded as a base64 ``data:`` URI and the styling is inline, so the file opens in a browser
with no server and references no other file.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from protohead.atomic import write_text_atomic

METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "ece", "nll", "aurc",
               "accuracy_at_80_coverage", "accuracy_at_90_coverage", "num_samples")
RUN_PLOTS = (("confusion_matrix.png", "Confusion matrix (test)"), ("reliability.png", "Reliability diagram (test)"),
             ("risk_coverage.png", "Risk–coverage curve (test)"))

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ccc; padding: .2em .6em; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #ddd; margin: .3em 0; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; } .plots figure { flex: 1 1 320px; margin: 0; }
.note { background: #f7f7e8; border-left: 4px solid #cc9; padding: .5em 1em; }
.warn { color: #a30; }
nav a { margin-right: 1em; }
"""


def data_uri(path: str | os.PathLike[str]) -> str:
    """``data:image/png;base64,...`` of a PNG file."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "n/a" if value is None else str(value)


def _figure(path: Path, caption: str) -> str:
    return (f'<figure><img src="{data_uri(path)}" alt="{_esc(caption)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]]) -> str:
    head = "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(
        f'<td class="num">{_esc(_fmt(v))}</td>' if isinstance(v, int | float) else f"<td>{_esc(_fmt(v))}</td>"
        for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def render_report(title: str, summary: Mapping[str, Any], metrics: Mapping[str, Any] | None,
                  run_plots: Sequence[tuple[Path, str]], galleries: Sequence[tuple[str, Path]],
                  explanations: Sequence[tuple[str, Path]], diagnostics: Mapping[str, Any],
                  faithfulness: Mapping[str, Any] | None = None) -> str:
    """The report as one HTML string (images inlined).

    Args:
        title: page title.
        summary: short key → value facts about the run (model, data, selected epoch, ...).
        metrics: the run's ``metrics.json`` (or None).
        run_plots: (PNG path, caption) of the run's evaluation plots.
        galleries: (class name, gallery PNG path).
        explanations: (image id, explanation PNG path).
        diagnostics: the ``diagnostics.json`` content (purity, near_duplicates, dead_prototypes, push_records).
        faithfulness: the ``faithfulness.json`` content (deletion test and prototype statistics), or None.
    """
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{_esc(title)}</h1>",
             '<nav><a href="#metrics">Metrics</a><a href="#reading">How to read</a><a href="#gallery">Gallery</a>'
             '<a href="#explanations">Explanations</a><a href="#diagnostics">Diagnostics</a>'
             + ('<a href="#faithfulness">Faithfulness</a>' if faithfulness else "") + "</nav>",
             _table(None, [(k, v) for k, v in summary.items()])]

    parts.append('<h2 id="metrics">Test metrics</h2>')
    if metrics:
        parts.append(_table(("metric", "value"), [(k, metrics[k]) for k in METRIC_KEYS if k in metrics]))
        recall = metrics.get("per_class_recall") or {}
        if recall:
            parts.append("<p>Per-class recall:</p>" + _table(("class", "recall"), list(recall.items())))
    else:
        parts.append("<p>No metrics.json in the run directory.</p>")
    if run_plots:
        parts.append('<div class="plots">' + "".join(_figure(p, c) for p, c in run_plots) + "</div>")

    parts.append('<h2 id="reading">How to read the pictures</h2><div class="note"><ul>'
                 "<li><b>Heat map</b>: that prototype's own evidence over the image's patch tokens, upsampled "
                 "bilinearly from the token grid to the image size, on an absolute colour scale (the colour bar "
                 "beside it). What it shows depends on the head: <i>patch-scored heads</i> show each token's "
                 "similarity to the prototype (cosine, scale 0–1; the prototype's score is the map's maximum, marked "
                 "on the colour bar), so the hot spot is the evidence the logit uses; <i>pooled heads with "
                 "attention</i> show the attention weights of that prototype over the tokens (cross-attention, "
                 "averaged over heads; they sum to 1), on a scale from 0 to at least 2/N with the uniform weight "
                 "1/N marked on the colour bar: a map close to 1/N everywhere is nearly uniform, and these weights "
                 "only shape the adapted prototype, while the logit compares the pooled image embedding. Heads "
                 "without either draw no map.</li>"
                 "<li><b>Box</b>: the grid cell of the token the prototype was last pushed toward, mapped back to "
                 "the original image. The token's effective receptive field is larger than its cell.</li>"
                 "<li><b>Similarity</b> in the gallery: recorded at the prototype's last push; in explanations: the "
                 "similarity of the image to the (attention-adapted) prototype.</li>"
                 "<li><b>Wins</b>: on how many validation images the prototype is its class's most similar "
                 "prototype (the one that sets the class logit).</li></ul></div>")

    parts.append('<h2 id="gallery">Prototype gallery</h2>')
    for class_name, path in galleries:
        parts.append(f"<h3>{_esc(class_name)}</h3>" + _figure(path, f"prototypes of class {class_name}"))

    parts.append('<h2 id="explanations">Example explanations (test images)</h2>')
    for image_id, path in explanations:
        parts.append(f"<h3>{_esc(image_id)}</h3>" + _figure(path, f"explanation of {image_id}"))

    parts.append('<h2 id="diagnostics">Prototype diagnostics</h2>')
    parts.append(_diagnostics_html(diagnostics))
    if faithfulness:
        parts.append('<h2 id="faithfulness">Faithfulness</h2>')
        parts.append(_faithfulness_html(faithfulness))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _diagnostics_html(diagnostics: Mapping[str, Any]) -> str:
    out = []
    purity = diagnostics.get("purity", {})
    dead = diagnostics.get("dead_prototypes", {})
    duplicates = diagnostics.get("near_duplicates", {})
    records = {(r["class"], r["slot"]): r for r in diagnostics.get("push_records", [])}
    wins = {(w["class"], w["slot"]): w for w in dead.get("wins", [])}
    not_own = [r for r in records.values() if r["image_id"] is not None and not r["own_class"]]
    never = [r for r in records.values() if r["image_id"] is None]
    if purity:
        out.append(f"<p>Purity: share of each prototype's {purity['k']} nearest projected training tokens "
                   f"({_esc(purity['distance'])} similarity) that come from its own class. "
                   f"Mean {_fmt(purity['mean'])}.</p>")
    out.append(f"<p>Dead prototypes (never the winner of their class on {dead.get('num_images', 0)} validation "
               f"images): <b>{dead.get('count', 0)}</b>"
               + (": " + ", ".join(f"{_esc(d['class_name'])}/{d['slot']}" for d in dead.get("dead", []))
                  if dead.get("dead") else "") + ".</p>")
    out.append(f"<p>Near-duplicate pairs (cosine &gt; {duplicates.get('threshold', 0.95)}): "
               f"<b>{duplicates.get('count', 0)}</b>.</p>")
    if duplicates.get("pairs"):
        out.append(_table(("prototype", "prototype", "cosine"), [
            (f"{p['a']['class_name']}/{p['a']['slot']}", f"{p['b']['class_name']}/{p['b']['slot']}", p["cosine"])
            for p in duplicates["pairs"]]))
    shared = diagnostics.get("shared_sources", [])
    if shared:
        out.append(f"<p>{len(shared)} push source(s) (image, token) shared by several prototypes: " + "; ".join(
            f"{_esc(g['image_id'])} token {g['token']} ← "
            + ", ".join(f"{_esc(p['class_name'])}/{p['slot']}" for p in g["prototypes"]) for g in shared) + ".</p>")
    if never:
        out.append(f'<p class="warn">{len(never)} valid prototype(s) were never pushed.</p>')
    if not_own:
        out.append(f'<p class="warn">{len(not_own)} push record(s) point at an image of another class.</p>')
    rows = []
    for row in purity.get("prototypes", []):
        key = (row["class"], row["slot"])
        record, win = records.get(key, {}), wins.get(key, {})
        rows.append((row["class_name"], row["slot"], row["purity"], win.get("wins"), win.get("wins_own_class"),
                     record.get("image_id"), record.get("token"), record.get("similarity")))
    if rows:
        out.append(_table(("class", "slot", "purity", "val wins", "val wins (own class)", "source image",
                           "token", "push similarity"), rows))
    return "\n".join(out)


FAITHFULNESS_SCALARS = (
    ("evidence_kind", "evidence map kind"), ("images", "test images in the deletion test"),
    ("deletion_ratio_at_5", "explained / random drop at k = 5"),
    ("attention_concentration", "attention concentration: mean entropy / log N (1 = uniform)"),
    ("dead_prototype_share", "dead prototype share (no training image of their class won)"),
    ("median_push_similarity", "median push similarity"), ("median_prepush_similarity", "median pre-push similarity"),
    ("never_pushed", "valid prototypes never pushed"))


def _faithfulness_html(faithfulness: Mapping[str, Any]) -> str:
    out = ["<p>Deletion test (a CaBRNet-style perturbation test): for each test image, the top-k tokens of the "
           "predicted class's winning prototype's evidence map are replaced by the image's mean token (in the "
           "backbone's feature space, pooled vector unchanged) and the drop of the predicted class's logit is "
           "recorded, next to the drop when k random tokens are replaced; a faithful map makes the explained drop "
           "larger than the random one.</p>"]
    explained, random = faithfulness.get("deletion_drop_explained"), faithfulness.get("deletion_drop_random")
    if explained and random:
        out.append(_table(("k", "explained drop", "random drop"),
                          list(zip(faithfulness.get("k", range(1, len(explained) + 1)), explained, random,
                                   strict=False))))
    else:
        out.append("<p>No deletion test: this head gives no per-token evidence map.</p>")
    out.append(_table(("measure", "value"), [(label, faithfulness.get(key)) for key, label in FAITHFULNESS_SCALARS]))
    shares = faithfulness.get("top_prototype_win_share") or {}
    effective = faithfulness.get("effective_prototypes") or {}
    if shares:
        out.append("<p>Share of each class's training images won by its most-winning prototype, and the effective "
                   "number of prototypes that explain the class (exp of the entropy of the wins; 1 = one prototype "
                   "explains every image of the class):</p>"
                   + _table(("class", "top prototype win share", "effective prototypes"),
                            [(name, share, effective.get(name)) for name, share in shares.items()]))
    return "\n".join(out)


def write_html(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    return write_text_atomic(path, text)
