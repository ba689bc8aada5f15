"""Launchers for many hosts: TPU VM slices (python -m tinyjax.launch.tpu) and SLURM (python -m tinyjax.launch.slurm).

commands.py builds every command line (pure functions, argv lists); tpu.py and slurm.py parse flags and run them.
Neither starts jax.distributed itself: tinyjax.main does, by JAX's own detection of the TPU slice or SLURM step.
"""
