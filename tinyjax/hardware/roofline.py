"""The roofline of a compiled program: what each kernel moves through HBM and computes, against a chip's peaks.

Read from the optimized module a target's own compiler produced (`compiled.as_text()`: libtpu, the CUDA plugin, or
this machine's CPU compiler), per SPMD device. XLA's `cost_analysis()` does not serve: it leaves while-loop bodies
out (the fused loss's whole scan) and returns nothing for the CUDA plugin. Counting rules:

  kernel      every instruction that launches work: a fusion, a custom call (cuBLAS, Pallas/Mosaic, Triton), a
              collective, a copy, a dot or convolution left unfused, any other unfused op. Parameters, constants,
              tuples, get-tuple-element, bitcasts and async *-done halves are free.
  async ops   counted at their start (copy-start, slice-start: the HBM side of what they move); *-done is free.
  loops       a while loop's body and condition count times the trip count (the compiler's known_trip_count, else
              the condition's `i < N` constant); a call counts its callee once; a conditional its costliest branch.
  HBM bytes   each distinct operand read once plus the result written, in arrays' logical sizes; a fusion parameter
              that is only sliced (dynamic-slice, slice, gather) reads the slices; an in-place update
              (dynamic-update-slice or scatter at a fusion's root, or unfused) writes the update only and does not
              read the buffer it updates; arrays in an on-chip memory space (a layout's S(n), n > 0: TPU VMEM)
              are not HBM traffic.
  FLOPs       matrix-unit FLOPs: 2 x output elements x contracted elements of every dot and convolution (fusions
              and Triton GEMMs included), a cuBLAS custom call from its dot dimensions, an opaque Pallas attention
              kernel estimated from its shapes (`attention_flops`), the Pallas loss's kernels from their operands,
              named tiles and re-reads (`pallas_loss_cost`); elementwise work is not counted (it runs on vector
              units and is bounded by its bytes).
  collective  its HBM bytes, and its payload over the chip's interconnect: 2(n-1)/n of it for an all-reduce,
              (n-1)/n for an all-gather, reduce-scatter or all-to-all, all of it for a collective-permute.

A kernel's time at the roofline is max(FLOPs / peak, HBM bytes / bandwidth, link bytes / link bandwidth); the bound
of a program is their sum over kernels (no overlap between kernels: a floor a real schedule cannot beat unless
kernels overlap).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
        "replica-id", "opt-barrier", "add-dependency", "domain", "copy-done", "all-reduce-done", "all-gather-done",
        "collective-permute-done", "async-done", "async-update", "send-done", "recv-done", "get-dimension-size"}
COLLECTIVES = {"all-reduce": 2.0, "all-reduce-start": 2.0, "all-gather": 1.0, "all-gather-start": 1.0,
               "reduce-scatter": 1.0, "all-to-all": 1.0, "collective-permute": 0.0, "collective-permute-start": 0.0,
               "ragged-all-to-all": 1.0}
SLICING = {"dynamic-slice", "slice", "gather"}
IN_PLACE = {"dynamic-update-slice": 1, "scatter": 2}  # opcode -> index of the operand holding what is written
PARTS = ("loss", "attention", "projections_mlp", "optimizer", "guard_norms", "collectives", "other")
# Name scopes (model.py, step.py) and Flax module names in an op's metadata -> part of the model; the innermost
# match wins (a q_norm inside self_attn is a norm, q_proj a projection).
_SCOPES = (("lm_head_loss", "loss"), ("optimizer", "optimizer"), ("guard", "guard_norms"),
           ("self_attn", "attention"), ("mlp", "projections_mlp"), ("q_proj", "projections_mlp"),
           ("k_proj", "projections_mlp"), ("v_proj", "projections_mlp"), ("o_proj", "projections_mlp"),
           ("input_layernorm", "guard_norms"), ("post_attention_layernorm", "guard_norms"), ("norm", "guard_norms"),
           ("q_norm", "guard_norms"), ("k_norm", "guard_norms"))
_SCOPE_PART = dict(_SCOPES)


@dataclasses.dataclass(frozen=True)
class Array:
  dtype: str
  dims: tuple[int, ...]
  memory_space: int = 0  # 0 = device memory (HBM); TPU S(1) = VMEM

  @property
  def bytes(self) -> float:
    return DTYPE_BYTES.get(self.dtype, 1 if self.dtype.startswith("f8") or self.dtype.startswith("f4") else 4) * \
        math.prod(self.dims)

  @property
  def hbm_bytes(self) -> float:
    return self.bytes if self.memory_space == 0 else 0.0


def arrays(shape_text: str) -> list[Array]:
  """The arrays of a shape (a tuple's leaves in order): 'f32[2,3]{1,0}', '(s32[], bf16[4]{0:T(128)S(1)})'."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(shape_text):
    space = re.search(r"S\((\d+)\)", layout or "")
    out.append(Array(dtype, tuple(int(d) for d in dims.split(",") if d), int(space.group(1)) if space else 0))
  return out


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str
  root: bool
  operands_text: str = ""

  @property
  def results(self) -> list[Array]:
    return arrays(self.shape)

  def attr(self, key: str) -> str | None:
    m = re.search(rf"\b{key}=%([\w.\-]+)", self.attrs)
    return m.group(1) if m else None

  @property
  def op_name(self) -> str:
    m = re.search(r'op_name="([^"]*)"', self.attrs)
    return m.group(1) if m else ""


@dataclasses.dataclass
class Computation:
  name: str
  entry: bool
  instructions: list[Instruction]

  def __post_init__(self):
    self.by_name = {i.name: i for i in self.instructions}
    self.params = {int(i.operands_text): i for i in self.instructions
                   if i.opcode == "parameter" and i.operands_text.strip().isdigit()}

  @property
  def root(self) -> Instruction:
    return next((i for i in self.instructions if i.root), self.instructions[-1])

  def users(self, name: str) -> list[Instruction]:
    return [i for i in self.instructions if name in i.operands]


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  depth, pairs = 0, {"(": ")", "{": "}", "[": "]"}
  closers = set(pairs.values())
  quote = False
  for i in range(start, len(text)):
    c = text[i]
    if c == '"' and text[i - 1] != "\\":
      quote = not quote
    elif quote:
      continue
    elif c in pairs:
      depth += 1
    elif c in closers:
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


def _instruction(text: str) -> Instruction | None:
  m = _INSTRUCTION.match(text)
  if m is None:
    return None
  pos = m.end()
  if text[pos] == "(":
    end = _balanced(text, pos)
  else:
    end = text.index(" ", pos)
  shape = text[pos:end]
  op = re.match(r"\s*([a-z][\w\-]*)\(", text[end:])
  if op is None:
    return None
  open_at = end + op.end() - 1
  close = _balanced(text, open_at)
  operands_text = text[open_at + 1:close - 1]
  return Instruction(m.group(2), shape, op.group(1), re.findall(r"%([\w.\-]+)", operands_text), text[close:],
                     bool(m.group(1)), operands_text)


def parse(hlo_text: str) -> dict[str, Computation]:
  """{name: Computation} of an HLO module's text; the entry computation also under the key "ENTRY"."""
  comps: dict[str, Computation] = {}
  name, entry, lines = None, False, []

  def close():
    if name is not None:
      instructions = [i for i in (_instruction(t) for t in lines) if i is not None]
      comps[name] = Computation(name, entry, instructions)
      if entry:
        comps["ENTRY"] = comps[name]

  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      close()
      name, entry, lines = header.group(2), bool(header.group(1)), []
    elif line.rstrip() == "}":
      close()
      name = None
    elif name is not None:
      if _INSTRUCTION.match(line) or not lines:
        lines.append(line)
      else:  # an instruction printed over several lines (a custom call's kernel metadata)
        lines[-1] += "\n" + line
  return comps


# ---- one kernel's figures ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Kernel:
  name: str
  kind: str  # "fusion:kLoop", "custom-call:__cublas$gemm", "all-reduce", "copy", ...
  part: str
  op_name: str
  trips: int  # times it runs per step (loop trip counts multiplied)
  flops: float  # per run
  hbm_bytes: float  # per run
  link_bytes: float = 0.0  # per run: interconnect bytes a collective moves per chip
  estimated_flops: bool = False  # an opaque kernel's FLOPs, estimated from its shapes

  def seconds(self, peak_flops: float, bandwidth: float, link_bandwidth: float) -> float:
    link = self.link_bytes / link_bandwidth if link_bandwidth else 0.0
    return self.trips * max(self.flops / peak_flops, self.hbm_bytes / bandwidth, link)


def part_of(op_name: str, opcode: str = "") -> str:
  """The part of the model an op belongs to, from its metadata's name scopes (PARTS)."""
  if opcode in COLLECTIVES:
    return "collectives"
  for component in reversed(re.split(r"[/()]", op_name)):
    if component in _SCOPE_PART:
      return _SCOPE_PART[component]
  return "other"


def dot_flops(ins: Instruction, comp: Computation) -> float:
  """2 x output elements x contracted elements of a dot, or of a convolution (XLA TPU's matmuls)."""
  out = ins.results[0].dims if ins.results else ()
  lhs = comp.by_name.get(ins.operands[0]) if ins.operands else None
  rhs = comp.by_name.get(ins.operands[1]) if len(ins.operands) > 1 else None
  if ins.opcode == "dot":
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    dims = lhs.results[0].dims if lhs is not None and lhs.results else ()
    contracted = math.prod(dims[int(d)] for d in m.group(1).split(",") if d) if m and dims else 1
    return 2.0 * math.prod(out) * contracted
  labels = re.search(r"dim_labels=(\w+)_(\w+)->", ins.attrs)
  if lhs is None or rhs is None or not lhs.results or not rhs.results or labels is None:
    return 0.0
  lhs_labels, rhs_labels = labels.groups()
  lhs_dims, kernel = lhs.results[0].dims, rhs.results[0].dims
  window = re.search(r"window=\{size=([\dx]+)", ins.attrs)
  sizes = [int(s) for s in window.group(1).split("x")] if window else []
  # Per spatial dimension the taps that meet the input (a window over a padded size-1 dimension, XLA TPU's way of
  # batching a matmul, meets it once).
  spatial = [lhs_dims[i] for i, c in enumerate(lhs_labels) if c.isdigit()]
  taps = math.prod(min(w, n) for w, n in zip(sizes, spatial)) if sizes else 1
  features = kernel[rhs_labels.index("i")] if "i" in rhs_labels else 1
  return 2.0 * math.prod(out) * features * taps


def _computation_flops(comp: Computation, comps: dict[str, Computation], seen=()) -> float:
  total = 0.0
  for ins in comp.instructions:
    if ins.opcode in ("dot", "convolution"):
      total += dot_flops(ins, comp)
    for key in ("calls", "to_apply"):
      callee = ins.attr(key)
      if callee in comps and callee not in seen:
        total += _computation_flops(comps[callee], comps, (*seen, callee))
  return total


def _through_bitcasts(comp: Computation, name: str) -> list[tuple[Instruction, str]]:
  """(user, the name it uses) of a value, looking through bitcasts and reshapes (no data moves)."""
  out = []
  for user in comp.users(name):
    if user.opcode in ("bitcast", "reshape"):
      out.extend(_through_bitcasts(comp, user.name))
    else:
      out.append((user, name))
  return out


def _param_read(comp: Computation, param: Instruction) -> float:
  """HBM bytes a fusion reads of one parameter: the slices where it is only sliced, nothing where it is only the
  buffer an in-place update writes into, else all of it."""
  users = _through_bitcasts(comp, param.name)
  full = sum(a.hbm_bytes for a in param.results)
  if not users or full == 0:
    return full
  if all(u.opcode in SLICING and u.operands[0] == n for u, n in users):
    return min(full, sum(sum(a.bytes for a in u.results) for u, _ in users))
  if all(u.opcode in IN_PLACE and u.operands[0] == n for u, n in users):
    return 0.0
  return full


def _written(comp: Computation, ins: Instruction) -> float:
  """HBM bytes a computation's value `ins` writes: the update of an in-place update, else the value."""
  if ins.opcode in ("bitcast", "reshape") and ins.operands and ins.operands[0] in comp.by_name:
    inner = _written(comp, comp.by_name[ins.operands[0]])
    return min(inner, sum(a.hbm_bytes for a in ins.results))
  if ins.opcode in IN_PLACE and ins.results and ins.results[0].memory_space == 0:
    update = comp.by_name.get(ins.operands[IN_PLACE[ins.opcode]])
    if update is not None and update.results:
      return sum(a.bytes for a in update.results)
  if ins.opcode == "tuple":
    leaves = ins.results
    total = 0.0
    for k, operand in enumerate(ins.operands):
      inner = comp.by_name.get(operand)
      space_ok = k < len(leaves) and leaves[k].memory_space == 0
      total += _written(comp, inner) if inner is not None and space_ok else 0.0
    return total
  return sum(a.hbm_bytes for a in ins.results)


def _operand_arrays(ins: Instruction, comp: Computation) -> dict[str, list[Array]]:
  """Distinct operands (a buffer read twice is read once) -> their arrays."""
  out = {}
  for name in ins.operands:
    src = comp.by_name.get(name)
    if src is not None and name not in out:
      out[name] = src.results
  return out


def _fusion_bytes(ins: Instruction, comp: Computation, fused: Computation) -> float:
  reads: dict[str, float] = {}
  for index, name in enumerate(ins.operands):
    param = fused.params.get(index)
    src = comp.by_name.get(name)
    if src is None:
      continue
    read = _param_read(fused, param) if param is not None else sum(a.hbm_bytes for a in src.results)
    read = min(read, sum(a.hbm_bytes for a in src.results))  # an operand in VMEM is not read from HBM
    reads[name] = max(reads.get(name, 0.0), read)
  written = _written(fused, fused.root)
  written = min(written, sum(a.hbm_bytes for a in ins.results)) if ins.results else written
  return sum(reads.values()) + written


def _group_size(ins: Instruction, devices: int) -> int:
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", ins.attrs)
  if m:
    return len([d for d in m.group(1).split(",") if d])
  m = re.search(r"replica_groups=\[\d+,(\d+)\]", ins.attrs)  # iota form [groups,size]<=[n]
  if m:
    return int(m.group(1))
  return devices


def attention_flops(ins: Instruction, comp: Computation, seq_len: int, causal_fraction: float) -> float:
  """An opaque Pallas attention kernel's matmul FLOPs, from its largest activation operand (queries: B·L·H·K
  elements) and its role in the op name: forward 2 matmuls (QK, PV), a dq kernel 3, a dkv kernel 4, a fused
  backward 5 (each 2 x elements x seq_len), times the share of key blocks the causal mask leaves."""
  name = ins.op_name
  if not ("self_attn" in name or "attention" in name) or "preprocess" in name or not seq_len:
    return 0.0
  largest = max((a for n in ins.operands for a in (comp.by_name[n].results if n in comp.by_name else ())
                 if a.dtype in ("bf16", "f32", "f16") and len(a.dims) >= 3), key=lambda a: math.prod(a.dims),
                default=None)
  if largest is None:
    return 0.0
  matmuls = 2 if re.search(r"fwd|forward", name) else 3 if "dq" in name else 4 if "dkv" in name else 5
  return matmuls * 2.0 * math.prod(largest.dims) * seq_len * causal_fraction


_PALLAS_LOSS = re.compile(r"pallas_loss_(dx|dhead)(?:_(\d+)x(\d+))?")
# kernels/pallas_loss.py's kernels: [tokens, D] x [D, V] matmuls each does, and how often it sweeps its re-read
# operand (dx: the head, per token block; dhead: x and the row statistics, per vocab block).
PALLAS_LOSS_WORK = {"dx": (2, 1), "dhead": (2, 1)}


def pallas_loss_cost(ins: Instruction, comp: Computation, once: float, programs: int) -> tuple[float, float]:
  """(FLOPs, HBM bytes) of one of kernels/pallas_loss.py's kernels, named pallas_loss_{dx|dhead}_{rows}x{cols},
  from its operands x ([N, D] or [D, N]) and head and PALLAS_LOSS_WORK. A sweep shared by `programs` programs running at
  once is one HBM read; `once` counts each operand once (a name without tiles: no re-reads counted)."""
  m = _PALLAS_LOSS.search(ins.op_name)
  x, head = (comp.by_name[n].results[0] for n in ins.operands[:2])
  D, V = min(head.dims), max(head.dims)  # the vocabulary is the long side; x may come transposed ([D, N] on TPU)
  N = math.prod(x.dims) // D
  matmuls, sweeps = PALLAS_LOSS_WORK[m.group(1)]
  flops = matmuls * 2.0 * N * D * V
  if not m.group(2):
    return flops, once
  rows, cols = int(m.group(2)), int(m.group(3))
  if m.group(1) == "dx":
    return flops, once + (sweeps * math.ceil(math.ceil(N / rows) / programs) - 1) * head.hbm_bytes
  return flops, once + (sweeps * math.ceil(math.ceil(V / cols) / programs) - 1) * (x.hbm_bytes + 12.0 * N)


def _gemm_custom_call_flops(ins: Instruction, comp: Computation) -> float:
  m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
  lhs = comp.by_name.get(ins.operands[0]) if ins.operands else None
  if m is None or lhs is None or not lhs.results or not ins.results:
    return 0.0
  dims = lhs.results[0].dims
  contracted = math.prod(dims[int(d.strip('"'))] for d in m.group(1).split(",") if d.strip('"'))
  return 2.0 * math.prod(ins.results[0].dims) * contracted


def _kernel(ins: Instruction, comp: Computation, comps, trips: int, devices: int, seq_len: int,
            causal_fraction: float, programs: int = 1) -> Kernel:
  part = part_of(ins.op_name, ins.opcode)
  if ins.opcode == "fusion":
    fused = comps.get(ins.attr("calls"))
    kind = re.search(r"kind=(k\w+)", ins.attrs)
    backend = re.search(r'"kind":"(__\w+)"', ins.attrs)
    label = f"fusion:{backend.group(1) if backend else kind.group(1) if kind else '?'}"
    if fused is None:
      return Kernel(ins.name, label, part, ins.op_name, trips, 0.0, _plain_bytes(ins, comp))
    op_name = ins.op_name or next((i.op_name for i in (fused.root, *fused.instructions) if i.op_name), "") or \
        _producer_op_name(ins, comp)
    return Kernel(ins.name, label, part_of(op_name, ins.opcode), op_name, trips, _computation_flops(fused, comps),
                  _fusion_bytes(ins, comp, fused))
  hbm = _plain_bytes(ins, comp)
  if ins.opcode == "custom-call":
    target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
    target = target.group(1) if target else "?"
    estimated = False
    if "gemm" in target or "matmul" in target:
      flops = _gemm_custom_call_flops(ins, comp)
      hbm = sum(a.hbm_bytes for arrays_ in _operand_arrays(ins, comp).values() for a in arrays_) + \
          (ins.results[0].hbm_bytes if ins.results else 0.0)  # cuBLAS's workspace (an s8 leaf) is scratch
    elif _PALLAS_LOSS.search(ins.op_name):
      flops, hbm = pallas_loss_cost(ins, comp, hbm, programs)
      estimated = True
    else:
      flops = attention_flops(ins, comp, seq_len, causal_fraction)
      estimated = flops > 0
    return Kernel(ins.name, f"custom-call:{target}", part, ins.op_name, trips, flops, hbm, estimated_flops=estimated)
  if ins.opcode in COLLECTIVES:
    n = _group_size(ins, devices)
    payload = sum(a.bytes for a in ins.results if a.dtype != "u32" or a.dims)  # the reduced/gathered values
    factor = COLLECTIVES[ins.opcode]
    link = payload * (factor * (n - 1) / n if factor else 1.0) if n > 1 else 0.0
    return Kernel(ins.name, ins.opcode, part, ins.op_name, trips, 0.0, hbm, link)
  flops = dot_flops(ins, comp) if ins.opcode in ("dot", "convolution") else 0.0
  return Kernel(ins.name, ins.opcode, part, ins.op_name, trips, flops, hbm)


def _producer_op_name(ins: Instruction, comp: Computation, depth: int = 4) -> str:
  """A kernel without source metadata (XLA CPU's multi-output fusions) takes that of what produced its inputs."""
  for name in ins.operands:
    src = comp.by_name.get(name)
    if src is None or src.opcode in ("parameter", "constant"):
      continue
    if src.op_name:
      return src.op_name
    if depth:
      found = _producer_op_name(src, comp, depth - 1)
      if found:
        return found
  return ""


def _plain_bytes(ins: Instruction, comp: Computation) -> float:
  """An unfused op's HBM bytes: its distinct operands and its result; an in-place update writes the update only,
  and a copy-start (an async copy, e.g. TPU's prefetch into VMEM) moves its HBM side once."""
  if ins.opcode in IN_PLACE:
    update = comp.by_name.get(ins.operands[IN_PLACE[ins.opcode]])
    update_bytes = sum(a.bytes for a in update.results) if update is not None else 0.0
    others = sum(a.hbm_bytes for n, arrays_ in _operand_arrays(ins, comp).items() if n != ins.operands[0]
                 for a in arrays_)
    return others + update_bytes
  if ins.opcode == "copy-start":
    leaves = ins.results[:2]  # (destination, source, context)
    return sum(a.hbm_bytes for a in leaves)
  if ins.opcode == "slice-start":  # ((operand), destination, context): reads the slice, writes the destination
    source = comp.by_name.get(ins.operands[0]) if ins.operands else None
    dest = ins.results[-2] if len(ins.results) >= 2 else None
    if dest is None:
      return 0.0
    in_hbm = source is None or not source.results or source.results[0].memory_space == 0
    return (dest.bytes if in_hbm else 0.0) + dest.hbm_bytes
  if ins.opcode in SLICING:
    return 2.0 * sum(a.hbm_bytes for a in ins.results)
  reads = sum(a.hbm_bytes for arrays_ in _operand_arrays(ins, comp).values() for a in arrays_)
  return reads + sum(a.hbm_bytes for a in ins.results)


def trip_count(ins: Instruction, comps: dict[str, Computation]) -> int | None:
  """A while loop's trip count: the compiler's known_trip_count, else `i < N` in its condition (from 0)."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.attrs)
  if m:
    return int(m.group(1))
  cond = comps.get(ins.attr("condition"))
  if cond is None:
    return None
  root = cond.root
  if root.opcode == "compare" and len(root.operands) == 2:
    direction = re.search(r"direction=(\w+)", root.attrs)
    bound = cond.by_name.get(root.operands[1])
    if bound is not None and bound.opcode == "constant" and direction and direction.group(1) in ("LT", "NE"):
      value = re.match(r"\s*(-?\d+)", bound.operands_text)
      if value:
        return int(value.group(1))
  return None


def _callees(ins: Instruction) -> list[str]:
  """The computations a call, async-start or conditional runs (a conditional's branches in order)."""
  branches = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
  if branches:
    return re.findall(r"%([\w.\-]+)", branches.group(1))
  keys = ("true_computation", "false_computation") if ins.opcode == "conditional" else ("to_apply", "calls")
  return [name for name in map(ins.attr, keys) if name] or [""]


def kernels(hlo_text: str, devices: int = 1, seq_len: int = 0, causal_fraction: float = 1.0,
            programs: int = 1) -> tuple[list[Kernel], int]:
  """(every kernel of the module with its runs per step, loops whose trip count is unknown: counted once)."""
  comps = parse(hlo_text)
  out: list[Kernel] = []
  unknown = [0]

  def walk(comp: Computation, trips: int, sink: list[Kernel]):
    for ins in comp.instructions:
      if ins.opcode in FREE or ins.opcode.endswith("-done"):  # an async op's cost is counted at its start
        continue
      if ins.opcode == "while":
        n = trip_count(ins, comps)
        if n is None:
          unknown[0] += 1
        for key in ("body", "condition"):
          if ins.attr(key) in comps:
            walk(comps[ins.attr(key)], trips * (n if n is not None else 1), sink)
      elif ins.opcode in ("call", "async-start") and _callees(ins)[0] in comps:
        walk(comps[_callees(ins)[0]], trips, sink)
      elif ins.opcode == "conditional":
        branches = []
        for name in _callees(ins):
          branch: list[Kernel] = []
          walk(comps[name], trips, branch)
          branches.append(branch)
        if branches:
          sink.extend(max(branches, key=lambda b: sum(k.trips * k.hbm_bytes for k in b)))
      else:
        sink.append(_kernel(ins, comp, comps, trips, devices, seq_len, causal_fraction, programs))

  walk(comps["ENTRY"], 1, out)
  return out, unknown[0]


# ---- the report --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Chip:
  """What bounds a chip: peak dense bf16 FLOP/s, HBM bandwidth, and interconnect bandwidth per chip (bytes/s);
  `programs`: kernel programs that run at once and share one HBM sweep of an operand they all re-read (a GPU's SMs,
  whose L2 serves the others; 1 on a TPU, whose Pallas grid runs in sequence)."""
  peak_flops: float
  hbm_bandwidth: float
  link_bandwidth: float = 0.0
  programs: int = 1


def report(hlo_text: str, chip: Chip, credited_flops: float, tokens: int, devices: int = 1, seq_len: int = 0,
           causal_fraction: float = 1.0, top: int = 10) -> dict:
  """The roofline of one step's module (one device's program; `credited_flops` and `tokens` are the whole step's,
  over `devices` chips): totals, the bound, the MFU ceiling, the top kernels and the split by part."""
  ks, unknown = kernels(hlo_text, devices, seq_len, causal_fraction, chip.programs)
  secs = [k.seconds(chip.peak_flops, chip.hbm_bandwidth, chip.link_bandwidth) for k in ks]
  bound = sum(secs)
  hbm = sum(k.trips * k.hbm_bytes for k in ks)
  flops = sum(k.trips * k.flops for k in ks)
  compute = credited_flops / devices / chip.peak_flops
  by_part = {p: {"bound_s": 0.0, "hbm_bytes": 0.0, "flops": 0.0} for p in PARTS}
  for k, s in zip(ks, secs):
    row = by_part[k.part]
    row["bound_s"] += s
    row["hbm_bytes"] += k.trips * k.hbm_bytes
    row["flops"] += k.trips * k.flops
  for row in by_part.values():
    row["share"] = round(row["bound_s"] / bound, 4) if bound else 0.0
  ranked = sorted(zip(ks, secs), key=lambda ks_: -ks_[1])[:top]
  kinds = collections.Counter(k.kind.split(":")[0] for k in ks)
  return {
      "hbm_bytes": hbm, "flops": flops, "bound_s": bound,
      "memory_s": hbm / chip.hbm_bandwidth, "flops_s": flops / chip.peak_flops, "compute_s": compute,
      "mfu_ceiling": compute / bound if bound else None,
      "executed_over_credited": flops * devices / credited_flops if credited_flops else None,
      "tokens_per_s_bound": tokens / bound if bound else None,
      "peak_flops": chip.peak_flops, "hbm_bandwidth": chip.hbm_bandwidth, "link_bandwidth": chip.link_bandwidth,
      "kernels": len(ks), "kernel_kinds": dict(sorted(kinds.items())), "unknown_trip_counts": unknown,
      "estimated_flops_kernels": sum(k.estimated_flops for k in ks),
      "top": [{"name": k.name, "kind": k.kind, "part": k.part, "runs": k.trips, "bound_ms": round(s * 1e3, 4),
               "hbm_gb": round(k.trips * k.hbm_bytes / 1e9, 4), "gflops": round(k.trips * k.flops / 1e9, 3),
               "op": k.op_name[-120:]} for k, s in ranked],
      "by_part": by_part,
  }


def by_instruction(hlo_text: str) -> dict[str, str]:
  """{instruction name: part} for every kernel of a module (loop bodies included): what a profiler's per-op events
  are attributed by."""
  ks, _ = kernels(hlo_text)
  return {k.name: k.part for k in ks}


def step_report(hlo_text: str, model_cfg, batch: int, devices: int, chip: Chip, platform: str, top: int = 10) -> dict:
  """The roofline of a compiled train step of `model_cfg` over `batch` rows on `devices` chips (its module is one
  chip's program), credited with Marin's FLOPs (3 x forward FLOPs per token x tokens)."""
  from tinyjax import flops  # noqa: PLC0415
  from tinyjax.kernels import attention  # noqa: PLC0415
  impl = model_cfg.attention_impl(platform)
  tokens = batch * model_cfg.seq_len
  return report(hlo_text, chip, flops.model_flops(model_cfg, tokens), tokens, devices, model_cfg.seq_len,
                attention.causal_fraction(impl, model_cfg.seq_len, model_cfg.attention_block), top)
