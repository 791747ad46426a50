"""pretrain(config): SimCLR contrastive pretraining of a registry backbone, without labels.

dataset (every training image, plus the data set's separate unlabeled images; for folder:PATH the images of
labeled/ and unlabeled/ as advise sees them, data/folder_pool.py, so a folder of unlabeled images alone is
enough) -> an endless index stream ->
two SimCLR views of each image on the device (augment/contrastive.py) -> the backbone's forward_features ->
a projection head (Linear-BN-ReLU-Linear) -> NT-Xent (core/contrastive.py) -> SGD with momentum, weight decay
on kernels only (core/optim.py), linear warm-up then cosine to 0 -> every eval_every steps a kNN accuracy of
the frozen features (the data set's labels, for this monitor only) -> metrics row, checkpoint -> summary.

The run directory is train's (runs/rundir.py: lock, config.yaml, metrics.jsonl, tensorboard/, checkpoints/
last.pt, summary.json). last.pt is a train checkpoint envelope: the model description of
model_spec.checkpoint_fields, "model" = the registry network's state dict (its classifier head untrained),
"ema": None, plus this loop's own fields ("projection_head", "optimizer", "rng", "loss_sums"). So
``load_model_checkpoint(RUN_DIR)`` returns the pretrained network, and ``train --init-weights RUN_DIR`` starts
from it. A resumed run continues exactly: the index stream and the view generator are functions of (seed, step),
everything else is in the checkpoint.

Measured on Fashion-MNIST with cnn_small on an idle 2-core CPU (kNN k = 200 over a 10,000-image bank, the
10,000 test images queried): the untrained network's features give 72.0%; B = 128 with the defaults gives 71.2%
after 150 steps (24 s), 76.0% after 1000 (141 s) and 77.1% after 1500 (234 s) (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from fixmatch.augment.contrastive import SimCLRView
from fixmatch.augment.views import NO_FLIP_DATASETS
from fixmatch.config import (
    ConfigError,
    PretrainConfig,
    short_repr,
    validate_overrides,
)
from fixmatch.core.contrastive import knn_accuracy, nt_xent
from fixmatch.core.files import append_line, write_text_atomic
from fixmatch.core.optim import make_optimizer, set_lr
from fixmatch.core.preprocess import channel_stats, normalize, predict_logits, resolve_device
from fixmatch.data.batches import IndexStream
from fixmatch.data.datasets import Dataset, default_data_dir, load_dataset
from fixmatch.data.folder_pool import load_folder_pool
from fixmatch.data.pool import gather_pool
from fixmatch.models import create_model
from fixmatch.runs.checkpoint import (
    CheckpointFields,
    load_checkpoint,
    restore_optimizer,
    restore_rng,
    resume_fix,
    save_checkpoint,
    tensor_like,
)
from fixmatch.runs.log import RunLogger, read_metrics, truncate_metrics, write_json_atomic
from fixmatch.runs.model_spec import checkpoint_fields
from fixmatch.runs.rundir import RunDir
from fixmatch.training import distributed
from fixmatch.training.loop import TrainingInterrupted, stop_requests
from fixmatch.training.nonfinite import NonFiniteError
from fixmatch.training.state import CHECKPOINT_FORMAT

LOG_EVERY = 10  # steps between progress-bar refreshes (reading the loss syncs the device)
GREY_RANDAUGMENT_OPS = 2  # randaugment_ops null on grey images (config.PretrainConfig says what was measured)
PRETRAIN_METHOD = "simclr"  # the checkpoint's "pretrain" field: what trained the backbone


class PretrainInterrupted(TrainingInterrupted):
    """SIGINT/SIGTERM arrived: the step finished, a checkpoint was written, the run can be resumed."""

    def __init__(self, run_dir: Path, step: int) -> None:
        super().__init__(run_dir, step)
        self.args = (f"interrupted at step {step}; checkpoint saved. "
                     f"Resume with: fixmatch pretrain --out {run_dir} --resume",)


class ProjectionHead(nn.Sequential):
    """SimCLR's MLP g(h): Linear-BN-ReLU-Linear, from the backbone's features to the space NT-Xent compares in;
    trained with the backbone and dropped afterwards (the features before it transfer better, SimCLR sec. 4.2)."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__(nn.Linear(in_features, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_features))


def cosine_to_zero(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up from lr / warmup to lr over ``warmup`` steps, then lr * (1 + cos(pi k / K)) / 2 over the
    remaining K steps: SimCLR's schedule (which decays to 0, unlike FixMatch's 7*pi/16 cosine)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


@dataclass(eq=False)
class PretrainState:
    """What a pretraining run carries from step to step; ``state_dict`` is the checkpoint."""
    config: PretrainConfig
    model: nn.Module  # the registry network: its forward_features is trained, its classifier head is not
    head: ProjectionHead
    optimizer: torch.optim.Optimizer
    model_fields: dict[str, Any]  # model_spec.checkpoint_fields: what loading the network needs
    class_names: list[str]
    device: torch.device
    step: int = 0
    loss_sum: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))  # since the last row
    loss_steps: int = 0
    finite: Tensor = field(default_factory=lambda: torch.ones((), dtype=torch.bool))  # every loss so far finite
    best_knn: float | None = None
    wall_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def wall_s(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def state_dict(self) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        return {"format": CHECKPOINT_FORMAT, "pretrain": PRETRAIN_METHOD, "step": self.step,
                "model": self.model.state_dict(), "ema": None, "config": self.config.to_dict(),
                "class_names": list(self.class_names), **self.model_fields,
                "projection_head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "loss_sums": {"sum": self.loss_sum.detach().cpu(), "steps": self.loss_steps},
                "best_knn": self.best_knn, "wall_s": self.wall_s(),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(self.device) if cuda else None}}

    def load_state_dict(self, state: dict[str, Any], path: Path, fix: str) -> None:
        saved = CheckpointFields(state, path, fix)
        if state.get("pretrain") != PRETRAIN_METHOD:
            raise saved.error("pretrain", f"is {short_repr(state.get('pretrain'))}, so this is no pretrain "
                                          "checkpoint")
        self.step, self.wall_before = saved.integer("step"), saved.number("wall_s")
        self.started = time.perf_counter()
        saved.restore("model", self.model.load_state_dict)
        saved.restore("projection_head", self.head.load_state_dict)
        saved.restore("optimizer", lambda s: restore_optimizer(self.optimizer, s))
        sums = saved.get("loss_sums")
        if not isinstance(sums, dict):
            raise saved.error("loss_sums", "is not a mapping")
        self.loss_sum = tensor_like(sums.get("sum"), self.loss_sum).to(self.loss_sum.device, torch.float64)
        self.loss_steps = CheckpointFields(sums, path, fix).integer("steps")
        best = state.get("best_knn")
        self.best_knn = float(best) if isinstance(best, (int, float)) and not isinstance(best, bool) else None
        saved.restore("rng", lambda r: restore_rng(r, self.device))  # last: it changes global state


def pretrain(config: PretrainConfig | None, out: str | Path, resume: bool = False) -> dict[str, Any]:
    """Pretrain (or resume) the run in ``out`` and return its summary (also RUN_DIR/summary.json).

    ``config=None`` with ``resume=True`` continues with the run's saved configuration.
    """
    if distributed.read_env().enabled:
        raise ConfigError("fixmatch pretrain runs in one process; start it without torchrun")
    if config is None and not resume:
        raise ConfigError("pretrain() needs a PretrainConfig unless it resumes a run")
    run = RunDir(out)
    with run.lock():  # one writer per run directory; the OS releases it even if the process is killed
        if resume:
            # The saved configuration; a change, a hand-edited config.yaml or a train run is one line.
            config = run.resume_config(config, PretrainConfig)
        else:
            run.check_unused()
        if not isinstance(config, PretrainConfig):
            raise ConfigError(f"pretrain() expects a fixmatch.config.PretrainConfig, got {type(config).__name__}")
        validate_overrides(config.to_dict(), "the config", PretrainConfig)
        return _pretrain(config, run, resume)


def _pretrain(config: PretrainConfig, run: RunDir, resume: bool) -> dict[str, Any]:
    device = resolve_device(config.device)
    data, no_knn = load_pretrain_data(config)
    resumed = resume and run.last_checkpoint.is_file()  # else: stopped before its first checkpoint, restarted
    flip = config.flip if config.flip is not None else config.dataset not in NO_FLIP_DATASETS
    randaugment_ops = config.randaugment_ops
    if randaugment_ops is None:  # grey images have no colour distortion: RandAugment's ops make the views differ
        randaugment_ops = GREY_RANDAUGMENT_OPS if data.in_channels == 1 else 0
    view = SimCLRView(crop_scale=(config.crop_scale, 1.0), flip=flip, jitter=config.jitter,
                      grey_prob=config.grey_prob, randaugment_ops=randaugment_ops)
    # Every image the data set has is unlabeled data here: the training images and its separate unlabeled ones.
    pool_size = data.train_labels.numel() + data.num_unlabeled_extra
    if pool_size < config.batch_size:
        raise ConfigError(f"{config.dataset} has {pool_size} images but --batch-size is {config.batch_size}; "
                          f"lower --batch-size")
    stream = IndexStream(torch.arange(pool_size), config.batch_size, config.seed, stream_id=2)

    torch.manual_seed(config.seed)
    model_kwargs: dict[str, Any] = {"image_size": list(data.image_size)}
    model = create_model(config.model, data.num_classes, data.in_channels, **model_kwargs).to(device)
    width = int(model.num_features)
    head = ProjectionHead(width, config.proj_hidden or width, config.proj_dim).to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    # One optimiser over both: decay on kernels only (core/optim.py), plain momentum as SimCLR's LARS has.
    optimizer = make_optimizer(nn.ModuleDict({"backbone": model, "head": head}), config.lr, config.momentum,
                               False, config.wd)
    state = PretrainState(config, model, head, optimizer, checkpoint_fields(config.model, model_kwargs, data),
                          list(data.class_names), device,
                          loss_sum=torch.zeros((), dtype=torch.float64, device=device),
                          finite=torch.ones((), dtype=torch.bool, device=device))
    if resumed:
        fix = resume_fix(run.path)
        state.load_state_dict(load_checkpoint(run.last_checkpoint, map_location=device, fix=fix), run.last_checkpoint,
                              fix)
        truncate_metrics(run.metrics_file, state.step)
    else:
        run.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run.config_file, yaml.safe_dump(config.to_dict(), sort_keys=False))
        run.metrics_file.unlink(missing_ok=True)

    mean, std = channel_stats(data.mean, data.std, device)
    knn = KnnMonitor(data, config) if no_knn is None else None
    logger = RunLogger(run.path, config.steps, state.step, config.progress, tensorboard=True)
    logger.write(f"fixmatch pretrain: SimCLR on {config.dataset} ({pool_size:,} images, labels unused), "
                 f"{config.model}, {config.steps} steps of {config.batch_size} images x 2 views on {device}; "
                 f"run directory {run.path}" + ("" if knn else f"; no kNN monitor: {no_knn}"))
    generator = torch.Generator(device=device)
    model.train()
    head.train()
    state.started = time.perf_counter()
    try:
        with stop_requests(distributed.DistEnv()) as stop_requested:
            while state.step < config.steps:
                lr = cosine_to_zero(state.step, config.steps, config.lr, config.warmup)
                set_lr(optimizer, lr)
                generator.manual_seed(distributed.augment_seed(config.seed, state.step, 0))
                x = gather_pool(data.train_images, data.unlabeled_images, stream.batch(state.step),
                                pin=device.type == "cuda").to(device, non_blocking=True)
                loss = pretrain_step(state, x, view, generator, mean, std)
                if state.step % LOG_EVERY == 0 or state.step == config.steps:
                    _check_finite(state, run)
                    _log_step(logger, state, loss, lr)
                evaluated = state.step % config.eval_every == 0 or state.step == config.steps
                if evaluated:
                    _evaluate_and_checkpoint(state, knn, mean, std, lr, logger, run)
                # A request during the last step lets the run finish: its final checkpoint is written already.
                if state.step < config.steps and stop_requested():
                    if not evaluated:
                        _check_finite(state, run)
                        save_checkpoint(state.state_dict(), run.last_checkpoint)
                    raise PretrainInterrupted(run.path, state.step)
    finally:
        logger.close()
    return _finish(state, run)


UNLABELED_CLASS = "unlabeled"  # a folder without labeled/ classes: the (untrained, unused) head's one output


def load_pretrain_data(config: PretrainConfig) -> tuple[Dataset, str | None]:
    """The images to pretrain on, and why there is no kNN monitor (None where there is one).

    A folder is read as advise reads it (folder_pool.py): labeled/<class>/ and unlabeled/ (either may be missing),
    so its cache, image size and rows are the ones advise embeds. They all become the Dataset's train images, with
    label -1 for the unlabeled ones (labels serve the kNN monitor only); test/<class>/'s images, decoded at the
    same size, are the kNN queries where labeled/ gives the reference labels. A built-in data set is loaded as
    train loads it.
    """
    if not config.dataset.startswith("folder:"):
        data = load_dataset(config.dataset, config.data_dir, image_size=config.image_size,
                            on_bad_image=config.on_bad_image)
        has_labels = data.test_labels.numel() and data.train_labels.numel()
        return data, None if has_labels else "the data set has no test labels"
    root = Path(config.dataset[len("folder:"):]).expanduser()
    data_dir = default_data_dir() if config.data_dir is None else config.data_dir
    pool = load_folder_pool(root, data_dir, config.image_size, test=True, on_bad_image=config.on_bad_image)
    labels = torch.full((pool.images.shape[0],), -1, dtype=torch.int64)
    index = {c: i for i, c in enumerate(pool.classes)}
    for row, name in pool.labeled.items():
        labels[row] = index[name]
    test_images = pool.test_images if pool.test_images is not None else pool.images[:0]
    test_labels = pool.test_labels if pool.test_labels is not None else torch.zeros(0, dtype=torch.int64)
    # The Dataset computes the channel statistics the network is standardised with over all of its train images.
    data = Dataset(name=f"folder:{root}", train_images=pool.images, train_labels=labels, test_images=test_images,
                   test_labels=test_labels, class_names=pool.classes or [UNLABELED_CLASS])
    if not test_labels.numel() or not pool.labeled:
        return data, (f"it needs labeled/<class>/ images as reference and test/<class>/ images to query in {root}; "
                      "pretraining itself uses no labels")
    return data, None


def pretrain_step(state: PretrainState, x: Tensor, view: SimCLRView, generator: torch.Generator, mean: Tensor,
                  std: Tensor) -> Tensor:
    """One SimCLR step on uint8 images ``x`` (B, C, H, W) on the device; returns the loss (no sync)."""
    channels_last = state.config.channels_last
    # Both views in one forward pass: BatchNorm normalises over all 2B views, as SimCLR's global BN does.
    views = torch.cat([view(x, generator), view(x, generator)])
    z = state.head(state.model.forward_features(normalize(views, mean, std, channels_last)))
    loss = nt_xent(z[:x.shape[0]], z[x.shape[0]:], state.config.temperature)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.step += 1
    loss = loss.detach()
    state.finite &= torch.isfinite(loss)
    state.loss_sum += loss.double()
    state.loss_steps += 1
    return loss


def _check_finite(state: PretrainState, run: RunDir) -> None:
    """Stop at the first non-finite loss found, before it reaches a checkpoint (the last one stays as it was)."""
    if not bool(state.finite):
        raise NonFiniteError(f"pretrain: the loss became NaN or infinite before step {state.step}; "
                             f"{run.last_checkpoint} (if any) is intact; lower --lr or raise --temperature and "
                             f"start again with another --out")


def _log_step(logger: RunLogger, state: PretrainState, loss: Tensor, lr: float) -> None:
    value = loss.item()
    logger.bar.update(state.step - logger.bar.n)
    logger.bar.set_postfix_str(f"loss={value:.3f} lr={lr:.4f}", refresh=False)
    if logger.writer is not None:
        logger.writer.add_scalar("train/loss", value, state.step)
        logger.writer.add_scalar("train/lr", lr, state.step)


class KnnMonitor:
    """The kNN accuracy of the frozen features: a fixed bank of training images with their labels, the test set
    queried (core/contrastive.knn_accuracy). The labels serve this monitor only."""

    def __init__(self, data: Dataset, config: PretrainConfig) -> None:
        labeled = torch.nonzero(data.train_labels >= 0).squeeze(1)  # a folder's unlabeled images are -1
        n = labeled.numel()
        if config.knn_bank is not None and config.knn_bank < n:
            picked = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))[:config.knn_bank]
            picked = labeled[picked.sort().values]
        else:
            picked = labeled
        self.bank_images, self.bank_labels = data.train_images[picked], data.train_labels[picked]
        self.test_images, self.test_labels = data.test_images, data.test_labels
        self.num_classes, self.k = data.num_classes, config.knn_k
        self.batch_size, self.channels_last = config.eval_batch_size, config.channels_last

    def accuracy(self, model: nn.Module, mean: Tensor, std: Tensor) -> float:
        def features(images: Tensor) -> Tensor:
            return predict_logits(model, images, mean, std, self.batch_size, self.channels_last,
                                  forward=model.forward_features)
        return knn_accuracy(features(self.bank_images), self.bank_labels, features(self.test_images),
                            self.test_labels, self.num_classes, self.k)


def _evaluate_and_checkpoint(state: PretrainState, knn: KnnMonitor | None, mean: Tensor, std: Tensor, lr: float,
                             logger: RunLogger, run: RunDir) -> None:
    _check_finite(state, run)
    knn_acc = knn.accuracy(state.model, mean, std) if knn is not None else None
    loss = state.loss_sum.item() / state.loss_steps if state.loss_steps else None
    row = {"step": state.step, "loss": loss, "knn_acc": knn_acc, "lr": lr, "wall_s": state.wall_s()}
    append_line(run.metrics_file, json.dumps(row))  # before the checkpoint: a resume from it redoes no row
    if logger.writer is not None:
        for key in ("loss", "knn_acc"):
            if row[key] is not None:
                logger.writer.add_scalar(f"eval/{key}", row[key], state.step)
        logger.writer.flush()
    shown = "-" if knn_acc is None else f"{knn_acc:6.2f}%"
    logger.write(f"step {state.step:>7d} | kNN acc {shown} | loss {'-' if loss is None else f'{loss:.4f}'} | "
                 f"lr {lr:.5f}")
    if knn_acc is not None:
        state.best_knn = knn_acc if state.best_knn is None else max(state.best_knn, knn_acc)
    state.loss_sum.zero_()
    state.loss_steps = 0
    save_checkpoint(state.state_dict(), run.last_checkpoint)


def summarize(run: RunDir, config: PretrainConfig, wall_s: float) -> dict[str, Any]:
    """From metrics.jsonl, so the same whether or not the run was resumed."""
    rows = read_metrics(run.metrics_file)
    accs = [r["knn_acc"] for r in rows if r.get("knn_acc") is not None]
    return {"dataset": config.dataset, "method": PRETRAIN_METHOD, "model": config.model, "seed": config.seed,
            "steps": rows[-1]["step"] if rows else 0, "loss_last": rows[-1]["loss"] if rows else None,
            "knn_acc_last": accs[-1] if accs else None, "knn_acc_best": max(accs) if accs else None,
            "knn_k": config.knn_k, "wall_s": wall_s}


def _finish(state: PretrainState, run: RunDir) -> dict[str, Any]:
    summary = summarize(run, state.config, state.wall_s())
    write_json_atomic(run.summary_file, summary)
    acc = summary["knn_acc_last"]
    print(f"done: {summary['steps']} steps in {summary['wall_s']:.0f} s"
          + ("" if acc is None else f", kNN accuracy {acc:.2f}% (k={state.config.knn_k})")
          + f"; pretrained backbone in {run.path} (use it with: fixmatch train --init-weights {run.path})",
          flush=True)
    return summary
