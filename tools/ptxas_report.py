"""Registers, spills and global access widths of the CUDA kernels, from a build without a GPU.

Used by .ci/check_cuda_build.sh, which builds the extension with ``-Xptxas -v``:

    python tools/ptxas_report.py BUILD_LOG [--so LIB --cuobjdump PATH] [--out REPORT]

* BUILD_LOG: the build output holding ptxas's ``-v`` lines (one entry function per kernel and arch);
  every ``affine_step_kernel`` instantiation is listed with its registers per thread and spill bytes.
* ``--so``: the built library; its SASS (``cuobjdump -sass``) is read to check that every vector
  instantiation (kVec > 1) of ``affine_step_kernel`` loads and stores the state with 128-bit
  global accesses (``LDG.E.128`` / ``STG.E.128``).
Exits 1 on any spill, on a vector kernel without 128-bit accesses, or when nothing was found.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import defaultdict

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_KERNEL = re.compile(r"affine_step_kernel<(.+), (\d+), (true|false)>")


def demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}
    return dict(zip(names, out))


def parse_ptxas(log: str) -> list[dict]:
    """One row per (function, arch): registers, stack frame and spill bytes."""
    rows, cur = [], None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = dict(mangled=m.group(1), arch=m.group(2), regs=None, stack=0, spill_st=0, spill_ld=0)
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _SPILL.search(line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        m = _REGS.search(line)
        if m:
            cur["regs"] = int(m.group(1))
    names = demangle(sorted({r["mangled"] for r in rows}))
    for r in rows:
        r["name"] = names[r["mangled"]]
    return rows


def sass_widths(so: str, cuobjdump: str) -> dict[tuple[str, str], set[str]]:
    """(arch, mangled function) -> the LDG/STG mnemonics of its SASS."""
    text = subprocess.run([cuobjdump, "-sass", so], capture_output=True, text=True, check=True).stdout
    out: dict = defaultdict(set)
    arch, fn = "", ""
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
        m = re.search(r"Function : (\S+)", line)
        if m:
            fn = m.group(1)
        for op in re.findall(r"\b((?:LDG|STG)\.E[.\w]*)", line):
            out[(arch, fn)].add(op)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--so")
    ap.add_argument("--cuobjdump")
    ap.add_argument("--out", help="also write the report to this file")
    args = ap.parse_args(argv)
    with open(args.log, errors="replace") as f:
        rows = [r for r in parse_ptxas(f.read()) if _KERNEL.search(r["name"])]
    if not rows:
        print("ptxas_report: no affine_step_kernel entry in the build log (was -Xptxas -v passed?)")
        return 1
    sass = sass_widths(args.so, args.cuobjdump) if args.so and args.cuobjdump else None
    failures = []
    lines = ["| arch | state, eps | kVec | two draws | registers | stack | spill st/ld | 128-bit ld/st |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["arch"], r["name"])):
        types, vec, two = _KERNEL.search(r["name"]).groups()
        types = types.replace("c10::", "")
        wide = "-"
        if sass is not None:
            arch = r["arch"].replace("sm_90a", "sm_90")
            ops = sass.get((arch, r["mangled"]), set())
            has_ld = any(o.startswith("LDG.E.128") for o in ops)
            has_st = any(o.startswith("STG.E.128") for o in ops)
            wide = f"{'yes' if has_ld else 'no'}/{'yes' if has_st else 'no'}"
            if int(vec) > 1 and not (has_ld and has_st):
                failures.append(f"{r['arch']} {r['name']}: vector kernel without 128-bit LDG/STG "
                                f"(SASS has {sorted(ops) or 'no global accesses'})")
        if r["spill_st"] or r["spill_ld"]:
            failures.append(f"{r['arch']} {r['name']}: {r['spill_st']} bytes spill stores, "
                            f"{r['spill_ld']} bytes spill loads")
        lines.append(f"| {r['arch']} | {types} | {vec} | {two} | {r['regs']} | {r['stack']} | "
                     f"{r['spill_st']}/{r['spill_ld']} | {wide} |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    for msg in failures:
        print("ptxas_report: FAILED:", msg)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
