"""torchvision and timm models behind the same interface (``feature_info``, ``classifier_name``).

Pretrained weights come from the standard local caches only; relkd never downloads:

- torchvision (``weights="IMAGENET1K_V1"``, ``"DEFAULT"`` or ``"ResNet50_Weights.IMAGENET1K_V2"``):
  the file torchvision itself would download, ``<torch.hub.get_dir()>/checkpoints/<file>``
  (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``).
- timm (``weights="pretrained"`` / ``"DEFAULT"`` / a tag such as ``"a1_in1k"``, or
  ``pretrained=True``): the Hugging Face cache (``$HF_HUB_CACHE``, default
  ``$HF_HOME/hub`` = ``~/.cache/huggingface/hub``) entry of the model's ``hf_hub_id``, else the
  file of its ``url`` in the torch hub checkpoints folder.

A missing file is one :class:`~relkd.RelkdError` line naming the file and the folder to put it
in. The classifier of pretrained weights is replaced by a fresh one when ``num_classes``
differs (fine-tuning; ``model.new_classifier`` is then ``True``), and the model declares the weights' normalisation as
``model.input_mean`` / ``model.input_std`` (see :mod:`relkd.models.normalization`).

Other input channel counts (``in_chans``, e.g. grey or RGB + depth data): timm adapts its first
conv itself; for torchvision relkd builds the RGB model and adapts the first ``Conv2d`` the
same way timm does: for 1 channel the kernel is summed over its 3 input channels (a grey image
then gets the response of the same image in RGB), for ``C > 3`` the RGB kernel is repeated
cyclically and scaled by ``3 / C``.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from relkd.models.base import FeatureInfo, find_classifier
from relkd.registry import RelkdError

# Stage modules per torchvision family, shallow to deep; other families derive their stages
# (relkd.models.stages) from a dummy forward.
_TV_STAGES: dict[str, list[str]] = {
    "resnet": ["layer1", "layer2", "layer3", "layer4"],
    "resnext": ["layer1", "layer2", "layer3", "layer4"],
    "wide_resnet": ["layer1", "layer2", "layer3", "layer4"],
}
#: Families whose training-mode forward returns auxiliary logits unless told otherwise.
_AUX = ("googlenet", "inception_v3")


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _probe_feature_info(model: nn.Module, names: list[str], size: int, in_chans: int) -> list:
    """Run one dummy forward (eval mode, no grad) and record each stage's channels and stride."""
    shapes: dict[str, torch.Size] = {}
    mods = dict(model.named_modules())
    hooks = [
        mods[n].register_forward_hook(lambda _m, _a, o, n=n: shapes.__setitem__(n, o.shape))
        for n in names
    ]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, in_chans, size, size))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return [FeatureInfo(n, int(shapes[n][1]), size // int(shapes[n][-1])) for n in names]


def torch_hub_checkpoints() -> Path:
    """``<torch.hub.get_dir()>/checkpoints``: where torchvision keeps downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder (``$HF_HUB_CACHE`` or ``$HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    """Make the model's first ``Conv2d`` (3 input channels) take ``in_chans`` (see the module
    docstring for the weights); a clear error when the model has no such conv."""
    if in_chans == 3:
        return
    if not isinstance(in_chans, int) or in_chans < 1:
        raise RelkdError(f"in_chans must be a positive int, got {in_chans!r}")
    parent, attr, conv = None, "", None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            conv = module
            path = name.rsplit(".", 1)
            parent = model.get_submodule(path[0]) if len(path) == 2 else model
            attr = path[-1]
            break
    if conv is None or conv.in_channels != 3 or conv.groups != 1:
        raise RelkdError(
            f"cannot adapt {type(model).__name__} to {in_chans} input channels: its first "
            "layer is not a plain 3-channel Conv2d; convert the images to RGB instead"
        )
    w = conv.weight.detach()
    if in_chans == 1:
        new_w = w.sum(dim=1, keepdim=True)
    else:
        reps = -(-in_chans // 3)
        new_w = w.repeat(1, reps, 1, 1)[:, :in_chans] * (3 / in_chans)
    new = nn.Conv2d(
        in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
    )  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(new_w)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    setattr(parent, attr, new)


def _tv_weights(name: str, weights: str):
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    members = [m.name for m in enum]
    tag = str(weights).split(".")[-1]
    if tag.lower() in ("true", "pretrained", "default"):
        tag = "DEFAULT"
    try:
        return enum[tag] if tag != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise RelkdError(
            f"torchvision model {name!r} has no weights {weights!r}{_suggest(tag, members)} "
            f"Valid choices: DEFAULT, {', '.join(members)}"
        ) from None


def _load_pretrained_tv(model: nn.Module, name: str, w, num_classes: int) -> None:
    fname = os.path.basename(w.url)
    folder = torch_hub_checkpoints()
    path = folder / fname
    if not path.is_file():
        raise RelkdError(
            f"torchvision:{name} weights {w} are not in the local cache: put {fname} "
            f"(from {w.url}) into {folder}/ (relkd does not download; TORCH_HOME moves the folder)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise RelkdError(f"cannot read torchvision weights {str(path)!r}: {e}") from e
    own = model.state_dict()
    # Auxiliary classifiers the weights carry but the model was built without (GoogLeNet).
    state = {k: v for k, v in state.items() if k in own or not k.startswith("aux")}
    head = find_classifier(model) if num_classes != len(w.meta.get("categories") or []) else None
    if head is not None:  # a fresh classifier for another number of classes (fine-tuning)
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if head is None or not k.startswith(head + ".")]
    if bad or unexpected:
        raise RelkdError(
            f"{str(path)!r} does not fit torchvision:{name}: missing {bad[:3]}, unexpected "
            f"{list(unexpected)[:3]}"
        )
    tf = w.transforms()
    model.input_mean, model.input_std = tuple(tf.mean), tuple(tf.std)
    # A fresh classifier teaches nothing: the engine refuses such a teacher (fine-tune first).
    model.new_classifier = head is not None


def torchvision_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(name, num_classes=...)``.

    Args:
        weights: a weights enum name (``"IMAGENET1K_V1"``, ``"DEFAULT"``), loaded from the torch
            hub cache (never downloaded); ``None``: random init.
        in_chans: input channels (default 3); others adapt the first conv.
        **kwargs: passed to torchvision's builder (e.g. ``image_size`` for ViT).
    """
    import torchvision

    weights = kwargs.pop("weights", None)
    if kwargs.pop("pretrained", False) and weights is None:
        weights = "DEFAULT"
    in_chans = kwargs.pop("in_chans", 3)
    valid = torchvision.models.list_models(module=torchvision.models)
    if name not in valid:
        raise RelkdError(
            f"unknown torchvision model {name!r}{_suggest(name, valid)} (all names: "
            "torchvision.models.list_models())"
        )
    w = _tv_weights(name, weights) if weights not in (None, "none", "None", False) else None
    if name.startswith(_AUX):
        kwargs.setdefault("aux_logits", False)  # training-mode forward returns plain logits
        kwargs.setdefault("init_weights", w is None)
        if w is not None:
            kwargs.setdefault("transform_input", True)  # as torchvision does for these weights
        if in_chans != 3 and kwargs.get("transform_input"):
            raise RelkdError(
                f"torchvision:{name} with transform_input re-normalises 3 RGB channels; it "
                f"cannot take {in_chans}-channel data: convert the images to RGB"
            )
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise RelkdError(f"bad arguments {kwargs} for torchvision:{name}: {e}") from e
    if w is not None:
        _load_pretrained_tv(model, name, w, num_classes)
    else:
        model.input_mean = model.input_std = None  # trained on the data set's statistics
    adapt_first_conv(model, in_chans)
    family = next((f for f in _TV_STAGES if name.startswith(f)), None)
    if family is not None:
        model.classifier_name = "fc"
        model.feature_info = _probe_feature_info(model, _TV_STAGES[family], 64, in_chans)
    elif (
        not name.startswith("swin")  # NHWC stages: derived (relkd.models.stages)
        and hasattr(model, "features")
        and isinstance(model.features, nn.Sequential)
        and all(n.isdigit() for n, _ in model.features.named_children())
    ):
        # VGG / MobileNet / EfficientNet / ConvNeXt style: stages are children of `features`
        # where the spatial size drops; keep the last block of each resolution. Other families
        # (DenseNet, ViT, Swin, GoogLeNet, ...) derive theirs at first use.
        names = [f"features.{i}" for i in range(len(model.features))]
        probed = _probe_feature_info(model, names, 64, in_chans)
        stages: list[FeatureInfo] = []
        for fi in probed:
            if stages and stages[-1].reduction == fi.reduction:
                stages[-1] = fi
            else:
                stages.append(fi)
        model.feature_info = stages
    return model


def _timm_file(model: nn.Module, name: str) -> str:
    """The local file of a timm model's pretrained weights, or one RelkdError line."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    tried = []
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        cache = hf_hub_cache()
        for fname in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(hub_id, fname, cache_dir=str(cache))
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
        folder = cache / f"models--{hub_id.replace('/', '--')}"
        tried.append(
            f"model.safetensors from https://huggingface.co/{hub_id} into {folder}/snapshots/"
            f"<revision>/ (with {folder}/refs/main holding <revision>; `hf download {hub_id}` "
            "does this)"
        )
    if url:
        path = torch_hub_checkpoints() / os.path.basename(url)
        if path.is_file():
            return str(path)
        tried.append(f"{path.name} (from {url}) into {path.parent}/")
    if not tried:
        raise RelkdError(f"timm:{name} has no pretrained weights to load")
    raise RelkdError(
        f"timm:{name} pretrained weights are not in the local cache: put "
        + " or ".join(tried)
        + " (relkd does not download)"
    )


def timm_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """A timm model (``pip install relkd[timm]``); its own ``feature_info`` is converted.

    Args:
        weights: ``"pretrained"`` / ``"DEFAULT"`` (the default tag) or a pretrained tag
            (``"a1_in1k"``; also ``name.tag``), loaded from the local caches only.
        **kwargs: passed to ``timm.create_model`` (``in_chans``, ``img_size``, ...).
    """
    try:
        import timm
    except ImportError as e:
        raise RelkdError("timm models need `pip install timm` (or relkd[timm])") from e
    weights = kwargs.pop("weights", None)
    if kwargs.pop("pretrained", False) and weights is None:
        weights = "pretrained"
    base, _, tag = name.partition(".")
    if weights not in (None, "none", "None", False) and str(weights).lower() not in (
        "true", "pretrained", "default",
    ):  # fmt: skip
        tag = str(weights)
    full = f"{base}.{tag}" if tag else base
    valid = timm.list_models()
    if base not in valid:
        raise RelkdError(
            f"unknown timm model {base!r}{_suggest(base, valid)} (all names: timm.list_models())"
        )
    try:
        model = timm.create_model(full, pretrained=False, num_classes=num_classes, **kwargs)
    except (RuntimeError, TypeError) as e:
        raise RelkdError(f"timm cannot build {full!r}: {str(e).splitlines()[0]}") from e
    if weights not in (None, "none", "None", False):
        path = _timm_file(model, full)
        try:
            model = timm.create_model(
                full, pretrained=True, pretrained_cfg_overlay={"file": path},
                num_classes=num_classes, **kwargs,
            )  # fmt: skip
        except (RuntimeError, ValueError, OSError) as e:
            raise RelkdError(f"cannot load {path!r} into timm:{full}: {str(e)[:300]}") from e
        cfg = model.pretrained_cfg
        model.input_mean, model.input_std = tuple(cfg["mean"]), tuple(cfg["std"])
        model.new_classifier = num_classes != cfg.get("num_classes", num_classes)
    else:
        model.input_mean = model.input_std = None  # trained on the data set's statistics
    info = getattr(model, "feature_info", None) or []
    stages = [
        FeatureInfo(i["module"], int(i["num_chs"]), int(i["reduction"]))
        for i in info
        if i.get("module")
    ]
    if stages:
        from relkd.models.stages import annotate_layouts

        stages = annotate_layouts(model, stages)  # timm's Swin is NHWC, its ViT tokens
    model.feature_info = stages
    return model
