"""abaw: cross-validated valence-arousal ensembles for ABAW."""
__version__ = "0.1.0"
