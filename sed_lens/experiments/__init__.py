"""Experiments: thin compositions of the library, one CLI each (``python -m sed_lens.experiments.NAME --help``)."""
