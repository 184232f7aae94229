"""tokenseg: weakly supervised semantic segmentation with class tokens."""
__version__ = "0.1.0"
