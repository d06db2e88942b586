"""Hyperparameter and architecture search on Ray Tune with ASHA (``ferstream automl``).

Every trial is an ordinary ``ferstream train`` run (:func:`pipeline.training.train.train`) in its own
folder ``<output>/trials/<trial id>``: it reports val top-1 and macro-F1 to Tune after every epoch and
hands Tune the epoch's ``last.pt`` training state as the trial checkpoint, so a trial that Tune
restarts (a lost worker, ``--resume``) continues with the trainer's own exact resume. ASHA
(``ASHAScheduler``) stops the trials whose val top-1 trails at its rungs.

Ray runs locally with the machine's CPUs, or on the cluster ``RAY_ADDRESS`` names (there
``--output-dir`` should be storage every node sees, because trials write their checkpoints in it).

What is searched is what the trainer already has (no trainer features were added for it):
architecture (which is also the width: ``tiny``/``compact``/``wide`` are one VGG family at widths
8..64, 24..192 and 64..512, ``resnet18`` the published FER ResNet-18 layout), dropout, learning rate,
weight decay, label smoothing, one augmentation strength (rotation, zoom, brightness/contrast jitter
and random erasing together), mixup or CutMix, and the epoch count.

Output in ``--output-dir``: ``leaderboard.csv`` and ``leaderboard.json`` (one row per trial, best
first: trial, configuration, val top-1 and macro-F1 of its best epoch, epochs, wall time, faces/s of
the model on a fixed batch) and the top ``--top-k`` best checkpoints' paths, ready for
``ferstream ensemble``.

Ray is imported inside the functions that use it: ``pipeline`` stays importable without Ray.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.architectures import ARCHITECTURES
from pipeline.entry import INTERRUPTED
from pipeline.training.leaderboard import leaderboard_rows, write_leaderboard
from pipeline.training.options import int_at_least

__all__ = [
    "PRESETS",
    "SearchPreset",
    "apply_trial_config",
    "get_args_parser",
    "main",
    "run_search",
    "search_space",
]

EXPERIMENT_NAME = "automl"
TRIAL_FINISH_MARGIN_S = 60.0


# The shipped model's recipe (compact-v2) in search-space terms: augment_strength 0.5 is rotation 10°,
# zoom 0.9-1.1 and random erasing 0.25, as its command line has (plus brightness/contrast jitter 0.2).
COMPACT_RECIPE: dict[str, Any] = {
    "arch": "compact",
    "epochs": 60,
    "dropout": 0.2,
    "lr": 0.05,
    "wd": 5e-4,
    "label_smoothing": 0.1,
    "augment_strength": 0.5,
    "mix": "none",
    "mix_alpha": 0.2,
    "seed": 0,
}


@dataclass(frozen=True)
class SearchPreset:
    """How much searching a run does. The time budget stops the search even when trials are left."""

    time_budget_s: int
    num_samples: int
    archs: tuple[str, ...]
    epochs: tuple[int, ...]
    grace_period: int  # ASHA: epochs every trial gets before it can be stopped
    description: str
    # Configurations tried before any sampled one (AutoGluon's "portfolio"): recipes already known to
    # train well here, so a budget that fits one trial still spends it on a good one. Each runs at most
    # the preset's longest schedule (see _portfolio_points).
    portfolio: tuple[dict[str, Any], ...] = ()


PRESETS: dict[str, SearchPreset] = {
    "low_resource": SearchPreset(
        time_budget_s=3600,
        num_samples=8,
        archs=("tiny", "compact"),
        epochs=(15, 40),
        grace_period=3,
        description="1 h: the small VGG nets only, the shipped recipe first (a laptop or the 2-core serving box)",
        # On 2 cores one compact epoch took 86-188 s (MODEL_CARD.md, "AutoML"), so the hour holds one trial: the
        # shipped model's recipe, its schedule fitted into the budget. More CPUs run sampled trials beside it.
        portfolio=(COMPACT_RECIPE,),
    ),
    "default": SearchPreset(
        time_budget_s=2 * 3600,
        num_samples=16,
        archs=("compact", "wide"),
        epochs=(15, 30),
        grace_period=4,
        description="2 h: the serving-size VGG nets",
        portfolio=(COMPACT_RECIPE,),
    ),
    "balanced": SearchPreset(
        time_budget_s=4 * 3600,
        num_samples=24,
        archs=("compact", "wide", "resnet18"),
        epochs=(20, 30),
        grace_period=5,
        description="4 h: VGG and ResNet-18, mid-length schedules",
        portfolio=(COMPACT_RECIPE,),
    ),
    "high_quality": SearchPreset(
        time_budget_s=12 * 3600,
        num_samples=48,
        archs=("compact", "wide", "resnet18"),
        epochs=(30, 50),
        grace_period=8,
        description="12 h: every architecture, long schedules (a GPU or a cluster)",
        portfolio=(COMPACT_RECIPE,),
    ),
}

# Learning-rate ranges per optimizer: Nesterov SGD and AdamW want very different step sizes.
LR_RANGES = {"sgd": (5e-3, 0.2), "adamw": (1e-4, 3e-3)}


def get_args_parser() -> argparse.ArgumentParser:
    presets = "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="ferstream automl",
        description="Search architectures and training hyperparameters with Ray Tune (ASHA). "
        "Every other option (--data-path, --data-format, --batch-size, --opt, --device, ...) is passed to each trial's `ferstream train`.",
    )
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help=f"search size; {presets}")
    parser.add_argument("--time-limit", type=float, default=None, help="search time budget in seconds (default: the preset's)")
    parser.add_argument("--num-samples", type=int_at_least(1), default=None, help="trials to sample (default: the preset's)")
    parser.add_argument(
        "--archs", nargs="+", default=None, choices=sorted(ARCHITECTURES), help="architectures to search (default: the preset's)"
    )
    parser.add_argument("--epochs", nargs="+", type=int_at_least(1), default=None, help="epoch counts to search (default: the preset's)")
    parser.add_argument("--grace-period", type=int_at_least(1), default=None, help="ASHA: epochs before a trial can be stopped")
    parser.add_argument("--no-portfolio", action="store_true", help="sample every trial (default: the preset's known recipes run first)")
    parser.add_argument("--cpus-per-trial", type=float, default=2.0, help="Ray CPUs each trial holds (its torch threads)")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, help="Ray GPUs each trial holds (0: CPU trials)")
    parser.add_argument("--output-dir", default=None, help="search folder (default ~/.cache/ferstream/automl)")
    parser.add_argument("--top-k", type=int_at_least(1), default=3, help="best checkpoints listed for `ferstream ensemble`")
    parser.add_argument("--seed", type=int, default=0, help="seed of the search (the trials' seeds are part of their configuration)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the search in --output-dir, unfinished trials from their checkpoints"
    )
    return parser


def search_space(preset: SearchPreset, opt: str) -> dict[str, Any]:
    """The Tune search space: the parameters :func:`apply_trial_config` maps onto ``ferstream train``'s."""
    from ray import tune

    low, high = LR_RANGES[opt]
    return {
        "arch": tune.choice(list(preset.archs)),
        "epochs": tune.choice(list(preset.epochs)),
        "dropout": tune.uniform(0.0, 0.5),
        "lr": tune.loguniform(low, high),
        "wd": tune.loguniform(1e-5, 1e-3),
        "label_smoothing": tune.uniform(0.0, 0.2),
        "augment_strength": tune.uniform(0.0, 1.0),
        "mix": tune.choice(["none", "mixup", "cutmix"]),
        "mix_alpha": tune.uniform(0.2, 1.0),
        "seed": tune.randint(0, 2**31 - 1),
    }


def _portfolio_points(preset: SearchPreset, opt: str) -> list[dict[str, Any]]:
    """The preset's portfolio within the run's options: its architectures and optimizer, at most its longest schedule."""
    low, high = LR_RANGES[opt]
    return [
        point | {"epochs": min(point["epochs"], max(preset.epochs))}
        for point in preset.portfolio
        if point["arch"] in preset.archs and low <= point["lr"] <= high
    ]


def apply_trial_config(base: argparse.Namespace, config: dict[str, Any], output_dir: Path, threads: int) -> argparse.Namespace:
    """``ferstream train`` arguments for one trial: the command line's, with the sampled values on top."""
    args = argparse.Namespace(**vars(base))
    strength = float(config["augment_strength"])
    args.arch = config["arch"]
    args.epochs = int(config["epochs"])
    args.dropout = float(config["dropout"])
    args.lr = float(config["lr"])
    args.wd = float(config["wd"])
    args.label_smoothing = float(config["label_smoothing"])
    # One knob for the geometric and photometric augmentations: 0 is only the random crop and flip.
    args.rotation = 20.0 * strength
    args.scale = (1.0 - 0.2 * strength, 1.0 + 0.2 * strength)
    args.color_jitter = 0.4 * strength
    args.random_erase = 0.5 * strength
    args.mixup_alpha = float(config["mix_alpha"]) if config["mix"] == "mixup" else 0.0
    args.cutmix_alpha = float(config["mix_alpha"]) if config["mix"] == "cutmix" else 0.0
    args.seed = int(config["seed"])
    args.name = f"automl-{output_dir.name}"
    args.output_dir = str(output_dir)
    args.threads = threads
    args.no_progress = True
    args.resume = "auto"
    return args


def _run_trial(config: dict[str, Any], base: dict[str, Any], trials_dir: str, threads: int, deadline: float) -> None:
    """One Tune trial: a ``ferstream train`` run that reports every epoch and checkpoints its last.pt.

    ``deadline`` (a ``time.time()``) is when the search's budget ends: the trial's schedule is fitted
    into what is left of it (``--time-budget``), so a slow machine shortens the schedule instead of
    having Tune cut the trial off before its learning rate has come down."""
    from ray import tune

    from pipeline.training import train as trainer

    output_dir = Path(trials_dir) / tune.get_context().get_trial_id()
    output_dir.mkdir(parents=True, exist_ok=True)
    args = apply_trial_config(argparse.Namespace(**base), config, output_dir, threads)
    args.time_budget = max(1.0, deadline - time.time())
    restored = tune.get_checkpoint()
    if restored is not None:
        # Tune's copy is authoritative (the trial may restart on another node); the trainer resumes from it exactly.
        with restored.as_directory() as directory:
            shutil.copyfile(Path(directory) / "last.pt", output_dir / "last.pt")

    def report(row: dict[str, Any]) -> None:
        metrics = {
            "epoch": row["epoch"],
            "val_accuracy": row["val_accuracy"],
            "val_macro_f1": row["val_macro_f1"],
            "val_loss": row["val_loss"],
            "train_loss": row["train_loss"],
            "train_time_s": row["wall_time_s"],
            "planned_epochs": row["planned_epochs"],
        }
        with tempfile.TemporaryDirectory() as directory:
            shutil.copyfile(output_dir / "last.pt", Path(directory) / "last.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True, warn_only=True)
    train_set, val_set, _ = trainer.load_data(args)
    (output_dir / "args.json").write_text(json.dumps({**vars(args), "automl_config": config}, indent=2, default=str) + "\n")
    trainer.train(args, train_set, val_set, output_dir, on_epoch_end=report)


def _start_ray(cpus: int) -> bool:
    """Connect to ``RAY_ADDRESS`` or start a local Ray; True when this process started (and must stop) it."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return True
    # Local workers import this process's ferstream, not whichever install their interpreter would find.
    project_root = str(Path(__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(p for p in (project_root, os.environ.get("PYTHONPATH", "")) if p)
    # address="local": a new Ray of its own, even where `ray start` left one running (only RAY_ADDRESS joins a cluster).
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    return True


def _trial_summaries(results: Any, trials_dir: Path) -> list[dict[str, Any]]:
    summaries = []
    for result in results:
        if not result.config and result.error is None:
            continue  # never started (a search stopped by Ctrl-C): no configuration, no directory yet
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        config = dict(result.config or {})
        # A trial whose schedule the time budget shortened finished when it reached the shortened end.
        finished = metrics.get("epoch") is not None and metrics.get("epoch") == metrics.get("planned_epochs", config.get("epochs"))
        # "not_started": no epoch finished, as when the budget ran out before the trial got its CPUs (Tune
        # terminates it unrun). A trial stopped by Ctrl-C may report no metrics yet have epochs on disk.
        ran = metrics.get("epoch") is not None or (trials_dir / trial_id / "last.pt").is_file()
        status = "error" if result.error else ("finished" if finished else ("stopped" if ran else "not_started"))
        summaries.append(
            {
                "trial_id": trial_id,
                "trial_dir": str(trials_dir / trial_id),
                "status": status,
                "config": config,
                "epochs_run": metrics.get("epoch", 0),
                "wall_time_s": round(float(metrics.get("time_total_s", 0.0)), 1),
            }
        )
    return summaries


def _unfinished_trials(experiment: Path) -> int:
    """Trials the saved experiment state still has to run. Ctrl-C makes Tune save the state with them
    pending and return (its ResultGrid then shows them terminated); a search that ran its course (its
    budget, ASHA) has every trial terminated or errored."""
    from ray.tune import ExperimentAnalysis

    return sum(trial.status not in ("TERMINATED", "ERROR") for trial in ExperimentAnalysis(str(experiment)).trials)


def run_search(args: argparse.Namespace, train_args: argparse.Namespace) -> dict[str, Any]:
    """Run (or, with ``--resume``, continue) the search and write the leaderboard."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    preset = PRESETS[args.preset]
    preset = SearchPreset(
        time_budget_s=int(args.time_limit) if args.time_limit is not None else preset.time_budget_s,
        num_samples=args.num_samples or preset.num_samples,
        archs=tuple(args.archs or preset.archs),
        epochs=tuple(args.epochs or preset.epochs),
        grace_period=args.grace_period or preset.grace_period,
        description=preset.description,
        portfolio=() if args.no_portfolio else preset.portfolio,
    )
    output_dir = Path(args.output_dir).expanduser().resolve() if args.output_dir else _default_output_dir()
    trials_dir = output_dir / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    threads = max(1, math.floor(args.cpus_per_trial))
    max_epochs = max(preset.epochs)
    # The trials' own deadline leaves the last epoch's report and the leaderboard inside the budget.
    deadline = time.time() + preset.time_budget_s - min(TRIAL_FINISH_MARGIN_S, 0.05 * preset.time_budget_s)
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, base=vars(train_args), trials_dir=str(trials_dir), threads=threads, deadline=deadline),
        {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial},
    )
    started_ray = _start_ray(os.cpu_count() or 1)
    started = time.perf_counter()
    try:
        experiment = output_dir / "tune" / EXPERIMENT_NAME
        if args.resume and tune.Tuner.can_restore(str(experiment)):
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            scheduler = ASHAScheduler(
                time_attr="training_iteration", max_t=max_epochs, grace_period=min(preset.grace_period, max_epochs), reduction_factor=3
            )
            tuner = tune.Tuner(
                trainable,
                param_space=search_space(preset, train_args.opt),
                tune_config=tune.TuneConfig(
                    metric="val_accuracy",
                    mode="max",
                    scheduler=scheduler,
                    num_samples=preset.num_samples,
                    time_budget_s=preset.time_budget_s,
                    search_alg=tune.search.BasicVariantGenerator(
                        points_to_evaluate=_portfolio_points(preset, train_args.opt) or None, random_state=args.seed
                    ),
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT_NAME,
                    storage_path=str(output_dir / "tune"),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                ),
            )
        results = tuner.fit()
        summaries = _trial_summaries(results, trials_dir)
        unfinished = _unfinished_trials(experiment)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    search = {
        "preset": args.preset,
        "time_budget_s": preset.time_budget_s,
        "num_samples": preset.num_samples,
        "archs": list(preset.archs),
        "epochs": list(preset.epochs),
        "grace_period": preset.grace_period,
        "portfolio": _portfolio_points(preset, train_args.opt),
        "cpus_per_trial": args.cpus_per_trial,
        "search_wall_time_s": round(time.perf_counter() - started, 1),
        "faces_per_s_threads": threads,
        "unfinished_trials": unfinished,
    }
    return write_leaderboard(output_dir, leaderboard_rows(summaries, threads), args.top_k, search)


def _default_output_dir() -> Path:
    return Path(os.environ.get("FERSTREAM_CACHE", Path.home() / ".cache" / "ferstream")) / "automl"


def main(argv: list[str] | None = None) -> int:
    from pipeline.training import train as trainer

    args, rest = get_args_parser().parse_known_args(argv)
    train_parser = trainer.get_args_parser()
    train_parser.prog = "ferstream automl (train options)"
    train_args = train_parser.parse_args(rest)
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        print(
            f"error: --cpus-per-trial must be > 0 and --gpus-per-trial >= 0, got {args.cpus_per_trial}, {args.gpus_per_trial}",
            file=sys.stderr,
        )
        return 2
    if args.time_limit is not None and args.time_limit <= 0:
        print(f"error: --time-limit must be > 0 seconds, got {args.time_limit}", file=sys.stderr)
        return 2
    if train_args.input_size > train_args.resize_to:
        print(f"error: --input-size {train_args.input_size} exceeds --resize-to {train_args.resize_to}", file=sys.stderr)
        return 2
    report = run_search(args, train_args)
    rows = report["trials"]
    for row in rows[: args.top_k]:
        print(
            f"#{row['rank']} {row['trial']} {row['arch']} val_acc={row['val_accuracy']} val_macro_f1={row['val_macro_f1']} "
            f"epochs={row['epochs_run']} faces/s={row['faces_per_s']}",
            flush=True,
        )
    if report["best_checkpoints"]:
        print("ensemble the best: ferstream ensemble " + " ".join(report["best_checkpoints"]) + " --data <val split> --output <file>")
    unfinished = report["search"]["unfinished_trials"]
    if unfinished:
        print(
            f"ferstream automl: interrupted with {unfinished} trial(s) unfinished; the leaderboard covers what ran. Continue the "
            "search with the same command and --resume (unfinished trials go on from their last epoch's checkpoint).",
            file=sys.stderr,
        )
        return INTERRUPTED
    return 0 if report["best_checkpoints"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
