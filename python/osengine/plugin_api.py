"""The stable import path for plugin authors: the plugin contract (osengine.plugins.api), the registry
(osengine.plugins.registry) and the folding helpers that plugins written against earlier versions import from here.
See docs/plugins.md."""
from .calibrate.folding import apply_migration
from .calibrate.rotation import check_rotatable, rotate_model
from .plugins.api import (
                          Architecture,
                          AttentionOutput,
                          GatedMLP,
                          GatedOutput,
                          Inspector,
                          LinearOutput,
                          Migration,
                          MigrationSite,
                          NormReaders,
                          PluginError,
                          Reduction,
                          RotationLayout,
                          SiteData,
                          Strategy,
                          grid,
)
from .plugins.registry import (
                          ARCHITECTURE_GROUP,
                          PLUGIN_GUIDE,
                          STRATEGY_GROUP,
                          PluginInfo,
                          Registry,
                          architectures,
                          make_strategy,
                          register_architecture,
                          register_strategy,
                          resolve_architecture,
                          strategies,
)
from .quant.layers import ResidualRestore, install_residual_restore

__all__ = [
    "ARCHITECTURE_GROUP", "Architecture", "AttentionOutput", "GatedMLP", "GatedOutput", "Inspector", "LinearOutput",
    "Migration", "MigrationSite", "NormReaders", "PLUGIN_GUIDE", "PluginError", "PluginInfo", "Reduction", "Registry",
    "ResidualRestore", "RotationLayout", "STRATEGY_GROUP", "SiteData", "Strategy", "apply_migration", "architectures",
    "check_rotatable", "grid", "install_residual_restore", "make_strategy", "register_architecture",
    "register_strategy", "resolve_architecture", "rotate_model", "strategies",
]
