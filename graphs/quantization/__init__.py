"""Quantization: recipes and scales (recipes.py), and PyTorch calibration that measures the
activation ranges the recipes need (calibrate.py). The graph passes that apply a recipe are
graphs/passes/quantize*.py."""
