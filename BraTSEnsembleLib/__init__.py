"""BraTSEnsemble library: brain-tumour segmentation by ensembles of nnU-Net v2 (and other) models.

Pure Python: never imports slicer, qt or vtk, so that everything here runs and is tested outside 3D Slicer.
The one entry point for callers is :func:`BraTSEnsembleLib.pipeline.segment_case`.
"""
__version__ = "0.1.0"
