"""The backbone zoo: one :class:`BackboneSpec` per ImageNet CNN, over torchvision and timm.

A spec is data about a model, not the model: which library builds it, what its pretrained weights expect as input
(size, mean, std, interpolation, crop), where Grad-CAM should look (``cam_layer``), which modules count as the
freezable blocks (``blocks``), and which module to drop to get pooled features (``classifier``). The preprocessing
numbers are read from the library's own pretrained configuration (timm's ``PretrainedCfg``, torchvision's weights
enum), never typed here, so they always match the weights the library would download. Building a spec downloads
nothing; :mod:`cxrkit.models.weights` builds and loads the models.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from cxrkit.registry import Registry

Source = Literal["torchvision", "timm"]
MIN_SIDE = 32  # below this even models that run give feature maps too small to be useful (or to explain)


@dataclass(frozen=True)
class BackboneSpec:
    """What cxrkit knows about one backbone.

    Attributes:
        name: the name users type (``cxr models``, recipes).
        source: ``torchvision`` or ``timm``.
        arch: the library's own model name.
        tag: the pretrained weight set the preprocessing belongs to: a torchvision weights enum member
            (``IMAGENET1K_V1``) or a timm pretrained tag (``ra_in1k``).
        input_size: side of the square input the pretrained weights were evaluated at.
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by after subtracting ``mean``.
        interpolation: ``bilinear`` or ``bicubic``.
        crop_pct: centre-crop fraction for evaluation (resize to ``input_size / crop_pct``, crop ``input_size``).
        cam_layer: module path, inside the feature extractor, of the Grad-CAM target (the last conv block).
        blocks: fnmatch patterns over module names, one dotted depth each (``features.*`` matches ``features.3``,
            not ``features.3.conv``), naming the freezable blocks in forward order; see :func:`block_names`.
        classifier: torchvision only: path of the module replaced by ``nn.Identity()`` so the model returns its
            pooled features; ``None`` for timm, which drops its classifier with ``num_classes=0``.
        min_size: the smallest square input side the model runs on (at least 32).
        weights_prefix: local ImageNet weight files are named ``<weights_prefix>.<tag>.safetensors``.
        weights_url: where the library downloads the weights from (a URL or ``hf-hub:<repo>``), for messages.
        family: short family name for listings.
        description: one line for ``cxr models``.
        build_kwargs: ``(name, value)`` pairs always passed to the library's model constructor.
        ignore_keys: fnmatch patterns of state-dict keys that weight files may hold but the model does not use.
    """

    name: str
    source: Source
    arch: str
    tag: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    cam_layer: str
    blocks: tuple[str, ...]
    classifier: str | None
    min_size: int
    weights_prefix: str
    weights_url: str
    family: str
    description: str
    build_kwargs: tuple[tuple[str, Any], ...] = ()
    ignore_keys: tuple[str, ...] = ()

    def preprocessing(self) -> dict[str, Any]:
        """The input pipeline the pretrained weights expect: ``size, mean, std, interpolation, crop_pct``."""
        return {
            "size": self.input_size,
            "mean": self.mean,
            "std": self.std,
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
        }


BACKBONES = Registry[BackboneSpec]("backbone")


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)


def torchvision_spec(name: str, *, arch: str | None = None, tag: str = "DEFAULT", **fields: Any) -> BackboneSpec:
    """A spec for a torchvision model, with preprocessing read from its weights enum (nothing is downloaded).

    Args:
        name: registry name.
        arch: torchvision model name; defaults to ``name``.
        tag: weights enum member; ``DEFAULT`` resolves to the library's current default.
        **fields: the remaining :class:`BackboneSpec` fields.
    """
    from torchvision.models import get_model_weights

    arch = arch or name
    weights = get_model_weights(arch)[tag]
    evaluation = weights.transforms()  # ImageClassification: resize, crop, mean, std, interpolation
    crop, resize = evaluation.crop_size[0], evaluation.resize_size[0]
    fields.setdefault("weights_prefix", arch)
    return BackboneSpec(
        name=name,
        source="torchvision",
        arch=arch,
        tag=weights.name,
        input_size=int(crop),
        mean=_triple(evaluation.mean),
        std=_triple(evaluation.std),
        interpolation=evaluation.interpolation.value,
        crop_pct=round(crop / resize, 4),
        weights_url=weights.url,
        **fields,
    )


def timm_spec(name: str, *, arch: str | None = None, tag: str | None = None, **fields: Any) -> BackboneSpec:
    """A spec for a timm model, with preprocessing read from its ``PretrainedCfg`` (nothing is downloaded).

    Args:
        name: registry name.
        arch: timm model name; defaults to ``name``.
        tag: timm pretrained tag; defaults to timm's default tag for ``arch``.
        **fields: the remaining :class:`BackboneSpec` fields (``classifier`` is ``None``).
    """
    import timm

    arch = arch or name
    cfg = timm.get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    if cfg is None:
        raise ValueError(f"timm has no pretrained config for {arch}.{tag}")
    fields.setdefault("weights_prefix", arch)
    return BackboneSpec(
        name=name,
        source="timm",
        arch=arch,
        tag=cfg.tag,
        input_size=int(cfg.input_size[-1]),
        mean=_triple(cfg.mean),
        std=_triple(cfg.std),
        interpolation=cfg.interpolation,
        crop_pct=float(cfg.crop_pct),
        weights_url=f"hf-hub:{cfg.hf_hub_id}" if cfg.hf_hub_id else (cfg.url or ""),
        classifier=None,
        **fields,
    )


def _matches(name: str, pattern: str) -> bool:
    """fnmatch per dotted part, so a pattern matches names of its own depth only."""
    parts, wanted = name.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted, strict=True))


def block_names(module: nn.Module, spec: BackboneSpec) -> list[str]:
    """The freezable blocks of a built backbone, in definition (``named_modules``) order.

    A block is a module whose name matches one of ``spec.blocks`` and that holds parameters (so ReLU, pooling and
    the ``nn.Identity`` left where a classifier was are never counted).

    Args:
        module: the feature extractor built by :func:`cxrkit.models.weights.build_backbone`.
        spec: its spec.
    """
    names = []
    for name, child in module.named_modules():
        if name and any(_matches(name, p) for p in spec.blocks) and next(child.parameters(), None) is not None:
            names.append(name)
    return names


def list_backbones(pattern: str = "*") -> list[BackboneSpec]:
    """The registered backbone specs whose names match ``pattern`` (fnmatch), sorted by name."""
    return [BACKBONES.get(name) for name in BACKBONES.list(pattern)]


def preprocessing_of(name: str) -> dict[str, Any]:
    """The preprocessing (``size, mean, std, interpolation, crop_pct``) of the named backbone's ImageNet weights."""
    return BACKBONES.get(name).preprocessing()


def _register(spec: BackboneSpec) -> None:
    BACKBONES.add(spec.name, spec)


_MOBILENET_DESC = "MobileNetV2 (Sandler et al. 2018), 3.5M params"
_EFFNET_STEM_BLOCKS = ("conv_stem", "bn1", "blocks.*.*", "conv_head", "bn2")

# torchvision ------------------------------------------------------------------------------------------------------
# mobilenet_v2 uses IMAGENET1K_V1 (resize 256, crop 224): the recipe of the int8 weights that local
# `mobilenet_v2.in1k_dequantized.safetensors` files come from, so local and downloaded weights share preprocessing.
_register(
    torchvision_spec(
        "mobilenet_v2",
        tag="IMAGENET1K_V1",
        family="MobileNet",
        description=_MOBILENET_DESC + ", torchvision",
        cam_layer="features.18",
        blocks=("features.*",),
        classifier="classifier",
        min_size=MIN_SIDE,
    )
)
# mobilenet_v3 keeps its pretrained hidden layer (classifier.0, Linear + Hardswish): only the last Linear goes.
_register(
    torchvision_spec(
        "mobilenet_v3_small",
        family="MobileNet",
        description="MobileNetV3-Small (Howard et al. 2019), 2.5M params",
        cam_layer="features.12",
        blocks=("features.*", "classifier.0"),
        classifier="classifier.3",
        min_size=MIN_SIDE,
    )
)
_register(
    torchvision_spec(
        "mobilenet_v3_large",
        family="MobileNet",
        description="MobileNetV3-Large (Howard et al. 2019), 5.5M params",
        cam_layer="features.16",
        blocks=("features.*", "classifier.0"),
        classifier="classifier.3",
        min_size=MIN_SIDE,
    )
)
# VGG / AlexNet keep the pretrained fc6 and fc7 (classifier.0, classifier.3): features are fc7's 4096 outputs.
# Their ReLUs are in-place; the CAM layer is the ReLU after the last conv, whose output is not modified later.
_register(
    torchvision_spec(
        "vgg11",
        family="VGG",
        description="VGG-11 (Simonyan & Zisserman 2015), 133M params",
        cam_layer="features.19",
        blocks=("features.*", "classifier.*"),
        classifier="classifier.6",
        min_size=MIN_SIDE,
    )
)
_register(
    torchvision_spec(
        "vgg16",
        family="VGG",
        description="VGG-16 (Simonyan & Zisserman 2015), 138M params",
        cam_layer="features.29",
        blocks=("features.*", "classifier.*"),
        classifier="classifier.6",
        min_size=MIN_SIDE,
    )
)
_register(
    torchvision_spec(
        "alexnet",
        family="AlexNet",
        description="AlexNet (Krizhevsky et al. 2012), 61M params",
        cam_layer="features.11",
        blocks=("features.*", "classifier.*"),
        classifier="classifier.6",
        min_size=63,
    )
)
# GoogLeNet: the ImageNet weights were trained on inputs scaled to [-1, 1]; transform_input=True converts inputs
# normalised with the spec's ImageNet mean/std to that scale inside the model, so callers normalise as for every
# torchvision model. It is always on, so a file loaded by path behaves like the downloaded weights.
_register(
    torchvision_spec(
        "googlenet",
        family="Inception",
        description="GoogLeNet / Inception v1 (Szegedy et al. 2015), 6.6M params",
        cam_layer="inception5b",
        blocks=("conv*", "inception*"),
        classifier="fc",
        min_size=MIN_SIDE,
        build_kwargs=(("aux_logits", False), ("init_weights", False), ("transform_input", True)),
        ignore_keys=("aux1.*", "aux2.*"),
    )
)
for _depth, _params in (("18", "11.7M"), ("50", "25.6M")):
    _register(
        torchvision_spec(
            f"resnet{_depth}",
            family="ResNet",
            description=f"ResNet-{_depth} (He et al. 2016), {_params} params",
            cam_layer="layer4",
            blocks=("conv1", "bn1", "layer*.*"),
            classifier="fc",
            min_size=MIN_SIDE,
        )
    )
_register(
    torchvision_spec(
        "densenet121",
        family="DenseNet",
        description="DenseNet-121 (Huang et al. 2017; CheXNet), 8.0M params",
        cam_layer="features.norm5",
        classifier="classifier",
        min_size=MIN_SIDE,
        blocks=(
            "features.conv0",
            "features.norm0",
            "features.denseblock*.denselayer*",
            "features.transition*",
            "features.norm5",
        ),
    )
)

# timm -------------------------------------------------------------------------------------------------------------
_register(
    timm_spec(
        "mobilenetv2_100",
        family="MobileNet",
        description=_MOBILENET_DESC + ", timm",
        cam_layer="bn2",
        blocks=_EFFNET_STEM_BLOCKS,
        min_size=MIN_SIDE,
    )
)
_register(
    timm_spec(
        "inception_resnet_v2",
        family="Inception",
        description="Inception-ResNet-v2 (Szegedy et al. 2017), 55.8M params",
        cam_layer="conv2d_7b",
        min_size=75,
        blocks=("conv2d_*", "mixed_*", "repeat.*", "repeat_1.*", "repeat_2.*", "block8"),
    )
)
for _variant, _params in (("0", "4.7M"), ("1", "5.4M")):
    _register(
        timm_spec(
            f"tf_efficientnet_lite{_variant}",
            family="EfficientNet",
            description=f"EfficientNet-Lite{_variant} (Google, TF 'same' padding), {_params} params",
            cam_layer="bn2",
            blocks=_EFFNET_STEM_BLOCKS,
            min_size=MIN_SIDE,
        )
    )
_register(
    timm_spec(
        "efficientnet_b0",
        family="EfficientNet",
        description="EfficientNet-B0 (Tan & Le 2019), 5.3M params",
        cam_layer="bn2",
        blocks=_EFFNET_STEM_BLOCKS,
        min_size=MIN_SIDE,
    )
)
_register(
    timm_spec(
        "convnext_tiny",
        family="ConvNeXt",
        description="ConvNeXt-Tiny (Liu et al. 2022), 28.6M params",
        cam_layer="stages.3",
        blocks=("stem", "stages.*.downsample", "stages.*.blocks.*", "head.norm"),
        min_size=MIN_SIDE,
    )
)
