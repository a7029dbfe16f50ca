"""Segmentation networks with the paper's E / D / g split, by name through a registry.

    attention_unet.py  Attention U-Net (Oktay et al. 2018), the paper's network
    timm_unet.py       U-Net decoder on any timm features_only encoder (timm imported lazily)
    heads.py           projection head g and the shared interface (forward, project, embed)
    registry.py        create_model / list_models / model_stride / check_geometry
"""
from __future__ import annotations

from cssl_ray.models.attention_unet import AttentionUNet
from cssl_ray.models.heads import ProjectionHead, SegmentationModel
from cssl_ray.models.registry import check_geometry, create_model, list_models, model_stride, register_model
from cssl_ray.models.timm_unet import TimmUNet

__all__ = [
    "AttentionUNet",
    "ProjectionHead",
    "SegmentationModel",
    "TimmUNet",
    "check_geometry",
    "create_model",
    "list_models",
    "model_stride",
    "register_model",
]
