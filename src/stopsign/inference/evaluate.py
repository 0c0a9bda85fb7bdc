"""evaluate(): score any model (checkpoint or export) on labelled data; writes an evaluation folder with
metrics.json, predictions.csv, plots/ and report.html (a checkpoint's mistakes outlined where it looked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.datasets import load_data
from ..errors import StopsignError
from ..reporting.metrics import Predictions
from ..reporting.photos import shown_mistakes
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
    readable, probs, skipped, match = classifier.score([s.path for s in labelled.samples], progress=progress)
    if not readable:
        raise StopsignError(f"none of the {len(labelled.samples)} images in {data} could be read (the warnings above "
                            "say why); nothing to score. Fix: point at readable photos")
    label_of = {s.path: s.label for s in labelled.samples}
    predictions = Predictions([str(p) for p in readable], np.array([label_of[p] for p in readable]), probs,
                              classifier.class_names, copies=match.copies if match else None,
                              unfamiliar=match.unfamiliar if match else None)
    run_info = {"checkpoint": str(checkpoint), "data": {"source": str(labelled.root), "layout": labelled.layout,
                                                        "counts": labelled.class_counts()},
                "skipped files": skipped or "none", "backbone": classifier.backbone_name}
    threshold = classifier.threshold if threshold is None else threshold
    if classifier.explains:  # the mistakes the report shows, outlined where the model looked: a pass each
        predictions.boxes = [None] * len(readable)
        mistakes = shown_mistakes(predictions.with_threshold(threshold))
        for index, looked in zip(mistakes, classifier.explanations([readable[i] for i in mistakes])):
            predictions.boxes[index] = looked.fractions()
    metrics = write_report(out_dir, predictions, run_info=run_info, threshold=threshold,
                           title=f"stopsign evaluation of {checkpoint}")
    upload = run_upload(out, out_dir)  # --out s3://...: the evaluation folder goes to the bucket too
    if upload:
        upload.finish()
    return out_dir, metrics
