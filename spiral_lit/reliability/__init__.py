"""Runs that survive mistakes and interruptions: checkpoints, signals, faults, preflight checks, output-path
safety, progress lines.
"""
