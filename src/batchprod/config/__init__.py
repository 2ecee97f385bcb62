"""Submit configuration: YAML with includes, substitution, search order and validation."""

from batchprod.config.loader import BpsConfig, Context, load_config, parse_overrides

__all__ = ["BpsConfig", "Context", "load_config", "parse_overrides"]
