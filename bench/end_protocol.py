"""Part 2 of docs/any_model_protocol.md: the end knob of lifted models ("process" vs "sigma_min").

    python bench/end_protocol.py

Exact W2 (closed-form output laws, psld_fast.lift.lifted_program_x_law) of every sampler of the three
groups at its defaults, testbeds (a1)/(a2) of bench/compare_kdiffusion.py, NFE 10/20/50/100, with
end = "process" and "sigma_min"; applies the rule and writes bench/results/kdiffusion/end_protocol.csv
and .md.  psld_fast.lift.DEFAULT_END is then set from it by hand.  ~1 min.
"""
from __future__ import annotations

import math
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import git_revision  # noqa: E402
from compare_kdiffusion import (DETERMINISTIC_FAMILY, DIVERGED, OUT, SIGMA_MAX, SIGMA_MIN, STOCHASTIC_FAMILY,  # noqa: E402
                                fmt, psld_program, testbeds, write_csv)
from psld_fast.exact import gaussian_w2_1d  # noqa: E402
from psld_fast.lift import lifted_program_x_law  # noqa: E402

GROUPS = (("stochastic", STOCHASTIC_FAMILY), ("deterministic", DETERMINISTIC_FAMILY),
          ("multistep", ("ei_x0", "ei_2m", "ei_2m_sde")))
NFES = (10, 20, 50, 100)


def w2(sampler, nfe, mu, var, end):
    dm, proc, prog = psld_program(sampler, nfe, end=end)
    m, v = lifted_program_x_law(prog, proc, mu, var, dm.sigma_min, dm.sigma_max)
    ok = np.all(np.isfinite(v)) and np.all(v >= 0)
    return (gaussian_w2_1d(m, v, mu, var) if ok else math.inf), prog.nfe, proc.eps_end


def main():
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    rows = []
    for group, samplers in GROUPS:
        for s in samplers:
            for tb, (mu, var) in testbeds().items():
                for nfe in NFES:
                    r = dict(group=group, sampler=s, testbed=tb, nfe=nfe)
                    for end in ("process", "sigma_min"):
                        w, spent, eps_end = w2(s, nfe, mu, var, end)
                        r[f"w2_{end}"], r["nfe_spent"], r[f"eps_end_{end}"] = w, spent, eps_end
                    rows.append(r)
                    print(f"  {group:13s} {s:14s} {tb} NFE {nfe:3d}: process {r['w2_process']:.4g}  "
                          f"sigma_min {r['w2_sigma_min']:.4g}", flush=True)
    ok = lambda w: math.isfinite(w) and w <= DIVERGED  # noqa: E731
    decision, lines_dec = {}, []
    for group, _ in GROUPS:
        used = []
        for r in (r for r in rows if r["group"] == group):
            a, b = r["w2_sigma_min"], r["w2_process"]
            if ok(a) or ok(b):  # part 1's handling: a diverged side is taken at the threshold
                r["log_ratio"] = math.log(min(a, DIVERGED) / min(b, DIVERGED))
                used.append(r)
            else:
                r["log_ratio"] = None
        mean = statistics.fmean(r["log_ratio"] for r in used) if used else 0.0
        better = sum(1 for r in used if r["log_ratio"] < 0)
        choice = "sigma_min" if mean < -0.02 else "process"
        decision[group] = choice
        per_nfe = ", ".join(f"NFE {n}: {statistics.fmean(r['log_ratio'] for r in used if r['nfe'] == n):+.3f}"
                            for n in NFES if any(r["nfe"] == n for r in used))
        lines_dec.append(f"- **{group}**: mean log(W2[sigma_min] / W2[process]) = **{mean:+.4f}** over {len(used)} "
                         f"cells (sigma_min better in {better}, process in {len(used) - better}) -> default "
                         f"**{choice}**. Per NFE: {per_nfe}.")
    eps = rows[0]
    write_csv(rows, OUT / "end_protocol.csv")
    lines = ["# End knob of lifted models: part 2 of docs/any_model_protocol.md", "",
             f"Command: `python bench/end_protocol.py` (git {git_revision()}).", "",
             f"Exact W2 of the output x-law to the data law; denoiser range {SIGMA_MIN} .. {SIGMA_MAX:g}; quadratic grid; "
             "every sampler at its defaults (start per DEFAULT_START); testbeds (a1), (a2) as in start_protocol.md. "
             f"end = process: eps_end {eps['eps_end_process']:.4g} (sigma_y 0.009); end = sigma_min: eps_end "
             f"{eps['eps_end_sigma_min']:.4g} (sigma_y = sigma_min).", "",
             "## Decision (rule: per group, mean log ratio < -0.02 -> sigma_min; else process)", ""] + lines_dec + [
             "", f"`psld_fast.lift.DEFAULT_END = {decision!r}`", "", "## Rows", "",
             "| group | sampler | testbed | NFE | W2 end=process | W2 end=sigma_min | log ratio |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lr = "" if r["log_ratio"] is None else f"{r['log_ratio']:+.3f}"
        a, b = r["w2_process"], r["w2_sigma_min"]
        lines.append(f"| {r['group']} | {r['sampler']} | {r['testbed']} | {r['nfe']} | "
                     f"{'**' + fmt(a) + '**' if a < b else fmt(a)} | {'**' + fmt(b) + '**' if b < a else fmt(b)} | {lr} |")
    (OUT / "end_protocol.md").write_text("\n".join(lines) + "\n")
    print("DECISION", decision)
    print("\n".join(lines_dec))


if __name__ == "__main__":
    main()
