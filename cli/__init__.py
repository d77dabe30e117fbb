"""The command-line face of statelens (installed as ``statelens.cli``)."""
