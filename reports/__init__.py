"""Rendering (figures and the HTML report), installed as ``statelens.reports``; it arrives with the
reports issue and depends only on :mod:`statelens`."""
