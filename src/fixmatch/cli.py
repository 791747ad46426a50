"""The `fixmatch` command: parse, build a Config, call the API. No training logic lives here."""
from __future__ import annotations

import argparse
import errno
import itertools
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

from fixmatch.config import (
    PRESETS,
    STRONG_AUGMENTS,
    WEAK_PADDINGS,
    Config,
    ConfigError,
    KeyType,
    PretrainConfig,
    closest_name,
    describe_keys,
    key_types,
    resolve_config,
    short_repr,
    validate_overrides,
)
from fixmatch.runs.rundir import CONFIG_NAME, ERROR_NAME, METRICS_NAME, SUMMARY_NAME, RunDir

MAX_ERROR_CHARS = 2000  # an error line quotes values and paths: never screens of them


class _HelpFormatter(argparse.HelpFormatter):
    """The help beside its flag where the flag is short enough: at argparse's column 24, most of train's flags
    would take a line of their own."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, argparse.BooleanOptionalAction) and len(action.option_strings) == 2:
            return "--[no-]" + action.option_strings[0][2:]  # --[no-]compile: one line, not two
        return super()._format_action_invocation(action)


class _Parser(argparse.ArgumentParser):
    """Every parser of the command, sub-commands included (add_subparsers(parser_class=_Parser)).

    No abbreviated flags: argparse would take --num-label (a typo) as --num-labels and start a long run. An
    unknown flag is refused in one line that names the nearest real one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"formatter_class": _HelpFormatter, **kwargs, "allow_abbrev": False})

    def error(self, message: str) -> None:  # one line, not argparse's usage dump
        self.exit(2, f"fixmatch: error: {_one_line(message)} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        # Only parse_args uses this: a leftover argument is an error, reported by the (sub-)parser that knows
        # which flags it takes, so that the message can name the closest one and the right --help. Unknown flags
        # are looked for first: "--form onnx" is the typo to name, not "--format is required". The flags of a
        # parser with sub-commands are the words before the command.
        args = list(sys.argv[1:] if args is None else args)
        own = itertools.takewhile((lambda a: a != "--") if self._subparsers is None else
                                  (lambda a: a.startswith("-")), args)
        self._refuse([a for a in own if a.startswith("--") and a.split("=", 1)[0] not in self._option_string_actions])
        parsed, extras = super().parse_known_args(args, namespace)
        self._refuse(extras)
        return parsed, extras

    def _refuse(self, unknown: list[str]) -> None:
        if unknown:
            flag = next((a.split("=", 1)[0] for a in unknown if a.startswith("--")), None)
            close = closest_name(flag, self._option_string_actions) if flag is not None else None
            hint = f"; did you mean {close}?" if close is not None else ""
            self.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")


def _one_line(message: str) -> str:
    """A value or path with a line break (\\n, \\r, ...) in it must not break the one-line error."""
    line = " ".join(str(message).splitlines())
    return line if len(line) <= MAX_ERROR_CHARS else line[:MAX_ERROR_CHARS - 3] + "..."


# Plain ASCII decimals only: int() and float() also take Unicode digits ('٤٠'), underscores (1_000) and spaces.
_PLAIN_INT = re.compile(r"[-+]?[0-9]+")


def _parse_number(base: type, text: str) -> int | float:
    if base is int and _PLAIN_INT.fullmatch(text) and len(text) <= 20:
        value = int(text)
        if -(2**63) <= value < 2**63:  # no count or size needs more; the flag's own check bounds it further
            return value
    if base is float and text.isascii() and "_" not in text and text == text.strip():
        return float(text)
    raise ValueError(text)


def _converter(kind: KeyType, flag: str, accepted: str = "") -> Callable[[str], Any]:
    """Flag text -> a value of the key's type (none/null for a nullable key); config.py then checks the value."""
    def convert(text: str) -> Any:
        if kind.nullable and text.lower() in ("none", "null"):
            return None
        if kind.base not in (int, float):
            return text
        try:
            return _parse_number(kind.base, text)
        except ValueError:  # also int() of more than 4300 digits
            words = "an integer (ASCII digits, 64-bit)" if kind.base is int else "a number (ASCII digits)"
            hint = f" ({accepted})" if accepted else ""
            raise argparse.ArgumentTypeError(f"{flag} expects {words}, got {short_repr(text)}{hint}") from None
    return convert


def _int_flag(flag: str) -> Callable[[str], Any]:
    return _converter(KeyType(int), flag)


def _float_flag(flag: str) -> Callable[[str], Any]:
    return _converter(KeyType(float), flag)


def _config_groups(parser: argparse.ArgumentParser, schema: type = Config) -> dict[str, argparse._ArgumentGroup]:
    """One argument group per section of ``schema`` (Config: data, model, ...), in its order."""
    titles = dict.fromkeys(f.metadata["group"] for f in fields(schema))
    return {title: parser.add_argument_group(title) for title in titles}


def _add_config_flags(groups: dict[str, argparse._ArgumentGroup], schema: type = Config) -> None:
    """One flag per key of ``schema`` (Config, PretrainConfig: --num-labels for num_labels), in its section's group;
    absent flags override nothing."""
    kinds = key_types(schema)
    for f in fields(schema):
        group = groups[f.metadata["group"]]
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {_as_yaml(f.default)})"
        if kinds[f.name].base is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=_converter(kinds[f.name], flag, f.metadata["accepted"]),
                               default=None, metavar=_metavar(f, kinds[f.name]), help=help_text)


def _metavar(f: Field, kind: KeyType) -> str:
    """{a,b} for a key with a fixed set of values (from the tuple its check reads), else its own (NAME, FILE)
    or one by type."""
    if f.metadata["choices"]:
        return "{" + ",".join(f.metadata["choices"]) + "}"
    if f.metadata["metavar"]:
        return f.metadata["metavar"]
    return {int: "N", float: "X"}.get(kind.base, f.name.upper())


def _as_yaml(value: Any) -> str:
    """A default as a config file spells it (null, true, false)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _cmd_train(args: argparse.Namespace) -> int:
    from fixmatch.training.loop import train

    keys = {f.name for f in fields(Config)}
    overrides = {k: v for k, v in vars(args).items() if k in keys and v is not None}
    base = None
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out RUN_DIR naming the run to continue")
        base = RunDir(args.out).saved_config()
    config = resolve_config(args.preset, args.config, overrides, base=base, overrides_source="the command line")
    train(config, out=args.out, resume=args.resume)
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from fixmatch.training.pretrain import pretrain

    overrides = validate_overrides({f.name: getattr(args, f.name) for f in fields(PretrainConfig)
                                    if getattr(args, f.name) is not None}, "the command line", PretrainConfig)
    if args.resume:  # the saved configuration, with the flags given (only where and how it runs may change)
        config = PretrainConfig(**{**RunDir(args.out).saved_config(PretrainConfig).to_dict(), **overrides})
    else:
        config = PretrainConfig(**overrides)
    pretrain(config, args.out, resume=args.resume)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fixmatch.inference.evaluate import evaluate

    metrics = evaluate(args.path, data_dir=args.data_dir, device=args.device, weights=args.weights,
                       dataset=args.dataset, confusion_png=args.confusion)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{metrics['checkpoint']} (step {metrics['step']}, {metrics['weights']} weights) on "
              f"{metrics['dataset']} test set ({metrics['num_test']} images): "
              f"top-1 {metrics['test_acc']:.2f}%  top-5 {metrics['test_top5']:.2f}%  "
              f"macro-F1 {metrics['macro_f1']:.2f}%")
        for name, acc in metrics["per_class_acc"].items():
            print(f"  {name:<24} {'no test images' if acc is None else f'{acc:6.2f}%'}")
        if args.confusion:
            print(f"confusion matrix: {args.confusion}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from fixmatch.data.folder import IMAGE_EXTENSIONS
    from fixmatch.inference.model import load
    from fixmatch.inference.predict import find_images, predict_files, write_rows

    if args.top_k < 1 or args.batch_size < 1:
        raise ConfigError("--top-k and --batch-size must be positive integers")
    files = find_images(args.paths)
    if not files:
        raise ConfigError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {' '.join(args.paths)}")
    model = load(args.checkpoint, weights=args.weights, device=args.device)
    ok, bad = write_rows(predict_files(model, files, args.batch_size, args.top_k), args.format,
                         top_k=min(args.top_k, model.spec.num_classes))  # top() gives at most every class
    if bad:
        print(f"fixmatch: {bad} of {ok + bad} files could not be read", file=sys.stderr)
    return 0 if ok else 1


def _cmd_export(args: argparse.Namespace) -> int:
    from fixmatch.inference.export import export_model

    out = export_model(args.checkpoint, args.format, args.out, weights=args.weights, input_dtype=args.input_dtype)
    print(f"exported {args.weights} weights as {args.format}: {out}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fixmatch.studies.sweep import load_study, run_state, run_sweep

    if args.dry_run:
        study = load_study(args.study)
        for run in study.runs:
            print(f"{run_state(Path(args.out) / run.name):<10} {run.name}")
        print(f"{len(study.runs)} runs; every configuration resolves")
        return 0
    result = run_sweep(args.study, args.out, args.workers)
    return 130 if result.interrupted else 1 if result.failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fixmatch.studies.report import write_report

    index = write_report(args.paths, args.out)
    print(f"report written: {index}")
    return 0


def _cmd_show_augment(args: argparse.Namespace) -> int:
    from fixmatch.studies.show_augment import show_augment

    path = show_augment(args.dataset, args.out, args.strong, args.num_images, args.seed, args.data_dir, args.cutout,
                        weak_padding=args.weak_padding, randaugment_ops=args.randaugment_ops,
                        randaugment_prob=args.randaugment_prob)
    print(f"augmentation grid written: {path}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    defaults = {name: default for name, default, _ in describe_keys()}
    for name, values in PRESETS.items():
        print(f"{name}:")
        for key, value in values.items():
            note = "" if defaults[key] == value else f"  (default {defaults[key]})"
            print(f"  {key}: {value}{note}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from fixmatch.models.summary import describe_models, format_table, input_for

    def read_dataset(name: str) -> tuple[tuple[int, int, int], int]:  # read from disk, never downloaded
        from fixmatch.data.datasets import load_dataset
        data = load_dataset(name, args.data_dir, download=False)
        return (data.in_channels, *data.image_size), data.num_classes

    shape, num_classes = input_for(args.dataset, args.input_size, args.num_classes, read_dataset)
    print(format_table(describe_models(shape, num_classes), shape, num_classes))
    return 0


def _cmd_advise(args: argparse.Namespace) -> int:
    from fixmatch.inference.advise import advise

    classes = [c.strip() for c in args.classes.split(",")] if args.classes is not None else None
    if classes is not None and not all(classes):
        raise ConfigError(f"--classes {args.classes!r} has an empty name; give names separated by commas: a,b,c")
    advice = advise(args.dataset, args.budget, args.out, features=args.features, labels_csv=args.labels_csv,
                    seed=args.seed, data_dir=args.data_dir, device=args.device, classes=classes)
    already = f" (besides the {advice.num_labeled} already labeled)" if advice.num_labeled else ""
    print(f"advise: {len(advice.picks)} images to label{already}, chosen with {advice.features}: "
          f"{advice.csv_path}; label them in {advice.page_path} (open it in a browser, then save labels.csv)")
    return 0

# The values of --device for evaluate and predict: the device key's own ({auto,cpu,cuda,cuda:N}).
_DEVICES = next(f.metadata["metavar"] for f in fields(Config) if f.name == "device")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fixmatch", description="FixMatch semi-supervised image classification.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                                help="what to do (fixmatch COMMAND --help describes its arguments)")

    p = sub.add_parser("train", help="train a model (or resume a run)",
                       usage="%(prog)s [--preset NAME] [--config FILE.yaml] [--out RUN_DIR] [--resume] "
                             "[--KEY VALUE ...]",
                       description="Train with FixMatch or the supervised baseline. Precedence: "
                                   "defaults < --preset < --config file < flags. Every config key is a flag "
                                   "(num_labels: --num-labels; true/false keys: --KEY and --no-KEY); a config "
                                   "file uses the keys' names.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named setting (see: fixmatch presets)")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys")
    groups = _config_groups(p)
    groups["run"].add_argument("--out", metavar="RUN_DIR",
                               help="run directory (default: runs/<dataset>-<method>-...)")
    groups["run"].add_argument("--resume", action="store_true",
                               help="continue the run in --out from its last checkpoint")
    _add_config_flags(groups)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("pretrain", help="self-supervised SimCLR pretraining of a backbone, without labels",
                       usage="%(prog)s --dataset NAME --out RUN_DIR [--resume] [--KEY VALUE ...]",
                       description="Contrastive pretraining (SimCLR: two augmented views per image, NT-Xent) of a "
                                   "registry backbone on the training images, labels unused; a kNN accuracy of the "
                                   "features is logged where the data set has test labels. Start FixMatch from it "
                                   "with: fixmatch train --init-weights RUN_DIR (same --model).")
    groups = _config_groups(p, PretrainConfig)
    groups["run"].add_argument("--out", metavar="RUN_DIR", required=True, help="run directory")
    groups["run"].add_argument("--resume", action="store_true",
                               help="continue the run in --out from its last checkpoint")
    _add_config_flags(groups, PretrainConfig)
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("advise", help="choose which training images to label first (TypiClust) and write a "
                                      "labeling page",
                       description="Embed every training image (--features: a fixmatch pretrain run; else a fixed "
                                   "random projection of the pixels), cluster them with k-means into budget + "
                                   "labeled clusters, and propose the most typical image of each of the largest "
                                   "clusters without a labeled image (TypiClust). Writes OUT/to_label.csv and "
                                   "OUT/index.html, a page that saves the labels.csv train --labels-csv reads.")
    p.add_argument("--dataset", required=True, metavar="NAME", help="data set name, or folder:PATH for your images")
    p.add_argument("--budget", required=True, type=_int_flag("--budget"), metavar="N",
                   help="how many images to propose")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for to_label.csv and index.html (new, "
                                                                "empty, or an earlier advice's)")
    p.add_argument("--features", default=None, metavar="RUN_DIR",
                   help="a fixmatch pretrain run whose network embeds the images (default: a fixed random "
                        "projection of the pixels)")
    p.add_argument("--labels-csv", default=None, metavar="FILE",
                   help="labels given so far (index,label or path,label rows): those images are not proposed again "
                        "and their clusters come last")
    p.add_argument("--seed", type=_int_flag("--seed"), default=0, metavar="N",
                   help="seeds k-means (default: 0)")
    p.add_argument("--data-dir", default="data", metavar="DIR", help="where the data set lives (default: data)")
    p.add_argument("--device", default="auto", metavar=_DEVICES, help="where to embed the images (default: auto)")
    p.add_argument("--classes", default=None, metavar="A,B,C",
                   help="folder data sets: the class names the labeling page offers (default: the labels in "
                        "--labels-csv, or in the folder's labels.csv, where given; else the labeled/ folders' names)")
    p.set_defaults(func=_cmd_advise)

    p = sub.add_parser("evaluate", help="evaluate a run directory or checkpoint on the test set",
                       description="Top-1, top-5, macro-F1 and per-class accuracy of a trained model on a test set, "
                                   "optionally with its confusion matrix.")
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run directory (its last checkpoint) or a checkpoint file")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="where the data set lives (default: the run's data_dir)")
    p.add_argument("--device", default="auto", metavar=_DEVICES, help="where to run (default: auto)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="EMA (default) or raw weights")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--dataset", default=None, metavar="NAME",
                   help="test set to use (default: the run's); must have the model's classes and image shape")
    p.add_argument("--confusion", default=None, metavar="FILE.png", help="write the confusion matrix as a PNG")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="classify image files and folders with a trained model",
                       description="Print path, predicted class and confidence for each image; folders are "
                                   "searched recursively. Unreadable files are reported and skipped; the exit "
                                   "code is 1 only when no file could be read.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file, run directory or exported .safetensors")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    p.add_argument("--top-k", type=_int_flag("--top-k"), default=1, metavar="K",
                   help="classes shown per image (default: 1)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default: table)")
    p.add_argument("--device", default="auto", metavar=_DEVICES, help="where to run (default: auto)")
    p.add_argument("--batch-size", type=_int_flag("--batch-size"), default=64, metavar="N",
                   help="images per forward pass (default: 64)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="EMA (default) or raw weights")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="export a trained model as TorchScript, torch.export (.pt2), ONNX or "
                                      "safetensors",
                       description="TorchScript, .pt2 and ONNX files contain the preprocessing: they take uint8 "
                                   "or float [0, 1] images (N, C, H, W) of any size and return logits.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or run directory")
    # export.EXPORT_FORMATS and INPUT_DTYPES, written out so that building the parser does not import torch.
    p.add_argument("--format", required=True, choices=["torchscript", "pt2", "onnx", "safetensors"],
                   help="file format")
    p.add_argument("--out", required=True, metavar="FILE", help="file to write (replaced atomically)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="EMA (default) or raw weights")
    p.add_argument("--input-dtype", choices=["uint8", "float32"], default="uint8",
                   help="pt2 and ONNX: the graph's input type, uint8 [0, 255] (default) or float32 [0, 1]")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("sweep", help="run every configuration of a study grid (skips finished runs, resumes others)",
                       description="Run a study file's grid, each run in STUDY_DIR/<its grid values>. Re-running "
                                   "skips finished runs and resumes interrupted ones; a failed run is recorded "
                                   f"in its {ERROR_NAME} and the others go on.")
    p.add_argument("study", metavar="STUDY.yaml", help="study file: base, optional variants, grid (see studies/)")
    p.add_argument("--out", metavar="STUDY_DIR", required=True, help="folder that receives one run directory per run")
    p.add_argument("--workers", type=_int_flag("--workers"), default=1, metavar="N",
                   help="runs at a time, each with cores/N torch threads (default: 1)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("report", help="tables and figures of a study's runs (Markdown, CSV, PNG, index.html)",
                       description=f"Read the runs' {METRICS_NAME}, {SUMMARY_NAME} and {CONFIG_NAME} and write a "
                                   "results table, figures and an index.html into REPORT_DIR.")
    p.add_argument("paths", nargs="+", metavar="STUDY_DIR_OR_RUN_DIR", help="study folders and/or run directories")
    p.add_argument("--out", metavar="REPORT_DIR", required=True, help="folder for the report")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("show-augment", help="draw original, weak and strong views of a few training images (PNG)",
                       description="Write a grid of original, weak and strong views of training images; each strong "
                                   "view is captioned with the ops and magnitudes applied to it.")
    p.add_argument("--dataset", required=True, metavar="NAME", help="data set name (as for train --dataset)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the PNG file to write")
    p.add_argument("--strong", default="randaugment", choices=STRONG_AUGMENTS,
                   help="strong policy (default: randaugment)")
    p.add_argument("--cutout", type=_float_flag("--cutout"), default=0.5, metavar="X",
                   help="Cutout side as a fraction of the image side (default: 0.5)")
    p.add_argument("--weak-padding", default="reflect", choices=WEAK_PADDINGS,
                   help="border of the weak view's translation (default: reflect)")
    p.add_argument("--randaugment-ops", type=_int_flag("--randaugment-ops"), default=Config.randaugment_ops,
                   metavar="N",
                   help=f"--strong randaugment: ops drawn per image (default: {Config.randaugment_ops}, as in train)")
    p.add_argument("--randaugment-prob", type=_float_flag("--randaugment-prob"), default=Config.randaugment_prob,
                   metavar="P",
                   help="--strong randaugment: probability that each op is applied "
                        f"(default: {Config.randaugment_prob}, as in train)")
    p.add_argument("--num-images", type=_int_flag("--num-images"), default=6, metavar="N",
                   help="images in the grid, 1 to 64 (default: 6)")
    p.add_argument("--seed", type=_int_flag("--seed"), default=0, metavar="N",
                   help="picks the images and draws the views (default: 0)")
    p.add_argument("--data-dir", default="data", metavar="DIR", help="where the data set lives (default: data)")
    p.set_defaults(func=_cmd_show_augment)

    p = sub.add_parser("presets", help="list the presets and their values",
                       description="Every named setting of train --preset with the keys it sets (and their "
                                   "defaults where they differ).")
    p.set_defaults(func=_cmd_presets)
    p = sub.add_parser("models", help="list the models with their parameter counts and FLOPs",
                       description="Every registered model with its parameter count and forward FLOPs per image "
                                   "(2 x multiply-adds) at the data set's input size (default: 3,32,32, 10 classes).")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--dataset", metavar="NAME", help="use this data set's image shape and number of classes")
    size.add_argument("--input-size", metavar="C,H,W", help="image shape, e.g. 3,224,224")
    p.add_argument("--num-classes", type=_int_flag("--num-classes"), default=None, metavar="N",
                   help="classes of the head (default: the data set's, or 10)")
    p.add_argument("--data-dir", default="data", metavar="DIR",
                   help="where to look for a data set not known by name (default: data)")
    p.set_defaults(func=_cmd_models)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """User-facing errors: reported in one line, without a traceback."""
    from fixmatch.data.datasets import DatasetError
    from fixmatch.data.split import SplitError
    from fixmatch.models import ModelError
    from fixmatch.runs.checkpoint import CheckpointError
    from fixmatch.runs.rundir import RunDirError
    from fixmatch.training.nonfinite import NonFiniteError
    return ConfigError, CheckpointError, DatasetError, SplitError, ModelError, NonFiniteError, RunDirError


# The exit status of a command whose output pipe was closed early (`fixmatch presets | head`): 128 + SIGPIPE,
# what a shell reports for a tool that the signal ended.
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            if sys.stdout is not None:
                sys.stdout.flush()  # output still buffered for a closed pipe fails here, not at interpreter exit
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _discard_stdout() -> None:
    """Point stdout at the null device: Python's final flush would otherwise fail again and print a traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is no file descriptor (captured, replaced)
        pass


def _nul_argument(args: argparse.Namespace) -> str | None:
    """The first option whose text holds a NUL character, if any."""
    for name, value in vars(args).items():
        texts = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(t, str) and "\x00" in t for t in texts):
            return name
    return None


def _main(argv: Sequence[str] | None) -> int:
    from fixmatch.training.loop import TrainingInterrupted

    args = build_parser().parse_args(argv)
    nul = _nul_argument(args)
    if nul is not None:  # the OS refuses such a name (ValueError deep inside); say so before anything runs
        print(f"fixmatch: error: --{nul.replace('_', '-')} contains a NUL character, which no file name or value "
              f"can hold; remove it", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except TrainingInterrupted as e:
        print(f"fixmatch: {e}", file=sys.stderr)
        return 130
    except _expected_errors() as e:
        print(f"fixmatch: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a full, read-only or forbidden output folder, wherever the write happened
        if e.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS, errno.EACCES,
                           errno.EPERM):
            raise
        print(f"fixmatch: error: cannot write {e.filename or 'the output'} ({e.strerror}); free disk space or "
              f"choose a writable --out", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
