"""tinyjax: a JAX/Flax trainer for tiny language models that mirrors the Marin speedrun."""
from tinyjax.runtime import faults as _faults

_faults.watch_parent_if_spawned()  # a worker spawned by a tinyjax process dies with it, from its first moment
