"""livestack: live stacking for astrophotography."""
__version__ = "0.1.0"
