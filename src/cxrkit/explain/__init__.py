"""Explainability: Grad-CAM heatmaps (:mod:`~cxrkit.explain.gradcam`) and feature-space maps
(:mod:`~cxrkit.explain.embed`)."""
