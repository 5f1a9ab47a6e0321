"""``brats-ensemble``: segment one case (``predict``) or a cohort folder (``batch``) with an ensemble of models.

Results per case: ``OUT_DIR/<id>.nii.gz`` (uint8, BraTS 2023 labels 1 NETC, 2 SNFH, 3 ET, on the input grid) and
``OUT_DIR/<id>.json`` (per-region statistics and provenance); ``batch`` adds ``OUT_DIR/statistics.csv``.
With ``--progress json`` stdout carries one JSON object per line (``event``, ``case``, ``fraction``, ``message``);
everything else (nnU-Net's own messages, errors) goes to stderr. Exit status: 0 done, 1 error, 2 usage, 130 cancelled.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from .case import check_output_folder, discover_case_files, read_case_folder, write_csv
from .downloads import register_models_command, run_models_command
from .errors import BraTSEnsembleError, Cancelled, InputError, ModelError
from .ensemble import LABEL_RULES
from .modelset import ModelSet, load_model_set, nnunet_model_set
from .pipeline import (ProgressEvent, check_outputs_free, output_paths, resolve_device, segment_case,
                       write_result)
from .postprocess import RULE_NAMES
from .recipes import (Overrides, describe_recipe, fill_recipe, load_recipe, parse_role_paths, recipe_model_set,
                      recipe_names, recipe_roles)
from .stats import cohort_columns, cohort_rows


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    choice = group.add_mutually_exclusive_group(required=True)
    choice.add_argument("--model", "-m", action="append", metavar="PATH",
                        help="nnU-Net v2 results folder (Trainer__Plans__configuration; a 3d_cascade_fullres folder "
                             "brings its 3d_lowres stage from beside it); repeat for an ensemble; "
                             "with --recipe: ROLE=PATH for each of the recipe's roles")
    choice.add_argument("--model-set", metavar="FILE", type=Path,
                        help="model-set manifest (JSON): members of any framework with their folds, options, "
                             "weights and class weights, and the postprocessing (instead of --model)")
    group.add_argument("--recipe", metavar="NAME",
                       help="a published pipeline (`brats-ensemble recipes list`): its members, fusion, label rule "
                            "and postprocessing, with --model ROLE=PATH for each role")
    group.add_argument("--weight", "-w", action="append", type=float, metavar="W",
                       help="weight of each --model in the fused probabilities (default: equal)")
    group.add_argument("--folds", "-f", nargs="+", metavar="FOLD",
                       help="folds to use, e.g. 0 1 2 or all (default: every fold present)")
    group.add_argument("--checkpoint", default="final", metavar="final|best|FILE",
                       help="checkpoint in each fold folder (default: final = checkpoint_final.pth)")
    group.add_argument("--no-mirroring", action="store_true", help="disable test-time mirroring (faster)")
    group.add_argument("--mirroring", choices=("on", "off"),
                       help="test-time mirroring on or off for every member (with --recipe: overrides the recipe)")
    group.add_argument("--labels", choices=LABEL_RULES,
                       help="how fused probabilities become labels: argmax (nnU-Net) or sequential-threshold (for "
                            "each channel in label order, its label where p > 0.5). Default: the recipe's, else "
                            "argmax (p > 0.5 per region when a member is region-based)")
    group.add_argument("--tile-step", type=float, default=0.5, metavar="S",
                       help="sliding-window step as a fraction of the patch (default 0.5, as nnU-Net)")
    group.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    group.add_argument("--postprocess", metavar="RULE[,RULE]",
                       help=f"postprocessing: {', '.join(RULE_NAMES)}; min-size:N and et-to-netc:N take a "
                            "voxel threshold, region-min-size:WT/TC/ET three; several may be chained with commas "
                            "(default: the recipe's, else ratio-adaptive)")
    group.add_argument("--channel-names", metavar="ROLE,ROLE…",
                       help="roles of nnU-Net-numbered files _0000, _0001 … (e.g. t1n,t1c,t2w,t2f) when no "
                            "dataset.json lies beside them (default: the first model's channel names)")
    group.add_argument("--trust-checkpoint", action="append", default=[], metavar="PATH",
                       help="allow full unpickling of checkpoints under PATH (only for sources you trust)")
    parser.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                        help="progress as a bar on stderr (default), JSON lines on stdout, or nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace results that exist in OUT_DIR")
    parser.add_argument("--save-uncertainty", action="store_true",
                        help="also write <id>_disagreement.nii.gz (fraction of models voting against the label) "
                             "and <id>_entropy.nii.gz (normalised entropy of the fused probabilities)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brats-ensemble", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    predict = sub.add_parser("predict", help="segment one case folder")
    predict.add_argument("case_dir", type=Path, metavar="CASE_DIR")
    predict.add_argument("-o", "--output", type=Path, required=True, metavar="OUT_DIR")
    _add_model_options(predict)
    batch = sub.add_parser("batch", help="segment every case folder in a cohort folder (resumable)")
    batch.add_argument("cohort_dir", type=Path, metavar="COHORT_DIR")
    batch.add_argument("-o", "--output", type=Path, required=True, metavar="OUT_DIR")
    _add_model_options(batch)
    evaluate = sub.add_parser("evaluate", help="score predictions against ground truth (BraTS lesion-wise metrics)")
    evaluate.add_argument("pred_dir", type=Path, metavar="PRED_DIR", help="folder of <id>.nii.gz predictions")
    evaluate.add_argument("gt_dir", type=Path, metavar="GT_DIR", help="folder of <id>.nii.gz or <id>-seg.nii.gz")
    evaluate.add_argument("-o", "--output", type=Path, required=True, metavar="OUT_DIR")
    evaluate.add_argument("--protocol", choices=("brats2023", "brats2024", "brats2025"), default="brats2023",
                          help="which year's official lesion-wise evaluation to reproduce (default brats2023)")
    evaluate.add_argument("--task", default="GLI", help="challenge task (GLI, SSA, MEN, PED, MET; default GLI)")
    evaluate.add_argument("--labels", choices=("canonical", "brats2021"), default="canonical",
                          help="label convention of both folders: BraTS 2023+ (default) or 2020/21 (4 = ET)")
    register_models_command(sub)
    recipes = sub.add_parser("recipes", help="the published BraTS pipelines shipped as recipes")
    recipes_sub = recipes.add_subparsers(dest="recipes_command", required=True)
    recipes_sub.add_parser("list", help="name, title and roles of every recipe")
    show = recipes_sub.add_parser("show", help="a recipe's members and rules; with --model ROLE=PATH for every "
                                              "role: the complete manifest (JSON) to edit and use with --model-set")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--model", "-m", action="append", default=[], metavar="ROLE=PATH")
    sub.add_parser("demo", help="segment the shipped phantom case with the shipped demo model set (no training)",
                   add_help=False)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Progress


class ProgressPrinter:
    """Writes progress events as JSON lines, as a tqdm bar, or not at all."""

    def __init__(self, mode: str, stdout: TextIO, stderr: TextIO, total_cases: int = 1) -> None:
        self.mode, self.stdout, self.stderr = mode, stdout, stderr
        self._bar: Any = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total_cases * 100, file=stderr, unit="%", dynamic_ncols=True,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
        self._cases_done = 0

    def __call__(self, event: ProgressEvent) -> None:
        if event.event == "warning":  # on stderr in every mode (and as a JSON line too with --progress json)
            if self._bar is not None:
                self._bar.write(f"warning: {event.message}", file=self.stderr)
            else:
                self.stderr.write(f"warning: {event.message}\n")
                self.stderr.flush()
        if self.mode == "json":
            self.stdout.write(json.dumps(event.as_dict()) + "\n")
            self.stdout.flush()
        elif self._bar is not None and event.event != "finished":
            self._bar.set_description_str(f"{event.case}: {event.message}"[:70])
            target = self._cases_done * 100 + event.fraction * 100
            if event.event in ("written", "case-skipped", "error"):
                self._cases_done += 1
                target = self._cases_done * 100
            self._bar.update(max(0.0, target - self._bar.n))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ----------------------------------------------------------------------------------------------------------------
# Commands


#: Options that a model-set manifest sets per member (or for the set): refused together with --model-set.
_MANIFEST_OPTIONS: dict[str, tuple[str, Any, str]] = {
    "weight": ("--weight", None, "weight"), "folds": ("--folds", None, "folds"),
    "checkpoint": ("--checkpoint", "final", "checkpoint"), "no_mirroring": ("--no-mirroring", False, "mirroring"),
    "tile_step": ("--tile-step", 0.5, "tile_step"), "postprocess": ("--postprocess", None, "postprocess"),
    "mirroring": ("--mirroring", None, "mirroring"), "labels": ("--labels", None, "labels"),
}
#: Of those, the ones that a recipe leaves to the user (the rest come with the recipe's members).
_RECIPE_OVERRIDES = ("postprocess", "mirroring", "no_mirroring", "labels")
DEFAULT_POSTPROCESS = "ratio-adaptive"


def _recipe_model_set(args: argparse.Namespace) -> ModelSet:
    fixed = [(option, dest) for dest, (option, default, _) in _MANIFEST_OPTIONS.items()
             if dest not in _RECIPE_OVERRIDES and getattr(args, dest, default) != default]
    if args.model_set is not None or fixed:
        given = ["--model-set"] if args.model_set is not None else [o for o, _ in fixed]
        raise ModelError(f"--recipe {args.recipe}: {', '.join(given)} cannot be combined with a recipe (it fixes "
                         "the members and their options). Only --labels, --postprocess and --mirroring override "
                         "it; for anything else write a manifest with `brats-ensemble recipes show "
                         f"{args.recipe} --model ROLE=PATH …` and use --model-set.")
    mirroring = False if args.no_mirroring else None if args.mirroring is None else args.mirroring == "on"
    overrides = Overrides(labels=args.labels, postprocess=args.postprocess, mirroring=mirroring)
    return recipe_model_set(args.recipe, parse_role_paths(args.model, args.recipe), overrides,
                            trusted_checkpoints=args.trust_checkpoint)


def _model_set(args: argparse.Namespace) -> ModelSet:
    if getattr(args, "recipe", None) is not None:
        return _recipe_model_set(args)
    if getattr(args, "model_set", None) is not None:
        given = [(option, key) for dest, (option, default, key) in _MANIFEST_OPTIONS.items()
                 if getattr(args, dest, default) != default]
        if given:
            raise ModelError(f"{args.model_set}: {', '.join(o for o, _ in given)} cannot be combined with "
                             f"--model-set; set {', '.join(repr(k) for _, k in given)} in the manifest instead.")
        return load_model_set(args.model_set, trusted_checkpoints=args.trust_checkpoint)
    manifests = [m for m in args.model if Path(m).suffix.lower() == ".json" and Path(m).is_file()]
    if manifests:
        raise ModelError(f"{manifests[0]}: is a file, not a model folder; pass a model-set manifest with "
                         "--model-set FILE instead of --model.")
    return nnunet_model_set(args.model, weights=args.weight, folds=args.folds, checkpoint=args.checkpoint,
                            use_mirroring=not args.no_mirroring and args.mirroring != "off",
                            tile_step_size=args.tile_step, postprocess=args.postprocess or DEFAULT_POSTPROCESS,
                            trusted_checkpoints=args.trust_checkpoint, label_rule=args.labels)


def _channel_names(args: argparse.Namespace, model_set: ModelSet) -> tuple[dict | None, dict | None]:
    """(explicit channel names, fallback from the first model) for nnU-Net-numbered case files."""
    explicit = ({str(i): r for i, r in enumerate(args.channel_names.split(","))} if args.channel_names else None)
    fallback = {str(i): r for i, r in enumerate(model_set.members[0].roles)}
    return explicit, fallback


def run_case(case_dir: Path, out_dir: Path, model_set: ModelSet, device: Any, args: argparse.Namespace,
             progress: Callable[[ProgressEvent], None]) -> dict[str, Path]:
    """Read, segment and write one case; returns the written paths."""
    explicit, fallback = _channel_names(args, model_set)
    case_id, _ = discover_case_files(case_dir, explicit, fallback, roles=model_set.roles)
    check_outputs_free(out_dir, case_id, args.overwrite)
    case = read_case_folder(case_dir, explicit, fallback, roles=model_set.roles)
    result = segment_case(case, model_set, device, progress)
    paths = write_result(result, out_dir, overwrite=args.overwrite, save_uncertainty=args.save_uncertainty)
    progress(ProgressEvent("written", case.case_id, 1.0, f"{paths['labels']} and {paths['statistics'].name}"))
    return paths


def cmd_predict(args: argparse.Namespace, progress: ProgressPrinter) -> int:
    check_output_folder(args.output)  # before any model is loaded or any case read
    model_set = _model_set(args)
    device = resolve_device(args.device)
    paths = run_case(args.case_dir, args.output, model_set, device, args, progress)
    progress(ProgressEvent("finished", paths["statistics"].stem, 1.0, "1 case done"))
    progress.close()
    if args.progress != "json":
        for kind, path in paths.items():
            print(f"{kind + ':':13} {path}", file=progress.stdout)
    return 0


def find_case_folders(cohort_dir: Path) -> list[Path]:
    """Sub-folders of a cohort folder, sorted; a cohort without any is an InputError."""
    if not cohort_dir.is_dir():
        raise InputError(f"{cohort_dir}: not a folder. Give a folder that holds one sub-folder per case.")
    folders = sorted(p for p in cohort_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"{cohort_dir}: holds no case folders (one sub-folder per case, e.g. BraTS-GLI-00001-000/)")
    return folders


def write_cohort_csv(out_dir: Path) -> Path | None:
    """``statistics.csv`` with one row per finished case (every ``<id>.json`` in ``out_dir``)."""
    statistics = {}
    for path in sorted(out_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "regions" in data and "case_id" in data:
            statistics[data["case_id"]] = data["regions"]
    if not statistics:
        return None
    rows = cohort_rows(statistics)
    return write_csv(rows, out_dir / "statistics.csv", cohort_columns(rows))


def cmd_batch(args: argparse.Namespace, progress: ProgressPrinter) -> int:
    folders = find_case_folders(args.cohort_dir)
    check_output_folder(args.output)
    model_set = _model_set(args)
    device = resolve_device(args.device)
    failures: list[str] = []
    explicit, fallback = _channel_names(args, model_set)
    for folder in folders:
        try:
            case_id, _ = discover_case_files(folder, explicit, fallback, roles=model_set.roles)
            if output_paths(args.output, case_id)["statistics"].exists() and not args.overwrite:
                progress(ProgressEvent("case-skipped", case_id, 1.0, "done already"))
                continue
            run_case(folder, args.output, model_set, device, args, progress)
        except Cancelled:
            raise
        except BraTSEnsembleError as exc:
            failures.append(f"{folder.name}: {exc}")
            progress(ProgressEvent("error", folder.name, 1.0, str(exc)))
            print(f"error: {exc}", file=sys.stderr)
    csv_path = write_cohort_csv(args.output)
    progress(ProgressEvent("finished", "", 1.0, f"{len(folders) - len(failures)}/{len(folders)} case(s) done"))
    progress.close()
    if args.progress != "json":
        print(f"{len(folders) - len(failures)}/{len(folders)} case(s) done in {args.output}"
              + (f"; cohort statistics: {csv_path}" if csv_path else ""), file=progress.stdout)
    if failures:
        print(f"error: {len(failures)} case(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(args: argparse.Namespace, progress: ProgressPrinter) -> int:
    from .metrics import evaluate_folders

    try:
        summary = evaluate_folders(args.pred_dir, args.gt_dir, args.output, args.protocol, args.task, args.labels)
    except (ValueError, OSError) as exc:
        raise InputError(str(exc)) from exc
    progress.close()
    regions = summary["summary"]
    lines = [f"{summary['protocol']} ({summary['task']}), {len(summary['cases'])} case(s):"]
    for region, metrics in regions.items():
        parts = [f"{name} {values['mean']:.4f}" for name, values in metrics.items()
                 if name in ("lesion_dice", "lesion_hd95", "legacy_dice")]
        lines.append(f"  {region}: " + ", ".join(parts))
    lines.append(f"written to {args.output}")
    print("\n".join(lines), file=progress.stdout)
    return 0


def run_recipes_command(args: argparse.Namespace) -> int:
    """`recipes list` and `recipes show NAME [--model ROLE=PATH …]` (output on stdout, errors exit 1)."""
    try:
        if args.recipes_command == "list":
            for name in recipe_names():
                recipe = load_recipe(name)
                print(f"{name:16} {recipe.get('title', '')}\n{'':16} roles: {', '.join(recipe_roles(recipe))}")
            return 0
        recipe = load_recipe(args.name)
        if not args.model:
            print(describe_recipe(recipe))
            return 0
        manifest = fill_recipe(recipe, parse_role_paths(args.model, args.name))
        print(json.dumps({"description": recipe.get("description", ""), **manifest}, indent=2))
        return 0
    except BraTSEnsembleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _stop_on_terminate(signum: int, frame: Any) -> None:
    """SIGTERM (a cancel from the Slicer module or a scheduler) ends the run like Ctrl-C: nothing half-written stays."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from .demo.run import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "models":  # lists go to stdout, download bars to stderr
        return run_models_command(args)
    if args.command == "recipes":
        return run_recipes_command(args)
    stdout = sys.stdout
    total = len(find_case_folders(args.cohort_dir)) if args.command == "batch" and args.cohort_dir.is_dir() else 1
    progress = ProgressPrinter(getattr(args, "progress", "none"), stdout, sys.stderr, total)
    signal.signal(signal.SIGTERM, _stop_on_terminate)
    command = {"predict": cmd_predict, "batch": cmd_batch, "evaluate": cmd_evaluate}[args.command]
    try:
        # Libraries (nnU-Net) print on stdout; keep stdout for our results and JSON-lines progress.
        with contextlib.redirect_stdout(sys.stderr):
            return command(args, progress)
    except KeyboardInterrupt:
        progress.close()
        print("error: cancelled; no result of the unfinished case was written", file=sys.stderr)
        return 130
    except BraTSEnsembleError as exc:
        progress.close()
        if getattr(args, "progress", "none") == "json":  # evaluate has no --progress
            progress(ProgressEvent("error", "", 1.0, str(exc)))
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
