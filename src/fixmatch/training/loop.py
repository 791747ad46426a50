"""train(config): the FixMatch loop, in the order the data flows.

dataset -> split -> index streams -> weak/strong augmentation on the device -> one forward pass
-> fixmatch_loss -> SGD + cosine schedule -> EMA -> evaluation -> metrics, checkpoint, summary.
Under torchrun every process runs this loop on its slice of each global batch; rank 0 alone evaluates
and writes (distributed.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from fixmatch.augment.views import build_views
from fixmatch.augment.visualize import AugmentGrids
from fixmatch.config import (
    Config,
    ConfigError,
    check_config,
    check_runtime,
)
from fixmatch.core.dist_align import DistributionAlignment
from fixmatch.core.files import write_text_atomic
from fixmatch.core.metrics import accuracy_metrics, confusion_matrix, macro_f1
from fixmatch.core.preprocess import channel_stats, predict_logits, resolve_device
from fixmatch.data.batches import IndexStream
from fixmatch.data.datasets import Dataset, DatasetError, load_dataset
from fixmatch.data.pool import pool_labels
from fixmatch.data.split import Split, fold_split, load_split, save_split, train_digest, unlabeled_pool
from fixmatch.models import create_model
from fixmatch.runs.checkpoint import (
    load_checkpoint,
    resume_fix,
    save_checkpoint,
)
from fixmatch.runs.log import RunLogger, read_metrics, truncate_metrics, unmeasured_pseudo_labels, write_json_atomic
from fixmatch.runs.model_spec import checkpoint_fields
from fixmatch.runs.rundir import RunDir
from fixmatch.training import budget, distributed
from fixmatch.training.batches import Batches, View
from fixmatch.training.init_weights import init_from
from fixmatch.training.label_selection import select_labels
from fixmatch.training.speed import find_cpu_compiler
from fixmatch.training.state import TrainState, new_train_state
from fixmatch.training.step import StepStats, train_step

LOG_EVERY = 10  # steps between progress-bar refreshes: reading losses forces a device sync


def _dataset_options(config: Config) -> dict[str, Any]:
    """What load_dataset needs beyond the name (check_combinations has refused keys for other data sets)."""
    return {"extra": True} if config.svhn_extra else {}


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived: the step finished, a checkpoint was written, the run can be resumed."""

    def __init__(self, run_dir: Path, step: int) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved. "
                         f"Resume with: fixmatch train --out {run_dir} --resume")
        self.run_dir, self.step = run_dir, step


def _split_for(config: Config, run: RunDir, resume: bool, data: Dataset, device: torch.device) -> Split:
    digest = train_digest(data.train_images, data.train_labels)
    if resume:
        split = load_split(run.split_file, num_train=data.train_labels.numel(), digest=digest)
    elif config.fold is not None:
        split = fold_split(data.folds, config.fold, data.train_labels.numel(), config.seed)
        if len(split.labeled) != config.num_labels:
            raise ConfigError(f"--fold {config.fold} labels the {len(split.labeled)} images of that fold; "
                              f"set --num-labels {len(split.labeled)}")
    elif data.labeled_indices is not None:  # --labels-csv: exactly the images a person labeled
        split = Split(labeled=sorted(data.labeled_indices), unlabeled=list(range(data.train_labels.numel())),
                      seed=config.seed, num_labels=len(data.labeled_indices))
    else:
        split = select_labels(config.label_selection, data.train_labels, config.num_labels, data.num_classes,
                              config.seed, images=data.train_images, split_file=config.split_file,
                              checkpoint=config.selection_checkpoint, digest=digest, device=device)
    if len(split.labeled) != config.num_labels:
        raise ConfigError(f"the split has {len(split.labeled)} labeled images but num_labels is "
                          f"{config.num_labels}; make them agree")
    return split if split.train_digest is not None or resume else dataclasses.replace(split, train_digest=digest)


@contextmanager
def stop_requests(env: distributed.DistEnv) -> Iterator[Callable[[], bool]]:
    """SIGINT/SIGTERM set a flag that the loop checks between steps, so a step is never cut in half.

    Under torchrun, a launcher that has died is a stop request too (distributed.LauncherWatch): the rank
    checkpoints and stops instead of training on alone.
    """
    received: list[int] = []
    handler = lambda signum, frame: received.append(signum)  # noqa: E731
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: signals stay with their owner
        pass
    # After the handlers: the launcher's death signal must find them (else SIGTERM's default would kill).
    launcher = distributed.LauncherWatch(env, signal.SIGTERM if previous else None)
    try:
        yield lambda: bool(received) or launcher.gone()
    finally:
        launcher.close()
        for sig, old in previous.items():
            signal.signal(sig, old)


def train(config: Config | None = None, out: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) one run and return its summary (also written to RUN_DIR/summary.json).

    ``config=None`` with ``resume=True`` continues with the run's saved configuration.
    """
    if resume and out is None:
        raise ConfigError("resuming needs the run directory (--out RUN_DIR)")
    if config is None and not resume:
        raise ConfigError("train() needs a Config unless it resumes a run")
    env = distributed.read_env()  # several processes under torchrun (distributed.py), else rank 0 of 1
    device_name = config.device if config is not None else RunDir(out).saved_config().device  # type: ignore[arg-type]
    device = distributed.process_device(resolve_device(device_name), env)
    with distributed.process_group(env, device):
        # Every rank uses rank 0's run directory (a default one is named after the time).
        run_dir = distributed.broadcast_object(Path(out) if out is not None else RunDir.default(config).path, env)
        # One writer per run directory (rank 0); the OS releases the lock even if the process is killed.
        with RunDir(run_dir).lock() if env.is_main else contextlib.nullcontext():
            return _train(config, run_dir, resume, env, device)


def _train(config: Config | None, run_dir: Path, resume: bool, env: distributed.DistEnv,
           device: torch.device) -> dict[str, Any]:
    started = budget.clock()  # a time budget counts from here: loading the data is part of the wait
    run = RunDir(run_dir)
    config = _run_config(config, run, resume, env, device)
    # --- data, split, batches: everything that can fail on bad input happens before anything is written
    data = load_dataset(config.dataset, config.data_dir, image_size=config.image_size,
                        on_bad_image=config.on_bad_image, labels_csv=config.labels_csv, **_dataset_options(config))
    if data.test_labels.numel() == 0:  # every evaluation would fail after the run directory was written
        raise DatasetError(f"{config.dataset} has no test images to measure accuracy on; add test/<class>/ images "
                           f"to the folder, or label at least 10 images of a class (10% of each such class is held "
                           f"out as the test set)")
    resumed = resume and run.last_checkpoint.is_file()  # else: killed before any checkpoint, restarted
    if data.labeled_indices is not None and not resumed and len(data.labeled_indices) != config.num_labels:
        # --labels-csv: num_labels is the number of images the file labels (config.yaml records it).
        if env.is_main:
            print(f"fixmatch: {config.labels_csv} labels {len(data.labeled_indices)} images: num_labels is "
                  f"{len(data.labeled_indices)}", file=sys.stderr)
        config = dataclasses.replace(config, num_labels=len(data.labeled_indices))
    split = _split_for(config, run, resumed, data, device)
    if config.label_selection not in ("random", "file") and not resumed:
        # Chosen from float features (k-means for typiclust): every rank trains on rank 0's choice, even where
        # another host's arithmetic would round a distance otherwise.
        split = distributed.broadcast_object(split, env)
    weak, strong = build_views(config)
    batches, pl_note = _batches_for(config, data, split, weak, env, device)
    align = _pseudo_label_transform(config, data, split, env)

    # --- model and training state
    torch.manual_seed(config.seed)
    # Extra backbone constructor arguments, recorded in checkpoints: the image size picks the stem
    # (CIFAR/ImageNet) or the ViT's patch grid.
    model_kwargs: dict[str, Any] = {"image_size": list(data.image_size)}
    model = create_model(config.model, data.num_classes, data.in_channels, **model_kwargs).to(device)
    # A pretrained backbone for fresh runs (a resumed run restores its own weights below); before the EMA copy, so
    # that the EMA starts from it too. A pretrain or train run must have built this same network.
    init_report = (init_from(model, config.init_weights, checkpoint_fields(config.model, model_kwargs, data),
                             config.dataset)
                   if config.init_weights and not resumed else None)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    mean, std = channel_stats(data.mean, data.std, device)
    make_state = functools.partial(new_train_state, mean=mean, std=std, split=split, class_names=data.class_names,
                                   model_fields=checkpoint_fields(config.model, model_kwargs, data),
                                   last_checkpoint=run.last_checkpoint, env=env, device=device,
                                   pool_size=len(batches.y_pool))
    plan = None
    if config.time_budget is not None:  # a new run (a resume has none left): a few timed steps choose its steps
        plan = budget.calibrate(config, started, budget.StepInputs(model, strong, align, make_state, batches, data),
                                env, device)
        config = plan.apply(config)
        if env.is_main:
            print(plan.describe(), flush=True)
    state = make_state(config, model, strong, align)
    distributed.barrier(env)  # every rank has checked the run directory before rank 0 writes to it
    if resumed:
        last, fix = run.last_checkpoint, resume_fix(run_dir)
        state.load_state_dict(load_checkpoint(last, map_location=device, fix=fix), last, fix)
        if env.is_main:
            truncate_metrics(run.metrics_file, state.step)
    elif env.is_main:
        _write_new_run(run, config, split, plan)

    logger = RunLogger(run_dir, config.steps, state.step, config.progress and env.is_main, tensorboard=env.is_main)
    # Grids of original/weak/strong views for TensorBoard, drawn with their own generator (results unchanged).
    grids = AugmentGrids(data.train_images, weak, strong, config.seed, config.eval_every, device)
    if env.is_main:
        processes = f" x {env.world_size} processes" if env.enabled else ""
        logger.write(f"fixmatch: {config.method} on {config.dataset} with {config.num_labels} labels, "
                     f"{config.model}, {config.steps} steps on {device}{processes}; run directory {run_dir}")
        if init_report is not None:
            logger.write(init_report.summary())
        if pl_note:
            logger.write(f"fixmatch: {pl_note}")
    # One line if the steps left would take more than a day, from the speed of the first few steps.
    slow = budget.SlowRunWarning(config.steps, state.step, device, logger.write if env.is_main else None)

    # --- the loop: lr -> batch -> step -> log -> evaluate -> checkpoint -> stop
    state.started = time.perf_counter()
    model.train()
    try:
        with stop_requests(env) as stop_requested:
            while state.step < config.steps:
                lr = state.set_lr()
                batch = batches.get(state.step, state.strong)
                stats = train_step(state, batch)
                slow.step_done(state.step)
                if state.step % LOG_EVERY == 0 or state.step == config.steps:
                    _log_progress(state, stats, lr, logger)
                if state.step % config.eval_every == 0 or state.step == config.steps:
                    _evaluate_and_checkpoint(state, data, lr, logger, grids, run)
                # Several processes agree on stopping where they sync anyway, so that all stop at the same step.
                # A request during the last step lets the run finish: its final checkpoint is written already.
                if state.step < config.steps and (stop_requested() if not env.enabled else (
                        state.step % LOG_EVERY == 0 and distributed.any_rank(stop_requested(), env, device))):
                    _checkpoint(state, run)
                    raise TrainingInterrupted(run_dir, state.step)
    finally:
        logger.close()
    return _finish(state, run)


def _run_config(config: Config | None, run: RunDir, resume: bool, env: distributed.DistEnv,
                device: torch.device) -> Config:
    """The configuration to train with: a resume's is the run's own (changes refused), a new run needs an unused
    directory; options this device or number of processes cannot run are refused before anything is written."""
    if resume:  # a time-budget run continues with the steps its calibration chose, never with the clock's
        config = run.resume_config(budget.for_resume(config, run.path))
    else:
        run.check_unused()
    config = check_config(config)
    check_runtime(config, device.type, env.world_size, find_cpu_compiler())
    return config


def _batches_for(config: Config, data: Dataset, split: Split, weak: View, env: distributed.DistEnv,
                 device: torch.device) -> tuple[Batches, str]:
    """The run's batches, and a note to print where pseudo-label accuracy cannot be measured ("" otherwise)."""
    fixmatch = config.method == "fixmatch"
    n_pool = len(split.unlabeled) + (0 if data.unlabeled_images is None else len(data.unlabeled_images))
    if fixmatch and n_pool < config.batch_size * config.mu:
        raise DatasetError(f"{config.dataset} has {n_pool} unlabeled images (labeled ones included) but each step "
                           f"draws mu*B = {config.batch_size * config.mu}; add unlabeled images or lower --mu or "
                           "--batch-size")
    # Global batches (B and mu*B in all, whatever the number of processes): each rank takes its slice.
    stream_lb = IndexStream(split.labeled, config.batch_size, config.seed, stream_id=0)
    # The unlabeled stream draws from the split's training images plus the data set's separate unlabeled images.
    ulb_pool = unlabeled_pool(split, data.train_labels.numel(), data.num_unlabeled_extra)
    stream_ulb = IndexStream(ulb_pool, config.batch_size * config.mu, config.seed, stream_id=1) if fixmatch else None
    y_pool = pool_labels(data)  # true labels (-1 where unknown), for monitoring pseudo-labels only
    pl_note = unmeasured_pseudo_labels(y_pool[ulb_pool]) if fixmatch else ""
    if pl_note:  # measured on the few images with a known label only, the accuracy would mislead: none is measured
        y_pool = torch.full_like(y_pool, -1)
    return Batches(data, stream_lb, stream_ulb, weak, y_pool, config.seed, env, device), pl_note


def _pseudo_label_transform(config: Config, data: Dataset, split: Split,
                            env: distributed.DistEnv) -> DistributionAlignment | None:
    """Distribution alignment of the weak view's probabilities (--dist-align), None for the paper's FixMatch.
    p_model is averaged over every rank's slice of the unlabeled batch."""
    if config.method != "fixmatch" or not config.dist_align:
        return None
    p_target = DistributionAlignment.target_from_labels(data.train_labels[split.labeled], data.num_classes)
    return DistributionAlignment(p_target, reduce=functools.partial(distributed.all_reduce_mean_, env=env)
                                 if env.enabled else None)


def _write_new_run(run: RunDir, config: Config, split: Split, plan: budget.BudgetPlan | None) -> None:
    """A new run's files. The configuration last: it marks the folder as a run. A start killed before its
    first checkpoint is redone from step 0 (by --resume), so the rows it logged go."""
    run.path.mkdir(parents=True, exist_ok=True)
    save_split(split, run.split_file)
    if plan is not None:
        plan.save(run.path)
    header = plan.config_header() if plan is not None else ""  # which budget chose the steps, at what speed
    write_text_atomic(run.config_file, header + yaml.safe_dump(config.to_dict(), sort_keys=False))
    run.metrics_file.unlink(missing_ok=True)


def _log_progress(state: TrainState, stats: StepStats, lr: float, logger: RunLogger) -> None:
    """The progress bar's losses and mask rate (this step's, averaged over ranks): a device sync."""
    state.guard.raise_if_failed()
    shown = torch.stack([stats.loss_s.float(), stats.loss_u.float(), stats.mask_rate.float()])
    loss_s, loss_u, mask_rate = distributed.all_reduce_mean_(shown, state.env).tolist()
    logger.step(state.step - logger.bar.n, loss_s, loss_u, mask_rate, lr, state.step)


def _evaluate_and_checkpoint(state: TrainState, data: Dataset, lr: float, logger: RunLogger, grids: AugmentGrids,
                             run: RunDir) -> None:
    """Rank 0 evaluates the EMA model, logs a metrics row and writes the checkpoints; the others wait for its
    test accuracy (a plateau schedule needs it on every rank)."""
    env = state.env
    state.guard.check_weights(state.step, state.model, state.ema.module)  # nothing non-finite reaches a checkpoint
    state.stats.all_reduce(env)  # statistics over every rank's slice of the batches
    test_acc = None
    if env.is_main:
        row = _metrics_row(state, data, lr, state.wall_s())
        state.stats.reset()  # logged: the checkpoint below must not carry them into the interval after a resume
        logger.evaluation(row)
        if grids.due(state.step) and logger.writer is not None:
            logger.image("augment/views", grids.render(state.step), state.step)
        test_acc = row["test_acc"]
        improved = test_acc > state.best_acc
        state.best_acc = max(state.best_acc, test_acc)
        state.schedule.observe(test_acc)  # plateau: before the checkpoint, which saves its state
        checkpoint = state.state_dict()
        if improved:  # best before last: a crash between the two redoes this evaluation
            save_checkpoint(checkpoint, run.best_checkpoint)
        save_checkpoint(checkpoint, run.last_checkpoint)
    test_acc = distributed.broadcast_object(test_acc, env)
    if not env.is_main:
        state.schedule.observe(test_acc)
        state.stats.reset()


def _checkpoint(state: TrainState, run: RunDir) -> None:
    """The last checkpoint of a run that stops between evaluations (a stop request)."""
    state.guard.check_weights(state.step, state.model, state.ema.module)
    state.stats.all_reduce(state.env)
    if state.env.is_main:
        save_checkpoint(state.state_dict(), run.last_checkpoint)
    distributed.barrier(state.env)


def _finish(state: TrainState, run: RunDir) -> dict[str, Any]:
    """Rank 0 writes the summary; the others return it once it is there."""
    wall_s, env = state.wall_s(), state.env
    if not env.is_main:
        distributed.barrier(env)
        return run.read_summary()
    summary = summarize(run.path, state.config, wall_s)
    write_json_atomic(run.summary_file, summary)
    used = min(20, len(read_metrics(run.metrics_file)))  # test_acc_median_last20 is over these
    over = "the only evaluation" if used == 1 else f"the last {used} evaluations"
    print(f"done: test accuracy {summary['test_acc_last']:.2f}% (best {summary['test_acc_best']:.2f}%, "
          f"median of {over} {summary['test_acc_median_last20']:.2f}%) in {wall_s:.0f} s; "
          f"results in {run.path}")
    distributed.barrier(env)
    return summary

def _metrics_row(state: TrainState, data: Dataset, lr: float, wall_s: float) -> dict[str, Any]:
    """One metrics.jsonl row: test metrics of the EMA (and raw) weights, the running statistics' means."""
    config, mean, std = state.config, state.mean, state.std
    ema_logits = predict_logits(state.ema.module, data.test_images, mean, std, config.eval_batch_size,
                                config.channels_last)
    # ema = 0: the EMA is an exact copy of the weights (lerp with weight 1), so the raw pass would repeat it.
    raw_logits = ema_logits if config.ema == 0 else predict_logits(state.model, data.test_images, mean, std,
                                                                   config.eval_batch_size, config.channels_last)
    ema_m, raw_m = accuracy_metrics(ema_logits, data.test_labels), accuracy_metrics(raw_logits, data.test_labels)
    # Logged so that `fixmatch report` reads it instead of evaluating every run's checkpoint again.
    ema_f1 = macro_f1(confusion_matrix(ema_logits.argmax(1), data.test_labels, ema_logits.shape[1]))
    # pseudo_label_acc is None (JSON null) when no used pseudo-label has a known true label: undefined, not 0%
    # accurate. That includes every row of a run whose pool has labels for only a few images
    # (log.unmeasured_pseudo_labels).
    means = state.stats.means()
    return {"step": state.step, "test_acc": ema_m["top1"], "test_top5": ema_m["top5"], "test_macro_f1": ema_f1,
            "raw_test_acc": raw_m["top1"], "loss_s": means["loss_s"], "loss_u": means["loss_u"],
            "mask_rate": means["mask_rate"], "pseudo_label_acc": means["pseudo_label_acc"], "lr": lr,
            "wall_s": wall_s, "nonfinite_steps": state.guard.skipped, **_policy_metrics(state, means)}


def _policy_metrics(state: TrainState, means: dict[str, float | None]) -> dict[str, Any]:
    """What a policy other than the paper's fixed tau adds to a metrics row: its effective threshold now (mean and
    minimum over classes; SoftMatch: mu_t), the thresholds themselves (one per class; SoftMatch: [mu_t]) for the
    report's curves, and the mean sample weight since the last evaluation. FixMatch's rows stay as they were (its
    threshold is tau, its mean weight the mask rate)."""
    if state.config.algorithm == "fixmatch" or state.config.method != "fixmatch":
        return {}
    thresholds = state.policy.thresholds().float()
    return {"threshold_mean": thresholds.mean().item(), "threshold_min": thresholds.min().item(),
            "thresholds": [round(v, 5) for v in thresholds.tolist()], "weight_mean": means["weight_mean"]}


def summarize(run_dir: Path, config: Config, wall_s: float) -> dict[str, Any]:
    """The summary is computed from metrics.jsonl, so it is the same whether or not the run was resumed."""
    rows = read_metrics(RunDir(run_dir).metrics_file)
    accs = [r["test_acc"] for r in rows]
    return {"dataset": config.dataset, "method": config.method, "algorithm": config.algorithm, "model": config.model,
            "num_labels": config.num_labels, "seed": config.seed, "steps": rows[-1]["step"],
            "nonfinite_steps": rows[-1].get("nonfinite_steps", 0),
            "test_acc_last": accs[-1], "test_acc_best": max(accs),
            "test_acc_median_last20": statistics.median(accs[-20:]), "raw_test_acc_last": rows[-1]["raw_test_acc"],
            "test_top5_last": rows[-1]["test_top5"], "wall_s": wall_s, "steps_per_s": rows[-1]["step"] / wall_s,
            "images_per_s": rows[-1]["step"] * config.batch_size * (1 + 2 * config.mu * (config.method == "fixmatch"))
            / wall_s}
