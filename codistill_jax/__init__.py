"""codistill_jax: codistillation (online distillation) at scale in JAX/Flax.

docs/architecture.md tours the modules: the pure core (`step`, `distill`,
`losses`, `sampling`), the one host loop (`train`), the owners around it
(`build`, `teachers`, `storage`, `exchange`, `data`, `models`) and the
commands on top (`tools/`).
"""

import time as _time

# When this process imported the package: start-up is measured from here
# (the trainer logs how long it took to its first step).
START_TIME = _time.time()
