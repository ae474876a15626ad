"""Triton kernels of the fused optimizer step: one launch updates every tensor of one (device, dtype) bucket.

Modules: one per optimizer family, each with its block update, its kernel over a bucket's chunks, its launcher and
its custom op (``adam.py``, ``sgd.py``, ``muon.py``: Muon's two elementwise passes; the norm pass of fused clipping:
``grad_norm.py``); what they share: ``step_common.py`` (jit helpers), ``state_format.py`` (the low-memory state
formats' rules), ``launch.py`` (checks, grid, configuration, tensor-list tables), ``schedule.py`` and ``libm.py``
(the device schedule), ``runner.py`` (the eager runner and its table of launchers).

Design
------
* Address table (``OptimBucket.address_table``): int64 ``[n, TABLE_COLUMNS]``, one row per tensor: (param, grad,
  state0, state1, state2, step) addresses, numel, param-group index, master-copy address, param id, state format,
  8-bit absmax and code table addresses, SGD's fresh flag (optim_math.h ``TableColumn``). The kernels turn the
  addresses into typed pointers (the pattern of Triton's grouped-GEMM tutorial), so one launch reaches tensors
  that share no storage. Adam:
  state0 = exp_avg, state1 = exp_avg_sq, state2 = max_exp_avg_sq (0 unless amsgrad), step = a float32
  one-element tensor. SGD: state0 = momentum_buffer (0 without momentum); step = the float32 step of a bfloat16
  buffer rounded stochastically (0 without); column 14 the "fresh buffer" flag (1 on the step that creates the
  buffer, which torch fills with the gradient). A nonzero master
  address (master_weights) makes the kernel read and write the float32 copy and write the parameter rounded from
  it; the param id keys stochastic rounding's random bits.
* Chunk map (``build_chunks``): int64 ``[n_chunks, 2]`` of (row, start); a chunk covers elements
  ``[start, min(start + CHUNK, numel))`` of one tensor. Chunks, not tensors, are the unit of work, so a bucket of
  one huge and many tiny tensors still spreads evenly over the programs.
* Hyper-parameter table (fused_sched/_hyper.py, optim_math.h ``HyperColumn``): float64 ``[groups, 8]``. Every
  chunk computes its scalars on the device in float64 exactly like ``adam_coeffs`` / ``sgd_coeffs`` and rounds
  them to float32 once; the host reads neither the table nor the steps, so a launch can be captured in a CUDA
  graph and replayed while the learning rate and the steps change.
* Device schedules (``schedule`` / ``schedule_step``, HAS_SCHEDULE): every chunk also evaluates its group's
  schedule program (schedule.py, schedule_math.h) at the scheduler's float64 step counter, and the values
  it sets replace the row's lr and beta1 (SGD: momentum), as ``effective_hyper`` in csrc/cpu/step_common.cpp does.
  Without a schedule HAS_SCHEDULE is false and none of it is compiled.
* Persistent grid: ``num_programs`` programs, program ``pid`` taking chunks ``pid, pid + num_programs, ...``.
  Offsets are int64 throughout: tensors of more than 2**31 elements work.
* Vector path: the addresses come from a table, so Triton knows nothing of their alignment and would move every
  element on its own (32-bit loads). A chunk whose tensors all start on a 16-byte boundary runs its full blocks
  through ``_adam_block`` / ``_sgd_block`` with FULL=True: alignment and contiguity hints, no element masks (the
  optional states are gated by masks uniform over the block), so every load and store is a 16-byte vector; the
  partial last block and misaligned tensors take the masked path (FULL=False). Both paths compute the same
  operations in the same order (bit-for-bit tests against the C++ backend cover each).
* Low-memory state formats (docs/state_formats.md): each chunk reads its row's format column. Format 0 (float32
  states, no remainder) takes the float32 path above, unchanged; any other row takes ``_adam_formatted_chunk`` /
  ``_sgd_formatted_chunk``, specialized at compile time on the moments' format (float32, bfloat16, blockwise 8-bit)
  and branched at run time per chunk, which widen the states to float32, run the same element update
  (``_adam_element`` / ``_sgd_element``) and narrow the results; a bfloat16 param whose master is an int16
  remainder is joined into its float32 master and split back. One launch updates rows of every format. The 8-bit
  block size is the constexpr ``QBLOCK`` (``TritonBucketRunner(block_size=...)``, the optimizer's one size); a BLOCK
  of new values is reshaped to ``[BLOCK // QBLOCK, QBLOCK]`` for the blocks' absmax. The registered list ops stay
  float32-only.
* Step advance without a race: a program reads a tensor's step (and uses step + 1) while it updates that
  tensor's chunks, so no step may change before every program is done. Each program therefore takes a ticket
  from ``counter`` (int32, zero before the launch) once its chunks are done; the program holding the last ticket
  increments every step and clears every fresh flag (SGD), then zeroes ``counter`` so that the next launch
  (or CUDA-graph replay) starts clean.

* Large-model inputs (optional pointers, compiled in by constexpr flags): GradScaler's ``grad_scale`` (gradients
  are divided by it) and ``found_inf`` (when set, no program touches anything and the steps do not advance), a
  fused clip's ``clip_coef`` (gradients are multiplied by it; the prescaled gradient is written back into
  ``.grad``, as torch's fused kernels leave it unscaled and clip_grad_norm_ leaves it clipped), and
  ``step_advance`` (float64, set to 1 by the last program of a step that ran, left alone by a skipped one) which
  the bound device scheduler adds to its counter and clears.
* Norm pass (``grad_norm_kernel``): every program accumulates |g|^p (or max |g|) of its chunks in float64 into its
  slot of a partials buffer; the launch marked FINALIZE has its last program combine every slot in order
  (deterministic), and write the total norm and torch's clip coefficient (optim_math.h ``total_norm_from``,
  ``clip_coefficient``).

Numerics mirror csrc/include/fused_sched/ (optim_math.h, adam_math.h, sgd_math.h) operation by operation, so
results agree with the C++ backends (and torch.optim) to the last bit or so:

* a multiply-add rounds once exactly where the math headers call MathOps::fma (where torch's vectorized CPU kernels
  fuse: add with alpha, lerp), through an explicit ``tl.fma``; everywhere else the launch disables fp fusion, so
  a multiply and an add round twice;
* divisions and square roots are IEEE round-to-nearest (``tl.div_rn`` / ``tl.sqrt_rn``, not the approximate
  defaults of ``/`` and ``tl.sqrt`` on float32);
* beta ** step is computed in double-double arithmetic (``_pow``): libdevice's pow is unavailable under the
  Triton interpreter, and exp2(step * log2(beta)) would be far less accurate than the C pow() that torch uses;
* negation multiplies by -1 (Triton's unary minus is 0 - x, which turns -0.0 into +0.0);
* float32 -> bfloat16 rounds to nearest-even by integer arithmetic, because the Triton interpreter truncates
  that conversion (float16 conversions are exact on both).
"""
