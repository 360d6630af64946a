"""Triton Inference Server model repositories: the generator (repository.py, `make repo`) and the
Python-backend model sources it installs (models/)."""
