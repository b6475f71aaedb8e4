"""armscope: edge deployment toolkit for augmented-reality microscopes."""

__version__ = "0.1.0"
