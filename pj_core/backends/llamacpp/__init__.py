"""The llama.cpp backend: GGUF models as they are (quantised), through llama-cpp-python's
low-level API (:mod:`~pj_core.backends.llamacpp.backend`).

It needs the optional package ``llama-cpp-python``; without it,
:class:`~pj_core.backends.llamacpp.backend.LlamaCppBackend` raises
:class:`pj_core.errors.BackendNotInstalledError` with the command that installs it.
"""
