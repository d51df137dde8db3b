"""cxrkit: transfer learning on chest X-rays, from recipes."""

__version__ = "0.1.0"
