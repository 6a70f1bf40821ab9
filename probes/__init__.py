"""LYNX early exit (arXiv 2512.05325): cue detection (cues), the exit probe (probe), split
conformal calibration (conformal), safetensors + JSON export (export) and the online early-exit
decoder (early_exit). Import from the submodules."""
