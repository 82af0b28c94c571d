"""The project's commands, one module each: `python -m codistill_jax.tools.X`.

  compile_check   compile a config's sharded train step for a device set or a
                  detached TPU slice: memory, FLOPs, estimated step time
  churn           churn and agreement between two trained runs (or groups)
  plot            PNG small multiples of one or several runs
  noise_scale     train with the gradient noise scale on, or report it
  store_targets   write a teacher's targets once (`teacher_source='stored'`)
  serve           add or stop teacher-service workers on a Ray cluster
  corpus          list the English corpus's installed sources

Commands sit on top of the library: they may import any of it, and nothing in
`codistill_jax/` outside this folder imports them (tests/test_layering.py).
The trainer's own entry point is `codistill_jax.main`.
"""
