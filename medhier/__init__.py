"""medhier: hierarchical medical-image classification on Ray."""

__version__ = "0.1.0"
