"""UHarmony: one segmentation model for many scanners and modalities (U-Harmony + FedGIN).

The library never imports Slicer; the Slicer modules call it through `python -m uharmony`.
"""

__version__ = "0.1.0"
