"""rnmt: neural machine translation with recurrent networks."""

__version__ = "0.1.0"
