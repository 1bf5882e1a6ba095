"""Every setting of an experiment as a validated dataclass, the strict loader, and the presets.

The bottom layer: it imports no other part of u2moe, and every other part may import it.
"""
