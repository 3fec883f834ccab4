"""Kernels compiled for Hopper (sm_90) with Triton's own compiler and ptxas, on a machine without a GPU.

The CPU tests run every kernel under Triton's interpreter, which never lowers one: errors that only compilation
finds (layouts, conversions that exist only on a real target, register or shared-memory limits, inline PTX) would
wait for a GPU. A package's ``tests/_aot_compile.py`` script compiles its kernels' variants with
:func:`compile_sm90` (one ``OK`` / ``FAIL`` line each) in a process without ``TRITON_INTERPRET``, and its test runs
that script with :func:`check_compile_script`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# the exit status of a compile script whose Triton lacks the ahead-of-time API it knows (its test then skips)
AOT_UNAVAILABLE = 3


def compile_sm90(fn, types: dict[str, str], consts: dict, name: str, warps: int = 4, stages: int = 2,
                 no_spills: bool = False, no_injected_waits: bool = False, divisible: tuple[str, ...] = (),
                 max_loop_instructions: int | None = None, ptx_has: tuple[str, ...] = (),
                 ptx_lacks: tuple[str, ...] = (), no_sync_loop_loads: bool = False,
                 ptx_before: tuple[tuple[str, str], ...] = (), options: dict | None = None) -> bool:
    """Compile the ``@triton.jit`` (or ``@gluon.jit``) kernel ``fn`` for sm_90 and print ``OK name`` or
    ``FAIL name: error``.

    ``types``: the Triton type of every non-constexpr argument (``"*bf16"``, ``"i32"``, ``"fp32"``, ...);
    ``consts``: every constexpr's value. ``no_spills``: also fail when the machine code spills registers to local
    memory (read from the cubin with Triton's bundled ``nvdisasm``). ``no_injected_waits``: also fail when ptxas
    inserts a wait for an asynchronous wgmma the kernel did not ask for (its warning C7517: the kernel's registers
    were touched while the MMA writing them could still run, so the overlap the code intends is lost).
    ``divisible``: arguments compiled as multiples of 16 (pointers aligned to 16 bytes, sizes and strides), as the
    launcher specializes them at run time. ``max_loop_instructions``: also fail when the longest loop of the machine
    code (:func:`longest_loop`: a streaming kernel's K loop) has more instructions than that. ``ptx_has`` /
    ``ptx_lacks``: also fail when the PTX lacks one of these strings (an instruction the kernel must lower to, such as
    ``".e4m3.e4m3"`` for FP8 tensor-core products) or holds one of those (such as ``"prmt"``: bytes permuted in
    registers). ``no_sync_loop_loads``: also fail when the longest loop holds a synchronous global load
    (:func:`loop_sync_global_loads`; compile with ``divisible`` as the launcher specializes, or unaligned pointers
    make every load synchronous). ``ptx_before``: ``(a, b)`` pairs: also fail unless the PTX holds both and ``a``
    first appears before ``b`` does (an instruction the kernel must issue before another, such as a load before
    PDL's ``griddepcontrol.wait``). ``options``: further compile options the launch passes (``maxnreg`` of a
    warp-specialized kernel). Exits the process with
    :data:`AOT_UNAVAILABLE` when this Triton has no ``ASTSource`` / ``GPUTarget`` of the known form. Returns whether
    it compiled.
    """
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.compiler import compile as triton_compile
    except ImportError:
        sys.exit(AOT_UNAVAILABLE)
    # constexprs with a default (switches added later, such as PDL) compile at their default unless given
    consts = {**{p.name: p.default for p in getattr(fn, "params", ()) if getattr(p, "is_constexpr", False)
                 and getattr(p, "has_default", False) and p.name not in consts}, **consts}
    launch_pdl = bool(consts.get("PDL", False))
    source_type = ASTSource
    if type(fn).__name__ == "GluonJITFunction":
        from triton.experimental.gluon._runtime import GluonASTSource as source_type
    signature = {p: ("constexpr" if p in consts else types[p]) for p in fn.arg_names}
    unknown = [p for p in divisible if p not in fn.arg_names or p in consts]
    if unknown:
        print(f"FAIL {name}: divisible names {unknown} are not non-constexpr arguments of {fn.__name__}")
        return False
    attrs = {(fn.arg_names.index(p),): [["tt.divisibility", 16]] for p in divisible}
    try:
        src = source_type(fn, signature, constexprs=consts, attrs=attrs) if attrs else \
            source_type(fn, signature, constexprs=consts)
    except TypeError:
        if not attrs:
            sys.exit(AOT_UNAVAILABLE)
        # a Triton whose source object takes no alignment attributes: compile without them, and leave the loop
        # checks out (the unaligned code is not what runs)
        try:
            src = source_type(fn, signature, constexprs=consts)
        except TypeError:
            sys.exit(AOT_UNAVAILABLE)
        max_loop_instructions, no_sync_loop_loads = None, False
    try:
        options = {"num_warps": warps, "num_stages": stages, **({"launch_pdl": True} if launch_pdl else {}),
                   **(options or {})}
        compiled = triton_compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        spills = local_memory_ops(compiled.asm["cubin"]) if no_spills else 0
        injected = injected_wgmma_waits(compiled.asm["ptx"]) if no_injected_waits else []
        loop = longest_loop(compiled.asm["cubin"]) if max_loop_instructions is not None else 0
        sync_loads = loop_sync_global_loads(compiled.asm["cubin"]) if no_sync_loop_loads else 0
    except Exception as exc:  # noqa: BLE001 - reported, the test fails on it
        print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:2000]}")
        return False
    if spills:
        print(f"FAIL {name}: {spills} local-memory loads and stores (register spills)")
        return False
    if injected:
        print(f"FAIL {name}: ptxas injected wgmma waits: {injected[0]}")
        return False
    missing = [p for p in ptx_has if p not in compiled.asm["ptx"]]
    present = [p for p in ptx_lacks if p in compiled.asm["ptx"]]
    if missing or present:
        print(f"FAIL {name}: its PTX " + (f"lacks {missing}" if missing else f"holds {present}"))
        return False
    misplaced = misplaced_pairs(compiled.asm["ptx"], ptx_before)
    if misplaced:
        print(f"FAIL {name}: its PTX does not hold {misplaced[0][0]!r} before {misplaced[0][1]!r}")
        return False
    if max_loop_instructions is not None and not 0 < loop <= max_loop_instructions:
        print(f"FAIL {name}: its longest loop has {loop} instructions, more than {max_loop_instructions}"
              if loop else f"FAIL {name}: no loop found in its machine code (nvdisasm's format changed?)")
        return False
    if sync_loads:
        print(f"FAIL {name}: {sync_loads} synchronous global loads (LDG) in its longest loop")
        return False
    print(f"OK {name}")
    return True


def misplaced_pairs(ptx: str, pairs: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """The ``(a, b)`` of ``pairs`` where ``ptx`` lacks either, or ``a`` first appears after ``b`` first does."""
    return [(a, b) for a, b in pairs if not 0 <= ptx.find(a) < ptx.find(b)]


def injected_wgmma_waits(ptx: str) -> list[str]:
    """ptxas's C7517 notes for ``ptx`` (sm_90a): each one a ``warpgroup.wait`` it inserted because registers an
    asynchronous wgmma defines were used before the kernel waited for it."""
    import tempfile

    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True, check=True)
    return [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if "C7517" in line]


def _disassemble(cubin: bytes) -> str:
    """A cubin's machine code (SASS) as Triton's bundled ``nvdisasm`` prints it."""
    import tempfile

    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout


def local_memory_ops(cubin: bytes) -> int:
    """The number of local-memory loads and stores (``LDL`` / ``STL``: register spills) in a cubin's machine code."""
    import re

    return len(re.findall(r"\b(?:LDL|STL)\b", _disassemble(cubin)))


def _longest_loop_body(cubin: bytes) -> list[str]:
    """The machine-code lines of a cubin's longest loop: from a label to the last branch back to it."""
    import re

    labels: dict[str, int] = {}
    instructions: list[str] = []
    span = (0, 0)
    for line in _disassemble(cubin).splitlines():
        label = re.match(r"^\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        if not re.search(r"/\*[0-9a-f]{4,}\*/", line):  # an instruction's address (5+ digits past 0xffff)
            continue
        instructions.append(line)
        back = re.search(r"\bBRA\b[^;]*?\.?(L_x_\d+)", line)
        if back and back.group(1) in labels and len(instructions) - labels[back.group(1)] > span[1] - span[0]:
            span = (labels[back.group(1)], len(instructions))
    return instructions[span[0]:span[1]]


def longest_loop(cubin: bytes) -> int:
    """Instructions in the longest loop of a cubin's machine code: from a label to the last branch back to it. For
    a kernel streaming its weights, that is the K loop: its instructions per weight byte say whether the SM can
    issue them as fast as memory delivers the bytes (an sm_90 SM takes 4 warp instructions a cycle)."""
    return len(_longest_loop_body(cubin))


def loop_sync_global_loads(cubin: bytes) -> int:
    """Plain global loads (``LDG``) in a cubin's longest loop whose result that same iteration reads within half
    the loop's instructions: each such step waits for memory with little of its own work in between. In a K loop
    that Triton pipelines through shared memory (``num_stages``) there should be none: its operands arrive by
    asynchronous copies (``LDGSTS``, or TMA) steps ahead, or from loads issued a step before their use (read, if at
    all, only by the loop's last instructions, where the next step's value is kept). Triton falls back to a plain
    load when a load's layout gives each thread less than 4 bytes (for instance a short row moved into another
    tensor's layout, one element a thread). Loops that stream through registers instead (many independent loads
    issued before the first is used, as fp8-gemm's one-row weight-only tile does) count here too; this measure is
    not meant for them."""
    return sync_loads_in_loop(_longest_loop_body(cubin))


def sync_loads_in_loop(body: list[str]) -> int:
    """:func:`loop_sync_global_loads` of a loop given as its ``nvdisasm`` lines (label to backward branch)."""
    body = [_sass_operands(line) for line in body]
    waits = 0
    for i, (opcode, operands) in enumerate(body):
        if not opcode.startswith("LDG.") or not operands:
            continue
        first = _registers(operands[0])
        width = 4 if ".128" in opcode else 2 if ".64" in opcode else 1  # (the registers a wide load fills)
        pending = {first[0] + j for j in range(width)} if first else set()
        for j in range(i + 1, min(len(body), i + (len(body) + 1) // 2)):
            later_opcode, later_operands = body[j]
            skip = _first_read(later_opcode, later_operands)
            if pending & {r for op in later_operands[skip:] for r in _registers(op)}:
                waits += 1
                break
            if skip:  # a write of the register ends its wait
                pending -= set(_registers(later_operands[0]))
            if not pending:
                break
    return waits


def _sass_operands(line: str) -> tuple[str, list[str]]:
    """(opcode with its modifiers, operands) of one ``nvdisasm`` line."""
    import re

    m = re.search(r"\*/\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);", line)
    if not m:
        return "", []
    return m.group(1), [op.strip() for op in m.group(2).split(",") if op.strip()]


def _first_read(opcode: str, operands: list[str]) -> int:
    """1 where the first operand is a register the instruction writes, else 0 (stores, branches, barriers)."""
    import re

    writes = not re.match(r"(ST|RED|ATOM|BAR|BRA|LDGSTS|EXIT|NOP|DEPBAR|WARPSYNC|BSYNC|BSSY)", opcode)
    return int(writes and bool(operands) and re.fullmatch(r"R\d+", operands[0]) is not None)


def _registers(operand: str) -> list[int]:
    """The general registers an operand names (``R4``, a pair ``R4.64`` = R4 and R5, inside addresses too)."""
    import re

    regs = []
    for number, wide in re.findall(r"\bR(\d+)(\.64)?\b", operand):
        regs += [int(number), int(number) + 1] if wide else [int(number)]
    return regs


def run_compile_script(script: Path, timeout: float = 600) -> subprocess.CompletedProcess | None:
    """Run a package's compile script in a process without ``TRITON_INTERPRET``; None when this Triton ships no
    ptxas or lacks the ahead-of-time API."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        return None
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout)
    return None if proc.returncode == AOT_UNAVAILABLE else proc


def check_compile_script(script: Path, expected_ok: int) -> None:
    """For a pytest test: run the compile script, skip where it cannot run, and assert that it succeeded with
    ``expected_ok`` variants compiled."""
    import pytest

    proc = run_compile_script(script)
    if proc is None:
        pytest.skip("this Triton ships no ptxas, or its ahead-of-time compile API is not the one the script knows")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("OK ") == expected_ok, proc.stdout


__all__ = ["AOT_UNAVAILABLE", "check_compile_script", "compile_sm90", "injected_wgmma_waits", "local_memory_ops",
           "longest_loop", "loop_sync_global_loads", "misplaced_pairs", "run_compile_script", "sync_loads_in_loop"]
