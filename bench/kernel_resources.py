"""The GPU machine code of every kernel, compiled ahead of time without a GPU: registers, spills, stack, shared
memory, the widest global load and store, and how many programs (blocks) fit on an SM against how many the
launcher asks for.

    python -m bench.kernel_resources                 # the installed triton; table to stdout and the .md file
    python -m bench.kernel_resources --check         # CI: triton 3.6 and 3.9 (installed into a cache folder)
    python -m bench.kernel_resources --triton 3.6.0 --triton 3.9.0 --arch 90

Triton: every specialization the launchers (fused_sched/backends/triton/) can
produce, i.e. adam_kernel and sgd_kernel for 3 parameter dtypes x {schedule, GradScaler scale, found_inf, clip}
(48 each), grad_norm_kernel for 3 dtypes x 4 norm kinds x {scale, finalize} (48) and the schedule evaluator:
145 per architecture; and muon_kernel for its 2 passes x 3 dtypes x the fewest and the most inputs (12, see
``muon_specializations``), compiled with ``triton.compile`` for a ``GPUTarget`` of sm_90 and sm_80, with the options
the launchers pass (num_warps, enable_fp_fusion=False) and the divisibility-by-16 that Triton gives the pointer
arguments of torch tensors. Triton picks its own ptxas per architecture; the cubins are read with the
cuobjdump shipped beside it (-res-usage, -sass). CUDA: each csrc/cuda/*.cu compiled with the project's nvcc
flags and ``-Xptxas -v`` for each architecture.

Columns: regs (per thread), local st/ld (Triton: bytes of the STL / LDL instructions in SASS, register spills or
arrays that dynamic indexing put in local memory; CUDA: the spill stores / loads ptxas -v reports), stack (bytes of
the stack frame; in the CUDA step kernels with a schedule, the frame of CUDA's double cos(), whose Payne-Hanek
argument reduction keeps a local array for huge arguments: measured on a probe kernel and allowed),
smem (bytes), ld / st (widest global load / store in bits: 128 is a 16-byte vector), fit (programs of this
kernel that fit on one SM by registers, threads and shared memory) and asked (the launcher's programs per SM; the
Triton launcher caps its grid at what fits, triton/launch.py resident_programs).

--check fails (exit 1) on what ``problems`` lists: a compile error; spills or stack use in any sm_90 kernel and
any sm_80 step kernel, beyond libm's cos frame (CUDA) or a call frame of at most 8 bytes around the compiler's own
subroutines (``CALL_FRAME_*``); a Triton step kernel without 128-bit loads and stores; a CUDA kernel that fits
fewer blocks per SM than its launcher asks for, or a Triton kernel fewer than 2 programs (the Triton launcher
sizes its grid by what fits). Results are written to
bench/results/kernel-resources.md (one table per triton version and per nvcc).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from . import kernel_machine_code
from .kernel_machine_code import FORMATTED, ROOT, cuda_rows, triton_specializations

RESULTS = os.path.join(ROOT, "bench", "results", "kernel-resources.md")
#: The oldest and the newest triton the project supports (README: triton 3.6-3.9).
SUPPORTED_TRITONS = ("3.6.0", "3.9.0")
ARCHS = (90, 80)

# -- report ------------------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    head = "| kernel | specialization | arch | regs | local st/ld | stack | smem | ld | st | LDG.128 | fit | asked |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['spec']} | sm_{r['arch']} | **error**: {r['error']} |||||||||")
            continue
        fits = r["fit"] if r.get("asked") is None or r["fit"] >= r["asked"] else f"**{r['fit']}**"
        spill = f"{r['spill_st']}/{r['spill_ld']}"
        if r["spill_st"] or r["spill_ld"]:
            spill = f"**{spill}**"
        lines.append(f"| {r['kernel']} | {r['spec']} | sm_{r['arch']} | {r['regs']} | {spill} | {r['stack']} | "
                     f"{r['smem']} | {r['ld']} | {r['st']} | {r['ld128']} | {fits} | {r.get('asked') or '-'} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line per (kernel, arch): ranges over the specializations."""
    out = []
    keyed: dict = {}
    for r in rows:
        if "error" not in r:
            keyed.setdefault((r["kernel"].split("<")[0], r["arch"]), []).append(r)
    for (kernel, arch), rs in sorted(keyed.items()):
        regs = sorted(r["regs"] for r in rs)
        spills = sum(r["spill_st"] + r["spill_ld"] > 0 for r in rs)  # local-memory traffic
        frames = sum(r["spill_st"] + r["spill_ld"] > 0 and _call_frame(r) for r in rs)
        short = [r for r in rs if r.get("asked") and r["fit"] < r["asked"]]
        out.append(f"- {kernel} sm_{arch}: {len(rs)} variants, registers {regs[0]}-{regs[-1]}, widest load "
                   f"{max(r['ld'] for r in rs)} bits (128-bit in {sum(r['ld128'] > 0 for r in rs)}), local memory in "
                   f"{spills} ({frames} of them a call frame of at most {CALL_FRAME_SPILL} bytes), stack in "
                   f"{sum(r['stack'] > 0 for r in rs)}, fewer programs per SM than asked in {len(short)}")
    return "\n".join(out)


#: Triton's step kernels, which must move their elements in 16-byte vectors.
STEP_KERNELS = ("adam_kernel", "sgd_kernel", "muon_kernel")


#: A call frame: registers a kernel saves around the compiler's own subroutines (the slow paths of IEEE float64
#: division and of sqrt / division in float32, libm), at kernel entry or per chunk, never per element. Seen on
#: sm_90 / sm_80 with triton 3.6 and 3.9: 4-8 bytes of spill stores and an 8-byte stack in some Triton step
#: kernels, each with CALL instructions in its SASS.
CALL_FRAME_SPILL, CALL_FRAME_STACK = 8, 16
#: The step kernels compiled with the state formats' path (HAS_FORMATS, launched only for buckets that hold a
#: low-memory row; float32 buckets launch the kernels without it, which keep the no-spill gate): measured with
#: triton 3.6 and 3.9 on sm_80 / sm_90, up to 32 bytes of spill stores, 36 of loads and a 24-byte stack in the
#: bfloat16 Adam variants with a schedule and grad scale. Gated at that ceiling (a regression fails) until a GPU
#: measures what the spills cost; removing them is open (issue 19's note).
FORMATTED_SPILL, FORMATTED_STACK = 40, 32
#: Triton's launcher sizes its persistent grid by the programs that fit (triton/launch.py resident_programs): fewer
#: than asked is no queueing, but fewer than this is a register blowup worth failing on.
MIN_TRITON_FIT = 2


def _call_frame(r: dict) -> bool:
    return r.get("calls", 0) > 0 and max(r["spill_st"], r["spill_ld"]) <= CALL_FRAME_SPILL and \
        r["stack"] <= CALL_FRAME_STACK


def problems(rows: list[dict]) -> list[str]:
    """What --check fails on: a compile error; spills or stack (sm_90: any kernel; sm_80: the step kernels) beyond
    libm's own frame (CUDA) or a call frame around the compiler's subroutines (CALL_FRAME_*); a Triton step kernel
    without 128-bit loads and stores; a CUDA kernel that fits fewer blocks per SM than its launcher asks for, a
    Triton kernel fewer than MIN_TRITON_FIT programs (its grid is sized by what fits)."""
    found = []
    for r in rows:
        where = f"{r.get('source', '')} {r['kernel']} [{r['spec']}] sm_{r['arch']}"
        if "error" in r:
            found.append(f"{where}: {r['error']}")
            continue
        step = r["kernel"].split("<")[0] in (*STEP_KERNELS, "adam_tables_kernel", "sgd_tables_kernel")
        spilled = r["spill_st"] or r["spill_ld"] or r["stack"] > r.get("libm_stack", 0)
        formatted = r["spec"].endswith(FORMATTED)
        if formatted and max(r["spill_st"], r["spill_ld"]) <= FORMATTED_SPILL and r["stack"] <= FORMATTED_STACK:
            spilled = False
        if (r["arch"] == 90 or step) and spilled and not _call_frame(r):
            found.append(f"{where}: spills {r['spill_st']}/{r['spill_ld']} bytes, stack {r['stack']} bytes")
        if r["kernel"] in STEP_KERNELS and (r["ld"] < 128 or r["st"] < 128):
            found.append(f"{where}: widest global load / store {r['ld']} / {r['st']} bits, not 128")
        triton = r.get("source", "").startswith("triton")
        if r.get("asked") and r["fit"] < (min(r["asked"], MIN_TRITON_FIT) if triton else r["asked"]):
            found.append(f"{where}: {r['fit']} programs fit on an SM, the launcher asks for {r['asked']}")
    return found


# -- Muon --------------------------------------------------------------------------------------------------------
def muon_specializations():
    """muon_kernel's launches: each pass (PHASE 0, the momentum pass; 1, the update pass) for 3 parameter dtypes,
    with the fewest inputs and with all four (schedule, GradScaler scale, found_inf, clip): every other set of
    inputs compiles a subset of the latter's code. Labelled like the other step kernels, the pass last."""
    import triton.language as tl

    from fused_sched.backends.triton import launch, step_common

    sig = {"table_ptr": "*i64", "chunks_ptr": "*i64", "hyper_ptr": "*fp64", "counter_ptr": "*i32", "n_rows": "i32",
           "n_chunks": "i32", "schedule_ptr": "*fp64", "segments": "i32", "schedule_step_ptr": "*fp64",
           "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32", "clip_coef_ptr": "*fp32",
           "step_advance_ptr": "*fp64", "seed_lo": "i32", "seed_hi": "i32"}
    absent = {"schedule_ptr": None, "schedule_step_ptr": None, "grad_scale_ptr": None, "found_inf_ptr": None,
              "clip_coef_ptr": None}
    specs = []
    for phase, (dname, dtype), every in itertools.product(
            (0, 1), {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}.items(), (False, True)):
        # As launch_muon launches it: HAS_FORMATS False, QBLOCK the default for the default BLOCK (unused).
        consts = {"PARAM_DTYPE": dtype, "BLOCK": step_common.DEFAULT_BLOCK, "CHUNK": step_common.DEFAULT_CHUNK,
                  "ROW_BLOCK": step_common._ROW_BLOCK, "HAS_SCHEDULE": every, "HAS_SCALE": every,
                  "HAS_FOUND_INF": every, "HAS_CLIP": every, "QBLOCK": launch.DEFAULT_QBLOCK, "HAS_FORMATS": False,
                  "PHASE": phase, **({} if every else absent)}
        label = f"{dname} {'SGFC' if every else '-'} {('momentum', 'update')[phase]}"
        specs.append(("muon_kernel", label, sig, consts, step_common.DEFAULT_NUM_WARPS, launch._PROGRAMS_PER_SM))
    return specs


def triton_rows(archs, jobs: int, kernels=None) -> list[dict]:
    """kernel_machine_code.triton_rows and the Muon kernel's; kernels: names to keep (None: all)."""
    specs = triton_specializations() + muon_specializations()
    work = [(*spec, arch) for arch in archs for spec in specs if kernels is None or spec[0] in kernels]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(kernel_machine_code._compile_one, work, chunksize=4))


def _triton_folder(version: str) -> str:
    """A folder holding triton==version (pip --target, cached): put first on sys.path by the worker."""
    cache = os.environ.get("FUSED_SCHED_TRITON_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                       "fused_sched", "tritons")
    folder = os.path.join(cache, version)
    if not glob.glob(os.path.join(folder, "triton", "__init__.py")):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", folder,
                        f"triton=={version}"], check=True)
    return folder


def run_version(version: str | None, archs, jobs: int, kernels=None) -> tuple[str, list[dict]]:
    """Compile every Triton specialization with triton `version` (None: the installed one) in a subprocess."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if version is not None:
        env["PYTHONPATH"] = os.pathsep.join([_triton_folder(version), ROOT, env.get("PYTHONPATH", "")])
    else:
        env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "bench.kernel_resources", "--worker", "--jobs", str(jobs)]
    for a in archs:
        cmd += ["--arch", str(a)]
    for k in kernels or ():
        cmd += ["--kernel", k]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"triton {version or 'installed'}: the worker failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["triton"], result["rows"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton", action="append", help="triton version(s) to compile with (pip --target cache)")
    parser.add_argument("--arch", action="append", type=int, help="compute capability (default: 90 and 80)")
    parser.add_argument("--check", action="store_true", help="triton 3.6.0 and 3.9.0; fail on errors and on "
                        "sm_90 spills or stack")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--no-cuda", action="store_true", help="leave out the CUDA kernels")
    parser.add_argument("--kernel", action="append", help="only these Triton kernels (e.g. muon_kernel); with "
                        "--out '' nothing is written")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    archs = tuple(args.arch or ARCHS)
    if args.worker:
        import triton

        rows = triton_rows(archs, args.jobs, args.kernel)
        print(json.dumps({"triton": triton.__version__, "rows": rows}))
        return 0
    versions = args.triton or (list(SUPPORTED_TRITONS) if args.check else [None])
    start = time.time()
    sections, every = [], []
    for version in versions:
        began = time.time()
        actual, rows = run_version(version, archs, args.jobs, args.kernel)
        for r in rows:
            r["source"] = f"triton {actual}"
        every += rows
        sections.append((f"Triton {actual}", rows, time.time() - began))
        print(f"triton {actual}: {len(rows)} compiles in {time.time() - began:.0f} s", flush=True)
    if not args.no_cuda:
        began = time.time()
        rows = cuda_rows(archs)
        for r in rows:
            r["source"] = "nvcc"
        every += rows
        sections.append(("CUDA (nvcc, -Xptxas -v)", rows, time.time() - began))
    text = ["# Kernel resources", "",
            f"Written by `python -m bench.kernel_resources{' --check' if args.check else ''}` "
            f"({time.strftime('%Y-%m-%d', time.gmtime())}), no GPU involved: see the module docstring for what "
            "each column means. Bold: spills, or fewer programs per SM than the launcher asks for.", ""]
    for title, rows, seconds in sections:
        text += [f"## {title}", "", f"{len(rows)} compiles in {seconds:.0f} s.", "", summary(rows), "",
                 table(rows), ""]
    report = "\n".join(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report)
    for title, rows, _ in sections:
        print(f"{title}:\n{summary(rows)}")
    found = problems(every)
    print(f"{len(every)} kernels in {time.time() - start:.0f} s; written to {args.out}")
    if found:
        print("problems:\n  " + "\n  ".join(found[:50]))
    return 1 if (args.check and found) else 0


if __name__ == "__main__":
    sys.exit(main())
