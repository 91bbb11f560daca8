"""sclip_lab: training-free open-vocabulary semantic segmentation with CLIP (SCLIP and kin)."""

__version__ = "0.1.0"
