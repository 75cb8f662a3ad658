"""Where a compiled step spends its time: a `jax.profiler` trace summed per HLO op and category.

System code for bench/: nothing here changes what is computed. The trace is written as
Perfetto JSON (`create_perfetto_trace=True`), which needs no TensorBoard plugin to read. Op events
carry their HLO instruction in `args.hlo_op`; the compiled module's text maps each instruction to
a category (convolution, grouped convolution, matmul, loop / reduction fusion, copy, collective).

On a GPU the events read are the kernels on the device's stream lines (one op may launch several
kernels); on the CPU, XLA's thunks on the host threads. `busy` is the union of op intervals over
the traced span: 1 - busy is time the device waited (launch gaps, host work, synchronisation).
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from collections.abc import Callable
from pathlib import Path

import jax

CATEGORIES = (
    "conv",
    "conv_grouped",
    "matmul",
    "fusion_loop",
    "fusion_reduce",
    "fusion_other",
    "copy_transpose",
    "collective",
    "other",
)


def trace_calls(call: Callable[[], object], *, calls: int, logdir: str | Path) -> Path:
    """Run `call` `calls` times under `jax.profiler.trace`; return the Perfetto JSON it wrote."""
    logdir = Path(logdir)
    before = set(logdir.glob("plugins/profile/*/perfetto_trace.json.gz"))
    with jax.profiler.trace(str(logdir), create_perfetto_trace=True):
        out = None
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
    new = sorted(set(logdir.glob("plugins/profile/*/perfetto_trace.json.gz")) - before)
    if not new:
        raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {logdir}")
    return new[-1]


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


def hlo_instructions(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the rest of its line, for every instruction of an HLO module's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _called_computations(hlo_text: str) -> dict[str, str]:
    """Computation name -> its body text (to look inside a fusion for a dot or a convolution)."""
    bodies, name, lines = {}, None, []
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            name, lines = head.group(1), []
        elif line.startswith("}") and name is not None:
            bodies[name] = "\n".join(lines)
            name = None
        elif name is not None:
            lines.append(line)
    return bodies


_COLLECTIVES = {
    "all-reduce",
    "all-reduce-start",
    "all-gather",
    "all-gather-start",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "collective-permute-start",
}


def categorize(rest: str, bodies: dict[str, str] | None = None) -> str:
    """Category of one HLO instruction from its text (the part after `name = `): its opcode and
    attributes only, never its metadata (op names like `transpose(jvp(...))`) or operand names."""
    bodies = bodies or {}
    rest = re.sub(r",?\s*metadata=\{[^}]*\}", "", rest)
    m = re.search(r"(?:^|\s)([a-z][\w\-]*)\(", rest)
    opcode = m.group(1) if m else ""
    grouped = re.search(r"(feature|batch)_group_count=(\d+)", rest)
    is_grouped = bool(grouped and int(grouped.group(2)) > 1)
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    target = target.group(1) if target else ""
    if opcode == "convolution" or "__cudnn$conv" in target:
        return "conv_grouped" if is_grouped else "conv"
    if opcode == "dot" or "cublas" in target or "gemm" in target:
        return "matmul"
    if opcode in _COLLECTIVES:
        return "collective"
    if opcode == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        body = bodies.get(called.group(1), "") if called else ""
        if re.search(r"\sconvolution\(", body):
            return "conv_grouped" if re.search(r"group_count=([2-9]|\d\d)", body) else "conv"
        if re.search(r"\sdot\(", body) or "__triton_gemm" in rest:
            return "matmul"
        if "kind=kInput" in rest or re.search(r"\sreduce\(", body):
            return "fusion_reduce"
        if "kind=kLoop" in rest:
            return "fusion_loop"
        return "fusion_other"
    if opcode in ("copy", "copy-start", "transpose"):
        return "copy_transpose"
    return "other"


_KERNEL_CATEGORIES = (  # GPU kernel names (cuDNN, cuBLAS/CUTLASS, XLA's fusion emitters)
    # cuDNN names grouped convolutions "grouped", or its implicit GEMMs say "_g8_" ("_g1_": not)
    ("conv_grouped", re.compile(r"grouped|depthwise|xmma_\w*_g([2-9]|\d\d+)_")),
    ("conv", re.compile(r"xmma_(fprop|dgrad|wgrad)|implicit_gemm|cudnn::|conv(?!ert)|wgrad", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|cublas", re.I)),
    ("collective", re.compile(r"nccl|all_reduce|allreduce|all_gather|reduce_scatter", re.I)),
    ("copy_transpose", re.compile(r"transpose|tensorTransform|memcpy|memset|copy", re.I)),
    ("fusion_loop", re.compile(r"reduce_precision")),
    ("fusion_reduce", re.compile(r"reduce|softmax")),
    ("fusion_loop", re.compile(r"^(loop_|wrapped_|input_|fusion|triton)")),
)


def categorize_kernel(name: str) -> str:
    """Category of one GPU kernel from its name (command buffers hide the HLO op behind them)."""
    for category, pattern in _KERNEL_CATEGORIES:
        if pattern.search(name):
            return category
    return "other"


def _load_events(path: Path) -> tuple[list[dict], dict[int, str], dict[tuple[int, int], str]]:
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") != "M":
            continue
        if e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    return events, procs, threads


def op_events(path: Path) -> tuple[str, list[dict]]:
    """The op events of a trace: GPU kernels on stream lines if there is a device plane, else the
    host's XLA thunks. Returns (where they came from, events)."""
    events, procs, threads = _load_events(path)
    timed = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    device = [e for e in timed if procs.get(e["pid"], "").startswith("/device:")]
    if device:
        streams = [e for e in device if "Stream" in threads.get((e["pid"], e["tid"]), "")]
        return ("device streams", streams) if streams else ("device", device)
    return "host thunks", timed


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize(path: Path, hlo_text: str = "", *, calls: int, top: int = 25) -> dict:
    """Per-call time by category and the `top` ops (and GPU kernels), from a trace of `calls`
    calls. Categories come from kernel names on a GPU and from the HLO text on the CPU."""
    source, events = op_events(path)
    if not events:
        raise RuntimeError(f"no op events (args.hlo_op) in {path}")
    instrs = hlo_instructions(hlo_text)
    bodies = _called_computations(hlo_text)
    per_op: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    kernels: dict[str, str] = {}
    for e in events:
        op = e["args"]["hlo_op"]
        per_op[op] += e["dur"]
        count[op] += 1
        kernels.setdefault(op, e["name"])
    op_cat = {op: categorize(instrs.get(op, ""), bodies) for op in per_op}
    cats = dict.fromkeys(CATEGORIES, 0.0)
    by_kernel: dict[str, float] = collections.defaultdict(float)
    if source.startswith("device"):  # kernels name their work; an op may be a whole CUDA graph
        for e in events:
            cat = categorize_kernel(e["name"])
            if cat == "conv" and op_cat[e["args"]["hlo_op"]] == "conv_grouped":
                cat = "conv_grouped"  # the HLO knows the group count where the name does not
            cats[cat] += e["dur"]
            by_kernel[e["name"][:100]] += e["dur"]
    else:
        for op, us in per_op.items():
            cats[op_cat[op]] += us
    ops = sorted(
        ((us, op, op_cat[op], instrs.get(op, "")) for op, us in per_op.items()), reverse=True
    )
    total = sum(per_op.values())
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    busy = _union_us([(e["ts"], e["ts"] + e["dur"]) for e in events])
    return {
        "source": source,
        "calls": calls,
        "op_ms_per_call": total / calls / 1e3,
        "span_ms_per_call": span / calls / 1e3,
        "busy_fraction": busy / span if span else 0.0,
        "kernels_per_call": len(events) / calls,
        "category_ms_per_call": {k: v / calls / 1e3 for k, v in cats.items() if v},
        "category_fraction": {k: v / total for k, v in cats.items() if v},
        "top_kernels": [
            {"kernel": k, "ms_per_call": us / calls / 1e3, "fraction": us / total}
            for k, us in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:top]
        ],
        "top_ops": [
            {
                "op": op,
                "category": cat,
                "ms_per_call": us / calls / 1e3,
                "fraction": us / total,
                "launches_per_call": count[op] / calls,
                "kernel": kernels[op][:120],
                "hlo": rest[:200],
            }
            for us, op, cat, rest in ops[:top]
        ],
    }


def format_summary(s: dict) -> str:
    """A few lines for the console: categories, then the top ops."""
    if "error" in s:
        return f"    profile failed: {s['error']}"
    lines = [
        f"    profile ({s['source']}, {s['calls']} calls): ops {s['op_ms_per_call']:.1f} ms/call,"
        f" span {s['span_ms_per_call']:.1f} ms, busy {s['busy_fraction']:.2f},"
        f" {s['kernels_per_call']:.0f} events/call"
    ]
    for k, v in sorted(s["category_ms_per_call"].items(), key=lambda kv: -kv[1]):
        lines.append(f"      {k:15s} {v:9.2f} ms  {s['category_fraction'][k]:6.1%}")
    for o in s.get("top_kernels", [])[:8]:
        lines.append(f"      {o['fraction']:6.1%} {o['ms_per_call']:8.2f} ms  {o['kernel'][:100]}")
    for o in s["top_ops"][: 0 if s.get("top_kernels") else 10]:
        lines.append(
            f"      {o['fraction']:6.1%} {o['ms_per_call']:8.2f} ms  {o['category']:14s}"
            f" {o['op'][:40]:40s} {o['hlo'][:70]}"
        )
    return "\n".join(lines)


# Entry-computation instructions that launch no work of their own.
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all"}


def entry_op_counts(hlo_text: str) -> dict[str, int]:
    """Category -> number of instructions in the ENTRY computation of a compiled module's text,
    leaving out those that do no work (parameters, tuples, bitcasts, constants). After XLA's
    fusion passes each remaining instruction is roughly one kernel launch (a convolution, a
    fusion, a copy), so the total counts what a step pays in launches, on any backend."""
    bodies = _called_computations(hlo_text)
    entry = next(
        (bodies.get(m.group(1), "") for m in re.finditer(r"^ENTRY\s+%?([\w.\-]+)", hlo_text, re.M)),
        "",
    )
    counts: collections.Counter = collections.Counter()
    for line in entry.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        rest = re.sub(r",?\s*metadata=\{[^}]*\}", "", m.group(2))
        op = re.search(r"(?:^|\s)([a-z][\w\-]*)\(", rest)
        if op and op.group(1) in _FREE:
            continue
        counts[categorize(rest, bodies)] += 1
    return {"total": sum(counts.values()), **dict(sorted(counts.items()))}
