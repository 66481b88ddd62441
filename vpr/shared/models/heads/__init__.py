"""Descriptor heads, one module each: the conv4 map ``B×256×H×W`` → an L2-normalised global descriptor.

Each head is declared in ``vpr.foundations.registry`` (which names its module here) and built by
``vpr.shared.models.build_head`` through its ``from_config`` class method.
"""
