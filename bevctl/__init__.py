"""bevctl: fine-grained BEV road-marking maps from six cameras with few BEV labels."""

__version__ = "0.1.0"
