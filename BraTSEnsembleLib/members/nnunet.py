"""nnU-Net v2 results folders as ensemble members, run by nnunetv2's own predictor.

The numbers are nnU-Net's: preprocessing, sliding window, mirroring, fold averaging (logits) and export (resampling,
softmax, un-cropping) are ``nnUNetPredictor``'s. What differs from ``nnUNetv2_predict`` is only how the network is
made: from the plans' architecture (``get_network_from_plans``) instead of searching for the trainer class by name.
That search imports every trainer module (and with them timm/torchvision, which crash on a CPU-only torch) and
fails for the custom trainers BraTS teams use (loss or fine-tuning variants), whose networks are still the
plans' network. Networks that the plans do not describe (U-Mamba) are built by their own module.

**Region-based models** (``dataset.json`` labels with lists, e.g. ``{"background": 0, "whole tumor": [1, 2, 3],
"tumor core": [2, 3], "enhancing tumor": 3}`` and ``regions_class_order``; nnU-Net trains them with sigmoid heads,
as its BraTS Dataset137) are members in nested-region space: :meth:`NnUNetMember.predict` returns the sigmoid
probabilities of each region exactly as ``nnUNetv2_predict --save_probabilities`` exports them (un-cropped, 0
outside the crop box), with channels named WT, TC and ET. Each region is identified by its **name** (``whole
tumo(u)r``/``WT``, ``tumo(u)r core``/``TC``, ``enhancing tumo(u)r``/``ET``), so it does not matter whether the
training labels were nnU-Net's remapped 1 = ED, 2 = NCR, 3 = ET or the BraTS 2023 values. When a name is not
recognised, the regions are identified **by value** instead: they must be three strictly nested label sets, and the
largest is WT, the middle one TC and the smallest ET (true of every BraTS convention: WT {1,2,3} ⊃ TC {2,3} or
{1,3} ⊃ ET {3}; BraTS 2021 {1,2,4} ⊃ {1,4} ⊃ {4}). Regions identified by name must be nested the same way.
The model's labels then come from the fusion's nested rule (WT → SNFH, TC → NETC, ET → ET; see
:mod:`BraTSEnsembleLib.ensemble`), which is nnU-Net's own rule whenever ``regions_class_order`` lists the regions
from outermost to innermost, as BraTS region models do.
"""
from __future__ import annotations

import contextlib
import io
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..allowlist import check_nnunet_plans
from ..checkpoints import load_checkpoint
from ..errors import ModelError
from ..jsonfiles import MODEL_JSON_MAX_BYTES, read_json_file
from ..labels import BACKGROUND, class_mapping_from_dataset_labels
from ..labelsets import label_set_from_dataset_labels
from ..roles import ensure_roles_available, model_channel_roles
from ..timing import record
from ..trust import TrustedFiles
from .base import LABEL_SPACE, NESTED_REGIONS, REGION_SPACE, REGION_WRITES, Probabilities, StepReporter
from .nnunet_cascade import as_read_back, check_stages_fit, sibling_stage_folder, stage_configuration

CHECKPOINT_NAMES: dict[str, str] = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(
            f"{path.parent}: no {path.name}. An nnU-Net v2 results folder (Trainer__Plans__configuration) holds "
            "dataset.json, plans.json and fold_N/checkpoint_final.pth; point --model at that folder."
        )
    data, _ = read_json_file(path, path.name, MODEL_JSON_MAX_BYTES)
    if not isinstance(data, dict):
        raise ModelError(f"{path}: must be a JSON object, as nnU-Net writes it")
    return data


# Region names of region-based datasets → canonical BraTS region; first match wins (TC before ET: "core").
_REGION_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"whole|^wt$", "WT"),
    (r"core|^tc$", "TC"),
    (r"enhanc|^et$", "ET"),
)


def is_region_based(labels: dict) -> bool:
    """nnU-Net's own test (LabelManager): some class is a list of more than one label value."""
    return any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())


def region_channels(labels: dict, where: str) -> tuple[str, ...]:
    """Canonical region (WT/TC/ET) of each output channel of a region-based model, in the channel order.

    nnU-Net's channels are the non-background entries of ``labels`` in their order (LabelManager.foreground_regions).
    Regions are identified by name, else by nesting of their label values (see the module docstring).
    """
    values: list[tuple[str, frozenset[int]]] = []
    for name, value in labels.items():
        if name == "ignore":
            continue
        members = frozenset(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        if members == {0}:
            continue  # background
        values.append((name, members))
    by_name = []
    for name, _ in values:
        key = name.strip().lower().replace("_", " ")
        by_name.append(next((region for pattern, region in _REGION_NAME_PATTERNS if re.search(pattern, key)), None))
    fix = ('Name the regions "whole tumor", "tumor core" and "enhancing tumor" (or WT, TC, ET) in dataset.json, '
           "or give them nested label sets (WT ⊃ TC ⊃ ET).")
    if any(r is None for r in by_name) or len(set(by_name)) != len(by_name):
        chain = sorted(values, key=lambda item: -len(item[1]))
        nested = len(chain) == 3 and chain[0][1] > chain[1][1] > chain[2][1]
        if not nested:
            raise ModelError(f"{where}: cannot tell which of the regions {dict(labels)} are WT, TC and ET. {fix}")
        by_value = {name: region for (name, _), region in zip(chain, NESTED_REGIONS)}
        return tuple(by_value[name] for name, _ in values)
    sets = {region: members for region, (_, members) in zip(by_name, values)}
    ordered = [sets[r] for r in NESTED_REGIONS if r in sets]
    if any(not inner < outer for outer, inner in zip(ordered, ordered[1:])):
        raise ModelError(f"{where}: the regions {dict(labels)} are not nested as WT ⊃ TC ⊃ ET. {fix}")
    return tuple(by_name)  # type: ignore[arg-type]


def checkpoint_file_name(checkpoint: str) -> str:
    """'final'/'best' or a file name → the checkpoint file name inside each fold folder."""
    return CHECKPOINT_NAMES.get(checkpoint, checkpoint)


def available_folds(model_dir: Path, checkpoint_name: str) -> list[str]:
    """Folds (``'0'``, ``'1'`` … or ``'all'``) that have the checkpoint, numbered folds first.

    Like nnU-Net's own auto-detection, ``fold_all`` is used only when no numbered fold exists.
    """
    numbered = sorted(
        (p.name[len("fold_"):] for p in model_dir.glob("fold_*")
         if re.fullmatch(r"fold_\d+", p.name) and (p / checkpoint_name).is_file()),
        key=int,
    )
    if numbered:
        return numbered
    return ["all"] if (model_dir / "fold_all" / checkpoint_name).is_file() else []


class NnUNetMember:
    """One nnU-Net v2 results folder (one configuration, one or more folds)."""

    framework = "nnunetv2"

    def __init__(self, model_dir: str | Path, folds: Sequence[str | int] | None = None, checkpoint: str = "final",
                 use_mirroring: bool = True, tile_step_size: float = 0.5, name: str | None = None,
                 trust_checkpoint: "bool | TrustedFiles" = False, previous_stage: "NnUNetMember | None" = None) -> None:
        self.model_dir = Path(model_dir).expanduser().resolve()
        if not self.model_dir.is_dir():
            raise ModelError(f"{model_dir}: model folder not found")
        self.dataset_json = _read_json(self.model_dir / "dataset.json")
        self.plans = _read_json(self.model_dir / "plans.json")
        check_nnunet_plans(self.plans, self.model_dir / "plans.json")  # before nnU-Net imports anything it names
        self.checkpoint_name = checkpoint_file_name(checkpoint)
        self.folds = [str(f) for f in folds] if folds else available_folds(self.model_dir, self.checkpoint_name)
        if not self.folds:
            raise ModelError(
                f"{self.model_dir}: no fold_N/{self.checkpoint_name} found. Train the model, copy its fold folders "
                "here, or choose another checkpoint (--checkpoint best|final)."
            )
        for fold in self.folds:
            path = self.model_dir / f"fold_{fold}" / self.checkpoint_name
            if not path.is_file():
                raise ModelError(f"{path}: not found (fold {fold} was asked for; available: "
                                 f"{', '.join(available_folds(self.model_dir, self.checkpoint_name)) or 'none'}). "
                                 "Choose available folds with --folds (or leave it out to use every fold there), "
                                 "or copy that fold's folder into the model folder.")
        self.use_mirroring = use_mirroring
        self.tile_step_size = tile_step_size
        #: the files the user trusts (--trust-checkpoint); each fold's checkpoint is asked about on its own
        self.trust = TrustedFiles.of(trust_checkpoint)
        #: checkpoints that needed (and got) full unpickling because the user trusted them
        self.trusted_files: list[Path] = []
        self.name = name or self.model_dir.name
        self._init_stages(previous_stage)
        self._roles = model_channel_roles(self.dataset_json.get("channel_names") or self.dataset_json.get("modality", {}),
                                          str(self.model_dir / "dataset.json"))
        label_dict = self.dataset_json.get("labels", {})
        #: class space of the probabilities that predict() returns
        self.space = REGION_SPACE if is_region_based(label_dict) else LABEL_SPACE
        self._regions: tuple[str, ...] = ()
        if self.space == REGION_SPACE:
            if not self.dataset_json.get("regions_class_order"):
                raise ModelError(f"{self.model_dir / 'dataset.json'}: region-based labels need regions_class_order "
                                 "(nnU-Net cannot run the model without it)")
            # nnU-Net's output channels are the regions in the order of dataset.json (foreground_regions).
            self._regions = region_channels(label_dict, str(self.model_dir / "dataset.json"))
            self._labels = tuple(sorted({BACKGROUND, *(REGION_WRITES[r] for r in self._regions)}))
        #: the classes the model predicts (BraTS, or its own from dataset.json; see BraTSEnsembleLib.labelsets)
        self.label_set = label_set_from_dataset_labels(label_dict, str(self.model_dir / "dataset.json"))
        if self.space == LABEL_SPACE and self.label_set.is_brats:
            try:
                mapping = class_mapping_from_dataset_labels(label_dict)
            except ValueError as exc:
                raise ModelError(f"{self.model_dir / 'dataset.json'}: {exc}") from exc
            # nnU-Net's output channels are the label values in ascending order (LabelManager.all_labels).
            self._labels = tuple(mapping[v] for v in sorted(mapping))
        elif self.space == LABEL_SPACE:  # the model's own classes: channels named by their dataset.json values
            self._labels = (BACKGROUND, *(c.value for c in self.label_set.classes))
        self._predictor: Any = None

    def _init_stages(self, previous_stage: "NnUNetMember | None") -> None:
        """Which configuration this folder is and, for a cascade's second stage, its first stage (see
        :mod:`.nnunet_cascade`): known now, so that a missing first stage is refused before any member runs."""
        #: the configuration the folder holds (None when neither its name nor its checkpoint tells; then it is not
        #: a cascade stage)
        first_checkpoint = self.model_dir / f"fold_{self.folds[0]}" / self.checkpoint_name
        self.configuration, needed = stage_configuration(self.model_dir, self.plans, first_checkpoint,
                                                         self.trust.covers(first_checkpoint))
        if needed is None and previous_stage is not None:
            raise ModelError(f"{self.model_dir}: is not the second stage of a cascade (configuration "
                             f"{self.configuration}), so it takes no previous stage. Remove \"previous_stage\".")
        if needed is not None and previous_stage is None:
            raise ModelError(f"{self.model_dir}: is the second stage of an nnU-Net cascade ({self.configuration} after "
                             f"{needed}) and needs its {needed} stage; give both (--model finds "
                             f"{sibling_stage_folder(self.model_dir, needed).name} beside it).")
        if previous_stage is not None:
            check_stages_fit(self, previous_stage, needed)
        #: the first stage of a cascade, whose segmentation is this stage's extra input (None: a single stage)
        self.previous_stage: NnUNetMember | None = previous_stage
        self._previous_stage_name = needed

    @property
    def roles(self) -> tuple[str, ...]:
        return self._roles

    @property
    def labels(self) -> tuple[int, ...]:
        """Canonical labels of the channels (label-based) or the labels the regions write (region-based)."""
        return self._labels

    @property
    def target_spacing_zyx(self) -> tuple[float, ...] | None:
        """Spacing (z, y, x; mm) nnU-Net resamples the case to: the plans' spacing of the folder's configuration
        (``Trainer__Plans__configuration``; two values, in-plane, for 2-D ones); None when the plans do not say."""
        configuration = self.model_dir.name.rsplit("__", 1)[-1]
        if configuration not in self.plans.get("configurations", {}):
            return None
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        try:
            spacing = PlansManager(self.plans).get_configuration(configuration).spacing
        except (KeyError, TypeError, ValueError):
            return None
        return tuple(float(s) for s in spacing)

    @property
    def regions(self) -> tuple[str, ...]:
        """Canonical region (WT/TC/ET) of each output channel of a region-based model; () for label-based ones."""
        return self._regions

    def describe(self) -> dict[str, Any]:
        extra = {"space": REGION_SPACE, "regions": list(self._regions)} if self.space == REGION_SPACE else {}
        return {
            "framework": self.framework,
            "name": self.name,
            "path": str(self.model_dir),
            "folds": self.folds,
            "checkpoint": self.checkpoint_name,
            "mirroring": self.use_mirroring,
            "tile_step_size": self.tile_step_size,
            "channels": list(self.roles),
            **extra,
            **({"configuration": self.configuration, "previous_stage": self.previous_stage.describe()}
               if self.previous_stage is not None else {}),
        }

    # -- loading -------------------------------------------------------------------------------------------------

    def _load_folds(self) -> tuple[list[dict], dict]:
        """All folds' network weights and the first fold's checkpoint (trainer name, configuration, mirroring)."""
        weights, first = [], None
        for fold in self.folds:
            path = self.model_dir / f"fold_{fold}" / self.checkpoint_name
            checkpoint = load_checkpoint(path, trusted=self.trust.covers(path), loaded_trusted=self.trusted_files)
            missing = [k for k in ("network_weights", "init_args", "trainer_name") if k not in checkpoint]
            if missing:
                raise ModelError(f"{path}: not an nnU-Net v2 checkpoint (missing {', '.join(missing)})")
            weights.append(checkpoint["network_weights"])
            first = first or checkpoint
        assert first is not None
        return weights, first

    def _build_network(self, trainer_name: str, configuration_manager: Any, num_inputs: int,
                       num_outputs: int, configuration: str) -> torch.nn.Module:
        if "UMamba" in trainer_name:  # U-Mamba's networks are not in the plans' dynamic-network-architectures
            from .umamba import build_umamba_network

            return build_umamba_network(trainer_name, self.plans, configuration, num_inputs, num_outputs)
        from .swinunetr import is_swinunetr_trainer, nnunet_swinunetr_network

        if is_swinunetr_trainer(trainer_name):  # built in the trainer's code, not from the plans
            return nnunet_swinunetr_network(trainer_name, num_inputs, num_outputs)
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        try:
            return get_network_from_plans(
                configuration_manager.network_arch_class_name,
                configuration_manager.network_arch_init_kwargs,
                configuration_manager.network_arch_init_kwargs_req_import,
                num_inputs, num_outputs, allow_init=False, deep_supervision=False,
            )
        except (ImportError, TypeError, KeyError) as exc:
            raise ModelError(f"{self.model_dir / 'plans.json'}: cannot build the network it describes ({exc})") from exc

    def _refuse_network_larger_than_weights(self, build: tuple, state: dict, checkpoint: Path) -> None:
        """A plans.json can ask for any width: before the network is allocated, build it on the meta device (no
        memory) and refuse it when it needs more values than the checkpoint holds (they do not belong together)."""
        try:
            with torch.device("meta"):
                sized = self._build_network(*build)
        except ModelError:
            raise
        except Exception:  # noqa: BLE001 - not buildable without memory: the real build below reports problems
            return
        needed = sum(t.numel() for t in sized.state_dict().values())
        held = sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
        if needed > held:
            raise ModelError(f"{checkpoint}: its weights do not fit the network that plans.json describes (that "
                             f"network needs {needed} values, the checkpoint holds {held}; it was not built). The "
                             "checkpoint and plans.json must come from the same training; copy plans.json from the "
                             "results folder the checkpoint was trained in.")

    def _initialise(self, device: torch.device) -> Any:
        """Build nnU-Net's predictor around our network, once; later calls only move it to ``device``."""
        if self._predictor is not None:
            self._predictor.device = device
            self._predictor.perform_everything_on_device = device.type == "cuda"
            return self._predictor
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        weights, checkpoint = self._load_folds()
        configuration = checkpoint["init_args"]["configuration"]
        plans_manager = PlansManager(self.plans)
        if configuration not in self.plans.get("configurations", {}):
            raise ModelError(f"{self.model_dir / 'plans.json'}: has no configuration {configuration!r} "
                             "that the checkpoint was trained with")
        configuration_manager = plans_manager.get_configuration(configuration)
        if configuration_manager.previous_stage_name != self._previous_stage_name:
            raise ModelError(f"{self.model_dir}: its checkpoint was trained as {configuration}, which "
                             f"{'is' if configuration_manager.previous_stage_name else 'is not'} a cascade stage, "
                             f"unlike the configuration {self.configuration} the folder is named after. Copy the "
                             "fold folders of that configuration's training here.")
        label_manager = plans_manager.get_label_manager(self.dataset_json)
        num_inputs = determine_num_input_channels(plans_manager, configuration_manager, self.dataset_json)
        # a cascade's second stage takes one more channel per foreground label (the first stage's one-hot labels)
        num_images = num_inputs - (len(label_manager.foreground_labels) if self.previous_stage is not None else 0)
        if num_images != len(self.roles):
            raise ModelError(f"{self.model_dir}: plans expect {num_images} input channels, dataset.json names "
                             f"{len(self.roles)}")
        build = (checkpoint["trainer_name"], configuration_manager, num_inputs, label_manager.num_segmentation_heads,
                 configuration)
        self._refuse_network_larger_than_weights(build, weights[0],
                                                 self.model_dir / f"fold_{self.folds[0]}" / self.checkpoint_name)
        network = self._build_network(*build)
        for fold, state in zip(self.folds, weights):
            try:
                network.load_state_dict(state)
            except RuntimeError as exc:
                summary = str(exc).splitlines()[0] if str(exc) else "shapes differ"
                raise ModelError(
                    f"{self.model_dir / f'fold_{fold}' / self.checkpoint_name}: its weights do not fit the network "
                    f"that plans.json describes ({summary}). The checkpoint and plans.json must come from the same "
                    "training; copy plans.json from the results folder the checkpoint was trained in."
                ) from exc
        from .nnunet_progress import ProgressPredictor  # nnUNetPredictor, its sliding window counted tile by tile

        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints device notices on stdout
            predictor = ProgressPredictor(
                tile_step_size=self.tile_step_size, use_gaussian=True, use_mirroring=self.use_mirroring,
                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                allow_tqdm=False,
            )
        predictor.manual_initialization(
            network, plans_manager, configuration_manager, weights, self.dataset_json, checkpoint["trainer_name"],
            checkpoint.get("inference_allowed_mirroring_axes"),
        )
        self._predictor = predictor
        return predictor

    # -- inference -----------------------------------------------------------------------------------------------

    def predict(self, case: Any, device: torch.device, report: StepReporter | None = None) -> Probabilities:
        """Probabilities on the case grid, exactly as ``nnUNetv2_predict --save_probabilities`` computes them:
        softmax over labels, or for a region-based model sigmoid per region (0 outside the crop box)."""
        _, probabilities = self._run_predictor(case, device, report, True)
        array = np.ascontiguousarray(probabilities, dtype=np.float32)
        if self.space == REGION_SPACE:
            return Probabilities(array, self._regions, REGION_SPACE)
        return Probabilities(array, self.labels)

    def segmentation(self, case: Any, device: torch.device, report: StepReporter | None = None) -> np.ndarray:
        """nnU-Net's own label map (z, y, x) in the dataset's label values, as ``nnUNetv2_predict`` exports it: what
        the next stage of a cascade reads."""
        return self._run_predictor(case, device, report, False)

    def _run_predictor(self, case: Any, device: torch.device, report: StepReporter | None,
                       probabilities: bool) -> Any:
        """``nnUNetPredictor.predict_single_npy_array`` on the case's channels, after the previous stage of a cascade
        (whose segmentation nnU-Net's preprocessing crops, resamples and appends as one-hot channels)."""
        ensure_roles_available(self.roles, case.roles, f"model {self.name}", f"case {case.case_id}")
        previous = None
        if self.previous_stage is not None:  # the first stage reports the first half of the member's work
            previous = as_read_back(self.previous_stage.segmentation(
                case, device, _share_of(report, 0.0, 0.5, f"{self._previous_stage_name}: ")))
            report = _share_of(report, 0.5, 1.0, "")
        if report:
            report("loading", 0.0)
        started = time.perf_counter()
        predictor = self._initialise(device)
        record("loading", time.perf_counter() - started)  # checkpoints and network: the first case only
        data = case.stacked(self.roles)
        if report:
            report(f"predicting ({len(self.folds)} fold{'s' if len(self.folds) > 1 else ''})", 0.02)
        predictor.report = report  # tiles of the sliding window, then "back to the case grid"
        predictor.network_started = predictor.network_finished = None
        started = time.perf_counter()
        try:
            output = predictor.predict_single_npy_array(data, {"spacing": list(case.spacing_zyx)}, previous, None,
                                                        probabilities)
        finally:
            predictor.report = None
        _record_predictor_stages(predictor, started, time.perf_counter())
        return output


def _record_predictor_stages(predictor: Any, started: float, finished: float) -> None:
    """Split one ``predict_single_npy_array`` call at the network pass that :class:`ProgressPredictor` noted:
    preprocessing (crop, normalisation, resampling), network (every fold's sliding window with mirroring) and
    export (logits moved to the CPU, resampled to the case grid, softmax/sigmoid, un-cropped). On CUDA, network
    work still queued when the pass returns is waited for in export (the move to the CPU)."""
    network_started, network_finished = predictor.network_started, predictor.network_finished
    if network_started is None or network_finished is None:
        return  # nnU-Net changed how it calls the network: the member is then counted as a whole
    record("preprocessing", network_started - started)
    record("network", network_finished - network_started)
    record("export", finished - network_finished)


def _share_of(report: StepReporter | None, start: float, end: float, prefix: str) -> StepReporter | None:
    """``report`` for one part of a member's work: its fractions mapped into [start, end], its steps prefixed."""
    if report is None:
        return None

    def part(step: str, fraction: float | None = None) -> None:
        report(prefix + step, None if fraction is None else start + fraction * (end - start))
    return part


def nnunet_member(model_dir: str | Path, *, previous_stage: str | Path | None = None,
                  previous_stage_folds: Sequence[str | int] | None = None,
                  trust: "bool | TrustedFiles" = False, _later_stages: tuple[Path, ...] = (),
                  **options: Any) -> NnUNetMember:
    """An nnU-Net v2 results folder as a member; a cascade's second stage with its first stage inside it.

    ``previous_stage`` is the first stage's results folder (default: the plans' ``previous_stage`` beside
    ``model_dir``, where nnU-Net puts it); ``previous_stage_folds`` its folds (default: ``options["folds"]`` when
    given, else every fold there: each nnU-Net command takes its own ``-f``). ``trust``: the files the user trusts
    (:class:`TrustedFiles`), for both stages; the other ``options`` go to :class:`NnUNetMember` for both stages.
    A missing or unfitting first stage raises ModelError here, before anything runs.
    """
    folder = Path(model_dir).expanduser().resolve()
    trust = TrustedFiles.of(trust)
    needed = None
    if (folder / "plans.json").is_file():  # else NnUNetMember says what is missing
        checkpoint_name = checkpoint_file_name(options.get("checkpoint", "final"))
        folds = [str(f) for f in options.get("folds") or available_folds(folder, checkpoint_name)]
        first_checkpoint = folder / f"fold_{folds[0]}" / checkpoint_name if folds else None
        _, needed = stage_configuration(folder, _read_json(folder / "plans.json"), first_checkpoint,
                                        first_checkpoint is not None and trust.covers(first_checkpoint))
    if needed is None:
        if previous_stage is not None or previous_stage_folds is not None:
            raise ModelError(f"{folder}: is not the second stage of a cascade, so it takes no previous stage. Remove "
                             "\"previous_stage\"/\"previous_stage_folds\", or name the cascade's "
                             "3d_cascade_fullres folder.")
        return NnUNetMember(folder, trust_checkpoint=trust, **options)
    first = (Path(previous_stage).expanduser().resolve() if previous_stage is not None
             else sibling_stage_folder(folder, needed))
    if not first.is_dir():
        how = ("the folder named as its previous stage" if previous_stage is not None
               else f"the {needed} results folder of the same training beside it")
        raise ModelError(f"{folder}: is the second stage of an nnU-Net cascade, but its {needed} stage {first} is "
                         f"missing. Put {how} (nnUNetv2_train … {needed} writes it there), or name it with "
                         "\"previous_stage\" in a model-set manifest.")
    if first in (*_later_stages, folder):
        raise ModelError(f"{first}: the stages of this cascade form a loop ({' → '.join(p.name for p in (*_later_stages, folder, first))}); "
                         "check the previous_stage entries of its plans.json.")
    first_options = {**options, "folds": previous_stage_folds or options.get("folds"),
                     "name": f"{options.get('name') or folder.name} ({needed})"}
    stage = nnunet_member(first, trust=trust, _later_stages=(*_later_stages, folder), **first_options)
    return NnUNetMember(folder, trust_checkpoint=trust, previous_stage=stage, **options)
