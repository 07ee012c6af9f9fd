"""Server side: what training and export both need to know about a base model (torch, transformers).

- :mod:`edgepeft.models.base`: load a base (hub id, local folder, the embedded SmolLM2, a GGUF) and fingerprint its weights.
- :mod:`edgepeft.models.arch`: the architecture table that maps each supported family onto the exporter's graphs.
- :mod:`edgepeft.models.bottleneck`: the bottleneck adapter's on-disk format.

Heavy libraries load inside the functions that need them.
"""
