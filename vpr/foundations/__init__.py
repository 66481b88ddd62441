"""Layer 0, foundations: what every other part stands on and that imports nothing else of ``vpr``.

One typed config, the head registry, atomic writes, UTM and datasets_vg names, seeded RNG, where every
output lives, image I/O, progress bars, profiles, the DVC runner, tables and the project's data lock.
"""
