"""``protohead explain``: prototype galleries, per-image explanations, diagnostics and a self-contained HTML report.

:func:`explain_run` reads a finished run directory (read-only) and writes into ``RUN_DIR/explain/``:
``gallery_<class>.png``, ``explain_<image_id>.png``, ``diagnostics.json`` and ``report.html``. The work is in
:mod:`protohead.explain.run`; figures in ``gallery`` / ``explanations``, measures in ``diagnostics``, the
page in ``report``.
"""

from protohead.explain.diagnostics import dead_prototypes, near_duplicates, purity, push_records, win_counts
from protohead.explain.explanations import EXPLANATION_SIZE
from protohead.explain.gallery import gallery_size, token_box
from protohead.explain.run import ExplainResult, explain_run, load_model, read_run_config

__all__ = [
    "EXPLANATION_SIZE",
    "ExplainResult",
    "dead_prototypes",
    "explain_run",
    "gallery_size",
    "load_model",
    "near_duplicates",
    "purity",
    "push_records",
    "read_run_config",
    "token_box",
    "win_counts",
]
