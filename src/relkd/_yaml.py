"""Every YAML relkd reads (config and suite files, probe configs, run folders' config.yaml):
OmegaConf's loader with YAML 1.2's booleans. A leaf module: it imports nothing of relkd."""

from __future__ import annotations

import re
from typing import Any

import yaml
from omegaconf import OmegaConf

_STRICT_LOADER: Any = None
#: YAML 1.2's booleans: ``true`` / ``false`` (also ``True``, ``TRUE``, ...), as overrides take.
_BOOL_RE = r"^(?:true|True|TRUE|false|False|FALSE)$"


def strict_yaml_loader() -> Any:
    """OmegaConf's YAML loader (duplicate keys refused, alias bombs bounded, ``1e3`` a float)
    with YAML 1.2's booleans: only true / false are booleans; YAML 1.1's ``yes`` / ``no`` /
    ``on`` / ``off`` / ``y`` / ``n`` stay strings, as in a ``key=value`` override, so a folder
    ``name: no`` is ``no`` and a boolean key given ``on`` fails naming the value."""
    global _STRICT_LOADER
    if _STRICT_LOADER is None:
        try:
            from omegaconf.omegaconf import get_yaml_loader
        except ImportError:  # pragma: no cover  (omegaconf 2.3 keeps it in _utils)
            from omegaconf._utils import get_yaml_loader  # type: ignore[no-redef]
        base = get_yaml_loader()
        bool_tag = "tag:yaml.org,2002:bool"

        class StrictLoader(base):  # type: ignore[misc,valid-type]
            pass

        StrictLoader.yaml_implicit_resolvers = {
            first: [(tag, rx) for tag, rx in resolvers if tag != bool_tag]
            for first, resolvers in base.yaml_implicit_resolvers.items()
        }
        StrictLoader.add_implicit_resolver(bool_tag, re.compile(_BOOL_RE), list("tTfF"))
        _STRICT_LOADER = StrictLoader
    return _STRICT_LOADER


def load_yaml(stream: Any) -> Any:
    """``OmegaConf.load`` of an open file through :func:`strict_yaml_loader` (a
    ``DictConfig`` / ``ListConfig``; an empty document is an empty ``DictConfig``)."""
    obj = yaml.load(stream, Loader=strict_yaml_loader())  # OmegaConf's safe loader, stricter
    if obj is None:
        return OmegaConf.create()
    if not isinstance(obj, (list, dict, str)):
        return obj  # a bare scalar document: the caller says it is not a mapping
    return OmegaConf.create(obj)


def strict_load(text: str) -> Any:
    """Plain Python (dicts, lists, scalars) of YAML text read by :func:`strict_yaml_loader`:
    ``yaml.safe_load`` with YAML 1.2's booleans. For YAML relkd reads that is not a run config
    (the probe's options, ``--model-arg`` values, the config.yaml of a run folder), so that
    ``yes`` / ``on`` mean what they mean in a config file."""
    return yaml.load(text, Loader=strict_yaml_loader())


def strict_dotlist(items: Any) -> Any:
    """``OmegaConf.from_dotlist`` of ``key=value`` strings with each value read by
    :func:`strict_yaml_loader` (a ``DictConfig``): ``flag=yes`` is the string ``yes``, as in a
    config file, where ``from_dotlist`` (YAML 1.1) would read a boolean. Keys split at the
    first ``=`` and go through ``OmegaConf.update`` as ``from_dotlist`` does; an item without
    ``=`` sets its key to null."""
    conf = OmegaConf.create()
    for item in items:
        key, sep, raw = str(item).partition("=")
        OmegaConf.update(conf, key, strict_load(raw) if sep else None)
    return conf
