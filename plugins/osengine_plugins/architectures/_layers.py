"""Helper shared by the built-in architectures: find the ModuleList of blocks under one of several paths."""
from osengine.plugin_api import PluginError


def find_layers(model, candidates, arch_name):
    for path in candidates:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        return path, layers
    raise PluginError(f"architecture {arch_name}: none of {list(candidates)} found in {type(model).__name__}")
