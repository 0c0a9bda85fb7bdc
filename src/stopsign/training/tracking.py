"""`--log tensorboard`: a run's settings, its metrics.csv rows as they are written, its final evaluation figures
and its report (the model card, the charts) as TensorBoard event files in RUN/tensorboard/, through
torch.utils.tensorboard. The tensorboard package is an optional extra: check_tracking says so before any work."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import Settings
from ..errors import StopsignError

EPOCH_SCALARS = {"train_loss": "train/loss", "train_acc": "train/accuracy", "val_loss": "val/loss",
                 "val_acc": "val/accuracy", "lr": "train/lr"}
EVALUATION_FIGURES = ("accuracy", "balanced_accuracy", "log_loss")


def check_tracking(log: str | None) -> None:
    """A one-line error naming the pip command when `--log tensorboard` is asked and tensorboard is missing."""
    if log != "tensorboard":
        return
    try:
        import tensorboard  # noqa: F401  (SummaryWriter needs it; torch does not bring it)
    except ImportError:
        raise StopsignError("--log tensorboard needs the tensorboard package, which is not installed. "
                            "Fix: pip install 'stopsign[tensorboard]'") from None


def open_tracker(settings: Settings, run_dir: Path) -> TensorBoard | None:
    """The tracker `--log` asks for, writing into the run folder; None without --log."""
    return TensorBoard(run_dir / "tensorboard", settings.to_dict()) if settings.run.log == "tensorboard" else None


class TensorBoard:
    """A run's event files: one scalar per metrics.csv column per epoch, then the run's settings beside its final
    figures (TensorBoard's HPARAMS tab), the model card as text and the report's charts as images."""

    def __init__(self, log_dir: Path, settings: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.settings = SummaryWriter(str(log_dir)), settings

    def log_epoch(self, row: dict) -> None:
        """One metrics.csv row (a logistic head has one, without a learning rate)."""
        for column, tag in EPOCH_SCALARS.items():
            if row.get(column) is not None:
                self.writer.add_scalar(tag, row[column], row["epoch"])
        self.writer.flush()

    def log_run(self, run_summary: dict, run_dir: Path) -> None:
        """The flat settings against summary.json's evaluation figures and their baselines; the model card
        (README.md) and every chart of plots/; then the files are closed."""
        evaluation = run_summary.get("evaluation") or {}
        figures = {f"evaluation/{name}": evaluation[name] for name in EVALUATION_FIGURES
                   if evaluation.get(name) is not None}
        figures |= {f"baseline/{name}": evaluation["baseline"][name] for name in EVALUATION_FIGURES
                    if evaluation and evaluation["baseline"].get(name) is not None}
        # add_hparams takes numbers, text and booleans only: an unset setting is shown as "none"
        hparams = {name: "none" if value is None else value for name, value in self.settings.items()}
        self.writer.add_hparams(hparams, figures, run_name=".")
        if (card := run_dir / "README.md").is_file():
            self.writer.add_text("model card", card.read_text(encoding="utf-8"))
        for chart in sorted((run_dir / "plots").glob("*.png")):
            self.writer.add_image(f"charts/{chart.stem}", read_rgb(chart), dataformats="HWC")
        self.writer.close()


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
