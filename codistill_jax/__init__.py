"""codistill_jax: codistillation (online distillation) at scale in JAX/Flax.

See README.md for a tour of the modules: the pure core (`step`, `distill`,
`losses`, `sampling`), the one host loop (`train`) and the owners around it
(`build`, `teachers`, `storage`, `exchange`, `data`, `models`).
"""

import time as _time

# When this process imported the package: start-up is measured from here
# (the trainer logs how long it took to its first step).
START_TIME = _time.time()
