"""The GPU machine code of every kernel, compiled ahead of time without a GPU: registers, spills, stack, shared
memory, the widest global load and store, and how many programs (blocks) fit on an SM against how many the
launcher asks for.

    python -m bench.kernel_resources                 # the installed triton; table to stdout and the .md file
    python -m bench.kernel_resources --check         # CI: triton 3.6 and 3.9 (installed into a cache folder)
    python -m bench.kernel_resources --triton 3.6.0 --triton 3.9.0 --arch 90

Triton: every specialization the launchers (fused_sched/backends/triton/) can
produce, i.e. adam_kernel and sgd_kernel for 3 parameter dtypes x {schedule, GradScaler scale, found_inf, clip}
(48 each), grad_norm_kernel for 3 dtypes x 4 norm kinds x {scale, finalize} (48) and the schedule evaluator:
145 per architecture, compiled with ``triton.compile`` for a ``GPUTarget`` of sm_90 and sm_80, with the options
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
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "kernel-resources.md")
#: The oldest and the newest triton the project supports (README: triton 3.6-3.9).
SUPPORTED_TRITONS = ("3.6.0", "3.9.0")
ARCHS = (90, 80)
#: Registers and threads per SM, shared memory per SM usable by blocks (H100 / A100), warps per SM.
SM_LIMITS = {90: {"regs": 65536, "smem": 227 * 1024, "warps": 64, "blocks": 32},
             80: {"regs": 65536, "smem": 163 * 1024, "warps": 64, "blocks": 32}}


# -- reading a cubin --------------------------------------------------------------------------------------------
def _cuobjdump() -> str:
    """The cuobjdump beside triton's ptxas (a CUDA toolkit's when triton ships none)."""
    try:
        from triton.backends.nvidia import compiler

        folder = os.path.dirname(compiler.get_ptxas(90).path)
        candidate = os.path.join(folder, "cuobjdump")
        if os.access(candidate, os.X_OK):
            return candidate
    except Exception:  # noqa: BLE001 (an older triton without get_ptxas(arch))
        pass
    found = shutil.which("cuobjdump")
    if found:
        return found
    sys.path.insert(0, os.path.join(ROOT, "fused_sched"))
    import _sources  # noqa: E402  (the project's toolkit discovery)

    home, _ = _sources.find_cuda_home(os.environ)
    if home and os.access(os.path.join(home, "bin", "cuobjdump"), os.X_OK):
        return os.path.join(home, "bin", "cuobjdump")
    raise RuntimeError("no cuobjdump found (triton's nvidia backend or a CUDA toolkit)")


def _width(mnemonic: str) -> int:
    mods = mnemonic.split(".")[1:]
    if "128" in mods:
        return 128
    if "64" in mods:
        return 64
    if any(m in ("U16", "S16") for m in mods):
        return 16
    if any(m in ("U8", "S8") for m in mods):
        return 8
    return 32


def read_cubin(path: str) -> dict[str, dict]:
    """{function: {regs, stack, smem, spill_st, spill_ld, ld, st, ld128}} of a cubin."""
    tool = _cuobjdump()
    usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    out: dict[str, dict] = {}
    name = None
    for line in usage.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name:
            out[name] = {"regs": int(m.group(1)), "stack": int(m.group(2)), "smem": int(m.group(3)),
                         "spill_st": 0, "spill_ld": 0, "ld": 0, "st": 0, "ld128": 0, "calls": 0}
    sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    name = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            continue
        if name not in out:
            continue
        if re.search(r"\bCALL\.", line):
            out[name]["calls"] += 1
        for op in re.findall(r"\b((?:LDG|STG|STL|LDL)(?:\.[A-Z0-9_]+)*)", line):
            kind = op.split(".")[0]
            entry = out[name]
            if kind == "STL":
                entry["spill_st"] += _width(op) // 8
            elif kind == "LDL":
                entry["spill_ld"] += _width(op) // 8
            elif kind == "LDG":
                entry["ld"] = max(entry["ld"], _width(op))
                entry["ld128"] += _width(op) == 128
            else:
                entry["st"] = max(entry["st"], _width(op))
    return out


def fit(regs: int, smem: int, threads: int, arch: int) -> int:
    """Blocks of `threads` threads that fit on one SM: the formula the Triton launcher sizes its grid with."""
    from fused_sched.backends.triton.launch import programs_per_sm

    limits = SM_LIMITS[arch]
    return programs_per_sm(regs, (threads + 31) // 32, smem, limits["regs"], limits["warps"], limits["smem"],
                           limits["blocks"])


# -- Triton ----------------------------------------------------------------------------------------------------
def triton_specializations():
    """(kernel name, label, signature types, constexprs, num_warps, programs per SM asked) of every launch the
    launchers can make."""
    import triton.language as tl

    from fused_sched.backends.triton import launch, step_common

    asked = launch._PROGRAMS_PER_SM
    warps = step_common.DEFAULT_NUM_WARPS
    dtypes = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
    specs = []
    for kernel, (dname, dtype), schedule, scale, found_inf, clip in itertools.product(
            ("adam_kernel", "sgd_kernel"), dtypes.items(), (False, True), (False, True), (False, True),
            (False, True)):
        sig = {"table_ptr": "*i64", "chunks_ptr": "*i64", "hyper_ptr": "*fp64", "counter_ptr": "*i32",
               "n_rows": "i32", "n_chunks": "i32", "schedule_ptr": "*fp64", "segments": "i32",
               "schedule_step_ptr": "*fp64", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
               "clip_coef_ptr": "*fp32", "step_advance_ptr": "*fp64", "seed_lo": "i32", "seed_hi": "i32"}
        consts = {"PARAM_DTYPE": dtype, "BLOCK": step_common.DEFAULT_BLOCK, "CHUNK": step_common.DEFAULT_CHUNK,
                  "ROW_BLOCK": step_common._ROW_BLOCK, "HAS_SCHEDULE": schedule, "HAS_SCALE": scale,
                  "HAS_FOUND_INF": found_inf, "HAS_CLIP": clip}
        # An absent optional tensor is passed as None, which Triton specializes as a constexpr.
        for flag, names in ((schedule, ("schedule_ptr", "schedule_step_ptr")), (scale, ("grad_scale_ptr",)),
                            (found_inf, ("found_inf_ptr",)), (clip, ("clip_coef_ptr",))):
            if not flag:
                for n in names:
                    consts[n] = None
        flags = "".join(c for c, on in zip("SGFC", (schedule, scale, found_inf, clip), strict=True) if on) or "-"
        specs.append((kernel, f"{dname} {flags}", sig, consts, warps, asked))
    for (dname, dtype), norm, scale, finalize in itertools.product(dtypes.items(), range(4), (False, True),
                                                                  (False, True)):
        sig = {"table_ptr": "*i64", "chunks_ptr": "*i64", "partials_ptr": "*fp64", "slot_offset": "i32",
               "n_slots": "i32", "counter_ptr": "*i32", "out_ptr": "*fp32", "grad_scale_ptr": "*fp32",
               "n_chunks": "i32", "norm_type": "fp32", "max_norm": "fp32"}
        consts = {"PARAM_DTYPE": dtype, "BLOCK": step_common.DEFAULT_BLOCK, "CHUNK": step_common.DEFAULT_CHUNK,
                  "NORM": norm, "HAS_SCALE": scale, "FINALIZE": finalize, "SLOT_BLOCK": 256}
        if not scale:
            consts["grad_scale_ptr"] = None
        label = f"{dname} norm{norm}{' S' if scale else ''}{' fin' if finalize else ''}"
        specs.append(("grad_norm_kernel", label, sig, consts, warps, asked))
    specs.append(("_evaluate_kernel", "-", {"table_ptr": "*fp64", "step_ptr": "*fp64", "out_ptr": "*fp64",
                                            "segments": "i32"}, {}, 4, None))
    return specs


def _kernel_fn(name):
    from fused_sched.backends.triton import adam, grad_norm, schedule, sgd

    return next(getattr(m, name) for m in (adam, sgd, grad_norm, schedule) if hasattr(m, name))


def _compile_one(job):
    """Compile one specialization for one arch; (row dict) or (row with an error)."""
    kernel, label, sig, consts, warps, asked, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel_fn(kernel)
    names = list(fn.arg_names)
    signature = {}
    for n in names:
        signature[n] = "constexpr" if n in consts else sig[n]
    # Triton marks a torch tensor's pointer argument as 16-byte aligned (tt.divisibility); do the same.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items() if t.startswith("*")}
    constexprs = {(names.index(n),): v for n, v in consts.items()}
    row = {"kernel": kernel, "spec": label, "arch": arch, "warps": warps, "asked": asked}
    start = time.time()
    try:
        src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps, "enable_fp_fusion": False})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            (info,) = read_cubin(f.name).values()
    except Exception as error:  # noqa: BLE001 (reported in the table, and --check fails on it)
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        return row
    row.update(info)
    row["seconds"] = round(time.time() - start, 2)
    row["fit"] = fit(info["regs"], info["smem"], warps * 32, arch)
    return row


def triton_rows(archs, jobs: int) -> list[dict]:
    work = [(*spec, arch) for arch in archs for spec in triton_specializations()]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_one, work, chunksize=4))


# -- CUDA --------------------------------------------------------------------------------------------------------
def cuda_rows(archs) -> list[dict]:
    sys.path.insert(0, os.path.join(ROOT, "fused_sched"))
    import _sources  # noqa: E402

    home, note = _sources.find_cuda_home(os.environ)
    if home is None:
        return [{"kernel": "csrc/cuda/*.cu", "spec": "-", "arch": a, "error": note} for a in archs]
    nvcc = os.path.join(home, "bin", "nvcc")
    flags = [f for f in _sources.NVCC_FLAGS if not f.startswith("-gencode")]
    # One translation unit per kernel source (adam.cu, sgd.cu, grad_norm.cu, ...); the launch constants live in
    # them and in the shared kernel_common.cuh.
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    text = "".join(open(p).read() for p in sources + sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh"))))
    threads = int(re.search(r"constexpr int kThreads = (\d+);", text).group(1))
    asked = {k: int(v) for k, v in re.findall(r"constexpr int (k\w*BlocksPerSm) = (\d+);", text)}
    rows, libm_frames = [], {}
    for arch, source in itertools.product(archs, sources):
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            cmd = [nvcc, "-std=c++17", *flags, f"-I{os.path.join(ROOT, 'csrc', 'include')}", f"-arch=sm_{arch}",
                   "-cubin", "-Xptxas", "-v", source, "-o", cubin]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"kernel": os.path.basename(source), "spec": "-", "arch": arch,
                             "error": done.stderr.strip().splitlines()[-1][:200]})
                continue
            # ptxas -v: the register spills of each entry function (a libm slow path's local array is no spill).
            spills, current = {}, None
            for line in done.stderr.splitlines():
                m = re.search(r"Compiling entry function '(\S+)'", line)
                if m:
                    current = m.group(1)
                m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
                if m and current:
                    spills[current] = (int(m.group(1)), int(m.group(2)))
            if arch not in libm_frames:
                libm_frames[arch] = _libm_frame(nvcc, arch, tmp)
            libm = libm_frames[arch]
            for mangled, info in read_cubin(cubin).items():
                info["spill_st"], info["spill_ld"] = spills.get(mangled, (info["spill_st"], info["spill_ld"]))
                info["libm_stack"] = libm
                pretty = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip()
                name = re.sub(r"^void ", "", pretty.replace("(anonymous namespace)::", "")).split("(")[0]
                name = name.replace("fused_sched::cuda::", "").strip()
                per_sm = asked["kNormBlocksPerSm"] if "norm" in name else asked["kBlocksPerSm"]
                rows.append({"kernel": name, "spec": "-", "arch": arch, "warps": threads // 32, "asked": per_sm,
                             **info, "fit": fit(info["regs"], info["smem"], threads, arch)})
    return rows


def _libm_frame(nvcc: str, arch: int, tmp: str) -> int:
    """The stack frame that CUDA's double cos() brings into a kernel (its Payne-Hanek argument reduction keeps a
    local array, used only for huge arguments): measured with this nvcc on a kernel that calls nothing else."""
    source = os.path.join(tmp, "libm_probe.cu")
    with open(source, "w") as f:
        f.write("__global__ void probe(const double* x, double* y) { y[threadIdx.x] = cos(x[threadIdx.x]) + "
                "pow(x[threadIdx.x], y[threadIdx.x]); }\n")
    done = subprocess.run([nvcc, f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", source, "-o",
                           os.path.join(tmp, "libm_probe.cubin")], capture_output=True, text=True, check=True)
    frames = [int(x) for x in re.findall(r"(\d+) bytes stack frame", done.stderr)]
    return max(frames, default=0)


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
STEP_KERNELS = ("adam_kernel", "sgd_kernel")


#: A call frame: registers a kernel saves around the compiler's own subroutines (the slow paths of IEEE float64
#: division and of sqrt / division in float32, libm), at kernel entry or per chunk, never per element. Seen on
#: sm_90 / sm_80 with triton 3.6 and 3.9: 4-8 bytes of spill stores and an 8-byte stack in some Triton step
#: kernels, each with CALL instructions in its SASS.
CALL_FRAME_SPILL, CALL_FRAME_STACK = 8, 16
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
        if (r["arch"] == 90 or step) and spilled and not _call_frame(r):
            found.append(f"{where}: spills {r['spill_st']}/{r['spill_ld']} bytes, stack {r['stack']} bytes")
        if r["kernel"] in STEP_KERNELS and (r["ld"] < 128 or r["st"] < 128):
            found.append(f"{where}: widest global load / store {r['ld']} / {r['st']} bits, not 128")
        triton = r.get("source", "").startswith("triton")
        if r.get("asked") and r["fit"] < (min(r["asked"], MIN_TRITON_FIT) if triton else r["asked"]):
            found.append(f"{where}: {r['fit']} programs fit on an SM, the launcher asks for {r['asked']}")
    return found


def _triton_folder(version: str) -> str:
    """A folder holding triton==version (pip --target, cached): put first on sys.path by the worker."""
    cache = os.environ.get("FUSED_SCHED_TRITON_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                       "fused_sched", "tritons")
    folder = os.path.join(cache, version)
    if not glob.glob(os.path.join(folder, "triton", "__init__.py")):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", folder,
                        f"triton=={version}"], check=True)
    return folder


def run_version(version: str | None, archs, jobs: int) -> tuple[str, list[dict]]:
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
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    archs = tuple(args.arch or ARCHS)
    if args.worker:
        import triton

        rows = triton_rows(archs, args.jobs)
        print(json.dumps({"triton": triton.__version__, "rows": rows}))
        return 0
    versions = args.triton or (list(SUPPORTED_TRITONS) if args.check else [None])
    start = time.time()
    sections, every = [], []
    for version in versions:
        began = time.time()
        actual, rows = run_version(version, archs, args.jobs)
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
