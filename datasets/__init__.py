"""Reading videos and annotations, sampling clips and augmenting them (uint8 out).

This package is deliberately named ``datasets`` and shadows Hugging Face's package of the same name: the
project never depends on the latter, and ``tests/test_packaging.py`` checks which one is imported.
"""
