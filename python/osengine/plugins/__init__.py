"""The plugin contract (api.py: what strategies and architectures implement) and the registry that finds plugins."""
