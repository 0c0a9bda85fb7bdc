"""evaluate(): score any model (checkpoint or export) on labelled data; writes an evaluation folder with
metrics.json, predictions.csv, plots/ and report.html."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.datasets import load_data
from ..errors import StopsignError
from ..reporting.metrics import Predictions
from ..reporting.report import write_report
from ..runs import create_run_dir, run_upload
from .load import load_classifier


def evaluate(checkpoint: str | Path, data: str | Path, *, out: str | Path = "runs", name: str | None = None,
             threshold: float | None = None, progress: bool = True, **options) -> tuple[Path, dict]:
    """Score a model on labelled data in any layout, at `threshold` (None: the model's own); return the evaluation
    folder and its metrics. The model, the
    data and `out` may be URLs (s3://...). `options` go to load_classifier: a .pt model reads its backbone features
    from training's feature cache, so evaluating the same images again makes no backbone pass (cache=False: none)."""
    classifier = load_classifier(checkpoint, **options)
    labelled = load_data(data, class_names=classifier.class_names, progress=progress)
    out_dir = create_run_dir(out, name, "eval")
    readable, probs, skipped, copies = classifier.score([s.path for s in labelled.samples], progress=progress)
    if not readable:
        raise StopsignError(f"none of the {len(labelled.samples)} images in {data} could be read (the warnings above "
                            "say why); nothing to score. Fix: point at readable photos")
    label_of = {s.path: s.label for s in labelled.samples}
    predictions = Predictions([str(p) for p in readable], np.array([label_of[p] for p in readable]), probs,
                              classifier.class_names, copies=copies)
    run_info = {"checkpoint": str(checkpoint), "data": {"source": str(labelled.root), "layout": labelled.layout,
                                                        "counts": labelled.class_counts()},
                "skipped files": skipped or "none", "backbone": classifier.backbone_name}
    metrics = write_report(out_dir, predictions, run_info=run_info,
                           threshold=classifier.threshold if threshold is None else threshold,
                           title=f"stopsign evaluation of {checkpoint}")
    upload = run_upload(out, out_dir)  # --out s3://...: the evaluation folder goes to the bucket too
    if upload:
        upload.finish()
    return out_dir, metrics
