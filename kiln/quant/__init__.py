"""Quantization (issue 5, in progress): int8 primitives with torch references, and the text corpora
for calibration and the accuracy gate."""
