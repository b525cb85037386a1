"""Trainers and evaluation scripts for keras-preact (run as scripts)."""
