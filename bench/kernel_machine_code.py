"""Compiling every kernel for an architecture without a GPU and reading its machine code (bench/kernel_resources.py
says what and why): the cubin reader, the Triton specializations and their compilation, the CUDA kernels with
ptxas -v."""

from __future__ import annotations

import glob
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Registers and threads per SM, shared memory per SM usable by blocks (H100 / A100), warps per SM.
SM_LIMITS = {90: {"regs": 65536, "smem": 227 * 1024, "warps": 64, "blocks": 32},
             80: {"regs": 65536, "smem": 163 * 1024, "warps": 64, "blocks": 32}}

# -- reading a cubin --------------------------------------------------------------------------------------------
#: The spec suffix of the step kernels compiled with the state formats' path (HAS_FORMATS=True).
FORMATTED = "formats"

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
                  "HAS_FOUND_INF": found_inf, "HAS_CLIP": clip,
                  # The 8-bit block size of the state formats (the optimizers' default, 256); without formats.
                  "QBLOCK": 256, "HAS_FORMATS": False}
        # An absent optional tensor is passed as None, which Triton specializes as a constexpr.
        for flag, names in ((schedule, ("schedule_ptr", "schedule_step_ptr")), (scale, ("grad_scale_ptr",)),
                            (found_inf, ("found_inf_ptr",)), (clip, ("clip_coef_ptr",))):
            if not flag:
                for n in names:
                    consts[n] = None
        flags = "".join(c for c, on in zip("SGFC", (schedule, scale, found_inf, clip), strict=True) if on) or "-"
        specs.append((kernel, f"{dname} {flags}", sig, consts, warps, asked))
        if flags in ("-", "SGFC"):
            # With the state formats' path (HAS_FORMATS: a bucket with a low-memory row): its fewest and most
            # inputs only (each formatted variant compiles for a minute on the CI machine).
            specs.append((kernel, f"{dname} {flags} {FORMATTED}", sig, {**consts, "HAS_FORMATS": True}, warps, asked))
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
    from fused_sched.backends.triton import adam, grad_norm, muon, schedule, sgd

    return next(getattr(m, name) for m in (adam, sgd, muon, grad_norm, schedule) if hasattr(m, name))


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
