"""Compile the Triton fused-step kernel ahead of time for GPU targets, on a machine without a GPU.

For every variant ``psld_fast.triton_step`` can launch (``kernel_variants()``: state and eps dtypes,
the constexpr flags, the two grid layouts) and every target architecture, this runs Triton's whole
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and reports, from ptxas's own
``-v`` log and the PTX:

* registers per thread, stack frame and spill bytes (a spill fails the check);
* the global loads/stores of the state and eps: in the per-sample layout with a half size divisible
  by 16 (Triton's ``tt.divisibility`` specialisation, what an image batch gets) every one must be a
  16-byte vector access (``ld/st.global.v4.b32``), otherwise the check fails.  The flattened layout
  for small halves gathers across sample boundaries and is scalar by design (reported, not checked).

    python tools/triton_aot_check.py                 # CI subset (every dtype pair in both layouts
                                                     # with all flags on, flag combinations on fp32)
    python tools/triton_aot_check.py --all --out bench/results/triton_aot.md   # every variant

Exit status 1 on a compile error, a spill or a non-vectorised access where the vector path applies.
The pointer arguments are compiled as 16-byte aligned (as Triton specialises torch allocations);
Triton's other run-time specialisations (an int argument equal to 1, e.g. D = 1) are not enumerated.
"""
from __future__ import annotations

import os

import sys

os.environ.pop("TRITON_INTERPRET", None)  # the compiler, not the interpreter, before triton is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's psld_fast

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

_TT = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}
_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def _variant_key(v: dict) -> dict:
    """A picklable description of one kernel_variants() entry."""
    state = _TT[str(v["state"])]
    eps = _TT[str(v["eps"])] if v["eps"] is not None else None
    return dict(state=state, eps=eps, BLOCK=v["BLOCK"], num_warps=v["num_warps"], maxnreg=v["maxnreg"],
                HAS_EPS=v["HAS_EPS"],
                HAS_NOISE=v["HAS_NOISE"], SECOND_DRAW=v["SECOND_DRAW"], READ_STATE=v["READ_STATE"],
                FLAT=v["FLAT"], HAS_DPREV=v["HAS_DPREV"], HAS_DREC=v["HAS_DREC"], DREC_STATE=v["DREC_STATE"])


def select(variants: list[dict], everything: bool) -> list[dict]:
    keys = [_variant_key(v) for v in variants]
    if everything:
        return keys
    out = []
    for k in keys:
        full = k["READ_STATE"] and k["SECOND_DRAW"] and k["BLOCK"] == 1024
        fp32_flags = k["state"] == "fp32" and k["eps"] == "fp32" and not k["FLAT"]
        if full or fp32_flags:
            out.append(k)
    return out


def compile_one(job: tuple[dict, int]) -> dict:
    """Compile one variant for one compute capability; returns the report row."""
    key, cc = job
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from psld_fast import triton_step

    knobs.nvidia.dump_ptxas_log = True    # ptxas -v output is printed: captured below
    knobs.compilation.always_compile = True  # no cache hit, so ptxas always runs and logs
    kernel = triton_step._affine_step_kernel
    names = kernel.arg_names
    sig = {n: "fp32" for n in names}
    eps_ty = key["eps"] or key["state"]  # eps None: the launcher passes u again
    ms = key["HAS_DPREV"] or key["HAS_DREC"]
    sig.update(u_ptr=f"*{key['state']}", eps_ptr=f"*{eps_ty}", seed_ptr="*i64",
               d_ptr="*fp32" if ms else f"*{key['state']}",  # no multistep: the launcher passes u
               B="i32", D="i32", NB="i32", step="i32", stream="i32")
    consts = dict(BLOCK=key["BLOCK"], HAS_EPS=key["HAS_EPS"], HAS_NOISE=key["HAS_NOISE"],
                  SECOND_DRAW=key["SECOND_DRAW"], READ_STATE=key["READ_STATE"], FLAT=key["FLAT"],
                  BF16_RNE=False, HAS_DPREV=key["HAS_DPREV"], HAS_DREC=key["HAS_DREC"],
                  DREC_STATE=key["DREC_STATE"])
    for c in consts:
        sig[c] = "constexpr"
    aligned = ["u_ptr", "eps_ptr", "seed_ptr", "d_ptr"] + ([] if key["FLAT"] else ["D"])
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    target = GPUTarget("cuda", cc, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": key["num_warps"], "maxnreg": key["maxnreg"]})
    row = dict(key, arch=f"sm_{cc}", ok=True, problems=[])
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                                      target=target, options=options.__dict__)
    except Exception as exc:  # noqa: BLE001  (reported as a failed row)
        row.update(ok=False, problems=[f"compile error: {type(exc).__name__}: {str(exc)[:300]}"])
        return row
    row["seconds"] = round(time.perf_counter() - t0, 2)
    text = log.getvalue()
    m = re.search(r"Used (\d+) registers", text)
    s = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    row["regs"] = int(m.group(1)) if m else None
    row["stack"], row["spill_st"], row["spill_ld"] = (int(g) for g in s.groups()) if s else (None,) * 3
    if row["regs"] is None or row["spill_st"] is None:
        row["problems"].append("no ptxas -v report")
    elif row["spill_st"] or row["spill_ld"]:
        row["problems"].append(f"spills: {row['spill_st']} B stored, {row['spill_ld']} B loaded")
    ptx = compiled.asm["ptx"]
    loads = re.findall(r"\bld\.global(\.[\w.]+)", ptx)
    stores = re.findall(r"\bst\.global(\.[\w.]+)", ptx)
    row["ld16"] = sum(1 for op in loads if op.endswith(".v4.b32"))
    row["st16"] = sum(1 for op in stores if op.endswith(".v4.b32"))
    # data loads: everything but the seed (b64) and libdevice's read-only tables (.nc scalar words)
    row["ld_other"] = sum(1 for op in loads if not op.endswith(".v4.b32") and op not in (".b64", ".nc.b32"))
    row["st_other"] = sum(1 for op in stores if not op.endswith(".v4.b32"))
    if not key["FLAT"]:
        per_thread = key["BLOCK"] // (32 * key["num_warps"])  # elements of each half per thread
        want_ld = 2 * per_thread * ((_BYTES[key["state"]] if key["READ_STATE"] else 0)
                                    + (_BYTES[eps_ty] if key["HAS_EPS"] else 0)) // 16
        want_st = 2 * per_thread * _BYTES[key["state"]] // 16
        want_ld += per_thread * 4 // 16 if key["HAS_DPREV"] else 0  # the multistep op's float32 dbuf
        want_st += per_thread * 4 // 16 if key["HAS_DREC"] else 0
        if (row["ld16"], row["st16"], row["ld_other"], row["st_other"]) != (want_ld, want_st, 0, 0):
            row["problems"].append(f"expected {want_ld} 16-byte loads and {want_st} 16-byte stores only, got "
                                   f"{row['ld16']}/{row['st16']} (+{row['ld_other']} other loads, "
                                   f"+{row['st_other']} other stores)")
    row["ok"] = not row["problems"]
    return row


def _fmt(row: dict) -> str:
    noise = "2 draws" if row["SECOND_DRAW"] else "1 draw" if row["HAS_NOISE"] else "none"
    layout = "flat" if row["FLAT"] else "per-sample"
    if row["HAS_DPREV"] or row["HAS_DREC"]:
        layout += " ms(" + ",".join(n for n, f in (("read", row["HAS_DPREV"]), ("rec", row["HAS_DREC"]),
                                                     ("x", row["DREC_STATE"])) if f) + ")"
    spill = "-" if row.get("spill_st") is None else f"{row['spill_st']}/{row['spill_ld']}"
    vec = "-" if "ld16" not in row else f"{row['ld16']}/{row['st16']}" + (
        f" (+{row['ld_other']}/{row['st_other']} scalar)" if row["ld_other"] or row["st_other"] else "")
    budget = f", maxnreg {row['maxnreg']}" if row["maxnreg"] else ""
    return (f"| {row['arch']} | {row['state']} | {row['eps'] or '-'} | {layout} {row['BLOCK']}/{row['num_warps']}w{budget} "
            f"| {noise} | {'yes' if row['READ_STATE'] else 'no'} | {row.get('regs', '-')} | {row.get('stack', '-')} "
            f"| {spill} | {vec} | {'ok' if row['ok'] else 'FAIL: ' + '; '.join(row['problems'])} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="80,90", help="compute capabilities (default 80,90)")
    ap.add_argument("--all", action="store_true", help="every variant (default: the CI subset)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    ap.add_argument("--out", help="write the markdown table to this file")
    ap.add_argument("--first", type=int, default=None, help="only the first N selected variants (smoke test)")
    args = ap.parse_args(argv)

    import triton

    from psld_fast import triton_step

    if triton_step.INTERPRETED:  # pragma: no cover - the env var is removed above
        print("triton_aot_check: TRITON_INTERPRET is on; cannot compile", file=sys.stderr)
        return 1
    keys = select(triton_step.kernel_variants(), args.all)[:args.first]
    ccs = [int(c) for c in args.archs.split(",")]
    jobs = [(k, cc) for cc in ccs for k in keys]
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(compile_one, jobs))
    else:
        rows = [compile_one(j) for j in jobs]
    elapsed = time.perf_counter() - t0
    header = [f"Triton {triton.__version__}, {len(keys)} variants x {len(ccs)} targets "
              f"({'all' if args.all else 'CI subset'}), compiled in {elapsed:.0f} s with {args.jobs} process(es)",
              "",
              "| arch | state | eps | layout BLOCK/warps | noise | reads u | registers | stack B | spill st/ld B "
              "| 16-B ld/st | check |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    table = "\n".join(header + [_fmt(r) for r in rows])
    print(table)
    bad = [r for r in rows if not r["ok"]]
    regs = [r["regs"] for r in rows if r.get("regs") is not None]
    summary = (f"\ntriton_aot_check: {len(rows) - len(bad)}/{len(rows)} ok; registers {min(regs)}-{max(regs)} "
               f"per thread" if regs else "\ntriton_aot_check: nothing compiled")
    print(summary)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n" + summary.strip() + "\n")
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
