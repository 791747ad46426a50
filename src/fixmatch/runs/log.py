"""What a run reports: a progress bar, one line per evaluation, the metrics file and TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm import tqdm

from fixmatch.core.files import append_line, read_run_file, write_text_atomic
from fixmatch.runs.rundir import RunDir, RunDirError

# Pseudo-label accuracy is measured only where the true labels of at least this share of the unlabeled pool are
# known. Measured on a small known part, such as a folder data set's labeled images (which the model also learns
# from, so it soon gets them all right), it would read near 100% whatever the pseudo-labels of the rest are.
PSEUDO_LABEL_KNOWN_MIN = 0.9


def unmeasured_pseudo_labels(labels: Tensor) -> str:
    """Why the pseudo-label accuracy is not measured, or "" when it is.

    ``labels``: the true label of each image of the unlabeled pool, -1 where unknown (data/pool.py).
    """
    total = int(labels.numel())
    unknown = int((labels < 0).sum())
    if total == 0 or total - unknown >= PSEUDO_LABEL_KNOWN_MIN * total:
        return ""
    return (f"pseudo-label accuracy is not shown (pl-acc -, pseudo_label_acc null): the unlabeled images have no "
            f"labels to check it against ({unknown:,} of the {total:,} images of the unlabeled pool)")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics file (``RunDir.metrics_file``). A last line without its newline is a write
    cut short (power loss during append_line) and is left out: its evaluation comes before its checkpoint, so a
    resume redoes it."""
    path = Path(path)
    text = read_run_file(path)  # a link, a FIFO or a device there is refused in one line, never read
    if text is None:
        return []
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row = e
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise RunDirError(f"{path} line {number} is not a metrics row ({line[:40]!r}); repair or remove that "
                              f"line, then resume")
        rows.append(row)
    return rows


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """On resume, drop evaluations logged after the checkpoint we continue from (they will be redone)."""
    rows = [r for r in read_metrics(path) if r["step"] <= last_step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


class RunLogger:
    """Writes the run's metrics file (one JSON object per evaluation) and TensorBoard scalars; drives the bar."""

    def __init__(self, run_dir: str | Path | RunDir, total_steps: int, start_step: int, progress: bool,
                 tensorboard: bool = True) -> None:
        run = RunDir(run_dir)
        self.metrics_path = run.metrics_file
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it is slow to import
            self.writer = SummaryWriter(log_dir=str(run.tensorboard), purge_step=start_step or None)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not progress, unit="step",
                        dynamic_ncols=True, smoothing=0.05)

    def step(self, n: int, loss_s: float, loss_u: float, mask_rate: float, lr: float, step: int) -> None:
        self.bar.update(n)
        self.bar.set_postfix_str(f"Ls={loss_s:.3f} Lu={loss_u:.3f} mask={mask_rate:.2f} lr={lr:.4f}",
                                 refresh=False)
        if self.writer is not None:
            for key, value in (("train/loss_s", loss_s), ("train/loss_u", loss_u),
                               ("train/mask_rate", mask_rate), ("train/lr", lr)):
                self.writer.add_scalar(key, value, step)

    def evaluation(self, row: dict[str, Any]) -> None:
        append_line(self.metrics_path, json.dumps(row))  # fsynced; a failed write leaves no torn line
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"eval/{key}", value, row["step"])
            self.writer.flush()

        def shown(key: str, fmt: str, unit: str = "") -> str:  # None: undefined (no pseudo-label, or all skipped)
            return "-" if row[key] is None else format(row[key], fmt) + unit
        # FlexMatch, FreeMatch, SoftMatch: their effective threshold (mean, minimum over classes) and mean weight.
        policy = (f" | thr {row['threshold_mean']:.3f} (min {row['threshold_min']:.3f}) w {shown('weight_mean', '.3f')}"
                  if row.get("threshold_mean") is not None else "")
        self.write(
            f"step {row['step']:>7d} | test acc {row['test_acc']:6.2f}% (raw {row['raw_test_acc']:6.2f}%, "
            f"top-5 {row['test_top5']:6.2f}%) | Ls {shown('loss_s', '.3f')} Lu {shown('loss_u', '.3f')} | "
            f"mask {shown('mask_rate', '.3f')} pl-acc {shown('pseudo_label_acc', '6.2f', '%'):>7} | "
            f"lr {row['lr']:.5f}{policy}")

    def image(self, tag: str, image: Any, step: int) -> None:
        """Logs an RGB uint8 image (H, W, 3) to TensorBoard (e.g. the augmentation grid)."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
