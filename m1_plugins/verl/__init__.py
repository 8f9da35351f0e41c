"""VeRL adapters of M1: the `m1` rollout (worker adapter, Ray server, replica), its registration, the math
reward and the parquet data writer.

Importing this package has no side effects and does not import VeRL, so `m1 verl-data` and the reward
work anywhere. Registration lives in `m1_plugins.verl.register`, which VeRL imports through the
`verl.plugins` entry point on every `import verl` (see that module).
"""
