"""vpr: visual place recognition as a reproducible data pipeline."""

__version__ = "0.1.0"
