"""Elastic, fault-tolerant teacher-inference service on Ray (EDL-Dist).

Teacher inference leaves the training job (Liu et al. 2022): a pool of Ray
actors, each serving a trained teacher checkpoint on its own device, answers
the student's input batches with soft targets; the student's data iterator is
wrapped so that each batch arrives with `batch['teacher']` (dense
`{'probs'}` or sparse `{'topk_ids', 'topk_probs'}` at temperature T), and the
train step distils from it with the same loss code as in-process
distillation (`distill.Precomputed`).

  serving.py  `start(config, ...)`: the job's `Service` (workers it starts or
              finds, and a `TargetReader` per group).
  teacher.py  `TeacherSpec` (plain data) and `Teacher` (checkpoint + jitted
              predict); no Ray. Also the in-process fallback.
  pool.py     loopback cluster, the `TeacherWorker` actor, discovery through
              Ray's named-actor registry.
  reader.py   `TargetReader`: in-flight window, order, retries, timeouts,
              join/leave, wait or fall back when no worker is alive.
The command adding (or stopping) detached workers on a running cluster is
`codistill_jax/tools/serve.py`.

Optional extra: `pip install -e .[service]`. Only `teachers.FromService`
imports it, lazily, for `config.codistill.teacher_source='service'`. This
file imports nothing: the modules import each other by name, and importing
one never runs a module that imports it back.
"""
