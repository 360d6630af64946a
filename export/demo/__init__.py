"""Demo checkpoints made on this machine (nothing can be downloaded): `demo-tiny` (random weights)
and `stdlib-5m` (trained on this Python's standard library)."""
