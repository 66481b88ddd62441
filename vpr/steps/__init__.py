"""Layer 2, the pipeline's steps: one module per step, each with a public entry point (imports only
``vpr.foundations``, ``vpr.shared`` and other steps' public functions).

Which stage runs which function, with which arguments, is declared once in ``vpr.pipeline``.
"""
