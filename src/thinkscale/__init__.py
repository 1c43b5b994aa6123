"""thinkscale: relaxed data-parallel training and reflective test-time scaling."""

__version__ = "0.1.0"
