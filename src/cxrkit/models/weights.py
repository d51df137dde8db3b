"""Build a backbone as a feature extractor and load its weights: ``none``, ``imagenet`` or a state-dict file.

``imagenet`` looks for a local file first, so offline sites work: ``<weights_prefix>.<tag>.safetensors`` (or
``.pth`` / ``.pt``) in the folders given, else in ``$CXR_WEIGHTS_DIR`` (``os.pathsep``-separated), then in
``~/.cache/cxrkit/weights``. Without one, the library downloads its own weights into its own cache (torch hub for
torchvision, the Hugging Face cache for timm); offline, that fails with a :class:`~cxrkit.errors.CxrError` that says
which file to put where. Files are read without unpickling code (safetensors, or ``torch.load(weights_only=True)``)
and must fit the library model exactly (``strict=True``), either the full ImageNet model or the feature extractor.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import pickle
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn

from cxrkit.cache import default_weights_dir
from cxrkit.errors import CxrError, first_line
from cxrkit.models.backbones import BACKBONES, BackboneSpec, list_backbones, preprocessing_of

__all__ = [
    "WEIGHTS_ENV",
    "build_backbone",
    "find_local_weights",
    "list_backbones",
    "load_state_dict_file",
    "preprocessing_of",
    "tensors_digest",
    "weights_digest",
    "weights_search_dirs",
]

WEIGHTS_ENV = "CXR_WEIGHTS_DIR"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
PathLike = str | os.PathLike
_log = logging.getLogger(__name__)
# torchvision's DenseNet files predate PyTorch 0.4 and name "norm.1" what the model calls "norm1"
_LEGACY_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_\w+))$")


def weights_search_dirs(weights_dirs: PathLike | Sequence[PathLike] | None = None) -> list[Path]:
    """The folders searched for local ImageNet weights, in order.

    Args:
        weights_dirs: folders to search; ``None`` reads ``$CXR_WEIGHTS_DIR``. ``~/.cache/cxrkit/weights`` is
            always appended.
    """
    if weights_dirs is None:
        given = [d for d in os.environ.get(WEIGHTS_ENV, "").split(os.pathsep) if d]
    elif isinstance(weights_dirs, (str, os.PathLike)):
        given = [weights_dirs]
    else:
        given = list(weights_dirs)
    folders = [Path(os.path.expanduser(d)) for d in given] + [default_weights_dir()]
    return list(dict.fromkeys(folders))


def find_local_weights(name: str, weights_dirs: PathLike | Sequence[PathLike] | None = None) -> Path | None:
    """The local ImageNet weight file for a backbone, or ``None``.

    The first folder of :func:`weights_search_dirs` holding ``<prefix>.<suffix>`` or ``<prefix>.<tag>.<suffix>``
    wins; two candidates in one folder are an error, as picking one silently could load the wrong weights.

    Args:
        name: backbone name.
        weights_dirs: see :func:`weights_search_dirs`.
    """
    prefix = BACKBONES.get(name).weights_prefix
    for folder in weights_search_dirs(weights_dirs):
        if not folder.is_dir():
            continue
        patterns = [f"{prefix}{dot_tag}{suffix}" for dot_tag in ("", ".*") for suffix in WEIGHT_SUFFIXES]
        found = sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatchcase(p.name, w) for w in patterns))
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise CxrError(f"several ImageNet weight files for {name} in {folder}: {names}; keep one or pass a path")
        if found:
            return found[0]
    return None


def load_state_dict_file(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or ``.pth`` / ``.pt`` without running pickled code.

    A checkpoint that wraps its weights in ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped.

    Args:
        path: the file.

    Raises:
        CxrError: the file is missing, unreadable, holds arbitrary Python objects, or is not a state dict.
    """
    path = Path(os.path.expanduser(path))
    if not path.is_file():
        raise CxrError(f"weights file {path} is a folder, not a file" if path.is_dir()
                       else f"weights file {path} does not exist")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CxrError(f"weights file {path} is not one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path), device="cpu")
        else:
            with open(path, "rb") as fh:
                head = fh.read(4)
            if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip file (a pickle before 1.6)
                raise CxrError(f"weights file {path} is not a PyTorch weights file (not a zip archive or a pickle)")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except CxrError:
        raise
    except pickle.UnpicklingError as error:
        detail = first_line(error)
        raise CxrError(f"refusing to load {path}: it holds Python objects, not only tensors ({detail})") from error
    except Exception as error:  # safetensors, zip and pickle errors have no common base; the cause is kept
        raise CxrError(f"cannot read weights file {path}: {type(error).__name__}: {first_line(error)}") from error
    for key in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CxrError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    return dict(loaded)


def build_backbone(
    name: str,
    weights: PathLike = "imagenet",
    weights_dirs: PathLike | Sequence[PathLike] | None = None,
) -> tuple[nn.Module, int]:
    """Build a backbone that maps ``[B, 3, H, W]`` images to ``[B, num_features]`` pooled features.

    Args:
        name: backbone name (see :func:`list_backbones`).
        weights: ``imagenet`` (local file, else the library's download), ``none`` (random init) or the path of a
            state dict for the full ImageNet model or for the feature extractor.
        weights_dirs: folders searched for local ImageNet files; see :func:`weights_search_dirs`.

    Returns:
        The feature extractor (in training mode) and its number of output features.

    Raises:
        CxrError: unknown name, unreadable or mismatched file, or ImageNet weights neither local nor downloadable.
    """
    spec = BACKBONES.get(name)
    if weights == "none":
        return _feature_extractor(spec, _library_model(spec))
    if weights == "imagenet":
        local = find_local_weights(name, weights_dirs)
        if local is None:
            return _download(spec, weights_dirs)
        _log.info("%s: ImageNet weights from %s", name, local)
        return _load_state(spec, load_state_dict_file(local), f"weights file {local}")
    from cxrkit.config import expand_path

    path = Path(expand_path(str(weights), "weights file"))
    if not path.exists():
        if "/" in str(weights) or path.suffix:  # a path, not a misspelt name
            raise CxrError(f"weights file {weights} does not exist (weights are 'imagenet', 'none' or a file)")
        raise CxrError(f"weights must be 'imagenet', 'none' or a weights file; {str(weights)!r} is none of these")
    return _load_state(spec, load_state_dict_file(path), f"weights file {path}")


def _library_model(spec: BackboneSpec, pretrained: bool = False) -> nn.Module:
    """The library's full ImageNet model (with its 1000-class classifier); ``pretrained`` is for timm only."""
    kwargs = dict(spec.build_kwargs)
    if spec.source == "torchvision":
        from torchvision.models import get_model

        return get_model(spec.arch, weights=None, **kwargs)
    import timm

    return timm.create_model(f"{spec.arch}.{spec.tag}", pretrained=pretrained, **kwargs)


def _feature_extractor(spec: BackboneSpec, model: nn.Module) -> tuple[nn.Module, int]:
    """Drop the final classifier in place so ``model`` returns pooled features; return it and the feature count."""
    if spec.classifier is None:  # timm
        model.reset_classifier(0)
        return model, int(getattr(model, "head_hidden_size", None) or model.num_features)
    old = model.get_submodule(spec.classifier)
    linear = next(m for m in old.modules() if isinstance(m, nn.Linear))
    model.set_submodule(spec.classifier, nn.Identity())
    return model, linear.in_features


def _canonical_keys(spec: BackboneSpec, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo ``nn.DataParallel``'s ``module.`` prefix and legacy DenseNet names; drop ``spec.ignore_keys``."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    state = {_LEGACY_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not any(fnmatchcase(k, p) for p in spec.ignore_keys)}


def _mismatch(module: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """What keeps ``state`` from loading strictly into ``module``, summarised; empty when it fits."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]  # BatchNorm fills these
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", shapes)):
        if keys:
            more = f", ... ({len(keys)} in all)" if len(keys) > 3 else ""
            parts.append(f"{label}: {', '.join(keys[:3])}{more}")
    return "; ".join(parts)


def _load_state(spec: BackboneSpec, state: dict[str, torch.Tensor], origin: str) -> tuple[nn.Module, int]:
    """Load a state dict into the full library model, or else into the feature extractor, strictly.

    Args:
        spec: the backbone.
        state: the weights.
        origin: where they come from, for the error message (``weights file <path>``).
    """
    state = _canonical_keys(spec, state)
    model = _library_model(spec)
    full_problems = _mismatch(model, state)
    if not full_problems:
        model.load_state_dict(state, strict=True)
        return _feature_extractor(spec, model)
    extractor, num_features = _feature_extractor(spec, model)
    extractor_problems = _mismatch(extractor, state)
    if not extractor_problems:
        extractor.load_state_dict(state, strict=True)
        return extractor, num_features
    problems = min(full_problems, extractor_problems, key=len)
    raise CxrError(f"{origin} does not fit {spec.name} ({spec.source} {spec.arch}): {problems}")


def _download(spec: BackboneSpec, weights_dirs: PathLike | Sequence[PathLike] | None) -> tuple[nn.Module, int]:
    """The library's own ImageNet weights (its cache, else a download); offline, a CxrError that says what to do.

    torchvision's state dict goes through :func:`_load_state` like a local file (torchvision's pretrained builders
    refuse some of ``spec.build_kwargs``, e.g. googlenet's ``aux_logits=False``); timm loads its own.
    """
    _log.info("%s: ImageNet weights from %s (%s cache)", spec.name, spec.weights_url, spec.source)
    try:
        if spec.source == "timm":
            with _hub_offline_if_unreachable():
                return _feature_extractor(spec, _library_model(spec, pretrained=True))
        from torchvision.models import get_model_weights

        state = get_model_weights(spec.arch)[spec.tag].get_state_dict(progress=True, check_hash=True)
    except Exception as error:
        if not _is_network_error(error):
            raise
        raise CxrError(_no_weights_message(spec, weights_dirs, error)) from error
    return _load_state(spec, state, f"the weights from {spec.weights_url}")


HUB_HOST = "huggingface.co"


@contextlib.contextmanager
def _hub_offline_if_unreachable(timeout: float = 3.0) -> Iterator[None]:
    """The Hugging Face hub in offline mode (its cache only) while its host cannot be reached: otherwise each
    download retries for about a minute, printing every attempt, before it fails. Skipped behind a proxy, which
    only the download itself can use."""
    import socket

    proxied = any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    try:
        from huggingface_hub import constants
    except ImportError:  # timm without the hub: nothing to switch
        yield
        return
    unreachable = False
    if not proxied and not constants.HF_HUB_OFFLINE:
        try:
            socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        except OSError as error:
            unreachable = True
            _log.info("%s cannot be reached (%s): the hub's cache only", HUB_HOST, error)
    if not unreachable:
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def _is_network_error(error: BaseException) -> bool:
    """Whether a download failed for lack of a network (or a cache entry), not because of a bug."""
    if isinstance(error, (OSError, http.client.HTTPException)):  # URLError, socket, requests and HF hub errors
        return True
    network_libraries = {"httpx", "httpx2", "requests", "urllib3"}
    return any(cls.__module__.split(".")[0] in network_libraries for cls in type(error).__mro__)


def _no_weights_message(
    spec: BackboneSpec, weights_dirs: PathLike | Sequence[PathLike] | None, error: BaseException
) -> str:
    file = f"{spec.weights_prefix}.<tag>.safetensors"
    if weights_dirs is None:
        where = f"${WEIGHTS_ENV} (now: {os.environ.get(WEIGHTS_ENV) or 'unset'}) or {default_weights_dir()}"
    else:
        where = " or ".join(str(d) for d in weights_search_dirs(weights_dirs))
    return (
        f"no ImageNet weights for {spec.name}: put {file} (or .pth) in {where}, or connect to the internet so "
        f"{spec.source} can download them ({spec.weights_url}) [{type(error).__name__}: {first_line(error)}]"
    )


def weights_digest(module: torch.nn.Module) -> str:
    """A hash of every parameter and buffer of ``module`` (names, values)."""
    return tensors_digest(module.state_dict().items())


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A hash of named tensors (names, values), in the order given."""
    h = hashlib.sha256()
    for name, tensor in named:
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
