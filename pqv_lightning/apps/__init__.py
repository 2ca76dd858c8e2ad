"""The command-line apps above the engines and the Lightning face: ``pqv-export`` and ``pqv-sweep``."""
