"""Test stand-in for the `flash_attn` import (see ../README.md)."""
__version__ = "0.0.0-standin"
