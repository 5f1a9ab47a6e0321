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
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from .case import Case, check_output_folder, discover_case_files, read_case_folder
from .cluster import add_cluster_options, check_cluster_options, run_on_cluster
from .cohort import (BUSY, SKIP, CaseSpec, PlannedCase, assign_case_ids, check_before_work, claim_case,
                     discover_cases, find_case_folders, plan_cases, result_provenance, with_case_id)
from .downloads import register_models_command, run_models_command
from .errors import BraTSEnsembleError, Cancelled, InputError, ModelError
from .ensemble import LABEL_RULES
from .limits import (DEFAULT_MEMORY_BUDGET_GIB, SPACING_RANGE_MM, Limits, check_tile_step, check_weights,
                     memory_budget_bytes, use_limits)
from .modelset import ModelSet, load_model_set, nnunet_model_set
from .pipeline import CancelCheck, ProgressEvent, resolve_device, segment_case, write_result
from .postprocess import RULE_NAMES
from .recipes import (Overrides, describe_recipe, fill_recipe, load_recipe, parse_role_paths, recipe_model_set,
                      recipe_names, recipe_roles)
from .results import model_set_fingerprint, model_sets_in, output_paths, write_statistics_table


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
                       help="sliding-window step as a fraction of the patch, 0.1 to 1 (default 0.5, as nnU-Net)")
    group.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    group.add_argument("--postprocess", metavar="RULE[,RULE]",
                       help=f"postprocessing: {', '.join(RULE_NAMES)}; min-size:N and et-to-netc:N take a "
                            "voxel threshold, region-min-size:WT/TC/ET three; several may be chained with commas "
                            "(default: the recipe's, else ratio-adaptive; none for models with their own label "
                            "set, e.g. a single 'metastasis' class)")
    group.add_argument("--min-lesion-volume", type=float, metavar="MM3",
                       help="count and list only lesions (connected components) of at least MM3 mm³ in the "
                            "statistics; smaller ones stay in the label map and are reported as "
                            "lesions_below_minimum (default: every lesion)")
    group.add_argument("--channel-names", metavar="ROLE,ROLE…",
                       help="roles of nnU-Net-numbered files _0000, _0001 … (e.g. t1n,t1c,t2w,t2f) when no "
                            "dataset.json lies beside them (default: the first model's channel names)")
    group.add_argument("--trust-checkpoint", action="append", default=[], metavar="FILE|DIR",
                       help="trust FILE (a checkpoint to unpickle fully, a TorchScript file to run), or every file "
                            "under DIR, DIR itself included; repeatable. Only for sources you trust: such files can "
                            "run code. A manifest cannot grant this (docs/security.md)")
    limits = parser.add_argument_group("input limits")
    limits.add_argument("--memory-budget", type=float, default=DEFAULT_MEMORY_BUDGET_GIB, metavar="GIB",
                        help="memory a case may need, in GiB (default %(default)g): an image whose header promises "
                             "more voxels than fit is refused before any voxel is read")
    limits.add_argument("--allow-unusual-spacing", action="store_true",
                        help=f"accept voxel spacings outside {SPACING_RANGE_MM[0]:g}-{SPACING_RANGE_MM[1]:g} mm "
                             "(refused by default: usually a wrong unit in the header)")
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
    evaluate = sub.add_parser("evaluate", help="score predictions against ground truth (BraTS lesion-wise metrics)",
                              description="Layouts, protocols and how each number relates to the official BraTS "
                                          "evaluation code: docs/evaluation.md.")
    evaluate.add_argument("pred_dir", type=Path, metavar="PRED_DIR",
                          help="predictions: <id>.nii.gz files (as predict/batch write them) or <id>/<id>.nii.gz")
    evaluate.add_argument("gt_dir", type=Path, metavar="GT_DIR",
                          help="ground truth: <id>-seg.nii.gz, <id>_seg.nii.gz or <id>.nii.gz files, or BraTS case "
                               "folders <id>/<id>-seg.nii.gz or <id>/<id>_seg.nii.gz")
    evaluate.add_argument("-o", "--output", type=Path, required=True, metavar="OUT_DIR")
    evaluate.add_argument("--protocol", choices=("brats2023", "brats2024", "brats2025"), default="brats2023",
                          help="which year's official lesion-wise evaluation to reproduce (default brats2023)")
    evaluate.add_argument("--task", default="GLI",
                          help="official task, default GLI. brats2023: GLI, SSA, MEN, PED, MET; brats2024: GLI; "
                               "brats2025: GoAT, GLI, MET, PED, MenPre, MenRT (each with its own regions)")
    evaluate.add_argument("--labels", choices=("canonical", "brats2021"), default="canonical",
                          help="label convention of both folders: BraTS 2023+ (default) or 2020/21 (4 = ET)")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="replace an earlier evaluation in OUT_DIR (without it, nothing there is touched)")
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
    sub.add_parser("serve", help="an HTTP server that segments uploaded cases with model sets loaded once "
                                 "(docs/server.md; needs the [server] extra)", add_help=False)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Progress


#: Columns the bar itself keeps (percentage, bar, elapsed and remaining time); the description gets the rest.
BAR_COLUMNS = 40


def shorten_middle(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters in the middle (the case id at the start and the step at the end stay)."""
    if len(text) <= width:
        return text
    head = width // 3
    return text[:head] + "…" + text[len(text) - (width - head - 1):]


class ProgressPrinter:
    """Writes progress events as JSON lines, as a tqdm bar, or not at all; warnings go to stderr in every mode."""

    def __init__(self, mode: str, stdout: TextIO, stderr: TextIO, total_cases: int = 1) -> None:
        self.mode, self.stdout, self.stderr = mode, stdout, stderr
        self.total_cases = total_cases
        self._bar: Any = None  # made at the first event: a run refused at once shows no empty bar
        self._cases_done = 0

    def _make_bar(self, description: str) -> Any:
        from tqdm import tqdm

        # mininterval 0: every event redraws (events are few: members report at most once per percent of tiles)
        self._bar = tqdm(total=self.total_cases * 100, file=self.stderr, unit="%", dynamic_ncols=True,
                         mininterval=0, miniters=0, desc=description,
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
        return self._bar

    def _warn(self, event: ProgressEvent) -> None:
        line = f"warning: {event.case + ': ' if event.case else ''}{event.message}"
        if self._bar is not None:
            self._bar.write(line, file=self.stderr)  # above the bar, which stays intact
        else:
            print(line, file=self.stderr, flush=True)

    def __call__(self, event: ProgressEvent) -> None:
        if event.event == "warning":
            self._warn(event)
        if self.mode == "json":
            self.stdout.write(json.dumps(event.as_dict()) + "\n")
            self.stdout.flush()
        elif self.mode == "bar" and event.event not in ("finished", "warning"):
            width = max(30, shutil.get_terminal_size((100, 24)).columns - BAR_COLUMNS)
            description = shorten_middle(f"{event.case}: {event.message}", width)
            bar = self._bar or self._make_bar(description)
            bar.set_description_str(description, refresh=False)
            target = self._cases_done * 100 + event.fraction * 100
            if event.event in ("written", "case-skipped", "error"):
                self._cases_done += 1
                target = self._cases_done * 100
            step = max(0.0, target - bar.n)  # never backwards
            if step > 0:
                bar.update(step)  # redraws
            else:
                bar.refresh()

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
    "min_lesion_volume": ("--min-lesion-volume", None, "min_lesion_volume_mm3"),
}
#: Of those, the ones that a recipe leaves to the user (the rest come with the recipe's members).
_RECIPE_OVERRIDES = ("postprocess", "mirroring", "no_mirroring", "labels", "min_lesion_volume")


def _recipe_model_set(args: argparse.Namespace) -> ModelSet:
    fixed = [(option, dest) for dest, (option, default, _) in _MANIFEST_OPTIONS.items()
             if dest not in _RECIPE_OVERRIDES and getattr(args, dest, default) != default]
    if args.model_set is not None or fixed:
        given = ["--model-set"] if args.model_set is not None else [o for o, _ in fixed]
        raise ModelError(f"--recipe {args.recipe}: {', '.join(given)} cannot be combined with a recipe (it fixes "
                         "the members and their options). Only --labels, --postprocess, --mirroring and "
                         "--min-lesion-volume override "
                         "it; for anything else write a manifest with `brats-ensemble recipes show "
                         f"{args.recipe} --model ROLE=PATH …` and use --model-set.")
    mirroring = False if args.no_mirroring else None if args.mirroring is None else args.mirroring == "on"
    overrides = Overrides(labels=args.labels, postprocess=args.postprocess, mirroring=mirroring,
                          min_lesion_volume_mm3=args.min_lesion_volume)
    return recipe_model_set(args.recipe, parse_role_paths(args.model, args.recipe), overrides,
                            trusted_checkpoints=args.trust_checkpoint)


def _check_numbers(args: argparse.Namespace) -> Limits:
    """The numbers given on the command line, checked before anything is read or loaded; the run's limits."""
    if args.weight:
        check_weights(args.weight)
    check_tile_step(args.tile_step)
    return Limits(memory_budget_bytes=memory_budget_bytes(args.memory_budget),
                  allow_unusual_spacing=args.allow_unusual_spacing)


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
                            tile_step_size=args.tile_step, postprocess=args.postprocess,
                            trusted_checkpoints=args.trust_checkpoint, label_rule=args.labels,
                            min_lesion_volume_mm3=args.min_lesion_volume)


def _channel_names(args: argparse.Namespace, model_set: ModelSet) -> tuple[dict | None, dict | None]:
    """(explicit channel names, fallback from the first model) for nnU-Net-numbered case files."""
    explicit = ({str(i): r for i, r in enumerate(args.channel_names.split(","))} if args.channel_names else None)
    fallback = {str(i): r for i, r in enumerate(model_set.members[0].roles)}
    return explicit, fallback


def read_case(case_dir: Path, model_set: ModelSet, args: argparse.Namespace) -> Case:
    """Read and check one case folder as ``predict`` does before a model runs (``serve`` calls it too, to refuse a
    bad upload at once)."""
    explicit, fallback = _channel_names(args, model_set)
    return read_case_folder(case_dir, explicit, fallback, roles=model_set.roles)


def run_case(case: PlannedCase, replace: bool, out_dir: Path, model_set: ModelSet, device: Any,
             args: argparse.Namespace, progress: Callable[[ProgressEvent], None],
             cancel: CancelCheck | None = None) -> dict[str, Path]:
    """Read, segment and write one claimed case (its lock held); returns the written paths. ``cancel``: see
    :func:`segment_case`."""
    image_case = with_case_id(read_case(case.spec.folder, model_set, args), case.case_id)
    result = segment_case(image_case, model_set, device, progress, cancel)
    result.provenance.update(result_provenance(case))
    paths = write_result(result, out_dir, overwrite=replace, save_uncertainty=args.save_uncertainty)
    progress(ProgressEvent("written", case.case_id, 1.0, f"{paths['labels']} and {paths['statistics'].name}"))
    return paths


#: Seconds between two looks at cases that another process computes.
WAIT_SECONDS = 1.0


def segment_planned(planned: Sequence[PlannedCase], model_set: ModelSet, device: Any, args: argparse.Namespace,
                    progress: Callable[[ProgressEvent], None], stop_on_error: bool = False,
                    cancel: CancelCheck | None = None) -> tuple[dict[str, dict[str, Path]], list[str]]:
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
                                                         progress, cancel)
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


def predict_case(case_dir: Path, model_set: ModelSet, device: Any, args: argparse.Namespace,
                 progress: Callable[[ProgressEvent], None], cancel: CancelCheck | None = None
                 ) -> tuple[str, dict[str, Path]]:
    """What ``predict`` does with one case folder into ``args.output`` (case id, fingerprint, lock, resume rules):
    (case id, written paths). ``serve`` runs each job through it."""
    explicit, fallback = _channel_names(args, model_set)
    file_id, files = discover_case_files(case_dir, explicit, fallback, roles=model_set.roles)
    planned, unreadable = _plan(assign_case_ids([(case_dir, file_id, files)]), model_set, args)
    if unreadable:
        raise next(iter(unreadable.values()))
    results, _ = segment_planned(planned, model_set, device, args, progress, stop_on_error=True, cancel=cancel)
    return planned[0].case_id, results[planned[0].case_id]


def cmd_predict(args: argparse.Namespace, progress: ProgressPrinter) -> int:
    check_output_folder(args.output)  # before any model is loaded or any case read
    model_set = _model_set(args)
    device = resolve_device(args.device)
    case_id, paths = predict_case(args.case_dir, model_set, device, args, progress)
    progress(ProgressEvent("finished", case_id, 1.0, "1 case done"))
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
    specs, unusable = discover_cases(folders, lambda folder: discover_case_files(folder, explicit, fallback,
                                                                                        roles=model_set.roles))
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
    from .evaluation import MISSING_PREDICTION_SCORED_AS, evaluate_folders

    try:
        report = evaluate_folders(args.pred_dir, args.gt_dir, args.output, args.protocol, args.task, args.labels,
                                  overwrite=args.overwrite)
    except (ValueError, OSError) as exc:
        raise InputError(str(exc)) from exc
    progress.close()
    lines = [f"{report['protocol']} ({report['task']}), {len(report['cases'])} case(s):"]
    for region, metrics in report["summary"].items():
        parts = [f"{name} {values['mean']:.4f}" for name, values in metrics.items()
                 if name in ("lesion_dice", "lesion_hd95", "legacy_dice")]
        lines.append(f"  {region}: " + ", ".join(parts))
    if report["missing"]:
        shown = ", ".join(report["missing"][:5]) + (" …" if len(report["missing"]) > 5 else "")
        print(f"warning: {len(report['missing'])} case(s) have no prediction in {args.pred_dir} ({shown}); scored "
              f"as {MISSING_PREDICTION_SCORED_AS[report['protocol']]} (summary.json: missing_prediction_rule)",
              file=sys.stderr)
    for folder, ignored in report["ignored"].items():
        if ignored:
            lines.append(f"not label maps, ignored in the {folder}: "
                         + ", ".join(f"{count} {kind}(s)" for kind, count in ignored.items()))
    lines.append(f"written to {args.output} (summary.csv/summary.json say which numbers equal the official code)")
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
    if argv[:1] == ["serve"]:
        from .server import main as serve_main

        return serve_main(argv[1:])
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
        limits = _check_numbers(args) if args.command in ("predict", "batch") else Limits()
        # Libraries (nnU-Net) print on stdout; keep stdout for our results and JSON-lines progress.
        with contextlib.redirect_stdout(sys.stderr), use_limits(limits):
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
