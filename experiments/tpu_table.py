r"""The pod table (docs/scale.md): real-size LMs compiled for TPU slices, G = 1,
2, 4.

For each config, topology and G, `codistill_jax.tools.compile_check` compiles one
group's train step for the slice (not attached; needs the `tpu` extra) in a
subprocess of its own (libtpu can abort a process), and the table shows
whether it fits the chip's HBM, its per-chip memory, the TPU compiler's
estimated step time and MFU, and the G-way step's time per token per chip over
the 1-group one's (`derive`) against
the floor 1 + (G - 1) * forward/step (forward/step = 1/3 by the model's count:
a teacher forward per peer on top of a 3-forward update).

The configs scan their layers, and the compiler counts a scanned loop's
body once; so the memory comes from the real (scanned) compile, and the step
time from two more compiles with the layers unrolled at 1 and 2 layers and
no windowed-einsum loops either (compile_check --nowindowed_einsum: XLA
otherwise turns large FSDP matmuls into loops the estimate counts once):
t(L) = t(1) + (L - 1) * (t(2) - t(1)), FLOPs likewise (`--no_extrapolate`
compiles the whole unrolled model instead: slow at 8B).

  pip install -e '.[tpu]'
  python experiments/tpu_table.py [--configs=lm_125m,lm_1b,lm_8b] \
      [--topologies=v5e:16x16,v5p:4x4x8,v6e:16x16] [--groups=1,2,4] \
      [--sampled=lm_1b_256k@v5p:4x4x8 --num_samples=4096] \
      [--out=experiments/results/tpu_table.json]

Configs go by their rows' labels: `lm_1b` is `configs/lm.py:size=1b`,
`lm_125m:quick` is `configs/lm.py:size=125m,quick` (`config_file`).

With `--pod_batch` the slice's batch stays the config's: each of G groups
takes 1/G of it, so a chip does the same work per step at every G and the
G-way ratio isolates what the teachers cost (by default each group takes the
config's whole batch, as a run of the config would).

A second table compares the G = 2 step's temporaries with full-softmax and
with sampled distillation (`--sampled`).

Writes the JSON rows and prints the Markdown table (also written next to the
JSON as .md).
"""

import json
import os
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

_CONFIGS = flags.DEFINE_list(
    "configs", ["lm_125m", "lm_1b", "lm_8b"],
    "Row labels: lm_SIZE[:ARG] is configs/lm.py:size=SIZE[,ARG], any other "
    "NAME[:ARG] configs/NAME.py[:ARG].")
_TOPOLOGIES = flags.DEFINE_list(
    "topologies", ["v5e:16x16", "v5p:4x4x8", "v6e:16x16"], "TPU slices.")
_GROUPS = flags.DEFINE_list("groups", ["1", "2", "4"], "Group counts.")
_EXTRAPOLATE = flags.DEFINE_bool(
    "extrapolate", True, "Step time from unrolled 1- and 2-layer compiles.")
_OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        "tpu_table.json"), "Where the rows go.")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 1800, "Per compile.")
_SAMPLED = flags.DEFINE_string(
    "sampled", "lm_1b_256k@v5p:4x4x8",
    "LABEL@TOPOLOGY where the G = 2 step is compiled with full-softmax and "
    "with sampled distillation, to compare their temporaries ('' skips).")
_POD_BATCH = flags.DEFINE_bool(
    "pod_batch", False, "Keep the slice's batch: each of G groups takes 1/G "
    "of the config's batch (a chip does the 1-group row's work per step), "
    "instead of each group the config's whole batch.")
_FROM_JSON = flags.DEFINE_string(
    "from_json", None, "Re-derive the ratios and tables of an earlier run's "
    "JSON (no compiles); written to --out.")
_REPLACE = flags.DEFINE_string(
    "replace_from", None, "With --from_json: rows of this JSON replace the "
    "rows of the same config, slice and G.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4096,
                                    "K of the sampled row.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The step-time compiles have no windowed-einsum loops: the cost model counts
# a loop's body once (lm_8b at G = 4 on v5p: 40 such loops, XLA's FLOPs 42%
# of the model's and an estimated MFU of 110%).
_TIMING = ("--nowindowed_einsum",)


def config_file(label: str, *args: str) -> str:
  """A row's label -> its config file and arg, relative to the repository.

  'lm_1b:quick' -> 'configs/lm.py:size=1b,quick': the labels (in the JSON
  rows too) are those of the time when each LM size was a file of its own;
  any other 'NAME[:ARG]' is 'configs/NAME.py[:ARG]'. `args` are appended.
  """
  name, _, arg = label.partition(":")
  if name.startswith("lm_"):
    name, arg = "lm", f"size={name[3:]}" + (f",{arg}" if arg else "")
  arg = ",".join(filter(None, (arg, *args)))
  return f"configs/{name}.py" + (f":{arg}" if arg else "")


def compile_report(config: str, topology: str, groups: int,
                   *overrides: str, extra: tuple[str, ...] = ()) -> dict:
  """compile_check's JSON report, or {'error': the error line}."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "report.json")
    result = subprocess.run(
        [sys.executable, "-m", "codistill_jax.tools.compile_check",
         f"--config={config_file(config, f'groups={groups}')}",
         f"--topology={topology}", f"--json_out={out}",
         *extra, *[f"--config.{o}" for o in overrides]],
        cwd=ROOT, capture_output=True, text=True, timeout=_TIMEOUT.value,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if result.returncode < 0:  # libtpu segfaults on some near-full steps.
      return {"error": f"the TPU compiler crashed (signal "
                       f"{-result.returncode})"}
    if result.returncode or not os.path.exists(out):
      lines = [l for l in result.stderr.splitlines() if l.strip()]
      errors = [l for l in lines if l.startswith("error:")]
      return {"error": (errors or lines or ["exit %d" % result.returncode])[-1]}
    with open(out) as f:
      return json.load(f)


def load(config: str):
  sys.path.insert(0, ROOT)
  from codistill_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load_file(os.path.join(ROOT, config_file(config)))


def batch_overrides(config: str, groups: int) -> tuple[str, ...]:
  """--pod_batch: each of G groups takes 1/G of the config's batch."""
  if not _POD_BATCH.value or groups == 1:
    return ()
  return (f"data.batch_size={load(config).data.batch_size // groups}",)


def step_time(config: str, topology: str, groups: int) -> tuple[float, float]:
  """(seconds, model FLOPs per device) of the whole unrolled step."""
  more = batch_overrides(config, groups)
  if not _EXTRAPOLATE.value:
    r = compile_report(config, topology, groups, "model.scan_layers=False",
                       *more, extra=_TIMING)
    return r.get("step_s") or 0.0, r.get("model_flops") or 0.0
  n = load(config).model.num_layers
  one, two = (compile_report(config, topology, groups,
                             "model.scan_layers=False",
                             f"model.num_layers={k}", *more, extra=_TIMING)
              for k in (1, 2))
  if "error" in one or "error" in two:
    return 0.0, 0.0
  per_layer = two["step_s"] - one["step_s"]
  flops = one["model_flops"] + (n - 1) * (two["model_flops"] -
                                          one["model_flops"])
  return one["step_s"] + (n - 1) * per_layer, flops


def main(argv):
  del argv
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_lib  # pylint: disable=g-import-not-at-top
  if _FROM_JSON.value:
    with open(_FROM_JSON.value) as f:
      table = json.load(f)
    rows, sampled = table["rows"], table.get("sampled", [])
    if _REPLACE.value:
      with open(_REPLACE.value) as f:
        newer = {_key(r): r for r in json.load(f)["rows"]}
      rows = [newer.get(_key(r), r) for r in rows]
    rows = derive(rows)
    write(bench_lib, rows, sampled)
    print(markdown(rows) + "\n\n" + markdown_sampled(sampled))
    return
  rows = []
  for config in _CONFIGS.value:
    for topology in _TOPOLOGIES.value:
      for groups in map(int, _GROUPS.value):
        row = {"config": config, "topology": topology, "groups": groups,
               "pod_batch": _POD_BATCH.value, "timing": "nowindowed_einsum",
               **compile_report(config, topology, groups,
                                *batch_overrides(config, groups))}
        if "error" not in row:
          step_s, flops = step_time(config, topology, groups)
          row["step_s_whole"] = step_s
          row["mfu_whole"] = (flops / (step_s * row["peak_flops"])
                              if step_s and row["peak_flops"] else None)
        rows.append(row)
        rows = derive(rows)
        print(_line(row), flush=True)
        # After every row: a stopped run still leaves its table so far.
        write(bench_lib, rows, [])
  sampled = []
  if _SAMPLED.value:
    config, topology = _SAMPLED.value.split("@")
    for k in (0, _NUM_SAMPLES.value):
      row = {"config": config, "topology": topology, "groups": 2,
             "num_samples": k,
             **compile_report(config, topology, 2,
                              f"codistill.sampled.num_samples={k}")}
      sampled.append(row)
      print(_line(row), flush=True)
    if all("error" not in r for r in sampled):
      sampled[1]["temp_cut"] = sampled[0]["temp_bytes"] / sampled[1][
          "temp_bytes"]
    write(bench_lib, rows, sampled)
  print(markdown(rows) + "\n\n" + markdown_sampled(sampled))


def _key(row: dict) -> tuple:
  return row["config"], row["topology"], row["groups"]


def derive(rows: list[dict]) -> list[dict]:
  """Adds each G-way row's cost over its slice's 1-group row and the floor.

  The cost is per token (or example) per chip: G groups each take 1/G of the
  slice and the config's per-group batch, so a chip does G times the
  1-group row's work per step; the step ratio is divided by that. The floor
  1 + (G - 1) * forward/step is the work of G - 1 teacher forwards on top of
  an update of 3 forwards by the model's count (forward/step = 1/3; with
  remat='full' the update recomputes a 4th forward, so the compiler's own
  floor would be lower, 1 + (G - 1) / 4).
  """
  def per_unit_chip(r):
    return r["step_s_whole"] * r["devices_per_group"] / r["per_step"]

  base = {(r["config"], r["topology"]): r for r in rows
          if r["groups"] == 1 and r.get("step_s_whole")}
  for r in rows:
    one = base.get((r["config"], r["topology"]))
    if one and r.get("step_s_whole"):
      r["over_one_group"] = per_unit_chip(r) / per_unit_chip(one)
      r["floor"] = 1 + (r["groups"] - 1) / 3
      r["over_floor"] = r["over_one_group"] / r["floor"]
  return rows


def write(bench_lib, rows, sampled):
  bench_lib.write_json(_OUT.value, {"rows": rows, "sampled": sampled})
  with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
    f.write(markdown(rows) + "\n")
    if sampled:
      f.write("\n" + markdown_sampled(sampled) + "\n")


def markdown_sampled(rows: list[dict]) -> str:
  out = ["| config | slice | G | distillation | fits HBM | temporaries "
         "GiB/chip | cut |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    how = f"sampled, K = {r['num_samples']}" if r["num_samples"] else "full"
    if "error" in r:
      out.append(f"| {r['config']} | {r['topology']} | {r['groups']} | {how} "
                 f"| {r['error'][:60]} | | |")
      continue
    cut = f"{r['temp_cut']:.1f}x" if r.get("temp_cut") else ""
    out.append(f"| {r['config']} | {r['topology']} | {r['groups']} | {how} | "
               f"{'yes' if r['fits'] else 'no'} | "
               f"{r['temp_bytes'] / 2**30:.1f} | {cut} |")
  return "\n".join(out)


def _line(row: dict) -> str:
  if "error" in row:
    return f"{row['config']} {row['topology']} G={row['groups']}: {row['error']}"
  return (f"{row['config']} {row['topology']} G={row['groups']}: "
          f"{row['total_bytes'] / 2**30:.1f} GiB/chip, fits {row['fits']}, "
          f"step {1e3 * row.get('step_s_whole', 0):.1f} ms, MFU "
          f"{100 * (row.get('mfu_whole') or 0):.1f}%")


def markdown(rows: list[dict]) -> str:
  out = ["| config | slice | G | chips/group | fits HBM | GiB/chip | "
         "est. step (ms) | est. MFU | G-way / 1-group per token per chip "
         "(floor) |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    if "error" in r:
      out.append(f"| {r['config']} | {r['topology']} | {r['groups']} | | "
                 f"{r['error'][:60]} | | | | |")
      continue
    ratio = (f"{r['over_one_group']:.2f} ({r['floor']:.2f})"
             if r.get("over_one_group") else "")
    # Rows timed before the step-time compiles turned windowed einsum off:
    # the estimate may count some matmul loops once (low).
    mark = "" if r.get("timing") == "nowindowed_einsum" else " †"
    out.append(
        f"| {r['config']} | {r['topology']} | {r['groups']} | "
        f"{r['devices_per_group']} | {'yes' if r['fits'] else 'no'} | "
        f"{r['total_bytes'] / 2**30:.1f} | "
        f"{1e3 * r.get('step_s_whole', 0):.1f}{mark} | "
        f"{100 * (r.get('mfu_whole') or 0):.0f}% | {ratio} |")
  if any("error" not in r and r.get("timing") != "nowindowed_einsum"
         for r in rows):
    out.append("\n† timed by compiles with windowed einsum on: where XLA "
               "made matmul loops the estimate counts their bodies once "
               "(too low).")
  return "\n".join(out)


if __name__ == "__main__":
  app.run(main)
