"""``brats-ensemble``: segment one case (``predict``) or a cohort folder (``batch``) with an ensemble of models.

Results per case: ``OUT_DIR/<id>.nii.gz`` (uint8, BraTS 2023 labels 1 NETC, 2 SNFH, 3 ET, on the input grid) and
``OUT_DIR/<id>.json`` (per-region statistics and provenance); ``batch`` adds ``OUT_DIR/statistics.csv``.
With ``--progress json`` stdout carries one JSON object per line (``event``, ``case``, ``fraction``, ``message``);
everything else (nnU-Net's own messages, errors) goes to stderr. Exit status: 0 done, 1 error, 2 usage, 130 cancelled.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from .case import check_output_folder, discover_case_files, read_case_folder
from .cluster import add_cluster_options, check_cluster_options, run_on_cluster
from .cohort import (BUSY, SKIP, CaseSpec, PlannedCase, assign_case_ids, check_before_work, claim_case,
                     discover_cases, find_case_folders, plan_cases, result_provenance, with_case_id)
from .downloads import register_models_command, run_models_command
from .errors import BraTSEnsembleError, Cancelled, InputError, ModelError
from .ensemble import LABEL_RULES
from .modelset import ModelSet, load_model_set, nnunet_model_set
from .pipeline import ProgressEvent, resolve_device, segment_case, write_result
from .postprocess import RULE_NAMES
from .recipes import (Overrides, describe_recipe, fill_recipe, load_recipe, parse_role_paths, recipe_model_set,
                      recipe_names, recipe_roles)
from .results import model_set_fingerprint, model_sets_in, output_paths, write_statistics_table


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    choice = group.add_mutually_exclusive_group(required=True)
    choice.add_argument("--model", "-m", action="append", metavar="PATH",
                        help="nnU-Net v2 results folder (Trainer__Plans__configuration); repeat for an ensemble; "
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
    add_cluster_options(batch)
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


def run_case(case: PlannedCase, replace: bool, out_dir: Path, model_set: ModelSet, device: Any,
             args: argparse.Namespace, progress: Callable[[ProgressEvent], None]) -> dict[str, Path]:
    """Read, segment and write one claimed case (its lock held); returns the written paths."""
    explicit, fallback = _channel_names(args, model_set)
    image_case = with_case_id(read_case_folder(case.spec.folder, explicit, fallback), case.case_id)
    result = segment_case(image_case, model_set, device, progress)
    result.provenance.update(result_provenance(case))
    paths = write_result(result, out_dir, overwrite=replace, save_uncertainty=args.save_uncertainty)
    progress(ProgressEvent("written", case.case_id, 1.0, f"{paths['labels']} and {paths['statistics'].name}"))
    return paths


#: Seconds between two looks at cases that another process computes.
WAIT_SECONDS = 1.0


def segment_planned(planned: Sequence[PlannedCase], model_set: ModelSet, device: Any, args: argparse.Namespace,
                    progress: Callable[[ProgressEvent], None], stop_on_error: bool = False
                    ) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """Compute every planned case not done yet, each under its lock; wait for cases another process computes.
    Returns ({case id: result paths}, failures as 'folder: message'); with ``stop_on_error`` a failure raises."""
    out_dir = args.output
    results: dict[str, dict[str, Path]] = {}
    failures: list[str] = []
    announced: set[str] = set()
    pending = list(planned)
    while pending:
        waiting = []
        for case in pending:
            try:
                claim = claim_case(out_dir, case, args.overwrite, args.save_uncertainty)
                if claim.action == SKIP:
                    progress(ProgressEvent("case-skipped", case.case_id, 1.0, claim.message))
                    results[case.case_id] = {k: p for k, p in output_paths(out_dir, case.case_id).items()
                                             if p.is_file()}
                elif claim.action == BUSY:
                    waiting.append(case)
                    if case.case_id not in announced:
                        announced.add(case.case_id)
                        progress(ProgressEvent("case-waiting", case.case_id, 0.0, f"waiting: {claim.message}"))
                else:
                    assert claim.lock is not None
                    with claim.lock:
                        results[case.case_id] = run_case(case, claim.replace, out_dir, model_set, device, args,
                                                         progress)
            except Cancelled:
                raise
            except BraTSEnsembleError as exc:
                if stop_on_error:
                    raise
                failures.append(f"{case.spec.folder.name}: {exc}")
                progress(ProgressEvent("error", case.case_id, 1.0, str(exc)))
                print(f"error: {exc}", file=sys.stderr)
        pending = waiting
        if pending:
            time.sleep(WAIT_SECONDS)
    return results, failures


def _plan(specs: Sequence[CaseSpec], model_set: ModelSet, args: argparse.Namespace
          ) -> tuple[list[PlannedCase], dict[Path, BraTSEnsembleError]]:
    """Fingerprint the cases (the models' files hashed once) and refuse the run if a case cannot be resumed."""
    planned, unreadable = plan_cases(specs, model_set_fingerprint(model_set), args.output, args.save_uncertainty)
    check_before_work(args.output, planned, args.overwrite)
    return planned, unreadable


def cmd_predict(args: argparse.Namespace, progress: ProgressPrinter) -> int:
    check_output_folder(args.output)  # before any model is loaded or any case read
    model_set = _model_set(args)
    device = resolve_device(args.device)
    explicit, fallback = _channel_names(args, model_set)
    file_id, files = discover_case_files(args.case_dir, explicit, fallback)
    planned, unreadable = _plan(assign_case_ids([(args.case_dir, file_id, files)]), model_set, args)
    if unreadable:
        raise next(iter(unreadable.values()))
    results, _ = segment_planned(planned, model_set, device, args, progress, stop_on_error=True)
    paths = results[planned[0].case_id]
    progress(ProgressEvent("finished", planned[0].case_id, 1.0, "1 case done"))
    progress.close()
    if args.progress != "json":
        for kind, path in paths.items():
            print(f"{kind + ':':13} {path}", file=progress.stdout)
    return 0


def cmd_batch(args: argparse.Namespace, progress: ProgressPrinter) -> int:
    folders = find_case_folders(args.cohort_dir, args.output)
    check_output_folder(args.output)
    check_cluster_options(args)
    model_set = _model_set(args)
    device = resolve_device(args.device) if args.cluster is None else None  # on a cluster: the workers'
    explicit, fallback = _channel_names(args, model_set)
    specs, unusable = discover_cases(folders, lambda folder: discover_case_files(folder, explicit, fallback))
    planned, unreadable = _plan(specs, model_set, args)
    failures: list[str] = []
    for folder, exc in {**unusable, **unreadable}.items():
        failures.append(f"{folder.name}: {exc}")
        progress(ProgressEvent("error", folder.name, 1.0, str(exc)))
        print(f"error: {exc}", file=sys.stderr)
    if args.cluster is None:
        _, failed = segment_planned(planned, model_set, device, args, progress)
    else:  # the workers build the model set as this process did (docs/cluster.md)
        _, failed = run_on_cluster(planned, model_set, functools.partial(_model_set, args), args, progress)
    failures += failed
    csv_path, found = write_statistics_table(args.output)
    progress(ProgressEvent("finished", "", 1.0, f"{len(folders) - len(failures)}/{len(folders)} case(s) done"))
    progress.close()
    if found.ignored:
        listed = "; ".join(f"{path.name} ({why})" for path, why in found.ignored[:5])
        print(f"note: statistics.csv leaves out {len(found.ignored)} JSON file(s) in {args.output} that are not "
              f"complete results of this tool: {listed}{'; …' if len(found.ignored) > 5 else ''}", file=sys.stderr)
    if model_sets_in(found) > 1:
        print(f"note: statistics.csv holds results made with {model_sets_in(found)} different model sets or options "
              "(each JSON's fingerprint says which)", file=sys.stderr)
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
    total = 1
    if args.command == "batch":
        with contextlib.suppress(BraTSEnsembleError, OSError):
            total = len(find_case_folders(args.cohort_dir, args.output))
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
