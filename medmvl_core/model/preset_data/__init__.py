"""Preset JSON data files (public config.json / preprocessor_config.json values); see ``presets``."""
