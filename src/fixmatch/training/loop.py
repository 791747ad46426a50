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
import json
import math
import signal
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from fixmatch.training import budget, distributed
from fixmatch.augment import CTAugment, make_strong_augment, weak_augment
from fixmatch.augment.visualize import AugmentGrids
from fixmatch.runs.checkpoint import (
    CheckpointFields,
    load_checkpoint,
    restore_optimizer,
    restore_rng,
    resume_fix,
    save_checkpoint,
    tensor_like,
)
from fixmatch.config import (
    RESUME_MUTABLE_KEYS,
    Config,
    ConfigError,
    check_config,
    load_config,
    short_repr,
    strong_policy_options,
)
from fixmatch.data.batches import IndexStream
from fixmatch.data.datasets import Dataset, DatasetError, load_dataset
from fixmatch.training.label_selection import select_labels
from fixmatch.data.pool import gather_pool, pool_labels
from fixmatch.data.split import Split, fold_split, load_split, save_split, train_digest, unlabeled_pool
from fixmatch.core.dist_align import DistributionAlignment
from fixmatch.core.ema import EMA
from fixmatch.inference.evaluate import (
    accuracy_metrics,
    channel_stats,
    confusion_matrix,
    macro_f1,
    normalize,
    predict_logits,
    resolve_device,
)
from fixmatch.runs.log import RunLogger, read_metrics, truncate_metrics, unmeasured_pseudo_labels, write_json_atomic
from fixmatch.runs.model_spec import checkpoint_fields
from fixmatch.models import create_model
from fixmatch.models.pretrained import load_init_weights
from fixmatch.training.nonfinite import NonFiniteGuard
from fixmatch.core.optim import LRSchedule, make_optimizer, set_lr
from fixmatch.runs.rundir import LOCK_NAME, RunDirError, check_regular_file, lock_run_dir, read_run_file, write_text_atomic
from fixmatch.training.speed import check_amp, check_compile, compile_module, make_grad_scaler
from fixmatch.training.step import forward_loss

# Data sets whose weak view has no horizontal flip (digits and text are not mirror-symmetric).
NO_FLIP_DATASETS = frozenset({"svhn", "mnist"})
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


def default_run_dir(config: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dataset = Path(config.dataset.removeprefix("folder:")).name or "folder"  # folder:PATH -> PATH's last part
    return Path("runs") / f"{dataset}-{config.method}-{config.num_labels}-seed{config.seed}-{stamp}"


def load_run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    check_regular_file(path)  # read before the lock is taken: never through a link or from a FIFO
    if not path.is_file():
        raise ConfigError(f"cannot resume: {path} not found; is {run_dir} a fixmatch run directory?")
    return Config(**load_config(path))  # one-line errors for a damaged or hand-edited file


def _resume_config(run_dir: Path, config: Config | None) -> Config:
    saved = load_run_config(run_dir)
    _check_config_file_unchanged(run_dir, saved)
    if config is None:
        return saved
    changed = [k for k, v in config.to_dict().items() if k not in RESUME_MUTABLE_KEYS and v != getattr(saved, k)]
    if changed:
        k = changed[0]
        raise ConfigError(f"cannot change '{k}' when resuming ({short_repr(getattr(saved, k))} -> "
                          f"{short_repr(getattr(config, k))}); start a new run with another --out instead")
    return config


def _check_config_file_unchanged(run_dir: Path, saved: Config) -> None:
    """RUN_DIR/config.yaml must still hold what the last checkpoint was trained with: a hand edit (lr, steps)
    would otherwise change the resumed run silently, where the same change as a flag is refused."""
    trained = _checkpoint_config(run_dir / "checkpoints" / "last.pt")
    if trained is None:  # killed before its first checkpoint: it restarts from step 0 with the file as it is
        return
    defaults = Config().to_dict()  # a checkpoint older than a key was trained with its default
    edited = [k for k, v in saved.to_dict().items()
              if k not in RESUME_MUTABLE_KEYS and trained.get(k, defaults[k]) != v]
    if edited:
        shown = "; ".join(f"{k}: {short_repr(trained.get(k, defaults[k]))} in the checkpoint, "
                          f"{short_repr(getattr(saved, k))} in the file" for k in edited[:4])
        more = f"; and {len(edited) - 4} more" if len(edited) > 4 else ""
        raise ConfigError(f"cannot resume: {run_dir / 'config.yaml'} no longer matches the run's last checkpoint "
                          f"({shown}{more}); put the checkpoint's values back in the file, or start a new run with "
                          f"another --out")


def _checkpoint_config(path: Path) -> dict[str, Any] | None:
    """The configuration stored in a checkpoint, read without its tensor data: memory-mapped, the tensors are
    not read here (restoring them below is the checkpoint's one full load). None where there is no readable
    file: restoring reports a damaged one in its own words."""
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the load below repeats any warning about the file
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises several types for a damaged file; restoring it names the damage
        return None
    config = state.get("config") if isinstance(state, dict) else None
    return config if isinstance(config, dict) else None


def _prepare_run_dir(run_dir: Path, resume: bool) -> None:
    # Resuming needs RUN_DIR/config.yaml (load_run_config); a run killed before its first checkpoint restarts.
    if not resume and run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} already exists; pass --resume to continue it "
                          f"or choose another --out")


def _split_for(config: Config, run_dir: Path, resume: bool, data: Dataset) -> Split:
    digest = train_digest(data.train_images, data.train_labels)
    if resume:
        split = load_split(run_dir / "split.json", num_train=data.train_labels.numel(), digest=digest)
    elif config.fold is not None:
        split = fold_split(data.folds, config.fold, data.train_labels.numel(), config.seed)
        if len(split.labeled) != config.num_labels:
            raise ConfigError(f"--fold {config.fold} labels the {len(split.labeled)} images of that fold; "
                              f"set --num-labels {len(split.labeled)}")
    else:
        split = select_labels(config.label_selection, data.train_labels, config.num_labels, data.num_classes,
                              config.seed, images=data.train_images, split_file=config.split_file,
                              checkpoint=config.selection_checkpoint, mean=data.mean, std=data.std,
                              digest=digest)
    if len(split.labeled) != config.num_labels:
        raise ConfigError(f"the split has {len(split.labeled)} labeled images but num_labels is "
                          f"{config.num_labels}; make them agree")
    return split if split.train_digest is not None or resume else dataclasses.replace(split, train_digest=digest)


@contextmanager
def _stop_requests(env: distributed.DistEnv) -> Iterator[Callable[[], bool]]:
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
    device_name = config.device if config is not None else load_run_config(Path(out)).device  # type: ignore[arg-type]
    device = distributed.process_device(resolve_device(device_name), env)
    with distributed.process_group(env, device):
        # Every rank uses rank 0's run directory (a default one is named after the time).
        run_dir = distributed.broadcast_object(Path(out) if out is not None else default_run_dir(config), env)
        # One writer per run directory (rank 0); the OS releases the lock even if the process is killed.
        with lock_run_dir(run_dir) if env.is_main else contextlib.nullcontext():
            return _train(config, run_dir, resume, env, device)


def _check_processes_and_speed(config: Config, env: distributed.DistEnv, device: torch.device) -> None:
    """Options that this device or number of processes cannot run: refused before anything is written."""
    distributed.check_batch_sizes(config.batch_size, env.world_size)
    check_amp(config.amp, device)
    check_compile(config.compile, device)
    distributed.check_sync_bn(config.sync_bn, device)


def _train(config: Config | None, run_dir: Path, resume: bool, env: distributed.DistEnv,
           device: torch.device) -> dict[str, Any]:
    started = budget.clock()  # a time budget counts from here: loading the data is part of the wait
    _prepare_run_dir(run_dir, resume)
    if resume:  # a time-budget run continues with the steps its calibration chose, never with the clock's
        config = budget.for_resume(config, run_dir)
    config = _resume_config(run_dir, config) if resume else config
    config = check_config(config)
    _check_processes_and_speed(config, env, device)

    # --- data and split: everything that can fail on bad input happens before anything is written
    data = load_dataset(config.dataset, config.data_dir, image_size=config.image_size,
                        on_bad_image=config.on_bad_image, labels_csv=config.labels_csv, **_dataset_options(config))
    resumed = resume and (run_dir / "checkpoints" / "last.pt").is_file()  # else: killed before any checkpoint
    split = _split_for(config, run_dir, resumed, data)
    n_pool = len(split.unlabeled) + (0 if data.unlabeled_images is None else len(data.unlabeled_images))
    if config.method == "fixmatch" and n_pool < config.batch_size * config.mu:
        raise DatasetError(f"{config.dataset} has {n_pool} unlabeled images (labeled ones included) but each step "
                           f"draws mu*B = {config.batch_size * config.mu}; add unlabeled images or lower --mu or "
                           "--batch-size")
    # Global batches (B and mu*B in all, whatever the number of processes): each rank takes its slice.
    stream_lb = IndexStream(split.labeled, config.batch_size, config.seed, stream_id=0)
    # The unlabeled stream draws from the split's training images plus the data set's separate unlabeled images.
    ulb_pool = unlabeled_pool(split, data.train_labels.numel(), data.num_unlabeled_extra)
    stream_ulb = IndexStream(ulb_pool, config.batch_size * config.mu, config.seed, stream_id=1)
    y_pool = pool_labels(data)  # true labels (-1 where unknown), for monitoring pseudo-labels only
    pl_note = unmeasured_pseudo_labels(y_pool[ulb_pool]) if config.method == "fixmatch" else ""
    if pl_note:  # measured on the few images with a known label only, the accuracy would mislead: none is measured
        y_pool = torch.full_like(y_pool, -1)
    pin = device.type == "cuda"  # batches are gathered into page-locked memory and copied asynchronously
    mean, std = channel_stats(data.mean, data.std, device)
    flip = config.weak_flip if config.weak_flip is not None else config.dataset not in NO_FLIP_DATASETS
    weak = functools.partial(weak_augment, flip=flip, translate=config.weak_translate, padding=config.weak_padding)
    fills = {} if config.fill is None else {"fill": config.fill, "geometric_fill": config.fill}
    ra_options = strong_policy_options(config.strong, config.randaugment_ops, config.randaugment_prob)
    strong = make_strong_augment(config.strong, cutout=config.cutout, **fills, **ra_options)
    cta = strong if isinstance(strong, CTAugment) else None  # learns its magnitudes while training
    fixmatch = config.method == "fixmatch"
    # Collectives the step's options need with several processes (None with one): built once, not per step.
    rank_mean = functools.partial(distributed.all_reduce_mean_, env=env) if env.enabled else None
    rank_gather = functools.partial(distributed.all_gather_cat, env=env) if env.enabled else None
    align = None
    if fixmatch and config.dist_align:  # p_model averaged over every rank's slice of the unlabeled batch
        p_target = DistributionAlignment.target_from_labels(data.train_labels[split.labeled], data.num_classes)
        align = DistributionAlignment(p_target, reduce=rank_mean)

    # --- model, optimiser, EMA
    torch.manual_seed(config.seed)
    model_kwargs: dict[str, Any] = {}  # extra backbone constructor arguments; checkpoints record them
    model_kwargs["image_size"] = list(data.image_size)  # picks the stem (CIFAR/ImageNet) or the ViT's patch grid
    model = create_model(config.model, data.num_classes, data.in_channels, **model_kwargs).to(device)
    # A pretrained backbone for fresh runs (a resumed run restores its own weights below); before the EMA copy.
    init_report = load_init_weights(model, config.init_weights) if config.init_weights and not resumed else None
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    plan = None
    if config.time_budget is not None:  # a new run (a resume has none left): a few timed steps choose its steps
        plan = budget.calibrate(config, started, budget.StepInputs(model, data, stream_lb, stream_ulb, weak, strong,
                                                                   align, mean, std), env, device)
        config = plan.apply(config)
        if env.is_main:
            print(plan.describe(), flush=True)
    optimizer = make_optimizer(model, config.lr, config.momentum, config.nesterov, config.wd, config.optimizer)
    schedule = LRSchedule(config.schedule, config.lr, config.steps, config.warmup, config.plateau_factor,
                          config.plateau_patience)
    ema = EMA(model, config.ema)
    aug_gen = torch.Generator(device=device)
    guard = NonFiniteGuard(config.on_nonfinite, device, run_dir / "checkpoints" / "last.pt",
                           rank_min=functools.partial(distributed.min_over_ranks, env=env) if env.enabled else None)
    scaler = make_grad_scaler(config.amp, device)  # fp16 only

    start_step, best_acc, wall_before = 0, -math.inf, 0.0
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # loss_s, loss_u, mask, pl_correct, steps, pl_known
    distributed.barrier(env)  # every rank has checked the run directory before rank 0 writes to it
    if resumed:
        # Every field is checked as it is restored: a damaged or hand-edited last.pt stops here, in one line
        # naming the file and the field, before anything in the run directory changes.
        last, fix = run_dir / "checkpoints" / "last.pt", resume_fix(run_dir)
        state = load_checkpoint(last, map_location=device, fix=fix)
        saved = CheckpointFields(state, last, fix)
        guard.skipped = saved.integer("nonfinite_steps", default=0)
        start_step, best_acc, wall_before = saved.integer("step"), saved.number("best_acc"), saved.number("wall_s")
        saved.restore("model", model.load_state_dict)
        saved.restore("ema", ema.load_state_dict)
        saved.restore("optimizer", functools.partial(restore_optimizer, optimizer))
        saved_sums = saved.restore("sums", functools.partial(tensor_like, like=sums))
        if env.is_main:  # the saved sums are over all ranks: summed again at the next evaluation
            sums.copy_(saved_sums)
        if scaler is not None and state.get("scaler"):
            saved.restore("scaler", scaler.load_state_dict)
        if cta is not None:
            saved.restore("ctaugment", cta.load_state_dict)
        if align is not None:
            saved.restore("dist_align", functools.partial(align.load_state_dict, device=device))
        if state.get("schedule") is not None:
            saved.restore("schedule", schedule.load_state_dict)
        saved.restore("rng", functools.partial(restore_rng, device=device))  # last: it changes global state
        if env.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", start_step)
    elif env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # config.yaml last: it marks the folder as a run. A start killed before its first checkpoint is redone
        # from step 0 (by --resume), so the rows it logged go.
        save_split(split, run_dir / "split.json")
        if plan is not None:
            plan.save(run_dir)
        header = plan.config_header() if plan is not None else ""  # which budget chose the steps, at what speed
        write_text_atomic(run_dir / "config.yaml", header + yaml.safe_dump(config.to_dict(), sort_keys=False))
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    def checkpoint_state(step: int) -> dict[str, Any]:
        return {"format": "fixmatch-checkpoint", "step": step, "model": model.state_dict(),
                "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "config": config.to_dict(),
                "split": split.to_json(), "class_names": list(data.class_names), "best_acc": best_acc,
                "wall_s": wall_before + time.perf_counter() - t0, "sums": sums.cpu(),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                "nonfinite_steps": guard.skipped,
                **checkpoint_fields(config.model, model_kwargs, data),  # the model description
                "ctaugment": cta.state_dict() if cta is not None else None, "schedule": schedule.state_dict(),
                "dist_align": align.state_dict() if align is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None}

    # What the step calls: the model inside DistributedDataParallel with several processes, compiled on request.
    # `model` itself (unwrapped) is what EMA, evaluation and checkpoints use.
    train_model = distributed.wrap_model(model, env, device, config.sync_bn)
    if config.compile:
        train_model = compile_module(train_model, device)
    logger = RunLogger(run_dir, config.steps, start_step, config.progress and env.is_main, tensorboard=env.is_main)
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
    slow = budget.SlowRunWarning(config.steps, start_step, device, logger.write if env.is_main else None)
    t0 = time.perf_counter()
    model.train()
    step = start_step
    try:
        with _stop_requests(env) as stop_requested:
            while step < config.steps:
                lr = schedule.lr(step)
                set_lr(optimizer, lr)
                # The augmentation stream is reseeded from (seed, step, rank): a resumed run draws the same views.
                aug_gen.manual_seed(distributed.augment_seed(config.seed, step, env.rank))

                # uint8 batches (pinned on CUDA, copied asynchronously), augmented on the device; each rank
                # takes its slice of the global index batch.
                idx_lb = distributed.shard(stream_lb.batch(step), env)
                x_lb = gather_pool(data.train_images, None, idx_lb, pin=pin).to(device, non_blocking=True)
                x_lb = weak(x_lb, aug_gen)
                y_lb = data.train_labels[idx_lb].to(device, non_blocking=True)
                x_ulb_w = x_ulb_s = None
                if fixmatch:
                    idx_ulb = distributed.shard(stream_ulb.batch(step), env)
                    u = gather_pool(data.train_images, data.unlabeled_images, idx_ulb, pin=pin).to(
                        device, non_blocking=True)
                    # Strong view = its own flip/translate, then RandAugment and Cutout (as the PyTorch ports do).
                    x_ulb_w, x_ulb_s = weak(u, aug_gen), strong(weak(u, aug_gen), aug_gen)
                saved_buffers = guard.save_buffers(model)  # skip mode: restored if this step is skipped
                loss, stats = forward_loss(train_model, x_lb, y_lb, x_ulb_w, x_ulb_s, mean, std, tau=config.tau,
                                           lambda_u=config.lambda_u, T=config.T, lu_norm=config.lu_norm,
                                           channels_last=config.channels_last, weak_no_grad=config.weak_no_grad,
                                           amp=config.amp, bn_model=model, align=align, rank_mean=rank_mean)

                optimizer.zero_grad(set_to_none=True)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                # With fp16 loss scaling, overflowing gradients are the scaler's to skip: only the loss is checked.
                grads_checked = model.parameters() if scaler is None else []
                finite = guard.step_is_finite(step + 1, loss, grads_checked, model.buffers())  # False: skip
                if finite:
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    ema.update(model)
                if not finite:
                    guard.restore_buffers(model, saved_buffers)  # BatchNorm statistics as before the step
                    if align is not None:
                        align.drop_last()  # the skipped step's batch mean stays out of p_model
                if cta is not None and finite:
                    # CTAugment's bin weights follow how well the EMA model classifies labeled images under
                    # uniformly drawn policies (the official code's probe step).
                    x_probe, probe_choices = cta.probe(x_lb, aug_gen)
                    with torch.no_grad():
                        probs = torch.softmax(ema.module(normalize(x_probe, mean, std, config.channels_last)), 1)
                    # Every rank learns from the probes of all ranks: the rates stay the same everywhere.
                    cta.update(probe_choices, probs, y_lb, gather=rank_gather)
                step += 1
                slow.step_done(step)

                # Pseudo-label accuracy on the masked samples, measured with the true labels (monitoring only).
                pl_correct = pl_known = torch.zeros((), device=device)
                if fixmatch:
                    y_ulb = y_pool[idx_ulb].to(device, non_blocking=True)
                    pl_correct = ((stats.pseudo_label == y_ulb) & stats.mask).sum()
                    pl_known = (stats.mask & (y_ulb >= 0)).sum()  # masked samples whose true label is known
                if finite:
                    sums += torch.stack([stats.loss_s.double(), stats.loss_u.double(), stats.mask_rate.double(),
                                         pl_correct.double(), torch.ones((), dtype=torch.float64, device=device),
                                         pl_known.double()])
                if step % LOG_EVERY == 0 or step == config.steps:
                    guard.raise_if_failed()
                    shown = torch.stack([stats.loss_s.float(), stats.loss_u.float(), stats.mask_rate.float()])
                    loss_s, loss_u, mask_rate = distributed.all_reduce_mean_(shown, env).tolist()
                    logger.step(step - logger.bar.n, loss_s, loss_u, mask_rate, lr, step)

                if step % config.eval_every == 0 or step == config.steps:
                    guard.check_weights(step, model, ema.module)  # nothing non-finite reaches a checkpoint
                    distributed.all_reduce_sum_(sums, env)  # statistics over every rank's slice of the batches
                    test_acc = None
                    if env.is_main:  # rank 0 evaluates and writes; the others wait for its test accuracy
                        row = _evaluate_step(model, ema, data, mean, std, config, sums, step, lr,
                                             wall_before + time.perf_counter() - t0)
                        # Logged: the checkpoint below must not carry them into the interval after a resume.
                        sums.zero_()
                        row["nonfinite_steps"] = guard.skipped
                        logger.evaluation(row)
                        if grids.due(step) and logger.writer is not None:
                            logger.image("augment/views", grids.render(step), step)
                        test_acc = row["test_acc"]
                        improved = test_acc > best_acc
                        best_acc = max(best_acc, test_acc)
                        schedule.observe(test_acc)  # plateau: before the checkpoint, which saves its state
                        state = checkpoint_state(step)
                        if improved:  # best before last: a crash between the two redoes this evaluation
                            save_checkpoint(state, run_dir / "checkpoints" / "best.pt")
                        save_checkpoint(state, run_dir / "checkpoints" / "last.pt")
                    test_acc = distributed.broadcast_object(test_acc, env)
                    if not env.is_main:
                        schedule.observe(test_acc)
                        sums.zero_()
                # Several processes agree on stopping where they sync anyway, so that all stop at the same step.
                # A request during the last step lets the run finish: its final checkpoint is written already.
                stop_now = step < config.steps and (stop_requested() if not env.enabled else (
                    step % LOG_EVERY == 0 and distributed.any_rank(stop_requested(), env, device)))
                if stop_now:
                    guard.check_weights(step, model, ema.module)
                    distributed.all_reduce_sum_(sums, env)
                    if env.is_main:
                        save_checkpoint(checkpoint_state(step), run_dir / "checkpoints" / "last.pt")
                    distributed.barrier(env)
                    raise TrainingInterrupted(run_dir, step)
    finally:
        logger.close()

    wall_s = wall_before + time.perf_counter() - t0
    if not env.is_main:  # rank 0 writes the summary; the others return it once it is there
        distributed.barrier(env)
        return read_summary(run_dir)
    summary = summarize(run_dir, config, wall_s)
    write_json_atomic(run_dir / "summary.json", summary)
    used = min(20, len(read_metrics(run_dir / "metrics.jsonl")))  # test_acc_median_last20 is over these
    over = "the only evaluation" if used == 1 else f"the last {used} evaluations"
    print(f"done: test accuracy {summary['test_acc_last']:.2f}% (best {summary['test_acc_best']:.2f}%, "
          f"median of {over} {summary['test_acc_median_last20']:.2f}%) in {wall_s:.0f} s; "
          f"results in {run_dir}")
    distributed.barrier(env)
    return summary


def read_summary(run_dir: Path) -> dict[str, Any]:
    text = read_run_file(run_dir / "summary.json")
    if text is None:
        raise RunDirError(f"{run_dir / 'summary.json'} is missing; resume the run with --resume to write it")
    return json.loads(text)


def _evaluate_step(model: torch.nn.Module, ema: EMA, data: Dataset, mean: torch.Tensor, std: torch.Tensor,
                   config: Config, sums: torch.Tensor, step: int, lr: float, wall_s: float) -> dict[str, Any]:
    ema_logits = predict_logits(ema.module, data.test_images, mean, std, config.eval_batch_size,
                                config.channels_last)
    # ema = 0: the EMA is an exact copy of the weights (lerp with weight 1), so the raw pass would repeat it.
    raw_logits = ema_logits if config.ema == 0 else predict_logits(model, data.test_images, mean, std,
                                                                   config.eval_batch_size, config.channels_last)
    ema_m, raw_m = accuracy_metrics(ema_logits, data.test_labels), accuracy_metrics(raw_logits, data.test_labels)
    # Logged so that `fixmatch report` reads it instead of evaluating every run's checkpoint again.
    ema_f1 = macro_f1(confusion_matrix(ema_logits.argmax(1), data.test_labels, ema_logits.shape[1]))
    loss_s, loss_u, mask_sum, pl_correct, n, masked = sums.tolist()

    def mean(total: float) -> float | None:  # None (JSON null): every step since the last evaluation was skipped
        return total / n if n > 0 else None
    return {"step": step, "test_acc": ema_m["top1"], "test_top5": ema_m["top5"], "test_macro_f1": ema_f1,
            "raw_test_acc": raw_m["top1"],
            "loss_s": mean(loss_s), "loss_u": mean(loss_u), "mask_rate": mean(mask_sum),
            # None (JSON null) when no used pseudo-label has a known true label: undefined, not 0% accurate. That
            # includes every row of a run whose pool has labels for only a few images (log.unmeasured_pseudo_labels).
            "pseudo_label_acc": 100.0 * pl_correct / masked if masked > 0 else None, "lr": lr, "wall_s": wall_s}


def summarize(run_dir: Path, config: Config, wall_s: float) -> dict[str, Any]:
    """The summary is computed from metrics.jsonl, so it is the same whether or not the run was resumed."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    accs = [r["test_acc"] for r in rows]
    return {"dataset": config.dataset, "method": config.method, "model": config.model,
            "num_labels": config.num_labels, "seed": config.seed, "steps": rows[-1]["step"],
            "nonfinite_steps": rows[-1].get("nonfinite_steps", 0),
            "test_acc_last": accs[-1], "test_acc_best": max(accs),
            "test_acc_median_last20": statistics.median(accs[-20:]), "raw_test_acc_last": rows[-1]["raw_test_acc"],
            "test_top5_last": rows[-1]["test_top5"], "wall_s": wall_s, "steps_per_s": rows[-1]["step"] / wall_s,
            "images_per_s": rows[-1]["step"] * config.batch_size * (1 + 2 * config.mu * (config.method == "fixmatch"))
            / wall_s}
