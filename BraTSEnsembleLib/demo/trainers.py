"""nnU-Net v2 trainers for the demo's U-Mamba and MedNeXt members (training only; inference never imports this).

Both subclass nnunetv2's own trainers and change only what the official trainers of those frameworks change, so
data loading, augmentation, loss, deep supervision, logging and checkpoints stay nnU-Net's:

* :class:`nnUNetTrainerUMambaBot` — as U-Mamba's trainer of that name (bowang-lab/U-Mamba): the network is
  UMambaBot built from the plans (:func:`BraTSEnsembleLib.members.umamba.build_umamba_network`, the official module
  tree) and initialised with He init (negative slope 1e-2). The class name is the official one because nnU-Net
  records it as ``trainer_name`` in the checkpoint and in the results folder name, which is how the U-Mamba member
  recognises the network. **One deviation**: the official trainer keeps ``nnUNetTrainer``'s SGD (lr 1e-2, momentum
  0.99); this one takes nnunetv2's own ``nnUNetTrainerAdam1en3`` optimiser (AdamW, amsgrad, lr 1e-3), as the demo's
  nnU-Net member does, because the demo trains for only a few hundred CPU iterations. Measured on the demo data
  with the plain nnU-Net network: with SGD (and 4 base features) only the oedema was found after 600 iterations
  (ET and NETC pseudo-Dice 0); with AdamW and 8 base features all three tumour labels were found within 100. The
  optimiser does not change the network, the checkpoint format or inference.
* :class:`nnUNetTrainerV2_MedNeXt_S_kernel3` — MedNeXt size S, kernel 3 (official parameter names, see
  :mod:`BraTSEnsembleLib.members.mednext`) with the optimiser of the official mednextv1 trainer (AdamW, lr 1e-3,
  eps 1e-4) and its five deep-supervision outputs (full to 1/16 resolution). The official MedNeXt trainers are
  nnU-Net *v1* trainers; this one runs MedNeXt inside nnU-Net v2's training loop, and
  :mod:`BraTSEnsembleLib.demo.v1_export` writes the result as the nnU-Net v1 model folder that the official trainer
  writes. ``MEDNEXT_CHANNELS`` narrows the network (the official trainers use 32) to keep the demo checkpoint small.
"""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import nnUNetTrainerAdam1en3
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from ..members.mednext import create_mednext
from ..members.umamba import build_umamba_network

#: Width of MedNeXt's first stage in the demo member (official trainers: 32); stage i has 2**i times as many.
MEDNEXT_CHANNELS = 8


class nnUNetTrainerUMambaBot(nnUNetTrainerAdam1en3):  # noqa: N801 (the official trainer name)
    """U-Mamba's ``nnUNetTrainerUMambaBot``: nnU-Net's trainer with the UMambaBot network (optimiser: AdamW 1e-3,
    see the module docstring)."""

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        from dynamic_network_architectures.initialization.weight_init import InitWeights_He

        # build_umamba_network reads one named configuration of a plans dict: hand it this one.
        plans = {"configurations": {"this": configuration_manager.configuration}}
        network = build_umamba_network("nnUNetTrainerUMambaBot", plans, "this", num_input_channels,
                                       num_output_channels, deep_supervision=enable_deep_supervision)
        network.apply(InitWeights_He(1e-2))
        return network


class nnUNetTrainerV2_MedNeXt_S_kernel3(nnUNetTrainer):  # noqa: N801 (the official trainer name)
    """MedNeXt-S, kernel 3, trained in nnU-Net v2's loop with the official MedNeXt optimiser settings."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        network = create_mednext("S", 3, num_input_channels, num_output_channels, deep_supervision=True,
                                 n_channels=MEDNEXT_CHANNELS)
        network.do_ds = enable_deep_supervision
        return network

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, PolyLRScheduler]:
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, eps=1e-4,
                                      weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def _get_deep_supervision_scales(self) -> list[list[float]] | None:
        """MedNeXt's five outputs: full resolution down to 1/16 (four stride-2 steps on every axis)."""
        if not self.enable_deep_supervision:
            return None
        return [[float(s)] * 3 for s in 1 / 2 ** np.arange(5)]

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        network = self.network.module if self.is_ddp else self.network
        network = getattr(network, "_orig_mod", network)
        network.do_ds = enabled
