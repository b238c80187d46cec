"""osengine's built-in plugins. They register through the same entry points as third-party plugins
(pyproject.toml, groups osengine.strategies / osengine.architectures) and use only osengine.plugin_api."""
