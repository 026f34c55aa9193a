"""prefloop: iterative length-regularised DPO and the preference-optimisation family."""

__version__ = "0.1.0"
