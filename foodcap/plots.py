"""Training records (JSONL + CSV beside the checkpoints) and the loss-curve PNG drawn from them.

    python -c "from foodcap.plots import plot_run; plot_run('model_checkpoints')"   # -> model_checkpoints/loss_curve.png
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Optional

from .utils import atomic_path, write_atomic

log = logging.getLogger(__name__)

LOG_JSONL = "train_log.jsonl"
LOG_CSV = "train_log.csv"
LOSS_CURVE = "loss_curve.png"


def read_records(path: str | os.PathLike) -> list[dict]:
    """Records of a train_log.jsonl; a line cut short by a killed run is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class RunLog:
    """Appends one JSON object per event to <out_dir>/train_log.jsonl; exports CSV + PNG on demand (main process only)."""

    def __init__(self, out_dir: str | os.PathLike, *, enabled: bool = True):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.path = self.out_dir / LOG_JSONL
        if enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop what a killed run logged after its last checkpoint, so the curve continues from there."""
        if not self.enabled:
            return
        kept = [r for r in read_records(self.path) if r.get("step", 0) <= step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def export(self, *, plot: bool = True) -> None:
        if not self.enabled:
            return
        records = read_records(self.path)
        write_csv(records, self.out_dir / LOG_CSV)
        if plot:
            try:
                plot_loss_curve(records, self.out_dir / LOSS_CURVE)
            except Exception as exc:  # noqa: BLE001 - a missing font or backend must not stop training
                log.warning("loss curve not drawn: %s", exc)


def write_csv(records: list[dict], path: str | os.PathLike) -> Path:
    """One row per record; columns are the union of the records' keys (step and epoch first)."""
    columns: list[str] = ["step", "epoch"]
    for record in records:
        columns += [k for k in record if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for record in records:
        writer.writerow({k: record.get(k, "") for k in columns})
    return write_atomic(path, buffer.getvalue())


def _series(records: Iterable[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_loss_curve(records: list[dict], path: str | os.PathLike, *, title: Optional[str] = None) -> Optional[Path]:
    """Training loss by step and validation loss at each epoch end, as a PNG (Agg backend, atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_x, train_y = _series(records, "train_loss")
    val_x, val_y = _series(records, "val_loss")
    if not train_x and not val_x:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train_x:
        ax.plot(train_x, train_y, label="training loss", color="tab:blue", linewidth=1.2)
    if val_x:
        ax.plot(val_x, val_y, "o-", label="validation loss", color="tab:orange", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per caption token")
    ax.set_title(title or "foodcap training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def plot_run(out_dir: str | os.PathLike) -> Optional[Path]:
    out_dir = Path(out_dir)
    return plot_loss_curve(read_records(out_dir / LOG_JSONL), out_dir / LOSS_CURVE)
