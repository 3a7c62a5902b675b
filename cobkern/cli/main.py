"""The ``cobkern`` command line (also ``python -m cobkern``).

Commands (each reads the previous step's files from ``--out``)::

    cobkern train      --out OUT [--preset quick] [--arch tsra|relu] [--set steps=100 ...]
    cobkern calibrate  --out OUT [--samples N] [--augment] [--f32-dot MODE]
                       [--channels-last [auto|on|off] | --no-channels-last] [--cuda-graphs]
    cobkern prune      --out OUT --strategy NAME --value V [--value-v V] [--importance l2|l1]
                       [--baseline] [--normalizer kept|original] [--round-to N] [--name NAME]
    cobkern finetune   --out OUT --name NAME [--steps N] [--lr LR]
    cobkern evaluate   --out OUT [--name NAME | --model FILE]
    cobkern sweep      --out OUT [--experiments fixed,normalizer,...] [--fractions 0,0.5,...]
    cobkern report     --out OUT
    cobkern run        --out OUT --preset quick|fast|paper     (all of the above)

Errors in the input (a missing file of an earlier step, a bad value) print one ``error:``
line naming the fix and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "DefaultsHelpFormatter"]


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help only where that says something: not
    when the help already names its default, not for ``None`` (which means "the config's" /
    "the preset's" here, never a literal None), and not for the empty list of a repeatable
    option."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None or action.default == []:
            return action.help  # (SUPPRESS: the base class's own check)
        return super()._get_help_string(action)


_STRATEGY_HELP = (
    "ratio: prune the fraction p of each subspace; param_target: the fraction P of parameters "
    "via p = 1 - sqrt(1 - P); param_exact: the smallest achievable fraction >= P of all "
    "parameters (bisection); count: "
    "prune n channels; zscore: z-score below t; mean / median / max: below t times the "
    "subspace's mean / median / max importance; energy: keep the leading directions holding "
    "a fraction e of the energy (CoB only); lossless: rank tolerance, drop directions with "
    "eigenvalue <= t * max (CoB only)")


def _floats(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None
    if not out:  # an empty list read as "not given": the preset's whole list ran
        raise argparse.ArgumentTypeError(f"expected at least one number, got {text!r}")
    return out


def _names(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    if not out:  # an empty list read as "not given": every experiment ran
        raise argparse.ArgumentTypeError(f"expected at least one name, got {text!r}")
    return out


_AUTO = "auto"


def _tristate(text: str) -> bool | str:
    """``on`` / ``off`` / ``auto`` (also true/false, yes/no, 1/0) → True / False / "auto"."""
    t = text.strip().lower()
    if t in ("on", "true", "yes", "1"):
        return True
    if t in ("off", "false", "no", "0"):
        return False
    if t == _AUTO:
        return _AUTO
    raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")


def _kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        val: Any = json.loads(v)
    except ValueError:
        val = v
    return k.strip().replace("-", "_"), val


def _common(p: argparse.ArgumentParser, *, out_required: bool = True,
            computes: bool = True) -> None:
    """``--out`` and ``--debug``; with ``computes`` (every command but ``report``, which only
    reads files) also ``--device``, ``--seed`` and ``--no-progress``."""
    g = p.add_argument_group("common options")
    g.add_argument("--out", required=out_required, type=Path, metavar="DIR",
                   help="experiment directory: every step reads and writes its files here")
    g.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    if not computes:
        return
    g.add_argument("--device", default=None, metavar="DEV",
                   help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N "
                        "(default: the experiment config's, normally auto)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed for training, data subsets and calibration images "
                        "(default: the experiment config's, normally 0)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per step."""
    from cobkern.ops.covariance import F32_DOTS
    p = argparse.ArgumentParser(
        prog="cobkern",
        description="Change-of-basis (CoB) pruning of TSRA networks: train, calibrate, prune, "
                    "fine-tune, evaluate, sweep and report. Each step reads the previous "
                    "step's files from --out, so you can calibrate once and prune many times.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with: cobkern run --preset quick --out runs/quick   (5-17 min on a "
               "2-core CPU). Then `cobkern <command> --help` for each step.")
    from cobkern import __version__
    p.add_argument("--version", action="version", version=f"cobkern {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = DefaultsHelpFormatter

    s = sub.add_parser("run", formatter_class=fmt,
                       help="everything end to end from a preset",
                       description="Train, calibrate, rotate, run the sweeps and write the "
                                   "report. Work already done from the same inputs is skipped, "
                                   "so re-running continues an interrupted run. Results are "
                                   "tied to the trained model's weights, the calibration, the "
                                   "test images and the fine-tuning recipe: what changed is "
                                   "measured again (other --calib-samples: recalibrated). "
                                   "Training settings other than those OUT/train was made "
                                   "with are refused (use another --out, or `cobkern train "
                                   "--force`).")
    s.add_argument("--preset", default="quick", choices=["quick", "fast", "paper"],
                   help="quick: width-1/8 model, minutes on a CPU; fast / paper: the full "
                        "model on a GPU (paper = the authors' 120k-step training)")
    s.add_argument("--data-root", type=Path, default=None, metavar="PATH",
                   help="the CIFAR-10 to use: the JPEG archive (cifar10-jpeg.tar.gz), "
                        "torchvision's cifar-10-batches-py folder or an ImageFolder tree with "
                        "train/ and test/ (default: $COBKERN_DATA if set, else the archive "
                        "in data/ of the cobkern source checkout); kept in OUT/config.json "
                        "(the training setting data_root)")
    _experiment_options(s)
    _common(s)

    s = sub.add_parser("train", formatter_class=fmt, help="train a model into OUT/train",
                       description="Train the TSRA model (or the ReLU control, --arch relu) "
                                   "with a training preset; resumes from a checkpoint.")
    s.add_argument("--preset", default=None, choices=["quick", "fast", "paper"],
                   help="training preset (default: the experiment config's, else quick); "
                        "another preset than the one OUT/config.json was made with is refused")
    s.add_argument("--arch", default="tsra", choices=["tsra", "relu"], help="model family")
    s.add_argument("--set", dest="overrides", action="append", type=_kv, default=[],
                   metavar="KEY=VALUE",
                   help="override a training setting (a TrainConfig field, e.g. steps=200, "
                        "width=0.25, lr=1e-3); repeatable")
    s.add_argument("--force", action="store_true",
                   help="train again even if a model exists (also with other settings); the "
                        "calibration statistics of the old model are removed, and its "
                        "results in metrics.jsonl are no longer reused or reported")
    _common(s)

    s = sub.add_parser("calibrate", formatter_class=fmt,
                       help="one pass over training images → OUT/calibration.pt",
                       description="Collect the per-subspace second moments of every CoB "
                                   "layer's activations (needs OUT/train).")
    s.add_argument("--samples", type=int, default=None,
                   help="calibration images (default: the config's; the paper uses 10000)")
    s.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="apply random crop + flip to the calibration images (the authors' "
                        "notebook did; default: no)")
    s.add_argument("--f32-dot", default=None, choices=F32_DOTS, metavar="MODE",
                   help="the covariance kernel's products for float32 activations on a GPU: "
                        "ieee (default), tf32 (one TF32 product, operands truncated by up to "
                        "2^-10), tf32x3, bf16x6 (tensor cores, less exact) or fp64 "
                        "(float64 tensor cores: exact products, float64 sums)")
    s.add_argument("--channels-last", nargs="?", const=True, default=None, type=_tristate,
                   metavar="auto|on|off",
                   help="feed the images in channels-last format, so the covariance kernel "
                        "reads channel-contiguous activations (--channels-last, or 'on'), or "
                        "NCHW (--no-channels-last, or 'off'); the same statistics up to float "
                        "round-off. default: the config's, normally auto: channels-last for a "
                        "float32 model on CUDA (1.44-1.48x faster calibration on an H200), "
                        "NCHW otherwise (a bfloat16 model: 1.84x slower channels-last on one "
                        "lease, 1.07x faster on the next; CPU untimed; BENCHMARKS.md). The "
                        "choice is kept in OUT/config.json; 'auto' goes back to the automatic "
                        "one")
    s.add_argument("--no-channels-last", dest="channels_last", action="store_const",
                   const=False, help="feed the images in NCHW format (same as "
                                     "--channels-last off)")
    s.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="on CUDA, replay each batch's forward pass and covariance kernels "
                        "as one CUDA graph (no Python per layer and batch; the same "
                        "statistics up to float round-off; a model that cannot be captured "
                        "warns and runs eagerly). default: the config's, normally off")
    _common(s)

    s = sub.add_parser("prune", formatter_class=fmt,
                       help="prune the trained model → OUT/pruned/NAME",
                       description="Rotate (CoB) and prune the trained model with one "
                                   "strategy; writes the model file, prune.json and evaluates "
                                   "it. Needs OUT/train and OUT/calibration.pt.")
    s.add_argument("--strategy", required=True,
                   choices=["ratio", "param_target", "param_exact", "count", "zscore", "mean",
                            "median", "max", "energy", "lossless"], help=_STRATEGY_HELP)
    s.add_argument("--value", type=float, default=None,
                   help="the strategy's value (for U; also for V unless --value-v); required "
                        "except for lossless, whose tolerance defaults to one set by the "
                        "statistics' precision")
    s.add_argument("--value-v", type=float, default=None,
                   help="a separate value for the V subspace")
    s.add_argument("--whole-layer", action="store_true",
                   help="rank U and V together with the single value instead of per subspace")
    s.add_argument("--importance", default="l2", choices=["l2", "l1"],
                   help="channel importance: l2 = sqrt(sum a^2), l1 = sum |a|")
    s.add_argument("--baseline", action="store_true",
                   help="prune without the rotation (the TSRA baseline)")
    s.add_argument("--normalizer", default=None, choices=["kept", "original"],
                   help="RMSNorm normaliser after pruning: kept width (the authors') or the "
                        "original width (default: the config's, normally kept; original for "
                        "lossless, which is only lossless that way)")
    s.add_argument("--round-to", type=int, default=1, metavar="N",
                   help="keep each subspace's channel count a multiple of N (capped at the "
                        "subspace's size), e.g. 8 for tensor cores; rounding up keeps more "
                        "channels than the strategy asks; 1: no rounding")
    s.add_argument("--name", default=None,
                   help="name of the pruned model under OUT/pruned/ (default: from the "
                        "options, e.g. cob-l2-ratio-0.5-0.5-kept, or ...-0.5-r8-kept with "
                        "--round-to 8); re-pruning a name replaces it and drops its "
                        "fine-tuning run")
    s.add_argument("--no-eval", action="store_true", help="do not evaluate the pruned model")
    _common(s)

    s = sub.add_parser("finetune", formatter_class=fmt,
                       help="fine-tune a pruned model (OUT/pruned/NAME/finetune)",
                       description="Fine-tune a model written by `cobkern prune` with the "
                                   "config's recipe (flags override it).")
    s.add_argument("--name", required=True, help="the pruned model under OUT/pruned/")
    s.add_argument("--steps", type=int, default=None, help="optimizer steps")
    s.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW)")
    s.add_argument("--batch-size", type=int, default=None, help="batch size")
    _common(s)

    s = sub.add_parser("evaluate", formatter_class=fmt,
                       help="test accuracy of a model",
                       description="Evaluate the trained model, a pruned one (--name) or any "
                                   "model file (--model); the result is printed and appended to "
                                   "OUT/metrics.jsonl.")
    which = s.add_mutually_exclusive_group()
    which.add_argument("--name", default=None, help="a pruned model under OUT/pruned/ (its "
                       "fine-tuned version when it exists, unless --no-finetuned)")
    s.add_argument("--no-finetuned", action="store_true",
                   help="with --name: the pruned model before fine-tuning")
    which.add_argument("--model", type=Path, default=None, help="a model file")
    s.add_argument("--test-subset", type=int, default=None,
                   help="test images (0 = all 10000; default: the config's eval_subset)")
    _common(s)

    s = sub.add_parser("sweep", formatter_class=fmt,
                       help="run the experiments → OUT/metrics.jsonl",
                       description="Fixed-ratio sweep (CoB vs baseline, L2/L1), normaliser, "
                                   "lossless, threshold + fine-tuning, Torch-Pruning peers, "
                                   "speed. Points already measured from the same model, "
                                   "calibration, test images and fine-tuning recipe are "
                                   "skipped.")
    _experiment_options(s)
    _common(s)

    s = sub.add_parser("report", formatter_class=fmt,
                       help="write OUT/report.md with figures and tables",
                       description="Rebuild summary.json, tables/*.csv, figures/*.png and "
                                   "report.md from the files in OUT (nothing is recomputed).")
    _common(s, computes=False)
    return p


def _experiment_options(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("experiment settings (override the preset / OUT/config.json)")
    g.add_argument("--experiments", type=_names, default=None, metavar="LIST",
                   help="comma-separated subset of fixed,normalizer,lossless,threshold,peers,"
                        "speed")
    g.add_argument("--fractions", type=_floats, default=None, metavar="LIST",
                   help="parameter fractions P of the fixed-ratio sweep, e.g. 0,0.5,0.9")
    g.add_argument("--importances", type=_names, default=None, metavar="LIST",
                   help="l2,l1")
    g.add_argument("--eval-subset", type=int, default=None,
                   help="test images per evaluation (0 = all)")
    g.add_argument("--calib-samples", type=int, default=None, help="calibration images")
    g.add_argument("--finetune-steps", type=int, default=None,
                   help="fine-tuning steps after threshold / peer pruning")
    g.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="a JSON object of experiment settings (the keys --set takes, e.g. "
                        "{\"fractions\": [0, 0.5], \"train\": {\"steps\": 100}}; an "
                        "OUT/config.json works too); --set and the options above win over it")
    g.add_argument("--set", dest="overrides", action="append", type=_kv, default=[],
                   metavar="KEY=VALUE",
                   help="any ExperimentConfig setting as JSON, e.g. "
                        "'thresholds=[[\"max\",0.1]]' or 'train={\"steps\":100}' (a group "
                        "such as train or finetune merges key by key into the settings it "
                        "overrides); repeatable. 'train=' sets the TSRA model's training "
                        "only: the ReLU control shares its data settings and width but takes "
                        "its own schedule from 'train_relu_overrides={\"steps\":100}'")


# ---------------------------------------------------------------------------- helpers
def _experiment_config(args: argparse.Namespace, preset: str | None = None) -> Any:
    from cobkern.experiments import get_experiment_preset, load_experiment_config
    from cobkern.experiments.config import merge_setting
    from cobkern.experiments.files import Layout

    layout = Layout(args.out)
    if preset is not None and not layout.config.is_file():
        cfg = get_experiment_preset(preset)
    elif layout.config.is_file():
        cfg = load_experiment_config(layout.config)
        if preset is not None and cfg.preset != preset:
            raise ValueError(f"{layout.config} was made with preset {cfg.preset!r}, not "
                             f"{preset!r}; use another --out or delete that directory")
    else:
        cfg = get_experiment_preset(getattr(args, "preset", None) or "quick")
    over: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        over.update(_settings_file(args.config))
        named = over.pop("preset", None)  # the preset is chosen above (--preset / OUT's)
        if named is not None and named != cfg.preset:
            raise ValueError(f"--config {args.config} is for preset {named!r}, but this run's "
                             f"preset is {cfg.preset!r}; pass --preset {named}")
    for k, v in getattr(args, "overrides", []) if args.command in ("run", "sweep") else []:
        if k == "preset" and v != cfg.preset:  # as for --config: the preset is chosen above
            raise ValueError(f"--set preset={v} conflicts with this run's preset "
                             f"{cfg.preset!r}; use --preset {v} (and another --out)")
        over[k] = merge_setting(over.get(k), v)  # a group merges into --config's
    if getattr(args, "experiments", None):
        over["experiments"] = args.experiments
    if getattr(args, "fractions", None):
        over["fractions"] = args.fractions
    if getattr(args, "importances", None):
        over["importances"] = args.importances
    if getattr(args, "eval_subset", None) is not None:
        over["eval_subset"] = args.eval_subset
    if getattr(args, "calib_samples", None) is not None:
        over["calib_samples"] = args.calib_samples
    if getattr(args, "finetune_steps", None) is not None:
        ft = over.get("finetune", {})
        # merged into a --set finetune={...} (a non-object there is reported by validate)
        over["finetune"] = {**ft, "steps": args.finetune_steps} if isinstance(ft, dict) else ft
    if getattr(args, "data_root", None) is not None:  # absolute: config.json outlives the cwd
        over["train"] = merge_setting(over.get("train"),
                                      {"data_root": str(args.data_root.resolve())})
    if args.seed is not None:
        over["seed"] = args.seed
    if args.device is not None:
        over["device"] = args.device
    return cfg.with_overrides(over) if over else cfg


def _settings_file(path: Path) -> dict[str, Any]:
    """The settings of a ``--config`` file: a JSON object, or an ``OUT/config.json`` (its
    ``experiment`` section)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--config {path}: cannot read it as JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("experiment"), dict):
        data = data["experiment"]
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a JSON object of settings, got "
                         f"{type(data).__name__}")
    return dict(data)


def _check_out(out: Path) -> Path:
    """``out`` unless it exists and is not a directory."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory; choose another --out")
    return out


def _context(args: argparse.Namespace, cfg: Any) -> Any:
    from cobkern.experiments import Context

    _check_out(args.out)
    return Context(args.out, cfg, device=args.device, progress=not args.no_progress)


def _check_name(name: str) -> str:
    """A pruned model's name: one path component (no separators, not '.' or '..')."""
    bad = (not name or name in (".", "..") or "/" in name or "\\" in name or ".." in name
           or name != name.strip() or "\0" in name)
    if bad:
        raise ValueError(f"--name {name!r}: expected a plain name (no '/', '\\' or '..'), "
                         "e.g. cob-l2-p50")
    return name


def _value(args: argparse.Namespace) -> Any:
    v: Any = args.value
    if v is None:
        if args.strategy == "lossless" and args.value_v is None:
            return None  # RankTolerance picks the tolerance from the statistics' precision
        raise ValueError(f"--value is required for --strategy {args.strategy}")
    if args.whole_layer and args.value_v is not None:
        raise ValueError("--value-v sets V's own value, but --whole-layer ranks U and V "
                         "together with the single --value; drop one of the two")
    vv = args.value_v if args.value_v is not None else v
    if args.strategy == "count":
        for x in (v, vv):
            if not math.isfinite(x) or x != int(x) or x < 0:  # int(inf): a traceback
                raise ValueError(f"--strategy count prunes a whole number of channels; got "
                                 f"{x:g} (use a non-negative integer)")
        v, vv = int(v), int(vv)
    return v if args.whole_layer else [v, vv]


def _round_to(args: argparse.Namespace) -> int:
    """``--round-to``, refused unless a positive integer."""
    if args.round_to < 1:
        raise ValueError(f"--round-to {args.round_to}: expected a positive integer (1: no "
                         "rounding; e.g. 8 for tensor cores)")
    return int(args.round_to)


def _default_name(args: argparse.Namespace, normalizer: str) -> str:
    """E.g. ``cob-l2-ratio-0.5-0.5-kept`` (``-whole`` for --whole-layer, ``-r8`` for
    --round-to 8): every option that changes the pruned model is in the name, so different
    prunes never share a directory (values ``:g`` would merge, such as 0.1234561 and
    0.1234564, are written out exactly)."""
    from cobkern.experiments.sweeps import json_value

    v = _value(args)
    if v is None:
        vs = "auto"
    else:
        vs = "-".join(json_value(x) for x in (v if isinstance(v, list) else [v]))
    method = "baseline" if args.baseline else "cob"
    whole = "-whole" if args.whole_layer else ""
    rounded = f"-r{args.round_to}" if args.round_to != 1 else ""
    return f"{method}-{args.importance}-{args.strategy}-{vs}{whole}{rounded}-{normalizer}"


def _model_file(d: Path) -> Path | None:
    for name in ("model.safetensors", "model.pt"):
        if (d / name).is_file():
            return d / name
    return None


class _Interrupted(KeyboardInterrupt):
    """An interrupt whose message says how to continue (when not by the same command)."""


# ---------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    from cobkern.experiments import run_pipeline

    cfg = _experiment_config(args, preset=args.preset)
    ctx = _context(args, cfg)
    run_pipeline(ctx, cfg.experiments)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cobkern.experiments import train_step
    from cobkern.experiments.pipeline import (
        check_trained_settings,
        saved_config,
        train_command,
        trained_with,
    )

    cfg = _experiment_config(args, preset=args.preset)  # another preset than OUT's: refused
    if args.overrides:
        key = "train" if args.arch == "tsra" else "train_relu_overrides"
        cfg = cfg.with_overrides({key: {**getattr(cfg, key), **dict(args.overrides)}})
    ctx = _context(args, cfg)
    if not args.force:  # before config.json claims settings the model was not trained with
        check_trained_settings(ctx, args.arch)
    # config.json (the ReLU control's --set too: the pipeline checks its model against
    # train_relu_overrides), kept on failure only once a run was started with these settings
    try:
        with saved_config(ctx, keep=lambda: trained_with(ctx, args.arch)):
            res = train_step(ctx, args.arch, force=args.force)
    except KeyboardInterrupt:
        if args.force and trained_with(ctx, args.arch):
            # the new run has started: the same command (--force) would start it over
            raise _Interrupted(f"interrupted; continue the new run with "
                               f"`{train_command(ctx, args.arch)}` (without --force, which "
                               "would start it again at step 0)") from None
        raise
    print(f"{args.arch} model: test accuracy {100 * res['test_accuracy']:.2f}% after "
          f"{res['steps']} steps → {ctx.layout.model_file(args.arch)}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cobkern.experiments import calibrate_step
    from cobkern.experiments.pipeline import saved_config

    cfg = _experiment_config(args)
    over: dict[str, Any] = {}
    if args.samples is not None:
        over["calib_samples"] = args.samples
    if args.augment is not None:
        over["calib_augment"] = args.augment
    if args.f32_dot is not None:
        over["calib_f32_dot"] = args.f32_dot
    if args.channels_last is not None:  # "auto": back to the config's automatic choice
        over["calib_channels_last"] = None if args.channels_last == _AUTO else args.channels_last
    if args.cuda_graphs is not None:
        over["calib_cuda_graphs"] = args.cuda_graphs
    if over:
        cfg = cfg.with_overrides(over)
    ctx = _context(args, cfg)
    ctx.layout.require_model("tsra")
    with saved_config(ctx):  # put back if the calibration fails
        path = calibrate_step(ctx, force=True)
    stats = ctx.stats()
    print(f"calibrated {len(stats)} layers on {stats.num_images:,} images → {path}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from cobkern.experiments import layer_widths
    from cobkern.experiments.files import append_jsonl, atomic_write_json
    from cobkern.models import default_model_filename, save_model

    round_to = _round_to(args)  # before anything is read or written
    cfg = _experiment_config(args)
    ctx = _context(args, cfg)
    if args.name is not None:
        _check_name(args.name)
    value = _value(args)
    # round_to only when not 1: the files of unrounded prunes stay as they were
    rounding: dict[str, Any] = {"round_to": round_to} if round_to != 1 else {}
    model, report = ctx.prune((args.strategy, value), importance=args.importance,
                              cob=not args.baseline, normalizer=args.normalizer,
                              round_to=round_to)
    normalizer = report.meta["normalizer"]
    name = args.name or _default_name(args, normalizer)
    d = ctx.layout.pruned_dir(name)
    if d.exists() and not d.is_dir():  # was "[Errno 17] File exists" from the writer
        raise ValueError(f"{d} exists and is not a folder: remove it or choose another --name")
    info: dict[str, Any] = {"name": name, "strategy": args.strategy, "value": _value(args),
                            "importance": args.importance, "cob": not args.baseline,
                            "normalizer": normalizer, **rounding, **report.to_dict(),
                            "widths": layer_widths(model)}
    if not args.no_eval:
        ev = ctx.evaluate(model)
        info.update(accuracy=ev["accuracy"], loss=ev["loss"], n_eval=ev["n"])
    if (d / "finetune").exists():
        # a fine-tuning run of the model this prune replaces: never resume or report it
        # (removed only now: a failed or interrupted evaluation keeps both as they were)
        shutil.rmtree(d / "finetune")
    # a re-prune of this name killed between the two writes must not leave the old
    # prune.json describing the new model file
    (d / "prune.json").unlink(missing_ok=True)
    save_model(model, d / default_model_filename(), extra={
        k: info[k] for k in ("strategy", "importance", "cob", "normalizer", "round_to")
        if k in info})
    atomic_write_json(d / "prune.json", info)
    print(report.summary())
    msg = f"pruned {100 * report.fraction_pruned:.2f}% of the parameters → {d}"
    if "accuracy" in info:
        msg += f"; accuracy {100 * info['accuracy']:.2f}% on {info['n_eval']} test images"
        append_jsonl(ctx.layout.metrics, {
            "experiment": "prune", "name": name, "method": "cob" if info["cob"] else "baseline",
            "arch": "tsra", "importance": args.importance, "normalizer": normalizer,
            "strategy": args.strategy, "value": _value(args), **rounding, "finetuned": False,
            "fraction_pruned": report.fraction_pruned, "params_after": report.total_after,
            "accuracy": info["accuracy"], "loss": info["loss"], "n_eval": info["n_eval"],
            "inputs": ctx.inputs(calibration=True)})
    print(msg)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from cobkern.experiments.files import MissingStepError, append_jsonl
    from cobkern.models import load_model

    cfg = _experiment_config(args)
    over = {k: v for k, v in (("steps", args.steps), ("lr", args.lr),
                              ("batch_size", args.batch_size)) if v is not None}
    if over:
        cfg = cfg.with_overrides({"finetune": over})
    ctx = _context(args, cfg)
    d = ctx.layout.pruned_dir(_check_name(args.name))
    src = _model_file(d)
    if src is None:
        raise MissingStepError(f"pruned model not found in {d} — make it with `cobkern prune "
                               f"--out {ctx.layout.root} --name {args.name} --strategy ... "
                               "--value ...`")
    model = load_model(src, ctx.device)
    res = ctx.finetune(model, args.name, "tsra", out=d / "finetune")
    print(f"fine-tuned {res['steps']} steps: accuracy {100 * res['test_accuracy']:.2f}% on "
          f"{len(ctx.eval_set())} test images → {res['model_path']}")
    append_jsonl(ctx.layout.metrics, {"experiment": "finetune", "name": args.name,
                                      "finetuned": True, "finetune_steps": res["steps"],
                                      "accuracy": res["test_accuracy"],
                                      "loss": res["test_loss"]})
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cobkern.experiments import count_params
    from cobkern.experiments.files import MissingStepError, append_jsonl
    from cobkern.models import load_model

    if args.no_finetuned and args.name is None:  # it would silently evaluate another model
        raise ValueError("--no-finetuned needs --name (it picks a pruned model's version "
                         "before fine-tuning)")
    cfg = _experiment_config(args)
    if args.test_subset is not None:
        cfg = cfg.with_overrides({"eval_subset": args.test_subset})
    ctx = _context(args, cfg)
    if args.model is not None:
        path = args.model
        if not path.is_file():
            raise MissingStepError(f"model file not found: {path}")
    elif args.name is not None:
        d = ctx.layout.pruned_dir(_check_name(args.name))
        path = None if args.no_finetuned else _model_file(d / "finetune")
        path = path or _model_file(d)
        if path is None:
            raise MissingStepError(f"pruned model not found in {d} — make it with `cobkern "
                                   f"prune --out {ctx.layout.root} --name {args.name} ...`")
    else:
        path = ctx.layout.require_model("tsra")
    model = load_model(path, ctx.device)
    t0 = time.perf_counter()
    ev = ctx.evaluate(model)
    rec = {"experiment": "evaluate", "model": str(path), "params_after": count_params(model),
           "accuracy": ev["accuracy"], "loss": ev["loss"], "n_eval": ev["n"],
           "eval_s": time.perf_counter() - t0}
    append_jsonl(ctx.layout.metrics, rec)
    print(f"{path}: accuracy {100 * ev['accuracy']:.2f}%, loss {ev['loss']:.4f} on {ev['n']} "
          f"test images ({rec['params_after']:,} parameters)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from cobkern.experiments import calibrate_step, sweep_step
    from cobkern.experiments.pipeline import check_trained_settings, saved_config

    cfg = _experiment_config(args)
    ctx = _context(args, cfg)
    ctx.layout.require_model("tsra")
    ctx.layout.require_calibration()
    check_trained_settings(ctx, "tsra")
    if "peers" in cfg.experiments and "relu" in cfg.peer_archs:
        check_trained_settings(ctx, "relu")
    with saved_config(ctx):  # put back if the sweep fails (its records name their inputs)
        calibrate_step(ctx)  # again only if made from another model or with other settings
        recs = sweep_step(ctx, cfg.experiments)
    print(f"{len(recs)} records in {ctx.layout.metrics}; now `cobkern report --out "
          f"{ctx.layout.root}`")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cobkern.experiments import report_step

    path = report_step(_check_out(args.out))
    print(f"report: {path}")
    return 0


COMMANDS = {"run": cmd_run, "train": cmd_train, "calibrate": cmd_calibrate, "prune": cmd_prune,
            "finetune": cmd_finetune, "evaluate": cmd_evaluate, "sweep": cmd_sweep,
            "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cobkern``; returns the exit status (0 ok, 2 bad input, 130 stopped)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from cobkern.data import DataError
    from cobkern.models import ModelFileError
    from cobkern.training import CheckpointError, ConfigError

    # OSError: e.g. --out under a file, a full disk, no permission — the message names it
    user_errors = (OSError, ValueError, DataError, ModelFileError, CheckpointError,
                   ConfigError)
    world = os.environ.get("WORLD_SIZE", "1")
    if world.strip() not in ("", "0", "1"):
        # every process would write the same output folder (metrics, models, reports) and
        # delete what another is writing; only the trainer itself is data-parallel
        print(f"error: the cobkern pipeline runs in one process, but WORLD_SIZE={world} "
              "(torchrun?); train data-parallel with `torchrun --nproc_per_node=N -m "
              "cobkern.training ...`, then run the other steps in one process",
              file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args)
    except user_errors as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        hint = str(e) if isinstance(e, _Interrupted) else \
            "interrupted; run the same command again to continue"
        print(f"\n{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
